"""`tfopt.bench.run`: latency, throughput, size and accuracy across backends."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import keras
import numpy as np

from tfopt.bench import _backends
from tfopt.bench._timing import measure
from tfopt.errors import ConfigError


@dataclasses.dataclass
class BenchRow:
    """One runner at one batch size."""

    name: str
    backend: str
    precision: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    spread: float  # p90 / p50
    throughput: float  # items per second at the median
    size_bytes: Optional[int]
    gzip_bytes: Optional[int]
    accuracy: Optional[float]
    artifact: Optional[str]


@dataclasses.dataclass
class BenchReport:
    """Rows of measurements, with the ways to show them."""

    rows: list[BenchRow]
    environment: dict

    def table(self) -> str:
        header = (f"{'runner':<34}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"
                  f"{'spread':>8}{'items/s':>11}{'size MB':>9}{'gzip MB':>9}{'acc':>8}")
        lines = [header, "-" * len(header)]
        for r in self.rows:
            size = "" if r.size_bytes is None else f"{r.size_bytes / 2**20:.2f}"
            gz = "" if r.gzip_bytes is None else f"{r.gzip_bytes / 2**20:.2f}"
            acc = "" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
            lines.append(f"{r.name:<34}{r.batch_size:>6}{r.p50_ms:>10.3f}{r.p90_ms:>10.3f}"
                         f"{r.p99_ms:>10.3f}{r.spread:>8.2f}{r.throughput:>11.1f}"
                         f"{size:>9}{gz:>9}{acc:>8}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"environment": self.environment, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def write_json(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def headline(self, baseline: Optional[str] = None, candidate_prefix: str = "",
                 size_reference: Optional[str] = None, batch_size: Optional[int] = None) -> str:
        """One sentence: how much smaller and faster, at what accuracy cost.

        Args:
            baseline: Name of the runner to compare against (default: the first).
            candidate_prefix: Only runners whose name starts with this compete;
                the fastest of them is reported.
            size_reference: Runner whose artifact size stands for the baseline's
                (a Keras model in memory has no file; its float ONNX does).
            batch_size: Batch size to compare at (default: the smallest timed).
        """
        batch = batch_size or min(r.batch_size for r in self.rows)
        at = [r for r in self.rows if r.batch_size == batch]
        base = next((r for r in at if r.name == baseline), at[0])
        others = [r for r in at if r is not base and r.name.startswith(candidate_prefix)]
        if not others:
            return f"{base.name}: {base.p50_ms:.2f} ms at batch {batch}."
        best = min(others, key=lambda r: r.p50_ms)
        parts = [f"{best.name} is {base.p50_ms / best.p50_ms:.1f}x faster than {base.name} "
                 f"at batch {batch} ({best.p50_ms:.3g} vs {base.p50_ms:.3g} ms)"]
        reference = next((r for r in at if r.name == size_reference), base)
        if reference.size_bytes and best.size_bytes:
            parts.append(f"{reference.size_bytes / best.size_bytes:.1f}x smaller than "
                         f"{reference.name.split(' / ')[0]} ({best.size_bytes / 2**20:.3g} vs "
                         f"{reference.size_bytes / 2**20:.3g} MB)")
        if base.accuracy is not None and best.accuracy is not None:
            parts.append(f"at {100 * (best.accuracy - base.accuracy):+.2f} accuracy points "
                         f"({100 * best.accuracy:.2f}% vs {100 * base.accuracy:.2f}%)")
        return ", ".join(parts) + "."

    def plot(self, path: Union[str, os.PathLike], batch_size: Optional[int] = None) -> Path:
        """Bar chart of median latency and file size per runner (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batch = batch_size or min(r.batch_size for r in self.rows)
        rows = [r for r in self.rows if r.batch_size == batch]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.8))
        names = [r.name for r in rows]
        left.barh(names, [r.p50_ms for r in rows], xerr=[[0] * len(rows),
                  [r.p90_ms - r.p50_ms for r in rows]], color="#4c72b0")
        left.set_xscale("log")
        left.set_xlabel(f"median latency, ms, log scale (batch {batch}; whisker: p90)")
        left.invert_yaxis()
        sized = [(r.name, r.size_bytes / 2**20) for r in rows if r.size_bytes]
        if sized:
            right.barh([n for n, _ in sized], [s for _, s in sized], color="#55a868")
            right.invert_yaxis()
        right.set_xlabel("file size, MB")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def markdown(self) -> str:
        lines = ["| runner | batch | p50 ms | p90 ms | p99 ms | items/s | size MB | gzip MB | accuracy |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.batch_size} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | {r.p99_ms:.3f} "
                f"| {r.throughput:.1f} | {'' if r.size_bytes is None else f'{r.size_bytes / 2**20:.2f}'} "
                f"| {'' if r.gzip_bytes is None else f'{r.gzip_bytes / 2**20:.2f}'} "
                f"| {'' if r.accuracy is None else f'{100 * r.accuracy:.2f}%'} |")
        return "\n".join(lines)


Artifact = Union[keras.Model, str, os.PathLike, _backends.Runner]


def runners_for(artifact: Artifact, label: Optional[str] = None) -> list[_backends.Runner]:
    """Every runner that applies to an artifact (a model, a SavedModel, an ONNX file)."""
    if isinstance(artifact, _backends.Runner):
        return [artifact]
    if isinstance(artifact, keras.Model):
        return _backends.keras_runners(artifact, label or "keras")
    path = Path(artifact)
    if not path.exists():
        raise ConfigError(f"No artifact at {path}: pass a .keras model, a SavedModel folder "
                          "or an .onnx file that exists.")
    if path.suffix == ".onnx":
        return _backends.onnx_runners(path, label or path.parent.name or "onnx")
    if path.suffix == ".keras":
        return _backends.keras_runners(keras.models.load_model(path), label or path.stem)
    if path.suffix == ".plan":
        manifest = path.parent / "manifest.json"
        if not manifest.exists():
            raise ConfigError(f"A TensorRT engine is benchmarked with the manifest.json that "
                              f"tfopt.export wrote beside it (for its inputs); none at {manifest}.")
        from tfopt.export._signature import ModelSignature

        signature = ModelSignature.from_manifest(json.loads(manifest.read_text()))
        return [_backends.tensorrt_runner(path, signature, label or "tensorrt")]
    if path.is_dir() and (path / "saved_model.pb").exists():
        return [_backends.saved_model_runner(path, label or "saved_model")]
    raise ConfigError(
        f"Don't know how to benchmark {path}: expected a .keras file, an .onnx file, a "
        "TensorRT .plan written by tfopt.export, or a SavedModel folder (with saved_model.pb).")


def run(artifacts: Sequence[Artifact], inputs, *, batch_sizes: Sequence[int] = (1, 8, 32),
        labels=None, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.5,
        progress: bool = True) -> BenchReport:
    """Time every artifact on every backend that applies, at each batch size.

    Args:
        artifacts: Keras models, ``.keras`` files, SavedModel folders, ``.onnx``
            files, or :class:`tfopt.bench.Runner` objects.
        inputs: Real inputs: an array (one input) or a list of arrays. Batches
            are taken from the front (repeated if there are too few rows).
        batch_sizes: Batch sizes to time.
        labels: Integer class labels for ``inputs``; adds an accuracy column
            (argmax of the first output, over all of ``inputs``).
        warmup: Untimed calls per runner and batch size.
        repeats: Timed calls at least; more until ``min_seconds`` have passed.

    Returns:
        A :class:`BenchReport`: ``.table()``, ``.markdown()``, ``.write_json()``,
        ``.plot()``, ``.headline()``.

    Example:
        >>> report = tfopt.bench.run([model, "out/model.onnx"], x_test, labels=y_test)
        >>> print(report.table())
    """
    arrays, batch_sizes = _check_run_args(inputs, batch_sizes, labels, warmup, repeats,
                                          min_seconds)
    runners = [r for a in artifacts for r in runners_for(a)]
    sizes = {}
    for runner in runners:
        if runner.artifact is not None:
            from tfopt.export._validate import sizes as measure_size

            sizes[runner.name] = measure_size(runner.artifact)
    rows = []
    total = len(runners) * len(batch_sizes)
    bar = _progress(total, progress)
    for runner in runners:
        _first_call(runner, [_batch(a, batch_sizes[0]) for a in arrays])
        accuracy = _accuracy(runner, arrays, labels) if labels is not None else None
        for batch in batch_sizes:
            feed = [_batch(a, batch) for a in arrays]
            timing = measure(lambda: runner.run(feed), warmup=warmup, repeats=repeats,
                             min_seconds=min_seconds)
            size = sizes.get(runner.name, {})
            rows.append(BenchRow(
                name=runner.name, backend=runner.backend, precision=runner.precision,
                batch_size=batch, p50_ms=1e3 * timing.p50, p90_ms=1e3 * timing.p90,
                p99_ms=1e3 * timing.p99, spread=timing.spread,
                throughput=timing.throughput(batch), size_bytes=size.get("raw"),
                gzip_bytes=size.get("gzip"), accuracy=accuracy,
                artifact=None if runner.artifact is None else str(runner.artifact)))
            bar.update(1)
    bar.close()
    return BenchReport(rows, _environment())


def _check_run_args(inputs, batch_sizes, labels, warmup, repeats, min_seconds):
    """Every argument of run() in range, before any timing."""
    from tfopt import _checks

    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, (list, tuple)) \
            or not batch_sizes:
        raise ConfigError(f"batch_sizes must be a non-empty list of positive integers, got "
                          f"{batch_sizes!r}; e.g. [1, 8, 32].")
    batch_sizes = [_checks.number("batch size", b, low=1, integer=True) for b in batch_sizes]
    _checks.number("warmup", warmup, low=0, integer=True)
    _checks.number("repeats", repeats, low=1, integer=True)
    _checks.number("min_seconds", min_seconds, low=0, high=3600,
                   hint="It is how long each runner is timed at least, e.g. 0.5.")
    arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    for array in arrays:
        if array.dtype.kind not in "biuf" or array.ndim == 0 or len(array) == 0:
            raise ConfigError(f"inputs must be non-empty numeric arrays with a batch axis, got "
                              f"shape {array.shape} of {array.dtype}. Pass real inputs, e.g. "
                              "x_test.")
    if len({len(a) for a in arrays}) > 1:
        raise ConfigError(f"inputs have different numbers of rows: "
                          f"{[len(a) for a in arrays]}; pass one row per sample in each.")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.size != len(arrays[0]) or labels.dtype.kind not in "biu":
            raise ConfigError(
                f"labels must be one integer class per input row: got {labels.size} "
                f"{labels.dtype} value(s) for {len(arrays[0])} rows.")
    return arrays, batch_sizes


def _first_call(runner, feed) -> None:
    """Run once outside the timer: a runner that rejects the inputs fails clearly."""
    from tfopt.errors import TfoptError

    try:
        runner.run(feed)
    except TfoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - every engine has its own error types
        raise ConfigError(
            f"{runner.name} cannot run inputs of shape {[tuple(a.shape) for a in feed]} "
            f"({_dtypes(feed)}): {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. "
            "Pass inputs shaped like the model's input.") from None


def _dtypes(feed) -> str:
    return ", ".join(sorted({str(a.dtype) for a in feed}))


def _batch(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) >= size:
        return np.ascontiguousarray(array[:size])
    reps = -(-size // len(array))
    return np.ascontiguousarray(np.concatenate([array] * reps)[:size])


def _accuracy(runner, arrays, labels, batch: int = 64) -> float:
    labels = np.asarray(labels).reshape(-1)
    predictions = []
    for start in range(0, len(labels), batch):
        out = runner.run([a[start:start + batch] for a in arrays])
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        predictions.append(out.reshape(len(out), -1).argmax(axis=1))
    return float(np.mean(np.concatenate(predictions) == labels))


def _environment() -> dict:
    import platform

    import tensorflow as tf

    env = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return env


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run", disable=None if enabled else True,
                leave=False)

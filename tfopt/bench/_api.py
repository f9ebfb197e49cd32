"""`tfopt.bench.run`: latency, throughput, size and accuracy across backends."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import keras
import numpy as np

from tfopt import artifacts as _artifacts
from tfopt.artifacts._runner import Runner
from tfopt.bench import _backends, _memory
from tfopt.bench._timing import measure
from tfopt import _data
from tfopt.errors import ConfigError
from tfopt.targets import _cpu_int8

logger = logging.getLogger(__name__)

# What TF Serving runs: the headline's default baseline.
SERVING_BASELINE = "saved_model"


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
    engine: str = ""  # what runs it, e.g. "ORT CPU", "OpenVINO CPU bf16", "TensorFlow"
    peak_rss_bytes: Optional[int] = None  # of a fresh process serving this runner alone
    # GPU memory that process held after serving the largest batch (CUDA and TensorRT
    # engines; None elsewhere): the engine's memory pool keeps its peak.
    device_bytes: Optional[int] = None


@dataclasses.dataclass
class BenchReport:
    """Rows of measurements, with the ways to show them."""

    rows: list[BenchRow]
    environment: dict

    def table(self) -> str:
        width = max([34] + [len(r.name) + 2 for r in self.rows])
        header = (f"{'runner':<{width}}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"
                  f"{'spread':>8}{'items/s':>11}{'GPU MB':>8}{'size MB':>9}{'gzip MB':>9}"
                  f"{'peak MB':>9}{'acc':>8}")
        lines = [header, "-" * len(header)]
        for r in self.rows:
            size = "" if r.size_bytes is None else f"{r.size_bytes / 2**20:.2f}"
            gz = "" if r.gzip_bytes is None else f"{r.gzip_bytes / 2**20:.2f}"
            acc = "" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
            lines.append(f"{r.name:<{width}}{r.batch_size:>6}{r.p50_ms:>10.3f}{r.p90_ms:>10.3f}"
                         f"{r.p99_ms:>10.3f}{r.spread:>8.2f}{r.throughput:>11.1f}"
                         f"{_device_mb(r):>8}{size:>9}{gz:>9}{_memory_mb(r):>9}{acc:>8}")
        lines.append(self.cpu_line())
        return "\n".join(lines)

    def cpu_line(self) -> str:
        """Which CPU, which instruction sets were found, what OpenVINO's CPU plugin offers."""
        env = self.environment
        isa = env.get("cpu_isa") or "unknown"
        if not isinstance(isa, str):  # reports written before the ISA was a string of flags
            isa = " ".join(isa)
        text = f"CPU: {env.get('cpu') or 'unknown'}, {env.get('cpus')} cores, ISA: {isa}"
        if env.get("openvino_cpu_capabilities"):
            text += (f"; OpenVINO {env.get('openvino')} CPU plugin: "
                     f"{', '.join(env['openvino_cpu_capabilities'])}")
        return text + "."

    def to_dict(self) -> dict:
        return {"environment": self.environment, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def write_json(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def headline(self, baseline: Optional[str] = None, candidate_prefix: str = "",
                 size_reference: Optional[str] = None, batch_size: Optional[int] = None) -> str:
        """One sentence: how much faster and smaller than what TF Serving runs, at what accuracy.

        The baseline is the float SavedModel on TensorFlow (TF Serving's
        engine) at the same batch size, never ``model.predict``. When the
        table holds the float model on the winner's engine too, the sentence
        says how much of the gain is the engine's and how much the
        optimization's.

        Args:
            baseline: Name of the runner to compare against (default: the
                first SavedModel row).
            candidate_prefix: Only runners whose name starts with this compete;
                the fastest of them is reported.
            size_reference: Runner whose artifact size stands for the baseline's
                (default: the baseline itself).
            batch_size: Batch size to compare at (default: the smallest timed).

        Raises:
            ConfigError: If the baseline is a ``predict`` row, or there is no
                SavedModel row to default to.
        """
        batch = batch_size or min(r.batch_size for r in self.rows)
        at = [r for r in self.rows if r.batch_size == batch]
        if baseline is None:
            base = next((r for r in at if r.backend == SERVING_BASELINE), None)
            if base is None:
                raise ConfigError(
                    "The headline compares against the float SavedModel on TensorFlow (what TF "
                    "Serving runs): benchmark one (tfopt.export(..., formats=('saved_model',))) "
                    "or name another runner with baseline=.")
        else:
            base = next((r for r in at if r.name == baseline), None)
            if base is None:
                raise ConfigError(f"No runner named {baseline!r} at batch {batch}; runners: "
                                  f"{[r.name for r in at]}.")
        if base.backend == "keras_predict":
            raise ConfigError(
                f"{base.name!r} is model.predict, which measures Keras' predict loop, not a "
                "served model: compare against the float SavedModel on TensorFlow instead.")
        others = [r for r in at if r is not base and r.name.startswith(candidate_prefix)
                  and r.backend != "keras_predict"]
        if not others:
            return f"{base.name}: {base.p50_ms:.3g} ms at batch {batch}."
        best = min(others, key=lambda r: r.p50_ms)
        parts = [f"{best.name} is {base.p50_ms / best.p50_ms:.1f}x faster than {base.name} "
                 f"at batch {batch} ({best.p50_ms:.3g} vs {base.p50_ms:.3g} ms)"]
        same_engine = [r for r in at if r.engine == best.engine and r.engine and r is not best
                       and r is not base and not r.name.startswith(candidate_prefix)]
        if candidate_prefix and same_engine:
            engine_float = same_engine[0]
            parts.append(f"{base.p50_ms / engine_float.p50_ms:.1f}x for the float model on that "
                         f"engine ({engine_float.name}: {engine_float.p50_ms:.3g} ms)")
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
        lines = ["| runner | batch | p50 ms | p90 ms | p99 ms | items/s | GPU memory MB | size MB "
                 "| gzip MB | peak memory MB | accuracy |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.batch_size} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | {r.p99_ms:.3f} "
                f"| {r.throughput:.1f} | {_device_mb(r)} "
                f"| {'' if r.size_bytes is None else f'{r.size_bytes / 2**20:.2f}'} "
                f"| {'' if r.gzip_bytes is None else f'{r.gzip_bytes / 2**20:.2f}'} "
                f"| {_memory_mb(r)} "
                f"| {'' if r.accuracy is None else f'{100 * r.accuracy:.2f}%'} |")
        return "\n".join(lines)


def _memory_mb(row: BenchRow) -> str:
    """Peak resident (host) memory, MB."""
    return "" if row.peak_rss_bytes is None else f"{row.peak_rss_bytes / 2**20:.0f}"


def _device_mb(row: BenchRow) -> str:
    """GPU memory the engine held after timing, MB ('' where it runs on no GPU)."""
    return "" if row.device_bytes is None else f"{row.device_bytes / 2**20:.0f}"


Artifact = Union[keras.Model, str, os.PathLike, Runner]


def runners_for(artifact: Artifact, label: Optional[str] = None, *,
                openvino_modes: Sequence[str] = ("latency",),
                openvino_from_onnx: bool = False) -> list[Runner]:
    """Every runner that applies to an artifact.

    A Keras model (or ``.keras`` file) gives ``predict``, eager, ``tf.function``
    and ``tf.function(jit_compile=True)`` rows; exported artifacts run through
    :mod:`tfopt.artifacts`: a SavedModel on TensorFlow, an ``.onnx`` on ONNX
    Runtime CPU (and CUDA where present), an OpenVINO IR (its folder or
    ``.xml``) on OpenVINO CPU in f32 and bf16 (where the CPU has it), in
    each of ``openvino_modes`` (``"latency"``, ``"throughput"``), a ``.plan``
    on TensorRT. An export directory gives every artifact in it. With
    ``openvino_from_onnx`` (and OpenVINO installed) an ``.onnx`` also runs
    on OpenVINO, which reads ONNX directly.
    """
    if isinstance(artifact, Runner):
        return [artifact]
    if isinstance(artifact, keras.Model):
        return _backends.keras_runners(artifact, label or "keras")
    path = Path(artifact)
    if not path.exists():
        raise ConfigError(f"No artifact at {path}: pass a .keras model, a SavedModel folder, "
                          "an .onnx file or an OpenVINO IR that exists.")
    if path.suffix == ".keras":
        return _backends.keras_runners(keras.models.load_model(path), label or path.stem)
    if _artifacts.kind(path) is None and path.is_dir() and (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        found = []
        for fmt, info in manifest.get("artifacts", {}).items():
            target = path / info["path"]
            if fmt in ("saved_model", "saved_model_xla") or \
                    _artifacts.kind(target) not in (None, "saved_model"):
                runners = runners_for(target, f"{label or path.name} {fmt}",
                                      openvino_modes=openvino_modes)
                if fmt == "saved_model_xla":  # not TF Serving's default engine: no baseline
                    for runner in runners:
                        runner.backend = "saved_model_xla"
                        runner.precision = manifest.get("precision", runner.precision)
                found += runners
        return found
    try:
        found = _artifacts.load(path, label, openvino_modes=openvino_modes)
        if openvino_from_onnx and _artifacts.kind(path) == "onnx":
            from tfopt.artifacts import _openvino

            if _openvino.available():
                found += _openvino.openvino_runners(path, label or path.parent.name or "onnx",
                                                    modes=openvino_modes)
        return found
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("Don't know how to run",
                                           "Don't know how to benchmark")) from None


def run(artifacts: Sequence[Artifact], inputs, *, batch_sizes: Sequence[int] = (1, 8, 32),
        labels=None, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.5,
        progress: bool = True, memory: bool = True) -> BenchReport:
    """Time every artifact on every backend that applies, at each batch size.

    Args:
        artifacts: Keras models, ``.keras`` files, SavedModel folders, ``.onnx``
            files, or :class:`tfopt.bench.Runner` objects.
        inputs: Real inputs: an array (one input) or a list of arrays. Batches
            are taken from the front (repeated if there are too few rows).
            Or a ``tf.data.Dataset`` of inputs or ``(inputs, labels)``: timing
            reads as many samples as the largest batch, and with labels the
            accuracy column covers the whole dataset, streamed batch by batch
            (the report's environment says how many samples).
        batch_sizes: Batch sizes to time.
        labels: Integer class labels for ``inputs``; adds an accuracy column
            (argmax of the first output, over all of ``inputs``).
        warmup: Untimed calls per runner and batch size.
        repeats: Timed calls at least; more until ``min_seconds`` have passed.
        memory: Measure each artifact runner's peak memory while serving the
            largest batch, in a fresh process of its own: its resident memory
            high-water mark, and for CUDA and TensorRT engines the GPU memory
            the process holds after those calls (NVML, else ``nvidia-smi``),
            shown as ``GPU MB`` beside the latencies. Keras models in memory
            get none.

    Returns:
        A :class:`BenchReport`: ``.table()``, ``.markdown()``, ``.write_json()``,
        ``.plot()``, ``.headline()``.

    Example:
        >>> report = tfopt.bench.run([model, "out/model.onnx"], x_test, labels=y_test)
        >>> print(report.table())
    """
    dataset = None
    if _data.is_dataset(inputs):
        if labels is not None:
            raise ConfigError("labels= with a tf.data.Dataset: give a dataset of (inputs, "
                              "labels) instead, and its labels are used.")
        dataset = inputs if _data.is_labelled(inputs) else None
        if dataset is not None and _data.is_infinite(dataset):
            raise ConfigError("The dataset passed to tfopt.bench.run repeats forever, and its "
                              "accuracy is measured over all of it: pass one pass of it (no "
                              ".repeat()), or .take(n) of it.")
        sizes = _check_run_args(np.zeros((1, 1)), batch_sizes, None, warmup, repeats,
                                min_seconds)[1]
        inputs = _data.inputs_from_dataset(inputs, max(sizes), "inputs")
        if isinstance(inputs, dict):
            raise ConfigError("tfopt.bench takes a dataset whose inputs are an array or a "
                              "tuple of arrays, in the model's input order; got a dict.")
    arrays, batch_sizes = _check_run_args(inputs, batch_sizes, labels, warmup, repeats,
                                          min_seconds)
    runners = _distinct_names([r for a in artifacts for r in runners_for(a)])
    sizes = {}
    for runner in runners:
        if runner.artifact is not None:
            from tfopt.export._validate import sizes as measure_size

            artifact = Path(runner.artifact)
            # An OpenVINO IR is its .xml and .bin: size the folder tfopt wrote. OpenVINO
            # reading an .onnx runs that one file.
            ir = runner.backend == "openvino_cpu" and artifact.suffix == ".xml"
            sizes[id(runner)] = measure_size(artifact.parent if ir else artifact)
    rows, failed, errors = [], [], []
    counted = None  # samples the accuracy column covers, from a dataset
    total = len(runners) * len(batch_sizes)
    bar = _progress(total, progress)
    for runner in runners:
        try:
            _first_call(runner, [_batch(a, batch_sizes[0]) for a in arrays])
            if dataset is not None:
                accuracy, counted = _streamed_accuracy(runner, dataset)
            else:
                accuracy = _accuracy(runner, arrays, labels) if labels is not None else None
            timings = []
            for batch in batch_sizes:
                feed = [_batch(a, batch) for a in arrays]
                timings.append(measure(lambda: runner.run(feed), warmup=warmup, repeats=repeats,
                                       min_seconds=min_seconds))
                bar.update(1)
        except Exception as exc:  # noqa: BLE001 - one engine failing leaves the others' rows
            failed.append(f"{runner.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            errors.append(exc)
            logger.debug("Runner %s failed", runner.name, exc_info=True)
            continue
        peak = None
        if memory:
            peak = _memory.peak_memory(runner, [_batch(a, max(batch_sizes)) for a in arrays])
        size = sizes.get(id(runner), {})
        for batch, timing in zip(batch_sizes, timings):
            rows.append(BenchRow(
                name=runner.name, backend=runner.backend, precision=runner.precision,
                batch_size=batch, p50_ms=1e3 * timing.p50, p90_ms=1e3 * timing.p90,
                p99_ms=1e3 * timing.p99, spread=timing.spread,
                throughput=timing.throughput(batch), size_bytes=size.get("raw"),
                gzip_bytes=size.get("gzip"), accuracy=accuracy,
                artifact=None if runner.artifact is None else str(runner.artifact),
                engine=runner.name.split(" / ", 1)[1] if " / " in runner.name else "",
                peak_rss_bytes=None if peak is None else peak.get("peak_rss_bytes"),
                device_bytes=None if peak is None else peak.get("device_bytes")))
    bar.close()
    if errors and len(errors) == len(runners):  # nothing ran: the inputs, not one engine
        raise errors[0]
    if failed:
        warnings.warn(f"{len(failed)} runner(s) failed and have no rows: " + "; ".join(failed),
                      stacklevel=2)
    environment = _environment()
    if counted is not None:
        environment["accuracy_samples"] = counted
    elif labels is not None:
        environment["accuracy_samples"] = int(np.asarray(labels).size)
    return BenchReport(rows, environment)


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


def _distinct_names(runners: list) -> list:
    """Runners whose names collide (two SavedModels, both ``saved_model / TensorFlow``)
    are told apart by their artifacts' paths."""
    counts: dict = {}
    for runner in runners:
        counts[runner.name] = counts.get(runner.name, 0) + 1
    for runner in runners:
        if counts[runner.name] > 1 and runner.artifact is not None:
            runner.name = f"{_short_path(runner.artifact)}: {runner.name}"
    return runners


def _short_path(path) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else str(Path(path))


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
        out = runner.first([a[start:start + batch] for a in arrays])
        predictions.append(out.reshape(len(out), -1).argmax(axis=1))
    return float(np.mean(np.concatenate(predictions) == labels))


def _streamed_accuracy(runner, dataset) -> tuple[float, int]:
    """Accuracy over every ``(inputs, labels)`` batch of ``dataset``, and the samples seen."""
    import tensorflow as tf

    correct = seen = 0
    for element in dataset:
        x, y = element[0], element[1]
        feed = [np.asarray(t) for t in tf.nest.flatten(x)]
        out = runner.first(feed)
        predicted = out.reshape(len(out), -1).argmax(axis=1)
        correct += int(np.sum(predicted == np.asarray(y).reshape(-1)))
        seen += len(predicted)
    if not seen:
        raise ConfigError("The dataset passed to tfopt.bench.run yields no samples.")
    return correct / seen, seen


def _environment() -> dict:
    import platform

    import tensorflow as tf

    env = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "cpus": _cpu_int8.cores(), "machine": platform.machine(),
           "cpu": _cpu_int8.cpu_name(), "cpu_isa": _cpu_int8.instruction_set()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    from tfopt.artifacts._openvino import cpu_features

    features = cpu_features()
    if features.get("openvino"):
        env["openvino"] = features["openvino"].split("-")[0]
        env["openvino_cpu_capabilities"] = features["capabilities"]
    return env


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run", disable=None if enabled else True,
                leave=False)

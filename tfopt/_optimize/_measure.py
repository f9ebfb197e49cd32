"""Export a candidate and time it on the target engine, as the user will serve it.

Every figure :func:`tfopt.optimize` reports comes from here: the candidate is
exported by :func:`tfopt.export` (and so validated against Keras), loaded
by tfopt's runner for the engine, scored on the validation data through that
runner, and timed at the target's batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np

from tfopt.errors import BackendUnavailableError
from tfopt._optimize._target import Target

logger = logging.getLogger(__name__)


def require_engine(target: Target) -> None:
    """Refuse, before any work, an engine that is not installed."""
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "tfopt.optimize measures candidates as ONNX files: pip install 'tfopt[onnx]'."
        ) from exc
    if target.engine == "openvino":
        from tfopt.artifacts import _openvino

        if not _openvino.available():
            raise BackendUnavailableError(
                "Target(engine='openvino') needs OpenVINO: pip install openvino.")


@dataclasses.dataclass
class Measured:
    """One exported candidate on the engine.

    ``latency_ms`` and ``reference_ms`` are medians of one interleaved timing
    of the candidate and the reference (the dense FP32 file): their ratio is
    the speed-up, whatever the machine was doing meanwhile.
    """

    directory: Path
    runner: object  # tfopt.artifacts Runner
    latency_ms: float
    reference_ms: float
    metric: float
    size_mb: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.latency_ms


def formats_for(target: Target) -> tuple:
    return ("onnx", "openvino") if target.engine == "openvino" else ("onnx",)


def engine_runner(directory: Path, target: Target):
    """The runner for ``target.engine`` of an export directory (OpenVINO in f32 precision)."""
    from tfopt.bench import runners_for

    directory = Path(directory)
    if target.engine == "openvino":
        runners = [r for r in runners_for(directory / "openvino")
                   if r.backend == "openvino_cpu" and r.details.get("inference_precision")
                   == "f32"]
    else:
        runners = [r for r in runners_for(directory / "model.onnx") if r.backend == "ort_cpu"]
    return runners[0]


def time_pair(runner, reference, batch: np.ndarray, *, seconds: float = 1.0
              ) -> tuple[float, float]:
    """Median milliseconds per call of ``runner`` and of ``reference``, timed interleaved
    (``reference`` None: ``runner`` alone, returned twice)."""
    from tfopt.bench._timing import interleaved, measure

    if reference is None:
        timing = measure(lambda: runner.run([batch]), warmup=5, repeats=30,
                         min_seconds=seconds)
        return timing.p50 * 1e3, timing.p50 * 1e3
    first = measure(lambda: reference.run([batch]), warmup=3, repeats=5)
    rounds = 10
    calls = max(1, int(seconds / 2 / rounds / max(first.p50, 1e-6)))
    samples = interleaved({"runner": lambda: runner.run([batch]),
                           "reference": lambda: reference.run([batch])},
                          rounds=rounds, calls=calls)
    return (float(np.median(samples["runner"])) * 1e3,
            float(np.median(samples["reference"])) * 1e3)


def batch_of(x: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // len(x))
    return np.concatenate([x] * reps)[:size] if reps > 1 else x[:size]


def export_and_measure(model, directory: Path, target: Target, evaluation, *,
                       calibration: np.ndarray, reference=None, seconds: float = 1.0
                       ) -> Measured:
    """Export ``model`` (float or QAT) into ``directory``; score it on the engine and time
    it there, side by side with the ``reference`` runner (the dense FP32 file)."""
    from tfopt.export import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # portability notes etc. are in the manifest
        result = export(model, directory, formats=formats_for(target),
                        validation_data=calibration, overwrite=True)
    runner = engine_runner(directory, target)
    metric = evaluation.runner(runner)
    latency, reference_ms = time_pair(runner, reference,
                                      batch_of(evaluation.x, target.batch_size), seconds=seconds)
    size = result.sizes.get("onnx", {}).get("raw", 0) / 1e6
    return Measured(Path(directory), runner, latency, reference_ms, metric, size)

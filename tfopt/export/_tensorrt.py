"""TensorRT engines built from the exported ONNX with TensorRT's Python API.

TensorRT 11 networks are strongly typed: precision comes from the ONNX graph
(an FP16 graph, or INT8 Q/DQ), and there are no precision builder flags.
TensorRT 10 is weakly typed by default and takes ``BuilderFlag.FP16``/``INT8``.
The version branch is here, on the major version ``_compat`` reports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tfopt import _compat
from tfopt.errors import ExportValidationError
from tfopt.export._signature import ModelSignature

logger = logging.getLogger(__name__)


def build_engine(onnx_path: Path, engine_path: Path, signature: ModelSignature, *,
                 precision: str, batch_sizes: tuple[int, int, int],
                 sparse_weights: bool, timing_cache: Optional[Path] = None) -> None:
    """Build and serialize an engine; reuse and update ``timing_cache``.

    ``batch_sizes`` is the optimization profile ``(min, opt, max)`` for the
    batch dimension of every input.
    """
    trt, major = _compat.import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportValidationError("TensorRT could not parse the ONNX:\n" + "\n".join(errors))

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    low, opt, high = batch_sizes
    for spec in signature.inputs:
        rest = [int(d) for d in spec.shape[1:]]
        profile.set_shape(spec.name, [low, *rest], [opt, *rest], [high, *rest])
    config.add_optimization_profile(profile)
    if major < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ: no calibrator
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportValidationError("TensorRT failed to build the engine; see its log above.")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def run_engine(engine_path: Path, signature: ModelSignature, arrays) -> dict:
    """Run an engine once on host arrays (export validation); ``{output: array}``.

    Loads it through :func:`tfopt.artifacts._tensorrt.tensorrt_runner`, the
    runner ``tfopt.bench`` times (needs PyTorch for CUDA buffers).
    """
    from tfopt.artifacts._tensorrt import tensorrt_runner

    trt, _ = _compat.import_tensorrt()
    inputs = [{"name": s.name, "dtype": s.dtype.name} for s in signature.inputs]
    return tensorrt_runner(engine_path, inputs, signature.outputs, trt=trt)(arrays)

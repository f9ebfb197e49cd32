"""TF-TRT: TensorRT inside a SavedModel, only where TensorFlow was built with it."""

from __future__ import annotations

from pathlib import Path

from tfopt import _compat
from tfopt.errors import BackendUnavailableError


def convert(saved_model_dir: Path, output_dir: Path, *, precision: str, calibration=None) -> None:
    """Convert a SavedModel with ``TrtGraphConverterV2`` (FP32/FP16/INT8)."""
    if not _compat.tensorflow_has_tensorrt():
        import tensorflow as tf

        raise BackendUnavailableError(
            f"The 'tftrt' format needs a TensorFlow built with TensorRT; this TensorFlow "
            f"{tf.__version__} is not (no pip build since 2.18 is). Use formats=('tensorrt',) "
            "to build an engine from the ONNX with TensorRT itself, or NVIDIA's TensorFlow "
            "container for TF-TRT."
        )
    from tensorflow.python.compiler.tensorrt import trt_convert as trt

    mode = {"fp32": trt.TrtPrecisionMode.FP32, "fp16": trt.TrtPrecisionMode.FP16,
            "int8": trt.TrtPrecisionMode.INT8}[precision]
    converter = trt.TrtGraphConverterV2(
        input_saved_model_dir=str(saved_model_dir), precision_mode=mode,
        use_calibration=precision == "int8")
    if precision == "int8":
        if calibration is None:
            raise BackendUnavailableError(
                "TF-TRT INT8 needs calibration inputs: pass validation_data.")
        converter.convert(calibration_input_fn=lambda: ([a[:8] for a in calibration],))
    else:
        converter.convert()
    converter.save(str(output_dir))

"""OpenVINO IR through OpenVINO's own converter; the converter's quirks live here.

The IR is converted from the ONNX, not from the SavedModel:

* a QAT model's SavedModel holds ``QuantizeAndDequantizeV3``/``V4`` (tfopt's
  fake quantization), for which OpenVINO 2026.4's TensorFlow frontend has no
  conversion rule ("No conversion rule found for operations:
  QuantizeAndDequantizeV3, QuantizeAndDequantizeV4"), while ONNX
  ``QuantizeLinear``/``DequantizeLinear`` pairs become ``FakeQuantize``,
  which the CPU plugin runs as int8 kernels;
* for float models both convert and give the same outputs (checked on the
  digits CNN to 3e-7); the ONNX is the artifact tfopt already names,
  orders and validates, and converts faster, so one path serves both.

Float models keep float32 weights, or float16-compressed ones with
``precision="fp16"`` (``ov.save_model(..., compress_to_fp16=True)``: weights
stored as fp16, decompressed at load; the CPU computes in f32 or bf16).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tfopt.artifacts._openvino import import_openvino

logger = logging.getLogger(__name__)


def convert(onnx_path: Path, folder: Path, *, compress_to_fp16: bool) -> dict:
    """Write ``folder/model.xml`` and ``model.bin`` from an ONNX file; describe them."""
    ov = import_openvino()
    model = ov.convert_model(str(onnx_path))
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=compress_to_fp16)
    ops: dict[str, int] = {}
    for op in model.get_ordered_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    info = {"openvino_version": ov.__version__, "converted_from": "onnx",
            "compressed_to_fp16": compress_to_fp16,
            "fake_quantize": ops.get("FakeQuantize", 0)}
    logger.info("OpenVINO IR: %d ops, %d FakeQuantize.", sum(ops.values()), info["fake_quantize"])
    return info

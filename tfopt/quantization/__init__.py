"""Quantization-aware training that exports TensorRT-ready int8 Q/DQ."""

from tfopt.quantization._api import is_quantized, quantize
from tfopt.quantization._config import QuantizationConfig
from tfopt.quantization._wrapper import QuantizeInputs, QuantizeTable, QuantizeWrapper

__all__ = ["QuantizationConfig", "QuantizeInputs", "QuantizeTable", "QuantizeWrapper",
           "is_quantized", "quantize"]

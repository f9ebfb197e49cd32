"""tf_keras models: tfopt.quantize handed to tensorflow-model-optimization.

tfmot's QAT models convert through tf2onnx to uint8, asymmetric,
activation-only Q/DQ (weights folded), which ONNX Runtime runs but TensorRT
rejects. This is the one module that touches tfmot's quantization API.
"""

from __future__ import annotations

from tfopt import _compat


def quantize(model):
    return _compat.import_tfmot().quantization.keras.quantize_model(model)


def is_quantized(model) -> bool:
    _compat.import_tfmot()
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

    return any(isinstance(layer, quantize_wrapper.QuantizeWrapper) for layer in model.layers)

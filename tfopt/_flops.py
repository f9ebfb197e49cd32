"""Parameters and FLOPs of a Keras 3 model, for reports and ``tfopt inspect``.

FLOPs are counted as 2 x the multiply-accumulates of convolutions
(regular, transposed, depthwise, separable) and Dense layers for one sample
(ResNet50 at 224x224: about 8.2 GFLOPs), from the shapes each layer was
built with; biases, normalization and activations are left out, as is
customary. A layer called several times is counted once per call shape it
was built with, i.e. once.
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import layers

from tfopt import _compat, _tree


@dataclasses.dataclass(frozen=True)
class Counts:
    params: int
    flops: int
    per_layer: dict  # layer path -> FLOPs

    def ratio(self, other: "Counts") -> tuple[float, float]:
        """``(params, flops)`` of ``other`` divided by this one's."""
        return other.params / max(self.params, 1), other.flops / max(self.flops, 1)


def _macs(layer, input_shape) -> int:
    if input_shape is None or not isinstance(input_shape, (tuple, list)) \
            or any(d is None for d in input_shape[1:]):
        return 0
    input_shape = tuple(input_shape)
    if isinstance(layer, layers.Dense):
        return math.prod(input_shape[1:-1]) * input_shape[-1] * layer.units
    try:
        output_shape = tuple(layer.compute_output_shape(input_shape))
    except Exception:  # noqa: BLE001 - a shape Keras cannot infer: not counted
        return 0
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        cin, in_space, cout, out_space = (input_shape[1], input_shape[2:], output_shape[1],
                                          output_shape[2:])
    else:
        cin, in_space, cout, out_space = (input_shape[-1], input_shape[1:-1], output_shape[-1],
                                          output_shape[1:-1])
    if any(d is None for d in out_space):
        return 0
    kernel = math.prod(getattr(layer, "kernel_size", (1,)))
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        m = layer.depth_multiplier
        return math.prod(out_space) * (kernel * cin * m + cin * m * cout)
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return math.prod(out_space) * kernel * cin * layer.depth_multiplier
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose,
                          layers.Conv3DTranspose)):
        return math.prod(in_space) * kernel * cin * cout
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return math.prod(out_space) * kernel * cin // getattr(layer, "groups", 1) * cout
    return 0


def count(model: keras.Model) -> Counts:
    """Parameters (every weight of the model's layers) and FLOPs per sample.

    tfopt's own training state (pruning masks and steps) is not counted:
    for a pruning-wrapped model the counts are those of the dense layers inside.
    """
    per_layer = {}
    for path, layer in _tree.walk(model):
        macs = _macs(layer, _compat.built_input_shape(layer))
        if macs:
            per_layer[path] = 2 * macs
    tfopt_state = set()
    for _, layer in _tree.walk(model):
        if type(layer).__module__.startswith("tfopt"):
            inner = getattr(layer, "layer", None)
            inner_ids = {id(v) for v in inner.weights} if inner is not None else set()
            tfopt_state |= {id(v) for v in layer.weights if id(v) not in inner_ids}
    params = sum(math.prod(v.shape) for v in model.weights if id(v) not in tfopt_state)
    return Counts(int(params), int(sum(per_layer.values())), per_layer)


def human(value: float) -> str:
    """``12.3M``, ``4.10G``: a count in three significant figures."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"

"""Which layers get Q/DQ, declared as tables: the Keras side of TensorRT's rules.

QAT trains the placement TensorRT builds INT8 from
(:mod:`tfopt.targets._tensorrt`); these tables say which Keras layers
become which ONNX ops there. ``WEIGHTED``: layers whose input and weights
are fake-quantized (they convert to the rules' ``WEIGHTED_OPS``), with each
weight's output-channel axis (the axis of its per-channel scales; ``None``
for one scale per tensor). ``INPUT_ONLY``: layers with several inputs that
each get Q/DQ (a residual ``Add``, the rules' ``EVERY_INPUT_OPS``; ``Dot``,
a product of two activations), so TensorRT can fuse them.
``FLOAT_BY_DESIGN``: layers with weights that stay in float on purpose.
``TABLES``: lookup tables (embeddings), stored as int8 with one scale per row
when ``QuantizationConfig.quantize_embeddings`` is on; no integer kernel reads
them, the engine dequantizes the rows it looks up.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from keras import layers

from tfopt._tree import lookup

from tfopt.quantization._config import QuantizationConfig

Axis = Optional[int]


def _einsum_output_axis(layer: layers.EinsumDense) -> Axis:
    """The kernel's single output axis, or None (per tensor) if it has several."""
    lhs, output = layer.equation.replace("...", "").split("->")
    input_spec, kernel_spec = lhs.split(",")
    outputs = [c for c in kernel_spec if c in output and c not in input_spec]
    return kernel_spec.index(outputs[0]) if len(outputs) == 1 else None


def _depthwise_axis(layer) -> Axis:
    # Kernel (..., in, multiplier): output channel c*multiplier+k. With a
    # multiplier of 1 the input-channel axis is the output-channel axis.
    return -2 if layer.depth_multiplier == 1 else None


WEIGHTED: dict[type, dict[str, Union[Axis, Callable]]] = {
    layers.Dense: {"kernel": -1},
    layers.EinsumDense: {"kernel": _einsum_output_axis},
    layers.Conv1D: {"kernel": -1},
    layers.Conv2D: {"kernel": -1},
    layers.Conv3D: {"kernel": -1},
    layers.Conv1DTranspose: {"kernel": -2},
    layers.Conv2DTranspose: {"kernel": -2},
    layers.Conv3DTranspose: {"kernel": -2},
    layers.DepthwiseConv1D: {"kernel": _depthwise_axis},
    layers.DepthwiseConv2D: {"kernel": _depthwise_axis},
    layers.SeparableConv1D: {"depthwise_kernel": _depthwise_axis, "pointwise_kernel": -1},
    layers.SeparableConv2D: {"depthwise_kernel": _depthwise_axis, "pointwise_kernel": -1},
}

# Their wrapper also fake-quantizes the tensor between the depthwise and the
# pointwise convolution (QuantizeWrapper._separable), so both run as int8 kernels.
SEPARABLE: tuple[type, ...] = (layers.SeparableConv1D, layers.SeparableConv2D)

INPUT_ONLY: tuple[type, ...] = (layers.Add, layers.Dot)

# BatchNormalization after a convolution is left in float: with per-channel
# weight scales, folding it into the convolution (which TensorRT does when it
# builds the engine) is exact, so folding it during QAT would buy nothing and
# cost a second convolution per step.
FLOAT_BY_DESIGN: tuple[type, ...] = (layers.BatchNormalization,)

# Lookup tables: {class: {table attribute: row axis}}. keras-hub's PositionEmbedding
# (not a keras Embedding) is matched by its name and its table attribute.
TABLES: dict[type, dict[str, int]] = {layers.Embedding: {"embeddings": 0}}
TABLE_NAMES: dict[str, dict[str, int]] = {"PositionEmbedding": {"position_embeddings": 0}}

# Left in float on purpose and listed in quantize()'s summary: normalizations
# that reduce over the features at run time (no weight to fold), and lookup
# tables when embeddings are not quantized (no matrix product to run in int8).
# Classes of other packages (keras-hub's RMSNormalization, LlamaLayerNorm, ...)
# are matched by their names' endings.
FLOAT_LISTED: tuple[type, ...] = (
    layers.LayerNormalization, layers.GroupNormalization, layers.Embedding,
    *((layers.RMSNormalization,) if hasattr(layers, "RMSNormalization") else ()),
)
FLOAT_LISTED_NAMES: tuple[str, ...] = ("Normalization", "LayerNorm", "RMSNorm", "Embedding")

# Layers whose call() computes products of two activations (attention scores
# query x key, the context scores x value): those stay in float.
ATTENTION_NAMES: tuple[str, ...] = ("Attention",)


def weight_axes(layer) -> Optional[dict[str, Axis]]:
    """``{weight attribute: channel axis}`` for a weighted quantizable layer, else None."""
    entry = lookup(WEIGHTED, layer)
    if entry is None:
        return None
    return {name: (axis(layer) if callable(axis) else axis) for name, axis in entry.items()}


def table_axes(layer) -> Optional[dict[str, int]]:
    """``{table attribute: row axis}`` for a lookup-table layer, else None."""
    entry = lookup(TABLES, layer)
    if entry is None:
        entry = next((axes for name, axes in TABLE_NAMES.items()
                      if type(layer).__name__.endswith(name)
                      and all(hasattr(layer, a) for a in axes)), None)
    return dict(entry) if entry is not None else None


def kind(layer, config: QuantizationConfig) -> str:
    """``"weighted"``, ``"table"`` (an int8 lookup table), ``"inputs"``, ``"float"``
    (by design or weightless), ``"listed"`` (float by design, and named in the
    summary) or ``"unsupported"``."""
    if lookup(WEIGHTED, layer) is not None:
        return "weighted"
    if config.quantize_embeddings and layer.weights and table_axes(layer) is not None:
        return "table"
    if isinstance(layer, INPUT_ONLY):
        return "inputs" if (config.quantize_residual_adds or isinstance(layer, layers.Dot)) else "float"
    if isinstance(layer, FLOAT_BY_DESIGN) or not layer.weights:
        return "float"
    if isinstance(layer, FLOAT_LISTED) or type(layer).__name__.endswith(FLOAT_LISTED_NAMES):
        return "listed"
    return "unsupported"


def is_attention(layer) -> bool:
    """True for an attention layer (its score and context products stay in float)."""
    return isinstance(layer, layers.MultiHeadAttention) or any(
        n in type(layer).__name__ for n in ATTENTION_NAMES)

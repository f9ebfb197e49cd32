"""Which weights of which layers can be pruned, declared as a table.

Read by pruning, and by QAT to report the sparsity a pruned model keeps; it
sits below both so that neither imports the other.

Each entry maps a Keras 3 layer class to its prunable weights and, for each,
the axis along which TensorRT's sparse tensor cores read consecutive
elements (the input channels, i.e. the reduction axis of the matrix product).
``None`` means the weight has no such axis, so N:M sparsity does not apply.

A custom layer opts in by defining ``get_prunable_weights()``, returning the
variables to prune, as with tfmot's ``PrunableLayer``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import keras
from keras import layers

from tfopt._tree import lookup

Axis = Optional[int]


def _einsum_reduction_axis(layer: layers.EinsumDense) -> Axis:
    """The kernel axis contracted with the input (the innermost, if several)."""
    lhs, output = layer.equation.replace("...", "").split("->")
    input_spec, kernel_spec = lhs.split(",")
    contracted = [c for c in kernel_spec if c in input_spec and c not in output]
    return kernel_spec.index(contracted[-1]) if contracted else None


_TABLE: dict[type, dict[str, Union[Axis, Callable[[layers.Layer], Axis]]]] = {
    layers.Dense: {"kernel": 0},
    layers.EinsumDense: {"kernel": _einsum_reduction_axis},
    layers.Conv1D: {"kernel": -2},
    layers.Conv2D: {"kernel": -2},
    layers.Conv3D: {"kernel": -2},
    # Transposed convolutions store kernels as (..., out_channels, in_channels).
    layers.Conv1DTranspose: {"kernel": -1},
    layers.Conv2DTranspose: {"kernel": -1},
    layers.Conv3DTranspose: {"kernel": -1},
    # Each depthwise output sees one input channel: no reduction over channels.
    layers.DepthwiseConv1D: {"kernel": None},
    layers.DepthwiseConv2D: {"kernel": None},
    layers.SeparableConv1D: {"pointwise_kernel": -2},
    layers.SeparableConv2D: {"pointwise_kernel": -2},
    # A lookup table, not a matrix product.
    layers.Embedding: {"embeddings": None},
}


@dataclasses.dataclass(frozen=True)
class PrunableWeight:
    """One weight to prune and its N:M grouping axis (``None``: not applicable)."""

    variable: keras.Variable
    group_axis: Axis


def is_prunable(layer: layers.Layer) -> bool:
    """True if tfopt knows how to prune ``layer``."""
    return hasattr(layer, "get_prunable_weights") or _table_entry(layer) is not None


def prunable_weights(layer: layers.Layer) -> list[PrunableWeight]:
    """The weights of a built layer that pruning masks, in a stable order."""
    if hasattr(layer, "get_prunable_weights"):
        return [
            PrunableWeight(v, -2 if len(v.shape) >= 2 else None)
            for v in layer.get_prunable_weights()
        ]
    entry = _table_entry(layer) or {}
    found = []
    for attr, axis in entry.items():
        if callable(axis):
            axis = axis(layer)
        found.append(PrunableWeight(getattr(layer, attr), axis))
    return found


def _table_entry(layer: layers.Layer):
    return lookup(_TABLE, layer)

"""Fake quantization ops that train and export as ONNX int8 Q/DQ.

These TensorFlow ops were chosen because tf2onnx turns them into
``QuantizeLinear``/``DequantizeLinear`` pairs with int8 zero points of 0:

* weights, per channel: ``QuantizeAndDequantizeV3`` (on CPU, the per-channel
  forms of V2/V4 fail with "input_min must be a scalar"; V3 works and its
  gradient is straight-through);
* activations, per tensor: ``QuantizeAndDequantizeV4``, whose gradient is
  straight-through inside the range and zero outside it.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

# An activation range of zero (a tensor that was zero on all calibration data) still
# needs a non-zero scale.
_MIN_RANGE = 1e-8


def weight_amax(weight: tf.Tensor, channel_axis: Optional[int]) -> tf.Tensor:
    """The range :func:`fake_quant_weight` quantizes ``weight`` to: its absolute maximum per
    channel along ``channel_axis`` (a scalar for ``None``).

    A channel whose weights are all zero (pruned away) gets the largest range
    of the layer's other channels, or 1 if it has none: its int8 values are
    zero whatever the scale, but an engine that adds the bias in int32 at the
    scale ``input_scale * weight_scale`` (ONNX Runtime's ``QLinearConv``)
    would overflow on a tiny one and lose the channel's bias.
    """
    if channel_axis is None:
        amax = tf.reduce_max(tf.abs(weight))
    else:
        axis = channel_axis % weight.shape.rank
        amax = tf.reduce_max(tf.abs(weight), axis=[d for d in range(weight.shape.rank)
                                                   if d != axis])
    largest = tf.reduce_max(amax)
    fallback = tf.where(largest > 0, largest, tf.ones_like(largest))
    return tf.where(amax > 0, amax, fallback)


def fake_quant_weight(weight: tf.Tensor, channel_axis: Optional[int], bits: int,
                      narrow_range: bool, amax: Optional[tf.Tensor] = None,
                      max_level: Optional[int] = None) -> tf.Tensor:
    """Symmetric fake quantization of a weight, per channel along ``channel_axis``.

    ``channel_axis=None`` quantizes per tensor. Zero stays exactly zero.
    ``amax`` is :func:`weight_amax` of ``weight``, computed here if not given.
    ``max_level``: the largest integer a weight may take, below the type's own
    (64 for weights that are portable across CPU kinds, see
    :mod:`tfopt.targets._cpu_int8`). The op still quantizes to ``bits`` in the
    narrow range; the range handed to it is widened so that ``amax`` lands on
    ``max_level``: the step is ``amax / max_level``, and tf2onnx writes the
    same int8 Q/DQ, with values within ``[-max_level, max_level]``.
    """
    if amax is None:
        amax = weight_amax(weight, channel_axis)
    axis = -1 if channel_axis is None else channel_axis % weight.shape.rank
    type_level = 2 ** (bits - 1) - 1
    if max_level is not None and max_level < type_level:
        amax = amax * (type_level / max_level)
        narrow_range = True  # a symmetric grid: [-type_level, type_level] * amax / type_level
    return tf.raw_ops.QuantizeAndDequantizeV3(
        input=weight, input_min=-amax, input_max=amax, num_bits=bits,
        signed_input=True, range_given=True, narrow_range=narrow_range, axis=axis,
    )


def fake_quant_activation(x: tf.Tensor, amax: tf.Tensor, bits: int) -> tf.Tensor:
    """Symmetric per-tensor fake quantization of an activation to ``[-amax, amax]``."""
    amax = tf.maximum(tf.cast(amax, x.dtype), tf.cast(_MIN_RANGE, x.dtype))
    return tf.raw_ops.QuantizeAndDequantizeV4(
        input=x, input_min=-amax, input_max=amax, signed_input=True, num_bits=bits,
        range_given=True, narrow_range=False, axis=-1,
    )

"""Mask computation, in TensorFlow ops that run inside the compiled train step."""

from __future__ import annotations

import tensorflow as tf


def magnitude_mask(weight: tf.Tensor, sparsity: tf.Tensor) -> tf.Tensor:
    """Mask that zeroes exactly ``round(sparsity * size)`` smallest-magnitude weights.

    Ties are broken by position (a stable sort), so the number of zeros is
    exact and the result is deterministic, also across replicas.
    """
    flat = tf.reshape(tf.abs(weight), [-1])
    size = tf.size(flat)
    num_pruned = tf.cast(tf.round(sparsity * tf.cast(size, tf.float32)), tf.int32)
    order = tf.argsort(flat, stable=True)
    ranks = tf.scatter_nd(order[:, None], tf.range(size), [size])
    return tf.reshape(tf.cast(ranks >= num_pruned, weight.dtype), tf.shape(weight))


def n_m_mask(weight: tf.Tensor, n: int, m: int, axis: int) -> tf.Tensor:
    """Mask with ``n`` zeros in every ``m`` consecutive weights along ``axis``.

    The ``m - n`` largest magnitudes of each group are kept. ``weight.shape[axis]``
    must be divisible by ``m`` (checked when the model is pruned).
    """
    rank = weight.shape.rank
    axis = axis % rank
    perm = [d for d in range(rank) if d != axis] + [axis]
    moved = tf.transpose(tf.abs(weight), perm)
    groups = tf.reshape(moved, [-1, m])
    _, keep = tf.math.top_k(groups, k=m - n, sorted=False)
    group_mask = tf.reduce_sum(tf.one_hot(keep, m, dtype=weight.dtype), axis=-2)
    mask = tf.reshape(group_mask, tf.shape(moved))
    inverse = [perm.index(d) for d in range(rank)]
    return tf.transpose(mask, inverse)

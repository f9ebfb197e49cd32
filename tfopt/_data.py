"""Data as users hold it: a ``tf.data.Dataset`` wherever tfopt takes inputs.

Validation and calibration need a bounded number of real inputs in memory;
a dataset is read batch by batch until that many samples are in hand, so a
folder of images never has to be loaded whole.
"""

from __future__ import annotations

import logging

import numpy as np

from tfopt.errors import ConfigError

logger = logging.getLogger(__name__)


def is_dataset(data) -> bool:
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def is_labelled(dataset) -> bool:
    """Whether a dataset's elements are ``(inputs, labels[, sample weights])``."""
    spec = dataset.element_spec
    return isinstance(spec, tuple) and 2 <= len(spec) <= 3


def is_infinite(dataset) -> bool:
    import tensorflow as tf

    return int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY)


def inputs_from_dataset(dataset, max_samples: int, what: str, sample_rank=None,
                        with_labels: bool = False):
    """Up to ``max_samples`` inputs of ``dataset``, as arrays shaped like its elements.

    Elements may be inputs or ``(inputs, labels[, weights])``, batched or
    not (one sample per element is batched here); inputs may be an array, a
    tuple/list or a dict of arrays. Reading stops once ``max_samples`` are
    in hand. ``sample_rank``: the rank of one sample of the (first) input,
    when the model says it; elements one rank higher are batches. Without
    it, elements with a free leading dimension are taken as batches.

    With ``with_labels``, returns ``(inputs, labels)``: the labels of those
    samples, or None for a dataset of inputs alone.

    Raises:
        ConfigError: the dataset yields nothing, or elements tfopt cannot read.
    """
    spec = dataset.element_spec
    labelled = is_labelled(dataset)
    x_spec = spec[0] if labelled else spec
    import tensorflow as tf

    leaves = tf.nest.flatten(x_spec)
    if not leaves or not all(isinstance(s, tf.TensorSpec) for s in leaves):
        raise ConfigError(f"{what} is a tf.data.Dataset whose elements tfopt cannot read "
                          f"({spec}); pass one of (inputs, labels) or of inputs, as fit() takes.")
    first = leaves[0].shape
    if sample_rank is not None and first.rank is not None:
        batched = first.rank == sample_rank + 1
    else:
        batched = first.rank is not None and first.rank >= 1 and first[0] is None
    if not batched:  # one sample per element
        dataset = dataset.batch(64)
    chunks, labels, count = [], [], 0
    for element in dataset:
        x = element[0] if labelled else element
        if labelled:
            labels.append(np.asarray(element[1]))
        chunks.append(tf.nest.map_structure(lambda t: np.asarray(t), x))
        count += len(tf.nest.flatten(chunks[-1])[0])
        if count >= max_samples:
            break
    if not count:
        raise ConfigError(f"{what} is an empty tf.data.Dataset: pass at least one batch.")
    joined = tf.nest.map_structure(lambda *parts: np.concatenate(parts)[:max_samples], *chunks)
    logger.info("%s: %d sample(s) read from the dataset.", what, min(count, max_samples))
    if with_labels:
        return joined, np.concatenate(labels)[:max_samples] if labels else None
    return joined

"""`strip`: a plain Keras model out of a tfopt-optimized one."""

from __future__ import annotations

from tfopt import _compat
from tfopt.pruning import strip_pruning


def strip(model):
    """Return a plain Keras model: no tfopt layers or wrappers left, masks baked in.

    Pruning wrappers are removed and each pruned weight is replaced by
    ``weight * mask``, so the zeros are in the weights themselves. A model
    pruned with ``structure="channels"`` comes back physically smaller: a new
    model of the same architecture with fewer filters/units, the following
    layers' input weights, depthwise kernels and BatchNormalization weights
    and statistics sliced to match, computing what the masked model computed.
    The result is what you export, quantize or save for serving. A model with nothing to strip is
    returned as it is. ``tf_keras`` models go through tfmot's ``strip_pruning``.

    Args:
        model: A Keras 3 or tf_keras model, as returned by :func:`tfopt.prune`.

    Returns:
        The plain model. For Sequential and functional models this is a new
        model sharing layers with ``model``; a subclassed model is changed in
        place.

    Example:
        >>> plain = tfopt.strip(pruned)
        >>> plain.save("digits.keras")   # loads without tfopt installed
        >>> small = tfopt.strip(channel_pruned)   # fewer filters: faster on every engine
        >>> small.count_params() < channel_pruned.count_params()
        True
    """
    _compat.check_keras_model(model)
    return strip_pruning(model)

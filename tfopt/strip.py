"""`strip`: a plain Keras model out of a tfopt-optimized one."""

from __future__ import annotations

from tfopt import _compat
from tfopt.pruning import strip_pruning


def strip(model):
    """Return a plain Keras model: no tfopt layers or wrappers left, masks baked in.

    Pruning wrappers are removed and each pruned weight is replaced by
    ``weight * mask``, so the zeros are in the weights themselves. The result
    is what you export or save for serving. A model with nothing to strip is
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
    """
    _compat.check_keras_model(model)
    return strip_pruning(model)

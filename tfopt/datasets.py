"""Small real data sets that ship with a package, for demos, tests and recipes."""

from __future__ import annotations

import numpy as np


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's handwritten digits as 8x8x1 float32 images in [0, 1].

    1,797 images of 10 classes, shipped inside scikit-learn (nothing is
    downloaded). The split is stratified and fixed by ``seed``.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``, labels as int32.

    Example:
        >>> (x_train, y_train), (x_test, y_test) = tfopt.datasets.load_digits()
        >>> x_train.shape
        (1347, 8, 8, 1)
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "The digits data set ships with scikit-learn: pip install scikit-learn"
        ) from exc
    data = _load()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)

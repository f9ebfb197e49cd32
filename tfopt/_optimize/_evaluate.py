"""The data, the metric and the small model operations :func:`tfopt.optimize` repeats.

Validation data is read once into memory (every candidate is scored on the
same samples, by Keras or by the engine that serves it); training data stays
what the user gave, turned into a batched ``tf.data.Dataset``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import keras
import numpy as np

from tfopt import _data, _tree
from tfopt.errors import ConfigError

Metric = Union[str, Callable[[np.ndarray, np.ndarray], float]]

# Validation data is held in memory: at most this many samples, and this many bytes.
VALIDATION_SAMPLES = 10_000
VALIDATION_BYTES = 1 << 30


def last_activation(model) -> Optional[str]:
    layer = model.layers[-1]
    layer = getattr(layer, "layer", layer)  # a tfopt wrapper: the layer inside
    activation = getattr(layer, "activation", None)
    if activation is None and isinstance(layer, keras.layers.Activation):
        activation = layer.activation
    return getattr(activation, "__name__", None)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, *, probabilities: bool = True) -> float:
    """Top-1 accuracy for sparse or one-hot labels; a threshold for one output."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_pred.ndim >= 2 and y_pred.shape[-1] > 1:
        predicted = y_pred.argmax(-1)
        if y_true.ndim == y_pred.ndim and y_true.shape[-1] == y_pred.shape[-1]:
            y_true = y_true.argmax(-1)
    else:
        predicted = (y_pred.reshape(len(y_pred)) > (0.5 if probabilities else 0.0)).astype(int)
    return float(np.mean(predicted == y_true.reshape(predicted.shape)))


@dataclasses.dataclass
class Evaluation:
    """Validation samples in memory and the metric that scores predictions on them."""

    x: np.ndarray
    y: np.ndarray
    metric: Callable[[np.ndarray, np.ndarray], float]
    name: str

    def keras(self, model, batch_size: int = 256) -> float:
        return self.score(predict(model, self.x, batch_size))

    def runner(self, runner, batch_size: int = 64) -> float:
        outputs = [runner.first([self.x[i:i + batch_size]])
                   for i in range(0, len(self.x), batch_size)]
        return self.score(np.concatenate(outputs))

    def score(self, y_pred: np.ndarray) -> float:
        try:
            value = self.metric(self.y, y_pred)
        except Exception as exc:  # noqa: BLE001 - the user's callable: say whose it is
            raise ConfigError(f"metric {self.name!r} raised {type(exc).__name__}: {exc}. It is "
                              "called as metric(y_true, y_pred) with numpy arrays.") from exc
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"metric {self.name!r} returned {value!r}; it must return one "
                              "number, higher is better.") from None
        if not math.isfinite(value):
            raise ConfigError(f"metric {self.name!r} returned {value} on the validation data; "
                              "it must return a finite number, higher is better.")
        return value


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model(x)`` in batches, without ``predict()``'s per-model retracing."""
    outputs = [keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=False))
               for i in range(0, len(x), batch_size)]
    return np.concatenate(outputs)


def evaluation(model, validation_data, metric: Metric) -> Evaluation:
    """Read the validation data; resolve the metric; refuse what cannot be scored."""
    if _data.is_dataset(validation_data):
        _check_dataset(validation_data, "validation_data", "pass one pass of it (no .repeat()).")
        sample = math.prod(d or 1 for d in model.inputs[0].shape[1:]) * 4
        limit = max(1, min(VALIDATION_SAMPLES, VALIDATION_BYTES // sample))
        x, y = _data.inputs_from_dataset(validation_data, limit, "validation_data",
                                         sample_rank=len(model.inputs[0].shape) - 1,
                                         with_labels=True)
        x, y = x[:limit], y[:limit]
    else:
        x, y = _pair(validation_data, "validation_data")
    x = np.asarray(x)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ConfigError(f"validation_data holds {int(np.sum(~np.isfinite(x)))} NaN/infinite "
                          "input value(s): pass finite inputs.")
    x = x.astype(np.float32) if x.dtype.kind in "fiu" else x
    if metric == "accuracy":
        probabilities = last_activation(model) in ("softmax", "sigmoid")
        score = lambda t, p: accuracy(t, p, probabilities=probabilities)  # noqa: E731
        name = "accuracy"
    elif callable(metric):
        score, name = metric, getattr(metric, "__name__", "metric")
    else:
        raise ConfigError(f"metric must be 'accuracy' or a callable(y_true, y_pred) -> float "
                          f"(higher is better), got {metric!r}.")
    return Evaluation(x, np.asarray(y), score, name)


def _check_dataset(dataset, what: str, one_pass: str) -> None:
    """A dataset of ``(inputs, labels)`` that ends, or one ConfigError naming ``what``."""
    if not _data.is_labelled(dataset):
        raise ConfigError(f"{what} must yield (inputs, labels), as fit() takes; this dataset "
                          "yields inputs alone.")
    if _data.is_infinite(dataset):
        raise ConfigError(f"{what} repeats forever; {one_pass}")


def _pair(data, what: str):
    try:
        x, y = data
        x, y = np.asarray(x), np.asarray(y)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be (inputs, labels) arrays or a tf.data.Dataset of "
                          f"(inputs, labels) batches, got {type(data).__name__}.") from None
    if x.ndim == 0 or not len(x):
        raise ConfigError(f"{what} is empty: pass at least one sample.")
    if len(x) != len(y):
        raise ConfigError(f"{what} has {len(x)} inputs and {len(y)} labels; give one label "
                          "per input.")
    return x, y


def training_dataset(model, train_data, batch_size: int, seed: int = 0):
    """``train_data`` as a batched ``tf.data.Dataset`` of ``(inputs, labels)``."""
    import tensorflow as tf

    if _data.is_dataset(train_data):
        _check_dataset(train_data, "train_data",
                       "pass one epoch of it (no .repeat()): tfopt.optimize counts epochs.")
        rank = len(model.inputs[0].shape)
        first = tf.nest.flatten(train_data.element_spec[0])[0]
        if first.shape.rank == rank - 1:  # one sample per element
            train_data = train_data.batch(batch_size)
        return train_data
    x, y = _pair(train_data, "train_data")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ConfigError(f"train_data holds {int(np.sum(~np.isfinite(x)))} NaN/infinite "
                          "input value(s): pass finite inputs.")
    return (tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size))


def input_batches(dataset, count: int) -> list:
    """The inputs of the first ``count`` batches of a dataset of ``(inputs, labels)``."""
    batches = [keras.ops.convert_to_numpy(x) for x, *_ in dataset.take(count)]
    if not batches:
        raise ConfigError("train_data is empty: pass at least one batch of (inputs, labels).")
    return batches


def copy(model):
    """A model of its own (no layer shared with ``model``) with the same weights."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def recalibrate_batch_norm(model, batches) -> int:
    """Re-estimate every BatchNormalization's moving statistics on ``batches``.

    After channels are removed, the statistics the model was trained with no
    longer describe the activations it computes; a forward pass in training
    mode per batch, with the momentum set so the moving values end as the
    plain average over the batches, gives the ones it has now. ``model`` must
    not share layers with anything that should keep its statistics.
    Returns the number of batches used (0: no BatchNormalization, or no data).
    """
    norms = [layer for _, layer in _tree.walk(model)
             if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms or not batches:
        return 0
    momenta = [norm.momentum for norm in norms]
    try:
        for i, batch in enumerate(batches):
            for norm in norms:
                norm.momentum = i / (i + 1)  # batch i weighs 1/(i+1): a running mean
            model(batch, training=True)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return len(batches)

"""Keras callbacks that drive tfopt's optimizations inside ``fit()``.

Each callback works with Keras 3 models and, through tfmot, with tf_keras
models: the same object can be passed to either ``fit()``.
"""

from __future__ import annotations

import logging
import os
import warnings

import keras
import numpy as np

from tfopt import _compat
from tfopt.errors import ConfigError, NothingToPruneError

logger = logging.getLogger(__name__)


class _Callback(keras.callbacks.Callback):
    """A Keras 3 callback that tf_keras' ``fit()`` also accepts.

    tf_keras asks every callback which batch hooks it implements; Keras 3's
    base class does not answer, so these answers are given here.
    """

    _supports_tf_logs = False

    def _implements_train_batch_hooks(self):
        return False

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False


class PruningStep(_Callback):
    """Advances pruning during ``fit()``; required when training a pruned model.

    The pruning step itself is counted, and masks recomputed, inside the
    compiled train step; this callback switches that on for the duration of
    ``fit()`` and checks that the model is pruned. Fitting a pruned model
    without it raises :class:`tfopt.errors.PruningStepMissingError` (or, when
    the train step was traced by an earlier ``fit()``, TensorFlow's
    ``InvalidArgumentError`` with the same message, from the first step).

    For a tf_keras model it does what tfmot's ``UpdatePruningStep`` does.

    Example:
        >>> pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
        >>> pruned.compile("adam", "sparse_categorical_crossentropy")
        >>> pruned.fit(x, y, callbacks=[tfopt.callbacks.PruningStep()])

    In a custom training loop, call ``set_model(model)`` and
    ``on_train_begin()`` once before the loop.
    """

    def __init__(self):
        super().__init__()
        self._tfmot_callback = None

    def set_model(self, model):
        super().set_model(model)
        if _compat.check_keras_model(model) == "tf_keras":
            from tfopt.pruning import _tfmot

            self._tfmot_callback = _tfmot.update_step_callback()
            self._tfmot_callback.set_model(model)

    def _implements_train_batch_hooks(self):
        return self._tfmot_callback is not None

    def on_train_begin(self, logs=None):
        if self._tfmot_callback is not None:
            self._tfmot_callback.on_train_begin(logs)
            return
        from tfopt.pruning._api import wrappers

        found = wrappers(self.model)
        if not found:
            raise NothingToPruneError(
                f"PruningStep was given model {self.model.name!r}, which has no pruned "
                "layers. Fit the model returned by tfopt.prune(...), or drop the callback."
            )
        if not _compat.call_takes_training(self.model):
            raise ConfigError(
                f"Model {self.model.name!r} is pruned, but its call() takes no `training` "
                "argument, so Keras runs its layers in inference mode during fit() and "
                "no pruning would happen. Add it and pass it on: "
                "def call(self, inputs, training=None)."
            )
        for wrapper in found:
            wrapper.set_driven(True)
        self._check_schedules(found)
        if any(wrapper.needs_retrace for wrapper in found):
            # An earlier fit() failed while tracing: drop its half-traced step.
            _compat.retrace_train_function(self.model)
            for wrapper in found:
                wrapper.needs_retrace = False

    def _check_schedules(self, found) -> None:
        """One warning per schedule this fit() would run badly (too few updates, or
        ending after the last step), with the numbers."""
        from tfopt.pruning._schedules import fit_plan_problem

        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        if not steps or not epochs:  # a dataset of unknown length: nothing to check
            return
        problems = {}
        for wrapper in found:
            schedule, counter = getattr(wrapper, "schedule", None), \
                getattr(wrapper, "pruning_step", None)
            if schedule is None or counter is None:
                continue
            first = int(np.asarray(counter.value))
            problem = fit_plan_problem(schedule, first, int(steps) * int(epochs))
            if problem:
                problems.setdefault(problem, []).append(wrapper.name)
        for problem, names in problems.items():
            warnings.warn(f"{problem} (layers: {', '.join(names[:5])}"
                          f"{' ...' if len(names) > 5 else ''})", stacklevel=3)

    def on_train_batch_begin(self, batch, logs=None):
        if self._tfmot_callback is not None:
            self._tfmot_callback.on_train_batch_begin(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._tfmot_callback is not None:
            self._tfmot_callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._tfmot_callback is not None:
            return
        from tfopt.pruning._api import wrappers

        for wrapper in wrappers(self.model):
            wrapper.set_driven(False)


class SparsityLogger(_Callback):
    """Writes per-weight sparsity to TensorBoard at the end of every epoch.

    Scalars are named ``sparsity/<weight path>`` and written to ``log_dir``,
    which can be shared with ``keras.callbacks.TensorBoard``.

    Args:
        log_dir: Directory for the event files.

    Example:
        >>> pruned.fit(x, y, callbacks=[tfopt.callbacks.PruningStep(),
        ...                             tfopt.callbacks.SparsityLogger("logs/")])
    """

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        from tfopt.pruning import sparsity

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        values = sparsity(self.model)
        with self._writer.as_default(step=epoch):
            for path, value in values.items():
                tf.summary.scalar(f"sparsity/{path}", value)
        self._writer.flush()
        logger.debug("Epoch %d sparsity: %s", epoch, values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

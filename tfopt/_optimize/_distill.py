"""`Distiller`: train a student on its task and on a teacher's softened outputs."""

from __future__ import annotations

import keras
from keras import ops

from tfopt import _checks
from tfopt.errors import ConfigError

OUTPUTS = ("auto", "logits", "probabilities")


class _Held:
    """Keeps the teacher out of the Distiller's tracked variables: it is read, never trained
    or saved with the student (Keras tracks layers set as attributes, not this box)."""

    def __init__(self, model):
        self.model = model


class Distiller(keras.Model):
    """A Keras model that trains ``student`` with knowledge distillation from ``teacher``.

    The loss is ``alpha * task + (1 - alpha) * T**2 * KL(teacher_T || student_T)``:
    the compiled loss on the labels, plus the Kullback-Leibler divergence
    between the teacher's and the student's outputs softened by the
    temperature ``T`` (Hinton et al., 2015; the ``T**2`` keeps its gradients
    on the task loss's scale). The teacher runs in inference mode and is
    never trained. ``call()`` is the student's, so metrics compiled on the
    Distiller score the student, and callbacks such as
    :class:`tfopt.callbacks.PruningStep` find the student's pruning wrappers.

    Args:
        student: The model trained (a pruned or QAT model, for example).
        teacher: A model with the same inputs and outputs; typically the
            dense model before pruning.
        alpha: Weight of the task loss, in [0, 1] (0: the teacher alone).
        temperature: Softening temperature ``T`` (> 0).
        outputs: What the two models output: ``"logits"``, ``"probabilities"``
            (a softmax or sigmoid output; its logarithm stands in for logits),
            or ``"auto"``: read from the student's last activation.

    Example:
        >>> pruned = tfopt.prune(tfopt_copy, tfopt.ConstantSparsity(0.5), structure="channels")
        >>> distiller = tfopt.Distiller(pruned, teacher=dense, alpha=0.5, temperature=4.0)
        >>> distiller.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> distiller.fit(x, y, epochs=3, callbacks=[tfopt.callbacks.PruningStep()])
        >>> small = tfopt.strip(pruned)
    """

    def __init__(self, student, teacher, *, alpha: float = 0.5, temperature: float = 4.0,
                 outputs: str = "auto", **kwargs):
        super().__init__(**kwargs)
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise ConfigError(f"{name} must be a Keras 3 model, got "
                                  f"{type(model).__name__}.")
        self.alpha = _checks.number("alpha", alpha, low=0.0, high=1.0)
        self.temperature = _checks.number("temperature", temperature, low=0.0, low_open=True)
        if outputs not in OUTPUTS:
            raise ConfigError(f"outputs must be one of {list(OUTPUTS)}, got {outputs!r}.")
        if outputs == "auto":
            from tfopt._optimize._evaluate import last_activation

            activation = last_activation(student)
            outputs = "probabilities" if activation in ("softmax", "sigmoid") else "logits"
        self.outputs_are = outputs
        self.student = student
        self._teacher = _Held(teacher)

    @property
    def teacher(self):
        return self._teacher.model

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _logits(self, values):
        values = ops.cast(values, "float32")
        if self.outputs_are == "probabilities":
            values = ops.log(ops.clip(values, 1e-7, 1.0))
            if values.shape[-1] == 1:  # sigmoid: the two classes' log-probabilities
                return ops.concatenate(
                    [ops.log(ops.clip(1.0 - ops.exp(values), 1e-7, 1.0)), values], axis=-1)
            return values
        if values.shape[-1] == 1:
            return ops.concatenate([ops.zeros_like(values), values], axis=-1)
        return values

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        task = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                    training=training)
        if self.alpha == 1.0:
            return task
        t = self.temperature
        teacher = ops.stop_gradient(self.teacher(x, training=False))
        soft_teacher = ops.softmax(self._logits(teacher) / t, axis=-1)
        log_student = ops.log_softmax(self._logits(y_pred) / t, axis=-1)
        log_teacher = ops.log(ops.clip(soft_teacher, 1e-12, 1.0))
        kl = ops.mean(ops.sum(soft_teacher * (log_teacher - log_student), axis=-1))
        return self.alpha * task + (1.0 - self.alpha) * (t ** 2) * kl

    def get_config(self):
        raise NotImplementedError(
            "A Distiller is a training harness and is not saved: save its student "
            "(distiller.student, or tfopt.strip(distiller.student) after pruning).")

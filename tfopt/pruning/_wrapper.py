"""The Keras 3 layer wrapper that applies magnitude pruning masks."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfopt._substitute import call_with_weights
from tfopt._tree import PRUNING
from tfopt.errors import PruningStepMissingError
from tfopt.pruning import _masks
from tfopt._prunable import prunable_weights
from tfopt.pruning._schedules import PruningSchedule

# Every replica computes the same mask from the same (mirrored) weights, so the
# first replica's value is the one to keep.
_AGGREGATION = "only_first_replica"


_MISSING_CALLBACK = (
    "Layer {name!r} is pruned, but fit() was called without the callback that advances "
    "pruning. Add it: model.fit(..., callbacks=[tfopt.callbacks.PruningStep()]). In a "
    "custom training loop, call cb = tfopt.callbacks.PruningStep(); cb.set_model(model); "
    "cb.on_train_begin() before the loop."
)


@keras.saving.register_keras_serializable(package="tfopt")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Masks the prunable weights of ``layer`` by magnitude as training proceeds.

    The wrapped layer always computes with ``weight * mask``: the substitution
    is done with :class:`keras.StatelessScope`, so the layer's own code is
    untouched and gradients reach the unmasked weights only. In a training
    call, on the steps the schedule names, masks are recomputed from the
    magnitudes of the masked weights (so a pruned weight stays pruned) and the
    pruning step advances, all inside the compiled train step.

    Users do not create this class directly: :func:`tfopt.prune` wraps each
    prunable layer, :func:`tfopt.strip` unwraps them with masks baked in.

    Args:
        layer: The layer to prune (built, or built from the first input shape).
        schedule: A :class:`tfopt.pruning.PruningSchedule`.
        n_m: ``(n, m)`` for ``n`` zeros in every ``m`` consecutive weights along
            the input-channel axis, or ``None`` for unstructured pruning.
    """

    _tfopt_role = PRUNING

    def __init__(self, layer: keras.layers.Layer, schedule: PruningSchedule,
                 n_m: Optional[tuple[int, int]] = None, **kwargs):
        kwargs.setdefault("name", f"pruned_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        # Read raw float32 weights here; the wrapped layer does its own autocast.
        kwargs["autocast"] = False
        super().__init__(layer, **kwargs)
        self.schedule = schedule
        self.n_m = tuple(n_m) if n_m else None
        # Set by tfopt.callbacks.PruningStep for the duration of fit(): the Python
        # flag is checked when the train step is traced, the variable (in the
        # graph) on every step of an already traced one.
        self.step_driven = False
        self.needs_retrace = False
        self._targets = []
        self._masks = []

    def build(self, input_shape=None):
        super().build(input_shape)
        self._targets = prunable_weights(self.layer)
        self._masks = [
            self._add_state(f"{t.variable.name}_mask", t.variable.shape, t.variable.dtype, "ones")
            for t in self._targets
        ]
        self.pruning_step = self._add_state("pruning_step", (), "int64", "zeros")
        self.step_driver = self._add_state("step_driver", (), "int32", "zeros")
        self.built = True

    def _add_state(self, name, shape, dtype, initializer) -> keras.Variable:
        """A non-trainable variable that every replica keeps identical."""
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer,
                               trainable=False, aggregation=_AGGREGATION)

    def set_driven(self, driven: bool) -> None:
        """Switch pruning on or off for fit(); called by PruningStep."""
        self.step_driven = driven
        self.step_driver.assign(1 if driven else 0)

    def _new_mask(self, weight: tf.Tensor, group_axis, sparsity: tf.Tensor) -> tf.Tensor:
        if self.n_m is None:
            return _masks.magnitude_mask(weight, sparsity)
        return _masks.n_m_mask(weight, self.n_m[0], self.n_m[1], group_axis)

    def _advance(self) -> list[tf.Tensor]:
        """Recompute masks if the schedule says so, advance the step; return masks."""
        if not self.step_driven:
            self.needs_retrace = True  # this trace fails: the next fit() traces anew
            raise PruningStepMissingError(_MISSING_CALLBACK.format(name=self.name))
        # A train step traced during an earlier fit() runs without tracing again:
        # check in the graph that the callback is still there.
        tf.debugging.assert_equal(self.step_driver.value, 1,
                                  message=_MISSING_CALLBACK.format(name=self.name))
        step = self.pruning_step.value
        # Under a distribution strategy, mirrored variables cannot be assigned
        # inside control flow in a replica context: compute the masks in the
        # cond and assign them after. Otherwise assign only when they change.
        distributed = tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()

        def recompute():
            sparsity = self.schedule.sparsity_at(step)
            new_masks = []
            for target, mask in zip(self._targets, self._masks):
                masked = tf.convert_to_tensor(target.variable.value) * mask.value
                new = self._new_mask(masked, target.group_axis, sparsity)
                if not distributed:
                    mask.assign(new)
                new_masks.append(new)
            return new_masks

        def keep():
            return [tf.identity(mask.value) for mask in self._masks]

        masks = tf.cond(self.schedule.should_prune(step), recompute, keep)
        if distributed:
            for mask, new in zip(self._masks, masks):
                mask.assign(new)
        self.pruning_step.assign_add(1)
        return masks

    def call(self, inputs, training=None, **kwargs):
        if training:
            masks = self._advance()
        else:
            masks = [mask.value for mask in self._masks]
        mapping = [
            (t.variable, t.variable.value * mask) for t, mask in zip(self._targets, masks)
        ]
        return call_with_weights(self, self.layer, mapping, inputs, **kwargs)

    def masked_weights(self) -> list[tuple[keras.Variable, tf.Tensor]]:
        """``(variable, weight * mask)`` for each pruned weight, as tensors."""
        return [
            (t.variable, tf.convert_to_tensor(t.variable.value) * m.value)
            for t, m in zip(self._targets, self._masks)
        ]

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def get_config(self):
        config = super().get_config()
        config["schedule"] = keras.saving.serialize_keras_object(self.schedule)
        config["n_m"] = list(self.n_m) if self.n_m else None
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"], custom_objects=custom_objects
        )
        return super().from_config(config, custom_objects=custom_objects)

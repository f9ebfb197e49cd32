"""Pruning schedules: when masks are recomputed, and to what sparsity.

The argument names follow tensorflow-model-optimization's schedules so that
tfmot users can switch without relearning them. A schedule is a pure function
of the integer pruning step, evaluated inside the compiled train step.
"""

from __future__ import annotations

import numbers
from typing import Optional

import keras
import tensorflow as tf

from tfopt import _checks
from tfopt.errors import ConfigError


def _check_sparsity(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{name} must be a number in [0, 1), got {value!r}. Sparsity is the "
            "fraction of weights set to zero; 1.0 would remove every weight."
        )
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


class PruningSchedule:
    """Base class: maps a pruning step to ``(should_prune, sparsity)``.

    Subclasses implement :meth:`sparsity_at` and keep ``begin_step``,
    ``end_step`` (``-1`` for open-ended) and ``frequency``. Masks are
    recomputed every ``frequency`` steps from ``begin_step`` on, and once more
    at ``end_step`` so that the final sparsity is always reached.
    """

    begin_step: int
    end_step: int
    frequency: int
    final_sparsity: float  # the sparsity the schedule ends at

    def sparsity_at(self, step: tf.Tensor) -> tf.Tensor:
        """The target sparsity at ``step``, a float32 scalar tensor."""
        raise NotImplementedError

    def should_prune(self, step) -> tf.Tensor:
        """Whether masks are recomputed at ``step``, a boolean scalar tensor."""
        step = tf.cast(step, tf.int64)
        in_range = step >= self.begin_step
        if self.end_step >= 0:
            in_range = tf.logical_and(in_range, step <= self.end_step)
        on_turn = tf.equal(tf.math.floormod(step - self.begin_step, self.frequency), 0)
        if self.end_step >= 0:
            on_turn = tf.logical_or(on_turn, tf.equal(step, self.end_step))
        return tf.logical_and(in_range, on_turn)

    def update_steps(self, first: int, last: int) -> list[int]:
        """The steps in ``[first, last]`` at which masks are recomputed (plain Python)."""
        start = max(first, self.begin_step)
        stop = last if self.end_step < 0 else min(last, self.end_step)
        offset = (start - self.begin_step) % self.frequency
        steps = list(range(start + (self.frequency - offset) % self.frequency, stop + 1,
                           self.frequency))
        if 0 <= self.end_step <= last and self.end_step >= start and \
                (not steps or steps[-1] != self.end_step):
            steps.append(self.end_step)
        return steps

    def __call__(self, step) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(should_prune, sparsity)`` as tensors, as tfmot's schedules do."""
        return self.should_prune(step), self.sparsity_at(tf.cast(step, tf.int64))

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> "PruningSchedule":
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


@keras.saving.register_keras_serializable(package="tfopt")
class ConstantSparsity(PruningSchedule):
    """Prune to a fixed sparsity, recomputing masks every ``frequency`` steps.

    Args:
        target_sparsity: Fraction of weights to zero, in ``[0, 1)``.
        begin_step: First step at which masks are computed.
        end_step: Last step at which masks are recomputed; ``-1`` keeps
            recomputing until training stops.
        frequency: Steps between mask updates.

    Example:
        >>> schedule = tfopt.ConstantSparsity(0.5, begin_step=0, frequency=50)
        >>> pruned = tfopt.prune(model, schedule)
    """

    def __init__(self, target_sparsity: float, begin_step: int = 0, end_step: int = -1,
                 frequency: int = 100):
        self.target_sparsity = _check_sparsity("target_sparsity", target_sparsity)
        self.begin_step = _check_int("begin_step", begin_step, 0)
        self.end_step = _check_int("end_step", end_step, -1)
        self.frequency = _check_int("frequency", frequency, 1)
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ConfigError(
                f"end_step ({end_step}) is before begin_step ({begin_step}). Use "
                "end_step >= begin_step, or -1 to keep pruning until training stops."
            )

    @property
    def final_sparsity(self) -> float:
        return self.target_sparsity

    def sparsity_at(self, step):
        return tf.constant(self.target_sparsity, tf.float32)

    def get_config(self) -> dict:
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="tfopt")
class PolynomialDecay(PruningSchedule):
    """Raise sparsity from ``initial_sparsity`` to ``final_sparsity`` polynomially.

    Sparsity at step ``t`` is ``final + (initial - final) * (1 - p) ** power``
    with ``p = (t - begin_step) / (end_step - begin_step)`` clipped to
    ``[0, 1]``, as in tfmot: pruning is fast at first and gentle at the end.

    Args:
        initial_sparsity: Sparsity at ``begin_step``, in ``[0, 1)``.
        final_sparsity: Sparsity reached at ``end_step``, in ``[0, 1)``.
        begin_step: Step at which pruning starts.
        end_step: Step at which ``final_sparsity`` is reached; must be greater
            than ``begin_step``.
        power: Exponent of the decay; 3 is tfmot's default.
        frequency: Steps between mask updates.

    Example:
        >>> schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)
        >>> pruned = tfopt.prune(model, schedule)
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int,
                 end_step: int, power: float = 3, frequency: int = 100):
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        self.begin_step = _check_int("begin_step", begin_step, 0)
        self.end_step = _check_int("end_step", end_step, 0)
        self.frequency = _check_int("frequency", frequency, 1)
        if self.end_step <= self.begin_step:
            raise ConfigError(
                f"end_step ({end_step}) must be greater than begin_step ({begin_step}): "
                "PolynomialDecay needs at least one step to move from "
                "initial_sparsity to final_sparsity."
            )
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not (
                0 < power < float("inf")):  # NaN fails this too
            raise ConfigError(f"power must be a positive number (and finite), got {power!r}; "
                              "tfmot's default is 3.")
        self.power = float(power)

    @classmethod
    def over_epochs(cls, initial_sparsity: float, final_sparsity: float, *,
                    steps_per_epoch: int, end_epoch: float, begin_epoch: float = 0,
                    power: float = 3, updates: int = 10) -> "PolynomialDecay":
        """The schedule in epochs: ``end_epoch`` may be a fraction (1.5: half-way through
        the second epoch), and ``frequency`` is set for about ``updates`` mask updates.

        Args:
            steps_per_epoch: Batches per epoch: ``len(dataset)``, or
                ``ceil(len(x) / batch_size)``.

        Example:
            >>> schedule = tfopt.PolynomialDecay.over_epochs(
            ...     0.0, 0.8, steps_per_epoch=len(train_ds), end_epoch=3)
        """
        steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
        updates = _check_int("updates", updates, 1)
        for name, value in (("begin_epoch", begin_epoch), ("end_epoch", end_epoch)):
            _checks.number(name, value, low=0, hint="It is a number of epochs.")
        begin = int(round(begin_epoch * steps_per_epoch))
        end = int(round(end_epoch * steps_per_epoch))
        if end <= begin:
            raise ConfigError(
                f"end_epoch ({end_epoch}) must come after begin_epoch ({begin_epoch}) by at "
                f"least one step ({steps_per_epoch} steps an epoch).")
        return cls(initial_sparsity, final_sparsity, begin, end, power=power,
                   frequency=max(1, (end - begin) // updates))

    def sparsity_at(self, step):
        span = float(self.end_step - self.begin_step)
        progress = tf.cast(step - self.begin_step, tf.float32) / span
        progress = tf.clip_by_value(progress, 0.0, 1.0)
        initial, final = self.initial_sparsity, self.final_sparsity
        return final + (initial - final) * tf.pow(1.0 - progress, self.power)

    def get_config(self) -> dict:
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


# A gradual schedule that moves its masks fewer times than this in a fit() is, in
# effect, a few large cuts: the accuracy drops that a gradual schedule exists to avoid.
FEW_UPDATES = 5


def fit_plan_problem(schedule: PruningSchedule, first_step: int, steps: int) -> Optional[str]:
    """What goes wrong with ``schedule`` in a ``fit()`` of ``steps`` steps from ``first_step``.

    Two things, both named with the numbers: a gradual schedule that updates
    its masks fewer than :data:`FEW_UPDATES` times (a ``frequency`` too large
    for this many steps), and one that ends after the last step, so its
    final sparsity is not reached. ``None`` when neither.
    """
    last = first_step + steps - 1
    arguments = ", ".join(f"{k}={v}" for k, v in schedule.get_config().items())
    name = f"{type(schedule).__name__}({arguments})"
    gradual = getattr(schedule, "initial_sparsity", schedule.final_sparsity) \
        != schedule.final_sparsity
    done = schedule.update_steps(first_step, last)
    if not done and schedule.begin_step > last:
        return (f"{name} begins at step {schedule.begin_step}, but this fit() runs steps "
                f"{first_step}-{last}: no weight is pruned in it. Set begin_step below "
                f"{last + 1} (steps per epoch x epochs), or train longer.")
    reached = float(schedule.sparsity_at(done[-1])) if done else None
    if gradual and schedule.end_step > last and reached is not None \
            and schedule.final_sparsity - reached > 0.01:
        return (f"{name} reaches final_sparsity at step {schedule.end_step}, but this fit() "
                f"runs steps {first_step}-{last}: it ends at {reached:.2f}, short of it. Set "
                f"end_step to at most {last} (steps per epoch x epochs), or train longer (a "
                f"later fit() goes on from step {last + 1}).")
    if gradual and first_step <= schedule.begin_step:  # a fit() that starts the ramp
        ramp_end = schedule.end_step if schedule.end_step >= 0 else last
        updates = schedule.update_steps(schedule.begin_step, ramp_end)
        if len(updates) < FEW_UPDATES:
            span = max(1, ramp_end - schedule.begin_step)
            return (f"{name} updates the masks {len(updates)} time(s) (steps "
                    f"{schedule.begin_step}-{ramp_end}, at {updates}): a few large cuts "
                    "instead of a gradual ramp, which costs accuracy. Use "
                    f"frequency={max(1, span // 10)} for about 10 updates.")
    return None

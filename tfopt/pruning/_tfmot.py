"""tf_keras models: tfopt's pruning calls handed to tensorflow-model-optimization.

This is the one module that touches tfmot's pruning API.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from tfopt import _compat
from tfopt.pruning._schedules import ConstantSparsity, PolynomialDecay, PruningSchedule


def _sparsity_api():
    return _compat.import_tfmot().sparsity.keras


def _schedule(schedule: PruningSchedule):
    api = _sparsity_api()
    if isinstance(schedule, ConstantSparsity):
        return api.ConstantSparsity(**schedule.get_config())
    if isinstance(schedule, PolynomialDecay):
        return api.PolynomialDecay(**schedule.get_config())
    raise TypeError(
        f"tf_keras models are pruned by tfmot, which takes ConstantSparsity or "
        f"PolynomialDecay; got {type(schedule).__name__}."
    )


def prune(model, schedule: PruningSchedule, n_m: Optional[tuple[int, int]],
          select: Optional[Callable[[Any], bool]]):
    api = _sparsity_api()
    kwargs = {"pruning_schedule": _schedule(schedule), "sparsity_m_by_n": n_m}
    if select is None:
        return api.prune_low_magnitude(model, **kwargs)
    import tf_keras

    # tfmot's documented way to prune some layers: wrap them while cloning.
    def clone_function(layer):
        return api.prune_low_magnitude(layer, **kwargs) if select(layer) else layer

    return tf_keras.models.clone_model(model, clone_function=clone_function)


def strip(model):
    return _sparsity_api().strip_pruning(model)


def is_pruned(model) -> bool:
    _sparsity_api()  # imports tfmot with its side effect contained
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    return any(
        isinstance(layer, pruning_wrapper.PruneLowMagnitude) for layer in _flatten(model)
    )


def _flatten(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _flatten(layer)


def sparsity(model) -> dict[str, float]:
    """Fraction of zeros of every prunable weight of a tf_keras model."""
    import numpy as np

    _sparsity_api()
    from tensorflow_model_optimization.python.core.sparsity.keras import (
        prune_registry,
        pruning_wrapper,
    )

    result = {}
    for layer in _flatten(model):
        if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
            pairs = [(w, w * m) for w, m, _ in layer.pruning_vars]
        elif prune_registry.PruneRegistry.supports(layer) and layer.built:
            names = prune_registry.PruneRegistry._weight_names(layer)
            pairs = [(getattr(layer, n), getattr(layer, n)) for n in names]
        else:
            continue
        for weight, value in pairs:
            value = np.asarray(value)
            result[weight.name.split(":")[0]] = float(np.mean(value == 0))
    return result


def update_step_callback():
    return _sparsity_api().UpdatePruningStep()

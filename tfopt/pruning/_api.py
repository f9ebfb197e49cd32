"""`prune`, `strip_pruning` and `sparsity`: the pruning entry points."""

from __future__ import annotations

import logging
import numbers
from typing import Optional

import keras
import numpy as np

from tfopt import _checks, _compat, _tree
from tfopt._warn import warn_user
from tfopt.errors import (
    AlreadyPrunedError,
    ConfigError,
    IncompatibleShapeError,
    NothingToPruneError,
    UnsupportedModelError,
)
from tfopt.pruning import _tfmot
from tfopt._prunable import is_prunable, prunable_weights
from tfopt.pruning._schedules import PruningSchedule
from tfopt.pruning._wrapper import PruneLowMagnitude

logger = logging.getLogger(__name__)

LayerSelection = _tree.LayerSelection


def prune(model, schedule: PruningSchedule, *, n_m: Optional[tuple[int, int]] = None,
          layers: LayerSelection = None, strict: bool = False,
          structure: Optional[str] = None, importance: str = "l2",
          channel_multiple: int = 8):
    """Return a model whose prunable weights are masked by magnitude during ``fit()``.

    Prunable layers are Dense, EinsumDense (and so MultiHeadAttention's
    projections), Conv1D/2D/3D and their transposed forms, DepthwiseConv1D/2D,
    SeparableConv1D/2D (the pointwise kernel) and Embedding, wherever they sit:
    in Sequential, functional or subclassed models, nested models or
    composite layers. A custom layer opts in by defining
    ``get_prunable_weights()``. Every other layer is left as it is.

    Sequential and functional models are cloned around the same layer objects
    (the returned model shares weights with ``model``, as with tfmot); a
    subclassed model is changed in place and returned. ``tf_keras`` models are
    handed to tfmot's ``prune_low_magnitude``.

    Train the result with ``tfopt.callbacks.PruningStep()`` among the
    callbacks, then call :func:`tfopt.strip` for a plain model.

    Args:
        model: A built Keras 3 or tf_keras model.
        schedule: :class:`tfopt.ConstantSparsity` or :class:`tfopt.PolynomialDecay`.
        n_m: ``(n, m)`` for ``n`` zeros in every ``m`` consecutive weights along
            the input-channel axis (``(2, 4)`` for TensorRT's sparse tensor
            cores). The schedule then only decides when masks are updated.
            Layers that cannot take the pattern (no input-channel axis, as in
            DepthwiseConv and Embedding, or an input-channel count that is not
            a multiple of ``m``, as in a first convolution on 1 or 3 channels)
            are left dense and listed in one warning, as NVIDIA's ASP does.
        layers: Which prunable layers to prune: a layer name, a list of names,
            or a predicate ``layer -> bool``. ``None`` prunes all of them.
        strict: With ``n_m``, raise instead of leaving ineligible layers dense.
            With ``structure="channels"``, raise instead of leaving unpruned the
            layers whose channels reach operations tfopt cannot follow.
        structure: ``None`` (default) masks single weights by magnitude.
            ``"channels"`` masks whole output channels of Conv, SeparableConv
            and Dense layers; the schedule's sparsity is then the fraction of
            each channel group's channels removed, and :func:`tfopt.strip`
            returns a physically smaller model. Channels that must stay
            aligned (both sides of a residual ``Add``/``Multiply``,
            ``Concatenate`` inputs, a depthwise convolution and the layer that
            feeds it, BatchNormalization, a Dense after ``Flatten`` or global
            pooling, squeeze-and-excite branches) are pruned together; the
            model's inputs and outputs are never pruned. Sequential and
            functional models only (nested ones included); ``layers`` then
            picks the layers whose output channels may be removed.
        importance: With ``structure="channels"``: ``"l2"`` (default) ranks
            channels by the L2 norm of their filters, summed over the group;
            ``"bn_scale"`` by the summed ``|gamma|`` of the BatchNormalization
            layers in the group (groups without one fall back to ``"l2"``).
        channel_multiple: With ``structure="channels"``: the channels each group
            keeps are rounded up to a multiple of this (at most all of them),
            so 50% of 20 channels keeps 16. The default 8 suits the CPU's
            vector and INT8 kernels, and TensorFlow 2.21's oneDNN kernels
            have been seen to corrupt memory and crash ``fit()`` on a
            ResNet-style model whose 32x32 stage kept 12 channels, where 16
            trained; ``1`` keeps exactly ``round((1 - sparsity) * n)``.

    Returns:
        The pruned model.

    Raises:
        NotAKerasModelError: ``model`` is not a Keras model.
        AlreadyPrunedError: ``model`` already carries pruning wrappers.
        NothingToPruneError: no layer of ``model`` can be (or was selected to be) pruned.
        IncompatibleShapeError: with ``n_m`` and ``strict=True``, a selected
            layer cannot take the N:M pattern.
        UnsupportedLayerError: with ``structure="channels"`` and
            ``strict=True``, channels reach an operation tfopt cannot follow.
        UnsupportedModelError: ``structure="channels"`` on a subclassed model.
        ConfigError: an invalid ``schedule``, ``n_m`` or ``layers``.

    Example:
        >>> model = tfopt.prune(model, tfopt.PolynomialDecay(0.0, 0.8, 0, 1000))
        >>> model.compile("adam", "sparse_categorical_crossentropy")
        >>> model.fit(x, y, epochs=2, callbacks=[tfopt.callbacks.PruningStep()])
        >>> plain = tfopt.strip(model)

        Structured, whole channels (a smaller, faster model after strip):

        >>> model = tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels")
        >>> model.fit(x, y, epochs=2, callbacks=[tfopt.callbacks.PruningStep()])
        >>> small = tfopt.strip(model)     # fewer filters, plain Keras layers
    """
    kind = _compat.check_keras_model(model)
    if structure not in (None, "channels"):
        raise ConfigError(
            f"structure must be None (single weights) or 'channels' (whole output "
            f"channels), got {structure!r}.")
    _checks.number("channel_multiple", channel_multiple, low=1, integer=True)
    if structure is None and importance != "l2":
        raise ConfigError(f"importance={importance!r} applies to structure='channels' only; "
                          "unstructured pruning ranks weights by magnitude.")
    if not isinstance(schedule, PruningSchedule):
        raise ConfigError(
            f"schedule must be a tfopt pruning schedule, got {schedule!r}. Use "
            "tfopt.ConstantSparsity(0.5) or tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, "
            "end_step=1000)."
        )
    n_m = _check_n_m(n_m)
    if n_m is not None and abs(schedule.final_sparsity - n_m[0] / n_m[1]) > 1e-6:
        logger.warning(
            "n_m=%s fixes sparsity at %.3f; the schedule's target %.3f only decides "
            "when masks are updated.", n_m, n_m[0] / n_m[1], schedule.final_sparsity,
        )
    select = _tree.selector(layers)
    if structure == "channels":
        if n_m is not None:
            raise ConfigError(
                f"n_m={n_m} and structure='channels' are two different patterns; pass one.")
        if kind == "tf_keras":
            raise ConfigError(
                "structure='channels' works on Keras 3 models; this is a tf_keras model. "
                "Rebuild it with keras (Keras 3) to prune channels.")
    if kind == "tf_keras":
        if _tfmot.is_pruned(model):
            raise AlreadyPrunedError(_ALREADY_PRUNED.format(name=model.name))
        return _tfmot.prune(model, schedule, n_m, select)

    _compat.check_built(model)
    if is_pruned(model):
        raise AlreadyPrunedError(_ALREADY_PRUNED.format(name=model.name))
    if _tree.carries(model, _tree.QUANTIZATION):
        raise ConfigError(
            f"Model {model.name!r} is a QAT model (it carries quantization wrappers). Prune "
            "the float model first, strip it, then quantize: "
            "qat = tfopt.quantize(tfopt.strip(pruned)); zeros are kept through QAT."
        )
    if structure == "channels":
        if not _compat.is_graph_model(model):
            raise UnsupportedModelError(
                f"structure='channels' needs a Sequential or functional model, and "
                f"{model.name!r} is a subclassed model ({type(model).__name__}): tfopt follows "
                "channels through the layer graph, which a subclassed call() hides. Build the "
                "model with the functional API (keras.Model(inputs, outputs)) or "
                "keras.Sequential, or prune it without structure (single weights).")
        from tfopt.pruning import _channels

        return _channels.prune_channels(model, schedule, select=select, layers=layers,
                                        strict=strict, importance=importance,
                                        channel_multiple=channel_multiple)
    to_prune = _plan(model, n_m, select, layers, strict)

    def replace(layer):
        if id(layer) not in to_prune:
            return None
        wrapper = PruneLowMagnitude(layer, schedule, n_m=n_m)
        wrapper.build()  # create masks now, under the caller's distribution scope
        return wrapper

    pruned = _tree.rewrite(model, replace)
    _compat.reset_compiled_functions(model)
    _compat.reset_compiled_functions(pruned)
    logger.info("Pruning %d layer(s) of %r with %r%s.", len(to_prune), model.name, schedule,
                f", {n_m[0]}:{n_m[1]} structured" if n_m else "")
    return pruned


_ALREADY_PRUNED = (
    "Model {name!r} is already pruned. Prune the original model once, or call "
    "tfopt.strip(model) first to bake the current masks in and prune again."
)


def _check_n_m(n_m) -> Optional[tuple[int, int]]:
    if n_m is None:
        return None
    ok = (
        isinstance(n_m, (tuple, list)) and len(n_m) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in n_m)
    )
    if not ok or not 0 < n_m[0] < n_m[1]:
        raise ConfigError(
            f"n_m must be a pair (n, m) of integers with 0 < n < m (n zeros in every m "
            f"consecutive weights), got {n_m!r}. TensorRT's sparse tensor cores use (2, 4)."
        )
    return int(n_m[0]), int(n_m[1])


def _plan(model, n_m, select, layers: LayerSelection, strict: bool = False) -> set[int]:
    """Look at the whole model; return ids of layers to wrap, or raise one error."""
    chosen: dict[int, str] = {}
    prunable_names: list[str] = []
    left_dense: list[str] = []
    bad_shapes: list[str] = []
    unsupported: list[str] = []
    for path, layer in _tree.walk(model, stop=is_prunable):
        if not is_prunable(layer):
            if layer.weights and not _compat.direct_sublayers(layer):
                unsupported.append(f"{path} ({type(layer).__name__})")
            continue
        prunable_names.append(layer.name)
        if select is not None and not select(layer):
            continue
        if n_m is not None:
            targets = prunable_weights(layer)
            if any(t.group_axis is None for t in targets):
                left_dense.append(f"{path} ({type(layer).__name__}: no input-channel axis)")
                continue
            odd = [t for t in targets if t.variable.shape[t.group_axis] % n_m[1]]
            if odd:
                bad_shapes.extend(
                    f"{path} ({type(layer).__name__}): {t.variable.name} has "
                    f"{t.variable.shape[t.group_axis]} input channels (shape "
                    f"{tuple(t.variable.shape)}), not a multiple of {n_m[1]}"
                    for t in odd
                )
                continue
        chosen[id(layer)] = path
    if n_m is not None and strict and (bad_shapes or left_dense):
        raise IncompatibleShapeError(
            f"strict=True, and {len(bad_shapes) + len(left_dense)} selected layer(s) cannot "
            f"take n_m={n_m} (input channels grouped by {n_m[1]}):\n  "
            + "\n  ".join(bad_shapes + left_dense)
            + "\nUse strict=False to leave them dense, or leave them out with "
            "layers=lambda layer: layer.name not in {...}."
        )
    if layers is not None and isinstance(layers, (str, list, tuple, set)):
        wanted = {layers} if isinstance(layers, str) else set(layers)
        missing = sorted(wanted - set(prunable_names))
        if missing:
            raise ConfigError(
                f"layers names {missing}, which are not prunable layers of {model.name!r}. "
                f"Prunable layers: {sorted(set(prunable_names))}."
            )
    if not chosen:
        found = "none" if not prunable_names else ", ".join(sorted(set(prunable_names)))
        raise NothingToPruneError(
            f"Nothing to prune in model {model.name!r} (prunable layers found: {found}"
            + (f"; left dense under n_m: {'; '.join(left_dense + bad_shapes)}"
               if left_dense or bad_shapes else "")
            + "). tfopt prunes Dense, EinsumDense, Conv*, DepthwiseConv*, SeparableConv* and "
            "Embedding layers; a custom layer opts in by defining get_prunable_weights()."
        )
    if left_dense or bad_shapes:
        skipped_n_m = left_dense + bad_shapes
        warn_user(
            f"n_m={n_m}: {len(chosen)} layer(s) pruned {n_m[0]}:{n_m[1]}; "
            f"{len(skipped_n_m)} left dense because they cannot take the pattern: "
            + "; ".join(skipped_n_m)
            + ". Pass strict=True to make this an error.")
    if unsupported:
        logger.info(
            "Left unpruned (%d layer(s) with weights tfopt does not prune): %s. A custom "
            "layer opts in by defining get_prunable_weights().",
            len(unsupported), "; ".join(unsupported),
        )
    return set(chosen)


def _is_wrapper(layer) -> bool:
    from tfopt.pruning._channels import PruneChannels

    return isinstance(layer, (PruneLowMagnitude, PruneChannels))


def wrappers(model) -> list:
    """The pruning wrappers (weights or channels) of a Keras 3 model, outermost first."""
    return _tree.find(model, _is_wrapper)


def prune_now(model, sparsity: float) -> None:
    """Set every mask of a pruned Keras 3 model at ``sparsity`` now, without training.

    One-shot pruning from the current weights: what a training step of the
    schedule does when it recomputes masks (channel groups by importance,
    single weights by magnitude, N:M patterns). For benchmarks, tests and
    pruning before fine-tuning.
    """
    import tensorflow as tf

    from tfopt.pruning._channels import PruneChannels

    for wrapper in wrappers(model):
        if isinstance(wrapper, PruneChannels):
            wrapper.update_masks(sparsity)
            continue
        for target, mask in zip(wrapper._targets, wrapper._masks):
            masked = tf.convert_to_tensor(target.variable.value) * mask.value
            mask.assign(wrapper._new_mask(masked, target.group_axis,
                                          tf.constant(sparsity, tf.float32)))


def is_pruned(model) -> bool:
    """True if a model carries tfopt (Keras 3) or tfmot (tf_keras) pruning wrappers."""
    if _compat.check_keras_model(model) == "tf_keras":
        return _tfmot.is_pruned(model)
    return bool(wrappers(model))


def strip_pruning(model):
    """Bake masks into the weights and remove the pruning wrappers.

    Returns the model unchanged if it has no wrappers. See :func:`tfopt.strip`.
    """
    if _compat.check_keras_model(model) == "tf_keras":
        return _tfmot.strip(model)
    found = wrappers(model)
    if not found:
        return model
    from tfopt.pruning._channels import PruneChannels, strip_channels

    if any(isinstance(w, PruneChannels) for w in found):
        return strip_channels(model)
    # Masked values first, the rewrite next (undone if it fails), weights last:
    # a failure leaves the model as it was.
    baked = [(variable, keras.ops.convert_to_numpy(masked))
             for wrapper in found for variable, masked in wrapper.masked_weights()]
    plain = _tree.rewrite(model, lambda layer: layer.layer if _is_wrapper(layer) else None)
    for variable, value in baked:
        variable.assign(value)
    _compat.reset_compiled_functions(model)
    _compat.reset_compiled_functions(plain)
    return plain


def sparsity(model) -> dict[str, float]:
    """Fraction of zeros of every prunable weight, keyed by the weight's path.

    For a model still being pruned (or a QAT model keeping a pruned model's
    zeros), the masked weights are counted: what the model computes with. For
    a stripped or plain model, the weights as stored.

    Example:
        >>> tfopt.sparsity(tfopt.strip(model))
        {'conv2d/kernel': 0.8, 'dense/kernel': 0.8}
    """
    if _compat.check_keras_model(model) == "tf_keras":
        return _tfmot.sparsity(model)
    result = {}

    def masking(layer) -> bool:  # a wrapper that computes with masked weights
        return hasattr(layer, "masked_weights")

    for _, layer in _tree.walk(model, stop=lambda la: masking(la) or is_prunable(la)):
        if masking(layer):
            pairs = layer.masked_weights()
        elif is_prunable(layer) and layer.built:
            pairs = [(t.variable, t.variable.value) for t in prunable_weights(layer)]
        else:
            continue
        for variable, value in pairs:
            result[variable.path] = float(np.mean(keras.ops.convert_to_numpy(value) == 0))
    return result


def n_m_weights(model, n: int = 2, m: int = 4) -> dict[str, bool]:
    """Whether each prunable weight has ``n`` zeros in every group of ``m`` input channels.

    The pattern itself is checked, layer by layer, along each weight's
    input-channel axis (the axis TensorRT's sparse tensor cores group):
    every group of ``m`` consecutive values has at least ``n`` zeros. A weight
    whose input width is not a multiple of ``m``, or that has no such axis
    (depthwise kernels, embeddings), is ``False``. Masked weights count as in
    :func:`sparsity` (a model still pruning, a QAT model keeping its zeros).

    Returns:
        ``{weight path: bool}`` for every prunable weight of ``model``.
    """
    result = {}

    def masking(layer) -> bool:
        return hasattr(layer, "masked_weights")

    for _, layer in _tree.walk(model, stop=lambda la: masking(la) or is_prunable(la)):
        if masking(layer):
            inner = getattr(layer, "layer", layer)
            axes = {id(t.variable): t.group_axis for t in prunable_weights(inner)} \
                if is_prunable(inner) else {}
            pairs = [(v, value, axes.get(id(v))) for v, value in layer.masked_weights()]
        elif is_prunable(layer) and layer.built:
            pairs = [(t.variable, t.variable.value, t.group_axis) for t in prunable_weights(layer)]
        else:
            continue
        for variable, value, axis in pairs:
            values = keras.ops.convert_to_numpy(value)
            result[variable.path] = _has_n_m(values, axis, n, m)
    return result


def _has_n_m(values: np.ndarray, axis, n: int, m: int) -> bool:
    if axis is None or values.ndim == 0 or values.shape[axis] % m:
        return False
    groups = np.moveaxis(values, axis, -1).reshape(-1, m)
    return bool(np.all(np.sum(groups == 0, axis=1) >= n))

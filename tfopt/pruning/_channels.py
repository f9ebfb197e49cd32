"""Structured channel pruning: whole output channels masked in ``fit()``, removed by strip.

How the masked model computes what the stripped one will
---------------------------------------------------------
Each pruned channel group has one keep-mask (a vector, one entry per
channel). Every layer that touches the group's channels is wrapped in a
:class:`PruneChannels` wrapper that multiplies its weights by the masks
along the matching axes:

* a layer that *produces* the channels (Conv, Dense, the pointwise part of a
  SeparableConv) has its filters and biases masked on the output axis;
* a layer that *carries* them one by one (BatchNormalization, a depthwise
  convolution) has its per-channel weights masked (BN: gamma and beta, so a
  removed channel is 0 after it, not beta);
* a layer that *consumes* them (the next Conv or Dense, also after
  ``Flatten`` or global pooling, where one channel is many rows) has its
  input rows masked.

Masking the consumers' input rows is what makes the two models equal: a
removed channel can carry a constant between its producer and its
consumers (a sigmoid of 0 in a squeeze-and-excite branch, ``x + 3`` in
MobileNetV3), and zero padding would make such a constant position-dependent
in the next convolution, so folding it into a bias would not be exact; with
the rows masked, every consumer ignores the removed channels whatever they
carry, exactly as the stripped model, which does not have them, does.

:func:`strip_channels` builds a new model of the same architecture with
fewer filters/units, and copies the kept slices of every weight (producer
output axis, consumer input axis, BN statistics, depthwise channels).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfopt import _compat, _tree
from tfopt._substitute import call_with_weights
from tfopt.errors import (
    ConfigError,
    NothingToPruneError,
    PruningStepMissingError,
    UnsupportedLayerError,
)
from tfopt.pruning import _channel_graph as graph
from tfopt.pruning._schedules import PruningSchedule

logger = logging.getLogger(__name__)

IMPORTANCE = ("l2", "bn_scale")
_AGGREGATION = "only_first_replica"
_MISSING_CALLBACK = (
    "Layer {name!r} is channel-pruned, but fit() was called without the callback that "
    "advances pruning. Add it: model.fit(..., callbacks=[tfopt.callbacks.PruningStep()])."
)


def channel_mask(importance: tf.Tensor, sparsity: tf.Tensor, multiple: int = 1) -> tf.Tensor:
    """Keep-mask removing the ``round(sparsity * n)`` least important channels (one stays).

    The channels kept are rounded up to a multiple of ``multiple`` (at most
    all ``n``). Ties are broken by position (a stable sort), so the result is
    deterministic.
    """
    size = tf.size(importance)
    num_pruned = tf.cast(tf.round(sparsity * tf.cast(size, tf.float32)), tf.int32)
    num_pruned = tf.minimum(num_pruned, size - 1)
    if multiple > 1:
        kept = (size - num_pruned + multiple - 1) // multiple * multiple
        num_pruned = size - tf.minimum(kept, size)
    order = tf.argsort(importance, stable=True)
    ranks = tf.scatter_nd(order[:, None], tf.range(size), [size])
    return tf.cast(ranks >= num_pruned, tf.float32)


class ChannelGroup:
    """Channels that are kept or removed together, and the mask they share.

    Not a layer: the mask variable belongs to the group's *owner*, the first
    of its wrappers that the model calls, which recomputes it in training
    steps; every member wrapper reads it.
    """

    def __init__(self, name: str, size: int, importance: str, multiple: int = 1):
        self.name = name
        self.size = size
        self.importance = importance
        self.multiple = multiple  # channels kept: a multiple of this (or all of them)
        # This group's sparsity as a fraction of the schedule's (per-group widths,
        # see set_group_fractions); 1.0: the schedule's sparsity itself.
        self.share = 1.0
        self.mask: Optional[keras.Variable] = None
        self.filters: list[tuple["PruneChannels", keras.Variable, int]] = []
        self.scales: list[tuple["PruneChannels", keras.Variable, int]] = []

    def scores(self) -> tf.Tensor:
        """The importance of each channel, summed over the group (0 once masked)."""
        total = tf.zeros([self.size])
        if self.importance == "bn_scale" and self.scales:
            for wrapper, variable, offset in self.scales:
                gamma = wrapper.masked(variable)
                total += tf.abs(tf.cast(gamma[offset:offset + self.size], tf.float32))
            return total
        for wrapper, variable, axis in self.filters:
            weight = tf.cast(wrapper.masked(variable), tf.float32)
            weight = tf.reshape(tf.experimental.numpy.moveaxis(weight, axis, -1), [-1, self.size])
            total += tf.sqrt(tf.reduce_sum(tf.square(weight), axis=0))
        return total

    def new_mask(self, sparsity) -> tf.Tensor:
        return channel_mask(self.scores(), tf.cast(sparsity, tf.float32) * self.share,
                            self.multiple)

    def keep(self) -> np.ndarray:
        return keras.ops.convert_to_numpy(self.mask.value) > 0.5


# A layout resolved against the groups: ((group or None, size, inner), ...), outer
Spec = tuple[tuple[tuple[Optional[ChannelGroup], int, int], ...], int]


def _mask_vector(spec: Spec) -> tf.Tensor:
    segments, outer = spec
    parts = []
    for group, size, inner in segments:
        if group is None:
            parts.append(tf.ones([size * inner]))
        else:
            parts.append(tf.repeat(group.mask.value, inner) if inner > 1 else group.mask.value)
    vector = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
    return tf.tile(vector, [outer]) if outer > 1 else vector


def keep_indices(spec: Spec) -> np.ndarray:
    segments, outer = spec
    parts = [np.ones(size * inner, bool) if group is None else np.repeat(group.keep(), inner)
             for group, size, inner in segments]
    return np.flatnonzero(np.tile(np.concatenate(parts), outer))


@keras.saving.register_keras_serializable(package="tfopt")
class PruneChannels(keras.layers.Wrapper):
    """Masks the channels of ``layer`` that belong to pruned channel groups.

    Users do not create this class: :func:`tfopt.prune` with
    ``structure="channels"`` wraps every layer that produces, carries or
    consumes a pruned group's channels; :func:`tfopt.strip` replaces each by
    a smaller plain layer.

    Args:
        layer: The wrapped layer (built).
        schedule: The :class:`tfopt.pruning.PruningSchedule`.
        targets: ``[(variable, [(axis, spec), ...], masked), ...]``: for each
            weight of ``layer``, the axes along which channel groups lie;
            ``masked`` is False for weights only sliced at strip time (BN's
            moving statistics).
        owned: The groups whose masks this wrapper creates and updates.
    """

    _tfopt_role = _tree.PRUNING

    def __init__(self, layer, schedule: PruningSchedule, targets=(), owned=(), **kwargs):
        kwargs.setdefault("name", f"pruned_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        kwargs["autocast"] = False
        super().__init__(layer, **kwargs)
        self.schedule = schedule
        self._targets = list(targets)
        self._owned = list(owned)
        self.step_driven = False
        self.needs_retrace = False

    def build(self, input_shape=None):
        super().build(input_shape)
        for group in self._owned:
            group.mask = self.add_weight(
                name=f"channel_mask_{group.name}", shape=(group.size,), dtype="float32",
                initializer="ones", trainable=False, aggregation=_AGGREGATION)
        self.pruning_step = self.add_weight(name="pruning_step", shape=(), dtype="int64",
                                            initializer="zeros", trainable=False,
                                            aggregation=_AGGREGATION)
        self.step_driver = self.add_weight(name="step_driver", shape=(), dtype="int32",
                                           initializer="zeros", trainable=False,
                                           aggregation=_AGGREGATION)
        self.built = True

    def set_driven(self, driven: bool) -> None:
        """Switch pruning on or off for fit(); called by PruningStep."""
        self.step_driven = driven
        self.step_driver.assign(1 if driven else 0)

    # masks ------------------------------------------------------------------

    def weight_mask(self, variable) -> Optional[tf.Tensor]:
        for target, axes, masked in self._targets:
            if target is not None and target is variable:
                if not masked:
                    return None
                rank = len(variable.shape)
                mask = None
                for axis, spec in axes:
                    shape = [1] * rank
                    shape[axis % rank] = -1
                    vector = tf.reshape(_mask_vector(spec), shape)
                    mask = vector if mask is None else mask * vector
                return tf.cast(mask, variable.dtype)
        return None

    def masked(self, variable) -> tf.Tensor:
        value = tf.convert_to_tensor(variable.value)
        mask = self.weight_mask(variable)
        return value if mask is None else value * mask

    def masked_weights(self) -> list[tuple[keras.Variable, tf.Tensor]]:
        """``(variable, weight * mask)`` for each masked weight, as tensors."""
        return [(v, self.masked(v)) for v, _, masked in self._targets if masked]

    def update_masks(self, sparsity) -> None:
        """Recompute the owned groups' masks at ``sparsity`` now (eagerly)."""
        for group in self._owned:
            group.mask.assign(group.new_mask(sparsity))

    def _advance(self) -> None:
        if not self.step_driven:
            self.needs_retrace = True
            raise PruningStepMissingError(_MISSING_CALLBACK.format(name=self.name))
        tf.debugging.assert_equal(self.step_driver.value, 1,
                                  message=_MISSING_CALLBACK.format(name=self.name))
        step = self.pruning_step.value
        if self._owned:
            distributed = (tf.distribute.has_strategy()
                           and not tf.distribute.in_cross_replica_context())

            def recompute():
                sparsity = self.schedule.sparsity_at(step)
                new = [group.new_mask(sparsity) for group in self._owned]
                if not distributed:
                    for group, value in zip(self._owned, new):
                        group.mask.assign(value)
                return new

            def keep():
                return [tf.identity(group.mask.value) for group in self._owned]

            masks = tf.cond(self.schedule.should_prune(step), recompute, keep)
            if distributed:
                for group, value in zip(self._owned, masks):
                    group.mask.assign(value)
        self.pruning_step.assign_add(1)

    def call(self, inputs, training=None, **kwargs):
        if training:
            self._advance()
        if _compat.layer_takes_training(self.layer):
            kwargs["training"] = training
        mapping = [(v, self.masked(v)) for v, _, masked in self._targets if masked]
        return call_with_weights(self, self.layer, mapping, inputs, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        raise ConfigError(
            f"Layer {self.name!r} belongs to a channel-pruned model, which cannot be saved "
            "whole before tfopt.strip(): its channel groups span layers. Save the weights "
            "mid-training (model.save_weights(...), or ModelCheckpoint(..., "
            "save_weights_only=True)) and load them into tfopt.prune(model, ..., "
            "structure='channels') of the same model, or strip first and save the smaller "
            "plain model.")

    # strip --------------------------------------------------------------------

    def smaller_layer(self) -> keras.layers.Layer:
        """A new, unbuilt layer like the wrapped one, with its kept output channels."""
        config = self.layer.get_config()
        if isinstance(self.layer, keras.layers.Reshape):
            (_, [(_, spec)], _), = self._targets
            config["target_shape"] = tuple(config["target_shape"][:-1]) + (
                len(keep_indices(spec)),)
            return type(self.layer).from_config(config)
        for variable, axes, _ in self._targets:
            if variable is getattr(self.layer, "kernel", None) or \
                    variable is getattr(self.layer, "pointwise_kernel", None):
                for axis, spec in axes:
                    if axis % len(variable.shape) == len(variable.shape) - 1:
                        kept = len(keep_indices(spec))
                        if "filters" in config and not isinstance(
                                self.layer, graph.DEPTHWISE):
                            config["filters"] = kept
                        elif "units" in config:
                            config["units"] = kept
        return type(self.layer).from_config(config)

    def sliced_weights(self) -> list[np.ndarray]:
        """The wrapped layer's weights, in order, with removed channels cut out."""
        values = []
        for variable in self.layer.weights:
            value = keras.ops.convert_to_numpy(variable.value)
            for target, axes, _ in self._targets:
                if target is variable:
                    for axis, spec in axes:
                        value = np.take(value, keep_indices(spec), axis=axis)
            values.append(value)
        return values


def _resolve(plan: graph.ChannelPlan, layout: graph.Layout, groups: dict) -> Optional[Spec]:
    """A layout as a Spec over the pruned groups; None if none of it is pruned."""
    segments = tuple((groups.get(plan.root(s.node)), s.size, s.inner) for s in layout.segments)
    if all(g is None for g, _, _ in segments):
        return None
    return segments, layout.outer


def _targets(plan: graph.ChannelPlan, lp: graph.LayerPlan, groups: dict):
    """``[(variable, axes, masked)]`` for one layer, and the groups it touches."""
    layer = lp.layer
    spec_in = _resolve(plan, lp.inputs, groups) if lp.inputs is not None else None
    out_group = groups.get(plan.root(lp.output)) if lp.output is not None else None
    spec_out = (((out_group, out_group.size, 1),), 1) if out_group is not None else None
    targets = []

    def add(variable, axes, masked=True):
        axes = [(axis, spec) for axis, spec in axes if spec is not None]
        if variable is not None and axes:
            targets.append((variable, axes, masked))

    if lp.kind == "producer":
        if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
            multiplier = layer.depth_multiplier
            expanded = None
            if spec_in is not None:
                expanded = (tuple((g, s, i * multiplier) for g, s, i in spec_in[0]), spec_in[1])
            add(layer.depthwise_kernel, [(-2, spec_in)])
            add(layer.pointwise_kernel, [(-2, expanded), (-1, spec_out)])
        else:
            add(layer.kernel, [(-2, spec_in), (-1, spec_out)])
        add(layer.bias, [(0, spec_out)])
        if out_group is not None:
            out_group.filters.append((layer, (layer.pointwise_kernel if hasattr(
                layer, "pointwise_kernel") else layer.kernel), -1))
    elif lp.kind == "depthwise":
        multiplier = layer.depth_multiplier
        expanded = None
        if spec_in is not None:
            expanded = (tuple((g, s, i * multiplier) for g, s, i in spec_in[0]), spec_in[1])
        add(layer.kernel, [(-2, spec_in)])
        add(layer.bias, [(0, expanded)])
    elif lp.kind == "batchnorm" and spec_in is not None:
        width = lp.inputs.width
        masked = {id(layer.gamma) if layer.scale else None,
                  id(layer.beta) if layer.center else None}
        for variable in layer.weights:
            if tuple(variable.shape) == (width,):
                add(variable, [(0, spec_in)], masked=id(variable) in masked)
        if layer.scale and lp.inputs.outer == 1:
            offset = 0
            for s in lp.inputs.segments:
                group = groups.get(plan.root(s.node))
                if group is not None and s.inner == 1:
                    group.scales.append((layer, layer.gamma, offset))
                offset += s.size * s.inner
    elif lp.kind == "reshape" and spec_in is not None:
        targets.append((None, [(-1, spec_in)], False))  # no weight: the target shape
    touched = {id(g) for _, axes, _ in targets for _, spec in axes
               for g, _, _ in spec[0] if g is not None}
    return targets, touched


def prune_channels(model, schedule: PruningSchedule, *, select=None, layers=None,
                   strict: bool = False, importance: str = "l2", channel_multiple: int = 8):
    """Wrap a Sequential or functional model for channel pruning (see :func:`tfopt.prune`)."""
    if importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {list(IMPORTANCE)}, got {importance!r}: "
                          "'l2' ranks a channel by its filters' L2 norm, 'bn_scale' by the "
                          "|gamma| of the BatchNormalization after it.")
    plan = graph.analyze(model, select)
    producer_names = sorted({lp.layer.name for lp in plan.layers.values()
                             if lp.kind == "producer"})
    if layers is not None and isinstance(layers, (str, list, tuple, set, frozenset)):
        wanted = {layers} if isinstance(layers, str) else set(layers)
        missing = sorted(wanted - set(producer_names))
        if missing:
            raise ConfigError(
                f"layers names {missing}, which are not prunable layers of {model.name!r}. "
                f"Prunable layers: {producer_names}.")
    unfollowable = []
    for root, reasons in plan.unfollowable.items():
        names = ", ".join(sorted(lp.layer.name for lp in plan.producers[root]))
        unfollowable.append(f"{names} (its channels: {'; '.join(reasons)})")
    if unfollowable and strict:
        raise UnsupportedLayerError(
            f"strict=True, and the channels of {len(unfollowable)} group(s) reach operations "
            "tfopt cannot follow:\n  " + "\n  ".join(unfollowable)
            + "\nUse strict=False to leave those layers unpruned, or leave them out with "
            "layers=lambda layer: layer.name not in {...}.")
    if not plan.pruned:
        raise NothingToPruneError(
            f"Nothing to prune by channels in model {model.name!r}: no convolution or Dense "
            "layer has output channels that can be removed (the model's outputs keep theirs"
            + (f"; left unpruned: {'; '.join(unfollowable)}" if unfollowable else "")
            + "). tfopt removes output channels of Conv*, SeparableConv* and Dense layers "
            "that feed other prunable layers.")
    if unfollowable:
        warnings.warn(
            f"structure='channels': {len(unfollowable)} group(s) of layers left unpruned "
            "because tfopt cannot follow how their channels couple: "
            + "; ".join(unfollowable) + ". Pass strict=True to make this an error.",
            stacklevel=3)

    groups: dict[int, ChannelGroup] = {}
    for root in sorted(plan.pruned, key=lambda r: min(lp.order for lp in plan.producers[r])):
        first = min(plan.producers[root], key=lambda lp: lp.order)
        groups[root] = ChannelGroup(first.layer.name, plan.spaces.size[root], importance,
                                    channel_multiple)
    wrapped: dict[int, tuple] = {}
    owners: dict[int, ChannelGroup] = {}
    for lp in sorted(plan.layers.values(), key=lambda lp: lp.order):
        targets, touched = _targets(plan, lp, groups)
        if not targets:
            continue
        wrapped[id(lp.layer)] = (targets, [])
        for group in groups.values():
            if id(group) in touched and id(group) not in owners:
                owners[id(group)] = group
                wrapped[id(lp.layer)][1].append(group)
    # Every wrapper is made and built (its groups' masks created) before the
    # graph is rebuilt around them, since rebuilding calls them.
    layer_of = {id(lp.layer): lp.layer for lp in plan.layers.values()}
    made = {key: PruneChannels(layer_of[key], schedule, targets, owned)
            for key, (targets, owned) in wrapped.items()}
    for group in groups.values():  # importance reads weights through their wrappers
        group.filters = [(made[id(layer)], v, axis) for layer, v, axis in group.filters]
        group.scales = [(made[id(layer)], v, offset) for layer, v, offset in group.scales]
    for wrapper in made.values():
        wrapper.build()
    pruned = _tree.rewrite(model, lambda layer: made.get(id(layer)))
    _compat.reset_compiled_functions(model)
    _compat.reset_compiled_functions(pruned)
    logger.info("Pruning channels of %d group(s) (%d layers wrapped) of %r with %r.",
                len(groups), len(made), model.name, schedule)
    return pruned


def channel_wrappers(model) -> list[PruneChannels]:
    return _tree.find(model, lambda layer: isinstance(layer, PruneChannels))


def channel_groups(model) -> dict[str, ChannelGroup]:
    """The channel groups of a channel-pruned model, by name (the first producer's)."""
    return {group.name: group for wrapper in channel_wrappers(model)
            for group in wrapper._owned}


def set_group_fractions(model, fractions: dict[str, float]) -> None:
    """Give each named group its own final fraction of channels to remove.

    Each group then follows the schedule scaled to its fraction: with a
    schedule ending at ``s``, a group given ``f`` is at ``f * t / s`` when the
    schedule is at ``t``. Groups not named keep none pruned. Works on a model
    :func:`prune_channels` wrapped; the shares are not saved with it.
    """
    groups = channel_groups(model)
    unknown = sorted(set(fractions) - set(groups))
    if unknown:
        raise ConfigError(f"No channel group named {unknown} in {model.name!r}; its groups: "
                          f"{sorted(groups)}.")
    finals = {w.schedule.final_sparsity for w in channel_wrappers(model) if w._owned}
    final = max(finals) if finals else 0.0
    for name, group in groups.items():
        fraction = float(fractions.get(name, 0.0))
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"The fraction of group {name!r} must be in [0, 1), got "
                              f"{fraction!r}.")
        if fraction and not final:
            raise ConfigError("set_group_fractions needs a schedule with a final sparsity "
                              "above 0.")
        group.share = fraction / final if final else 0.0


def update_masks(model, sparsity: float) -> None:
    """Set every group's mask at ``sparsity`` now, from the current weights.

    What a training step of the schedule does, without training: for
    one-shot pruning before fine-tuning, benchmarks and tests.
    """
    for wrapper in channel_wrappers(model):
        wrapper.update_masks(sparsity)


class _ResizedOnCall:
    """Stands for a nested graph model while its parent is rebuilt.

    The nested model is cloned when the parent's rebuild first calls it, with
    the shapes of the (now narrower) tensors it is called on.
    """

    def __init__(self, model, clone_child):
        self.model = model
        self.clone_child = clone_child
        self.clone = None

    def __call__(self, *args, **kwargs):
        if self.clone is None:
            shapes = [t.shape for t in keras.tree.flatten(args[0])]
            self.clone = _compat.clone_graph_model(self.model, self.clone_child, shapes)
        return self.clone(*args, **kwargs)


def strip_channels(model):
    """A plain, physically smaller model computing what the masked ``model`` computes."""
    found = channel_wrappers(model)
    built: list[tuple[PruneChannels, keras.layers.Layer]] = []
    values = {id(w): w.sliced_weights() for w in found}
    with _tree.transaction() as journal:

        def replace(layer):
            if isinstance(layer, PruneChannels):
                new = layer.smaller_layer()
                built.append((layer, new))
                return new
            if layer is not model and _compat.is_graph_model(layer):
                return _ResizedOnCall(layer, lambda child: _tree.rewrite(child, replace,
                                                                         journal))
            return None

        plain = _tree.rewrite(model, replace, journal)
    for wrapper, new in built:
        if not new.built:
            raise UnsupportedLayerError(
                f"Layer {wrapper.layer.name!r} was not rebuilt while stripping {model.name!r}; "
                "please report this with the model's summary.")
        new.set_weights(values[id(wrapper)])
    _compat.reset_compiled_functions(plain)
    return plain

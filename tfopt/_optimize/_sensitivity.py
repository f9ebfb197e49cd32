"""`sensitivity`: how much each channel group and each quantized layer costs the metric.

Per channel group (the groups ``structure="channels"`` prunes together), the
group alone loses the given fractions of its channels, by the same L2 ranking
pruning uses; the model is stripped to its smaller size, its BatchNormalization
statistics are re-estimated on a few training batches (without that, the
number mostly measures stale statistics), and scored on the validation data.
The FLOPs each removal saves are counted on the stripped model.

Per quantized layer (on request), the metric of the calibrated INT8 model
with that layer alone kept in float: the layers whose INT8 costs most are
the first :func:`tfopt.optimize` returns to float.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfopt import _checks, _compat, _flops
from tfopt.errors import ConfigError, UnsupportedModelError
from tfopt._optimize import _evaluate

logger = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 0.75)


@dataclasses.dataclass
class Sensitivity:
    """What removing channels (per group) and quantizing (per layer) costs.

    Attributes:
        metric: The metric's name.
        baseline: The metric of the model as given.
        flops: The model's FLOPs per sample.
        groups: ``{group: {"size": channels, "metric": {fraction: value},
            "flops": {fraction: FLOPs per sample once removed}}}``.
        layers: ``{quantized layer: metric with that layer alone in float}``
            (empty unless asked for).
        quantized_metric: The metric with every layer quantized (None unless asked).
        recalibrated: The metric of the model as given after the same
            BatchNormalization re-estimation as the pruned ones: what their
            drops are measured from, so that the re-estimation's own effect
            is not counted as the channels' (None: no re-estimation).
    """

    metric: str
    baseline: float
    flops: int
    groups: dict
    layers: dict = dataclasses.field(default_factory=dict)
    quantized_metric: Optional[float] = None
    recalibrated: Optional[float] = None

    def drop(self, group: str, fraction: float) -> float:
        """Metric lost removing ``fraction`` of ``group`` alone (interpolated; >= 0)."""
        points = self.groups[group]["metric"]
        reference = self.baseline if self.recalibrated is None else self.recalibrated
        xs = [0.0] + sorted(points)
        ys = [0.0] + [max(reference - points[f], 0.0) for f in sorted(points)]
        return float(np.interp(fraction, xs, ys))

    def saved(self, group: str, fraction: float) -> float:
        """Fraction of the model's FLOPs saved removing ``fraction`` of ``group`` alone."""
        points = self.groups[group]["flops"]
        xs = [0.0] + sorted(points)
        ys = [0.0] + [1.0 - points[f] / max(self.flops, 1) for f in sorted(points)]
        return float(np.interp(fraction, xs, ys))

    def layer_order(self) -> list[str]:
        """Quantized layers, the one whose INT8 costs the most first."""
        return sorted(self.layers, key=lambda name: -self.layers[name])

    def table(self) -> str:
        """The scan as Markdown: one row per group, then the INT8 layers if measured."""
        fractions = sorted({f for g in self.groups.values() for f in g["metric"]})
        header = ["channel group", "channels"] + [f"{self.metric} at -{f:.0%}"
                                                  for f in fractions]
        if fractions:
            header.append(f"FLOPs saved at -{fractions[-1]:.0%}")
        lines = ["| " + " | ".join(header) + " |",
                 "| --- |" + " ---: |" * (len(header) - 1)]
        for name, group in self.groups.items():
            cells = [name, str(group["size"])] + [f"{group['metric'][f]:.4f}" for f in fractions]
            if fractions:
                cells.append(f"{self.saved(name, fractions[-1]):.1%}")
            lines.append("| " + " | ".join(cells) + " |")
        if self.layers:
            lines += ["", f"| kept in float | {self.metric} (all INT8: "
                      f"{self.quantized_metric:.4f}) |", "| --- | ---: |"]
            lines += [f"| {name} | {self.layers[name]:.4f} |" for name in self.layer_order()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for group in out["groups"].values():  # JSON keys are strings
            group["metric"] = {str(k): v for k, v in group["metric"].items()}
            group["flops"] = {str(k): v for k, v in group["flops"].items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        data = dict(data)
        data["groups"] = {name: {"size": g["size"],
                                 "metric": {float(k): v for k, v in g["metric"].items()},
                                 "flops": {float(k): v for k, v in g["flops"].items()}}
                          for name, g in data["groups"].items()}
        return cls(**data)

    def save(self, path: Path) -> None:
        temporary = Path(path).with_suffix(".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1))
        temporary.replace(path)


def check_model(model) -> None:
    """The models :func:`tfopt.optimize` and :func:`sensitivity` work on, or one clear error."""
    kind = _compat.check_keras_model(model)
    if kind == "tf_keras":
        raise UnsupportedModelError(
            "tfopt.optimize and tfopt.sensitivity work on Keras 3 models (channel pruning "
            "follows Keras 3's layer graph); this is a tf_keras model. Rebuild it with keras.")
    _compat.check_built(model)
    if not _compat.is_graph_model(model):
        raise UnsupportedModelError(
            f"{model.name!r} is a subclassed model ({type(model).__name__}): tfopt.optimize "
            "removes channels by following the layer graph, which a subclassed call() hides. "
            "Build it with the functional API (keras.Model(inputs, outputs)) or "
            "keras.Sequential.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"{model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "tfopt.optimize handles models with one input and one output.")
    from tfopt import _tree

    if _tree.carries(model, _tree.PRUNING) or _tree.carries(model, _tree.QUANTIZATION):
        raise ConfigError(f"{model.name!r} carries tfopt wrappers; pass the trained float "
                          "model (tfopt.strip(model) for a pruned one).")


def channel_model(model, max_fraction: float):
    """``model``'s copy wrapped for channel pruning, and the groups that can lose channels
    (name -> group; a group no larger than the channel multiple keeps them all)."""
    from tfopt.pruning import ConstantSparsity, prune
    from tfopt.pruning import _channels

    import warnings

    with warnings.catch_warnings():  # groups tfopt cannot follow are reported by prune()
        warnings.simplefilter("ignore")
        wrapped = prune(_evaluate.copy(model), ConstantSparsity(max_fraction),
                        structure="channels")
    groups = {name: group for name, group in _channels.channel_groups(wrapped).items()
              if group.size > group.multiple}
    return wrapped, groups


def stripped_at(wrapped, fractions: dict, max_fraction: float):
    """The plain smaller model with ``fractions`` of each group's channels removed.

    The masks are ranked on the wrapped model's current weights; the result
    shares no layer with ``wrapped``.
    """
    import tensorflow as tf

    from tfopt.pruning import _channels

    for group in _channels.channel_groups(wrapped).values():
        group.mask.assign(tf.ones([group.size]))
    _channels.set_group_fractions(wrapped, fractions)
    _channels.update_masks(wrapped, max_fraction)
    return _evaluate.copy(_channels.strip_channels(wrapped))


def sensitivity(model, validation_data, *, train_data=None, metric="accuracy",
                fractions: Sequence[float] = FRACTIONS, quantization: bool = False,
                batch_norm_batches: int = 8, batch_size: int = 32,
                progress=None) -> Sensitivity:
    """Measure how much each channel group, and each quantized layer, costs the metric.

    Args:
        model: A trained Sequential or functional Keras 3 model (one input,
            one output).
        validation_data: ``(x, y)`` arrays or a ``tf.data.Dataset`` of
            ``(inputs, labels)``: what every number is measured on.
        train_data: ``(x, y)`` or a dataset, read for
            ``batch_norm_batches`` batches to re-estimate BatchNormalization
            statistics after channels go (None: kept as trained).
        metric: ``"accuracy"`` or ``callable(y_true, y_pred) -> float``,
            higher is better.
        fractions: The fractions of each group's channels to remove, each
            alone, in (0, 1).
        quantization: Also measure, per quantized layer, the metric with that
            layer alone kept in float (an INT8 model calibrated on the
            training batches, not trained).
        batch_norm_batches: Training batches used for re-estimation and calibration.
        batch_size: Batch size for ``train_data`` given as arrays.
        progress: ``callable(message)`` told about each step (None: logged).

    Returns:
        A :class:`Sensitivity` (``.table()`` for a Markdown table).

    Example:
        >>> sens = tfopt.sensitivity(model, (x_val, y_val), train_data=(x, y))
        >>> print(sens.table())
        >>> sens.drop("conv2d_1", 0.5)
    """
    check_model(model)
    fractions = tuple(sorted(_checks.number("fractions", f, low=0.0, high=1.0, low_open=True,
                                            high_open=True) for f in fractions))
    if not fractions:
        raise ConfigError("fractions is empty: give the fractions of channels to remove, "
                          "e.g. (0.25, 0.5, 0.75).")
    _checks.number("batch_norm_batches", batch_norm_batches, low=0, integer=True)
    say = progress or (lambda message: logger.info("%s", message))
    evaluation = _evaluate.evaluation(model, validation_data, metric)
    batches = []
    if train_data is not None and batch_norm_batches:
        dataset = _evaluate.training_dataset(model, train_data, batch_size)
        batches = _evaluate.input_batches(dataset, batch_norm_batches)
    result = Sensitivity(evaluation.name, evaluation.keras(model), _flops.count(model).flops, {})
    measure_groups(result, model, evaluation, batches, fractions, say)
    if quantization:
        measure_layers(result, model, evaluation, batches, say)
    return result


def measure_groups(result: Sensitivity, model, evaluation, batches, fractions, say,
                   done=None) -> None:
    """Fill ``result.groups``; ``done(result)`` after each group (to save progress)."""
    wrapped, groups = channel_model(model, max(fractions))
    if batches and result.recalibrated is None:
        reference = _evaluate.copy(model)
        _evaluate.recalibrate_batch_norm(reference, batches)
        result.recalibrated = evaluation.keras(reference)
    for i, (name, group) in enumerate(groups.items()):
        if name in result.groups:  # measured before an interruption
            continue
        entry = {"size": group.size, "metric": {}, "flops": {}}
        for fraction in fractions:
            small = stripped_at(wrapped, {name: fraction}, max(fractions))
            _evaluate.recalibrate_batch_norm(small, batches)
            entry["metric"][fraction] = evaluation.keras(small)
            entry["flops"][fraction] = _flops.count(small).flops
        result.groups[name] = entry
        say(f"sensitivity: group {i + 1}/{len(groups)} {name} ({group.size} channels): "
            + ", ".join(f"-{f:.0%} -> {entry['metric'][f]:.4f}" for f in fractions))
        if done is not None:
            done(result)


def measure_layers(result: Sensitivity, model, evaluation, batches, say,
                   only: Optional[Sequence[str]] = None) -> None:
    """Fill ``result.layers``: the metric with each quantized layer alone in float."""
    import warnings

    from tfopt.quantization import quantize

    if not batches:
        raise ConfigError("Per-layer INT8 sensitivity calibrates on training batches: pass "
                          "train_data.")
    calibration = np.concatenate(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everything = quantize(_evaluate.copy(model), calibration_data=calibration)
        result.quantized_metric = evaluation.keras(everything)
        from tfopt.quantization._api import quant_wrappers
        from tfopt.quantization._wrapper import QuantizeWrapper

        names = [w.layer.name for w in quant_wrappers(everything)
                 if isinstance(w, QuantizeWrapper)]
        for i, name in enumerate(names):
            if name in result.layers or (only is not None and name not in only):
                continue
            if len(names) == 1:
                result.layers[name] = result.baseline
                continue
            partial = quantize(_evaluate.copy(model), calibration_data=calibration,
                               layers=lambda layer, name=name: layer.name != name)
            result.layers[name] = evaluation.keras(partial)
            say(f"sensitivity: INT8 layer {i + 1}/{len(names)} {name} kept in float -> "
                f"{result.layers[name]:.4f} (all INT8: {result.quantized_metric:.4f})")

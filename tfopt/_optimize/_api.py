"""`optimize`: the fastest model within an accuracy budget, measured on the serving engine.

The search, in the order it runs (each phase's result is saved under
``output`` before the next begins, so an interrupted run goes on from there):

1. **Baseline**: the dense float model's metric (Keras) and its latency,
   exported to ONNX (and OpenVINO) and timed on the target engine; the same
   model quantized (calibrated, not fine-tuned) gives the INT8 speed-up the
   engine offers on this model.
2. **Sensitivity** (:mod:`tfopt._optimize._sensitivity`): per channel group,
   the metric with a few fractions of its channels removed alone.
3. **Allocation**: a path from the dense model to the smallest one, each step
   removing 1/8 of one group's channels: the step that saves the most FLOPs
   per point of predicted metric lost. Points on the path are stripped and
   counted (FLOPs) or exported and timed (latency targets); the first that
   meets the target, INT8 speed-up included, is where the search starts,
   unless the scan predicts a drop far past the budget there (5x, summed
   over groups; fine-tuning recovers much of it, but not that much): then
   it starts at the last point short of that.
4. **Recovery**: the dense model pruned to that point's widths in ``fit()``
   (a gradual schedule over the first half of ``epochs``), with the dense
   model as teacher (:class:`Distiller`), then QAT fine-tuning, also
   distilled.
5. **Accuracy control**: the INT8 file is scored on the engine; if it loses
   more than what the budget allows, the layers whose INT8 costs most go
   back to float (1, then 2, then 4); if the pruned float model alone is
   over budget, the search moves back toward the dense model (bisection
   between the last point that held and the first that did not); if the
   target is missed within budget, it moves on toward the smaller models.
   Once the target is met, the rounds left go on toward smaller models
   while the budget holds. ``max_rounds`` and ``budget_seconds`` bound the
   search; the fastest candidate within budget (by its speed-up, timed side
   by side with the dense file) is returned, and the result says plainly
   when the target was not met.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np

from tfopt import _checks, _flops
from tfopt.errors import ConfigError, ExportValidationError
from tfopt._optimize import _evaluate, _measure, _sensitivity
from tfopt._optimize._distill import Distiller
from tfopt._optimize._sensitivity import Sensitivity
from tfopt._optimize._target import Target

logger = logging.getLogger(__name__)

STEP = 0.125  # the allocation path removes 1/8 of a group's channels per step
QAT_LEARNING_RATE_FACTOR = 0.1  # QAT fine-tunes at a tenth of the recovery learning rate
# The first pruned candidate is no further along the path than where the sensitivity
# scan predicts a drop of START_DROP_FACTOR x the budget (at least START_DROP_FLOOR).
START_DROP_FACTOR = 5.0
START_DROP_FLOOR = 0.05
# A path point is predicted to meet a latency target when it beats it by this factor:
# a model that only just meets it when predicted often misses it when measured.
AIM_HEADROOM = 1.1


@dataclasses.dataclass
class Candidate:
    """One configuration tried, as exported and measured on the engine.

    Attributes:
        name: ``"dense fp32"``, ``"p12 int8"`` (point 12 of the allocation path), ...
        fractions: Fraction of each channel group's channels removed.
        widths: Output channels of each pruned layer (Keras layer name -> channels).
        precision: ``"fp32"`` or ``"int8"``.
        float_layers: Layers kept in float in an INT8 candidate.
        flops: FLOPs per sample, as a fraction of the dense model's.
        params: Parameters.
        metric: The metric of the exported file, run on the engine.
        drop: Dense Keras metric minus ``metric``.
        latency_ms: Median latency on the engine at the target's batch size.
        speedup: The dense FP32 file's latency over this one's, the two timed
            interleaved in one run.
        size_mb: The ONNX file's size.
        within_budget: ``drop <= max_accuracy_drop``.
        meets_target: Whether it meets the :class:`Target`.
        distilled: Fine-tuned with the dense model as teacher.
        directory: Its export.
        note: Why it could not be used, if so (an INT8 export refused by
            validation: ``latency_ms`` is then NaN and ``metric`` is the Keras
            QAT model's).
    """

    name: str
    fractions: dict
    widths: dict
    precision: str
    float_layers: list
    flops: float
    params: int
    metric: float
    drop: float
    latency_ms: float
    speedup: float
    size_mb: float
    within_budget: bool
    meets_target: bool
    distilled: bool
    directory: str
    note: str = ""

    def describe(self) -> str:
        pruned = [f for f in self.fractions.values() if f]
        what = f"channels pruned in {len(pruned)} group(s)" if pruned else "no channels pruned"
        precision = self.precision.upper()
        if self.float_layers:
            precision += f" with {len(self.float_layers)} layer(s) in float"
        return f"{what}, {precision}, {self.flops:.0%} of the FLOPs"


@dataclasses.dataclass
class OptimizeResult:
    """What :func:`optimize` found.

    Attributes:
        model: The chosen plain Keras model (channels stripped), before QAT.
        qat_model: Its QAT model, if INT8 was kept (else None).
        export: The :class:`tfopt.ExportResult` of the chosen model's artifacts.
        candidates: Every configuration tried (:class:`Candidate`), in order.
        chosen: The candidate returned.
        baseline: The dense model: ``metric``, ``latency_ms``, ``flops``, ``params``.
        speedup: Dense FP32 latency over the chosen artifact's, timed side by side.
        target_met: Whether the chosen candidate meets the target within the budget.
        message: Why the search ended, in a sentence.
        sensitivity: The :class:`tfopt.Sensitivity` the allocation used.
    """

    model: keras.Model
    qat_model: Optional[keras.Model]
    export: object
    candidates: list
    chosen: Candidate
    baseline: dict
    speedup: float
    target_met: bool
    message: str
    sensitivity: Sensitivity
    target: Target
    max_accuracy_drop: float
    metric_name: str
    output: Path

    def summary(self) -> str:
        """One line: how much faster, at what cost, on which engine."""
        drop = self.chosen.drop
        points = f"{-drop * 100:+.1f} points" if self.metric_name == "accuracy" else \
            f"{self.metric_name} {-drop:+.4f}"
        line = (f"{self.speedup:.1f}x faster than the dense FP32 on {self.target.engine} at "
                f"batch {self.target.batch_size}, {points} ({self.chosen.describe()})")
        return line if self.target_met else line + f"; target not met: {self.message}"

    def table(self) -> str:
        """Every candidate as a Markdown table."""
        rows = ["| candidate | precision | FLOPs | params | "
                f"{self.metric_name} | drop | latency ms | speed-up | MB | within budget | "
                "meets target |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for c in self.candidates:
            mark = " (chosen)" if c is self.chosen else ""
            precision = c.precision + (f" ({len(c.float_layers)} float)" if c.float_layers else "")
            if c.note:
                rows.append(f"| {c.name} | {precision} | {c.flops:.0%} | {c.params:,} | "
                            f"{c.metric:.4f} (Keras) | {c.drop:+.4f} | - | - | - | no | no |")
                continue
            rows.append(f"| {c.name}{mark} | {precision} | {c.flops:.0%} | {c.params:,} | "
                        f"{c.metric:.4f} | {c.drop:+.4f} | {c.latency_ms:.3f} | "
                        f"{c.speedup:.2f}x | {c.size_mb:.2f} | {'yes' if c.within_budget else 'no'}"
                        f" | {'yes' if c.meets_target else 'no'} |")
        return "\n".join(rows)


def optimize(model, train_data, *, validation_data, target: Target, output,
             metric="accuracy", max_accuracy_drop: float = 0.01, epochs: int = 5,
             qat_epochs: int = 2, batch_size: int = 32, learning_rate: float = 1e-3, loss=None,
             distillation: bool = True, alpha: float = 0.5, temperature: float = 4.0,
             fractions: Sequence[float] = _sensitivity.FRACTIONS, max_rounds: int = 4,
             budget_seconds: Optional[float] = None, verbose: int = 1) -> OptimizeResult:
    """Find the fastest pruned and quantized model within an accuracy budget.

    Every candidate is exported, scored on the validation data *by the engine
    that will serve it*, and timed there; see the module docstring for the
    search. All work is saved under ``output``: call again with the same
    arguments after an interruption and it goes on where it stopped.

    Args:
        model: A trained Sequential or functional Keras 3 model (one input,
            one output). It is never changed.
        train_data: What ``fit()`` takes: ``(x, y)`` arrays or a
            ``tf.data.Dataset`` of ``(inputs, labels)`` (one epoch of it).
        validation_data: ``(x, y)`` or a dataset of ``(inputs, labels)``; a
            dataset is read into memory up to its first 10,000 samples (at
            most 1 GiB of inputs), on which every candidate is scored.
        target: A :class:`tfopt.Target`: the engine and the speed-up,
            latency or FLOPs to reach.
        output: A folder for the work, the report and the chosen artifacts.
        metric: ``"accuracy"`` or ``callable(y_true, y_pred) -> float``,
            higher is better.
        max_accuracy_drop: Largest drop of ``metric`` allowed, absolute,
            against the dense model (0.01: one point of accuracy).
        epochs: Fine-tuning epochs of each pruned candidate.
        qat_epochs: QAT fine-tuning epochs (0: calibration only).
        batch_size: Batch size for ``train_data`` given as arrays.
        learning_rate: Adam's learning rate for recovery (QAT uses a tenth).
        loss: The task loss (default: the model's compiled loss, else a
            cross-entropy matching the labels and the output activation).
        distillation: Fine-tune with the dense model as teacher.
        alpha: Weight of the task loss against distillation's (see :class:`tfopt.Distiller`).
        temperature: Distillation temperature.
        fractions: Fractions of each group's channels removed in the sensitivity scan.
        max_rounds: Pruned candidates fine-tuned at most.
        budget_seconds: Stop after this long and return the best candidate so far.
        verbose: 0 silent, 1 a line per step, 2 also ``fit()``'s per-epoch lines.

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        UnsupportedModelError: a subclassed or tf_keras model, or several inputs/outputs.
        ConfigError: bad arguments, or a target no pruned model can reach
            (both before any training).
        BackendUnavailableError: the engine is not installed.

    Example:
        >>> result = tfopt.optimize(model, (x, y), validation_data=(x_val, y_val),
        ...                         target=tfopt.Target(speedup=3.0), output="out/opt")
        >>> print(result.summary())
        >>> result.export.paths["onnx"]
    """
    started = time.monotonic()
    _sensitivity.check_model(model)
    if not isinstance(target, Target):
        raise ConfigError(f"target must be a tfopt.Target, got {target!r}: for example "
                          "tfopt.Target(engine='onnxruntime', batch_size=1, speedup=3.0).")
    max_accuracy_drop = _checks.number("max_accuracy_drop", max_accuracy_drop, low=0.0,
                                       hint="It is the metric's largest allowed drop, e.g. "
                                            "0.01 for one point of accuracy.")
    for name, value, low in (("epochs", epochs, 1), ("qat_epochs", qat_epochs, 0),
                             ("batch_size", batch_size, 1), ("max_rounds", max_rounds, 1),
                             ("verbose", verbose, 0)):
        _checks.number(name, value, low=low, integer=True)
    _checks.number("learning_rate", learning_rate, low=0.0, low_open=True)
    if budget_seconds is not None:
        _checks.number("budget_seconds", budget_seconds, low=0.0, low_open=True)
    fractions = tuple(sorted(_checks.number("fractions", f, low=0.0, high=1.0, low_open=True,
                                            high_open=True) for f in fractions))
    if not fractions:
        raise ConfigError("fractions is empty: e.g. (0.25, 0.5, 0.75).")
    distillation = _checks.boolean("distillation", distillation)
    _checks.number("alpha", alpha, low=0.0, high=1.0)
    _checks.number("temperature", temperature, low=0.0, low_open=True)
    _measure.require_engine(target)
    evaluation = _evaluate.evaluation(model, validation_data, metric)
    dataset = _evaluate.training_dataset(model, train_data, batch_size)
    task_loss = _task_loss(model, loss, evaluation.y)
    search = _Search(model, dataset, evaluation, target, Path(output), dict(
        metric=evaluation.name, max_accuracy_drop=max_accuracy_drop, epochs=epochs,
        qat_epochs=qat_epochs, batch_size=batch_size, learning_rate=learning_rate,
        distillation=distillation, alpha=alpha, temperature=temperature,
        fractions=list(fractions), target=dataclasses.asdict(target)),
        task_loss=task_loss, verbose=verbose, started=started, budget_seconds=budget_seconds,
        max_rounds=max_rounds)
    return search.run()


def _task_loss(model, loss, y: np.ndarray):
    if loss is not None:
        return loss
    compiled = getattr(model, "loss", None)
    if compiled is not None and getattr(model, "compiled", False):
        return compiled
    width = model.outputs[0].shape[-1]
    activation = _evaluate.last_activation(model)
    if width == 1:
        return keras.losses.BinaryCrossentropy(from_logits=activation != "sigmoid")
    from_logits = activation != "softmax"
    if y.ndim >= 2 and y.shape[-1] == width:
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _fingerprint(model, evaluation, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    digest.update(np.ascontiguousarray(evaluation.x).tobytes())
    digest.update(np.ascontiguousarray(evaluation.y).tobytes())
    return digest.hexdigest()


class _OutOfTime(Exception):
    pass


class _Search:
    """The state of one optimize() run; every finished step is in ``output/state.json``."""

    def __init__(self, model, dataset, evaluation, target: Target, output: Path, settings: dict,
                 *, task_loss, verbose: int, started: float, budget_seconds, max_rounds: int):
        self.model, self.dataset, self.evaluation, self.target = model, dataset, evaluation, target
        self.output, self.settings, self.task_loss = output, settings, task_loss
        self.verbose, self.started, self.budget_seconds = verbose, started, budget_seconds
        self.max_rounds = max_rounds
        self.fractions = tuple(settings["fractions"])
        self.max_fraction = self.fractions[-1]
        self.work = output / "work"
        fingerprint = _fingerprint(model, evaluation, settings)
        self.state = self._load_state(fingerprint)
        self.batches = _evaluate.input_batches(dataset, 8)
        # Calibration (and so every INT8 file's untrained ranges) must be the same after a
        # resume as before it, whatever order the training data comes in: kept on disk.
        saved = output / "work" / "calibration.npy"
        if saved.is_file() and self.state["done"]:
            self.calibration = np.load(saved)
        else:
            self.calibration = np.concatenate(self.batches)[:256]
        self.candidates: list[Candidate] = [Candidate(**c) for c in self.state["candidates"]]

    # -- bookkeeping --------------------------------------------------------

    def _load_state(self, fingerprint: str) -> dict:
        if self.output.exists() and not self.output.is_dir():
            raise ConfigError(f"output {self.output} is a file; pass a folder for the work, "
                              "the report and the chosen artifacts.")
        path = self.output / "state.json"
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{path} is unreadable (not the JSON optimize writes); "
                                  "delete the folder to start over, or pass another output."
                                  ) from None
            if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{self.output} holds an optimize run of another model, data or settings; "
                    "pass a new output folder, or delete this one to start over.")
            self.say(f"resuming from {path} ({len(state['done'])} step(s) done)")
            return state
        if self.output.exists() and any(self.output.iterdir()):
            raise ConfigError(f"output {self.output} exists and is not an optimize run's folder; "
                              "pass a new or empty folder.")
        return {"fingerprint": fingerprint, "done": {}, "candidates": []}

    def save_state(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        self.state["candidates"] = [dataclasses.asdict(c) for c in self.candidates]
        partial = self.output / ".state.json.partial"
        partial.write_text(json.dumps(self.state, indent=1, default=float))
        partial.replace(self.output / "state.json")

    def say(self, message: str) -> None:
        """A progress line: on stderr with ``verbose`` (as Keras' progress bars), else logged."""
        if not self.verbose:
            logger.info("%s", message)
            return
        from tqdm.auto import tqdm

        elapsed = time.monotonic() - self.started
        tqdm.write(f"[optimize {elapsed:6.0f}s] {message}", file=sys.stderr)

    def check_time(self) -> None:
        if self.budget_seconds is not None and \
                time.monotonic() - self.started > self.budget_seconds:
            raise _OutOfTime()

    def step(self, key: str, work):
        """``work()``'s JSON-able result, from the state if a previous run finished it."""
        if key in self.state["done"]:
            return self.state["done"][key]
        self.check_time()
        value = work()
        self.state["done"][key] = value
        self.save_state()
        return value

    def save_model(self, model, name: str) -> str:
        self.work.mkdir(parents=True, exist_ok=True)
        final, partial = self.work / f"{name}.keras", self.work / f".{name}.partial.keras"
        model.save(partial)
        partial.replace(final)
        return str(final.relative_to(self.output))

    def load_model(self, relative: str):
        return keras.models.load_model(self.output / relative)

    # -- the search ---------------------------------------------------------

    def run(self) -> OptimizeResult:
        fresh = not self.state["done"]
        self.work.mkdir(parents=True, exist_ok=True)
        if fresh:
            np.save(self.work / "calibration.npy", self.calibration)
        self.save_state()
        self.say(f"target: {self.target.describe()}; budget: {self.settings['metric']} -"
                 f"{self.settings['max_accuracy_drop']:g}")
        message = ""
        try:
            try:
                self.baseline()
                self.check_reachable()
            except ConfigError:
                if fresh:  # a target refused: leave nothing that would block the next call
                    shutil.rmtree(self.output, ignore_errors=True)
                raise
            self.sensitivity_phase()
            message = self.rounds()
        except _OutOfTime:
            message = (f"budget_seconds={self.budget_seconds:g} ran out; returning the best "
                       "candidate found so far")
            self.say(message)
        return self.finish(message)

    def baseline(self) -> None:
        self.dense = self.state["done"].get("baseline")

        def dense():
            metric = self.evaluation.keras(self.model)
            counts = _flops.count(self.model)
            self.say(f"baseline: dense {self.settings['metric']} {metric:.4f}, "
                     f"{_flops.human(counts.flops)} FLOPs; exporting and timing it")
            return {"metric": metric, "flops": counts.flops, "params": counts.params}

        self.dense = self.step("baseline", dense)
        self.dense_fp32 = self.measure_candidate("dense fp32", self.model, {}, "fp32", [],
                                                 distilled=False)
        self.dense["latency_ms"] = self.dense_fp32.latency_ms
        self.dense_runner = _measure.engine_runner(self.output / self.dense_fp32.directory,
                                                   self.target)

        def dense_int8():
            from tfopt.quantization import quantize

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qat = quantize(_evaluate.copy(self.model), calibration_data=self.calibration)
            self.save_model(qat, "dense-int8")
            return self.measure_candidate("dense int8 (calibrated)", qat, {}, "int8", [],
                                          distilled=False, keras_model=self.model).name

        self.step("dense int8", dense_int8)
        int8 = self.find("dense int8 (calibrated)")
        if math.isnan(int8.latency_ms):
            self.int8_gain = 1.0
            self.say("baseline: the calibrated INT8 export was refused; speed-ups are predicted "
                     "without INT8 until a fine-tuned INT8 file passes")
        else:
            self.int8_gain = int8.speedup
            self.say(f"baseline: dense FP32 {self.dense_fp32.latency_ms:.3f} ms, calibrated "
                     f"INT8 {int8.latency_ms:.3f} ms ({self.int8_gain:.2f}x side by side) on "
                     f"{self.target.engine}, INT8 {self.settings['metric']} {int8.metric:.4f}")

    def check_reachable(self) -> None:
        """Refuse, before any training, a target that the smallest model cannot reach."""
        from tfopt.errors import NothingToPruneError

        try:
            wrapped, groups = _sensitivity.channel_model(self.model, self.max_fraction)
        except NothingToPruneError:
            wrapped, groups = None, {}
            self.say("no channel group can be pruned in this model; INT8 only")
        self.group_names = list(groups)
        if not groups:
            if wrapped is not None:
                self.say("every channel group is too small to lose channels (8 or fewer); "
                         "INT8 only")
            return
        smallest = {name: self.max_fraction for name in groups}
        point = self.point_info(smallest, "smallest")
        if self.target.flops is not None and point["flops"] > self.target.flops:
            raise ConfigError(
                f"Target(flops={self.target.flops:g}) cannot be reached: with "
                f"{self.max_fraction:.0%} of every channel group removed (the most tfopt "
                f"removes), the model keeps {point['flops']:.0%} of its FLOPs. Ask for "
                f"flops >= {point['flops']:.2f}, or pass larger fractions.")
        if self.target.flops is None and not self.reachable(point, slack=2.0):
            raise ConfigError(
                f"The target ({self.target.describe()}) is out of reach: with "
                f"{self.max_fraction:.0%} of every channel group removed the model runs in "
                f"{point['latency_ms']:.3f} ms in FP32 ({point['speedup']:.2f}x the dense "
                f"model), about {point['speedup'] * max(self.int8_gain, 1.0):.2f}x with INT8 "
                f"({self.int8_gain:.2f}x on the dense model): not within a factor of 2 of the "
                "target. Ask for less.")

    def reachable(self, point: dict, slack: float = 1.0) -> bool:
        """Whether a path point, quantized, is predicted to meet the latency target (within
        a factor ``slack``)."""
        gain = max(self.int8_gain, 1.0)
        if self.target.speedup is not None:
            return point["speedup"] * gain * slack >= self.target.speedup
        return point["latency_ms"] / gain <= self.target.latency_ms * slack

    def point_info(self, fractions: dict, key: str) -> dict:
        """FLOPs and params of the model stripped to ``fractions``; its FP32 latency for
        latency targets. Saved under ``key``."""

        def work():
            wrapped, _ = _sensitivity.channel_model(self.model, self.max_fraction)
            small = _sensitivity.stripped_at(wrapped, fractions, self.max_fraction)
            counts = _flops.count(small)
            info = {"flops": counts.flops / max(self.dense["flops"], 1),
                    "params": counts.params}
            if self.target.flops is None:
                measured = _measure.export_and_measure(
                    small, self.work / f"point-{key}", self.target, self.evaluation,
                    calibration=self.calibration, reference=self.dense_runner, seconds=0.5)
                info["latency_ms"] = measured.latency_ms
                info["speedup"] = measured.speedup
                shutil.rmtree(measured.directory, ignore_errors=True)
            return info

        return self.step(f"point {key}", work)

    def sensitivity_phase(self) -> None:
        path = self.output / "sensitivity.json"
        if path.is_file():
            self.sensitivity = Sensitivity.from_dict(json.loads(path.read_text()))
        else:
            self.sensitivity = Sensitivity(self.evaluation.name, self.dense["metric"],
                                           self.dense["flops"], {})
        if len(self.sensitivity.groups) < len(self.group_names):
            self.say(f"sensitivity: {len(self.group_names)} channel group(s) x "
                     f"{len(self.fractions)} fractions, BatchNorm re-estimated on "
                     f"{len(self.batches)} batches")

            def progress(result):
                result.save(path)
                self.check_time()

            _sensitivity.measure_groups(self.sensitivity, self.model, self.evaluation,
                                        self.batches, self.fractions, self.say, done=progress)
        self.path = allocation_path(self.sensitivity, self.group_names, self.max_fraction)

    def predicted_ok(self, index: int) -> bool:
        info = self.point_info(self.path[index], f"p{index}")
        if self.target.flops is not None:
            return info["flops"] <= self.target.flops
        gain = self.int8_gain / AIM_HEADROOM  # aim past the target: timings vary
        if self.target.speedup is not None:
            return info["speedup"] * gain >= self.target.speedup
        return info["latency_ms"] / gain <= self.target.latency_ms

    def first_meeting(self, low: int, high: int) -> int:
        """The first path point in [low, high] predicted to meet the target (else high)."""
        while low < high:
            middle = (low + high) // 2
            if self.predicted_ok(middle):
                high = middle
            else:
                low = middle + 1
        return low

    def rounds(self) -> str:
        last = len(self.path) - 1
        if last == 0:  # nothing to prune: INT8 of the dense model, layers to float as needed
            self.quantize_within_budget(0, self.model, self.dense_fp32)
            return "target met" if any(c.meets_target and c.within_budget
                                       for c in self.candidates) else \
                "no channels can be pruned, and INT8 alone does not meet the target"
        good, bad = 0, last + 1  # the path points known to hold / to break the budget
        # The scan's drops, summed over groups, overstate what fine-tuning leaves, but a
        # point they put far past the budget is a poor first try: start no further.
        budget = self.settings["max_accuracy_drop"]
        predicted = [sum(self.sensitivity.drop(g, f) for g, f in point.items())
                     for point in self.path]
        cap = max([1] + [i for i, d in enumerate(predicted)
                         if d <= max(START_DROP_FACTOR * budget, START_DROP_FLOOR)])
        index = self.first_meeting(1, min(cap, last))
        for round_ in range(self.max_rounds):
            self.say(f"round {round_ + 1}/{self.max_rounds}: path point {index}/{last} "
                     f"(predicted {self.point_info(self.path[index], f'p{index}')['flops']:.0%} "
                     "of the FLOPs)")
            pruned = self.recover(index)
            fp32 = self.measure_candidate(f"p{index} fp32", pruned, self.path[index], "fp32", [],
                                          distilled=self.settings["distillation"])
            if not fp32.within_budget:
                bad = index
                if index - good <= 1:
                    return (f"pruning past path point {good} costs more than the budget "
                            f"({fp32.drop:+.4f} at point {index})")
                index = (good + index) // 2
                continue
            good = index
            best = self.quantize_within_budget(index, pruned, fp32)
            if best.meets_target:
                # met: the rounds left look for a faster model within the budget
                if bad - index <= 1 or round_ + 1 == self.max_rounds:
                    return "target met"
                index = (index + bad) // 2
                continue
            if bad - index <= 1:
                return (f"the target needs more pruning than the budget allows (point "
                        f"{index + 1} was over it)" if bad <= last else
                        "the target needs more than removing "
                        f"{self.max_fraction:.0%} of every group")
            if self.target.flops is None and best.precision == "int8":
                self.int8_gain = best.speedup / fp32.speedup  # this model's, measured
            elif best.precision == "fp32":
                self.int8_gain = 1.0
            # on toward the smaller models, at most halfway to the first known over budget
            index = max(index + 1, min(self.first_meeting(index + 1, bad - 1),
                                       (index + bad) // 2))
        if any(c.meets_target and c.within_budget for c in self.candidates):
            return "target met"
        return f"max_rounds={self.max_rounds} reached before the target was met"

    def recover(self, index: int):
        fractions = self.path[index]

        def work():
            self.say(f"recovery: pruning to path point {index} in fit() for "
                     f"{self.settings['epochs']} epoch(s)"
                     + (", the dense model as teacher" if self.settings["distillation"] else ""))
            model = recover(self.model, fractions, self.max_fraction, self.dataset,
                            epochs=self.settings["epochs"],
                            learning_rate=self.settings["learning_rate"], loss=self.task_loss,
                            teacher=self.model if self.settings["distillation"] else None,
                            alpha=self.settings["alpha"],
                            temperature=self.settings["temperature"],
                            verbose=2 if self.verbose >= 2 else 0)
            return self.save_model(model, f"p{index}-pruned")

        return self.load_model(self.step(f"recover p{index}", work))

    def quantize_within_budget(self, index: int, pruned, fp32: Candidate) -> Candidate:
        """INT8 of the pruned model; layers back to float, most sensitive first, if needed."""
        float_layers: list[str] = []
        tried = 0
        while True:
            candidate = self.qat_candidate(index, pruned, float_layers)
            if candidate.within_budget or candidate.precision != "int8":
                break
            order = self.layer_order(index, pruned)
            count = 1 if not float_layers else 2 * len(float_layers)
            tried += 1
            if tried > 3 or count >= len(order):
                self.say(f"accuracy control: INT8 stays over budget with {len(float_layers)} "
                         "layer(s) in float; keeping the pruned model in FP32")
                break
            float_layers = order[:count]
            self.say(f"accuracy control: INT8 drop {candidate.drop:+.4f} is over budget; "
                     f"keeping {', '.join(float_layers)} in float")
        within = [c for c in (fp32, candidate) if c.within_budget]
        return max(within, key=lambda c: c.speedup) if within else fp32

    def layer_order(self, index: int, pruned) -> list[str]:
        def work():
            result = Sensitivity(self.evaluation.name, self.evaluation.keras(pruned), 0, {})
            self.say("accuracy control: measuring each layer's INT8 cost")
            _sensitivity.measure_layers(result, pruned, self.evaluation, self.batches, self.say)
            return {"layers": result.layers, "all": result.quantized_metric}

        found = self.step(f"layers p{index}", work)
        self.sensitivity.layers = found["layers"]
        self.sensitivity.quantized_metric = found["all"]
        return sorted(found["layers"], key=lambda name: -found["layers"][name])

    def qat_candidate(self, index: int, pruned, float_layers: list) -> Candidate:
        suffix = f" ({len(float_layers)} float)" if float_layers else ""
        name = f"p{index} int8{suffix}"

        def work():
            self.say(f"QAT: {name}, {self.settings['qat_epochs']} epoch(s)")
            qat = quantize_and_train(pruned, self.dataset, self.calibration, float_layers,
                                     epochs=self.settings["qat_epochs"],
                                     learning_rate=self.settings["learning_rate"]
                                     * QAT_LEARNING_RATE_FACTOR,
                                     loss=self.task_loss,
                                     teacher=self.model if self.settings["distillation"] else None,
                                     alpha=self.settings["alpha"],
                                     temperature=self.settings["temperature"],
                                     verbose=2 if self.verbose >= 2 else 0)
            self.save_model(qat, f"p{index}-int8-{len(float_layers)}float")
            return self.measure_candidate(name, qat, self.path[index], "int8", float_layers,
                                          distilled=self.settings["distillation"],
                                          keras_model=pruned).name

        self.step(f"qat {name}", work)
        return self.find(name)

    def find(self, name: str) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.name == name), None)

    def measure_candidate(self, name: str, model, fractions: dict, precision: str,
                          float_layers: list, *, distilled: bool, keras_model=None) -> Candidate:
        """Export, score and time ``model`` on the engine; the candidate (saved in state)."""
        found = self.find(name)
        if found is not None:
            return found
        self.check_time()
        directory = self.work / name.replace(" ", "-").replace("(", "").replace(")", "")
        plain = keras_model if keras_model is not None else model
        counts = _flops.count(plain)
        flops = counts.flops / max(self.dense["flops"], 1)
        try:
            measured = _measure.export_and_measure(
                model, directory, self.target, self.evaluation, calibration=self.calibration,
                reference=getattr(self, "dense_runner", None))
        except ExportValidationError as exc:
            if precision != "int8":
                raise
            # The INT8 file would not compute what the QAT model does: not a candidate
            # to serve, and what accuracy control acts on (layers go back to float).
            note = f"export refused: {' '.join(str(exc).split())[:300]}"
            measured = _measure.Measured(directory, None, math.nan, math.nan,
                                         self.evaluation.keras(model), 0.0)
        else:
            note = ""
        drop = self.dense["metric"] - measured.metric
        speedup = measured.speedup
        if self.target.flops is not None:
            meets = flops <= self.target.flops and not note
        elif self.target.speedup is not None:
            meets = speedup >= self.target.speedup
        else:
            meets = measured.latency_ms <= self.target.latency_ms
        candidate = Candidate(
            name=name, fractions={k: float(v) for k, v in fractions.items() if v},
            widths=_widths(plain), precision=precision, float_layers=list(float_layers),
            flops=flops, params=counts.params, metric=measured.metric, drop=drop,
            latency_ms=measured.latency_ms, speedup=speedup, size_mb=measured.size_mb,
            within_budget=not note and drop <= self.settings["max_accuracy_drop"] + 1e-9,
            meets_target=meets, distilled=distilled,
            directory=str(directory.relative_to(self.output)), note=note)
        self.candidates.append(candidate)
        self.save_state()
        self.say(f"candidate {name}: {note}" if note else
                 f"candidate {name}: {self.settings['metric']} {candidate.metric:.4f} "
                 f"({drop:+.4f}), {candidate.latency_ms:.3f} ms ({speedup:.2f}x), "
                 f"{flops:.0%} FLOPs{'' if candidate.within_budget else ', over budget'}")
        return candidate

    # -- the answer ---------------------------------------------------------

    def finish(self, message: str) -> OptimizeResult:
        within = [c for c in self.candidates if c.within_budget]
        if not within:  # only when time ran out before the dense model was measured
            raise ConfigError(f"{message}, before the dense model was exported and timed: "
                              "give budget_seconds more time (call again with the same "
                              "output to go on).")
        meeting = [c for c in within if c.meets_target]
        # speed-ups, each timed side by side with the dense file, compare across the
        # search; milliseconds timed minutes apart need not
        chosen = max(meeting or within, key=lambda c: c.speedup)
        model, qat = self.models_of(chosen)
        self.say(f"exporting {chosen.name} to {self.output / 'export'}")
        from tfopt.export import export

        formats = ("saved_model",) + _measure.formats_for(self.target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = export(qat if qat is not None else model, self.output / "export",
                              formats=formats, validation_data=self.calibration, overwrite=True)
        speedup, chosen_ms = self.side_by_side(chosen)
        if self.target.flops is not None:
            target_met = chosen.flops <= self.target.flops
        elif self.target.speedup is not None:
            target_met = speedup >= self.target.speedup
        else:
            target_met = chosen_ms <= self.target.latency_ms
        if target_met:
            message = "target met"
        elif chosen.meets_target:
            message = (f"{chosen.name} met the target when it was measured "
                       f"({chosen.speedup:.2f}x, {chosen.latency_ms:.3f} ms) but not in the final "
                       f"timing ({speedup:.2f}x, {chosen_ms:.3f} ms)")
        elif not message or message == "target met":
            message = "no candidate within the budget met the target"
        result = OptimizeResult(model=model, qat_model=qat, export=exported,
                                candidates=list(self.candidates), chosen=chosen,
                                baseline=dict(self.dense), speedup=speedup,
                                target_met=target_met, message=message,
                                sensitivity=self.sensitivity if hasattr(self, "sensitivity")
                                else Sensitivity(self.evaluation.name, self.dense["metric"],
                                                 self.dense["flops"], {}),
                                target=self.target,
                                max_accuracy_drop=self.settings["max_accuracy_drop"],
                                metric_name=self.evaluation.name, output=self.output)
        write_report(result)
        self.say(result.summary())
        return result

    def models_of(self, chosen: Candidate):
        """The chosen candidate's plain model and QAT model (None for FP32)."""
        if not chosen.fractions:  # nothing pruned: the dense model
            model = _evaluate.copy(self.model)
        else:
            index = chosen.name.split()[0]
            model = self.load_model(f"work/{index}-pruned.keras")
        if chosen.precision != "int8":
            return model, None
        if chosen.name.startswith("dense"):
            return model, self.load_model("work/dense-int8.keras")
        index = chosen.name.split()[0]
        return model, self.load_model(f"work/{index}-int8-{len(chosen.float_layers)}float.keras")

    def side_by_side(self, chosen: Candidate) -> tuple[float, float]:
        """Dense FP32 against the chosen file, timed interleaved: the speed-up reported,
        and the chosen file's median milliseconds."""
        best = _measure.engine_runner(self.output / "export", self.target)
        batch = _measure.batch_of(self.evaluation.x, self.target.batch_size)
        chosen_ms, dense_ms = _measure.time_pair(best, self.dense_runner, batch, seconds=3.0)
        ratio = dense_ms / chosen_ms
        self.say(f"side by side on {self.target.engine}: dense FP32 {dense_ms:.3f} ms, "
                 f"{chosen.name} {chosen_ms:.3f} ms: {ratio:.2f}x")
        return ratio, chosen_ms


def allocation_path(sensitivity: Sensitivity, groups: Sequence[str], max_fraction: float,
                    step: float = STEP) -> list[dict]:
    """Per-group fractions from none removed to ``max_fraction`` of every group removed.

    Each point removes ``step`` more of one group: the group whose next step
    saves the most FLOPs per unit of predicted metric lost (the sensitivity
    scan's drops, interpolated, each at least 1e-4 so that free steps are
    ordered by the FLOPs they save).
    """
    levels = int(math.floor(max_fraction / step + 1e-9))
    current = {name: 0.0 for name in groups}
    path = [dict(current)]
    while True:
        best, best_score = None, -1.0
        for name in groups:
            level = round(current[name] / step)
            if level >= levels:
                continue
            nxt = min((level + 1) * step, max_fraction)
            lost = max(sensitivity.drop(name, nxt) - sensitivity.drop(name, current[name]), 0.0)
            saved = sensitivity.saved(name, nxt) - sensitivity.saved(name, current[name])
            score = saved / (lost + 1e-4)
            if score > best_score:
                best, best_score = (name, nxt), score
        if best is None:
            return path
        current[best[0]] = best[1]
        path.append(dict(current))


def _widths(model) -> dict:
    widths = {}
    for layer in model.layers:
        for attribute in ("filters", "units"):
            if isinstance(getattr(layer, attribute, None), int):
                widths[layer.name] = getattr(layer, attribute)
    return widths


def _steps(dataset) -> int:
    steps = int(dataset.cardinality())
    return steps if steps > 0 else sum(1 for _ in dataset)


def _fit(model, dataset, *, epochs: int, learning_rate: float, loss, teacher, alpha: float,
         temperature: float, verbose: int, callbacks=()):
    trained = Distiller(model, teacher, alpha=alpha, temperature=temperature) \
        if teacher is not None else model
    trained.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    trained.fit(dataset, epochs=epochs, verbose=verbose, callbacks=list(callbacks),
                shuffle=False)  # the dataset shuffles itself


def recover(model, fractions: dict, max_fraction: float, dataset, *, epochs: int,
            learning_rate: float, loss, teacher=None, alpha: float = 0.5,
            temperature: float = 4.0, verbose: int = 0):
    """``model`` pruned to ``fractions`` of each channel group in ``fit()``, stripped.

    The channels go gradually over the first half of ``epochs`` (a
    polynomial schedule scaled to each group's fraction), and training goes
    on for the second half at the final widths; with a ``teacher``, through
    a :class:`Distiller`. ``model`` is not changed.
    """
    from tfopt.callbacks import PruningStep
    from tfopt.pruning import PolynomialDecay, prune
    from tfopt.pruning import _channels
    from tfopt.strip import strip

    if not any(fractions.values()):
        return _evaluate.copy(model)
    end = max(1, _steps(dataset) * epochs // 2)
    schedule = PolynomialDecay(0.0, max_fraction, begin_step=0, end_step=end,
                               frequency=max(1, end // 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups tfopt cannot follow were reported already
        wrapped = prune(_evaluate.copy(model), schedule, structure="channels")
    _channels.set_group_fractions(wrapped, fractions)
    _fit(wrapped, dataset, epochs=epochs, learning_rate=learning_rate, loss=loss,
         teacher=teacher, alpha=alpha, temperature=temperature, verbose=verbose,
         callbacks=[PruningStep()])
    return strip(wrapped)


def quantize_and_train(model, dataset, calibration, float_layers: Sequence[str], *, epochs: int,
                       learning_rate: float, loss, teacher=None, alpha: float = 0.5,
                       temperature: float = 4.0, verbose: int = 0):
    """The QAT model of ``model`` (``float_layers`` left in float), calibrated, fine-tuned."""
    from tfopt.quantization import quantize

    keep = set(float_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays float is in the candidate's record
        qat = quantize(_evaluate.copy(model), calibration_data=calibration,
                       layers=(lambda layer: layer.name not in keep) if keep else None)
    if epochs:
        _fit(qat, dataset, epochs=epochs, learning_rate=learning_rate, loss=loss,
             teacher=teacher, alpha=alpha, temperature=temperature, verbose=verbose)
    return qat


def write_report(result: OptimizeResult) -> None:
    """``report.md``, ``candidates.json`` and ``pareto.png`` in the output folder."""
    output = result.output
    (output / "candidates.json").write_text(json.dumps(
        {"baseline": result.baseline, "chosen": result.chosen.name, "speedup": result.speedup,
         "target": dataclasses.asdict(result.target), "target_met": result.target_met,
         "message": result.message, "candidates": [dataclasses.asdict(c)
                                                   for c in result.candidates]},
        indent=1, default=float))
    plotted = _pareto_plot(result, output / "pareto.png")
    from tfopt.targets._cpu_int8 import describe_cpu

    lines = [f"# tfopt.optimize: {result.summary()}", "", describe_cpu(), "",
             f"Target: {result.target.describe()}. Budget: {result.metric_name} may drop by "
             f"{result.max_accuracy_drop:g} from the dense model's "
             f"{result.baseline['metric']:.4f}. Outcome: {result.message}.", "",
             "Every candidate was exported, scored on the validation data by the engine and "
             "timed there (median, apart); the headline speed-up was timed side by side with "
             "the dense FP32 file.", "", result.table(), ""]
    refused = [c for c in result.candidates if c.note]
    if refused:
        lines += ["Not usable:", ""] + [f"- {c.name}: {c.note}" for c in refused] + [""]
    if plotted:
        lines += ["![metric against latency](pareto.png)", ""]
    sensitivity = result.sensitivity
    if sensitivity.groups:
        reference = sensitivity.baseline if sensitivity.recalibrated is None \
            else sensitivity.recalibrated
        lines += ["## Sensitivity", "", "Each channel group alone, its BatchNorm statistics "
                  f"re-estimated on training batches; drops are counted from {reference:.4f}, "
                  "the dense model after the same re-estimation.", "", sensitivity.table(), ""]
    (output / "report.md").write_text("\n".join(lines))


def _pareto_plot(result: OptimizeResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    points = sorted((c for c in result.candidates if not c.note), key=lambda c: c.latency_ms)
    front, best = [], -math.inf
    for c in points:
        if c.metric > best:
            front.append(c)
            best = c.metric
    figure, axes = plt.subplots(figsize=(6, 4))
    for precision, marker in (("fp32", "o"), ("int8", "s")):
        chosen = [c for c in points if c.precision == precision]
        axes.scatter([c.latency_ms for c in chosen], [c.metric for c in chosen], marker=marker,
                     label=precision.upper(), alpha=0.7)
    axes.plot([c.latency_ms for c in front], [c.metric for c in front], "k--", lw=1,
              label="Pareto front")
    axes.scatter([result.chosen.latency_ms], [result.chosen.metric], s=160, facecolors="none",
                 edgecolors="red", label="chosen")
    axes.axhline(result.baseline["metric"] - result.max_accuracy_drop, color="grey", lw=0.8,
                 ls=":", label="budget")
    axes.set_xlabel(f"latency on {result.target.engine}, batch {result.target.batch_size} (ms)")
    axes.set_ylabel(result.metric_name)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True

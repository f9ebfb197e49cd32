"""What `tfopt run` does with a recipe: train, prune, quantize, export, measure, report."""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np

import tfopt
from tfopt import _recipe, distribute
from tfopt.targets import _cpu_int8
from tfopt._recipe import Recipe, RecipeError
from tfopt.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)


def _model_factory(spec: dict, beside: Optional[Path] = None):
    """``(callable, args, label)`` that builds the recipe's model; nothing is built yet."""
    source, args = spec["source"], dict(spec.get("args") or {})
    if source == "digits_cnn":
        from tfopt.examples import digits_cnn

        return digits_cnn, args, "digits_cnn"
    if source.startswith("keras.applications."):
        name = source.rsplit(".", 1)[1]
        factory = getattr(keras.applications, name, None)
        if factory is None or not callable(factory) or name.startswith("_"):
            raise RecipeError(f"model.source: keras.applications has no {name!r}. Use a name "
                              "like keras.applications.MobileNetV2.")
        if "input_shape" in args and isinstance(args["input_shape"], list):
            args["input_shape"] = tuple(args["input_shape"])
        return factory, args, source
    if source.endswith(".keras"):
        if args:
            raise RecipeError(f"model.args {sorted(args)}: a .keras file takes no arguments; "
                              "remove model.args.")
        if not Path(source).is_file():
            raise RecipeError(f"model.source: no file {source!r}. Give the path of a .keras "
                              "model, relative to where tfopt runs.")
        return keras.models.load_model, {"filepath": source}, source
    if ":" in source:
        return _recipe.import_entry_point(source, beside), args, source
    raise RecipeError(
        f"model.source {source!r}: use 'digits_cnn', 'keras.applications.NAME', a .keras "
        "file, or 'module:function'.")


def _synthetic(shape=(8, 8, 1), classes=10, train_samples=64, test_samples=32, seed=0):
    rng = np.random.default_rng(seed)

    def make(n):
        return (rng.uniform(size=(n, *shape)).astype("float32"),
                rng.integers(0, classes, n).astype("int32"))

    return make(train_samples), make(test_samples)


def _check_synthetic(args: dict) -> dict:
    from tfopt import _checks

    args = dict(args)
    try:
        if "shape" in args:
            shape = args["shape"]
            if not isinstance(shape, list) or not shape:
                raise ConfigError(f"shape must be a list of positive integers, got {shape!r}")
            args["shape"] = tuple(_checks.number("data.args.shape item", d, low=1, high=4096,
                                                 integer=True) for d in shape)
        for key, low in (("classes", 2), ("train_samples", 1), ("test_samples", 1),
                         ("seed", 0)):
            if key in args:
                args[key] = _checks.number(f"data.args.{key}", args[key], low=low,
                                           high=10_000_000, integer=True)
    except ConfigError as exc:
        raise RecipeError(f"data (synthetic): {exc}") from None
    return args


def _data_factory(spec: dict, beside: Optional[Path] = None):
    source, args = spec["source"], dict(spec.get("args") or {})
    if source == "digits":
        return tfopt.datasets.load_digits, args, "digits"
    if source == "synthetic":
        return _synthetic, args, "synthetic"
    if source == "image_folder":
        directory = args.get("directory")
        if isinstance(directory, str) and beside is not None and not Path(directory).exists() \
                and (beside / directory).exists():
            args["directory"] = str(beside / directory)  # relative to the recipe's folder
        return tfopt.datasets.image_folder, args, "image_folder"
    if ":" in source:
        return _recipe.import_entry_point(source, beside), args, source
    raise RecipeError(f"data.source {source!r}: use 'digits', 'synthetic', 'image_folder' or "
                      "'module:function'.")


def _check_arguments(section: str, factory, args: dict, label: str) -> None:
    """``section.args`` must fit the factory's signature: checked before any work."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let it say
        return
    try:
        signature.bind(**args)
    except TypeError as exc:
        accepted = [n for n, p in signature.parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise RecipeError(
            f"{section}.args do not fit {label}: {exc}. It accepts: "
            f"{', '.join(accepted) or 'no arguments'}; fix or remove the others.") from None


def check_ready(recipe: Recipe) -> None:
    """Everything that can fail before training, checked before training.

    Model and data factories are resolved (their modules imported) and their
    arguments bound to their signatures; the backends that the export needs
    (TensorRT and a GPU, TF-TRT, Triton's protobufs) are looked up.
    """
    spec = recipe.spec
    beside = recipe.path.parent
    prune, finetune = spec.get("prune"), spec.get("finetune")
    if finetune and prune and prune.get("structure") != "channels":
        raise RecipeError(
            "finetune: trains the stripped model, whose pruned weights would grow back: it "
            "follows channel pruning (prune.structure: channels), which removes them. For "
            "unstructured or 2:4 pruning, train longer inside pruning (prune.epochs).")
    factory, args, label = _model_factory(spec["model"], beside)
    if factory is not keras.models.load_model:
        _check_arguments("model", factory, args, label)
    factory, args, label = _data_factory(spec["data"], beside)
    if factory is _synthetic:
        _check_synthetic(args)
    _check_arguments("data", factory, args, label)
    formats = (spec.get("export") or {}).get("formats", ())
    from tfopt import _compat

    if "tensorrt" in formats:
        _compat.import_tensorrt()
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            raise BackendUnavailableError(
                "export.formats lists tensorrt, which builds its engine on a GPU, and "
                "TensorFlow sees none here. Run the recipe on a machine with an NVIDIA GPU, "
                "or remove tensorrt from export.formats.")
    if "tftrt" in formats and not _compat.tensorflow_has_tensorrt():
        raise BackendUnavailableError(
            "export.formats lists tftrt, but this TensorFlow was built without TensorRT "
            "(true of every pip build since 2.18). Use the tensorrt format instead.")
    if "triton" in formats:
        from tfopt.export import _triton

        _triton._model_config_pb2()
    if (spec.get("export") or {}).get("image_signatures") and "saved_model" not in formats:
        raise RecipeError("export.image_signatures are SavedModel signatures: add saved_model "
                          "to export.formats.")
    if "openvino" in formats and not _openvino_available():
        raise BackendUnavailableError(
            "export.formats lists openvino, which is not installed: pip install openvino, "
            "or remove openvino from export.formats.")


def load_model(spec: dict, beside: Optional[Path] = None) -> keras.Model:
    factory, args, label = _model_factory(spec, beside)
    return factory(**args)


def load_data(spec: dict, beside: Optional[Path] = None):
    factory, args, label = _data_factory(spec, beside)
    if factory is _synthetic:
        args = _check_synthetic(args)
    try:
        return factory(**args)
    except ConfigError as exc:
        raise RecipeError(f"data ({label}): {exc}") from None


class _Data:
    """The recipe's data: arrays ``((x, y), (x_test, y_test))`` or ``(train, validation)``
    datasets of ``(inputs, labels)`` batches (``image_folder``, or a ``module:function``
    that returns them). Datasets are streamed, never loaded whole."""

    def __init__(self, loaded, source: str):
        from tfopt import _data

        self.source = source
        try:
            first, second = loaded
        except (TypeError, ValueError):
            first = second = None
        if _data.is_dataset(first) and _data.is_dataset(second):
            self.train, self.test = first, second
            self.streamed = True
            for name, dataset in (("training", first), ("validation", second)):
                if not _data.is_labelled(dataset):
                    raise RecipeError(f"data.source {source!r}: the {name} dataset must yield "
                                      "(inputs, labels) batches, as fit() takes.")
            return
        self.streamed = False
        try:
            (x, y), (x_test, y_test) = loaded
            if len(x) != len(y) or len(x_test) != len(y_test) or not len(x) or not len(x_test):
                raise ValueError("lengths")
        except (TypeError, ValueError):
            raise RecipeError(
                f"data.source {source!r} must return ((x, y), (x_test, y_test)), non-empty "
                "arrays with one label per row, or (train, validation) tf.data.Datasets of "
                "(inputs, labels) batches.") from None
        self.train, self.test = (x, y), (x_test, y_test)

    def check_model(self, model) -> None:
        """Refuse, before any training, data the model cannot take or classes it lacks."""
        inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
        if self.streamed:
            import tensorflow as tf

            spec = tf.nest.flatten(self.train.element_spec[0])[0]
            given, classes = tuple(spec.shape[1:]), getattr(self.train, "class_names", None)
            count = len(classes) if classes else None
        else:
            given = tuple(np.shape(self.train[0])[1:])
            labels = np.asarray(self.train[1])
            count = int(labels.max()) + 1 if labels.dtype.kind in "iu" and labels.ndim == 1 \
                else None
        if inputs and len(inputs) == 1:
            wanted = tuple(inputs[0].shape[1:])
            if len(wanted) != len(given) or any(w is not None and g is not None and w != g
                                                for w, g in zip(wanted, given)):
                hint = (f" Set data.args.image_size to [{wanted[0]}, {wanted[1]}]."
                        if self.source == "image_folder" and len(wanted) == 3 else "")
                raise RecipeError(f"data.source {self.source!r} gives inputs of shape {given}, "
                                  f"the model takes {wanted}.{hint}")
        if outputs and count:
            width = outputs[0].shape[-1]
            if width is not None and 1 < width < count or width == 1 and count > 2:
                raise RecipeError(
                    f"data.source {self.source!r} has {count} classes, the model's output has "
                    f"{width}: give the model one output per class (e.g. num_classes: {count} "
                    "in model.args).")

    def fit(self, model, *, epochs: int, batch_size: int, verbose: int, callbacks=()):
        if self.streamed:  # batched by the dataset itself
            return model.fit(self.train, epochs=epochs, verbose=verbose, callbacks=list(callbacks),
                             shuffle=False)  # a dataset shuffles itself (image_folder does)
        x, y = self.train
        return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose,
                         callbacks=list(callbacks))

    def steps_per_epoch(self, batch_size: int) -> int:
        if not self.streamed:
            return math.ceil(len(self.train[0]) / batch_size)
        import tensorflow as tf

        steps = int(self.train.cardinality())
        if steps < 0:  # unknown or infinite: counted by reading it (file names, not images)
            if steps == int(tf.data.INFINITE_CARDINALITY):
                raise RecipeError(f"data.source {self.source!r}: the training dataset repeats "
                                  "forever; give one epoch of it (no .repeat()).")
            steps = sum(1 for _ in self.train)
        return max(1, steps)

    def evaluate(self, model) -> float:
        if self.streamed:
            return float(model.evaluate(self.test, verbose=0)[1])
        return float(model.evaluate(*self.test, verbose=0)[1])

    def inputs(self, samples: int, split: str = "test"):
        """The first ``samples`` inputs of a split, in memory (validation, calibration)."""
        data = self.test if split == "test" else self.train
        if self.streamed:
            from tfopt import _data

            return _data.inputs_from_dataset(data, samples, f"the {split} data")
        return data[0][:samples]

    def bench_inputs(self):
        """What ``tfopt.bench.run`` takes: ``(inputs, labels)``; labels None for a dataset,
        whose own labels are read, and for synthetic data, whose accuracy means nothing."""
        if self.streamed:
            return self.test, None
        return self.test[0], None if self.source == "synthetic" else self.test[1]


class _Stages:
    """Each finished stage's model, saved under ``output/stages`` before the next begins.

    ``state.json`` names the finished stages and the recipe they came from (the
    SHA-256 of its parsed contents): ``tfopt run --resume`` loads the last one and
    goes on from there, refusing if the recipe changed. Models are written to a
    temporary name and renamed, so a kill mid-save leaves the previous state whole.
    """

    def __init__(self, folder: Path, recipe: Recipe, resume: bool):
        import hashlib

        self.folder = folder
        # the recipe as parsed: comments and layout may change, what it asks for may not
        self.recipe_hash = hashlib.sha256(
            json.dumps(recipe.spec, sort_keys=True, default=str).encode()).hexdigest()
        self.finished: list[str] = []
        state = folder / "state.json"
        if resume and state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("recipe_sha256") != self.recipe_hash:
                raise RecipeError(
                    f"--resume: {recipe.path} changed since the run in {folder.parent} "
                    "began; its saved stages came from the old recipe. Run without --resume "
                    "to start again.")
            self.finished = [s for s in saved.get("finished", [])
                             if (folder / f"{s}.keras").is_file()]
        elif resume:
            logger.warning("--resume: nothing to resume in %s; starting from the beginning.",
                           folder)
        elif folder.exists():
            shutil.rmtree(folder)

    def has(self, stage: str) -> bool:
        return stage in self.finished

    def run(self, stage: str, label: str, work, step) -> keras.Model:
        """The model of ``stage``: loaded if a previous run finished it, else
        ``work()``'s, saved before the next stage begins."""
        if self.has(stage):
            step(f"{label}: resumed from stages/{stage}.keras")
            return self.load(stage)
        model = work()
        self.save(stage, model)
        return model

    def load(self, stage: str) -> keras.Model:
        logger.info("Resuming: %s model loaded from %s", stage, self.folder)
        return keras.models.load_model(self.folder / f"{stage}.keras")

    def save(self, stage: str, model) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{stage}.keras"
        partial = self.folder / f".{stage}.partial.keras"
        model.save(partial)
        partial.replace(final)
        self.finished = [s for s in self.finished if s != stage] + [stage]
        state = self.folder / ".state.json.partial"
        state.write_text(json.dumps({"recipe_sha256": self.recipe_hash,
                                     "finished": self.finished}, indent=2))
        state.replace(self.folder / "state.json")


def _compile(model, learning_rate: float):
    last = model.layers[-1]
    last = getattr(last, "layer", last)  # a tfopt wrapper: look at the layer inside
    from_logits = getattr(last, "activation", None) is not keras.activations.softmax
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])
    return model


def run(recipe: Recipe, output: Path, *, verbose: int = 1, resume: bool = False) -> dict:
    """Execute a validated recipe; write the report into ``output``; return metrics.

    Each stage's model is saved under ``output/stages``; with ``resume`` the
    run goes on from the last stage a previous run of the same recipe
    finished (see :class:`_Stages`).
    """
    spec = recipe.spec
    output = Path(output)
    check_ready(recipe)
    worker = distribute.current_worker()
    if not worker.is_chief:  # every worker of a cluster runs the same command
        return {"headline": f"Nothing written to {output}: {worker} is not the chief; the "
                            "chief runs the recipe.", "cpu": _cpu_int8.describe_cpu(),
                "skipped": str(worker)}
    started = time.perf_counter()
    keras.utils.set_random_seed(int(spec.get("seed", 0)))
    model = load_model(spec["model"], recipe.path.parent)
    data = _Data(load_data(spec["data"], recipe.path.parent), spec["data"]["source"])
    data.check_model(model)
    output.mkdir(parents=True, exist_ok=True)  # only once the recipe can run
    metrics: dict = {"recipe": str(recipe.path), "name": spec["name"], "steps": []}
    stages = _Stages(output / "stages", recipe, resume)

    def step(name):
        logger.info("%s: %s", spec["name"], name)
        metrics["steps"].append(name)

    train = spec.get("train") or {}

    def dense_training():
        if train.get("epochs", 0):
            step(f"dense training, {train['epochs']} epoch(s)")
            data.fit(_compile(model, train.get("learning_rate", 1e-3)), epochs=train["epochs"],
                     batch_size=train.get("batch_size", 32), verbose=verbose)
        return model

    model = stages.run("trained", "dense training", dense_training, step)
    # Pruning and QAT share layers with the model they start from (as tfmot
    # does), so the baseline is measured on a copy of its own.
    baseline = keras.models.clone_model(model)
    baseline.set_weights(model.get_weights())
    _compile(baseline, 1e-3)
    metrics["baseline_accuracy"] = data.evaluate(baseline)
    validation = data.inputs(64)  # what every export is checked on
    # The float model as a user serves it today (the SavedModel, on TF Serving's
    # engine) and on each other engine, so the report tells the engine's gain
    # from the optimization's.
    export = spec.get("export") or {}
    formats = tuple(export.get("formats", ("saved_model", "onnx")))  # exactly as listed
    openvino = "openvino" in formats
    baseline_export = tfopt.export(
        baseline, output / "baseline",
        formats=("saved_model", "onnx") + (("openvino",) if openvino else ()),
        validation_data=validation, overwrite=True)

    current = model
    prune = spec.get("prune")
    if prune:
        current = stages.run("pruned", "pruning",
                             lambda: _prune(model, prune, data, step, verbose), step)
        if prune.get("structure") == "channels":
            metrics["channels"] = _channel_counts(baseline, current)
        else:
            metrics["sparsity"] = tfopt.sparsity(current)
    finetune = spec.get("finetune")
    if finetune and finetune.get("epochs", 0):
        def fine_tuning(stripped=current):
            # the stripped (physically smaller, for channels) model, trained as it is served
            step(f"fine-tuning the stripped model, {finetune['epochs']} epoch(s)")
            data.fit(_compile(stripped, finetune.get("learning_rate", 1e-4)),
                     epochs=finetune["epochs"], batch_size=finetune.get("batch_size", 32),
                     verbose=verbose)
            return stripped

        current = stages.run("finetuned", "fine-tuning", fine_tuning, step)
    quantize = spec.get("quantize")
    if quantize:
        current = stages.run("qat", "quantization-aware training",
                             lambda start=current: _quantize(start, quantize, data, step,
                                                             verbose), step)
    if spec.get("optimize"):
        if not resume:  # a fresh run searches afresh; --resume goes on with the search
            shutil.rmtree(output / "optimize", ignore_errors=True)
        found = _optimize(baseline, spec["optimize"], data, output / "optimize", step, verbose)
        current = found.qat_model or found.model
        quantize = found.qat_model is not None
        metrics["optimize"] = {"summary": found.summary(), "message": found.message,
                               "target_met": found.target_met, "table": found.table(),
                               "chosen": found.chosen.name}
        metrics["channels"] = _channel_counts(baseline, found.model)
    if getattr(current, "optimizer", None) is None:
        _compile(current, 1e-3)
    metrics["final_accuracy"] = data.evaluate(current)
    from tfopt import _flops

    metrics["counts"] = {name: {"params": c.params, "flops": c.flops} for name, c in
                         (("baseline", _flops.count(baseline)),
                          ("optimized", _flops.count(current)))}

    precisions = ["int8"] if quantize else list(export.get("precisions", ["fp32"]))
    exports, failures = {}, {}
    for precision in precisions:
        step(f"export {', '.join(formats)} ({precision})")
        result, failed = _export_what_passes(
            current, output / "export" / precision, formats, precision=precision,
            validation_data=validation, opset=export.get("opset", 17), overwrite=True,
            placement=export.get("placement", "onnxruntime"), tolerance=export.get("tolerance"),
            image_signatures=export.get("image_signatures", []))
        if result is not None:
            exports[precision] = result
        if failed:
            failures[precision] = failed
    metrics["exports"] = {p: {"paths": {k: str(v) for k, v in r.paths.items()},
                              "errors": r.errors, "sizes": r.sizes}
                          for p, r in exports.items()}
    if failures:
        metrics["export_failures"] = failures

    bench = spec.get("bench") or {}
    step("benchmark")
    modes = tuple(bench.get("openvino_modes", ("latency", "throughput")))
    runners = tfopt.bench.runners_for(baseline, "baseline keras")
    for fmt, path in baseline_export.paths.items():
        runners += tfopt.bench.runners_for(path, f"baseline {fmt}", openvino_modes=modes)
    for result in exports.values():
        for fmt in ("saved_model", "onnx", "openvino"):
            if fmt in result.paths:
                runners += tfopt.bench.runners_for(result.paths[fmt], f"optimized {fmt}",
                                                   openvino_modes=modes)
    inputs, labels = data.bench_inputs()
    report = tfopt.bench.run(
        runners, inputs, labels=labels,
        batch_sizes=bench.get("batch_sizes", [1, 32]), repeats=bench.get("repeats", 20),
        warmup=bench.get("warmup", 3), min_seconds=bench.get("min_seconds", 0.5),
        progress=bool(verbose), memory=bench.get("memory", True))
    metrics["bench"] = report.to_dict()
    # Each artifact's accuracy, measured on the engine that runs it, on the whole test split.
    metrics["artifacts_accuracy"] = {row.name: row.accuracy for row in report.rows
                                     if row.accuracy is not None}
    metrics["validation_samples"] = report.environment.get("accuracy_samples")
    metrics["seconds"] = time.perf_counter() - started
    _write_report(output, spec, metrics, report, exports, baseline_export)
    return metrics


def _export_what_passes(model, directory: Path, formats: tuple, **kwargs):
    """``tfopt.export`` of every format that passes: one refused artifact (and what is
    converted from it) is left out, the others are exported.

    Returns ``(ExportResult or None, {format: why it is missing})``.
    """
    from tfopt.errors import ExportValidationError
    from tfopt.export._api import DEPENDS

    remaining, failures = list(formats), {}
    while remaining:
        try:
            return tfopt.export(model, directory, formats=tuple(remaining), **kwargs), failures
        except ExportValidationError as exc:
            failed = exc.format
            dropped = [f for f in remaining if f == failed or failed in DEPENDS.get(f, ())]
            if not dropped:  # not one artifact's fault: nothing of this export stands
                failures.update({f: str(exc) for f in remaining})
                return None, failures
            for fmt in dropped:
                failures[fmt] = str(exc) if fmt == failed else (
                    f"not exported: it is converted from {failed}, which failed")
            logger.warning("%s failed validation; exporting %s without it.", failed,
                           ", ".join(f for f in remaining if f not in dropped) or "nothing")
            remaining = [f for f in remaining if f not in dropped]
    return None, failures


def _openvino_available() -> bool:
    from tfopt.artifacts._openvino import available

    return available()


def _prune(model, spec, data, step, verbose):
    epochs = spec.get("epochs", 10)
    batch = spec.get("batch_size", 32)
    steps = data.steps_per_epoch(batch)
    end = max(1, int(spec.get("ramp_fraction", 0.4) * epochs * steps))
    # four updates an epoch, and at least ten over the ramp (PruningStep warns below five)
    frequency = spec.get("frequency", max(1, min(steps // 4, end // 10)))
    if spec.get("schedule", "polynomial_decay") == "constant":
        schedule = tfopt.ConstantSparsity(spec.get("final_sparsity", 0.5), 0, end, frequency)
    else:
        schedule = tfopt.PolynomialDecay(spec.get("initial_sparsity", 0.0),
                                         spec.get("final_sparsity", 0.8), 0, end,
                                         frequency=frequency)
    n_m = tuple(spec["n_m"]) if spec.get("n_m") else None
    channels = spec.get("structure") == "channels"
    step(f"pruning to {schedule.final_sparsity:.0%}{' ' + str(n_m) if n_m else ''}"
         f"{' of channels' if channels else ''}, {epochs} epoch(s)")
    layers = spec.get("layers")
    if spec.get("skip_layers"):
        skip, only = set(spec["skip_layers"]), set(layers or ())
        layers = lambda la: la.name not in skip and (not only or la.name in only)  # noqa: E731
    extra = {"structure": "channels", "importance": spec.get("importance", "l2")} \
        if channels else {}
    pruned = _compile(tfopt.prune(model, schedule, n_m=n_m, layers=layers, **extra),
                      spec.get("learning_rate", 5e-4))
    data.fit(pruned, epochs=epochs, batch_size=batch, verbose=verbose,
             callbacks=[tfopt.callbacks.PruningStep()])
    return _compile(tfopt.strip(pruned), spec.get("learning_rate", 5e-4))


def _channel_counts(before, after) -> dict:
    """``{layer name: [output channels before, after]}`` for layers that lost some."""
    from tfopt import _tree

    def widths(model):
        return {layer.name: getattr(layer, "filters", None) or getattr(layer, "units", None)
                for _, layer in _tree.walk(model)
                if getattr(layer, "filters", None) or getattr(layer, "units", None)}

    old, new = widths(before), widths(after)
    return {name: [old[name], new[name]] for name in old
            if name in new and new[name] != old[name]}


def _optimize(model, spec, data, output: Path, step, verbose):
    """``tfopt.optimize`` on the trained model, searching on the recipe's test split.

    Its work is saved in ``output`` (``runs/<name>/optimize``), so ``tfopt run
    --resume`` goes on with the search where it stopped.
    """
    target = tfopt.Target(**spec["target"])
    step(f"optimize: {target.describe()}, within {spec.get('max_accuracy_drop', 0.01):g} of "
         "the dense accuracy")
    return tfopt.optimize(
        model, data.train, validation_data=data.test, target=target, output=output,
        max_accuracy_drop=spec.get("max_accuracy_drop", 0.01), epochs=spec.get("epochs", 5),
        qat_epochs=spec.get("qat_epochs", 2), batch_size=spec.get("batch_size", 32),
        learning_rate=spec.get("learning_rate", 1e-3),
        distillation=spec.get("distillation", True), budget_seconds=spec.get("budget_seconds"),
        max_rounds=spec.get("max_rounds", 4), verbose=1 if verbose else 0)


def _quantize(model, spec, data, step, verbose):
    epochs = spec.get("epochs", 3)
    step(f"quantization-aware training ({spec.get('config', 'int8')}), {epochs} epoch(s)")
    samples = spec.get("calibration_samples", 256)
    qat = _compile(tfopt.quantize(model, spec.get("config", "int8"),
                                  calibration_data=data.inputs(samples, "training")),
                   spec.get("learning_rate", 2e-4))
    if epochs:
        data.fit(qat, epochs=epochs, batch_size=spec.get("batch_size", 32), verbose=verbose)
    return qat


BASELINE = "baseline saved_model / TensorFlow"  # the float SavedModel, as TF Serving runs it


def report_headline(report) -> str:
    """The report's first line: the best optimized artifact against what TF Serving runs."""
    return report.headline(baseline=BASELINE, candidate_prefix="optimized")


def _write_report(output: Path, spec, metrics, report, exports, baseline_export) -> None:
    headline = report_headline(report)
    plot = report.plot(output / "latency_size.png")
    lines = [
        f"**{headline}**", "",
        f"# tfopt report: {spec['name']}", "",
        f"Recipe `{metrics['recipe']}`, {metrics['seconds']:.0f} s, steps: "
        + "; ".join(metrics["steps"]) + ".", "",
        "## Accuracy", "",
        "| model | test accuracy |", "| --- | ---: |",
        f"| baseline (dense, float) | {100 * metrics['baseline_accuracy']:.2f}% |",
        f"| optimized | {100 * metrics['final_accuracy']:.2f}% |", "",
    ]
    if metrics.get("optimize"):
        found = metrics["optimize"]
        lines += ["## Optimize", "", f"{found['summary']}.", "",
                  "Every candidate `tfopt.optimize` tried, exported and measured on the target "
                  "engine (its report, Pareto plot and sensitivity scan: `optimize/`):", "",
                  found["table"], "", "![metric against latency](optimize/pareto.png)", ""]
    for precision, failed in (metrics.get("export_failures") or {}).items():
        lines += [f"## What failed ({precision} export)", "",
                  "Every other artifact was exported, validated and benchmarked; the stages "
                  "before the export are saved under `stages/` (`tfopt run --resume` goes on "
                  "from them).", ""]
        lines += [f"- **{fmt}**: {why}" for fmt, why in failed.items()]
        lines.append("")
    if metrics.get("artifacts_accuracy"):
        lines += [f"On each engine, over all {metrics['validation_samples']} test samples:", "",
                  "| artifact / engine | accuracy |", "| --- | ---: |"]
        lines += [f"| {name} | {100 * value:.2f}% |"
                  for name, value in metrics["artifacts_accuracy"].items()]
        lines.append("")
    counts = metrics.get("counts")
    if counts:
        from tfopt._flops import human

        base, opt = counts["baseline"], counts["optimized"]
        lines += ["## Parameters and FLOPs", "",
                  "| model | parameters | FLOPs per sample |", "| --- | ---: | ---: |",
                  f"| baseline | {base['params']:,} | {human(base['flops'])} |",
                  f"| optimized | {opt['params']:,} | {human(opt['flops'])} |",
                  f"| optimized / baseline | {opt['params'] / max(base['params'], 1):.3f} | "
                  f"{opt['flops'] / max(base['flops'], 1):.3f} |", "",
                  "FLOPs: 2 x the multiply-accumulates of convolutions and Dense layers. "
                  "Unstructured sparsity leaves both as they are (zeros are still stored and "
                  "multiplied); channel pruning removes them.", ""]
    if metrics.get("channels"):
        lines += ["## Channels kept", "", "| layer | output channels | kept |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {k} | {a} | {b} |" for k, (a, b) in metrics["channels"].items()]
        lines.append("")
    if metrics.get("sparsity"):
        lines += ["## Sparsity", "", "| weight | zeros |", "| --- | ---: |"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in metrics["sparsity"].items()]
        lines.append("")
    lines += ["## Exported artifacts", "",
              "| precision | format | size MB | gzip MB | max abs diff vs Keras |",
              "| --- | --- | ---: | ---: | ---: |"]
    for precision, result in {"baseline fp32": baseline_export, **exports}.items():
        for fmt, path in result.paths.items():
            size = result.sizes.get(fmt, {})
            err = max((e["max_abs"] for e in result.errors.get(fmt, {}).values()), default=0.0)
            lines.append(f"| {precision} | {fmt} (`{path.relative_to(output)}`) | "
                         f"{size.get('raw', 0) / 2**20:.3f} | {size.get('gzip', 0) / 2**20:.3f} "
                         f"| {err:.2e} |")
    lines += ["", "## Latency, throughput and memory", "",
              "Baseline: the float SavedModel on TensorFlow, what TF Serving runs. Rows named "
              "`baseline` are the float model on each engine, rows named `optimized` the "
              "pruned/quantized one; `predict`, eager, `tf.function` and `tf.function jit` "
              "are the Keras model called in memory. Peak memory: resident memory high-water "
              "mark of a fresh process serving that artifact alone at the largest batch.", "",
              report.markdown(), "",
              report.cpu_line(), "",
              f"![latency and size]({plot.name})", "",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in report.environment.items()
                                          if not isinstance(v, list)) + "."]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    for precision, result in exports.items():
        shutil.copy2(result.directory / "manifest.json", output / f"manifest_{precision}.json")
    metrics["headline"] = headline
    metrics["cpu"] = report.cpu_line()

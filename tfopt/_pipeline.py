"""What `tfopt run` does with a recipe: train, prune, quantize, export, measure, report."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np

import tfopt
from tfopt import _recipe
from tfopt._recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)


def load_model(spec: dict) -> keras.Model:
    source, args = spec["source"], spec.get("args") or {}
    if source == "digits_cnn":
        from tfopt.examples import digits_cnn

        return digits_cnn(**args)
    if source.startswith("keras.applications."):
        name = source.rsplit(".", 1)[1]
        factory = getattr(keras.applications, name, None)
        if factory is None:
            raise RecipeError(f"model.source: keras.applications has no {name!r}.")
        args = {**args}
        if "input_shape" in args:
            args["input_shape"] = tuple(args["input_shape"])
        return factory(**args)
    if source.endswith(".keras"):
        if not Path(source).is_file():
            raise RecipeError(f"model.source: no file {source!r}.")
        return keras.models.load_model(source)
    if ":" in source:
        return _recipe.import_entry_point(source)(**args)
    raise RecipeError(
        f"model.source {source!r}: use 'digits_cnn', 'keras.applications.NAME', a .keras "
        "file, or 'module:function'.")


def load_data(spec: dict):
    source, args = spec["source"], spec.get("args") or {}
    if source == "digits":
        return tfopt.datasets.load_digits(**args)
    if source == "synthetic":
        shape = tuple(args.get("shape", (8, 8, 1)))
        classes = int(args.get("classes", 10))
        rng = np.random.default_rng(int(args.get("seed", 0)))

        def make(n):
            return (rng.uniform(size=(n, *shape)).astype("float32"),
                    rng.integers(0, classes, n).astype("int32"))

        return make(int(args.get("train_samples", 64))), make(int(args.get("test_samples", 32)))
    if ":" in source:
        return _recipe.import_entry_point(source)(**args)
    raise RecipeError(f"data.source {source!r}: use 'digits', 'synthetic' or 'module:function'.")


def _compile(model, learning_rate: float):
    last = model.layers[-1]
    last = getattr(last, "layer", last)  # a tfopt wrapper: look at the layer inside
    from_logits = getattr(last, "activation", None) is not keras.activations.softmax
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])
    return model


def run(recipe: Recipe, output: Path, *, verbose: int = 1) -> dict:
    """Execute a validated recipe; write the report into ``output``; return metrics."""
    spec = recipe.spec
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keras.utils.set_random_seed(int(spec.get("seed", 0)))
    model = load_model(spec["model"])
    (x, y), (x_test, y_test) = load_data(spec["data"])
    metrics: dict = {"recipe": str(recipe.path), "name": spec["name"], "steps": []}

    def step(name):
        logger.info("%s: %s", spec["name"], name)
        metrics["steps"].append(name)

    train = spec.get("train") or {}
    if train.get("epochs", 0):
        step(f"dense training, {train['epochs']} epoch(s)")
        _compile(model, train.get("learning_rate", 1e-3)).fit(
            x, y, epochs=train["epochs"], batch_size=train.get("batch_size", 32), verbose=verbose)
    # Pruning and QAT share layers with the model they start from (as tfmot
    # does), so the baseline is measured on a copy of its own.
    baseline = keras.models.clone_model(model)
    baseline.set_weights(model.get_weights())
    _compile(baseline, 1e-3)
    metrics["baseline_accuracy"] = float(baseline.evaluate(x_test, y_test, verbose=0)[1])
    baseline_export = tfopt.export(baseline, output / "baseline", formats=("onnx",),
                                   validation_data=x_test[:64], overwrite=True)

    current = model
    prune = spec.get("prune")
    if prune:
        current = _prune(current, prune, x, y, step, verbose)
        metrics["sparsity"] = tfopt.sparsity(current)
    quantize = spec.get("quantize")
    if quantize:
        current = _quantize(current, quantize, x, y, step, verbose)
    if getattr(current, "optimizer", None) is None:
        _compile(current, 1e-3)
    metrics["final_accuracy"] = float(current.evaluate(x_test, y_test, verbose=0)[1])

    export = spec.get("export") or {}
    formats = tuple(export.get("formats", ("saved_model", "onnx")))
    precisions = ["int8"] if quantize else list(export.get("precisions", ["fp32"]))
    exports = {}
    for precision in precisions:
        step(f"export {', '.join(formats)} ({precision})")
        exports[precision] = tfopt.export(
            current, output / "export" / precision, formats=formats, precision=precision,
            validation_data=x_test[:64], opset=export.get("opset", 17), overwrite=True,
            placement=export.get("placement", "onnxruntime"))
    metrics["exports"] = {p: {"paths": {k: str(v) for k, v in r.paths.items()},
                              "errors": r.errors, "sizes": r.sizes}
                          for p, r in exports.items()}

    bench = spec.get("bench") or {}
    step("benchmark")
    runners = (tfopt.bench.runners_for(baseline, "baseline keras")
               + tfopt.bench.runners_for(baseline_export.paths["onnx"], "baseline onnx"))
    for result in exports.values():
        for fmt in ("saved_model", "onnx"):
            if fmt in result.paths:
                runners += tfopt.bench.runners_for(result.paths[fmt], f"optimized {fmt}")
    # Accuracy on random labels means nothing: only report it on real data.
    labels = None if spec["data"]["source"] == "synthetic" else y_test
    report = tfopt.bench.run(
        runners, x_test, labels=labels,
        batch_sizes=bench.get("batch_sizes", [1, 32]), repeats=bench.get("repeats", 20),
        warmup=bench.get("warmup", 3), min_seconds=bench.get("min_seconds", 0.5),
        progress=bool(verbose))
    metrics["bench"] = report.to_dict()
    metrics["seconds"] = time.perf_counter() - started
    _write_report(output, spec, metrics, report, exports, baseline_export)
    return metrics


def _prune(model, spec, x, y, step, verbose):
    epochs = spec.get("epochs", 10)
    batch = spec.get("batch_size", 32)
    steps = math.ceil(len(x) / batch)
    end = max(1, int(spec.get("ramp_fraction", 0.4) * epochs * steps))
    frequency = spec.get("frequency", max(1, steps // 4))
    if spec.get("schedule", "polynomial_decay") == "constant":
        schedule = tfopt.ConstantSparsity(spec.get("final_sparsity", 0.5), 0, end, frequency)
    else:
        schedule = tfopt.PolynomialDecay(spec.get("initial_sparsity", 0.0),
                                         spec.get("final_sparsity", 0.8), 0, end,
                                         frequency=frequency)
    n_m = tuple(spec["n_m"]) if spec.get("n_m") else None
    step(f"pruning to {schedule.final_sparsity:.0%}{' ' + str(n_m) if n_m else ''}, "
         f"{epochs} epoch(s)")
    layers = spec.get("layers")
    if spec.get("skip_layers"):
        skip, only = set(spec["skip_layers"]), set(layers or ())
        layers = lambda la: la.name not in skip and (not only or la.name in only)  # noqa: E731
    pruned = _compile(tfopt.prune(model, schedule, n_m=n_m, layers=layers),
                      spec.get("learning_rate", 5e-4))
    pruned.fit(x, y, epochs=epochs, batch_size=batch, verbose=verbose,
               callbacks=[tfopt.callbacks.PruningStep()])
    return _compile(tfopt.strip(pruned), spec.get("learning_rate", 5e-4))


def _quantize(model, spec, x, y, step, verbose):
    epochs = spec.get("epochs", 3)
    step(f"quantization-aware training ({spec.get('config', 'int8')}), {epochs} epoch(s)")
    samples = spec.get("calibration_samples", 256)
    qat = _compile(tfopt.quantize(model, spec.get("config", "int8"),
                                  calibration_data=x[:samples]),
                   spec.get("learning_rate", 2e-4))
    if epochs:
        qat.fit(x, y, epochs=epochs, batch_size=spec.get("batch_size", 32), verbose=verbose)
    return qat


def _write_report(output: Path, spec, metrics, report, exports, baseline_export) -> None:
    headline = report.headline(baseline="baseline keras predict", candidate_prefix="optimized",
                               size_reference="baseline onnx fp32 / ORT CPU")
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
    lines += ["", "## Latency and throughput", "", report.markdown(), "",
              f"![latency and size]({plot.name})", "",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in report.environment.items()
                                          if not isinstance(v, list)) + "."]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    for precision, result in exports.items():
        shutil.copy2(result.directory / "manifest.json", output / f"manifest_{precision}.json")
    metrics["headline"] = headline

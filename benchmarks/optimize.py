"""tfopt.optimize on trained models: speed-up on ONNX Runtime CPU within one point of accuracy.

For each model, trained here on scikit-learn's digits (nothing downloaded):

* ``digits_cnn``: tfopt's 8x8 digits CNN (43k parameters);
* ``resnet_small``: a ResNet-style CNN (three stages of two residual blocks,
  16-32-64 channels, BatchNorm) on the digits upscaled to 32x32;
* ``resnet_wide``: the same with 64-128-256 channels on 16x16 inputs;
* ``mobilenetv2``: ``keras.applications.MobileNetV2`` (``weights=None``,
  alpha 0.5) on the digits upscaled to 32x32 (3 channels);

the training split is cut into a training part and a validation part that
``tfopt.optimize`` searches on (``max_accuracy_drop=0.01``,
``Target(engine="onnxruntime", batch_size=1, speedup=4.0)``, 1.5 for the
digits CNN, whose 30 us are mostly a call's fixed cost); the test split
is held out and scored at the end. Then, in one interleaved timing on ONNX
Runtime's CPU provider at batch 1: the dense FP32 ONNX, INT8 alone (today's
``tfopt.quantize`` + QAT fine-tune + export, no pruning) and the artifact
optimize chose. Last, the distillation check: the chosen widths pruned and
fine-tuned the same way without a teacher, against optimize's model.

Usage: python benchmarks/optimize.py [--models digits_cnn,resnet_small,mobilenetv2]
       [--json benchmarks/results/optimize.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
from tfopt._optimize import _api, _evaluate, _measure  # noqa: E402
from tfopt.bench._timing import interleaved  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

TARGET = dict(engine="onnxruntime", batch_size=1)
BUDGET = 0.01
FALLBACK_SPEEDUP = 2.0  # asked for when optimize refuses a model's target as out of reach


def resnet_small(input_shape=(32, 32, 1), widths=(16, 32, 64), classes=10, name="resnet_small"):
    layers = keras.layers

    def batch_norm(name):
        # momentum 0.9: over a short training (400 steps) the moving statistics of
        # Keras's default 0.99 lag the growing activations (resnet_wide: 19-27% test
        # accuracy, 99% with the statistics re-estimated)
        return layers.BatchNormalization(momentum=0.9, name=name)

    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU()(batch_norm(name="stem_bn")(x))
    for stage, width in enumerate(widths):
        for block in range(2):
            stride = 2 if stage and not block else 1
            name = f"s{stage}b{block}"
            y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                              name=f"{name}_conv1")(x)
            y = layers.ReLU()(batch_norm(name=f"{name}_bn1")(y))
            y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = batch_norm(name=f"{name}_bn2")(y)
            if stride != 1 or x.shape[-1] != width:
                x = layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                  name=f"{name}_down")(x)
                x = batch_norm(name=f"{name}_down_bn")(x)
            x = layers.ReLU()(layers.Add(name=f"{name}_add")([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, name="logits")(x), name=name)


def mobilenetv2():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.5, weights=None,
                                           classes=10, classifier_activation=None)
    for layer in model.layers:  # keras.applications' 0.999 lags far behind in 1,400 steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


MODELS = {
    # name: (builder, image side, channels, training epochs, target speed-up)
    # The 43k-parameter digits CNN runs in about 30 us, most of it the fixed cost of a
    # call; optimize refuses 4x there as out of reach, so it is asked for 1.5x.
    "digits_cnn": (tfopt.examples.digits_cnn, 8, 1, 20, 1.5),
    "resnet_small": (resnet_small, 32, 1, 20, 4.0),
    # Wider and on 16x16 inputs: 4x the FLOPs per ONNX node of resnet_small, so that its
    # latency is its arithmetic, not the per-node cost of a run (see benchmarks/README.md).
    "resnet_wide": (lambda: resnet_small((16, 16, 1), (64, 128, 256), name="resnet_wide"), 16, 1, 12, 4.0),
    "mobilenetv2": (mobilenetv2, 32, 3, 60, 4.0),
}


def data(side: int, channels: int):
    (x, y), (x_test, y_test) = tfopt.datasets.load_digits()
    if side != 8:
        x = tf.image.resize(x, (side, side)).numpy()
        x_test = tf.image.resize(x_test, (side, side)).numpy()
    if channels == 3:
        x, x_test = np.repeat(x, 3, -1), np.repeat(x_test, 3, -1)
    cut = int(len(x) * 0.8)  # optimize searches on the last 20% of the training split
    return (x[:cut], y[:cut]), (x[cut:], y[cut:]), (x_test, y_test)


def accuracy_keras(model, x, y) -> float:
    return float(np.mean(_evaluate.predict(model, x).argmax(-1) == y))


def accuracy_onnx(path, x, y) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float(np.mean(out.argmax(-1) == y))


def measure_model(name: str, work: Path) -> dict:
    builder, side, channels, epochs, speedup = MODELS[name]
    target = tfopt.Target(**TARGET, speedup=speedup)
    train, val, test = data(side, channels)
    keras.utils.set_random_seed(0)
    steps = epochs * -(-len(train[0]) // 32)
    # a cosine decay to 0: the last steps move the weights little, so BatchNorm's moving
    # statistics describe the final weights (at a constant 1e-3, resnet_wide scored 19%)
    model = tfopt.examples.compile_classifier(
        builder(), keras.optimizers.schedules.CosineDecay(1e-3, steps))
    started = time.time()
    model.fit(*train, epochs=epochs, batch_size=32, verbose=0)
    dense_test = accuracy_keras(model, *test)
    if dense_test < 0.9:
        raise SystemExit(f"{name} trained to {dense_test:.3f} test accuracy only: a benchmark "
                         "of it would mean nothing; fix its training first.")
    print(f"\n== {name}: {model.count_params():,} parameters, trained {epochs} epochs in "
          f"{time.time() - started:.0f} s, test accuracy {dense_test:.4f}", flush=True)

    started = time.time()
    refused = None
    try:
        result = tfopt.optimize(model, train, validation_data=val, target=target,
                                max_accuracy_drop=BUDGET, output=work / name, epochs=8,
                                qat_epochs=2)
    except tfopt.errors.ConfigError as exc:  # a target optimize calls out of reach
        refused = " ".join(str(exc).split())
        print(f"optimize refused {target}: {refused}\nasking for {FALLBACK_SPEEDUP}x instead",
              flush=True)
        speedup = FALLBACK_SPEEDUP
        target = tfopt.Target(**TARGET, speedup=speedup)
        result = tfopt.optimize(model, train, validation_data=val, target=target,
                                max_accuracy_drop=BUDGET, output=work / name, epochs=8,
                                qat_epochs=2)
    search_s = time.time() - started
    chosen = result.chosen

    # INT8 alone: today's quantize + QAT fine-tune + export, no pruning, no teacher
    keras.utils.set_random_seed(0)
    qat = tfopt.quantize(_evaluate.copy(model), calibration_data=train[0][:256])
    tfopt.examples.compile_classifier(qat, 1e-4)
    qat.fit(*train, epochs=2, batch_size=32, verbose=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8_alone = tfopt.export(qat, work / f"{name}-int8-alone", formats=("onnx",),
                                      validation_data=train[0][:256]).paths["onnx"]
    except tfopt.errors.ExportValidationError as exc:  # reported in the table, not hidden
        print(f"INT8 alone: export refused: {exc}", flush=True)
        int8_alone, int8_refused = None, " ".join(str(exc).split())[:300]
    else:
        int8_refused = None

    # distillation check: the chosen widths, recovered the same way without a teacher
    no_teacher = None
    if chosen.fractions:
        keras.utils.set_random_seed(0)
        dataset = _evaluate.training_dataset(model, train, 32)
        plain = _api.recover(model, chosen.fractions, max(chosen.fractions.values()),
                             dataset, epochs=8, learning_rate=1e-3,
                             loss=_api._task_loss(model, None, train[1]), teacher=None)
        no_teacher = {"val": accuracy_keras(plain, *val), "test": accuracy_keras(plain, *test)}

    # one interleaved timing: dense FP32, INT8 alone, optimize's choice
    dense_path = work / name / result.candidates[0].directory / "model.onnx"
    paths = {"dense fp32": dense_path, "int8 alone": int8_alone,
             "optimized": result.export.paths["onnx"]}
    paths = {k: p for k, p in paths.items() if p is not None}
    runners = {k: _measure.engine_runner(p.parent, target)
               for k, p in paths.items()}
    batch = test[0][:1]
    calls = max(1, int(0.05 / max(result.baseline["latency_ms"] / 1e3, 1e-6)))
    samples = interleaved({k: (lambda r=r: r.run([batch])) for k, r in runners.items()},
                          rounds=30, calls=calls)
    ms = {k: float(np.median(v) * 1e3) for k, v in samples.items()}
    test_acc = {k: accuracy_onnx(p, *test) for k, p in paths.items()}
    val_acc = {k: accuracy_onnx(p, *val) for k, p in paths.items()}
    row = {
        "params": model.count_params(), "epochs": epochs, "search_seconds": search_s,
        "target_speedup": speedup, "refused_target": refused,
        "ms": ms, "test_accuracy": test_acc, "val_accuracy": val_acc,
        "speedup_vs_dense": ms["dense fp32"] / ms["optimized"],
        "speedup_vs_int8_alone": ms["int8 alone"] / ms["optimized"] if int8_alone else None,
        "int8_alone_vs_dense": ms["dense fp32"] / ms["int8 alone"] if int8_alone else None,
        "int8_alone_refused": int8_refused,
        "chosen": {"name": chosen.name, "describe": chosen.describe(), "flops": chosen.flops,
                   "params": chosen.params, "precision": chosen.precision,
                   "float_layers": chosen.float_layers, "widths": chosen.widths},
        "target_met": result.target_met, "message": result.message,
        "summary": result.summary(),
        "candidates": len(result.candidates),
        "distillation": {
            "with_teacher_val": accuracy_keras(result.model, *val),
            "with_teacher_test": accuracy_keras(result.model, *test),
            "no_teacher": no_teacher},
    }
    print(result.table(), flush=True)
    print(json.dumps({k: row[k] for k in ("ms", "test_accuracy", "speedup_vs_dense",
                                           "speedup_vs_int8_alone", "distillation")}, indent=1),
          flush=True)
    return row


def markdown(results: dict) -> str:
    lines = [results["environment"]["cpu"], "",
             "| model | dense FP32: test acc / ms | INT8 alone: test acc / ms | optimized: test "
             "acc / ms | vs dense | vs INT8 alone | chosen |",
             "| --- | --- | --- | --- | ---: | ---: | --- |"]
    for name, r in results["models"].items():
        a, ms = r["test_accuracy"], r["ms"]
        cells = [f"{a[k]:.4f} / {ms[k]:.3f}" if k in ms else "export refused (see JSON)"
                 for k in ("dense fp32", "int8 alone", "optimized")]
        versus = f"{r['speedup_vs_int8_alone']:.2f}x" if r["speedup_vs_int8_alone"] else "-"
        lines.append(f"| {name} ({r['params']:,} params) | " + " | ".join(cells)
                     + f" | {r['speedup_vs_dense']:.2f}x (target {r['target_speedup']:g}x"
                     + (", 4x refused as out of reach" if r.get("refused_target") else "") + ") | "
                     f"{versus} | "
                     f"{r['chosen']['describe']} |")
    lines += ["", "Distillation: optimize's pruned FP32 model (the dense model as teacher) against "
              "the same widths fine-tuned the same way without one.", "",
              "| model | split | dense | pruned, with teacher | pruned, no teacher | drop the "
              "teacher recovered |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in results["models"].items():
        d = r["distillation"]
        if d["no_teacher"] is None:
            continue
        for split, key in (("validation", "val"), ("test (held out)", "test")):
            dense = r[f"{key}_accuracy"]["dense fp32"]
            with_t, without = d[f"with_teacher_{key}"], d["no_teacher"][key]
            lost = dense - without
            recovered = f"{(with_t - without) / lost:.0%}" if lost > 1e-9 else "no drop"
            lines.append(f"| {name} | {split} | {dense:.4f} | {with_t:.4f} | {without:.4f} | "
                         f"{recovered} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default="benchmarks/results/optimize.json")
    parser.add_argument("--markdown", action="store_true",
                        help="reprint the markdown table from --json and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.json).read_text())))
        return
    results = {"environment": {"onnxruntime": ort.__version__, "tfopt": tfopt.__version__,
                               "tensorflow": tf.__version__, "keras": keras.__version__,
                               "cpu": _cpu_int8.describe_cpu(), "target": TARGET,
                               "max_accuracy_drop": BUDGET,
                               "date": time.strftime("%Y-%m-%d")}, "models": {}}
    print(results["environment"]["cpu"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results["models"][name] = measure_model(name, Path(tmp))
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print("\n" + markdown(results))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

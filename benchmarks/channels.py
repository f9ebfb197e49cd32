"""Structured channel pruning against unstructured pruning: size, FLOPs, ONNX Runtime CPU latency.

For ResNet50 and MobileNetV2 (keras.applications, weights=None, 224x224,
logits), in one interleaved run on ONNX Runtime's CPU provider, at batch 1
and 32:

* ``dense``: the model as built, exported by ``tfopt.export`` to ONNX;
* ``channels 25%`` / ``channels 50%``: ``tfopt.prune(..., structure="channels")``,
  masks set once from the weights (``prune_now``: what the schedule's last
  step does in ``fit()``; latency does not depend on which channels go),
  ``tfopt.strip``, exported;
* ``unstructured 25%`` / ``unstructured 50%``: the same sparsity on single
  weights (magnitude), stripped and exported, for contrast.

Printed per model: parameters, FLOPs (2 x multiply-accumulates of
convolutions and Dense layers, per image), median ms and speed-up over
dense. Then the digits CNN: trained dense, pruned to 50% of its channels
inside ``fit()`` (``PruningStep``), stripped; test accuracy of both.

Usage: python benchmarks/channels.py [--models resnet50,mobilenetv2]
       [--rounds-b1 20] [--rounds-b32 5] [--json benchmarks/results/channels.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import tfopt  # noqa: E402
from tfopt import _flops, artifacts  # noqa: E402
from tfopt.bench._timing import interleaved  # noqa: E402
from tfopt.pruning._api import prune_now  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

MODELS = {"resnet50": keras.applications.ResNet50,
          "mobilenetv2": keras.applications.MobileNetV2}
SPARSITIES = (0.25, 0.5)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 224, 224, 3)).astype("float32")


def variants(name: str):
    """``{label: plain Keras model}``: dense, channel-pruned and unstructured, each stripped."""
    def build():
        keras.utils.set_random_seed(0)
        return MODELS[name](weights=None, input_shape=(224, 224, 3), classifier_activation=None)

    models = {"dense": build()}
    for sparsity in SPARSITIES:
        pruned = tfopt.prune(build(), tfopt.ConstantSparsity(sparsity), structure="channels")
        prune_now(pruned, sparsity)
        models[f"channels {sparsity:.0%}"] = tfopt.strip(pruned)
    for sparsity in SPARSITIES:
        pruned = tfopt.prune(build(), tfopt.ConstantSparsity(sparsity))
        prune_now(pruned, sparsity)
        models[f"unstructured {sparsity:.0%}"] = tfopt.strip(pruned)
    return models


def cpu_runner(path: Path):
    (runner,) = [r for r in artifacts.load(path) if r.backend == "ort_cpu"]
    return runner


def time_interleaved(runners: dict, batch: int, rounds: int) -> dict:
    """Median seconds per call; every round times each model once, the order rotating."""
    x = [images(batch, seed=3)]
    samples = interleaved({k: functools.partial(r.run, x) for k, r in runners.items()},
                          rounds=rounds)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_model(name: str, workdir: Path, rounds_b1: int, rounds_b32: int) -> dict:
    start = time.perf_counter()
    print(f"[{name}] pruning, stripping and exporting 5 variants ...", flush=True)
    check = images(2, seed=2)
    info, runners = {}, {}
    for label, model in variants(name).items():
        counts = _flops.count(model)
        zeros = float(np.mean([np.mean(keras.ops.convert_to_numpy(w.value) == 0)
                               for w in model.trainable_weights if len(w.shape) > 1]))
        result = tfopt.export(model, workdir / f"{name}_{label.replace(' ', '_')}",
                              formats=("onnx",), validation_data=check)
        path = result.paths["onnx"]
        info[label] = {"params": counts.params, "flops": counts.flops,
                       "kernel_zeros": zeros, "onnx_mb": Path(path).stat().st_size / 2**20,
                       "max_abs_error_vs_keras": max(
                           e["max_abs"] for e in result.errors["onnx"].values())}
        runners[label] = cpu_runner(path)
    print(f"[{name}] prepared in {time.perf_counter() - start:.0f} s; timing ...", flush=True)
    ms = {}
    for batch, rounds in ((1, rounds_b1), (32, rounds_b32)):
        ms[str(batch)] = {k: 1000 * v for k, v in
                          time_interleaved(runners, batch, rounds).items()}
    return {"files": info, "median_ms": ms}


def digits(epochs: int = 15) -> dict:
    """Dense digits CNN, then 50% of its channels pruned inside fit(), stripped."""
    from tfopt.examples import compile_classifier, digits_cnn

    (x, y), (x_test, y_test) = tfopt.datasets.load_digits()
    keras.utils.set_random_seed(0)
    dense = compile_classifier(digits_cnn())
    dense.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    dense_accuracy = float(dense.evaluate(x_test, y_test, verbose=0)[1])
    dense_counts = _flops.count(dense)
    steps = math.ceil(len(x) / 32)
    schedule = tfopt.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=int(0.4 * epochs * steps),
                                     frequency=max(1, steps // 4))
    pruned = compile_classifier(tfopt.prune(dense, schedule, structure="channels"), 5e-4)
    pruned.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
               callbacks=[tfopt.callbacks.PruningStep()])
    masked_accuracy = float(pruned.evaluate(x_test, y_test, verbose=0)[1])
    small = compile_classifier(tfopt.strip(pruned))
    small_accuracy = float(small.evaluate(x_test, y_test, verbose=0)[1])
    small_counts = _flops.count(small)
    return {"dense": {"accuracy": dense_accuracy, "params": dense_counts.params,
                      "flops": dense_counts.flops},
            "channels 50%": {"accuracy": small_accuracy, "masked_accuracy": masked_accuracy,
                             "params": small_counts.params, "flops": small_counts.flops},
            "epochs": {"dense": epochs, "pruning": epochs}}


def print_table(name: str, result: dict) -> None:
    files, ms = result["files"], result["median_ms"]
    print(f"\n{name}: ONNX Runtime CPU, median ms (x = speed-up over dense)")
    print(f"{'model':<20}{'params':>12}{'FLOPs':>9}{'batch 1':>18}{'batch 32':>20}")
    for key, info in files.items():
        cells = [f"{ms[b][key]:8.2f} ({ms[b]['dense'] / ms[b][key]:4.2f}x)" for b in ("1", "32")]
        print(f"{key:<20}{info['params']:>12,}{_flops.human(info['flops']):>9}"
              f"{cells[0]:>18}{cells[1]:>20}")
    print(flush=True)


def markdown(results: dict) -> str:
    lines = ["| model | variant | parameters | FLOPs | ORT CPU batch 1 ms | speed-up | "
             "ORT CPU batch 32 ms | speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in results["models"].items():
        ms = result["median_ms"]
        for key, info in result["files"].items():
            lines.append(
                f"| {name} | {key} | {info['params'] / 1e6:.2f}M | "
                f"{_flops.human(info['flops'])} | {ms['1'][key]:.2f} | "
                f"{ms['1']['dense'] / ms['1'][key]:.2f}x | {ms['32'][key]:.0f} | "
                f"{ms['32']['dense'] / ms['32'][key]:.2f}x |")
    d = results.get("digits")
    if d:
        lines += ["", "| digits CNN | parameters | FLOPs | test accuracy |",
                  "| --- | ---: | ---: | ---: |"]
        for key in ("dense", "channels 50%"):
            lines.append(f"| {key} | {d[key]['params']:,} | {_flops.human(d[key]['flops'])} | "
                         f"{100 * d[key]['accuracy']:.2f}% |")
    cpu = results["environment"].get("cpu", "")
    if cpu.startswith("CPU: "):  # runs before the CPU line was recorded have none
        lines += ["", cpu]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenetv2")
    parser.add_argument("--rounds-b1", type=int, default=20)
    parser.add_argument("--rounds-b32", type=int, default=5)
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/channels.json")
    parser.add_argument("--print", action="store_true",
                        help="reprint the markdown table from --json and exit")
    args = parser.parse_args()
    if args.print:
        print(markdown(json.loads(Path(args.json).read_text())))
        return

    results = {"environment": {"onnxruntime": ort.__version__, "tfopt": tfopt.__version__,
                               "keras": keras.__version__,
                               "cpu": _cpu_int8.describe_cpu()},
               "command": "python benchmarks/channels.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k in ("models", "rounds_b1", "rounds_b32")),
               "models": {}}
    print(results["environment"]["cpu"], flush=True)
    with tempfile.TemporaryDirectory(prefix="tfopt-channels-") as tmp:
        for name in args.models.split(","):
            results["models"][name] = measure_model(name, Path(tmp), args.rounds_b1,
                                                    args.rounds_b32)
            print_table(name, results["models"][name])
    if not args.no_digits:
        print("[digits] training dense, then pruning 50% of channels in fit() ...", flush=True)
        results["digits"] = digits()
        d = results["digits"]
        print(f"digits CNN: dense {100 * d['dense']['accuracy']:.2f}%, channels 50% "
              f"{100 * d['channels 50%']['accuracy']:.2f}% "
              f"({d['dense']['params']:,} -> {d['channels 50%']['params']:,} parameters)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("\n" + markdown(results))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""CPU engines side by side: what TF Serving runs against what tfopt's artifacts run on.

ResNet50 and MobileNetV2 (``keras.applications``, ``weights=None``, 224x224),
batch 1 and 32, exported once each with ``tfopt.export`` and timed in one
interleaved run (every round times every engine in turn, so drift in the
machine's load hits them all alike; the table shows medians):

* TF SavedModel: the float SavedModel's ``serving_default`` on TensorFlow,
  what TF Serving runs;
* ORT FP32 / ORT INT8: ONNX Runtime's CPU provider on the float ONNX and on
  the INT8 Q/DQ ONNX of the QAT model;
* OpenVINO f32 / bf16: the float IR with the f32 and bf16 inference
  precision (bf16 only where the CPU has it);
* OpenVINO INT8: the QAT model's IR (FakeQuantize, int8 kernels), with the
  f32 and bf16 inference precision for what is left in float.

The QAT model is ``tfopt.quantize`` calibrated on random data, no training:
speed does not depend on the weights' values. Timings are of
``tfopt.artifacts`` runners, the ones ``tfopt.bench`` and export validation
use. Prints a markdown table and writes JSON.

Usage (run it alone on the machine, e.g. under a lock):
    python benchmarks/cpu_engines.py --models resnet50 mobilenetv2 \
        --json benchmarks/results/cpu_engines.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2"}
ENGINES = ("TF SavedModel", "ORT FP32", "ORT INT8", "OpenVINO f32", "OpenVINO bf16",
           "OpenVINO INT8 (f32)", "OpenVINO INT8 (bf16)")


def prepare(name: str, work: Path, x):
    """Export the float model (SavedModel, ONNX, IR) and the QAT model (ONNX, IR)."""
    import keras

    import tfopt

    model = getattr(keras.applications, FACTORIES[name])(weights=None, input_shape=(224, 224, 3))
    started = time.perf_counter()
    float_export = tfopt.export(model, work / f"{name}_fp32",
                                formats=("saved_model", "onnx", "openvino"),
                                validation_data=x[:2], overwrite=True)
    qat = tfopt.quantize(model, "int8", calibration_data=x[:8])
    int8_export = tfopt.export(qat, work / f"{name}_int8", formats=("onnx", "openvino"),
                               validation_data=x[:2], overwrite=True)
    seconds = time.perf_counter() - started
    return float_export, int8_export, seconds


def runners(float_export, int8_export):
    from tfopt.artifacts._openvino import bf16_available, openvino_runner
    from tfopt.artifacts._ort import onnx_runners
    from tfopt.artifacts._tf import saved_model_runner

    chosen = {
        "TF SavedModel": saved_model_runner(float_export.paths["saved_model"]),
        "ORT FP32": onnx_runners(float_export.paths["onnx"], providers=["CPUExecutionProvider"])[0],
        "ORT INT8": onnx_runners(int8_export.paths["onnx"], providers=["CPUExecutionProvider"])[0],
        "OpenVINO f32": openvino_runner(float_export.paths["openvino"], precision="f32"),
        "OpenVINO INT8 (f32)": openvino_runner(int8_export.paths["openvino"], precision="f32"),
    }
    if bf16_available():
        chosen["OpenVINO bf16"] = openvino_runner(float_export.paths["openvino"], precision="bf16")
        chosen["OpenVINO INT8 (bf16)"] = openvino_runner(int8_export.paths["openvino"],
                                                         precision="bf16")
    return {k: chosen[k] for k in ENGINES if k in chosen}


def time_engines(chosen: dict, feed, rounds: int, calls: int) -> dict:
    """Median ms per call of each runner, over ``rounds`` rounds of ``calls`` calls."""
    from tfopt.bench._timing import interleaved

    samples = interleaved({k: functools.partial(r.run, feed) for k, r in chosen.items()},
                          rounds=rounds, calls=calls)
    return {k: {"median_ms": 1e3 * statistics.median(v), "runs": len(v)}
            for k, v in samples.items()}


def _ms(value) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def table(results: dict) -> str:
    engines = [e for e in ENGINES if any(e in cell["engines"] for cell in results["cells"])]
    lines = ["| model, batch | " + " | ".join(engines) + " |",
             "| --- |" + " ---: |" * len(engines)]
    for cell in results["cells"]:
        values = [cell["engines"].get(e, {}).get("median_ms") for e in engines]
        lines.append(f"| {cell['model']}, {cell['batch']} | "
                     + " | ".join(_ms(v) for v in values) + " |")
    lines.append("")
    lines.append("| model, batch | best artifact | vs TF SavedModel | OpenVINO INT8 vs ORT FP32 |")
    lines.append("| --- | --- | ---: | ---: |")
    for cell in results["cells"]:
        e = cell["engines"]
        best = min((k for k in e if k != "TF SavedModel"), key=lambda k: e[k]["median_ms"])
        int8 = min((e[k]["median_ms"] for k in e if k.startswith("OpenVINO INT8")), default=None)
        ratio = "" if int8 is None else f"{e['ORT FP32']['median_ms'] / int8:.2f}x"
        lines.append(f"| {cell['model']}, {cell['batch']} | {best} | "
                     f"{e['TF SavedModel']['median_ms'] / e[best]['median_ms']:.2f}x | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FACTORIES), choices=list(FACTORIES))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_engines.json")
    parser.add_argument("--work", type=Path, default=None, help="where exports go (default: a temp dir)")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="only print the table of the results already in --json")
    args = parser.parse_args(argv)
    if args.print_only:
        results = json.loads(args.json.read_text())
        print(_header(results))
        print(table(results))
        return

    import numpy as np
    import onnxruntime
    import tensorflow as tf

    from tfopt.artifacts._openvino import cpu_features
    from tfopt.targets import _cpu_int8

    batches = [int(b) for b in args.batches.split(",")]
    x = np.random.default_rng(0).uniform(0, 1, size=(max(batches), 224, 224, 3)).astype("float32")
    work = args.work or Path(tempfile.mkdtemp(prefix="tfopt_cpu_engines_"))
    features = cpu_features()
    results = {"environment": {"cpu": _cpu_int8.describe_cpu(), "machine": platform.machine(),
                               "openvino_capabilities": features.get("capabilities"),
                               "tensorflow": tf.__version__, "onnxruntime": onnxruntime.__version__,
                               "openvino": features.get("openvino")},
               "rounds": args.rounds, "cells": [], "exports": {}}
    try:
        for name in args.models:
            float_export, int8_export, seconds = prepare(name, work, x)
            results["exports"][name] = {
                "seconds": seconds,
                "sizes_mb": {f"fp32 {k}": v["raw"] / 2**20 for k, v in float_export.sizes.items()}
                | {f"int8 {k}": v["raw"] / 2**20 for k, v in int8_export.sizes.items()},
                "max_abs_error": {"fp32": float_export.errors, "int8": int8_export.errors},
                "openvino_bf16_errors": {
                    "fp32": float_export.manifest["artifacts"]["openvino"].get("bf16_errors"),
                    "int8": int8_export.manifest["artifacts"]["openvino"].get("bf16_errors")}}
            chosen = runners(float_export, int8_export)
            for batch in batches:
                feed = [np.ascontiguousarray(x[:batch])]
                calls = 5 if batch == 1 else 1
                timed = time_engines(chosen, feed, args.rounds, calls)
                results["cells"].append({"model": name, "batch": batch, "engines": timed})
                print(f"{name} batch {batch}: " + ", ".join(
                    f"{k} {v['median_ms']:.3g} ms" for k, v in timed.items()), flush=True)
            del chosen
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.exists():  # keep the other models' cells from an earlier invocation
        earlier = json.loads(args.json.read_text())
        done = {(c["model"], c["batch"]) for c in results["cells"]}
        results["cells"] = [c for c in earlier.get("cells", [])
                            if (c["model"], c["batch"]) not in done] + results["cells"]
        results["exports"] = {**earlier.get("exports", {}), **results["exports"]}
    order = list(FACTORIES)
    results["cells"].sort(key=lambda c: (order.index(c["model"]), c["batch"]))
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(_header(results))
    print(table(results))


def _header(results: dict) -> str:
    env = results["environment"]
    return (f"{env.get('cpu')}; "
            f"TensorFlow {env.get('tensorflow')}, onnxruntime {env.get('onnxruntime')}, "
            f"OpenVINO {str(env.get('openvino')).split('-')[0]}; median ms, "
            f"{results['rounds']} interleaved rounds")


if __name__ == "__main__":
    main()

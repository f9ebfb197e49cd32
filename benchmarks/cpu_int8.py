"""INT8 on ONNX Runtime's CPU provider: tfopt's two Q/DQ placements beside FP32 and ORT's own.

For each model (keras.applications, weights=None, 224x224, logits, BatchNorm
statistics taken from 16 of the calibration images), in one
interleaved run on ONNX Runtime's CPU provider, at batch 1 and 32:

* ``fp32``: tfopt's float ONNX export;
* ``tfopt int8``: the QAT model (tfopt.quantize, calibrated on random images:
  latency does not depend on accuracy) exported with the default placement
  (``placement="onnxruntime"``);
* ``tfopt int8 trt``: the same QAT model in TensorRT's placement;
* ``ort quantize_static``: ONNX Runtime's post-training quantizer on the FP32
  file (QDQ, per-channel int8 weights, uint8 activations, after
  ``quant_pre_process``), as its docs recommend for x86: exact only on CPUs
  with VNNI (its 8-bit weights saturate int16 pair sums elsewhere);
* ``ort quantize_static rr``: the same with ``reduce_range=True`` (7-bit
  weights): ONNX Runtime's own file that is right on every x86 CPU, as
  tfopt's default is, and so the fair anchor.

Also printed: how many convolutions/matrix products ONNX Runtime runs as
integer kernels (from its optimized graph), file sizes, the cosine
similarity of each INT8 file's logits with the Keras QAT model's, whether
the file passes tfopt's static int16 proof (``portable``), and how far this
CPU's integer kernels are from the file's own Q/DQ arithmetic (``kernel
gap``: max |kernels - optimizations off| over the largest logit). The CPU's
model name and instruction sets head the output and the JSON.

Usage: python benchmarks/cpu_int8.py [--models resnet50,mobilenetv2,efficientnetb0]
       [--rounds-b1 100] [--rounds-b32 9] [--json benchmarks/results/cpu_int8.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import tfopt  # noqa: E402
from tfopt._tree import find  # noqa: E402
from tfopt.artifacts._ort import arithmetic_session_options, default_session_options  # noqa: E402,E501
from tfopt.bench._timing import interleaved  # noqa: E402
from tfopt.export import _ort_quant  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

MODELS = {
    "resnet50": keras.applications.ResNet50,
    "mobilenetv2": keras.applications.MobileNetV2,
    "efficientnetb0": keras.applications.EfficientNetB0,
    "mobilenetv3small": keras.applications.MobileNetV3Small,
    "mobilenetv3large": keras.applications.MobileNetV3Large,
    "xception": keras.applications.Xception,
    "densenet121": keras.applications.DenseNet121,
    "convnexttiny": keras.applications.ConvNeXtTiny,
    "nasnetmobile": keras.applications.NASNetMobile,
}


def build(name: str, images: np.ndarray) -> keras.Model:
    model = MODELS[name](weights=None, input_shape=(224, 224, 3), classifier_activation=None)
    return batchnorm_statistics_from(model, images)


def batchnorm_statistics_from(model: keras.Model, images: np.ndarray) -> keras.Model:
    """Each BatchNormalization's moving statistics set to its batch statistics on ``images``.

    Fresh statistics (mean 0, variance 1) are far from what a trained network
    carries; on MobileNetV3 they shrink the logits to about 1e-10, which int8
    rounds to zero, so no cosine could be measured. One forward pass in
    training mode with momentum 0 gives the statistics a trained model would have.
    """
    norms = find(model, lambda layer: isinstance(layer, keras.layers.BatchNormalization))
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    return model


def images(n: int, seed: int) -> np.ndarray:
    """Random images in [0, 255]: each model's own preprocessing sees what it expects."""
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 224, 224, 3)).astype("float32")


def anchor(fp32_path: Path, out: Path, calibration: np.ndarray,
           reduce_range: bool = False) -> Path:
    """ONNX Runtime's quantize_static of the float file, as its docs recommend for x86
    (``reduce_range``: 7-bit weights, exact on CPUs without VNNI too)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folded = out.with_name("anchor_pre.onnx")
    quant_pre_process(str(fp32_path), str(folded))
    name = ort.InferenceSession(str(folded), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    batches = iter([{name: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

    class Reader:
        def get_next(self):
            return next(batches, None)

    quantize_static(str(folded), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return out


def session(path: Path, options=None) -> ort.InferenceSession:
    # Threads that sleep between runs: spinning ones would take the CPU from the next file.
    return ort.InferenceSession(str(path), options or default_session_options(),
                                providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    per = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(per.min())


def prepare(name: str, workdir: Path) -> dict:
    calibration = images(32, seed=1)
    model = build(name, calibration[:16])
    check = images(16, seed=2)
    print(f"[{name}] exporting FP32, QAT INT8 (both placements) and the anchor ...", flush=True)
    start = time.perf_counter()
    fp32 = tfopt.export(model, workdir / f"{name}_fp32", formats=("onnx",),
                        validation_data=check[:4])
    qat = tfopt.quantize(model, "int8", calibration_data=calibration)
    reference = np.asarray(qat(check, training=False))
    exports = {
        "tfopt int8": tfopt.export(qat, workdir / f"{name}_int8", formats=("onnx",),
                                   validation_data=calibration),
        "tfopt int8 trt": tfopt.export(qat, workdir / f"{name}_int8_trt", formats=("onnx",),
                                       validation_data=calibration, placement="tensorrt"),
    }
    paths = {"fp32": fp32.paths["onnx"], **{k: r.paths["onnx"] for k, r in exports.items()}}
    paths["ort quantize_static"] = anchor(paths["fp32"], workdir / f"{name}_anchor.onnx",
                                          calibration)
    paths["ort quantize_static rr"] = anchor(paths["fp32"], workdir / f"{name}_anchor_rr.onnx",
                                             calibration, reduce_range=True)
    print(f"[{name}] prepared in {time.perf_counter() - start:.0f} s", flush=True)
    info = {}
    for key, path in paths.items():
        kernels = _ort_quant.kernel_report(path)
        sess = session(path)
        out = sess.run(None, {sess.get_inputs()[0].name: check})[0]
        info[key] = {
            "path": str(path), "size_mb": Path(path).stat().st_size / 2**20,
            "integer_ops": kernels["integer"], "compute_ops": kernels["total"],
            "cosine_vs_keras_qat": None if key == "fp32" else cosine(out, reference),
        }
        if key != "fp32":
            arithmetic = session(path, arithmetic_session_options())
            plain = arithmetic.run(None, {arithmetic.get_inputs()[0].name: check})[0]
            info[key]["portable"] = _cpu_int8.check(onnx.load(str(path))).portable
            info[key]["kernel_gap"] = float(np.max(np.abs(out - plain)) / np.max(np.abs(plain)))
    return {"paths": paths, "info": info}


def time_interleaved(paths: dict, batch: int, rounds: int) -> dict:
    """Seconds per call of each file, per round; every round times each file once."""
    sessions = {k: session(p) for k, p in paths.items()}
    x = images(batch, seed=3)
    calls = {k: functools.partial(s.run, None, {s.get_inputs()[0].name: x})
             for k, s in sessions.items()}
    return interleaved(calls, rounds=rounds)


def paired_ratio(samples: dict, base: str, other: str) -> dict:
    """``base`` time over ``other`` time, round by round: median and quartiles.

    Each round times both files within milliseconds of each other, so the
    machine's drift (runs of the same file here differ by 10-20% from one
    process to the next) cancels in the ratio of a pair.
    """
    ratios = np.asarray(samples[base]) / np.asarray(samples[other])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "rounds": len(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenetv2,efficientnetb0",
                        help=f"comma-separated, of: {','.join(MODELS)}")
    parser.add_argument("--rounds-b1", type=int, default=100)
    parser.add_argument("--rounds-b32", type=int, default=9)
    parser.add_argument("--json", default="benchmarks/results/cpu_int8.json")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {','.join(MODELS)}")

    results = {"environment": {"onnxruntime": ort.__version__, "tfopt": tfopt.__version__,
                               "cpu": _cpu_int8.describe_cpu()},
               "models": {}}
    print(f"{results['environment']['cpu']}; onnxruntime {ort.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tfopt-cpu-int8-") as tmp:
        for name in args.models.split(","):
            prepared = prepare(name, Path(tmp))
            samples = {batch: time_interleaved(prepared["paths"], batch, rounds)
                       for batch, rounds in ((1, args.rounds_b1), (32, args.rounds_b32))}
            results["models"][name] = {
                "files": prepared["info"],
                "median_ms": {str(b): {k: 1000 * statistics.median(v) for k, v in t.items()}
                              for b, t in samples.items()},
                # > 1: tfopt's default export is faster than ONNX Runtime's quantizer
                "tfopt_vs_anchor": {str(b): paired_ratio(t, "ort quantize_static", "tfopt int8")
                                    for b, t in samples.items()},
                "tfopt_vs_fair_anchor": {
                    str(b): paired_ratio(t, "ort quantize_static rr", "tfopt int8")
                    for b, t in samples.items()}}
            print_table(name, results["models"][name])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


def print_table(name: str, result: dict) -> None:
    files, ms = result["files"], result["median_ms"]
    print(f"\n{name}: median ms on ONNX Runtime CPU (x = speed-up over fp32)")
    print(f"{'file':<24}{'batch 1':>16}{'batch 32':>18}{'int ops':>10}{'MB':>8}{'cosine':>9}"
          f"{'portable':>10}{'kernel gap':>12}")
    for key, info in files.items():
        cells = []
        for batch in ("1", "32"):
            value = ms[batch][key]
            cells.append(f"{value:9.2f} ({ms[batch]['fp32'] / value:4.2f}x)")
        cos = "" if info["cosine_vs_keras_qat"] is None else f"{info['cosine_vs_keras_qat']:.4f}"
        portable = "" if "portable" not in info else ("yes" if info["portable"] else "VNNI only")
        gap = "" if "kernel_gap" not in info else f"{info['kernel_gap']:.2e}"
        print(f"{key:<24}{cells[0]:>16}{cells[1]:>18}"
              f"{info['integer_ops']:>5}/{info['compute_ops']:<4}{info['size_mb']:>8.1f}{cos:>9}"
              f"{portable:>10}{gap:>12}")
    for label, key in (("ort quantize_static", "tfopt_vs_anchor"),
                       ("ort quantize_static rr (fair: portable)", "tfopt_vs_fair_anchor")):
        for batch, r in result[key].items():
            print(f"tfopt int8 speed over {label}, batch {batch}: {r['median']:.3f}x "
                  f"(median of {r['rounds']} paired rounds; quartiles {r['q1']:.3f}-{r['q3']:.3f})")
    print(flush=True)


if __name__ == "__main__":
    main()

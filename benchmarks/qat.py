"""QAT INT8 Q/DQ vs FP32: ONNX Runtime CPU latency, file size, training step time.

For MobileNetV2 and ResNet50 (keras.applications, weights=None, 224x224):
export the float model and its QAT int8 version (tfopt.quantize, calibrated
on random images: latency does not depend on accuracy) to ONNX, and time
ONNX Runtime's CPU provider on both at batch 1 and 32, interleaved. Then
time a training step of plain fit vs QAT fit on MobileNetV2 (batch 8).
Accuracy targets are checked on real data in tests/test_digits.py.

Usage: python benchmarks/qat.py [--models mobilenetv2,resnet50] [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
from tfopt.bench import measure  # noqa: E402
from tfopt.export import _onnx  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

MODELS = {
    "mobilenetv2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)),
    "resnet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3)),
}


def export_pair(name: str, workdir: Path, calibration: np.ndarray):
    model = MODELS[name]()
    fp32 = tfopt.export(model, workdir / f"{name}_fp32", formats=("onnx",),
                        validation_data=calibration[:2])
    qat = tfopt.quantize(model, calibration_data=calibration)
    int8 = tfopt.export(qat, workdir / f"{name}_int8", formats=("onnx",),
                        validation_data=calibration[:2])
    return fp32, int8


def latency_rows(name, fp32, int8, batches, repeats):
    sessions = {"fp32": _onnx.session(fp32.paths["onnx"]), "int8": _onnx.session(int8.paths["onnx"])}
    input_name = sessions["fp32"].get_inputs()[0].name
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.uniform(size=(batch, 224, 224, 3)).astype("float32")
        timings = {k: [] for k in sessions}
        for _ in range(repeats):  # interleave: noise hits both alike
            for key, session in sessions.items():
                timings[key].append(measure(lambda s=session: s.run(None, {input_name: x}),
                                            warmup=1 if timings[key] else 2, repeats=1).p50)
        med = {k: float(np.median(v)) for k, v in timings.items()}
        rows.append((name, batch, med["fp32"], med["int8"]))
    return rows


def train_step_ratio(steps: int):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8 * steps, 224, 224, 3)).astype("float32")
    y = rng.integers(0, 1000, 8 * steps)
    loss = keras.losses.SparseCategoricalCrossentropy()
    plain = MODELS["mobilenetv2"]()
    qat = tfopt.quantize(MODELS["mobilenetv2"](), calibration_data=x[:8])
    for model in (plain, qat):
        model.compile(optimizer="sgd", loss=loss)
        model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0)  # trace
    times = {"plain": [], "qat": []}
    for i in range(steps):
        for key, model in (("plain", plain), ("qat", qat)):
            start = time.perf_counter()
            model.train_on_batch(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8])
            times[key].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,resnet50")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    calibration = np.random.default_rng(1).uniform(size=(16, 224, 224, 3)).astype("float32")
    rows, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            fp32, int8 = export_pair(name, Path(tmp), calibration)
            sizes.append((name, fp32.sizes["onnx"]["raw"], int8.sizes["onnx"]["raw"],
                          fp32.max_abs_error, int8.max_abs_error))
            rows += latency_rows(name, fp32, int8, batches, args.repeats)
    step = train_step_ratio(args.train_steps)

    print(f"QAT benchmark: TF {tf.__version__}, Keras {keras.__version__}, onnxruntime "
          f"{onnxruntime.__version__} (CPUExecutionProvider); {_cpu_int8.describe_cpu()}")
    print(f"\n{'model':<13}{'batch':>6}{'fp32 ms':>11}{'int8 ms':>11}{'fp32/int8':>11}")
    for name, batch, a, b in rows:
        print(f"{name:<13}{batch:>6}{1e3 * a:>11.2f}{1e3 * b:>11.2f}{a / b:>11.2f}")
    print(f"\n{'model':<13}{'fp32 MB':>10}{'int8 MB':>10}{'ratio':>8}{'fp32 err':>11}{'int8 err':>11}")
    for name, a, b, ea, eb in sizes:
        print(f"{name:<13}{a / 2**20:>10.2f}{b / 2**20:>10.2f}{a / b:>8.2f}{ea:>11.1e}{eb:>11.1e}")
    print(f"\ntrain step, MobileNetV2 batch 8: plain {1e3 * step['plain']:.0f} ms, QAT "
          f"{1e3 * step['qat']:.0f} ms, ratio {step['qat'] / step['plain']:.2f} (target <= 1.6)")
    if args.json:
        args.json.write_text(json.dumps({
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "cpu": _cpu_int8.describe_cpu(), "args": {k: str(v) for k, v in vars(args).items()},
            "latency": [{"model": n, "batch": b, "fp32_ms": 1e3 * a, "int8_ms": 1e3 * c}
                        for n, b, a, c in rows],
            "sizes": [{"model": n, "fp32_bytes": a, "int8_bytes": b, "fp32_max_abs_error": ea,
                       "int8_max_abs_error": eb} for n, a, b, ea, eb in sizes],
            "train_step_ms": {k: 1e3 * v for k, v in step.items()},
        }, indent=2))


if __name__ == "__main__":
    main()

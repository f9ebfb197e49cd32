"""GPU figures: ONNX Runtime CUDA, FP32 vs FP16 (and INT8 Q/DQ), MobileNetV2 and ResNet50.

Two steps, because the GPU machine has onnxruntime but no TensorFlow:

1. ``prepare`` (here, with TensorFlow): export ``keras.applications``
   MobileNetV2 and ResNet50 (weights=None, 224x224) with ``tfopt.export`` as
   FP32, FP16 and QAT INT8 ONNX. Weights are stored as external data and left
   behind: only the graphs (a few hundred kB) travel.
2. ``run`` (on the GPU machine): fill every external weight with random
   values of its shape and dtype (He-scaled normal for floats, uniform int8
   for Q/DQ weights; dense GPU kernels take as long whatever the values), and
   time each model with tfopt.artifacts' ONNX Runtime CUDA runner (I/O bound to
   the GPU) at batch 1, 8 and 64 under each of ``CONFIGS``: ONNX Runtime's
   default CUDA options, ``prefer_nhwc``, NHWC with TF32 off (IEEE FP32), and
   NHWC with CUDA graphs. Prints a table and writes JSON to ``--json``.

3. ``table`` (anywhere): print the table and the figures quoted in
   benchmarks/README.md from a JSON that ``run`` wrote.

Usage:
    python benchmarks/gpu_onnx.py prepare --out .gpu/models
    python3 benchmarks/gpu_onnx.py run --models .gpu/models --json $OUT/gpu.json
    python3 benchmarks/gpu_onnx.py table --json benchmarks/results/gpu_onnx_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_common  # noqa: E402

ROOT = _gpu_common.ROOT
MODELS = ("mobilenetv2", "resnet50")

# ONNX Runtime CUDA provider settings compared. Its default runs float32
# convolutions as TF32 on tensor cores; "strict" turns that off (IEEE FP32).
CONFIGS = (
    ("default", {}),
    ("nhwc", {"prefer_nhwc": "1"}),
    ("nhwc-strict", {"prefer_nhwc": "1", "use_tf32": "0"}),
    ("nhwc-graph", {"prefer_nhwc": "1", "enable_cuda_graph": "1"}),
)


def prepare(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    import tfopt

    out.mkdir(parents=True, exist_ok=True)
    factories = _gpu_common.keras_factories()
    x = np.random.default_rng(0).uniform(size=(8, 224, 224, 3)).astype("float32")
    for name in MODELS:
        model = factories[name](weights=None, input_shape=(224, 224, 3))
        for precision, candidate in (("fp32", model), ("fp16", model),
                                     ("int8", tfopt.quantize(model, calibration_data=x))):
            result, _, graph = _gpu_common.export_graph(candidate, out, f"{name}_{precision}",
                                                        x[:2], precision=precision)
            print(f"{graph.name}: graph {graph.stat().st_size / 1024:.0f} kB, "
                  f"validated max |diff| {result.max_abs_error:.2e}")


def run(models_dir: Path, json_path: Path, batches=(1, 8, 64), repeats: int = 30) -> None:
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels
        onnxruntime.preload_dlls()
    timing, ort_runners = _gpu_common.import_tfopt_bench()
    work = Path("/tmp/tfopt_gpu_models")
    work.mkdir(exist_ok=True)
    device = _gpu_common.device()["name"]
    rows = []
    for graph in sorted(models_dir.glob("*.onnx")):
        full = work / graph.name
        _gpu_common.fill_weights(graph, full)
        for layout, options in CONFIGS:
            for batch in batches:
                # A session per shape: a captured CUDA graph is tied to one shape.
                feed = [_gpu_common.images(batch, seed=1)]
                try:
                    (runner,) = ort_runners.onnx_runners(
                        full, graph.stem, ["CUDAExecutionProvider"], cuda_options=options)
                    t = _gpu_common.measure(timing, lambda: runner.run(feed), repeats)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    print(f"{graph.stem} {layout} batch {batch}: failed: {exc}", flush=True)
                    continue
                rows.append({"model": graph.stem.rsplit("_", 1)[0], "precision": runner.precision,
                             "layout": layout, "batch": batch, "p50_ms": 1e3 * t.p50,
                             "p90_ms": 1e3 * t.p90, "images_per_s": t.throughput(batch),
                             "runs": t.runs})
                print(f"{graph.stem:<18}{layout:<12}{batch:>4}{1e3 * t.p50:>10.3f} ms"
                      f"{t.throughput(batch):>12.0f} img/s", flush=True)
    result = {"device": device, "onnxruntime": onnxruntime.__version__, "rows": rows}
    json_path.write_text(json.dumps(result, indent=2))
    print(_table(result))


def _table(result) -> str:
    rows = result["rows"]
    lines = [f"{result['device']}, onnxruntime-gpu {result['onnxruntime']}, CUDA provider, "
             "I/O bound to the GPU, median of >= 30 runs",
             "| model | layout | batch | FP32 img/s | FP16 img/s | INT8 Q/DQ img/s | FP16/FP32 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    keys = sorted({(r["model"], r["layout"], r["batch"]) for r in rows})
    for model, layout, batch in keys:
        by = {r["precision"]: r["images_per_s"] for r in rows
              if (r["model"], r["layout"], r["batch"]) == (model, layout, batch)}
        ratio = by.get("fp16", 0) / by["fp32"] if by.get("fp32") else float("nan")
        lines.append(f"| {model} | {layout} | {batch} | {by.get('fp32', 0):,.0f} | "
                     f"{by.get('fp16', 0):,.0f} | {by.get('int8', 0):,.0f} | {ratio:.2f} |")
    return "\n".join(lines)


# H100 SXM dense FP16 tensor-core peak, and ResNet50's forward FLOPs per 224x224 image.
H100_FP16_FLOPS = 989e12
RESNET50_FLOPS = 8.2e9


def _highlights(result) -> str:
    """The figures benchmarks/README.md and README.md quote, each from one row of ``result``."""
    cell = {(r["model"], r["precision"], r["layout"], r["batch"]): r for r in result["rows"]}

    def ips(precision, layout, batch, model="resnet50"):
        return cell[(model, precision, layout, batch)]["images_per_s"]

    def ms(precision, layout, batch, model="resnet50"):
        return cell[(model, precision, layout, batch)]["p50_ms"]

    roofline = H100_FP16_FLOPS / RESNET50_FLOPS
    lines = ["resnet50, FP16 vs FP32 at batch 64, each pair from one options row:"]
    for layout in ("default", "nhwc", "nhwc-graph", "nhwc-strict"):
        lines.append(f"  {layout:<12} FP16 {ips('fp16', layout, 64):>8,.0f} img/s  FP32 "
                     f"{ips('fp32', layout, 64):>8,.0f} img/s  FP16/FP32 "
                     f"{ips('fp16', layout, 64) / ips('fp32', layout, 64):.2f}")
    best = max((r for r in result["rows"] if r["model"] == "resnet50"
                and r["precision"] == "fp16"), key=lambda r: r["images_per_s"])
    lines.append(f"resnet50 best FP16: {best['images_per_s']:,.0f} img/s ({best['layout']}, batch "
                 f"{best['batch']}), {best['images_per_s'] / roofline:.1%} of the "
                 f"{roofline:,.0f} img/s roofline ({H100_FP16_FLOPS / 1e12:.0f} TFLOPS / "
                 f"{RESNET50_FLOPS / 1e9:.1f} GFLOP)")
    lines.append(f"resnet50 FP16 batch 1 p50: default {ms('fp16', 'default', 1):.2f} ms, nhwc "
                 f"{ms('fp16', 'nhwc', 1):.2f} ms, nhwc-graph {ms('fp16', 'nhwc-graph', 1):.2f} ms")
    for model in MODELS:
        lines.append(f"{model} FP16 batch 64, nhwc / default: "
                     f"{ips('fp16', 'nhwc', 64, model) / ips('fp16', 'default', 64, model):.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu" / "models")
    r = sub.add_parser("run")
    r.add_argument("--models", type=Path, default=ROOT / ".gpu" / "models")
    r.add_argument("--json", type=Path, default=Path("gpu_onnx.json"))
    t = sub.add_parser("table")
    t.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_onnx_h100.json")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out)
    elif args.step == "table":
        result = json.loads(args.json.read_text())
        print(_table(result))
        print()
        print(_highlights(result))
    else:
        run(args.models, args.json)


if __name__ == "__main__":
    main()

"""GPU without TensorRT: tfopt's ONNX on ONNX Runtime CUDA against Keras on JAX (XLA) and PyTorch.

One run on one GPU machine, ResNet50 and MobileNetV2 (``keras.applications``,
``weights=None``, 224x224) at batch 1, 64 and 256, images/s at the median of
at least 30 calls (and 1 s) per cell, inputs already on the GPU:

* ``ort``: tfopt's ONNX exports on ONNX Runtime's CUDA provider (I/O bound
  to the GPU): FP32, FP16 with float32 I/O (what ``precision="fp16"``
  exports by default), FP16 with float16 I/O (``fp16_io=True``: no Cast at
  the edges). ONNX Runtime's options are compared one by one on ResNet50
  (``levers``: NHWC, CUDA graphs, cuDNN algorithm search, workspace, copy
  stream, optimization level) and the fastest at batch 256 is the "best"
  configuration. Where time goes: ONNX Runtime's own profiler per op type
  (in a process with ``CUDA_LAUNCH_BLOCKING=1``, so that each node's time
  is its GPU time), the GPU kernels seen by CUPTI (through
  ``torch.profiler``), and the op types left in ONNX Runtime's optimized
  graph. GPU memory held per engine, from ``tfopt.artifacts``' memory
  probe (what ``tfopt bench`` reports).
* ``jax``: the same Keras models under Keras 3's JAX backend, ``jax.jit`` of
  ``stateless_call``, float16 and bfloat16 dtype policies: what a Keras
  user gets by switching backend, compiled by XLA. This is also the speed
  of tfopt's XLA SavedModel (``saved_model_xla``): TensorFlow has no build
  for the GPU machine's CUDA 13, so that artifact cannot run there, and the
  same XLA compiler is measured through JAX instead.
* ``torch``: torchvision's ResNet50 and MobileNetV2 in float16,
  channels-last, eager and ``torch.compile`` (inductor, freezing on), as
  outside anchors.

Steps:

1. ``prepare`` (here, with TensorFlow): export the ONNX files with
   ``tfopt.export`` (weights as external data, left behind: only graphs
   travel; ``run`` refills them with random values), and the FP16 XLA
   SavedModel of each model, validated against Keras here (XLA on the CPU);
   its result goes into ``prepare.json`` beside the graphs.
2. ``run`` (on the GPU machine: Python, onnxruntime-gpu, JAX, PyTorch; no
   TensorFlow): the sections named by ``--sections``; ``--resume`` adds to
   a JSON that an earlier call wrote on the same machine.
3. ``table`` (anywhere): the tables and figures quoted in
   benchmarks/README.md, from the JSON.

Usage:
    python benchmarks/gpu.py prepare --out .gpu/models
    python3 benchmarks/gpu.py run --models .gpu/models --sections ort,jax --json $OUT/gpu.json
    python3 benchmarks/gpu.py run --models .gpu/models --sections torch --resume $OUT/gpu.json \\
        --json $OUT/gpu.json
    python3 benchmarks/gpu.py table --json benchmarks/results/gpu_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_common  # noqa: E402

ROOT = _gpu_common.ROOT
MODELS = ("resnet50", "mobilenetv2")
BATCHES = (1, 64, 256)
SIZE = _gpu_common.SIZE
# ONNX files ``prepare`` writes per model, by variant.
VARIANTS = {"fp32": "FP32", "fp16": "FP16, float32 I/O", "fp16io": "FP16, float16 I/O"}

NHWC_GRAPH = {"prefer_nhwc": "1", "enable_cuda_graph": "1"}
# ONNX Runtime CUDA provider options compared on ResNet50 (fp16io), one lever at a time.
# "opt_level" is a session option (graph optimization level), not a provider option.
LEVERS = (
    ("default", {}, None),
    ("nhwc", {"prefer_nhwc": "1"}, None),
    ("graph", {"enable_cuda_graph": "1"}, None),
    ("nhwc+graph", NHWC_GRAPH, None),
    ("nhwc+graph (again)", NHWC_GRAPH, None),  # the same cell twice: the noise
    ("nhwc+graph, heuristic algo", {**NHWC_GRAPH, "cudnn_conv_algo_search": "HEURISTIC"}, None),
    ("nhwc+graph, exhaustive algo, max workspace",
     {**NHWC_GRAPH, "cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1"},
     None),
    ("nhwc+graph, no max workspace", {**NHWC_GRAPH, "cudnn_conv_use_max_workspace": "0"}, None),
    ("nhwc+graph, copies on own stream", {**NHWC_GRAPH, "do_copy_in_default_stream": "0"}, None),
    ("nhwc+graph, opt level basic", NHWC_GRAPH, "basic"),
)


# -- prepare (here, with TensorFlow) --------------------------------------------

def prepare(out: Path, models=MODELS, xla: bool = True) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import shutil

    import keras
    import numpy as np

    import tfopt

    out.mkdir(parents=True, exist_ok=True)
    factories = _gpu_common.keras_factories()
    x = np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype("float32")
    report = {"versions": {"tfopt": tfopt.__version__, "keras": keras.__version__}, "models": {}}
    for name in models:
        model = factories[name](weights=None, input_shape=(SIZE, SIZE, 3))
        entry = report["models"].setdefault(name, {"onnx": {}})
        for variant, precision, fp16_io in (("fp32", "fp32", False), ("fp16", "fp16", False),
                                            ("fp16io", "fp16", True)):
            result, proto, graph = _gpu_common.export_graph(
                model, out, f"{name}_{variant}", x[:2], precision=precision, fp16_io=fp16_io)
            info = result.manifest["artifacts"]["onnx"]
            entry["onnx"][variant] = {
                "max_abs_error": result.max_abs_error, "max_rel_error": result.max_rel_error,
                "io_dtypes": info.get("io_dtypes"), "edge_casts": info.get("edge_casts"),
                "ops": _op_counts(proto)}
            print(f"{graph.name}: graph {graph.stat().st_size / 1024:.0f} kB, validated max "
                  f"|diff| {result.max_abs_error:.2e}, edge casts {info.get('edge_casts')}",
                  flush=True)
        if xla:
            tmp = out / f"tmp_{name}_xla"
            start = time.perf_counter()
            result = tfopt.export(model, tmp, formats=("saved_model_xla",), precision="fp16",
                                  validation_data=x[:2], overwrite=True)
            errors = result.errors["saved_model_xla"]
            entry["saved_model_xla"] = {
                "seconds": time.perf_counter() - start, "validated_on": "CPU (XLA:CPU)",
                "validation_images": 2, **result.manifest["artifacts"]["saved_model_xla"],
                "errors": errors, "size_bytes": result.sizes["saved_model_xla"]["raw"]}
            print(f"{name} saved_model_xla fp16: validated on XLA:CPU, max |diff| "
                  f"{result.max_abs_error:.2e} (tolerance "
                  f"{min(e['tolerance'] for e in errors.values()):.2e})", flush=True)
            shutil.rmtree(tmp)
    (out / "prepare.json").write_text(json.dumps(report, indent=2))


def _op_counts(proto) -> dict:
    counts: dict = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# -- run (on the GPU machine) ---------------------------------------------------

def _modules():
    return _gpu_common.import_tfopt_bench()  # (tfopt.bench._timing, tfopt.artifacts._ort)


def _row(model, engine, config, precision, batch, timing, **extra) -> dict:
    return {"model": model, "engine": engine, "config": config, "precision": precision,
            "batch": batch, "p50_ms": 1e3 * timing.p50, "p90_ms": 1e3 * timing.p90,
            "images_per_s": timing.throughput(batch), "runs": timing.runs, **extra}


def _say(row) -> None:
    print(f"{row['model']:<12}{row['engine']:<11}{row['config'][:44]:<46}{row['precision']:<9}"
          f"{row['batch']:>4}{row['p50_ms']:>10.3f} ms{row['images_per_s']:>10.0f} img/s",
          flush=True)


def _save(result, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))


class Budget:
    """Seconds left for this call; sections skip what would not fit, and say so."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


_measure = _gpu_common.measure
_input = _gpu_common.images


def run(models_dir: Path, json_path: Path, sections, resume=None, budget_s: float = 560,
        provider: str = "CUDAExecutionProvider", batches=BATCHES, models=MODELS,
        repeats: int = 30) -> dict:
    budget = Budget(budget_s)
    result = json.loads(Path(resume).read_text()) if resume and Path(resume).exists() else {
        "device": _device(), "batches": list(batches), "repeats_at_least": repeats,
        "min_seconds": 1.0, "rows": [], "skipped": [], "errors": []}
    prepared = models_dir / "prepare.json"
    if prepared.exists() and "prepare" not in result:
        result["prepare"] = json.loads(prepared.read_text())
    for section in sections:
        start = time.monotonic()
        try:
            if section.startswith("ort"):
                parts = ORT_PARTS if section == "ort" else (section.split("-", 1)[1],)
                _ort_section(result, models_dir, budget, provider, batches, models, repeats,
                             json_path, parts)
            else:
                {"jax": _jax_section, "torch": _torch_section}[section](
                    result, models_dir, budget, provider, batches, models, repeats, json_path)
        except Exception as exc:  # noqa: BLE001 - keep what the other sections measured
            result["errors"].append(f"{section}: {type(exc).__name__}: {exc}"[:2000])
            print(f"section {section} failed: {type(exc).__name__}: {exc}", flush=True)
        result.setdefault("section_seconds", {})[section] = round(time.monotonic() - start, 1)
        _save(result, json_path)
    print(table(result))
    return result


_device = _gpu_common.device


# ---- ONNX Runtime --------------------------------------------------------------

ORT_PARTS = ("levers", "table", "profile", "memory")


def _ort_section(result, models_dir, budget, provider, batches, models, repeats, json_path,
                 parts=ORT_PARTS):
    """``parts``: any of ORT_PARTS, in that order (sections ``ort-levers``, ``ort-table``, ...)."""
    import onnxruntime as ort


    if hasattr(ort, "preload_dlls") and provider.startswith("CUDA"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels beside PyTorch
    timing, ort_runners = _modules()
    section = result.setdefault("ort", {"version": ort.__version__, "provider": provider,
                                        "levers": [], "graphs": {}})
    work = Path("/tmp/tfopt_gpu")
    work.mkdir(exist_ok=True)
    files = {}
    for name in models:
        for variant in VARIANTS:
            graph = models_dir / f"{name}_{variant}.onnx"
            if graph.exists():
                full = work / graph.name
                if not full.exists():
                    _gpu_common.fill_weights(graph, full)
                files[(name, variant)] = full
    cuda = provider.startswith("CUDA")

    def cell(name, variant, config, options, batch, level=None, record=True):
        if (name, variant) not in files:
            return None
        if budget.left() < 20:
            result["skipped"].append(f"ort {name} {variant} {config} b{batch}: out of time")
            return None
        so = _session_options(ort, level)
        try:
            (runner,) = ort_runners.onnx_runners(
                files[(name, variant)], f"{name}_{variant}", [provider],
                cuda_options=options if cuda else None, session_options=so)
            feed = [_input(batch)]
            t = _measure(timing, lambda: runner.run(feed), repeats)
        except Exception as exc:  # noqa: BLE001 - record and go on
            result["errors"].append(f"ort {name} {variant} {config} b{batch}: "
                                    f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"ort {name} {variant} {config} b{batch} failed: {exc}", flush=True)
            return None
        row = _row(name, "ort-cuda" if cuda else "ort-cpu", config, variant, batch, t,
                   options=options, opt_level=level or "all")
        if record:
            result["rows"].append(row)
            _say(row)
        return row

    # 1. The ResNet50 levers at batch 256 and 1 (fp16 with float16 I/O), then the best.
    lever_rows = {}
    for batch in ((max(batches), min(batches)) if "levers" in parts else ()):
        # At batch 1 only the layout and CUDA-graph levers: launches, not kernels, dominate.
        for label, options, level in (LEVERS if batch == max(batches) else LEVERS[:5]):
            row = cell("resnet50", "fp16io", label, options, batch, level, record=False)
            if row is not None:
                section["levers"].append(row)
                lever_rows[(label, batch)] = row
                _say(row)
        _save(result, json_path)
    if "levers" in parts or "best" not in section:
        at_max = [r for r in section["levers"] if r["batch"] == max(batches)]
        best = max(at_max, key=lambda r: r["images_per_s"]) if at_max else None
        section["best"] = {"chosen_from": f"levers, resnet50 fp16io batch {max(batches)}",
                           "label": best["config"] if best else "nhwc+graph",
                           "options": best["options"] if best else NHWC_GRAPH,
                           "opt_level": best["opt_level"] if best else "all"}
        section["provider_options_seen"] = _provider_options(
            ort, files.get(("resnet50", "fp16io")), provider, section["best"]["options"])
    best_options = (section["best"]["options"], section["best"]["opt_level"])

    # 2. The table: every model, batch and ONNX variant (NHWC + CUDA graphs), and the best.
    level = None if best_options[1] == "all" else best_options[1]
    for name in (models if "table" in parts else ()):
        for batch in sorted(batches, reverse=True):
            for variant in VARIANTS:
                cell(name, variant, "nhwc+graph", NHWC_GRAPH, batch)
            if best_options[0] != NHWC_GRAPH or level is not None:
                cell(name, "fp16io", "best", best_options[0], batch, level)
            _save(result, json_path)

    # 3. Where the time goes (ResNet50, fp16io, best options, batch 256).
    if "profile" in parts and budget.left() > 60:
        section["profile"] = _ort_profiles(files, best_options, provider, budget, max(batches))
        _save(result, json_path)

    # 4. GPU memory each engine holds, through tfopt.artifacts' probe (what tfopt bench reports).
    memory = section.setdefault("memory", [])
    for name in (models if "memory" in parts else ()):
        for variant in ("fp32", "fp16io"):
            if (name, variant) in files and budget.left() > 30:
                memory.append(_probe_memory(files[(name, variant)], provider,
                                            best_options[0] if cuda else {}, max(batches),
                                            name, variant))
    _save(result, json_path)


def _session_options(ort, level=None, profile_prefix=None, optimized_path=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif level == "extended":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return so


def _provider_options(ort, path, provider, options) -> dict:
    """The CUDA provider's effective options, its defaults included, as ONNX Runtime reports."""
    if path is None or not provider.startswith("CUDA"):
        return {}
    try:
        sess = ort.InferenceSession(str(path), _session_options(ort),
                                    providers=[(provider, options)])
        return sess.get_provider_options().get(provider, {})
    except Exception as exc:  # noqa: BLE001 - informational
        return {"error": str(exc)[:300]}


def _ort_profiles(files, best_options, provider, budget, batch) -> dict:
    """ONNX Runtime's profiler per op type, CUPTI's kernels, and the optimized graphs' op types."""
    out = {"batch": batch}
    options, level = best_options
    options = {k: v for k, v in options.items() if k != "enable_cuda_graph"}  # replay hides nodes
    out["options"] = options
    script = Path(__file__).resolve()
    jobs = []
    if ("resnet50", "fp16io") in files:
        jobs.append(("ort_profiler", "profile-ort", files[("resnet50", "fp16io")],
                     {"CUDA_LAUNCH_BLOCKING": "1"}))
        jobs.append(("kernels", "profile-kernels-ort", files[("resnet50", "fp16io")], {}))
    for variant in ("fp32", "fp16io"):
        if ("resnet50", variant) in files:
            jobs.append((f"optimized_graph_{variant}", "optimized-graph",
                         files[("resnet50", variant)], {}))
    for key, verb, path, env in jobs:
        if budget.left() < 40:
            out[key] = {"skipped": "out of time"}
            continue
        args = [sys.executable, str(script), verb, "--graph", str(path), "--batch", str(batch),
                "--options", json.dumps(options), "--opt-level", level or "all",
                "--provider", provider]
        try:
            done = subprocess.run(args, capture_output=True, text=True,
                                  timeout=max(30, min(240, budget.left() - 20)),
                                  env={**os.environ, **env})
            lines = done.stdout.strip().splitlines()
            out[key] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": (done.stderr or done.stdout)[-1500:]}
        except (subprocess.TimeoutExpired, ValueError) as exc:
            out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"profile {key}: {json.dumps(out[key])[:600]}", flush=True)
    return out


def _probe_memory(path, provider, options, batch, name, variant) -> dict:
    """Peak resident and GPU memory of a fresh process serving this ONNX (artifacts._probe)."""
    spec = {"runner": {"loader": "onnx", "path": str(path), "provider": provider,
                       "cuda_options": options},
            "calls": 10, "inputs": [[[batch, SIZE, SIZE, 3], "float32"]]}
    probe = ROOT / "tfopt" / "artifacts" / "_probe.py"
    entry = {"model": name, "variant": variant, "batch": batch, "options": options}
    try:
        done = subprocess.run([sys.executable, str(probe), json.dumps(spec)], capture_output=True,
                              text=True, timeout=180, env=_cuda_library_env())
        entry.update(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                     else {"error": done.stderr[-800:]})
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"memory {name} {variant}: {entry}", flush=True)
    return entry


def _cuda_library_env() -> dict:
    """The environment with the nvidia-* wheels' libraries on LD_LIBRARY_PATH.

    A fresh process that loads onnxruntime-gpu without ``preload_dlls()``
    (tfopt's memory probe) finds CUDA and cuDNN there, as PyTorch's own
    wheels install them.
    """
    import glob
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
    current = os.environ.get("LD_LIBRARY_PATH", "")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs + ([current] if current else []))}


def _ort_session_for_profile(args, **session_kwargs):
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and args.provider.startswith("CUDA"):
        ort.preload_dlls()
    _, ort_runners = _modules()
    level = None if args.opt_level == "all" else args.opt_level
    so = _session_options(ort, level, **session_kwargs)
    options = json.loads(args.options) if args.provider.startswith("CUDA") else None
    sess = ort_runners.session(Path(args.graph), args.provider, options, so)
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    dtypes = ort_runners.input_dtypes(sess, names)
    if args.provider.startswith("CUDA"):
        run = ort_runners._cuda_bound_run(sess, names, outs, dtypes=dtypes)
    else:
        def run(arrays):
            return sess.run(outs, dict(zip(names, ort_runners._as_dtypes(arrays, dtypes))))
    return sess, run


def profile_ort(args) -> dict:
    """ONNX Runtime's profiler: time per op type and node count, over the last ``runs`` runs.

    Run with ``CUDA_LAUNCH_BLOCKING=1`` (as ``run`` does): each kernel launch
    then waits for the kernel, so a node's time in the profile is its GPU
    time plus a launch, not the launch alone.
    """
    prefix = Path("/tmp/tfopt_gpu/ortprof")
    sess, run = _ort_session_for_profile(args, profile_prefix=prefix)
    feed = [_input(args.batch)]
    for _ in range(10):
        run(feed)
    runs = 10
    starts = time.perf_counter()
    for _ in range(runs):
        run(feed)
    wall_ms = 1e3 * (time.perf_counter() - starts) / runs
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    first = model_runs[0]["ts"] if model_runs else 0
    per_op, count = {}, {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event["ts"] < first:
            continue
        op = event.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1e3 / runs
        count[op] = count.get(op, 0) + 1
    total = sum(per_op.values())
    return {"launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING") == "1",
            "runs": runs, "wall_ms_per_run": wall_ms,
            "model_run_ms": sum(e["dur"] for e in model_runs) / 1e3 / max(len(model_runs), 1),
            "nodes_ms_per_run": total,
            "by_op": {op: {"ms": round(ms, 4), "share": round(ms / total, 4) if total else 0,
                           "nodes": count[op] // runs}
                      for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}}


KERNEL_CATEGORIES = (
    # (category, pattern on the lowercased kernel name); first match wins.
    ("layout (transpose)", r"transpose|nchwtonhwc|nhwctonchw|nchw2nhwc|nhwc2nchw"),
    ("cast", r"op_cast|cast<|_cast|convert"),
    ("pooling", r"pool"),
    ("softmax", r"softmax"),
    ("gemm (dense)", r"(?<!implicit_)gemm(?!.*conv)|cublas|gemv"),
    ("convolution", r"conv|xmma|implicit|cudnn|cutlass|fprop|dgrad|wgrad|sm90_|sm80_"),
    ("add", r"op_add|add_fusion|_add"),
    ("relu", r"op_relu|relu|max_fusion|maximum"),  # XLA: loop_maximum_fusion
    ("reduce", r"reduce"),
    ("other elementwise / fusion", r"elementwise|fusion|loop_|input_|triton"),
)


def _categorize(name: str) -> str:
    lower = name.lower()
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, lower):
            return category
    return "other"


def kernel_profile(fn, runs: int = 10) -> dict:
    """GPU kernel time per category over ``runs`` calls of ``fn``, from CUPTI (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.events():
        device_type = getattr(event, "device_type", None)
        if device_type is None or "CUDA" not in str(device_type):
            continue
        duration = event.time_range.elapsed_us()
        entry = per_kernel.setdefault(event.name, [0.0, 0])
        entry[0] += duration / 1e3 / runs  # us -> ms per run
        entry[1] += 1
    categories = {}
    for name, (ms, calls) in per_kernel.items():
        category = categories.setdefault(_categorize(name), {"ms": 0.0, "kernels": 0})
        category["ms"] += ms
        category["kernels"] += calls // runs
    total = sum(c["ms"] for c in categories.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"runs": runs, "gpu_ms_per_run": total,
            "by_category": {k: {"ms": round(v["ms"], 4), "share": round(v["ms"] / total, 4)
                                if total else 0, "kernels": v["kernels"]}
                            for k, v in sorted(categories.items(), key=lambda kv: -kv[1]["ms"])},
            "top_kernels": [{"name": n[:160], "ms": round(v[0], 4), "calls": v[1] // runs,
                             "category": _categorize(n)} for n, v in top]}


def profile_kernels_ort(args) -> dict:
    import torch  # noqa: F401 - CUPTI through torch.profiler

    sess, run = _ort_session_for_profile(args)
    feed = [_input(args.batch)]
    result = kernel_profile(lambda: run(feed))
    result["engine"] = "ort-cuda fp16io"
    return result


def optimized_graph(args) -> dict:
    """Op types (with domain) in ONNX Runtime's optimized graph for this provider and options."""
    import onnx

    path = Path("/tmp/tfopt_gpu") / (Path(args.graph).stem + "_optimized.onnx")
    sess, run = _ort_session_for_profile(args, optimized_path=path)
    del sess, run
    proto = onnx.load(str(path), load_external_data=False)
    counts = _op_counts(proto)
    return {"nodes": sum(counts.values()), "ops": counts}


# ---- Keras on JAX (XLA) --------------------------------------------------------------

def _jax_section(result, models_dir, budget, provider, batches, models, repeats, json_path):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np

    timing, _ = _modules()
    result["jax"] = {"jax": jax.__version__, "keras": keras.__version__,
                     "backend": keras.backend.backend(),
                     "devices": [str(d) for d in jax.devices()], "compile_seconds": {}}
    if keras.backend.backend() != "jax":
        raise RuntimeError("Keras did not take the JAX backend (imported before KERAS_BACKEND?)")
    factories = {"resnet50": keras.applications.ResNet50,
                 "mobilenetv2": keras.applications.MobileNetV2}
    for name in models:
        for dtype in ("float16", "bfloat16"):
            # bfloat16 at the largest batch only: the comparison, at half the compiles.
            dtype_batches = batches if dtype == "float16" else (max(batches),)
            if budget.left() < 40:
                result["skipped"].append(f"jax {name} {dtype}: out of time")
                continue
            keras.config.set_dtype_policy(dtype)
            try:
                model = factories[name](weights=None, input_shape=(SIZE, SIZE, 3))
            finally:
                keras.config.set_dtype_policy("float32")
            trainable = [v.value for v in model.trainable_variables]
            fixed = [v.value for v in model.non_trainable_variables]

            def forward(trainable, fixed, x, model=model):
                return model.stateless_call(trainable, fixed, x, training=False)[0]

            fn = jax.jit(forward)
            for batch in sorted(dtype_batches, reverse=True):
                if budget.left() < 30:
                    result["skipped"].append(f"jax {name} {dtype} b{batch}: out of time")
                    continue
                try:
                    x = jax.device_put(np.asarray(_input(batch), dtype=dtype))
                    start = time.perf_counter()
                    fn(trainable, fixed, x).block_until_ready()
                    compiled = time.perf_counter() - start
                    t = _measure(timing, lambda: fn(trainable, fixed, x).block_until_ready(),
                                 repeats)
                except Exception as exc:  # noqa: BLE001
                    result["errors"].append(f"jax {name} {dtype} b{batch}: {exc}"[:500])
                    continue
                result["jax"]["compile_seconds"][f"{name} {dtype} b{batch}"] = round(compiled, 1)
                row = _row(name, "keras-jax", "jax.jit(stateless_call)", dtype, batch, t,
                           input_dtype=dtype)
                result["rows"].append(row)
                _say(row)
            _save(result, json_path)
    # Where XLA's time goes, for comparison with ONNX Runtime's profile.
    if "resnet50" in models and budget.left() > 60:
        result["jax"]["profile"] = _subprocess_json(
            ["profile-kernels-jax", "--batch", str(max(batches))], budget)


def _subprocess_json(args, budget, env=None) -> dict:
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                              capture_output=True, text=True,
                              timeout=max(30, min(240, budget.left() - 20)),
                              env={**os.environ, **(env or {})})
        lines = done.stdout.strip().splitlines()
        out = json.loads(lines[-1]) if done.returncode == 0 and lines else {
            "error": (done.stderr or done.stdout)[-1500:]}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(f"{args[0]}: {json.dumps(out)[:600]}", flush=True)
    return out


def profile_kernels_jax(args) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["KERAS_BACKEND"] = "jax"
    import torch  # noqa: F401 - CUPTI through torch.profiler
    import jax
    import keras
    import numpy as np

    keras.config.set_dtype_policy("float16")
    model = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3))
    keras.config.set_dtype_policy("float32")
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    fn = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
    x = jax.device_put(np.asarray(_input(args.batch), dtype="float16"))
    result = kernel_profile(lambda: fn(trainable, fixed, x).block_until_ready())
    result["engine"] = "keras-jax float16"
    return result


# ---- PyTorch ---------------------------------------------------------------------------

def _torch_section(result, models_dir, budget, provider, batches, models, repeats, json_path):
    import torch
    import torch._dynamo
    import torch._inductor.config

    timing, _ = _modules()
    try:
        import torchvision
    except ImportError:
        result["skipped"].append("torch: torchvision is not installed on this machine")
        return
    torch.backends.cudnn.benchmark = True
    torch._inductor.config.freezing = True  # fold weights and BatchNorm, as a deployment would
    torch._dynamo.config.automatic_dynamic_shapes = False  # a static graph per batch size
    torch._dynamo.config.cache_size_limit = 32
    result["torch"] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "cudnn": torch.backends.cudnn.version(),
                       "compile": "torch.compile(mode=None), inductor freezing on, "
                                  "static shapes", "compile_seconds": {}}
    factories = {"resnet50": torchvision.models.resnet50,
                 "mobilenetv2": torchvision.models.mobilenet_v2}
    for mode in ("eager", "compile"):
        for name in models:
            net = factories[name](weights=None).eval().half().cuda().to(
                memory_format=torch.channels_last)
            fn = net if mode == "eager" else torch.compile(net)
            for batch in sorted(batches, reverse=True):
                if budget.left() < (30 if mode == "eager" else 90):
                    result["skipped"].append(f"torch {mode} {name} b{batch}: out of time")
                    continue
                x = torch.rand(batch, 3, SIZE, SIZE, device="cuda", dtype=torch.float16).to(
                    memory_format=torch.channels_last)

                def call(fn=fn, x=x):
                    with torch.no_grad():
                        fn(x)
                    torch.cuda.synchronize()

                try:
                    start = time.perf_counter()
                    call()
                    compiled = time.perf_counter() - start
                    t = _measure(timing, call, repeats)
                except Exception as exc:  # noqa: BLE001
                    result["errors"].append(f"torch {mode} {name} b{batch}: {exc}"[:500])
                    continue
                if mode == "compile":
                    result["torch"]["compile_seconds"][f"{name} b{batch}"] = round(compiled, 1)
                row = _row(name, f"torch-{mode}", "channels_last", "float16", batch, t)
                result["rows"].append(row)
                _say(row)
                _save(result, json_path)


# -- table -----------------------------------------------------------------------------

COLUMNS = (  # (heading, engine, config, precision); ORT with NHWC and CUDA graphs
    ("ORT FP32", "ort-cuda", "nhwc+graph", "fp32"),
    ("ORT FP16, fp32 I/O", "ort-cuda", "nhwc+graph", "fp16"),
    ("ORT FP16, fp16 I/O", "ort-cuda", "nhwc+graph", "fp16io"),
    ("ORT FP16, fp16 I/O, best options", "ort-cuda", "best", "fp16io"),
    ("Keras-JAX fp16", "keras-jax", None, "float16"),
    ("Keras-JAX bf16", "keras-jax", None, "bfloat16"),
    ("torch eager fp16", "torch-eager", None, "float16"),
    ("torch.compile fp16", "torch-compile", None, "float16"),
)

# H100 SXM dense FP16 tensor-core peak, and ResNet50's forward FLOPs per 224x224 image.
H100_FP16_FLOPS = 989e12
RESNET50_FLOPS = 8.2e9


def _cells(result) -> dict:
    cells = {}
    for r in result["rows"]:
        for heading, engine, config, precision in COLUMNS:
            if r["engine"] == engine and r["precision"] == precision and \
                    (config is None or r["config"] == config):
                cells[(r["model"], r["batch"], heading)] = r
    return cells


def _fmt(row, batch) -> str:
    if row is None:
        return "-"
    text = f"{row['images_per_s']:,.0f}"
    return f"{text} ({row['p50_ms']:.2f} ms)" if batch == 1 else text


def table(result) -> str:
    cells = _cells(result)
    columns = [c for c in COLUMNS if any(k[2] == c[0] for k in cells)]
    ort = result.get("ort", {})
    device = result.get("device", {}).get("name", "GPU")
    lines = [f"{device}; onnxruntime-gpu {ort.get('version', '-')}, "
             f"JAX {result.get('jax', {}).get('jax', '-')} with Keras "
             f"{result.get('jax', {}).get('keras', '-')}, PyTorch "
             f"{result.get('torch', {}).get('torch', '-')}; images/s at the median of >= "
             f"{result.get('repeats_at_least', 30)} calls (batch 1: and ms), inputs on the GPU; "
             "ORT columns: CUDA provider with prefer_nhwc and CUDA graphs",
             "",
             "| model | batch | " + " | ".join(c[0] for c in columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    models = [m for m in MODELS if any(r["model"] == m for r in result["rows"])]
    for model in models:
        for batch in result.get("batches", BATCHES):
            lines.append(f"| {model} | {batch} | " + " | ".join(
                _fmt(cells.get((model, batch, c[0])), batch) for c in columns) + " |")
    best = ort.get("best")
    if best:
        same = best["options"] == NHWC_GRAPH and best["opt_level"] == "all"
        lines += ["", f"ORT's fastest options ({best['chosen_from']}): {best['label']}, "
                      f"{best['options']}, graph optimization level {best['opt_level']}"
                      + (": the ORT FP16, fp16 I/O column" if same else "")]
    return "\n".join(lines)


def levers_table(result) -> str:
    rows = result.get("ort", {}).get("levers", [])
    if not rows:
        return ""
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    labels = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["batch"]): r for r in rows}
    lines = ["| ONNX Runtime CUDA options (resnet50, FP16, fp16 I/O) | "
             + " | ".join(f"batch {b}" for b in batches) + " |",
             "| --- | " + " | ".join("---:" for _ in batches) + " |"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_fmt(by.get((label, b)), b) for b in batches)
                     + " |")
    return "\n".join(lines)


def profile_summary(result) -> str:
    profile = result.get("ort", {}).get("profile", {})
    lines = []
    ort_prof = profile.get("ort_profiler", {})
    if ort_prof.get("by_op"):
        lines.append(f"ONNX Runtime profiler, resnet50 FP16 fp16 I/O, batch "
                     f"{profile.get('batch')}, "
                     f"options {profile.get('options')} (no CUDA graph: its replay hides nodes), "
                     f"CUDA_LAUNCH_BLOCKING=1: {ort_prof['nodes_ms_per_run']:.2f} ms of nodes "
                     f"per run ({ort_prof['wall_ms_per_run']:.2f} ms wall)")
        lines.append("| op type | nodes | ms per run | share |")
        lines.append("| --- | ---: | ---: | ---: |")
        for op, v in list(ort_prof["by_op"].items())[:12]:
            lines.append(f"| {op} | {v['nodes']} | {v['ms']:.3f} | {100 * v['share']:.1f}% |")
    for key, label in (("kernels", "ONNX Runtime"),):
        kernels = profile.get(key, {})
        if kernels.get("by_category"):
            lines += ["", _kernel_lines(f"GPU kernels (CUPTI), {label}", kernels)]
    jax_prof = result.get("jax", {}).get("profile", {})
    if jax_prof.get("by_category"):
        lines += ["", _kernel_lines("GPU kernels (CUPTI), Keras-JAX float16 (XLA)", jax_prof)]
    for variant in ("fp32", "fp16io"):
        graph = profile.get(f"optimized_graph_{variant}", {})
        if graph.get("ops"):
            ops = ", ".join(f"{k} {v}" for k, v in graph["ops"].items())
            lines += ["", f"ONNX Runtime's optimized graph, resnet50 {variant}: "
                          f"{graph['nodes']} nodes: {ops}"]
    return "\n".join(lines)


def _kernel_lines(title, kernels) -> str:
    lines = [f"{title}: {kernels['gpu_ms_per_run']:.2f} ms of kernels per run",
             "| kernel category | kernels per run | ms per run | share |",
             "| --- | ---: | ---: | ---: |"]
    for category, v in kernels["by_category"].items():
        lines.append(f"| {category} | {v['kernels']} | {v['ms']:.3f} | {100 * v['share']:.1f}% |")
    return "\n".join(lines)


def highlights(result) -> str:
    """The figures README.md and benchmarks/README.md quote, each from the JSON's rows."""
    cells = _cells(result)
    lines = []
    big = max(result.get("batches", BATCHES))

    def ips(model, batch, heading):
        row = cells.get((model, batch, heading))
        return row["images_per_s"] if row else None

    ort_rows = [r for r in result["rows"] if r["engine"] == "ort-cuda"
                and r["model"] == "resnet50"]
    for batch in (big, 1):
        at = [r for r in ort_rows if r["batch"] == batch]
        if not at:
            continue
        best = max(at, key=lambda r: r["images_per_s"])
        jax16 = ips("resnet50", batch, "Keras-JAX fp16")
        text = (f"resnet50 batch {batch}: tfopt's best ORT artifact {best['precision']} "
                f"{best['config']} {best['images_per_s']:,.0f} img/s ({best['p50_ms']:.3f} ms)")
        if jax16:
            text += (f"; Keras-JAX fp16 {jax16:,.0f} img/s; ORT/JAX "
                     f"{best['images_per_s'] / jax16:.2f}x")
        lines.append(text)
    b1 = [r for r in ort_rows if r["batch"] == 1]
    if b1:
        fastest = min(b1, key=lambda r: r["p50_ms"])
        lines.append(f"resnet50 batch 1 latency, best ORT: {fastest['p50_ms']:.3f} ms "
                     f"({fastest['precision']} {fastest['config']}); target 0.35 ms: "
                     f"{'met' if fastest['p50_ms'] <= 0.35 else 'not met'}")
    io16, io32 = ips("resnet50", big, "ORT FP16, fp16 I/O"), ips("resnet50", big,
                                                               "ORT FP16, fp32 I/O")
    if io16 and io32:
        lines.append(f"resnet50 batch {big}: fp16 I/O / fp32 I/O {io16 / io32:.3f}x")
    roofline = H100_FP16_FLOPS / RESNET50_FLOPS
    best_any = max((r for r in result["rows"] if r["model"] == "resnet50"),
                   key=lambda r: r["images_per_s"], default=None)
    if best_any:
        lines.append(f"resnet50 fastest engine: {best_any['engine']} {best_any['precision']} "
                     f"{best_any['config']} batch {best_any['batch']}: "
                     f"{best_any['images_per_s']:,.0f} img/s, "
                     f"{best_any['images_per_s'] / roofline:.1%} of the {roofline:,.0f} img/s "
                     "FP16 roofline")
    for entry in result.get("ort", {}).get("memory", []):
        if entry.get("device_bytes"):
            lines.append(f"GPU memory held, {entry['model']} {entry['variant']} batch "
                         f"{entry['batch']}: {entry['device_bytes'] / 2**20:,.0f} MB "
                         f"(host peak {entry['peak_rss_bytes'] / 2**20:,.0f} MB)")
    for name, entry in result.get("prepare", {}).get("models", {}).items():
        xla = entry.get("saved_model_xla")
        if xla:
            err = max(e["max_abs"] for e in xla["errors"].values())
            rel = max(e["max_rel"] for e in xla["errors"].values())
            lines.append(f"{name} saved_model_xla fp16: {xla['xla_functions']} function(s) "
                         f"with {xla['xla_attribute']}, validated on {xla['validated_on']}: "
                         f"max |diff| {err:.2e}, {rel:.1e} of the largest output")
    for problem in result.get("errors", []) + result.get("skipped", []):
        lines.append(f"not measured: {problem}")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu" / "models")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--no-xla", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--models", type=Path, default=ROOT / ".gpu" / "models")
    r.add_argument("--only", default=",".join(MODELS), help="models to run")
    r.add_argument("--sections", default="ort,jax,torch")
    r.add_argument("--json", type=Path, default=Path("gpu.json"))
    r.add_argument("--resume", type=Path)
    r.add_argument("--budget", type=float, default=560, help="seconds for this call")
    r.add_argument("--provider", default="CUDAExecutionProvider")
    r.add_argument("--batches", default=",".join(map(str, BATCHES)))
    r.add_argument("--repeats", type=int, default=30)
    t = sub.add_parser("table")
    t.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_h100.json")
    for verb in ("profile-ort", "profile-kernels-ort", "optimized-graph", "profile-kernels-jax"):
        v = sub.add_parser(verb)
        v.add_argument("--graph", default="")
        v.add_argument("--batch", type=int, default=256)
        v.add_argument("--options", default="{}")
        v.add_argument("--opt-level", default="all")
        v.add_argument("--provider", default="CUDAExecutionProvider")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out, tuple(args.models.split(",")), xla=not args.no_xla)
    elif args.step == "run":
        run(args.models, args.json, args.sections.split(","), args.resume, args.budget,
            args.provider, tuple(int(b) for b in args.batches.split(",")),
            tuple(args.only.split(",")), args.repeats)
    elif args.step == "table":
        result = json.loads(args.json.read_text())
        for part in (table(result), levers_table(result), profile_summary(result),
                     highlights(result)):
            if part:
                print(part)
                print()
    else:
        verbs = {"profile-ort": profile_ort, "profile-kernels-ort": profile_kernels_ort,
                 "optimized-graph": optimized_graph, "profile-kernels-jax": profile_kernels_jax}
        print(json.dumps(verbs[args.step](args)))


if __name__ == "__main__":
    main()

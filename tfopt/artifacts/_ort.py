"""ONNX Runtime runners (CPU, and CUDA with I/O binding). Needs no TensorFlow.

Imports only numpy, onnx and onnxruntime, so ``benchmarks/gpu_onnx.py`` can
use it on a GPU machine that has no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfopt._warn import warn_user
from tfopt.artifacts._runner import (Runner, find_manifest, manifest_io, ordered,
                                     portability_warning)


def onnx_precision(path: Path) -> str:
    """``int8`` for Q/DQ graphs, ``fp16`` for float16 weights, else ``fp32``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if any(n.op_type == "DequantizeLinear" for n in proto.graph.node):
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer):
        return "fp16"
    return "fp32"


def qdq_placement(proto) -> Optional[str]:
    """Which engine a Q/DQ graph's placement is for, read from the graph itself.

    ``"onnxruntime"``: uint8 activations (what tfopt's default INT8 export
    writes); ``"tensorrt"``: int8 everywhere with zero points 0; ``None``: no Q/DQ.
    """
    import onnx

    types = {i.name: i.data_type for i in proto.graph.initializer}
    zero_points = [types.get(n.input[2]) for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    if not zero_points:
        return None
    return "onnxruntime" if onnx.TensorProto.UINT8 in zero_points else "tensorrt"


def dequantized_note(path: Path, provider: str) -> str:
    """Why an INT8 file would run dequantized on ``provider`` (``""`` when it runs int8).

    ONNX Runtime's CUDA provider has no int8 convolution for Q/DQ graphs
    (onnxruntime#11201); its CPU provider fuses only the placement tfopt
    writes for it (uint8 activations), not TensorRT's (int8, zero points 0).
    Reports show the note, so a slowdown is not read as a result.
    """
    import onnx

    placement = qdq_placement(onnx.load(str(path), load_external_data=False))
    if placement is None:
        return ""
    if provider.startswith("CUDA"):
        return " (dequantized: no int8 kernels on ORT CUDA)"
    if placement == "tensorrt":
        return " (dequantized: TensorRT's Q/DQ placement)"
    return ""


def cuda_available() -> bool:
    """Whether onnxruntime can use the CUDA provider here."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def default_session_options():
    """ONNX Runtime's defaults, quiet, with worker threads that sleep when a run ends.

    By default ONNX Runtime's intra-op threads spin for a while after each
    run, waiting for the next. Where several sessions run in turn in one
    process (``tfopt bench`` interleaves engines; export validation runs
    several artifacts), those spinning threads take the CPU from whichever
    session runs next: on this 2-core machine a ResNet50 session timed right
    after another measured 40-100 ms at batch 1 instead of about 30.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def arithmetic_session_options():
    """:func:`default_session_options` with every graph optimization off.

    ONNX Runtime then computes each QuantizeLinear/DequantizeLinear and the
    float op between them as written, fusing nothing into integer kernels:
    the Q/DQ arithmetic a file specifies, the same on every CPU. Beside a
    default session it tells a wrong placement from a wrong kernel.
    """
    import onnxruntime as ort

    options = default_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def session(path: Path, provider: str = "CPUExecutionProvider", cuda_options=None,
            session_options=None):
    """An InferenceSession on exactly ``provider`` (ONNX Runtime falls back silently).

    ``session_options``: an ``onnxruntime.SessionOptions`` to use (profiling,
    optimization level, a dump of the optimized graph); default
    :func:`default_session_options`.
    """
    import onnxruntime as ort

    options = session_options if session_options is not None else default_session_options()
    chosen = [(provider, cuda_options or {})] if provider.startswith("CUDA") else [provider]
    sess = ort.InferenceSession(str(path), options, providers=chosen)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime could not use {provider} for {path} (it runs on "
                           f"{sess.get_providers()}); check the CUDA libraries.")
    return sess


def onnx_runners(path: Path, label: str = "onnx", providers: Optional[Sequence[str]] = None,
                 cuda_options: Optional[dict] = None, inputs: Optional[Sequence[str]] = None,
                 outputs: Optional[Sequence[str]] = None,
                 session_options=None) -> list[Runner]:
    """ONNX Runtime on the CPU, and with CUDA (I/O bound to the GPU) when present.

    ``cuda_options`` are CUDA execution provider options (for example
    ``{"prefer_nhwc": "1"}``). ``inputs``/``outputs`` give the names in the
    order the caller uses (default: the manifest beside the file, else the
    graph's own order). ``session_options``: see :func:`session`.
    """
    path = Path(path)
    precision = onnx_precision(path)
    if precision == "int8" and any(p.startswith("CPU") for p in (providers or ["CPU"])):
        warning = portability_warning(path)
        if warning:
            warn_user(warning)
    if inputs is None or outputs is None:
        spec_in, spec_out = manifest_io(find_manifest(path))
        inputs = inputs or ([i["name"] for i in spec_in] if spec_in else None)
        outputs = outputs or spec_out
    if providers is None:
        providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if cuda_available() else [])
    runners = []
    for provider in providers:
        sess = session(path, provider, cuda_options, session_options)
        names = ordered([i.name for i in sess.get_inputs()], inputs)
        outs = ordered([o.name for o in sess.get_outputs()], outputs)
        short = "CPU" if provider.startswith("CPU") else "CUDA"
        spec = {"loader": "onnx", "path": str(path), "provider": provider,
                "cuda_options": cuda_options or {}}
        dtypes = input_dtypes(sess, names)
        if short == "CUDA":
            graph = (cuda_options or {}).get("enable_cuda_graph") in ("1", 1, True)
            run = _cuda_bound_run(sess, names, outs, cuda_graph=graph, dtypes=dtypes)
            fetch = _fetch_ortvalues
        else:
            def run(arrays, sess=sess, names=names, outs=outs, dtypes=dtypes):
                return sess.run(outs, dict(zip(names, _as_dtypes(arrays, dtypes))))
            fetch = None
        note = dequantized_note(path, provider) if precision == "int8" else ""
        runners.append(Runner(f"{label} {precision}{note} / ORT {short}",
                              "ort_cpu" if short == "CPU" else "ort_cuda", path, run,
                              precision, tuple(outs), fetch, spec))
    return runners


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64}


def input_dtypes(sess, names) -> list:
    """The numpy dtype each float input of ``sess`` takes (None for other inputs)."""
    meta = {i.name: i.type for i in sess.get_inputs()}
    return [_ORT_DTYPES.get(meta[name]) for name in names]


def _as_dtypes(arrays, dtypes) -> list:
    """Float arrays cast to the dtype the graph takes (an FP16 export with float16 inputs)."""
    return [a if dtype is None or not np.issubdtype(np.asarray(a).dtype, np.floating)
            or np.asarray(a).dtype == dtype else np.asarray(a).astype(dtype)
            for a, dtype in zip(arrays, dtypes)]


def _fetch_ortvalues(values) -> list[np.ndarray]:
    return [v.numpy() if hasattr(v, "numpy") else np.asarray(v) for v in values]


def _cuda_bound_run(sess, names, outputs, cuda_graph: bool = False, dtypes=None):
    """Inputs kept on the GPU between calls with the same arrays, outputs left there.

    What is timed is the model's compute, as in a server that receives its
    batches already on the device. With ``cuda_graph`` the output buffers are
    allocated once too, since a captured CUDA graph replays fixed addresses.
    Float inputs are cast to the graph's input dtype (``dtypes``) once, when
    they are copied to the device.
    """
    import onnxruntime as ort

    cache: dict = {}
    meta = {o.name: o for o in sess.get_outputs()}

    def run(arrays):
        key = tuple((id(a), a.shape) for a in arrays)
        if cache.get("key") != key:
            cache["key"] = key
            cast = _as_dtypes(arrays, dtypes or [None] * len(arrays))
            cache["values"] = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)
                               for a in cast]
            batch = arrays[0].shape[0]
            cache["outputs"] = [ort.OrtValue.ortvalue_from_shape_and_type(
                [d if isinstance(d, int) else batch for d in meta[o].shape],
                _ORT_DTYPES.get(meta[o].type, np.float32), "cuda", 0) for o in outputs]
        binding = sess.io_binding()
        for name, value in zip(names, cache["values"]):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(outputs, cache["outputs"]):
            if cuda_graph:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, "cuda")
        sess.run_with_iobinding(binding)
        return cache["outputs"] if cuda_graph else binding.get_outputs()

    return run

"""ONNX Runtime runners (CPU, and CUDA with I/O binding). Needs no TensorFlow.

Imports only numpy, onnx and onnxruntime, so ``benchmarks/gpu_onnx.py`` can
use it on a GPU machine that has no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Runner:
    """A ready-to-time way of running one artifact."""

    name: str  # what the table shows, e.g. "onnx int8 / ORT CPU"
    backend: str  # keras_predict, keras_function, saved_model, ort_cpu, ort_cuda, tensorrt
    artifact: Optional[Path]
    run: Callable[[Sequence[np.ndarray]], object]  # returns the first output
    precision: str = "fp32"


def onnx_precision(path: Path) -> str:
    """``int8`` for Q/DQ graphs, ``fp16`` for float16 weights, else ``fp32``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if any(n.op_type == "DequantizeLinear" for n in proto.graph.node):
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer):
        return "fp16"
    return "fp32"


def cuda_available() -> bool:
    """Whether onnxruntime can use the CUDA provider here."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def onnx_runners(path: Path, label: str = "onnx", providers: Optional[Sequence[str]] = None,
                 cuda_options: Optional[dict] = None) -> list[Runner]:
    """ONNX Runtime on the CPU, and with CUDA (I/O bound to the GPU) when present.

    ``cuda_options`` are CUDA execution provider options (for example
    ``{"prefer_nhwc": "1"}``).
    """
    import onnxruntime as ort

    precision = onnx_precision(path)
    if providers is None:
        providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if cuda_available() else [])
    runners = []
    for provider in providers:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        chosen = [(provider, cuda_options or {})] if provider.startswith("CUDA") else [provider]
        session = ort.InferenceSession(str(path), options, providers=chosen)
        if session.get_providers()[0] != provider:  # ORT falls back silently otherwise
            raise RuntimeError(f"onnxruntime could not use {provider} for {path} (it runs on "
                               f"{session.get_providers()}); check the CUDA libraries.")
        names = [i.name for i in session.get_inputs()]
        output = session.get_outputs()[0].name
        short = "CPU" if provider.startswith("CPU") else "CUDA"
        if short == "CUDA":
            graph = (cuda_options or {}).get("enable_cuda_graph") in ("1", 1, True)
            run = _cuda_bound_run(session, names, output, cuda_graph=graph)
        else:
            def run(arrays, session=session, names=names, output=output):
                return session.run([output], dict(zip(names, arrays)))[0]
        runners.append(Runner(f"{label} {precision} / ORT {short}",
                              "ort_cpu" if short == "CPU" else "ort_cuda", Path(path), run,
                              precision))
    return runners


def _cuda_bound_run(session, names, output, cuda_graph: bool = False):
    """Inputs kept on the GPU between calls with the same arrays, output left there.

    What is timed is the model's compute, as in a server that receives its
    batches already on the device. With ``cuda_graph`` the output buffer is
    allocated once too, since a captured CUDA graph replays fixed addresses.
    """
    import onnxruntime as ort

    cache: dict = {}
    out_meta = session.get_outputs()[0]
    out_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(
        out_meta.type, np.float32)

    def run(arrays):
        key = tuple((id(a), a.shape) for a in arrays)
        if cache.get("key") != key:
            cache["key"] = key
            cache["values"] = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)
                               for a in arrays]
            batch = arrays[0].shape[0]
            shape = [d if isinstance(d, int) else batch for d in out_meta.shape]
            cache["output"] = ort.OrtValue.ortvalue_from_shape_and_type(shape, out_dtype, "cuda", 0)
        binding = session.io_binding()
        for name, value in zip(names, cache["values"]):
            binding.bind_ortvalue_input(name, value)
        if cuda_graph:
            binding.bind_ortvalue_output(output, cache["output"])
        else:
            binding.bind_output(output, "cuda")
        session.run_with_iobinding(binding)
        return cache["output"] if cuda_graph else binding.get_outputs()[0]

    return run

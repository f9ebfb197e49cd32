"""Runners: one callable per (artifact, backend), each taking a batch of inputs.

A runner is built once (sessions created, functions traced) and then called
repeatedly by the timer; what each backend needs lives here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Runner:
    """A ready-to-time way of running one artifact."""

    name: str  # what the table shows, e.g. "onnx int8 / ORT CPU"
    backend: str  # keras_predict, keras_function, saved_model, ort_cpu, ort_cuda, tensorrt
    artifact: Optional[Path]
    run: Callable[[Sequence[np.ndarray]], np.ndarray]  # returns the first output
    precision: str = "fp32"


def keras_runners(model: keras.Model, label: str = "keras") -> list[Runner]:
    """``model.predict`` (what users run by default) and the call under ``tf.function``."""
    single = len(model.inputs) == 1 if getattr(model, "inputs", None) else True

    def predict(arrays):
        out = model.predict(arrays[0] if single else list(arrays), verbose=0,
                            batch_size=len(arrays[0]))
        return keras.tree.flatten(out)[0]

    function = tf.function(lambda *xs: model(xs[0] if single else list(xs), training=False))

    def call(arrays):
        return keras.tree.flatten(function(*arrays))[0].numpy()

    return [Runner(f"{label} predict", "keras_predict", None, predict),
            Runner(f"{label} tf.function", "keras_function", None, call)]


def saved_model_runner(path: Path, label: str = "saved_model") -> Runner:
    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    names = list(serving.structured_input_signature[1])
    first_output = sorted(serving.structured_outputs)[0]

    def run(arrays):
        out = serving(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        return out[first_output].numpy()

    return Runner(f"{label} serving_default", "saved_model", Path(path), run)


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


def onnx_runners(path: Path, label: str = "onnx", providers: Optional[Sequence[str]] = None
                 ) -> list[Runner]:
    """ONNX Runtime on the CPU, and with CUDA (I/O bound to the GPU) when present."""
    import onnxruntime as ort

    precision = onnx_precision(path)
    if providers is None:
        providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if cuda_available() else [])
    runners = []
    for provider in providers:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=[provider])
        names = [i.name for i in session.get_inputs()]
        output = session.get_outputs()[0].name
        short = "CPU" if provider.startswith("CPU") else "CUDA"
        if short == "CUDA":
            run = _cuda_bound_run(session, names, output)
        else:
            def run(arrays, session=session, names=names, output=output):
                return session.run([output], dict(zip(names, arrays)))[0]
        runners.append(Runner(f"{label} {precision} / ORT {short}",
                              "ort_cpu" if short == "CPU" else "ort_cuda", Path(path), run,
                              precision))
    return runners


def _cuda_bound_run(session, names, output):
    """Inputs copied to the GPU once per call, output kept there: compute is what is timed."""
    import onnxruntime as ort

    def run(arrays):
        binding = session.io_binding()
        for name, array in zip(names, arrays):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        binding.bind_output(output, "cuda")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    return run


def tensorrt_runner(path: Path, signature, label: str = "tensorrt") -> Runner:
    from tfopt.export import _tensorrt

    return Runner(f"{label} / TensorRT", "tensorrt", Path(path),
                  lambda arrays: next(iter(_tensorrt.run_engine(path, signature, arrays).values())))

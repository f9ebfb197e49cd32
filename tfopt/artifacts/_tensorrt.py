"""TensorRT engines: deserialized once, buffers allocated once, only execution timed.

The runner deserializes the engine and creates its execution context when it
is built. Device buffers are allocated once per input shape and reused;
inputs are copied to the device only when the caller passes new arrays (a
server receives its batches there). A timed call is ``execute_async_v3``
plus the stream synchronization, nothing else.

Device memory comes from PyTorch's CUDA allocator by default (TensorRT's
Python API has none of its own); any object with the methods of
:class:`TorchCuda` can stand in for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfopt.artifacts._runner import Runner


class TorchCuda:
    """Device buffers, copies and a stream, through PyTorch."""

    def __init__(self):
        import torch

        self.torch = torch
        self.stream = torch.cuda.current_stream()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def empty(self, shape, dtype=np.float32):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, np.dtype(dtype).name),
                                device="cuda")

    def address(self, buffer) -> int:
        return buffer.data_ptr()

    def copy_in(self, buffer, array: np.ndarray) -> None:
        buffer.copy_(self.torch.from_numpy(np.ascontiguousarray(array)))

    def to_host(self, buffer) -> np.ndarray:
        return buffer.cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()


def tensorrt_runner(path: Path, inputs: Sequence[dict], outputs: Sequence[str], *,
                    label: str = "tensorrt", precision: str = "fp32", device=None,
                    trt=None) -> Runner:
    """A runner for a serialized engine (``model.plan``).

    Args:
        inputs: ``[{"name", "dtype"}, ...]`` in the caller's order (the
            manifest's ``signature.inputs``).
        outputs: Output names in order.
        device: Buffers/stream provider (default :class:`TorchCuda`).
        trt: The ``tensorrt`` module (default: imported, with a clear error).
    """
    if trt is None:
        from tfopt import _compat

        trt, _ = _compat.import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        from tfopt.errors import ExportValidationError

        raise ExportValidationError(f"TensorRT could not deserialize {path} (built by another "
                                    "TensorRT version or for another GPU?).")
    context = engine.create_execution_context()
    device = device or TorchCuda()
    names = [spec["name"] for spec in inputs]
    dtypes = {spec["name"]: np.dtype(spec.get("dtype", "float32")) for spec in inputs}
    buffers: dict = {}  # input shapes -> {tensor name: device buffer}
    state: dict = {"shapes": None, "sources": None}

    def bind(arrays):
        shapes = tuple(tuple(a.shape) for a in arrays)
        if shapes not in buffers:
            bound = {}
            for name, shape in zip(names, shapes):
                context.set_input_shape(name, shape)
                bound[name] = device.empty(shape, dtypes[name])
            for name in outputs:
                bound[name] = device.empty(tuple(context.get_tensor_shape(name)), np.float32)
            buffers[shapes] = bound
        bound = buffers[shapes]
        if state["shapes"] != shapes:
            for name, shape in zip(names, shapes):
                context.set_input_shape(name, shape)
            for name, buffer in bound.items():
                context.set_tensor_address(name, device.address(buffer))
            state["shapes"] = shapes
            state["sources"] = None
        sources = tuple(id(a) for a in arrays)
        if state["sources"] != sources:
            for name, array in zip(names, arrays):
                device.copy_in(bound[name], array.astype(dtypes[name], copy=False))
            state["sources"] = sources
        return bound

    def run(arrays):
        bound = bind(arrays)
        if not context.execute_async_v3(device.stream_handle):
            from tfopt.errors import ExportValidationError

            raise ExportValidationError(f"TensorRT failed to run {path}.")
        device.synchronize()
        return [bound[name] for name in outputs]

    def fetch(values):
        return [device.to_host(v) for v in values]

    return Runner(f"{label} / TensorRT", "tensorrt", Path(path), run, precision, tuple(outputs),
                  fetch, {"loader": "tensorrt", "path": str(path), "inputs": list(inputs),
                          "outputs": list(outputs)})

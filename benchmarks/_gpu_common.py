"""What the GPU benchmarks (gpu.py, gpu_onnx.py) share.

The GPU machine has ONNX Runtime, PyTorch and JAX but no TensorFlow, so
each benchmark has two halves: ``prepare`` exports graphs here with tfopt
(weights left behind: only graphs of a few hundred kB travel), and ``run``
fills the weights with random values on the GPU machine and times them with
tfopt's own timing and ONNX Runtime runner modules, loaded without
TensorFlow.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224  # keras.applications' input size for every model timed here


def keras_factories() -> dict:
    """``{name: keras.applications constructor}`` of the models the GPU benchmarks time."""
    import keras

    return {"mobilenetv2": keras.applications.MobileNetV2,
            "resnet50": keras.applications.ResNet50}


def export_graph(candidate, out: Path, stem: str, validation, *, size_threshold: int = 4096,
                 **export_kwargs):
    """``tfopt.export`` one ONNX and keep only its graph, as ``out/<stem>.onnx``.

    Tensors of ``size_threshold`` bytes or more (the weights; scales and
    zero points stay in the graph) are written as external data and deleted:
    ``run`` regenerates them on the GPU machine (:func:`fill_weights`).
    Returns the export's result, the ONNX proto and the graph's path.
    """
    import onnx

    import tfopt

    staging = out / f"tmp_{stem}"
    try:
        result = tfopt.export(candidate, staging, formats=("onnx",), validation_data=validation,
                              overwrite=True, **export_kwargs)
        proto = onnx.load(str(result.paths["onnx"]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    graph = out / f"{stem}.onnx"
    onnx.save(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{stem}.weights", size_threshold=size_threshold)
    (out / f"{stem}.weights").unlink(missing_ok=True)
    return result, proto, graph


def fill_weights(graph: Path, target: Path, seed: int = 0) -> None:
    """Write ``graph`` to ``target`` with every external weight filled at random.

    He-scaled normal values for floats, uniform int8 for Q/DQ weights: dense
    GPU kernels take as long whatever the values.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(graph), load_external_data=False)
    rng = np.random.default_rng(seed)
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        shape = tuple(tensor.dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if np.issubdtype(dtype, np.integer):
            values = rng.integers(-127, 128, size=shape).astype(dtype)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0], 1)
            values = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
        proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(proto, str(target))


def import_tfopt_bench():
    """tfopt's timing and ONNX Runtime runner modules, without tfopt's TensorFlow imports.

    Returns ``(tfopt.bench._timing, tfopt.artifacts._ort)``.
    """
    for package, path in (("tfopt", ROOT / "tfopt"), ("tfopt.bench", ROOT / "tfopt" / "bench"),
                          ("tfopt.artifacts", ROOT / "tfopt" / "artifacts"),
                          ("tfopt.targets", ROOT / "tfopt" / "targets")):
        module = types.ModuleType(package)
        module.__path__ = [str(path)]
        sys.modules.setdefault(package, module)
    modules = {}
    for package, name in (("bench", "_timing"), ("artifacts", "_runner"), ("artifacts", "_ort")):
        spec = importlib.util.spec_from_file_location(f"tfopt.{package}.{name}",
                                                      ROOT / "tfopt" / package / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["_timing"], modules["_ort"]


def device() -> dict:
    """The GPU, as ``nvidia-smi`` names it (``{"name": ..., "nvidia_smi": ...}``)."""
    info = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        info["nvidia_smi"] = out
        info["name"] = out.split(",")[0].strip() or "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        info["name"] = "unknown GPU"
    info["python"] = sys.version.split()[0]
    return info


def images(batch: int, dtype: str = "float32", seed=None):
    """A batch of random 224x224 RGB inputs in [0, 1) (seeded by the batch size by default)."""
    import numpy as np

    rng = np.random.default_rng(batch if seed is None else seed)
    return rng.uniform(size=(batch, SIZE, SIZE, 3)).astype(dtype)


def measure(timing, fn, repeats: int):
    """tfopt's timing of ``fn``: 10 warm-up calls, then ``repeats`` runs and at least 1 s."""
    return timing.measure(fn, warmup=10, repeats=repeats, min_seconds=1.0)

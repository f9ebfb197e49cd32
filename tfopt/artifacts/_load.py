"""Which runners apply to an artifact on disk, and loading one again from its spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tfopt.artifacts._runner import Runner, find_manifest, manifest_io


def kind(path: Path) -> Optional[str]:
    """``onnx``, ``openvino``, ``tensorrt``, ``saved_model`` or None for an artifact path."""
    path = Path(path)
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".xml" or (path.is_dir() and any(path.glob("*.xml"))
                                 and any(path.glob("*.bin"))):
        return "openvino"
    if path.suffix == ".plan":
        return "tensorrt"
    if path.is_dir() and (path / "saved_model.pb").exists():
        return "saved_model"
    return None


def load(path: Path, label: Optional[str] = None, *,
         openvino_modes=("latency",)) -> list[Runner]:
    """Every runner that applies to an exported artifact, each loaded once.

    * ``.onnx``: ONNX Runtime CPU, and CUDA where onnxruntime-gpu sees a GPU;
    * an OpenVINO IR (``.xml`` or its folder): OpenVINO CPU in f32, and in
      bf16 where the CPU has it, in each of ``openvino_modes``;
    * ``.plan``: TensorRT (needs the ``manifest.json`` written beside it);
    * a SavedModel folder: its ``serving_default`` on TensorFlow.
    """
    from tfopt.errors import ConfigError

    path = Path(path)
    found = kind(path)
    if found == "onnx":
        from tfopt.artifacts._ort import onnx_runners

        return onnx_runners(path, label or path.parent.name or "onnx")
    if found == "openvino":
        from tfopt.artifacts._openvino import openvino_runners

        return openvino_runners(path, label or "openvino", modes=openvino_modes)
    if found == "tensorrt":
        manifest = find_manifest(path)
        if manifest is None:
            raise ConfigError(f"A TensorRT engine is run with the manifest.json that "
                              f"tfopt.export wrote beside it (for its inputs); none next to {path}.")
        inputs, outputs = manifest_io(manifest)
        from tfopt.artifacts._tensorrt import tensorrt_runner

        return [tensorrt_runner(path, inputs, outputs, label=label or "tensorrt",
                                precision=manifest.get("precision", "fp32"))]
    if found == "saved_model":
        from tfopt.artifacts._tf import saved_model_runner

        return [saved_model_runner(path, label=label or "saved_model")]
    raise ConfigError(
        f"Don't know how to run {path}: expected an .onnx file, an OpenVINO IR (.xml, or "
        "its folder), a TensorRT .plan written by tfopt.export, or a SavedModel folder "
        "(with saved_model.pb).")


def from_spec(spec: dict) -> Runner:
    """Load a runner again from its :attr:`Runner.spec` (in another process)."""
    loader = spec["loader"]
    if loader == "onnx":
        from tfopt.artifacts._ort import onnx_runners

        (runner,) = onnx_runners(Path(spec["path"]), providers=[spec["provider"]],
                                 cuda_options=spec.get("cuda_options") or None)
        return runner
    if loader == "openvino":
        from tfopt.artifacts._openvino import openvino_runner

        return openvino_runner(Path(spec["path"]), precision=spec["precision"],
                               mode=spec["mode"], threads=spec.get("threads"))
    if loader == "saved_model":
        from tfopt.artifacts._tf import saved_model_runner

        return saved_model_runner(Path(spec["path"]))
    if loader == "tensorrt":
        from tfopt.artifacts._tensorrt import tensorrt_runner

        return tensorrt_runner(Path(spec["path"]), spec["inputs"], spec["outputs"])
    raise ValueError(f"Unknown runner spec {json.dumps(spec)}")

"""Triton Inference Server model repositories, configured with Triton's own protobuf."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tfopt.errors import BackendUnavailableError
from tfopt.export._signature import ModelSignature

# Triton backends and model file names, by the artifact they serve.
PLATFORMS = {
    "onnx": ("onnxruntime_onnx", "model.onnx"),
    "saved_model": ("tensorflow_savedmodel", "model.savedmodel"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
}


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailableError(
            "The 'triton' format writes config.pbtxt with Triton's model-config protobuf: "
            "pip install 'tritonclient[grpc]'"
        ) from exc
    return model_config_pb2


def _data_type(pb2, dtype) -> int:
    name = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32",
            "int64": "TYPE_INT64", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
            "bool": "TYPE_BOOL", "float64": "TYPE_FP64"}[np.dtype(dtype).name]
    return pb2.DataType.Value(name)


def write_repository(root: Path, name: str, version: int, source_kind: str, source: Path,
                     signature: ModelSignature, output_shapes: dict[str, tuple],
                     max_batch_size: int) -> Path:
    """Write ``root/name/config.pbtxt`` and ``root/name/<version>/<model file>``."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    platform, filename = PLATFORMS[source_kind]
    config = pb2.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size)
    for spec in signature.inputs:
        config.input.add(name=spec.name, data_type=_data_type(pb2, spec.dtype.as_numpy_dtype),
                         dims=[-1 if d is None else int(d) for d in spec.shape[1:]])
    for out_name in signature.outputs:
        shape, dtype = output_shapes[out_name]
        config.output.add(name=out_name, data_type=_data_type(pb2, dtype), dims=list(shape[1:]))
    config.dynamic_batching.SetInParent()
    model_dir = root / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    target = model_dir / str(version) / filename
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return model_dir


def read_config(path: Path):
    """Parse a config.pbtxt with Triton's protobuf (used by tests and `tfopt inspect`)."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse(Path(path).read_text(), pb2.ModelConfig())

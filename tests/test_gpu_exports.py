"""Exports for GPU serving without TensorRT: FP16 ONNX with float16 I/O, the XLA SavedModel,
and the GPU memory column of the bench. No GPU needed: XLA runs on the CPU here."""

import os
import types

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from keras import layers

import tfopt
from tfopt import errors
from tfopt.artifacts import _probe
from tfopt.export import _saved_model

from conftest import small_data
from test_export import subclassed_built
from test_pruning import functional, nested, sequential


def residual():
    """Conv, BatchNorm, ReLU, a residual add and a softmax head: ResNet's parts, 8x8."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    y = layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax", name="probs")(x),
                       name="residual")


def _io_types(path):
    proto = onnx.load(str(path))
    return ([i.type.tensor_type.elem_type for i in proto.graph.input],
            [o.type.tensor_type.elem_type for o in proto.graph.output], proto)


def test_fp16_io_onnx_takes_and_returns_float16_with_no_input_cast(tmp_path):
    model = residual()
    x, _ = small_data(16)
    plain = tfopt.export(model, tmp_path / "plain", formats=("onnx",), precision="fp16",
                         validation_data=x)
    edge = tfopt.export(model, tmp_path / "edge", formats=("onnx",), precision="fp16",
                        fp16_io=True, validation_data=x)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    ins, outs, _ = _io_types(plain.paths["onnx"])
    assert ins == [f32] and outs == [f32]
    ins, outs, proto = _io_types(edge.paths["onnx"])
    assert ins == [f16] and outs == [f16]
    # No Cast reads the input any more; the default FP16 export casts it.
    assert plain.manifest["artifacts"]["onnx"]["edge_casts"]["inputs"] == 1
    info = edge.manifest["artifacts"]["onnx"]
    assert info["edge_casts"]["inputs"] == 0
    assert info["io_dtypes"] == {"image": "float16", "probs": "float16"}
    first = next(n for n in proto.graph.node if "image" in n.input)
    assert first.op_type != "Cast"
    # Validated against Keras with the fp16 tolerance, and the runner takes float32 inputs.
    error = edge.errors["onnx"]["probs"]
    assert error["basis"].startswith("fp16") and error["max_abs"] <= error["tolerance"]
    (runner,) = tfopt.artifacts.load(edge.paths["onnx"])
    fresh = np.random.default_rng(5).normal(size=(4, 8, 8, 1)).astype("float32")
    out = runner(fresh)["probs"]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype("float32"), model(fresh).numpy(), atol=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp32", "fp16_io": True}, "needs precision='fp16'"),
    ({"precision": "fp16", "fp16_io": True, "formats": ("saved_model",)}, "add 'onnx'"),
    ({"precision": "fp16", "fp16_io": True, "formats": ("onnx", "triton")}, "separate call"),
    ({"precision": "fp16", "fp16_io": "yes"}, "fp16_io"),
])
def test_fp16_io_is_refused_where_it_does_not_apply(kwargs, match, tmp_path):
    kwargs.setdefault("formats", ("onnx",))
    with pytest.raises(errors.ConfigError, match=match):
        tfopt.export(residual(), tmp_path, **kwargs)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("make", [sequential, functional, nested, residual],
                         ids=["sequential", "functional", "nested", "residual"])
def test_xla_saved_model_fp16_keeps_xla_and_float16_and_matches_keras(make, tmp_path):
    model = make()
    weights = [w.copy() for w in model.get_weights()]
    x, _ = small_data(16)
    result = tfopt.export(model, tmp_path, formats=("saved_model", "saved_model_xla"),
                          precision="fp16", validation_data=x)
    path = result.paths["saved_model_xla"]
    assert path == tmp_path / "saved_model_xla" / "1"
    info = result.manifest["artifacts"]["saved_model_xla"]
    assert info["compute_dtype"] == "float16" and info["xla_functions"] >= 1
    # The attribute that makes TensorFlow compile the serving function with XLA survives
    # saving; the plain SavedModel has none.
    assert _saved_model.xla_functions(path)
    assert _saved_model.xla_functions(result.paths["saved_model"]) == []
    # Weights stored in float16, outputs float32, close to Keras but computed in float16.
    loaded = tf.saved_model.load(str(path))
    assert {v.dtype for v in loaded.variables} == {tf.float16}
    serving = loaded.signatures["serving_default"]
    fresh = np.random.default_rng(7).normal(size=(8, 8, 8, 1)).astype("float32")
    name = next(iter(serving.structured_input_signature[1]))
    (out,) = serving(**{name: fresh}).values()
    assert out.dtype == tf.float32
    reference = model(fresh).numpy()
    diff = np.abs(out.numpy() - reference)
    assert 0 < diff.max() <= 2e-2 * np.abs(reference).max() + 1e-3
    errors_ = result.errors["saved_model_xla"]
    assert all(e["basis"].startswith("fp16") for e in errors_.values())
    assert result.errors["saved_model"][next(iter(errors_))]["max_abs"] < diff.max()
    # The user's model is untouched: float32 policy and the same weights.
    assert model.dtype_policy.name == "float32"
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def test_xla_saved_model_fp32_serves_subclassed_models_and_fp16_refuses_them(tmp_path):
    model = subclassed_built()
    x, _ = small_data(8)
    signature = [tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")]
    result = tfopt.export(model, tmp_path / "fp32", formats=("saved_model_xla",),
                          input_signature=signature, validation_data=x)
    assert result.manifest["artifacts"]["saved_model_xla"]["compute_dtype"] == "float32"
    (error,) = result.errors["saved_model_xla"].values()
    assert error["max_abs"] < 1e-4
    with pytest.raises(errors.ConfigError, match="Functional or Sequential"):
        tfopt.export(model, tmp_path / "fp16", formats=("saved_model_xla",), precision="fp16",
                     input_signature=signature, validation_data=x)
    assert not (tmp_path / "fp16" / "saved_model_xla").exists()


def test_xla_saved_model_refuses_qat_models(tmp_path):
    x, _ = small_data(8)
    qat = tfopt.quantize(functional(), calibration_data=x)
    with pytest.raises(errors.ConfigError, match="saved_model_xla takes float models"):
        tfopt.export(qat, tmp_path, formats=("saved_model_xla",), validation_data=x)


# -- GPU memory in tfopt bench ------------------------------------------------------------

class _Process:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


def _fake_nvml(processes_by_device):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(processes_by_device),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: processes_by_device[handle])
    return fake, calls


def test_device_bytes_sums_this_process_over_gpus_from_nvml(monkeypatch):
    me = os.getpid()
    fake, calls = _fake_nvml([[_Process(me, 300 * 2**20), _Process(me + 1, 5 * 2**30)],
                              [_Process(me, 20 * 2**20)]])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    monkeypatch.setattr(_probe.subprocess, "run", lambda *a, **k: pytest.fail("nvidia-smi"))
    assert _probe._device_bytes() == 320 * 2**20
    assert calls == ["init", "shutdown"]
    # A process NVML does not list holds nothing there: fall back to nvidia-smi.
    fake_other, _ = _fake_nvml([[_Process(me + 1, 1)]])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake_other)
    smi = types.SimpleNamespace(stdout=f"{me + 1}, 10\n{me}, 1234\n")
    monkeypatch.setattr(_probe.subprocess, "run", lambda *a, **k: smi)
    assert _probe._device_bytes() == 1234 * 2**20


def test_device_bytes_is_none_without_a_gpu(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import fails

    def no_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(_probe.subprocess, "run", no_smi)
    assert _probe._device_bytes() is None


def test_bench_report_shows_gpu_memory_beside_latency():
    from tfopt.bench import BenchReport, BenchRow

    def row(name, backend, device_bytes):
        return BenchRow(name, backend, "fp16", 256, 10.0, 11.0, 12.0, 1.1, 25600.0, 2**20, 2**19,
                        None, "a", engine="", peak_rss_bytes=900 * 2**20,
                        device_bytes=device_bytes)

    report = BenchReport([row("m onnx fp16 / ORT CUDA", "ort_cuda", 1536 * 2**20),
                          row("m onnx fp16 / ORT CPU", "ort_cpu", None)], {})
    table = report.table().splitlines()
    header = table[0]
    assert header.index("items/s") < header.index("GPU MB") < header.index("size MB")
    cuda, cpu = table[2], table[3]
    assert cuda.split()[cuda.split().index("25600.0") + 1] == "1536"
    assert cpu.split()[cpu.split().index("25600.0") + 1] == "1.00"  # no GPU column value
    markdown = report.markdown().splitlines()
    assert "| items/s | GPU memory MB |" in markdown[0]
    assert "| 25600.0 | 1536 | 1.00 |" in markdown[2]
    assert "| 25600.0 |  | 1.00 |" in markdown[3]


def test_gpu_benchmark_table_is_printed_from_the_committed_run():
    """benchmarks/README.md quotes `python3 benchmarks/gpu.py table`: these figures come from it."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_bench", root / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    result = json.loads((root / "benchmarks" / "results" / "gpu_h100.json").read_text())
    table = gpu.table(result)
    assert "| resnet50 | 256 | 11,235 | 21,001 | 21,118 | 24,914 | 21,939 | 13,771 | 25,098 |" \
        in table
    highlights = gpu.highlights(result)
    assert "ORT/JAX 0.85x" in highlights and "target 0.35 ms: not met" in highlights
    assert "GPU memory held, resnet50 fp16io batch 256: 5,080 MB" in highlights
    summary = gpu.profile_summary(result)
    assert "| Add | 16 | 3.454 | 23.3% |" in summary
    assert gpu._categorize("void onnxruntime::cuda::_UnaryElementWise<__half, __half, "
                           "onnxruntime::cuda::OP_Relu<__half>, 256, 4>") == "relu"
    assert gpu._categorize("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc") == \
        "convolution"

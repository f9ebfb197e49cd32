"""The TensorRT engine builder, against a stand-in for the `tensorrt` module.

TensorRT's libraries cannot be installed on these machines. These tests check
what tfopt asks of TensorRT's Python API (flags per major version, the batch
profile, sparse weights, the timing cache) and the exporter's plumbing around
it; building and running a real engine needs a GPU machine with TensorRT.
"""

import json
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfopt
from tfopt.export import _onnx, _tensorrt
from tfopt.export._signature import ModelSignature

from test_pruning import functional


def fake_tensorrt(major: int, calls: list):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.4.0"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    flags = {"SPARSE_WEIGHTS": "SPARSE_WEIGHTS"}
    if major < 11:  # TensorRT 11 removed the precision flags
        flags.update(FP16="FP16", INT8="INT8")
    trt.BuilderFlag = types.SimpleNamespace(**flags)

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            calls.append(("cache_in", bytes(data)))
            self.cache = Cache(bytes(data))
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            assert cache is self.cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            calls.append(("parsed_bytes", len(data)))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


SIGNATURE = ModelSignature((tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image"),),
                           ("out",), None)


@pytest.mark.parametrize("major, precision, flags", [
    (11, "int8", []), (11, "fp16", []), (10, "fp16", ["FP16"]), (10, "int8", ["FP16", "INT8"]),
])
def test_precision_comes_from_the_graph_on_11_and_from_flags_on_10(
        major, precision, flags, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(major, calls))
    (tmp_path / "m.onnx").write_bytes(b"onnx-bytes")
    _tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", SIGNATURE,
                           precision=precision, batch_sizes=(1, 8, 64), sparse_weights=False,
                           timing_cache=tmp_path / "timing.cache")
    assert [c[1] for c in calls if c[0] == "flag"] == flags
    assert ("network_flags", 0) in calls
    assert ("profile", {"image": ((1, 8, 8, 1), (8, 8, 8, 1), (64, 8, 8, 1))}) in calls
    assert (tmp_path / "m.plan").read_bytes() == b"ENGINE"


def test_sparse_weights_and_the_timing_cache_is_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(11, calls))
    (tmp_path / "m.onnx").write_bytes(b"onnx-bytes")
    cache = tmp_path / "timing.cache"
    for _ in range(2):
        _tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", SIGNATURE,
                               precision="fp16", batch_sizes=(1, 1, 4), sparse_weights=True,
                               timing_cache=cache)
    assert [c for c in calls if c[0] == "cache_in"] == [("cache_in", b""),
                                                        ("cache_in", b"+tuned")]
    assert ("flag", "SPARSE_WEIGHTS") in calls


def test_export_builds_the_engine_from_its_onnx_and_keeps_the_timing_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(11, calls))

    def run_like_onnx(engine_path, signature, arrays):  # no GPU here: run the ONNX instead
        session = _onnx.session(engine_path.parent / "model.onnx")
        feed = {spec.name: array for spec, array in zip(signature.inputs, arrays)}
        return dict(zip(signature.outputs, session.run(None, feed)))

    monkeypatch.setattr(_tensorrt, "run_engine", run_like_onnx)
    model = functional()
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx", "tensorrt"), validation_data=x)
    assert result.paths["tensorrt"].read_bytes() == b"ENGINE"
    assert (tmp_path / "timing.cache").read_bytes() == b"+tuned"
    assert result.manifest["artifacts"]["tensorrt"]["sparse_weights"] is False
    assert [c[1] for c in calls if c[0] == "parsed_bytes"] == [result.sizes["onnx"]["raw"]]


def fake_runtime(trt, calls: list, output_width: int = 10):
    """Runtime -> engine -> context, counting every call the runner makes."""

    class Context:
        def __init__(self):
            self.shapes = {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            batch = next(iter(self.shapes.values()))[0]
            return (batch, output_width)

        def set_tensor_address(self, name, address):
            calls.append(("set_tensor_address", name))

        def execute_async_v3(self, stream):
            calls.append(("execute", stream))
            return True

    class Engine:
        def create_execution_context(self):
            calls.append(("create_execution_context",))
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize", bytes(data)))
            return Engine()

    trt.Runtime = Runtime
    return trt


class FakeDevice:
    """Host arrays standing in for CUDA buffers; counts allocations and copies."""

    stream_handle = 7

    def __init__(self, calls):
        self.calls = calls

    def empty(self, shape, dtype=np.float32):
        self.calls.append(("allocate", tuple(shape)))
        return np.zeros(shape, dtype)

    def address(self, buffer):
        return id(buffer)

    def copy_in(self, buffer, array):
        self.calls.append(("copy_in", array.shape))
        buffer[...] = array

    def to_host(self, buffer):
        self.calls.append(("to_host",))
        return buffer.copy()

    def synchronize(self):
        self.calls.append(("synchronize",))


def test_tensorrt_runner_loads_once_allocates_once_and_times_only_execution(tmp_path, monkeypatch):
    from tfopt.artifacts import _tensorrt as trt_runner

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime(fake_tensorrt(11, []), calls))
    monkeypatch.setattr(trt_runner, "TorchCuda", lambda: FakeDevice(calls))
    (tmp_path / "model.plan").write_bytes(b"ENGINE")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "precision": "int8", "artifacts": {"tensorrt": {"path": "model.plan"}},
        "signature": {"inputs": [{"name": "image", "shape": [None, 8, 8, 1], "dtype": "float32"}],
                      "outputs": [{"name": "out", "shape": [None, 10], "dtype": "float32"}]}}))
    (runner,) = tfopt.bench.runners_for(tmp_path / "model.plan")
    assert runner.backend == "tensorrt" and runner.precision == "int8"
    assert calls == [("deserialize", b"ENGINE"), ("create_execution_context",)]
    del calls[:]

    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    for _ in range(5):  # what bench times: the same batch, again and again
        runner.run([x])
    kinds = [c[0] for c in calls]
    assert kinds.count("execute") == 5 and kinds.count("synchronize") == 5
    assert kinds.count("allocate") == 2  # the input and the output buffer, once
    assert kinds.count("copy_in") == 1 and kinds.count("set_input_shape") == 2
    assert "to_host" not in kinds  # the outputs stay on the device while timed
    assert kinds.count("set_tensor_address") == 2
    assert runner([x])["out"].shape == (4, 10)

    del calls[:]
    runner.run([x[:2]])  # a new shape: new buffers, once
    runner.run([x[:2]])
    kinds = [c[0] for c in calls]
    assert kinds.count("allocate") == 2 and kinds.count("execute") == 2
    del calls[:]
    runner.run([x])  # back to the first shape: its buffers are reused
    assert [c[0] for c in calls].count("allocate") == 0


def test_bench_runs_an_exported_engine_with_the_signature_from_its_manifest(tmp_path, monkeypatch):
    from tfopt.artifacts import _tensorrt as trt_runner

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime(fake_tensorrt(11, []), calls))
    monkeypatch.setattr(trt_runner, "TorchCuda", lambda: FakeDevice(calls))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    result = tfopt.export(functional(), tmp_path, formats=("tensorrt",), validation_data=x,
                          tolerance=1e9)  # the stand-in engine returns zeros
    (runner,) = tfopt.bench.runners_for(result.paths["tensorrt"])
    assert runner.backend == "tensorrt" and runner.first([x]).shape == (4, 10)
    name = result.manifest["signature"]["inputs"][0]["name"]
    assert ("set_input_shape", name, (4, 8, 8, 1)) in calls


# -- 2:4 sparse weights: the pattern itself, layer by layer ---------------------

def stem_and_body():
    """A 3-channel stem (2:4 cannot group 3 channels) before layers that can be 2:4."""
    from keras import layers

    inputs = keras.Input((6, 6, 3), name="image")
    x = layers.Conv2D(8, 3, name="stem")(inputs)
    x = layers.Conv2D(8, 3, name="body")(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(4, name="head")(x))


def prune_and_strip(model, **kwargs):
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 3)).astype("float32")
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), **kwargs)
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, np.zeros((16, 4)), verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    return tfopt.strip(pruned), x


def test_two_four_is_found_per_layer_in_a_partly_pruned_model():
    from tfopt.pruning._api import n_m_weights

    # As recipes/resnet50_2to4_int8.yaml does: the stem is left out of 2:4 pruning.
    plain, _ = prune_and_strip(stem_and_body(), n_m=(2, 4), layers=lambda la: la.name != "stem")
    assert n_m_weights(plain) == {"stem/kernel": False, "body/kernel": True, "head/kernel": True}
    # Half zeros that are not 2:4 are not taken for it.
    unstructured, _ = prune_and_strip(stem_and_body())
    assert set(tfopt.sparsity(unstructured).values()) == {0.5}
    assert not any(n_m_weights(unstructured).values())


@pytest.mark.parametrize("n_m, sparse", [((2, 4), True), (None, False)])
def test_export_turns_sparse_weights_on_when_any_layer_is_two_four(n_m, sparse, tmp_path,
                                                                   monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(11, calls))
    monkeypatch.setattr(_tensorrt, "run_engine", lambda path, signature, arrays: {
        name: np.zeros((len(arrays[0]), 4), "float32") for name in signature.outputs})
    plain, x = prune_and_strip(stem_and_body(), n_m=n_m, layers=lambda la: la.name != "stem")
    result = tfopt.export(plain, tmp_path, formats=("tensorrt",), validation_data=x,
                          tolerance=1e9)
    assert (("flag", "SPARSE_WEIGHTS") in calls) is sparse
    artifact = result.manifest["artifacts"]["tensorrt"]
    assert artifact["sparse_weights"] is sparse
    assert artifact["two_four_weights"] == (["body/kernel", "head/kernel"] if sparse else [])

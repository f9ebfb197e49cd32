import hashlib
import json
import subprocess
import sys

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from keras import layers

import tfopt
from tfopt import errors
from tfopt.export import _onnx, _triton

from conftest import small_data
from test_pruning import Subclassed, functional, sequential


def two_in_two_out():
    a = keras.Input((6,), name="features")
    b = keras.Input((4,), name="context")
    h = layers.Dense(8, activation="relu", name="trunk")(layers.Concatenate()([a, b]))
    score = layers.Dense(1, name="score")(h)
    label = layers.Dense(3, activation="softmax", name="label")(h)
    return keras.Model([a, b], [score, label], name="two_heads")


def subclassed_built():
    model = Subclassed()
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


def tree_digest(path):
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


IMAGE = [tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")]


@pytest.mark.parametrize(
    "make, signature, feed",
    [
        (sequential, None, lambda: small_data(16)[0]),
        (functional, None, lambda: small_data(16)[0]),
        (subclassed_built, IMAGE, lambda: small_data(16)[0]),
        (two_in_two_out, None,
         lambda: {"features": np.random.default_rng(0).normal(size=(16, 6)).astype("float32"),
                  "context": np.random.default_rng(1).normal(size=(16, 4)).astype("float32")}),
    ],
    ids=["sequential", "functional", "subclassed", "two_in_two_out"],
)
def test_saved_model_and_onnx_match_keras_within_1e4_relative(make, signature, feed, tmp_path):
    model = make()
    data = feed()
    result = tfopt.export(model, tmp_path, validation_data=data, input_signature=signature)
    assert set(result.paths) == {"saved_model", "onnx"}
    for fmt, per_output in result.errors.items():
        for name, error in per_output.items():
            assert error["max_rel"] <= 1e-4, (fmt, name, error)
    # The errors reported are what the artifacts compute: run the ONNX here.
    session = _onnx.session(result.paths["onnx"])
    feeds = data if isinstance(data, dict) else {session.get_inputs()[0].name: data}
    outputs = zip(session.get_outputs(), session.run(None, feeds), keras.tree.flatten(model(data)))
    for output, value, reference in outputs:
        difference = float(np.max(np.abs(value - keras.ops.convert_to_numpy(reference))))
        assert result.errors["onnx"][output.name]["max_abs"] == pytest.approx(difference,
                                                                             rel=1e-3, abs=1e-7)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["formats"] == ["saved_model", "onnx"]
    for output in manifest["signature"]["outputs"]:
        assert output["shape"][0] is None and output["dtype"] == "float32"
    assert manifest["versions"]["tensorflow"] == tf.__version__
    assert manifest["validation"]["inputs"] == "validation_data"


def test_signature_names_inputs_and_outputs_after_the_model(tmp_path):
    result = tfopt.export(two_in_two_out(), tmp_path, formats=("saved_model", "onnx"))
    serving = tf.saved_model.load(str(result.paths["saved_model"])).signatures["serving_default"]
    inputs = serving.structured_input_signature[1]
    assert set(inputs) == {"features", "context"}
    assert all(spec.shape[0] is None for spec in inputs.values())  # dynamic batch
    assert set(serving.structured_outputs) == {"score", "label"}
    proto = onnx.load(str(result.paths["onnx"]))
    assert [i.name for i in proto.graph.input] == ["features", "context"]
    assert [o.name for o in proto.graph.output] == ["score", "label"]
    assert not any("keras_tensor" in i.name for i in proto.graph.input)


def test_saved_model_cli_shows_and_runs_the_serving_signature(tmp_path):
    result = tfopt.export(functional(), tmp_path, formats=("saved_model",),
                          validation_data=small_data(4)[0])
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    directory = str(result.paths["saved_model"])
    shown = subprocess.run(cli + ["show", "--dir", directory, "--tag_set", "serve",
                                  "--signature_def", "serving_default"],
                           capture_output=True, text=True, check=True).stdout
    name = result.manifest["signature"]["inputs"][0]["name"]
    assert f"inputs['{name}']" in shown and "outputs['out']" in shown and "(-1, 8, 8, 1)" in shown
    np.save(tmp_path / "x.npy", np.ones((2, 8, 8, 1), "float32"))
    ran = subprocess.run(cli + ["run", "--dir", directory, "--tag_set", "serve",
                                "--signature_def", "serving_default",
                                "--inputs", f"{name}={tmp_path / 'x.npy'}"],
                         capture_output=True, text=True, check=True).stdout
    assert "Result for output key out" in ran


def test_frozen_saved_model_frozen_graph_and_warmup_requests(tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    x = small_data(8)[0]
    result = tfopt.export(functional(), tmp_path, formats=("saved_model", "frozen_graph"),
                          validation_data=x, freeze=True, warmup=True)
    loaded = tf.saved_model.load(str(result.paths["saved_model"]))
    assert not loaded.signatures["serving_default"].variables  # constants only
    warmup = result.paths["saved_model"] / "assets.extra" / "tf_serving_warmup_requests"
    records = list(tf.data.TFRecordDataset(str(warmup)).as_numpy_iterator())
    assert len(records) == 8
    log = prediction_log_pb2.PredictionLog.FromString(records[0])
    assert log.predict_log.request.model_spec.signature_name == "serving_default"
    graph_def = tf.compat.v1.GraphDef.FromString(result.paths["frozen_graph"].read_bytes())
    ops = {node.op for node in graph_def.node}
    assert "VarHandleOp" not in ops and "ReadVariableOp" not in ops
    assert result.errors["frozen_graph"]["out"]["max_rel"] <= 1e-4


def test_frozen_graph_folds_batch_norm_into_the_convolution(tmp_path):
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    bn = layers.BatchNormalization(name="bn")
    x = layers.ReLU()(bn(x))
    model = keras.Model(inputs, layers.Dense(2, name="out")(layers.Flatten()(x)))
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4),
                    rng.uniform(0.5, 2, 4)])  # gamma, beta, moving mean, moving variance
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("frozen_graph",), validation_data=x)
    graph_def = tf.compat.v1.GraphDef.FromString(result.paths["frozen_graph"].read_bytes())
    ops = [node.op for node in graph_def.node]
    assert ops.count("Conv2D") == 1
    assert not {"Rsqrt", "Mul", "Sub", "FusedBatchNormV3"} & set(ops), ops
    assert result.errors["frozen_graph"]["out"]["max_rel"] <= 1e-4


def test_fp16_onnx_has_float16_weights_and_float32_io(tmp_path):
    x = small_data(16)[0]
    result = tfopt.export(functional(), tmp_path, formats=("onnx",), precision="fp16",
                          validation_data=x)
    proto = onnx.load(str(result.paths["onnx"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert 1e-7 < result.errors["onnx"]["out"]["max_rel"] < 2e-2


def test_fp16_onnx_keeps_the_sensitive_ops_in_float32(tmp_path):
    inputs = keras.Input((6,), name="features")
    x = layers.Dense(8, name="up")(inputs)
    x = layers.LayerNormalization(name="norm")(x)
    outputs = layers.Dense(4, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx",), precision="fp16",
                          validation_data=x)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(result.paths["onnx"])))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    sensitive = [n for n in proto.graph.node if n.op_type in _onnx.FP32_OPS]
    assert {n.op_type for n in sensitive} >= {"Softmax"}
    assert any(n.op_type in ("ReduceMean", "LayerNormalization") for n in sensitive)
    for node in sensitive:
        for name in [node.input[0], *node.output]:
            assert types[name] == onnx.TensorProto.FLOAT, (node.op_type, name)
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_triton_repository_parses_with_tritons_model_config(tmp_path):
    model = two_in_two_out()
    result = tfopt.export(model, tmp_path, formats=("triton",), version=3,
                          batch_sizes=(1, 4, 16))
    repo = result.paths["triton"]
    assert (repo / "3" / "model.onnx").is_file()
    config = _triton.read_config(repo / "config.pbtxt")
    assert config.name == "two_heads" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [6]), ("context", [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("score", [1]), ("label", [3])]
    assert not (tmp_path / "model.onnx").exists()  # the ONNX was only a means


def test_a_normalization_layers_constants_do_not_become_onnx_inputs(tmp_path):
    inputs = keras.Input((4,), name="features")
    x = layers.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[1.0, 4.0, 9.0, 16.0])(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx",), validation_data=x)
    proto = onnx.load(str(result.paths["onnx"]))
    assert [i.name for i in proto.graph.input] == ["features"]
    assert result.errors["onnx"]["out"]["max_rel"] <= 1e-4


def test_tf2onnx_graph_copies_are_collected_and_share_the_weights(tmp_path, monkeypatch):
    """Each tf2onnx pass deep-copies the graph: the dropped copies must not pile up, and
    the copies share the weights instead of duplicating them."""
    import copy

    from tf2onnx import optimizer

    original = dict(optimizer._optimizers)
    passes, collections, copies = [], [], []

    def recording(name, factory):
        def make():
            passes.append((name, len(collections)))
            return factory()
        return make

    monkeypatch.setattr(optimizer, "_optimizers",
                        type(optimizer._optimizers)((k, recording(k, f)) for k, f in original.items()))
    monkeypatch.setattr(_onnx.gc, "collect", lambda: collections.append(1))
    monkeypatch.setattr(_onnx, "_LARGE", 0)  # collect for this tiny graph too
    deepcopy = _onnx._CopiesSharingWeights.deepcopy

    def recording_copy(self, value, memo=None):
        made = deepcopy(self, value, memo)
        if hasattr(value, "get_nodes"):
            copies.append((value, made))
        return made

    monkeypatch.setattr(_onnx._CopiesSharingWeights, "deepcopy", recording_copy)
    model = keras.Sequential([keras.Input((200,)), layers.Dense(100), layers.Dense(3)])
    tfopt.export(model, tmp_path / "ok", formats=("onnx",),
                 validation_data=np.ones((2, 200), "float32"))
    assert passes, "tf2onnx ran no optimizer pass"
    # A collection precedes every pass: the pass k-th in line saw at least k collections.
    assert all(seen >= k for k, (_, seen) in enumerate(passes, 1))

    graph, backup = copies[0]
    values = {n.name: n.attr["value"] for n in graph.get_nodes() if n.type == "Const"}
    copied = {n.name: n.attr["value"] for n in backup.get_nodes() if n.type == "Const"}
    kernel = next(name for name, v in values.items() if list(v.t.dims) == [200, 100])
    assert copied[kernel] is values[kernel]  # 80 KB: shared
    assert all(copied[name] is not v for name, v in values.items()
               if 4 * np.prod(v.t.dims) < _onnx._SHARED_CONSTANT_BYTES)  # small: copied
    assert not {id(n) for n in graph.get_nodes()} & {id(n) for n in backup.get_nodes()}

    with pytest.raises(RuntimeError, match="mid-conversion"):
        with _onnx._collecting_between_optimizer_passes():
            raise RuntimeError("mid-conversion")
    assert optimizer.copy is copy


def test_tf2onnx_conversion_is_from_graph_defs_without_weights_imported_to_tensorflow(
        tmp_path, monkeypatch):
    """tfopt freezes and runs tf2onnx's from_graph_def stage by stage, so that fewer
    copies of the weights are alive at once: TensorFlow imports the graph without
    them, and the ONNX graph is the one TensorFlow's and tf2onnx's own functions give."""
    import tensorflow as tf
    import tf2onnx
    from onnx import numpy_helper

    model = keras.Sequential([keras.Input((16,)), layers.Dense(300, activation="gelu"),
                              layers.Dense(3)])
    calls = []
    convert = _onnx.convert
    monkeypatch.setattr(_onnx, "convert", lambda serve, signature, **kw: (
        calls.append((serve, signature, kw)), convert(serve, signature, **kw))[1])
    tfopt.export(model, tmp_path / "ok", formats=("onnx",),
                 validation_data=np.ones((2, 16), "float32"))
    serve, signature, kw = calls[0]

    largest_imported = []
    import_graph_def = tf.import_graph_def

    def recording_import(graph_def, *args, **kwargs):
        largest_imported.append(max(len(n.attr["value"].tensor.tensor_content)
                                    for n in graph_def.node if n.op == "Const"))
        return import_graph_def(graph_def, *args, **kwargs)

    monkeypatch.setattr(tf, "import_graph_def", recording_import)
    ours = convert(serve, signature, **kw)
    assert largest_imported and max(largest_imported) <= 1000  # the 16x300 kernel: 19200 bytes

    def upstream(graph_defs, input_names, output_names, opset):
        return tf2onnx.convert.from_graph_def(graph_defs.pop(), input_names=input_names,
                                              output_names=output_names, opset=opset)[0]

    monkeypatch.setattr(_onnx, "_from_graph_def", upstream)
    theirs = convert(serve, signature, **kw)

    def public_freeze(concrete):  # TensorFlow's public function, which tfopt bypasses
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2)
        frozen = convert_variables_to_constants_v2(concrete)
        return (frozen.graph.as_graph_def(), [t.name for t in frozen.inputs],
                [t.name for t in frozen.outputs])

    monkeypatch.setattr(_onnx._saved_model, "frozen_graph_def", public_freeze)
    upstream_only = convert(serve, signature, **kw)

    def content(proto):
        return (sorted(n.op_type for n in proto.graph.node),
                sorted(numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer),
                [i.name for i in proto.graph.input], [o.name for o in proto.graph.output])

    assert content(ours) == content(theirs) == content(upstream_only)


class TiedHead(layers.Layer):
    """GPT-2's output projection: logits against the transpose of the embedding table."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(self.embedding.embeddings))


def grappler_test_models():
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    x = layers.Conv2D(16, 3, groups=2, padding="same", name="grouped")(x)
    x = layers.GlobalAveragePooling2D()(x)
    cnn = keras.Model(inputs, layers.Dense(10, name="head")(x))

    tokens = keras.Input((6,), dtype="int32", name="tokens")
    embedding = layers.Embedding(50, 16, name="embed")
    h = embedding(tokens)
    h = h + layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = layers.LayerNormalization(name="ln")(h)
    h = layers.EinsumDense("btd,df->btf", output_shape=(None, 32), bias_axes="f",
                           name="ffn")(h)
    text = keras.Model(tokens, TiedHead(embedding, name="tied")(layers.Dense(16)(h)))
    rng = np.random.default_rng(0)
    for model in (cnn, text):  # no zero biases: grappler would drop their Add
        model.set_weights([rng.uniform(0.1, 1.0, w.shape) for w in model.get_weights()])
    return {"cnn": (cnn, np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")),
            "text": (text, np.random.default_rng(0).integers(0, 50, (4, 6)).astype("int32"))}


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "qat"])
@pytest.mark.parametrize("name", ["cnn", "text"])
def test_grappler_is_handed_no_weights_and_the_onnx_graph_is_the_one_it_gives_with_them(
        name, quantized, tmp_path, monkeypatch):
    """Weights kept out of grappler (placeholders in their place) give the same ONNX
    graph, the same ops and the same initializers, as grappler given the weights."""
    from onnx import numpy_helper
    from tf2onnx import tf_loader

    model, x = grappler_test_models()[name]
    if quantized:
        model = tfopt.quantize(model, calibration_data=x)
    calls = []
    convert = _onnx.convert
    monkeypatch.setattr(_onnx, "convert", lambda serve, signature, **kw: (
        calls.append((serve, signature, kw)), convert(serve, signature, **kw))[1])
    tfopt.export(model, tmp_path / "ok", formats=("onnx",), validation_data=x)
    serve, signature, kw = calls[0]

    handed = []
    optimize = tf_loader.tf_optimize

    def recording(input_names, output_names, graph_def):
        handed.append(sorted(n.name for n in graph_def.node if n.op == "Const"
                             and len(n.attr["value"].tensor.tensor_shape.dim) >= 2
                             and n.attr["dtype"].type == tf.float32.as_datatype_enum))
        return optimize(input_names, output_names, graph_def)

    monkeypatch.setattr(tf_loader, "tf_optimize", recording)
    with_weights = convert(serve, signature, **kw)
    assert handed[-1], "the test models' weights are constants in the frozen graph"
    monkeypatch.setattr(_onnx, "_GRAPPLER_WEIGHT_BYTES", 0)  # every weight of this tiny model
    without = convert(serve, signature, **kw)
    assert handed[-1] == []

    def content(proto):
        return (sorted(n.op_type for n in proto.graph.node),
                sorted(numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer),
                [i.name for i in proto.graph.input], [o.name for o in proto.graph.output])

    assert content(without) == content(with_weights)


def test_mobilenet_v2_exports_without_spurious_graph_inputs(tmp_path):
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    result = tfopt.export(model, tmp_path, validation_data=x)
    proto = onnx.load(str(result.paths["onnx"]))
    assert len(proto.graph.input) == 1
    for per_output in result.errors.values():
        assert all(e["max_rel"] <= 1e-4 for e in per_output.values())


def test_pruned_then_quantized_digits_cnn_exports(tmp_path):
    from tfopt.examples import digits_cnn

    x, y = small_data(64)
    pruned = tfopt.prune(digits_cnn(), tfopt.ConstantSparsity(0.5, frequency=1))
    pruned.compile(optimizer="adam",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, epochs=1, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    plain = tfopt.strip(pruned)
    float_result = tfopt.export(plain, tmp_path / "float", validation_data=x)
    assert float_result.max_rel_error <= 1e-4
    # The manifest's sparsity is that of the weights in the ONNX, read back from the file.
    proto = onnx.load(str(float_result.paths["onnx"]))
    kernels = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if len(i.dims) >= 2]
    in_onnx = sorted(float(np.mean(k == 0)) for k in kernels)
    assert sorted(float_result.manifest["sparsity"].values()) == pytest.approx(in_onnx)
    assert in_onnx == pytest.approx([0.5] * 4, abs=0.01)
    qat = tfopt.quantize(plain, calibration_data=x)
    int8_result = tfopt.export(qat, tmp_path / "int8", validation_data=x)
    assert int8_result.manifest["precision"] == "int8"
    # Pruning and quantizing clone the model; its input keeps its name.
    assert int8_result.manifest["signature"] == float_result.manifest["signature"]
    assert float_result.manifest["signature"]["inputs"][0]["name"] == "image"
    assert int8_result.errors["saved_model"]["logits"]["max_rel"] <= 1e-4
    assert int8_result.sizes["onnx"]["raw"] < 0.4 * float_result.sizes["onnx"]["raw"]


# -- safety --------------------------------------------------------------------

def test_existing_export_is_kept_unless_overwrite(tmp_path):
    x = small_data(4)[0]
    tfopt.export(functional(), tmp_path, validation_data=x)
    before = tree_digest(tmp_path)
    with pytest.raises(errors.ArtifactExistsError, match="overwrite=True"):
        tfopt.export(functional(), tmp_path, validation_data=x)
    assert tree_digest(tmp_path) == before
    tfopt.export(functional(), tmp_path, validation_data=x, overwrite=True)
    assert tree_digest(tmp_path) != before


def test_failure_mid_export_leaves_the_previous_export_byte_for_byte(tmp_path, monkeypatch):
    x = small_data(4)[0]
    tfopt.export(functional(), tmp_path, validation_data=x)
    before = tree_digest(tmp_path)

    def broken_save(proto, path):
        path.write_bytes(b"half an onnx file")
        raise KeyboardInterrupt("interrupted while writing model.onnx")

    monkeypatch.setattr(_onnx, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        tfopt.export(functional(), tmp_path, validation_data=x, overwrite=True)
    assert tree_digest(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_validation_failure_names_artifact_output_error_and_tolerance(tmp_path):
    x = small_data(8)[0]
    with pytest.raises(errors.ExportValidationError,
                       match=r"onnx: output 'out' differs .* above the tolerance .*\(fp16: "):
        tfopt.export(functional(), tmp_path, formats=("onnx",), precision="fp16",
                     validation_data=x, tolerance=1e-9)
    assert list(tmp_path.iterdir()) == []


# -- gated backends ------------------------------------------------------------

def test_tensorrt_without_tensorrt_names_the_package_and_writes_nothing(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; this checks the error where it is not")
    except ImportError:
        pass
    with pytest.raises(errors.BackendUnavailableError, match=r"pip install 'tfopt\[tensorrt\]'"):
        tfopt.export(functional(), tmp_path, formats=("onnx", "tensorrt"))
    assert list(tmp_path.iterdir()) == []


def test_tftrt_on_a_tensorflow_without_tensorrt_points_to_the_tensorrt_format(tmp_path):
    from tfopt import _compat

    if _compat.tensorflow_has_tensorrt():
        pytest.skip("this TensorFlow has TensorRT")
    with pytest.raises(errors.BackendUnavailableError, match="formats=\\('tensorrt',\\)"):
        tfopt.export(functional(), tmp_path, formats=("tftrt",))


# -- bad input -----------------------------------------------------------------

def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(errors.NotAKerasModelError):
        tfopt.export("model.keras", tmp_path)
    with pytest.raises(errors.ConfigError, match=r"Valid formats: \['saved_model'"):
        tfopt.export(functional(), tmp_path, formats=("tflite",))
    with pytest.raises(errors.ConfigError, match=r"has shape \(4, 7\).*expects \[None, 8, 8, 1\]"):
        tfopt.export(functional(), tmp_path, validation_data=np.zeros((4, 7), "float32"))
    with pytest.raises(errors.ModelNotBuiltError, match="input_signature"):
        tfopt.export(Subclassed(), tmp_path)
    with pytest.raises(errors.ConfigError, match="strip"):
        tfopt.export(tfopt.prune(functional(), tfopt.ConstantSparsity(0.5)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def _checkpoint_bytes(saved_model):
    return sum(p.stat().st_size for p in (saved_model / "variables").glob("variables.data*"))


def test_served_saved_models_hold_each_weight_once_and_no_training_state(tmp_path):
    x, _ = small_data(16)
    model = functional()
    weights = sum(w.nbytes for w in model.get_weights())
    served = tfopt.export(model, tmp_path / "float", formats=("saved_model",), validation_data=x)
    path = served.paths["saved_model"]
    assert weights <= _checkpoint_bytes(path) < weights + 4096
    model.export(str(tmp_path / "keras_export"), verbose=False)  # Keras' own: every variable twice
    assert _checkpoint_bytes(tmp_path / "keras_export") > 1.9 * weights
    loaded = tf.saved_model.load(str(path))
    assert len(loaded.variables) == len(model.get_weights())

    qat = tfopt.quantize(model, "int8", calibration_data=x)
    qat_served = tfopt.export(qat, tmp_path / "qat", formats=("saved_model",), validation_data=x)
    qat_path = qat_served.paths["saved_model"]
    loaded = tf.saved_model.load(str(qat_path))
    assert not [v.name for v in loaded.variables]  # no masks, ranges or step counters to train
    # each (masked) weight once, as float32 constants, beside the serving graph
    assert qat_served.sizes["saved_model"]["raw"] < 1.3 * served.sizes["saved_model"]["raw"]
    assert qat_served.errors["saved_model"]["out"]["max_abs"] == 0.0

"""Real architectures nobody here wrote: keras.applications and keras-hub backbones.

One architecture per family at its smallest input, with ``weights=None`` (and
keras-hub backbones from tiny configs, nothing downloaded), through prune ->
fit -> strip -> QAT with calibration; plus the graph shapes behind them
(operation nodes, shared layers, nested models), a rewrite that fails halfway,
N:M on a model with ineligible layers and export of subclassed models.
The whole zoo (every architecture, every export) is ``benchmarks/zoo.py``.
"""

import json
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import tfopt
from tfopt import errors
from tfopt.pruning import PruneLowMagnitude
from tfopt.pruning._api import wrappers as prune_wrappers
from tfopt.quantization import QuantizeWrapper
from tfopt.quantization._api import quant_wrappers

from test_pruning import Subclassed


def _hub():
    # keras-hub takes seconds to import: only the tests that use it pay for it.
    return pytest.importorskip("keras_hub")


def _tokens(n=4, length=16, segments=False):
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 500, size=(n, length)).astype("int32"),
         "padding_mask": np.ones((n, length), "int32")}
    if segments:
        x["segment_ids"] = np.zeros((n, length), "int32")
    return x


TEXT = dict(vocabulary_size=500, num_layers=2, hidden_dim=64, intermediate_dim=128)


def _application(name, side):
    def make():
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(side, side, 3), classes=10, classifier_activation=None)
        x = np.random.default_rng(0).uniform(0, 255, size=(4, side, side, 3)).astype("float32")
        return model, x
    return make


def _bert():
    model = _hub().models.BertBackbone(num_heads=2, max_sequence_length=32, **TEXT)
    return model, _tokens(segments=True)


def _gpt2():
    model = _hub().models.GPT2Backbone(num_heads=2, max_sequence_length=32, **TEXT)
    return model, _tokens()


def _vit():
    model = _hub().models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2,
                                      num_heads=2, hidden_dim=64, mlp_dim=128)
    return model, np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")


FAMILIES = {
    "MobileNetV3Small": _application("MobileNetV3Small", 32),  # x + 3.0: an ops.Add node
    "EfficientNetB0": _application("EfficientNetB0", 32),
    "ConvNeXtTiny": _application("ConvNeXtTiny", 32),
    "DenseNet121": _application("DenseNet121", 32),
    "NASNetMobile": _application("NASNetMobile", 32),
    "InceptionV3": _application("InceptionV3", 75),
    "BertBackbone": _bert,      # text encoder; a GetItem node
    "GPT2Backbone": _gpt2,      # decoder
    "ViTBackbone": _vit,        # vision transformer
}
# One fit() step traces the whole train step: worth it on a few, enough on the others.
FIT = {"MobileNetV3Small", "BertBackbone", "GPT2Backbone", "ViTBackbone"}


def _max_abs(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(keras.tree.flatten(a), keras.tree.flatten(b)))


def _targets(outputs):
    return keras.tree.map_structure(lambda t: np.zeros(t.shape, "float32"), outputs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_prune_strip_and_qat(family):
    model, x = FAMILIES[family]()
    before = model(x, training=False)
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, begin_step=0, frequency=1))
    if family in FIT:
        pruned.compile(optimizer="sgd", loss="mse")
        pruned.fit(x, _targets(before), batch_size=len(keras.tree.flatten(x)[0]), epochs=1,
                   verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
        values = list(tfopt.sparsity(pruned).values())
        assert values and np.mean(values) == pytest.approx(0.5, abs=0.02)
    else:  # masks start at ones: the pruned model computes what the model did
        assert _max_abs(before, pruned(x, training=False)) < 1e-4 * (1 + np.abs(
            keras.tree.flatten(before)[0]).max())
    plain = tfopt.strip(pruned)
    assert not tfopt.pruning.is_pruned(plain)
    reference = plain(x, training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays in float: tested below
        qat = tfopt.quantize(plain, calibration_data=x)
    assert tfopt.quantization.is_quantized(qat)
    scale = max(float(np.abs(t).max()) for t in keras.tree.flatten(reference))
    assert _max_abs(reference, qat(x, training=False)) < 0.25 * scale


def test_bert_prunes_and_quantizes_its_projections_and_exports(tmp_path):
    model, x = _bert()
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1))
    names = {w.layer.name for w in prune_wrappers(pruned)}
    # MultiHeadAttention's EinsumDense projections and the feed-forward Dense layers
    assert {"query", "key", "value", "attention_output", "feedforward_intermediate_dense",
            "feedforward_output_dense"} <= names
    plain = tfopt.strip(pruned)
    with pytest.warns(UserWarning) as caught:
        qat = tfopt.quantize(plain, calibration_data=x)
    summaries = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(summaries) == 1
    summary = summaries[0]
    for kept in ("LayerNormalization x5", "attention score", "MultiHeadAttention x2"):
        assert kept in summary, kept
    # the token, segment and position tables are int8 (one scale per row), not left in float
    assert "13 layer(s) and 3 lookup table(s) quantized" in summary
    assert "Embedding" not in summary.split("left in float")[1]
    quantized = {w.layer.name for w in quant_wrappers(qat)
                 if isinstance(w, QuantizeWrapper)}
    assert {"query", "key", "value", "attention_output"} <= quantized
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x,
                          placement="tensorrt")
    assert set(result.errors["onnx"]) == {"sequence_output", "pooled_output"}


def test_bert_int8_onnx_for_onnx_runtime_cpu_runs_its_projections_as_integer_kernels(tmp_path):
    # tf2onnx folds the Q of BERT's token, segment and position lookups into their
    # int8 tables (the position one read through Slice and Expand): the float graph
    # ONNX Runtime's quantizer starts from needs those tables in float.
    model, x = _bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tfopt.quantize(model, calibration_data=x)
    with pytest.warns(UserWarning, match="4 of 17 convolutions/matrix products run in float"):
        result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    assert set(result.errors["onnx"]) == {"sequence_output", "pooled_output"}
    # Every projection is an integer kernel; the attention score and context products
    # (2 layers x 2), float in the QAT model, stay float in the export.
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert (kernels["integer"], kernels["total"]) == (13, 17)
    # ... and it computes what the QAT model computes (a requantization of its tensors,
    # or ranges calibrated where QAT kept float, would be percents off)
    assert all(e["max_rel"] < 1e-3 for e in result.errors["onnx"].values()), result.errors


# -- the graph shapes behind those architectures ---------------------------------------

def _ops_and_shared():
    """Operation nodes (x + 3.0, GetItem, keras.ops), a shared layer, nested models."""
    inputs = keras.Input((6, 6, 4), name="image")
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = x + 3.0                                   # keras.src.ops.numpy.Add
    x = keras.ops.relu(x) * (1.0 / 6.0)           # Relu and Multiply operations
    shared = layers.Dense(8, name="shared")
    a = shared(layers.GlobalAveragePooling2D()(x))
    b = shared(layers.GlobalMaxPooling2D()(x))    # the same layer, a second node
    inner = keras.Sequential([keras.Input((8,)), layers.Dense(8, name="inner_dense")],
                             name="inner_seq")
    inner_in = keras.Input((8,))
    inner_func = keras.Model(inner_in, layers.Dense(8, name="func_dense")(inner_in),
                             name="inner_func")
    c = inner_func(inner(layers.Add()([a, b])))
    c = layers.Reshape((2, 4))(c)[:, 0]           # GetItem
    return keras.Model(inputs, layers.Dense(4, name="head")(c), name="ops_model")


def test_operation_nodes_shared_layers_and_nested_models_pass_through():
    model = _ops_and_shared()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 4)).astype("float32")
    expected = model(x)
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
    found = prune_wrappers(pruned)
    assert sorted(w.layer.name for w in found) == ["conv", "func_dense", "head",
                                                   "inner_dense", "shared"]
    shared = [op for op in pruned.operations if getattr(op, "name", "") == "pruned_shared"]
    assert len(shared) == 1 and len(shared[0]._inbound_nodes) == 2  # wrapped once, called twice
    np.testing.assert_allclose(pruned(x), expected, atol=1e-5)
    plain = tfopt.strip(pruned)
    np.testing.assert_allclose(plain(x), expected, atol=1e-5)
    qat = tfopt.quantize(plain, calibration_data=x)
    assert len([w for w in quant_wrappers(qat)
                if isinstance(w, QuantizeWrapper)]) == 5


def test_a_subclassed_model_nested_in_a_functional_one():
    inner = Subclassed()
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, layers.Dense(4, name="top")(inner(inputs)))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    expected = model(x)
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
    assert sorted(w.layer.name for w in prune_wrappers(pruned)) == ["conv", "hidden", "out",
                                                                    "top"]
    plain = tfopt.strip(pruned)
    assert not prune_wrappers(plain) and not prune_wrappers(inner)
    np.testing.assert_allclose(plain(x), expected, atol=1e-5)


# -- a failure leaves the model as it was ------------------------------------------------

class Block(layers.Layer):
    """A composite layer: rewritten in place, like MultiHeadAttention or TransformerEncoder."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = layers.MultiHeadAttention(2, 4, name="mha")
        self.ffn = layers.Dense(8, name="ffn")

    def call(self, x):
        return self.ffn(self.attention(x, x))


def _composite_model():
    inputs = keras.Input((5, 8))
    x = Block(name="block")(inputs)
    return keras.Model(inputs, layers.Dense(3, name="last")(x))


def _subclassed_composite():
    class Model(keras.Model):
        def __init__(self):
            super().__init__(name="sub_composite")
            self.block = Block(name="block")
            self.last = layers.Dense(3, name="last")

        def call(self, x, training=None):
            return self.last(self.block(x))

    model = Model()
    model(np.zeros((1, 5, 8), "float32"))
    return model


def _snapshot(model):
    objects = [(path, id(layer), type(layer).__name__)
               for path, layer in tfopt._tree.walk(model)]
    attrs = [(id(layer), sorted((k, id(v)) for k, v in vars(layer).items()
                                if isinstance(v, keras.layers.Layer)))
             for _, layer in tfopt._tree.walk(model)]
    weights = [(v.path, np.array(v.numpy())) for v in model.weights]
    config = json.dumps(model.get_config(), sort_keys=True, default=str)
    return objects, attrs, weights, config


def _assert_same(before, after):
    assert before[0] == after[0]
    assert before[1] == after[1]
    assert [p for p, _ in before[2]] == [p for p, _ in after[2]]
    for (_, a), (_, b) in zip(before[2], after[2]):
        np.testing.assert_array_equal(a, b)
    assert before[3] == after[3]


class _Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, cls, method, n):
    """Make ``cls.method`` raise on its n-th call (after n-1 changes went through)."""
    original = getattr(cls, method)
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Boom(f"{method} broken on call {n}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)


@pytest.mark.parametrize("make", [_composite_model, _subclassed_composite],
                         ids=["functional", "subclassed"])
@pytest.mark.parametrize("operation", ["prune", "quantize", "quantize_calibration", "strip"])
def test_a_rewrite_broken_halfway_leaves_the_model_as_it_was(make, operation, monkeypatch):
    model = make()
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    if operation == "strip":
        model = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
    before = _snapshot(model)
    # q, k, v, output projections, ffn, last: the failure comes after some swaps
    if operation == "prune":
        _fail_on_call(monkeypatch, PruneLowMagnitude, "build", 5)
        run = lambda: tfopt.prune(model, tfopt.ConstantSparsity(0.5))  # noqa: E731
    elif operation == "quantize":
        _fail_on_call(monkeypatch, QuantizeWrapper, "build", 5)
        run = lambda: tfopt.quantize(model)  # noqa: E731
    elif operation == "quantize_calibration":
        _fail_on_call(monkeypatch, QuantizeWrapper, "call", 3)
        run = lambda: tfopt.quantize(model, calibration_data=x)  # noqa: E731
    else:
        from tfopt import _compat

        calls = {"n": 0}
        original = _compat.replace_sublayer

        def broken(parent, old, new):
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Boom("replace_sublayer broken")
            original(parent, old, new)

        monkeypatch.setattr(_compat, "replace_sublayer", broken)
        run = lambda: tfopt.strip(model)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(_Boom):
            run()
    monkeypatch.undo()
    _assert_same(before, _snapshot(model))
    if operation != "strip":  # and the model can still be optimized
        again = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
        assert len(prune_wrappers(again)) == 6


# -- N:M on a whole model ------------------------------------------------------------

def _first_conv_on_one_channel():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, name="stem")(inputs)            # 1 input channel
    x = layers.DepthwiseConv2D(3, name="dw")(x)             # no input-channel axis
    x = layers.Conv2D(8, 1, name="pw")(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


def test_two_four_prunes_eligible_layers_and_lists_the_others_in_one_warning():
    model = _first_conv_on_one_channel()
    with pytest.warns(UserWarning) as caught:
        pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), n_m=(2, 4))
    messages = [str(w.message) for w in caught if "n_m=(2, 4)" in str(w.message)]
    assert len(messages) == 1
    assert "stem (Conv2D)" in messages[0] and "1 input channels" in messages[0]
    assert "dw (DepthwiseConv2D" in messages[0] and "strict=True" in messages[0]
    assert sorted(w.layer.name for w in prune_wrappers(pruned)) == ["head", "pw"]
    rng = np.random.default_rng(0)
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(rng.normal(size=(8, 8, 8, 1)), rng.normal(size=(8, 10)), verbose=0,
               callbacks=[tfopt.callbacks.PruningStep()])
    kernel = keras.ops.convert_to_numpy(tfopt.strip(pruned).get_layer("pw").kernel)
    groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
    assert np.all((groups == 0).sum(axis=1) == 2)


def test_two_four_strict_raises_naming_every_ineligible_layer_and_changes_nothing():
    model = _first_conv_on_one_channel()
    before = _snapshot(model)
    with pytest.raises(errors.IncompatibleShapeError) as info:
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), n_m=(2, 4), strict=True)
    assert "stem (Conv2D)" in str(info.value) and "dw (DepthwiseConv2D" in str(info.value)
    _assert_same(before, _snapshot(model))


# -- export of subclassed models --------------------------------------------------------

def test_export_infers_a_called_subclassed_models_signature_as_keras_does(tmp_path):
    model = Subclassed()
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    model(x[:1])
    result = tfopt.export(model, tmp_path / "called", validation_data=x)
    assert result.manifest["signature"]["inputs"][0]["shape"] == [None, 8, 8, 1]
    built = Subclassed()
    built.build((None, 8, 8, 1))
    assert tfopt.export(built, tmp_path / "built").max_abs_error < 1e-4


def test_export_infers_a_never_called_subclassed_models_signature_from_validation_data(
        tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1))  # float64: exported as float32
    result = tfopt.export(Subclassed(), tmp_path, validation_data=x)
    assert result.manifest["signature"]["inputs"][0] == {
        "name": "input", "shape": [None, 8, 8, 1], "dtype": "float32"}
    with pytest.raises(errors.ModelNotBuiltError, match="validation_data"):
        tfopt.export(Subclassed(), tmp_path / "none")


def test_exact_gelu_exports_to_onnx(tmp_path):
    # TensorFlow writes exact GELU with Erfc, an op ONNX does not have (ViT, DistilBERT).
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation=lambda t: keras.ops.gelu(t, approximate=False))(inputs)
    model = keras.Model(inputs, layers.Dense(3)(x))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx",), validation_data=x)
    assert result.max_abs_error < 1e-5


def test_grouped_convolutions_export_to_onnx_as_grouped_conv(tmp_path):
    # Keras's TensorFlow backend runs grouped convolutions (ConvNeXt's depthwise
    # Conv2D(groups=channels)) inside an XLA-compiled tf.function, which the frozen
    # graph keeps as a call tf2onnx cannot convert unless it is inlined first.
    import onnx

    inputs = keras.Input((8, 8, 8), name="image")
    x = layers.Conv2D(8, 3, groups=8, padding="same", name="depthwise")(inputs)
    x = layers.Conv2D(16, 1, groups=2, name="grouped")(x)
    model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx",), validation_data=x)
    assert result.max_abs_error < 1e-5
    graph = onnx.load(str(result.paths["onnx"])).graph
    groups = sorted(a.i for n in graph.node if n.op_type == "Conv"
                    for a in n.attribute if a.name == "group")
    assert groups == [2, 8]
    assert not any("PartitionedCall" in n.op_type for n in graph.node)


@pytest.mark.parametrize("rewrite", ["prune", "quantize"])
def test_rewriting_leaves_the_users_composite_layers_as_they_were(rewrite):
    # MultiHeadAttention's projections are rewritten inside a copy of the layer: the
    # user's model keeps its own (the zoo once found a keras-hub backbone quantized
    # in place, so its "float" export was the QAT graph).
    from tfopt.quantization import is_quantized

    inputs = keras.Input((4, 8))
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    model = keras.Model(inputs, layers.Dense(3)(attention(inputs, inputs)))
    x = np.random.default_rng(0).normal(size=(8, 4, 8)).astype("float32")
    before = np.asarray(model(x))
    sublayers = list(attention._flatten_layers(include_self=False, recursive=False))
    if rewrite == "prune":
        new = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
        assert {w.layer.name for w in prune_wrappers(new)} >= {"query", "key", "value"}
    else:
        new = tfopt.quantize(model, calibration_data=x)
        assert is_quantized(new)
    assert list(attention._flatten_layers(include_self=False, recursive=False)) == sublayers
    assert not prune_wrappers(model) and not is_quantized(model)
    assert model.get_layer("mha") is attention and new.get_layer("mha") is not attention
    np.testing.assert_array_equal(np.asarray(model(x)), before)

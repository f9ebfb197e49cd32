"""INT8 ONNX per engine: ONNX Runtime CPU's placement fuses, TensorRT's keeps TensorRT's rules.

Each ONNX Runtime fusion rule (``onnxruntime/core/optimizer/qdq_transformer/``)
is checked on a tiny QAT model built to need it: the export must run every
convolution and matrix product as an integer kernel, which is what ONNX
Runtime's optimized graph (``optimized_model_filepath``) shows.
"""

import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import layers
from onnx import numpy_helper

import tfopt
from tfopt import errors
from tfopt.export import _ort_quant


def optimized_ops(path) -> collections.Counter:
    """Op types of ONNX Runtime's optimized graph, at the level where QDQ fusions run."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                                   .graph.node)


def conv_bn(x, filters, name, kernel=3, activation=None):
    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation(activation)(x) if isinstance(activation, str) else (
        activation(x) if activation else x)


def head(x):
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dense(10, name="logits")(x)


def conv_bn_relu():
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "c1", activation="relu")
    x = conv_bn(x, 8, "c2", activation="relu")
    return keras.Model(inputs, head(x))


def relu6():
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "c1", activation=layers.ReLU(6.0))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(6.0)(x)
    x = conv_bn(x, 8, "project")
    return keras.Model(inputs, head(x))


def residual():
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "stem", activation="relu")
    y = conv_bn(x, 8, "branch_a", activation="relu")
    y = conv_bn(y, 8, "branch_b")
    x = layers.Activation("relu")(layers.Add()([x, y]))
    return keras.Model(inputs, head(x))


def concat():
    inputs = keras.Input((8, 8, 3), name="image")
    a = conv_bn(inputs, 4, "left", kernel=1, activation="relu")
    b = conv_bn(inputs, 4, "right", kernel=3, activation="relu")
    x = layers.Concatenate()([a, b])
    x = conv_bn(x, 8, "after", activation="relu")
    return keras.Model(inputs, head(x))


def padded_strided_swish():
    """EfficientNet's pattern: swish, ZeroPadding2D, a stride-2 depthwise convolution."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "expand", kernel=1, activation="swish")
    x = layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = layers.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.Activation("swish")(x)
    x = conv_bn(x, 8, "project", kernel=1)
    return keras.Model(inputs, head(x))


def padded_stem():
    """ResNet's stem: ZeroPadding2D on the NHWC input before a stride-2 convolution, and
    on the ReLU output before a stride-2 max pooling."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.ZeroPadding2D(3)(inputs)
    x = conv_bn(x, 8, "stem", kernel=7, activation="relu")
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, strides=2)(x)
    return keras.Model(inputs, head(x))


def hard_swish(x):
    """MobileNetV3's, written as it is there: tensor arithmetic, not a layer."""
    return layers.Multiply()([x, layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])


def squeeze_excite_hard_swish():
    """MobileNetV3's block: 1x1 expansion, hard swish, depthwise, squeeze-and-excite with a
    hard sigmoid gate (``x + 3.0``, a 0-d constant), 1x1 projection."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 16, "expand", kernel=1, activation=hard_swish)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = hard_swish(layers.BatchNormalization(name="dw_bn")(x))
    gate = layers.GlobalAveragePooling2D(keepdims=True)(x)
    gate = layers.Conv2D(8, 1, activation="relu", name="se_reduce")(gate)
    gate = layers.Conv2D(16, 1, name="se_expand")(gate)
    x = layers.Multiply()([x, layers.ReLU(6.0)(gate + 3.0) * (1.0 / 6.0)])
    x = conv_bn(x, 8, "project", kernel=1)
    return keras.Model(inputs, head(x))


def pointwise_head():
    """MobileNet's classifier: global pooling kept 4-D, a 1x1 Conv2D to the classes, Flatten."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 16, "features", activation="relu")
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = layers.Conv2D(10, 1, name="logits")(x)
    return keras.Model(inputs, layers.Flatten()(x))


def dense_block():
    """DenseNet's layer: a convolution whose output only joins a Concatenate, then a
    BatchNormalization over the concatenation (no convolution to fold it into)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "stem", activation="relu")
    grown = layers.Conv2D(4, 3, padding="same", use_bias=False, name="grow")(x)
    x = layers.Concatenate()([x, grown])
    x = layers.Activation("relu")(layers.BatchNormalization(name="concat_bn")(x))
    x = conv_bn(x, 8, "transition", kernel=1)
    return keras.Model(inputs, head(x))


def preactivation_after_pooling():
    """ResNetV2's stem: a max pooling, then the first block's pre-activation
    BatchNormalization and ReLU (no convolution before the BatchNorm to fold into)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "stem", activation="relu")
    x = layers.MaxPooling2D(2)(x)
    x = layers.Activation("relu")(layers.BatchNormalization(name="preact_bn")(x))
    x = conv_bn(x, 8, "block", kernel=1, activation="relu")
    return keras.Model(inputs, head(x))


def convnext_block():
    """ConvNeXt's block: a 7x7 depthwise convolution into a LayerNormalization (float by
    design), then a pointwise MLP."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 2, strides=2, name="stem")(inputs)
    x = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    y = layers.DepthwiseConv2D(7, padding="same", name="dw")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name="ln")(y)
    y = layers.Dense(32, activation="gelu", name="expand")(y)
    y = layers.Dense(8, name="project")(y)
    return keras.Model(inputs, head(layers.Add()([x, y])))


def dense_mlp():
    inputs = keras.Input((16,), name="features")
    x = layers.Dense(32, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x))


RULES = {
    # name: (model, ops that must be gone from the optimized graph, ops that must be there)
    "batchnorm folded, relu absorbed": (conv_bn_relu, {"BatchNormalization", "Relu"},
                                        {"QLinearConv"}),
    "clipped relu absorbed, depthwise": (relu6, {"Clip", "BatchNormalization"}, {"QLinearConv"}),
    "residual add": (residual, {"Add", "Relu"}, {"QLinearAdd", "QLinearConv"}),
    "concatenate": (concat, {"Concat"}, {"QLinearConcat", "QLinearConv"}),
    "padding folded, swish": (padded_strided_swish, {"Pad", "Sigmoid", "Mul"},
                              {"QLinearSigmoid", "QLinearMul", "QLinearConv"}),
    # the Pads fold into the convolution and the max pooling, not left in float
    "padded stem": (padded_stem, {"Pad", "DequantizeLinear"}, {"QLinearConv", "MaxPool"}),
    # a convolution whose reader stays float still writes uint8, so it runs as an integer
    # kernel: into a Concatenate, into a LayerNormalization
    "convolution into a concatenation": (dense_block, {"Conv"}, {"QLinearConv"}),
    "convolution into a layer normalization": (convnext_block, {"Conv"}, {"QLinearConv"}),
    # a BatchNorm with no convolution before it runs as a depthwise 1x1 integer convolution,
    # so the concatenation before it and the ReLU after it are integer too
    "batchnorm after a concatenation": (dense_block, {"Mul", "Add", "Concat", "Relu"},
                                        {"QLinearConcat", "QLinearConv"}),
    "batchnorm after a pooling": (preactivation_after_pooling, {"Mul", "Add", "Relu"},
                                  {"QLinearConv"}),
    "dense": (dense_mlp, {"MatMul", "Gemm", "Relu"}, set()),
    # the head, whose float output no Conv kernel could write, runs as a matrix product
    "1x1 convolution head": (pointwise_head, {"Conv"}, {"QLinearConv", "MatMulIntegerToFloat"}),
    # the hard swish and the gate run between integer kernels, so every convolution does
    "hard swish, squeeze-and-excite": (squeeze_excite_hard_swish, {"Relu", "Clip"},
                                       {"QLinearConv", "QLinearMul"}),
}


def test_a_pruned_and_stripped_pointwise_head_runs_as_an_integer_matrix_product(tmp_path):
    """After prune and strip the head's bias reaches ONNX through ops, not as an initializer;
    ONNX Runtime then fused a MatMul and its bias Add into a float Gemm (MobileNetV3 in the zoo)."""
    model = pointwise_head()
    randomize_batchnorm(model)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, begin_step=0, frequency=1))
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, np.zeros((32, 10), "float32"), epochs=1, verbose=0,
               callbacks=[tfopt.callbacks.PruningStep()])
    qat = tfopt.quantize(tfopt.strip(pruned), calibration_data=x)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert kernels["integer"] == kernels["total"] == 2, kernels
    assert kernels["ops"] == {"QLinearConv": 1, "MatMulIntegerToFloat": 1}, kernels


def computed_reshape_targets(proto):
    """Each Reshape's constant target computed from its input's shape at run time instead,
    as tf2onnx leaves Keras's Flatten in some runs: ``Shape -> Cast -> Slice -> Concat ->
    Cast``, the batch read from the input, in int32 (ONNX Runtime's own ReshapeFusion
    folds the pattern without the casts)."""
    initializers = {i.name: i for i in proto.graph.initializer}
    make, int32 = onnx.helper.make_node, onnx.TensorProto.INT32
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            rest = numpy_helper.to_array(initializers[node.input[1]])[1:].astype(np.int32)
            name = node.output[0]
            proto.graph.initializer.extend([
                numpy_helper.from_array(np.asarray([0]), f"{name}_begin"),
                numpy_helper.from_array(np.asarray([1]), f"{name}_end"),
                numpy_helper.from_array(rest, f"{name}_rest")])
            nodes += [
                make("Shape", [node.input[0]], [f"{name}_shape"]),
                make("Cast", [f"{name}_shape"], [f"{name}_shape32"], to=int32),
                make("Slice", [f"{name}_shape32", f"{name}_begin", f"{name}_end"],
                     [f"{name}_batch"]),
                make("Concat", [f"{name}_batch", f"{name}_rest"], [f"{name}_target32"], axis=0),
                make("Cast", [f"{name}_target32"], [f"{name}_target"],
                     to=onnx.TensorProto.INT64)]
            node.input[1] = f"{name}_target"
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def test_a_flatten_whose_target_is_computed_still_makes_the_head_an_integer_matrix_product(
        tmp_path, monkeypatch):
    """tf2onnx folds Flatten's run-time target into a constant in most runs only (CI saw
    one keep ``Shape -> Gather -> Slice -> Concat``): the head then stayed a Conv."""
    from tfopt.export import _onnx

    convert, converted = _onnx.convert, []
    monkeypatch.setattr(_onnx, "convert", lambda *a, **k: (
        converted.append(computed_reshape_targets(convert(*a, **k))), converted[-1])[1])
    qat, x = qat_of(pointwise_head)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    assert [n.op_type for n in converted[0].graph.node].count("Shape") == 2  # both Reshapes
    ops = optimized_ops(result.paths["onnx"])
    assert ops["MatMulIntegerToFloat"] == 1 and ops["QLinearConv"] == 1, ops
    assert not {"Shape", "Concat", "Conv"} & set(ops), ops
    (error,) = result.errors["onnx"].values()
    assert error["max_rel"] < 0.05


def test_computed_reshape_targets_become_constants_and_only_their_own_ops_go():
    """Two Reshapes share one Shape, which a graph output also reads: both targets become
    constants, the Slice/Concat/Cast feeding only them go, the Shape stays."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    make, int64 = onnx.helper.make_node, onnx.TensorProto.INT64
    nodes = [make("Shape", ["x"], ["shape"]),
             make("Slice", ["shape", "zero", "one"], ["batch"]),
             make("Concat", ["batch", "twelve"], ["flat_target"], axis=0),
             make("Concat", ["batch", "two_six"], ["split_target"], axis=0),
             make("Cast", ["flat_target"], ["flat_target64"], to=int64),
             make("Reshape", ["x", "flat_target64"], ["flat"]),
             make("Reshape", ["x", "split_target"], ["split"])]
    constants = {"zero": [0], "one": [1], "twelve": [12], "two_six": [2, 6]}
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                        ["n", 4, 3])],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in ("flat", "split")] + [onnx.helper.make_tensor_value_info("shape", int64,
                                                                              None)],
        [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in constants.items()])
    model = SymbolicShapeInference.infer_shapes(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype("float32")
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    ranges = {"batch": 1.0, "x": 2.0}
    assert _ort_quant._constant_reshape_targets(model.graph, ranges) == 2
    assert [n.op_type for n in model.graph.node] == ["Shape", "Reshape", "Reshape"]
    targets = {i.name: numpy_helper.to_array(i).tolist() for i in model.graph.initializer}
    assert sorted(targets.values()) == [[-1, 2, 6], [-1, 12]], targets
    assert ranges == {"x": 2.0}  # the ranges of tensors gone are dropped
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def randomize_batchnorm(model, seed=0):
    """Give BN non-trivial statistics, negative scales included, so folding is tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n),
                               rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2.0, n)])


def qat_of(make, n=32, seed=0):
    model = make()
    randomize_batchnorm(model, seed)
    shape = model.inputs[0].shape[1:]
    x = np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")
    return tfopt.quantize(model, calibration_data=x), x


@pytest.mark.parametrize("rule", list(RULES))
def test_each_onnx_runtime_fusion_rule_on_a_tiny_graph(rule, tmp_path):
    make, gone, present = RULES[rule]
    qat, x = qat_of(make)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert kernels["integer"] == kernels["total"] > 0, kernels
    assert kernels["float_weights"] == []  # every weight int8 in the file (OpenVINO needs that)
    ops = optimized_ops(result.paths["onnx"])
    assert not gone & set(ops), ops
    assert present <= set(ops), ops
    assert not {"Conv", "MatMul", "Gemm"} & set(ops), ops
    # The output stays float, and the export still matches the Keras QAT model.
    output = onnx.load(str(result.paths["onnx"])).graph.output[0]
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (error,) = result.errors["onnx"].values()
    assert error["max_rel"] < 0.05


def test_cpu_placement_has_scalar_zero_points_uint8_activations_and_int32_biases(tmp_path):
    qat, x = qat_of(conv_bn_relu)
    path = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x).paths["onnx"]
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    activation_q = [n for n in proto.graph.node
                    if n.op_type == "QuantizeLinear" and n.input[0] not in values]
    assert activation_q
    for node in activation_q:
        assert len(node.input) == 3 and values[node.input[2]].shape == ()
        assert values[node.input[2]].dtype == np.uint8
    biases = [values[n.input[0]] for n in proto.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in values
              and values[n.input[0]].dtype == np.int32]
    assert len(biases) == 2  # one per convolution, BatchNorm's shift folded in


@pytest.mark.parametrize("make", [conv_bn_relu, dense_mlp])
def test_cpu_placement_saturates_where_qat_ranges_clip(make, tmp_path):
    """A QAT range narrower than its data clips in Keras; the ONNX file must clip there too.

    A short fine-tune of a wide Dense leaves ranges like this (VGG16 in the zoo was
    100% off Keras when ReLU outputs saturated at twice the trained maximum).
    """
    qat, x = qat_of(make)
    for layer in qat.layers:
        for variable in layer.non_trainable_variables:
            if variable.name.endswith("amax"):
                variable.assign(variable.numpy() * 0.25)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = np.asarray(qat(x, training=False))
    assert np.max(np.abs(got - want)) <= 0.05 * np.max(np.abs(want))


def test_zero_padding_of_a_signed_tensor_stays_before_max_pooling(tmp_path):
    # Zero is not the least value of a tensor that can be negative: there, padding
    # with zeros changes the maximum, so the Pad must stay.
    inputs = keras.Input((8, 8, 3), name="image")
    x = conv_bn(inputs, 8, "c1")  # no activation: negative values
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, strides=2)(x)
    model = keras.Model(inputs, layers.Dense(4, name="logits")(layers.Flatten()(x)))
    randomize_batchnorm(model)
    x = -np.abs(np.random.default_rng(0).normal(size=(16, 8, 8, 3))).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    assert "Pad" in {n.op_type for n in onnx.load(str(result.paths["onnx"])).graph.node}
    want = np.asarray(qat(x, training=False))
    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    assert np.max(np.abs(got - want)) <= 0.05 * np.max(np.abs(want))


def weight_tensors(path):
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return sorted((values[n.input[0]] for n in proto.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in values
                   and values[n.input[0]].dtype == np.int8), key=lambda w: w.shape)


def test_batchnorm_folding_keeps_the_int8_weights_qat_trained(tmp_path):
    """Folding scales each channel: the int8 values stay, up to BN's sign per channel."""
    qat, x = qat_of(conv_bn_relu)
    cpu = tfopt.export(qat, tmp_path / "cpu", formats=("onnx",), validation_data=x)
    trt = tfopt.export(qat, tmp_path / "trt", formats=("onnx",), validation_data=x,
                       placement="tensorrt")
    folded = weight_tensors(cpu.paths["onnx"])
    trained = weight_tensors(trt.paths["onnx"])
    assert [w.shape for w in folded] == [w.shape for w in trained]
    for a, b in zip(folded, trained):
        axis = 0 if a.ndim == 4 else 1  # Conv OIHW, MatMul (in, out)
        reduce = tuple(d for d in range(a.ndim) if d != axis)
        sign = np.sign((a.astype(int) * b).sum(axis=reduce, keepdims=True))
        assert np.array_equal(a, b * sign)
    # Negative BN scales were there to be folded.
    gammas = [la.gamma.numpy() for la in qat.layers if isinstance(la, layers.BatchNormalization)]
    assert any((g < 0).any() for g in gammas)


def test_a_batchnorm_without_a_convolution_becomes_its_own_factors_on_the_weight_grid(tmp_path):
    """Each channel's depthwise weight dequantizes to BatchNorm's factor, exactly: one value
    per channel lands on the end of the portable grid."""
    qat, x = qat_of(dense_block)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    proto = onnx.load(str(result.paths["onnx"]))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    (dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
             and n.input[0].endswith("_tfopt_depthwise_weight_quantized")]
    weight, scale = values[dq.input[0]], values[dq.input[1]]
    assert np.array_equal(np.abs(weight.ravel()), np.full(weight.size, 64))
    bn = qat.get_layer("concat_bn")
    factor = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    np.testing.assert_allclose(weight.ravel() * scale, factor, rtol=1e-6)
    assert result.manifest["artifacts"]["onnx"]["int8_portability"]["portable"]


def assert_tensorrt_explicit_quantization(proto):
    """TensorRT's rules: int8 only, zero points 0, per-channel weight scales on the output
    axis, Q/DQ on every Conv/MatMul input and on both inputs of residual Adds."""
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = values[node.input[2]]
            assert zero.dtype == np.int8 and np.all(zero == 0), node.name

    def from_dq(name):  # through layout ops tf2onnx puts between DQ and its consumer
        node = producers.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose", "Squeeze"):
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert compute
    for node in compute:
        assert from_dq(node.input[0]) and from_dq(node.input[1]), node.name
    adds = [n for n in proto.graph.node if n.op_type == "Add"
            and not any(i in values for i in n.input)]
    for node in adds:
        assert all(from_dq(i) for i in node.input), node.name
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in values:
            weight, scale = values[node.input[0]], values[node.input[1]]
            assert weight.dtype == np.int8 and weight.min() >= -127
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert scale.shape == (weight.shape[axis],)
    return len(adds)


def test_tensorrt_placement_follows_tensorrt_explicit_quantization_rules(tmp_path):
    qat, x = qat_of(residual)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x,
                          placement="tensorrt")
    assert assert_tensorrt_explicit_quantization(onnx.load(str(result.paths["onnx"]))) == 1
    artifact = result.manifest["artifacts"]["onnx"]
    assert artifact["qdq_placement"] == "tensorrt"
    # On ONNX Runtime's CPU provider nothing of it fuses: the reason the default differs.
    assert artifact["ort_cpu_kernels"]["integer"] == 0
    assert result.errors["onnx"]["logits"]["max_rel"] < 1e-5  # the QAT graph, as Keras runs it


def test_tensorrt_planted_violation_is_caught_by_the_checker(tmp_path):
    """The checker above can fail: a uint8 zero point (ORT's placement) breaks it."""
    qat, x = qat_of(residual)
    path = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x).paths["onnx"]
    with pytest.raises(AssertionError):
        assert_tensorrt_explicit_quantization(onnx.load(str(path)))


def test_manifest_and_inspect_name_the_placement_and_count_integer_kernels(tmp_path):
    qat, x = qat_of(residual)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    artifact = result.manifest["artifacts"]["onnx"]
    assert artifact["qdq_placement"] == "onnxruntime"
    assert artifact["ort_cpu_kernels"]["integer"] == artifact["ort_cpu_kernels"]["total"] == 4
    shown = subprocess.run([sys.executable, "-m", "tfopt.cli", "inspect", result.paths["onnx"]],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "placed for onnxruntime" in shown.stdout
    assert "4 of 4 convolutions/matrix products run as integer kernels" in shown.stdout


def test_layers_left_in_float_are_named_in_one_warning(tmp_path):
    """Attention scores (two activations multiplied) stay float in QAT, and are named."""
    inputs = keras.Input((6, 16), name="tokens")
    x = layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(inputs, inputs)
    x = layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, layers.Dense(4, name="logits")(x))
    x = np.random.default_rng(0).normal(size=(16, 6, 16)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    with pytest.warns(UserWarning, match=r"of \d+ convolutions/matrix products run in float") \
            as record:
        result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    assert len([w for w in record if "run in float" in str(w.message)]) == 1
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert 0 < kernels["integer"] < kernels["total"]


def test_unknown_placement_names_the_valid_ones(tmp_path):
    qat, x = qat_of(dense_mlp)
    with pytest.raises(errors.ConfigError, match=r"'tensorrt'.*'onnxruntime'|'onnxruntime'"):
        tfopt.export(qat, tmp_path, formats=("onnx",), placement="trt")
    assert not any(tmp_path.iterdir())


def test_bench_labels_an_int8_file_that_runs_dequantized(tmp_path):
    from tfopt.artifacts._ort import dequantized_note

    qat, x = qat_of(conv_bn_relu)
    cpu = tfopt.export(qat, tmp_path / "cpu", formats=("onnx",), validation_data=x)
    trt = tfopt.export(qat, tmp_path / "trt", formats=("onnx",), validation_data=x,
                       placement="tensorrt")
    assert dequantized_note(cpu.paths["onnx"], "CPUExecutionProvider") == ""
    assert "TensorRT" in dequantized_note(trt.paths["onnx"], "CPUExecutionProvider")
    assert "no int8 kernels" in dequantized_note(cpu.paths["onnx"], "CUDAExecutionProvider")
    names = [r.name for r in tfopt.bench.runners_for(trt.paths["onnx"])
             if r.backend == "ort_cpu"]
    assert names == ["trt int8 (dequantized: TensorRT's Q/DQ placement) / ORT CPU"]  # label: folder

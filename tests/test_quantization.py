import logging

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from keras import layers
from onnx import numpy_helper

import tfopt
from tfopt import errors
from tfopt.quantization import QuantizeInputs, QuantizeWrapper

from conftest import small_data
from test_pruning import KINDS, functional


def fit(model, epochs=1, x=None, y=None):
    if x is None:
        x, y = small_data()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model


def onnx_qdq(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in model.graph.node if n.op_type == "Constant"}
    inits.update(consts)
    return model, inits


def residual_model():
    inputs = keras.Input((8, 8, 4), name="x")
    y = layers.Conv2D(4, 3, padding="same", name="conv_a")(inputs)
    y = layers.BatchNormalization(name="bn")(y)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = layers.Add(name="residual")([inputs, y])
    y = layers.GlobalAveragePooling2D()(y)
    return keras.Model(inputs, layers.Dense(10, name="head")(y), name="residual_net")


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_qat_model_trains_and_exports_int8_qdq_with_zero_points_zero(kind, tmp_path):
    model = KINDS[kind]()
    x, y = small_data()
    qat = fit(tfopt.quantize(model, "int8"), x=x, y=y)
    wrappers = [la for la in qat._flatten_layers() if isinstance(la, QuantizeWrapper)]
    assert len(wrappers) == 3  # conv, hidden, out
    assert all(v > 0 for w in wrappers for v in w.activation_ranges().values())

    signature = None if kind != "subclassed" else [
        __import__("tensorflow").TensorSpec([None, 8, 8, 1], "float32", name="image")]
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x[:32],
                          input_signature=signature, placement="tensorrt")
    proto, values = onnx_qdq(result.paths["onnx"])
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        assert values[node.input[2]].dtype == np.int8
        assert np.all(values[node.input[2]] == 0)
    # Weights: int8 in [-127, 127], per-channel scales along the output channel axis.
    weight_dq = [n for n in proto.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in values]
    assert len(weight_dq) == 3
    for node in weight_dq:
        weight, scale = values[node.input[0]], values[node.input[1]]
        assert weight.dtype == np.int8 and weight.min() >= -127
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert scale.shape == (weight.shape[axis],)
    (error,) = result.errors["onnx"].values()
    assert error["basis"].startswith("int8: step")  # bounds in quantization steps
    assert error["max_abs"] <= error["tolerance"] and error["mean_abs"] <= error["mean_tolerance"]


def test_residual_add_gets_qdq_on_both_inputs_and_batchnorm_stays_float(tmp_path):
    model = residual_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 4)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    assert isinstance(qat.get_layer("quant_residual"), QuantizeInputs)
    assert isinstance(qat.get_layer("bn"), layers.BatchNormalization)
    fit(qat, x=x, y=rng.integers(0, 10, 32))
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x,
                          placement="tensorrt")
    proto, values = onnx_qdq(result.paths["onnx"])
    producers = {o: n for n in proto.graph.node for o in n.output}
    adds = [n for n in proto.graph.node if n.op_type == "Add"
            and not any(i in values for i in n.input)]  # not a bias add
    assert len(adds) == 1
    # Each input of the residual Add is dequantized with the range Keras tracked for it.
    wrapper = qat.get_layer("quant_residual")
    expected = sorted(v / 127 for v in wrapper.activation_ranges().values())
    scales = sorted(float(values[producers[i].input[1]]) for i in adds[0].input
                    if producers[i].op_type == "DequantizeLinear")
    assert scales == pytest.approx(expected, rel=1e-6)
    # BatchNormalization is computed in float between a convolution and the next Q.
    after_conv = [[c.op_type for c in proto.graph.node if n.output[0] in c.input]
                  for n in proto.graph.node if n.op_type == "Conv"]
    assert ["Mul"] in after_conv or ["BatchNormalization"] in after_conv, after_conv


def test_int8_output_step_is_the_last_layers_input_step_times_its_largest_weight(tmp_path):
    x, y = small_data()
    qat = fit(tfopt.quantize(functional()), x=x, y=y)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    wrapper = qat.get_layer("quant_out")
    (_, kernel), = wrapper.quantized_weights()
    expected = float(wrapper.input_amax.numpy()) / 127 * float(np.max(np.abs(kernel.numpy())))
    assert result.manifest["artifacts"]["onnx"]["qdq_steps"]["out"] == pytest.approx(expected,
                                                                                       rel=1e-5)


def scale_weight_dequantize(proto, which, factor):
    """Multiply the scales of one weight DequantizeLinear (``which``: index, or "all")."""
    initializers = {i.name: i for i in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in initializers
                 and initializers[n.input[0]].data_type == onnx.TensorProto.INT8]
    for node in weight_dq if which == "all" else [weight_dq[which]]:
        scale = initializers[node.input[1]]
        scale.CopyFrom(numpy_helper.from_array(
            (numpy_helper.to_array(scale) * factor).astype(np.float32), scale.name))
    return proto


@pytest.mark.parametrize("which, factor, refused", [
    # Every weight off by 1e-5: the arithmetic of another engine or placement
    # (a folded BatchNorm, integer kernels) flips values on rounding boundaries.
    ("all", 1 + 1e-5, False),
    (0, 1.01, True), (1, 0.99, True), (-1, 1.01, True),  # one layer's scales off by 1%
])
def test_int8_validation_refuses_a_weight_scale_off_by_one_percent(
        which, factor, refused, trained_digits, digits, tmp_path, monkeypatch):
    from tfopt.export import _onnx

    (x, _), (x_test, _) = digits
    qat = tfopt.quantize(trained_digits, calibration_data=x[:256])
    convert = _onnx.convert
    monkeypatch.setattr(_onnx, "convert", lambda *a, **k: scale_weight_dequantize(
        convert(*a, **k), which, factor))
    if refused:
        with pytest.raises(errors.ExportValidationError, match=r"onnx\b.*output 'logits'.*int8: step"):
            tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test,
                         placement="tensorrt")
        assert list(tmp_path.iterdir()) == []
    else:
        result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test,
                              placement="tensorrt")
        assert result.errors["onnx"]["logits"]["max_abs"] > 0  # the values did move


def test_default_placement_refuses_a_conversion_with_a_scale_off_by_one_percent(
        trained_digits, digits, tmp_path, monkeypatch):
    # ONNX Runtime's placement re-rounds the graph, so the placed file is held to a
    # relative bound; the conversion it starts from is checked in steps first, as
    # tightly as placement="tensorrt".
    from tfopt.export import _onnx

    (x, _), (x_test, _) = digits
    qat = tfopt.quantize(trained_digits, calibration_data=x[:256])
    convert = _onnx.convert
    monkeypatch.setattr(_onnx, "convert", lambda *a, **k: scale_weight_dequantize(
        convert(*a, **k), -1, 1.01))
    with pytest.raises(errors.ExportValidationError,
                       match=r"QAT graph as converted.*output 'logits'.*int8: step"):
        tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(_onnx, "convert", convert)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test)
    converted = result.manifest["artifacts"]["onnx"]["converted_errors"]["logits"]
    assert converted["basis"].startswith("int8: step")


@pytest.mark.parametrize("placement", ["tensorrt", "onnxruntime"])
def test_a_pruned_away_channel_keeps_its_bias_in_the_int8_export(placement, tmp_path):
    # ONNX Runtime adds a fused convolution's bias in int32 at input_scale x
    # weight_scale: a near-zero weight scale on an all-zero channel overflowed it
    # and dropped the bias (the digits recipe's conversion was 1.8 steps off Keras).
    inputs = keras.Input((6, 6, 3), name="x")
    conv = layers.Conv2D(4, 3, activation="relu", name="conv")
    # Q straight after the ReLU: ONNX Runtime fuses the convolution into QLinearConv
    hidden = layers.Conv2D(4, 1, name="conv2")(conv(inputs))
    outputs = layers.Dense(3, name="out")(layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    kernel, bias = conv.get_weights()
    kernel[..., 0] = 0.0
    conv.set_weights([kernel, np.array([2.0, 0.1, 0.1, 0.1], "float32")])
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 3)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x,
                          placement=placement)
    proto, values = onnx_qdq(result.paths["onnx"])
    scales = [values[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in values and values[n.input[0]].ndim == 4
              and values[n.input[0]].shape[-1] == 3]  # conv's 3x3 kernel, not conv2's 1x1
    # the all-zero channel takes the layer's largest range (it was 1e-8 / 127)
    assert scales[0][0] == np.max(scales[0]), scales
    (error,) = result.errors["onnx"].values()
    assert error["max_rel"] < 0.02


def test_separable_conv_einsum_dense_and_dot_get_qdq(tmp_path):
    inputs = keras.Input((6, 6, 4), name="x")
    y = layers.SeparableConv2D(8, 3, name="sep")(inputs)  # (4, 4, 8)
    y = layers.Reshape((16, 8))(y)
    a = layers.EinsumDense("abc,cd->abd", output_shape=(16, 8), name="einsum")(y)
    y = layers.Dot(axes=2, name="dot")([a, y])  # (16, 16), two activations
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.Flatten()(y)))
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    assert isinstance(qat.get_layer("quant_sep"), QuantizeWrapper)
    assert isinstance(qat.get_layer("quant_einsum"), QuantizeWrapper)
    assert isinstance(qat.get_layer("quant_dot"), QuantizeInputs)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x,
                          placement="tensorrt")
    proto, values = onnx_qdq(result.paths["onnx"])
    # Int8 weights with per-channel scales: depthwise, pointwise, einsum and head kernels.
    weight_dq = [n for n in proto.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in values]
    kernels = sorted(tuple(values[n.input[0]].shape) for n in weight_dq)
    assert kernels == sorted([(3, 3, 4, 1), (8, 4, 1, 1), (8, 8), (256, 3)]), kernels
    assert all(values[n.input[0]].dtype == np.int8 for n in weight_dq)
    # The Dot is a product of two dequantized activations, with the ranges Keras tracked.
    producers = {o: n for n in proto.graph.node for o in n.output}

    def dequantized_from(name):
        node = producers.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
            node = producers.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    products = [n for n in proto.graph.node if n.op_type in ("MatMul", "Einsum")
                and not any(i in values for i in n.input)
                and all(dequantized_from(i) is not None and dequantized_from(i).input[0]
                        not in values for i in n.input)]
    assert len(products) == 1
    expected = sorted(v / 127 for v in qat.get_layer("quant_dot").activation_ranges().values())
    scales = sorted(float(values[dequantized_from(i).input[1]]) for i in products[0].input)
    assert scales == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
def test_separable_conv_quantizes_the_tensor_between_its_two_convolutions(
        rank, monkeypatch, tmp_path):
    spatial = (9,) * rank
    separable = layers.SeparableConv1D if rank == 1 else layers.SeparableConv2D
    pooled = layers.GlobalAveragePooling1D if rank == 1 else layers.GlobalAveragePooling2D
    inputs = keras.Input((*spatial, 3), name="x")
    y = separable(8, 3, strides=2, depth_multiplier=2, padding="same", activation="relu",
                  name="sep")(inputs)
    y = separable(8, 3, dilation_rate=2, use_bias=False, name="sep_dilated")(y)
    model = keras.Model(inputs, layers.Dense(3, name="head")(pooled()(y)))
    x = np.random.default_rng(0).normal(size=(16, *spatial, 3)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    for name in ("quant_sep", "quant_sep_dilated"):
        ranges = qat.get_layer(name).activation_ranges()
        assert any(k.endswith("pointwise_input_amax") and v > 0 for k, v in ranges.items())
    # Both integer kernels on ONNX Runtime, each convolution reading int8.
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x)
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert kernels["integer"] == kernels["total"] == 5, kernels
    # With fake quantization made the identity, the wrapper computes Keras's own layer.
    from tfopt.quantization import _wrapper
    monkeypatch.setattr(_wrapper, "fake_quant_activation", lambda v, amax, bits: v)
    monkeypatch.setattr(_wrapper, "fake_quant_weight", lambda v, *args, **kwargs: v)
    np.testing.assert_allclose(qat(x, training=False), model(x, training=False),
                               rtol=1e-5, atol=1e-5)


def test_calibration_makes_the_qat_model_accurate_before_fine_tuning(trained_digits, digits):
    (x, _), (x_test, y_test) = digits
    float_accuracy = trained_digits.evaluate(x_test, y_test, verbose=0)[1]
    qat = tfopt.quantize(trained_digits, calibration_data=x[:256])
    qat.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    assert qat.evaluate(x_test, y_test, verbose=0)[1] >= float_accuracy - 0.01


def test_pruned_and_stripped_model_keeps_its_zeros_through_qat(tmp_path):
    x, y = small_data()
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5, frequency=1))
    pruned.compile(optimizer="adam",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, epochs=1, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    plain = tfopt.strip(pruned)
    zeros_before = {la.name: la.kernel.numpy() == 0 for la in plain.layers
                    if la.name in ("conv", "hidden", "out")}
    qat = fit(tfopt.quantize(plain), epochs=3, x=x, y=y)
    # The same positions are zero in what QAT computes with, and nowhere else.
    for wrapper in (la for la in qat.layers if isinstance(la, QuantizeWrapper)):
        (_, value), = wrapper.masked_weights()
        np.testing.assert_array_equal(value.numpy() == 0, zeros_before[wrapper.layer.name])
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x[:16])
    proto, values = onnx_qdq(result.paths["onnx"])
    int8_weights = [v for v in values.values() if v.dtype == np.int8 and v.ndim >= 2]
    assert len(int8_weights) == 3
    # ONNX stores the conv kernel as (out, in, h, w); Keras as (h, w, in, out).
    layouts = {"conv": lambda z: z.transpose(3, 2, 0, 1)}
    for name, zeros in zeros_before.items():
        expected = layouts.get(name, lambda z: z)(zeros)
        (weight,) = [w for w in int8_weights if w.shape == expected.shape]
        assert np.all(weight[expected] == 0), name  # every pruned weight stays zero
        # Int8 rounding may zero a few tiny kept weights, not whole groups of them.
        assert np.mean(weight[~expected] == 0) < 0.05, name


def test_export_traces_each_quantized_weight_as_one_constant_with_the_same_values():
    """Inside constant_weights (what tfopt.export traces under), a wrapper computes with its
    masked weights and their ranges as constants: the same values, and no max(abs(w * mask))
    left in the graph for grappler to fold (it held several copies of every weight)."""
    from tfopt.quantization._api import quant_wrappers
    from tfopt.quantization._wrapper import constant_weights

    inputs = keras.Input((6, 6, 4), name="x")
    y = layers.SeparableConv2D(8, 3, name="sep")(inputs)
    y = layers.Conv2D(8, 3, name="conv")(y)
    y = layers.Reshape((4, 8))(y)
    y = layers.EinsumDense("abc,cd->abd", output_shape=(4, 8), name="einsum")(y)
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.Flatten()(y)))
    kernel = model.get_layer("conv").kernel
    kernel.assign(np.where(np.arange(kernel.numpy().size).reshape(kernel.shape) % 2, 0.0,
                           kernel.numpy()))  # zeros QAT must keep: the conv has a mask
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    qat = tfopt.quantize(model, calibration_data=x)
    qat.get_layer("quant_conv").layer.kernel.assign_add(np.full(kernel.shape, 0.01, "float32"))

    def traced():
        function = tf.function(lambda t: qat(t, training=False))
        graph = function.get_concrete_function(tf.TensorSpec((None, 6, 6, 4))).graph
        return function(x).numpy(), {op.type for op in graph.get_operations()}

    expected, variable_ops = traced()
    with constant_weights(quant_wrappers(qat)):
        actual, constant_ops = traced()
    np.testing.assert_array_equal(actual, expected)
    assert "Abs" in variable_ops and "Abs" not in constant_ops, constant_ops
    assert "Abs" in traced()[1]  # outside again, the wrappers read their variables
    with pytest.raises(RuntimeError), constant_weights(quant_wrappers(qat)):
        raise RuntimeError("an export that fails midway")
    assert all(getattr(w, "_constant_weights", None) is None for w in quant_wrappers(qat))


def test_qat_model_saves_and_loads(tmp_path):
    x, y = small_data()
    qat = fit(tfopt.quantize(functional()), x=x, y=y)
    path = tmp_path / "qat.keras"
    qat.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), qat.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_activation_ranges_freeze_after_the_configured_step():
    config = tfopt.QuantizationConfig(freeze_activation_ranges_after=4)
    x, y = small_data(64)  # 4 steps per epoch
    qat = fit(tfopt.quantize(functional(), config), x=x, y=y)
    ranges = {k: v for w in qat.layers if isinstance(w, QuantizeWrapper)
              for k, v in w.activation_ranges().items()}
    fit(qat, x=x * 10, y=y)
    after = {k: v for w in qat.layers if isinstance(w, QuantizeWrapper)
             for k, v in w.activation_ranges().items()}
    assert after == ranges


# -- bad input ---------------------------------------------------------------

def test_unknown_config_string_lists_the_valid_ones():
    with pytest.raises(errors.ConfigError, match=r"'int4'.*Valid strings: \['int8'\]"):
        tfopt.quantize(functional(), "int4")


@pytest.mark.parametrize("bits", [1, 9, 8.0, True])
def test_invalid_bit_widths(bits):
    with pytest.raises(errors.ConfigError, match="weight_bits must be an integer from 2 to 8"):
        tfopt.QuantizationConfig(weight_bits=bits)


def test_quantizing_twice_is_refused():
    qat = tfopt.quantize(functional())
    with pytest.raises(errors.AlreadyQuantizedError, match="already quantized"):
        tfopt.quantize(qat)


def test_a_model_still_pruning_must_be_stripped_first():
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5))
    with pytest.raises(errors.ConfigError, match=r"tfopt.quantize\(tfopt.strip\(model\)\)"):
        tfopt.quantize(pruned)


class _Scale(layers.Layer):
    """A custom layer with a weight, which tfopt has no quantizer for."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_strict_rejects_unsupported_layers_in_one_error_else_warns_once():
    inputs = keras.Input((8,))
    x = layers.Dense(8, name="d")(inputs)
    x = _Scale(name="scale1")(x)
    x = layers.LayerNormalization(name="ln1")(x)
    x = layers.Dense(8, name="d2")(x)
    model = keras.Model(inputs, _Scale(name="scale2")(x))
    with pytest.raises(errors.UnsupportedLayerError, match="scale1 .*scale2") as info:
        tfopt.quantize(model, strict=True)
    assert "ln1" not in str(info.value)  # float by design: never an error
    with pytest.warns(UserWarning) as caught:
        tfopt.quantize(model)
    reports = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(reports) == 1
    assert "LayerNormalization x1 (ln1)" in reports[0] and "scale1 (_Scale)" in reports[0]


def test_nothing_to_quantize():
    model = keras.Sequential([keras.Input((4,)), layers.ReLU()])
    with pytest.raises(errors.NothingToQuantizeError):
        tfopt.quantize(model)


def test_export_refuses_fp16_for_a_qat_model_and_int8_for_a_float_one(tmp_path):
    with pytest.raises(errors.ConfigError, match="quantize the model first"):
        tfopt.export(functional(), tmp_path, formats=("onnx",), precision="int8")
    with pytest.raises(errors.ConfigError, match="int8 Q/DQ"):
        tfopt.export(tfopt.quantize(functional()), tmp_path, formats=("onnx",),
                     precision="fp16")


def test_tf_keras_models_are_quantized_by_tfmot():
    import tf_keras

    from tfopt.examples import digits_cnn

    qat = tfopt.quantize(digits_cnn(tf_keras))
    assert type(qat).__module__.startswith("tf_keras")
    assert any("Quantize" in type(layer).__name__ for layer in qat.layers)
    with pytest.raises(errors.AlreadyQuantizedError):
        tfopt.quantize(qat)


def test_widened_tolerance_is_the_larger_of_the_bound_and_the_measured_noise():
    from tfopt.export._validate import Tolerance, widened

    bounds = {"a": Tolerance(0.1, 0.01, "int8"), "b": Tolerance(0.1, 0.01, "int8")}
    noise = {"a": {"max_abs": 0.01, "mean_abs": 0.001}, "b": {"max_abs": 0.2, "mean_abs": 0.02}}
    result = widened(bounds, noise)
    assert result["a"] == bounds["a"]
    assert result["b"].max_abs == pytest.approx(0.6) and result["b"].mean_abs == pytest.approx(0.06)
    assert "rounding noise" in result["b"].basis

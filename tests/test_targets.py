"""Each engine's INT8 rules (tfopt.targets): stated once, and what QAT and the export do agrees.

QAT trains TensorRT's placement; the "tensorrt" export must hold exactly
that (int8 Q/DQ, zero points 0, weights into the rules' weighted ops,
residual sums quantized on every input). ONNX Runtime's grids are checked
as numbers; its fusions are checked per rule in test_int8_cpu.
"""

import keras
import numpy as np
import onnx
import pytest
from keras import layers
from onnx import numpy_helper

import tfopt
from tfopt import errors
from tfopt.export import _onnx
from tfopt.targets import _cpu_int8, _onnxruntime, _tensorrt


def residual_qat():
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    y = layers.Conv2D(8, 3, padding="same", name="branch")(x)
    x = layers.Activation("relu")(layers.Add(name="residual")([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(4, name="logits")(x))
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    return tfopt.quantize(model, calibration_data=data), data


@pytest.fixture(scope="module")
def tensorrt_onnx(tmp_path_factory):
    qat, x = residual_qat()
    result = tfopt.export(qat, tmp_path_factory.mktemp("trt"), formats=("onnx",),
                          validation_data=x, placement="tensorrt")
    return onnx.load(str(result.paths["onnx"]))


def test_activation_grids_are_qat_grids_on_uint8():
    step, zero = _onnxruntime.activation_grid(2.54)
    assert (step, zero) == (pytest.approx(0.02), 128)  # QAT's int8 step, shifted by 128
    step, zero = _onnxruntime.activation_grid(2.55, "Relu")
    assert (step, zero) == (pytest.approx(0.01), 0)  # zero point 0: ONNX Runtime absorbs the ReLU
    # A ReLU6 whose trained range passes 6: the grid must end at the clip, or it is not absorbed.
    step, zero = _onnxruntime.activation_grid(10.0, "Clip", clip_max=6.0)
    assert 255 * step == pytest.approx(6.0) and zero == 0
    assert _onnxruntime.activation_grid(3.0, "Clip", clip_max=6.0)[0] == pytest.approx(3 / 255)


def test_the_weight_grid_follows_the_portable_bound():
    assert _onnxruntime.weight_reduce_range(_cpu_int8.PORTABLE_WEIGHT_MAX)
    assert not _onnxruntime.weight_reduce_range(_cpu_int8.PORTABLE_WEIGHT_MAX + 1)


def test_the_tensorrt_export_holds_tensorrts_placement(tensorrt_onnx):
    graph = tensorrt_onnx.graph
    assert _tensorrt.check(tensorrt_onnx) == []
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"
                  and stored.get(n.input[0], np.zeros(0, np.float32)).dtype == np.int8]
    assert len(weight_dqs) == 3  # stem, branch, logits
    for dq in weight_dqs:
        # Each int8 weight feeds, through layout ops at most, a weighted op at its weight index.
        tensor = dq.output[0]
        while True:
            ((reader, index),) = consumers[tensor]
            if reader.op_type not in ("Transpose", "Reshape"):
                break
            tensor = reader.output[0]
        assert _tensorrt.WEIGHTED_OPS.get(reader.op_type) == index, (reader.op_type, index)
        activation = producers.get(reader.input[0])
        assert activation is not None and activation.op_type == "DequantizeLinear"
    (add,) = [n for n in graph.node if n.op_type in _tensorrt.EVERY_INPUT_OPS]
    assert all(producers[i].op_type == "DequantizeLinear" for i in add.input)


def zero_points(proto):
    return [i for i in proto.graph.initializer
            if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
                   and n.input[2] == i.name for n in proto.graph.node)]


def test_the_tensorrt_check_names_each_kind_of_fault(tensorrt_onnx):
    shifted = onnx.ModelProto()
    shifted.CopyFrom(tensorrt_onnx)
    zero = zero_points(shifted)[0]
    zero.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(zero).shape, 3, np.int8),
                                          zero.name))
    assert any("non-zero zero point" in p for p in _tensorrt.check(shifted))

    unsigned = onnx.ModelProto()
    unsigned.CopyFrom(tensorrt_onnx)
    zero = zero_points(unsigned)[0]
    zero.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(zero).shape, np.uint8),
                                          zero.name))
    assert any("not int8" in p for p in _tensorrt.check(unsigned))

    defaulted = onnx.ModelProto()
    defaulted.CopyFrom(tensorrt_onnx)
    q = next(n for n in defaulted.graph.node if n.op_type == "QuantizeLinear")
    del q.input[2]
    (problem,) = _tensorrt.check(defaulted)
    assert "no zero point" in problem and q.name in problem


def test_an_export_whose_tensorrt_qdq_tensorrt_would_reject_is_refused(tmp_path, monkeypatch):
    qat, x = residual_qat()
    convert = _onnx.convert

    def uint8_zero_points(*args, **kwargs):
        proto = convert(*args, **kwargs)
        for zero in zero_points(proto):
            zero.CopyFrom(numpy_helper.from_array(
                np.full(numpy_helper.to_array(zero).shape, 128, np.uint8), zero.name))
        return proto

    monkeypatch.setattr(_onnx, "convert", uint8_zero_points)
    with pytest.raises(errors.ExportValidationError, match="TensorRT rejects") as caught:
        tfopt.export(qat, tmp_path / "out", formats=("onnx",), validation_data=x,
                     placement="tensorrt")
    assert "Nothing was written" in str(caught.value)
    assert not (tmp_path / "out").exists()

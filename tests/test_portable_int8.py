"""INT8 that computes the same integers on every x86 CPU kind (issue 24).

x86 CPUs without VNNI add two u8 x s8 products in a saturating int16
(``vpmaddubsw``); tfopt's QAT keeps weights on [-64, 64] so no pair can
leave it, and the export proves it from the file (``int8_portability``).
The trained-model tests hold the INT8 file's accuracy to the QAT model's on
this CPU's kernels; where ``qemu-x86_64`` is installed they also run the file
on an emulated AVX2 CPU (Haswell), whose kernels are the ones that saturate.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tfopt
from tfopt import errors
from tfopt.examples import compile_classifier, digits_residual_cnn
from tfopt.export import _ort_quant
from tfopt.targets import _cpu_int8


# -- the static proof, on graphs built by hand ---------------------------------

def qdq_matmul(weights: np.ndarray, activation_type=TensorProto.UINT8) -> onnx.ModelProto:
    """DQ(x) and DQ(int8 weights) -> MatMul: the node unit ONNX Runtime fuses."""
    k, n = weights.shape
    zero_type = np.uint8 if activation_type == TensorProto.UINT8 else np.int8
    inits = [numpy_helper.from_array(weights.astype(np.int8), "w"),
             numpy_helper.from_array(np.float32(0.1), "xs"),
             numpy_helper.from_array(np.array(0, zero_type), "xz"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="dense_planted")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_on_the_portable_grid_pass_the_proof():
    rng = np.random.default_rng(0)
    weights = rng.integers(-64, 65, size=(32, 8))
    weights[0, 0], weights[1, 0] = 64, -64  # the worst pair the grid allows: 255 * 128
    report = _cpu_int8.check(qdq_matmul(weights))
    assert report.portable
    assert [k.node for k in report.kernels] == ["dense_planted"]
    assert report.as_dict()["worst_pair_bound"] == 255 * 128 <= 32767
    assert report.largest_weight == 64


@pytest.mark.parametrize("pair", [(65, 64), (127, 1 + 1), (-100, 60)])
def test_a_planted_weight_pair_that_can_overflow_int16_is_caught(pair):
    weights = np.zeros((16, 4), np.int64)
    weights[3, 2], weights[9, 1] = pair  # two weights anywhere: a kernel may pair them
    report = _cpu_int8.check(qdq_matmul(weights))
    assert not report.portable
    (kernel,) = report.offending
    assert kernel.node == "dense_planted"
    assert kernel.bound == 255 * (abs(pair[0]) + abs(pair[1])) > 32767
    described = report.as_dict()
    assert described["requires"] == ["avx512_vnni", "avx_vnni", "amx_int8"]
    assert "dense_planted" in report.describe()


def test_a_single_large_weight_cannot_overflow_a_pair():
    weights = np.zeros((16, 4), np.int64)
    weights[0, 0], weights[5, 3] = 127, 1  # 255 * 128: the pair sum, not the largest, counts
    assert _cpu_int8.check(qdq_matmul(weights)).portable


def test_integer_ops_and_activation_products_are_bounded_too():
    weights = np.full((8, 4), 100, np.int8)
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"], name="mmi")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 4])],
        [numpy_helper.from_array(weights, "w")])
    report = _cpu_int8.check(helper.make_model(graph))
    assert [k.bound for k in report.kernels] == [255 * 200]
    # two int8 activations multiplied (attention in TensorRT's placement): no constant bound
    model = qdq_matmul(np.ones((4, 4)), activation_type=TensorProto.INT8)
    graph = model.graph
    graph.node[2].input[0] = "xq"  # the "weight" DQ now reads the int8 activation
    graph.node[2].input[1], graph.node[2].input[2] = "xs", "xz"
    del graph.node[2].attribute[:]
    report = _cpu_int8.check(model)
    assert not report.portable and report.offending[0].bound is None


# -- QAT trains on the portable grid -------------------------------------------

def small_cnn():
    return digits_residual_cnn(filters=8)


@pytest.mark.parametrize("portable, level", [(True, 64), (False, 127)])
def test_qat_weights_sit_on_the_configured_grid(portable, level):
    model = small_cnn()
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    qat = tfopt.quantize(model, tfopt.QuantizationConfig(portable_weights=portable),
                         calibration_data=x)
    wrapper = qat.get_layer("quant_dense1")
    (variable, fake), = wrapper.quantized_weights()
    amax = np.max(np.abs(variable.numpy()), axis=0)
    levels = fake.numpy() / (amax / level)
    assert np.allclose(levels, np.round(levels), atol=1e-3)
    assert np.allclose(np.max(np.abs(levels), axis=0), level, atol=1e-3)  # each channel's max


def test_a_model_saved_before_portable_weights_keeps_its_full_grid():
    config = tfopt.QuantizationConfig().get_config()
    del config["portable_weights"]
    assert not tfopt.QuantizationConfig.from_config(config).portable_weights
    assert tfopt.QuantizationConfig().weight_max_level == 64
    assert tfopt.QuantizationConfig(weight_bits=6).weight_max_level == 31
    with pytest.raises(errors.ConfigError, match="portable_weights"):
        tfopt.QuantizationConfig(portable_weights="yes")


# -- the export: proof in the manifest, refusals that say what differs ---------

@pytest.fixture(scope="module")
def trained_qat(digits_module):
    """The issue's digits CNN (BN, residual Add, SeparableConv2D, Flatten -> Dense),
    trained, then QAT-trained with portable weights (the default)."""
    (x, y), _ = digits_module
    keras.utils.set_random_seed(0)
    model = compile_classifier(small_cnn())
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    qat = compile_classifier(tfopt.quantize(model, calibration_data=x[:256]), 2e-4)
    qat.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return qat


@pytest.fixture(scope="module")
def digits_module():
    return tfopt.datasets.load_digits()


@pytest.fixture(scope="module")
def exported(trained_qat, digits_module, tmp_path_factory):
    _, (x_test, _) = digits_module
    path = tmp_path_factory.mktemp("portable")
    return tfopt.export(trained_qat, path, formats=("onnx",), validation_data=x_test)


def onnx_logits(path, x, optimized=True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_trained_int8_file_matches_qat_on_this_cpus_kernels(trained_qat, exported,
                                                              digits_module):
    _, (x_test, y_test) = digits_module
    qat_logits = trained_qat.predict(x_test, verbose=0)
    qat_accuracy = float(np.mean(qat_logits.argmax(1) == y_test))
    assert qat_accuracy > 0.95  # a trained model: its logits mean something
    logits = onnx_logits(exported.paths["onnx"], x_test)
    accuracy = float(np.mean(logits.argmax(1) == y_test))
    agreement = float(np.mean(logits.argmax(1) == qat_logits.argmax(1)))
    print(f"qat {qat_accuracy:.4f} int8 {accuracy:.4f} agreement {agreement:.4f}")
    # ONNX Runtime's placement rounds a little differently from QAT (BatchNorm folded,
    # a finer grid after ReLU): one test image of 450 (0.22 points) may go either way
    assert abs(accuracy - qat_accuracy) <= 1 / len(y_test) + 1e-9
    assert agreement >= 0.995
    info = exported.manifest["artifacts"]["onnx"]
    assert info["int8_portability"]["portable"]
    assert info["int8_portability"]["largest_weight"] == 64
    assert info["int8_portability"]["integer_kernels"] == info["ort_cpu_kernels"]["integer"]
    # validated twice: the arithmetic (optimizations off) and the kernels
    assert set(info["arithmetic_errors"]) == set(exported.errors["onnx"])


def test_the_file_is_bitwise_the_same_with_and_without_integer_kernels_on_this_cpu(
        exported, digits_module):
    """With portable weights the kernels compute exactly the Q/DQ arithmetic, up to the
    float rounding of the requantization (far below one step of the logits)."""
    _, (x_test, _) = digits_module
    kernels = onnx_logits(exported.paths["onnx"], x_test)
    arithmetic = onnx_logits(exported.paths["onnx"], x_test, optimized=False)
    assert np.array_equal(kernels.argmax(1), arithmetic.argmax(1))
    assert np.max(np.abs(kernels - arithmetic)) <= 0.02 * np.max(np.abs(arithmetic))


_EMULATED_RUN = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    path, data, out = sys.argv[1:4]
    x = np.load(data)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.save(out, session.run(None, {session.get_inputs()[0].name: x})[0])
""")


def run_on_emulated_cpu(cpu: str, path, x, tmp_path) -> np.ndarray:
    """The file's logits from ONNX Runtime in a process that qemu runs as ``cpu``."""
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(_EMULATED_RUN)
    subprocess.run([shutil.which("qemu-x86_64"), "-cpu", cpu, sys.executable,
                    str(tmp_path / "run.py"), str(path), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, capture_output=True, timeout=300)
    return np.load(tmp_path / "y.npy")


qemu = pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                          reason="needs qemu-x86_64 (Debian: qemu-user) to emulate an AVX2 CPU")


@qemu
def test_emulated_avx2_cpu_computes_what_this_cpu_computes(exported, digits_module, tmp_path):
    """Haswell: AVX2, no VNNI, the kernels that saturate. The portable file must not."""
    _, (x_test, y_test) = digits_module
    here = onnx_logits(exported.paths["onnx"], x_test[:200])
    avx2 = run_on_emulated_cpu("Haswell", exported.paths["onnx"], x_test[:200], tmp_path)
    assert np.array_equal(avx2.argmax(1), here.argmax(1))
    assert np.max(np.abs(avx2 - here)) <= 1e-4 * np.max(np.abs(here))


@qemu
def test_emulation_is_faithful_a_full_range_file_saturates_on_avx2(tmp_path):
    """The check above could pass by luck if qemu ran VNNI kernels: a planted pair that
    overflows int16 must come out wrong on the emulated Haswell (and right here when
    this CPU has VNNI)."""
    weights = np.zeros((64, 4), np.int8)
    weights[:, 0] = 127
    path = tmp_path / "planted.onnx"
    model = qdq_matmul(weights)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.float32(1.0), "xs"))
    onnx.save(model, str(path))
    x = np.full((1, 64), 255.0, np.float32)
    exact = 255 * 127 * 64 * 0.01
    avx2 = run_on_emulated_cpu("Haswell", path, x, tmp_path)
    assert avx2[0, 0] < 0.6 * exact  # pairs clipped at 32767 instead of 64770
    if _cpu_int8.cpu_sums_wide():
        assert onnx_logits(path, x)[0, 0] == pytest.approx(exact, rel=1e-5)


def test_a_placement_that_plants_an_overflowing_pair_is_refused_and_nothing_written(
        trained_qat, digits_module, tmp_path, monkeypatch):
    _, (x_test, _) = digits_module
    real = _ort_quant.quantize_for_cpu

    def planted(*args, **kwargs):
        proto = real(*args, **kwargs)
        for init in proto.graph.initializer:
            if init.data_type == TensorProto.INT8 and "quant_dense1" in init.name \
                    and init.name.endswith("_quantized"):
                values = numpy_helper.to_array(init).copy()
                values.flat[0], values.flat[1] = 127, 127
                init.CopyFrom(numpy_helper.from_array(values, init.name))
                break
        else:
            raise AssertionError("no int8 weight of layer fc found")
        return proto

    monkeypatch.setattr(_ort_quant, "quantize_for_cpu", planted)
    with pytest.raises(errors.ExportValidationError) as info:
        tfopt.export(trained_qat, tmp_path / "out", formats=("onnx",), validation_data=x_test)
    message = str(info.value)
    assert "quant_dense1" in message and "saturating int16" in message
    assert "portable_weights" in message
    assert "Nothing was written" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_full_range_weights_export_with_a_warning_and_a_manifest_that_says_vnni(
        digits_module, tmp_path):
    (x, y), (x_test, _) = digits_module
    model = compile_classifier(small_cnn())
    model.fit(x, y, epochs=1, verbose=0)
    qat = tfopt.quantize(model, tfopt.QuantizationConfig(portable_weights=False),
                         calibration_data=x[:128])
    with pytest.warns(UserWarning, match="exact only on CPUs with VNNI or AMX"):
        result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test[:64],
                              tolerance=1.0)
    portability = result.manifest["artifacts"]["onnx"]["int8_portability"]
    assert not portability["portable"] and portability["largest_weight"] == 127
    assert portability["requires"] == list(_cpu_int8.WIDE_SUM_FLAGS)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["artifacts"]["onnx"]["int8_portability"] == portability
    from tfopt import _inspect
    assert "exact only on CPUs with avx512_vnni" in _inspect.summary(tmp_path)


def test_a_runner_warns_when_the_file_needs_vnni_and_this_cpu_lacks_it(tmp_path, monkeypatch):
    from tfopt.artifacts import _runner

    (tmp_path / "manifest.json").write_text(json.dumps({
        "quantized": True, "signature": {"inputs": [], "outputs": []},
        "artifacts": {"onnx": {"int8_portability": {"portable": False,
                                                    "requires": ["avx512_vnni"]}}}}))
    monkeypatch.setattr(_cpu_int8, "cpu_flags", lambda: {"avx2", "fma"})
    assert "avx512_vnni" in _runner.portability_warning(tmp_path / "model.onnx")
    monkeypatch.setattr(_cpu_int8, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert _runner.portability_warning(tmp_path / "model.onnx") == ""


def test_kernels_that_differ_from_the_arithmetic_are_named_as_the_kernels(
        trained_qat, digits_module, tmp_path, monkeypatch):
    """A file whose Q/DQ arithmetic is right but whose kernels are not (what saturation
    looks like on an AVX2 CPU) is refused with the kernels named, not the placement."""
    from tfopt.export import _api

    _, (x_test, _) = digits_module
    real = _api._onnx_runner

    def kernels_off_by_a_lot(path, signature, arithmetic=False):
        run = real(path, signature, arithmetic)
        if arithmetic:
            return run
        return lambda arrays: {k: v + 5.0 for k, v in run(arrays).items()}

    monkeypatch.setattr(_api, "_onnx_runner", kernels_off_by_a_lot)
    with pytest.raises(errors.ExportValidationError) as info:
        tfopt.export(trained_qat, tmp_path, formats=("onnx",), validation_data=x_test[:64])
    message = str(info.value)
    assert "Q/DQ arithmetic matches Keras" in message and "integer kernels" in message
    assert "larger tolerance" not in message


def test_qat_saved_model_is_held_to_a_step_bound_and_argmax_agreement(
        trained_qat, digits_module, tmp_path):
    _, (x_test, _) = digits_module
    result = tfopt.export(trained_qat, tmp_path, formats=("saved_model",),
                          validation_data=x_test[:128])
    error = result.errors["saved_model"]["logits"]
    assert "int8" in error["basis"]
    assert error["argmax_agreement"] == 1.0


def test_argmax_gate_counts_only_rows_whose_top_two_scores_are_apart():
    from tfopt.export._validate import Tolerance, compare

    reference = np.array([[1.0, 0.99, 0.0], [5.0, 0.0, 0.0], [0.0, 4.0, 0.0]] * 40)
    limits = {"logits": Tolerance(3.0, None, "test", min_argmax_agreement=0.99)}
    # near ties (0.01 apart) flipped by a small error: reported, not refused
    near_ties = reference + np.array([0.0, 0.02, 0.0])
    result = compare("saved_model", {"logits": reference}, {"logits": near_ties}, limits)
    assert result["logits"].argmax_agreement == pytest.approx(2 / 3)
    # rows 5 apart changed to another class, every value still within the max tolerance
    decisive = reference.copy()
    decisive[1::3] = [2.6, 0.0, 2.9]
    assert np.max(np.abs(decisive - reference)) <= 3.0
    with pytest.raises(errors.ExportValidationError, match="picks another class"):
        compare("saved_model", {"logits": reference}, {"logits": decisive}, limits)

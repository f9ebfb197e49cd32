"""OpenVINO: the IR export format and the CPU bench engine."""

import json

import numpy as np
import pytest

import tfopt
from tfopt import errors
from tfopt.artifacts import _openvino

from conftest import small_data
from test_pruning import functional

pytestmark = pytest.mark.skipif(not _openvino.available(),
                                reason="needs openvino (pip install 'tfopt[openvino]')")


def test_float_ir_is_converted_from_the_onnx_validated_and_listed_in_the_manifest(tmp_path):
    x, _ = small_data(16)
    result = tfopt.export(functional(), tmp_path, formats=("openvino",), validation_data=x)
    folder = result.paths["openvino"]
    assert folder == tmp_path / "openvino"
    assert (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    assert not (tmp_path / "model.onnx").exists()  # the ONNX it came from was not asked for
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    info = manifest["artifacts"]["openvino"]
    import openvino

    assert info["openvino_version"] == openvino.__version__
    assert info["converted_from"] == "onnx" and info["fake_quantize"] == 0
    assert result.errors["openvino"]["out"]["max_rel"] < 1e-5
    if _openvino.bf16_available():  # OpenVINO's default on this CPU is checked too
        bf16 = info["bf16_errors"]["out"]
        assert 0 < bf16["max_abs"] <= bf16["tolerance"]
    else:
        assert "bf16_errors" not in info


def test_fp16_compressed_weights_halve_the_bin(tmp_path):
    x, _ = small_data(16)
    fp32 = tfopt.export(functional(), tmp_path / "fp32", formats=("openvino",), validation_data=x)
    fp16 = tfopt.export(functional(), tmp_path / "fp16", formats=("openvino",), precision="fp16",
                        validation_data=x)
    assert fp16.manifest["artifacts"]["openvino"]["compressed_to_fp16"] is True
    size = {name: (r.paths["openvino"] / "model.bin").stat().st_size
            for name, r in (("fp32", fp32), ("fp16", fp16))}
    assert size["fp16"] < 0.55 * size["fp32"], size
    (runner,) = _openvino.openvino_runners(fp16.paths["openvino"], precisions=["f32"])
    assert runner.precision == "fp16"


def test_qat_model_keeps_int8_as_fake_quantize(tmp_path):
    x, _ = small_data(32)
    qat = tfopt.quantize(functional(), "int8", calibration_data=x)
    result = tfopt.export(qat, tmp_path, formats=("onnx", "openvino"), validation_data=x)
    info = result.manifest["artifacts"]["openvino"]
    qdq = result.manifest["artifacts"]["onnx"]["qdq"]
    # activation Q/DQ become FakeQuantize (at least one each); int8 weights stay int8 constants
    assert info["fake_quantize"] >= qdq["QuantizeLinear"] > 0
    assert qdq["weight_dequantize"] > 0
    # converted from the ONNX Runtime placement, validated like that ONNX: relative int8
    assert result.errors["openvino"]["out"]["basis"] == result.errors["onnx"]["out"]["basis"]
    assert result.errors["openvino"]["out"]["basis"].startswith("int8: 0.05")
    float_bin = tfopt.export(functional(), tmp_path / "float", formats=("openvino",),
                             validation_data=x).paths["openvino"] / "model.bin"
    assert (result.paths["openvino"] / "model.bin").stat().st_size < 0.4 * float_bin.stat().st_size
    for runner in _openvino.openvino_runners(result.paths["openvino"]):
        assert runner.precision == "int8" and runner.name.startswith("openvino int8 / OpenVINO CPU")


def test_int8_precision_needs_a_qat_model(tmp_path):
    with pytest.raises(errors.ConfigError, match="OpenVINO"):
        tfopt.export(functional(), tmp_path, formats=("openvino",), precision="int8")


def test_a_failed_bf16_check_writes_nothing(tmp_path, monkeypatch):
    if not _openvino.bf16_available():
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 only")
    from tfopt.export import _validate

    monkeypatch.setitem(_validate.TOLERANCES, "bf16", (1e-9, 0.0))  # tighter than bf16 can be
    x, _ = small_data(16)
    with pytest.raises(errors.ExportValidationError, match="bf16 inference precision"):
        tfopt.export(functional(), tmp_path, formats=("onnx", "openvino"), validation_data=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bench_times_the_ir_in_f32_and_bf16_with_its_size_and_memory(tmp_path):
    x, _ = small_data(8)
    result = tfopt.export(functional(), tmp_path, formats=("openvino",), validation_data=x)
    report = tfopt.bench.run([result.paths["openvino"]], x, batch_sizes=(1, 4), repeats=3,
                             min_seconds=0, progress=False)
    expected = ["f32"] + (["bf16"] if _openvino.bf16_available() else [])
    assert [r.engine for r in report.rows if r.batch_size == 1] == [
        f"OpenVINO CPU {p}" for p in expected]
    assert all(r.size_bytes == result.sizes["openvino"]["raw"] for r in report.rows)
    assert all(r.peak_rss_bytes and r.peak_rss_bytes > 10 * 2**20 for r in report.rows)
    assert "FP32" in report.environment["openvino_cpu_capabilities"]
    from tfopt.targets._cpu_int8 import instruction_set

    assert f"cores, ISA: {instruction_set()}; OpenVINO" in report.table()

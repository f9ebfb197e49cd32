"""tfopt.artifacts: one runner layer for export validation and bench alike."""

import ast
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tfopt
from tfopt import artifacts
from tfopt.artifacts import _openvino

from test_export import two_in_two_out

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(not _openvino.available(),
                                    reason="needs openvino (pip install 'tfopt[openvino]')")


def _imports(path: pathlib.Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_artifacts_imports_neither_export_nor_bench_and_its_engines_no_tensorflow():
    for module in (ROOT / "tfopt" / "artifacts").glob("*.py"):
        imported = _imports(module)
        climbing = {m for m in imported if m.startswith(("tfopt.export", "tfopt.bench"))}
        assert not climbing, f"{module.name} imports {climbing}: artifacts/ sits below them"
        if module.name in ("_runner.py", "_ort.py", "_openvino.py", "_load.py", "_probe.py"):
            assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}, module


def test_every_engine_returns_the_outputs_named_and_ordered_like_the_manifest(tmp_path):
    model = two_in_two_out()
    rng = np.random.default_rng(0)
    feed = {"features": rng.normal(size=(5, 6)).astype("float32"),
            "context": rng.normal(size=(5, 4)).astype("float32")}
    formats = ("saved_model", "onnx") + (("openvino",) if _openvino.available() else ())
    result = tfopt.export(model, tmp_path, formats=formats, validation_data=feed)
    names = [o["name"] for o in result.manifest["signature"]["outputs"]]
    assert names == ["score", "label"]  # the model's order, not alphabetical
    reference = model([feed["features"], feed["context"]], training=False)
    arrays = [feed["features"], feed["context"]]
    backends = set()
    for fmt in formats:
        for runner in artifacts.load(result.paths[fmt]):
            out = runner(arrays)
            backends.add(runner.backend)
            assert list(out) == names, (runner.name, list(out))
            assert runner.outputs == tuple(names)
            tol = 3e-2 if runner.precision == "bf16" else 1e-4
            for got, want in zip(out.values(), reference):
                np.testing.assert_allclose(got, np.asarray(want), rtol=tol, atol=tol)
            np.testing.assert_array_equal(runner.first(arrays), out["score"])
    assert {"saved_model", "ort_cpu"} <= backends


def test_onnx_runner_and_gpu_benchmark_halves_work_without_tensorflow(tmp_path):
    """The GPU benchmarks' two halves on a tiny model: ``prepare`` keeps only the graph,
    ``run`` (no TensorFlow there) fills its weights and times it with tfopt's runner."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _gpu_common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = two_in_two_out()
    _, _, graph = _gpu_common.export_graph(model, tmp_path, "tiny",
                                           [np.ones((2, 6), "float32"), np.ones((2, 4), "float32")],
                                           size_threshold=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # weights left behind
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow fails
        sys.modules["keras"] = None
        sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
        import numpy as np
        import _gpu_common, gpu, gpu_onnx  # both GPU benchmarks load without TensorFlow
        full = {str(tmp_path / 'full.onnx')!r}
        _gpu_common.fill_weights({str(graph)!r}, full)
        timing, ort_runners = _gpu_common.import_tfopt_bench()
        (runner,) = ort_runners.onnx_runners(full, providers=["CPUExecutionProvider"])
        out = runner([np.ones((2, 6), "float32"), np.ones((2, 4), "float32")])
        assert np.abs(out["score"]).sum() > 0  # the weights were filled
        print(list(out), timing.measure(lambda: None, repeats=2).runs)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['score',", "'label']", "2"]


def test_memory_probe_of_an_onnx_runner_imports_no_tensorflow(tmp_path):
    result = tfopt.export(two_in_two_out(), tmp_path, formats=("onnx",))
    (runner,) = artifacts.load(result.paths["onnx"])
    spec = {"runner": runner.spec, "calls": 2, "inputs": [[[4, 6], "float32"], [[4, 4], "float32"]]}
    done = subprocess.run([sys.executable, str(ROOT / "tfopt" / "artifacts" / "_probe.py"),
                           json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["tensorflow_imported"] is False
    # onnxruntime alone, not TensorFlow's hundreds of MB
    assert 10 * 2**20 < measured["peak_rss_bytes"] < 400 * 2**20, measured
    assert measured["device_bytes"] is None


@needs_openvino
def test_openvino_throughput_mode_splits_the_batch_and_matches_latency_mode(tmp_path):
    model = two_in_two_out()
    result = tfopt.export(model, tmp_path, formats=("openvino",))
    arrays = [np.random.default_rng(0).normal(size=(7, 6)).astype("float32"),
              np.random.default_rng(1).normal(size=(7, 4)).astype("float32")]
    latency = _openvino.openvino_runner(result.paths["openvino"], mode="latency")
    throughput = _openvino.openvino_runner(result.paths["openvino"], mode="throughput")
    assert latency.details["performance_mode"] == "latency"
    assert throughput.details["requests"] >= 1 and throughput.name.endswith("throughput")
    for a, b in zip(latency(arrays).values(), throughput(arrays).values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert a.shape[0] == 7


@needs_openvino
def test_bf16_is_refused_where_the_cpu_has_none(tmp_path, monkeypatch):
    result = tfopt.export(two_in_two_out(), tmp_path, formats=("openvino",))
    monkeypatch.setattr(_openvino, "cpu_features", lambda: {"isa": ["AVX512F"], "bf16": False})
    with pytest.raises(tfopt.errors.ConfigError, match="AVX512-BF16 or AMX-BF16"):
        _openvino.openvino_runner(result.paths["openvino"], precision="bf16")
    assert [r.details["inference_precision"]
            for r in _openvino.openvino_runners(result.paths["openvino"])] == ["f32"]


def test_cpu_features_name_the_instruction_sets_found():
    features = _openvino.cpu_features()
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    assert ("AVX512-VNNI" in features["isa"]) == (" avx512_vnni" in flags)
    assert ("AMX-BF16" in features["isa"]) == (" amx_bf16" in flags)
    if _openvino.available():
        assert "FP32" in features["capabilities"]
        assert features["bf16"] == ("BF16" in features["capabilities"])

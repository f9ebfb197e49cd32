"""The `tfopt` command and recipes, as a user runs them."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tfopt
from tfopt import _recipe
from tfopt.cli import main

from test_pruning import functional

ROOT = Path(__file__).resolve().parents[1]


def tfopt_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tfopt.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("command", ["run", "export", "bench", "inspect"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tfopt " + command in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipes_validate(recipe):
    loaded = _recipe.load(recipe)
    assert loaded.spec["name"] == recipe.stem


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: tiny
model:
  source: digits_cnn
data:
  source: synthetic
  args: {shape: [8, 8, 1], classes: 10, train_samples: 64, test_samples: 32}
prune:
  final_sparsity: 0.5
  epochs: 1
"""


def test_recipe_errors_name_the_key_and_the_line(tmp_path):
    bad = GOOD.replace("final_sparsity: 0.5", "final_sparsity: 1.5\n  epochz: 2") + \
        "export:\n  formats: [onnx, tflite]\n"
    with pytest.raises(_recipe.RecipeError) as info:
        _recipe.load(write(tmp_path, bad))
    message = str(info.value)
    assert "recipe.yaml:8: 'prune.final_sparsity' must be < 1, got 1.5" in message
    assert "recipe.yaml:9: unknown key 'prune.epochz'" in message
    assert "recipe.yaml:12: 'export.formats' items must be one of" in message


def test_missing_required_keys_and_bad_types(tmp_path):
    with pytest.raises(_recipe.RecipeError) as info:
        _recipe.load(write(tmp_path, "name: 3\ndata:\n  source: digits\n"))
    message = str(info.value)
    assert "'name' must be a string, got 3" in message
    assert "missing required key 'model'" in message


def test_bad_recipe_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("0.5", "1.5"))
    result = tfopt_cli("run", path, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tfopt run: error: Recipe has problems")
    assert not (tmp_path / "out").exists()  # validated before any work


def test_missing_files_exit_2(tmp_path):
    for args in (["run", tmp_path / "nope.yaml"], ["export", tmp_path / "nope.keras", "-o", tmp_path],
                 ["bench", tmp_path / "nope.onnx"], ["inspect", tmp_path / "nope.keras"]):
        result = tfopt_cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and "error:" in result.stderr


@pytest.mark.slow
def test_run_digits_recipe_writes_a_report_that_answers_first(tmp_path):
    result = tfopt_cli("run", ROOT / "recipes" / "digits_prune_qat.yaml", "--output", tmp_path,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Report: {tmp_path / 'report.md'}" in result.stdout
    report = (tmp_path / "report.md").read_text()
    first = report.splitlines()[0]
    assert "faster than baseline saved_model / TensorFlow at batch 1" in first \
        and "smaller" in first and "accuracy points" in first
    assert "| baseline keras tf.function jit |" in report and "peak memory MB" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["baseline_accuracy"] - metrics["final_accuracy"] <= 0.02
    assert all(abs(v - 0.8) < 0.01 for v in metrics["sparsity"].values())
    assert (tmp_path / "latency_size.png").stat().st_size > 10_000
    assert (tmp_path / "manifest_int8.json").exists()
    assert (tmp_path / "export" / "int8" / "model.onnx").exists()


def test_export_bench_and_inspect_commands(tmp_path):
    model = functional()
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros(8, "int64"))
    out = tmp_path / "export"
    result = tfopt_cli("export", tmp_path / "m.keras", "-f", "onnx", "-f", "saved_model",
                       "-o", out, "--validation-data", tmp_path / "x.npy")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnx" in result.stdout and (out / "model.onnx").exists()

    result = tfopt_cli("bench", out / "model.onnx", out / "saved_model" / "1", "--batch", "1,4",
                       "--inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                       "--repeats", "3", "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    from tfopt.artifacts._openvino import available

    # OpenVINO reads the ONNX too, whenever it is installed
    backends = ("ort_cpu", "saved_model") + (("openvino_cpu",) if available() else ())
    assert {(r["backend"], r["batch_size"]) for r in rows} == {
        (b, n) for b in backends for n in (1, 4)}
    assert all(r["peak_rss_bytes"] for r in rows)
    assert all(r["p50_ms"] > 0 and r["accuracy"] is not None for r in rows)
    assert (tmp_path / "b.png").exists()

    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5))
    pruned.save(tmp_path / "pruned.keras")
    result = tfopt_cli("inspect", tmp_path / "pruned.keras")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pruning wrapper, step 0" in result.stdout
    result = tfopt_cli("inspect", out / "saved_model" / "1")
    assert result.returncode == 0 and "serving_default" in result.stdout


def test_export_command_with_precision_fp16(tmp_path):
    functional().save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32"))
    out = tmp_path / "export"
    result = tfopt_cli("export", tmp_path / "m.keras", "-f", "onnx", "--precision", "fp16",
                       "-o", out, "--validation-data", tmp_path / "x.npy")
    assert result.returncode == 0, result.stderr[-2000:]
    import onnx

    proto = onnx.load(str(out / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    assert 0 < manifest["validation"]["errors"]["onnx"]["out"]["max_rel"] < 2e-2


def test_recipe_model_sources_keras_file_module_function_and_keras_applications(tmp_path):
    import keras

    from tfopt._pipeline import load_model

    saved = functional()
    saved.save(tmp_path / "m.keras")
    loaded = load_model({"source": str(tmp_path / "m.keras")})
    for a, b in zip(loaded.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)
    built = load_model({"source": "tfopt.examples:digits_cnn", "args": {"name": "from_entry"}})
    assert built.name == "from_entry" and built.count_params() == 43_050
    applied = load_model({"source": "keras.applications.MobileNetV2",
                          "args": {"weights": None, "input_shape": [32, 32, 3], "alpha": 0.35,
                                   "classes": 7}})
    assert isinstance(applied, keras.Model) and applied.output_shape == (None, 7)
    assert applied.input_shape == (None, 32, 32, 3)


def test_a_run_killed_mid_way_resumes_from_its_last_stage(tmp_path):
    """SIGKILL once the pruned model is saved; --resume goes on from it, skipping the
    training and pruning it already did."""
    import signal
    import time

    recipe = write(tmp_path, GOOD + textwrap.dedent("""\
        train: {epochs: 1}
        quantize: {epochs: 30, calibration_samples: 32}
        export: {formats: [onnx]}
        bench: {batch_sizes: [1], repeats: 2, warmup: 0, min_seconds: 0, memory: false}
    """))
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "tfopt.cli", "-q", "run", str(recipe),
                                "--output", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "stages" / "pruned.keras").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run never saved its pruned stage"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "metrics.json").exists()
    state = json.loads((out / "stages" / "state.json").read_text())
    assert state["finished"] == ["trained", "pruned"]

    resumed = tfopt_cli("-q", "run", recipe, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert steps[0] == "dense training: resumed from stages/trained.keras"
    assert steps[1] == "pruning: resumed from stages/pruned.keras"
    assert steps[2].startswith("quantization-aware training (int8)")

    recipe.write_text(recipe.read_text().replace("epochs: 30", "epochs: 2"))
    changed = tfopt_cli("run", recipe, "--output", out, "--resume")
    assert changed.returncode == 2 and "changed since the run" in changed.stderr


def test_export_and_bench_commands_read_a_folder_of_images(tmp_path):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            (tmp_path / "images" / label / f"{i}.png").write_bytes(
                tf.io.encode_png(pixels).numpy())
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    keras.Model(inputs, keras.layers.Dense(2)(x)).save(tmp_path / "m.keras")

    out = tmp_path / "out"
    result = tfopt_cli("export", tmp_path / "m.keras", "-f", "onnx", "-o", out,
                       "--data", tmp_path / "images", "--tolerance", "1e-4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "No validation_data" not in result.stderr
    result = tfopt_cli("bench", out / "model.onnx", "--data", tmp_path / "images", "--batch",
                       "1,4", "--repeats", "2", "--no-memory", "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr[-2000:]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["environment"]["accuracy_samples"] == 12
    assert all(r["accuracy"] is not None for r in bench["rows"])
    both = tfopt_cli("bench", out / "model.onnx", "--data", tmp_path / "images",
                     "--inputs", tmp_path / "x.npy")
    assert both.returncode == 2 and "not both" in both.stderr


def test_bench_tells_two_savedmodels_apart_and_sizes_each(tmp_path):
    from tfopt.examples import digits_cnn

    large_result = tfopt.export(digits_cnn(), tmp_path / "a", formats=("saved_model",))
    small_result = tfopt.export(functional(), tmp_path / "b", formats=("saved_model",))
    assert large_result.sizes["saved_model"]["raw"] != small_result.sizes["saved_model"]["raw"]
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    report = tfopt.bench.run([large_result.paths["saved_model"],
                              small_result.paths["saved_model"]], x, batch_sizes=(1,),
                             repeats=2, warmup=0, min_seconds=0, progress=False, memory=False)
    names = [r.name for r in report.rows]
    assert len(set(names)) == 2, names
    by_name = {r.name: r.size_bytes for r in report.rows}
    for name, result in zip(names, (large_result, small_result)):
        assert by_name[name] == result.sizes["saved_model"]["raw"], (name, by_name)


def test_inspect_reads_an_openvino_folder(tmp_path):
    from tfopt.artifacts._openvino import available

    if not available():
        pytest.skip("openvino is not installed")
    result = tfopt.export(functional(), tmp_path / "ov", formats=("openvino",))
    done = tfopt_cli("inspect", result.paths["openvino"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OpenVINO IR" in done.stdout and "no FakeQuantize: a float model" in done.stdout


def test_finetune_after_unstructured_pruning_is_refused_before_training(tmp_path):
    from tfopt import _pipeline

    recipe = _recipe.load(write(tmp_path, GOOD + "finetune: {epochs: 1}\n"))
    with pytest.raises(_recipe.RecipeError, match="pruned weights would grow back"):
        _pipeline.check_ready(recipe)


def test_one_refused_artifact_leaves_the_others_exported_and_reported(tmp_path, monkeypatch):
    from tfopt import _pipeline
    from tfopt.errors import ExportValidationError
    from tfopt.export import _api

    compare, seen = _api.compare, []

    def refuse_the_optimized_onnx(name, *args, **kwargs):
        seen.append(name)
        if name == "onnx" and seen.count("onnx") > 1:  # the first is the baseline's
            raise ExportValidationError("onnx: planted failure. Do this to fix it.")
        return compare(name, *args, **kwargs)

    monkeypatch.setattr(_api, "compare", refuse_the_optimized_onnx)
    recipe = _recipe.load(write(tmp_path, GOOD + textwrap.dedent("""\
        export: {formats: [saved_model, onnx]}
        bench: {batch_sizes: [1], repeats: 2, warmup: 0, min_seconds: 0, memory: false}
    """)))
    metrics = _pipeline.run(recipe, tmp_path / "run", verbose=0)
    assert metrics["export_failures"] == {"fp32": {"onnx": "onnx: planted failure. Do this to fix it."}}
    assert list(metrics["exports"]["fp32"]["paths"]) == ["saved_model"]
    assert (tmp_path / "run" / "export" / "fp32" / "saved_model" / "1" / "saved_model.pb").exists()
    benched = {row["name"] for row in metrics["bench"]["rows"]}
    assert any(name.startswith("optimized saved_model") for name in benched), benched
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## What failed (fp32 export)" in report and "planted failure" in report


def test_an_optimize_recipe_runs_the_search_and_reports_it(tmp_path):
    from tfopt import _pipeline

    recipe = _recipe.load(write(tmp_path, textwrap.dedent("""\
        name: opt
        model: {source: digits_cnn}
        data: {source: digits}
        train: {epochs: 5}
        optimize:
          max_accuracy_drop: 0.03
          target: {flops: 0.6}
          epochs: 1
          qat_epochs: 1
          max_rounds: 2
        export: {formats: [saved_model, onnx]}
        bench: {batch_sizes: [1], repeats: 2, warmup: 0, min_seconds: 0, memory: false}
    """)))
    metrics = _pipeline.run(recipe, tmp_path / "run", verbose=0)
    found = metrics["optimize"]
    assert found["target_met"], found["message"]
    assert metrics["counts"]["optimized"]["flops"] <= 0.6 * metrics["counts"]["baseline"]["flops"]
    assert metrics["baseline_accuracy"] - metrics["final_accuracy"] <= 0.03 + 1e-9
    assert metrics["channels"]  # layers that lost channels, before -> after
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Optimize" in report and "(chosen)" in report
    assert (tmp_path / "run" / "optimize" / "pareto.png").is_file()
    served = metrics["artifacts_accuracy"]
    assert any(name.startswith("optimized onnx") for name in served), served


@pytest.mark.parametrize("extra, message", [
    ("prune: {final_sparsity: 0.5}\n", "remove prune"),
    ("optimize: {target: {speedup: 2.0, flops: 0.5}}\n", "exactly one of speedup"),
    ("optimize: {target: {speedup: 0.5}}\n", "'optimize.target.speedup' must be > 1"),
    ("optimize: {max_accuracy_drop: 0.01}\n", "missing required key 'optimize.target'"),
])
def test_optimize_recipe_mistakes_are_named(tmp_path, extra, message):
    base = GOOD.replace("prune:\n  final_sparsity: 0.5\n  epochs: 1\n", "")
    if "optimize" not in extra:
        extra += "optimize: {target: {flops: 0.5}}\n"
    with pytest.raises(_recipe.RecipeError, match=re.escape(message)):
        _recipe.load(write(tmp_path, base + extra))

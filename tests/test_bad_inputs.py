"""Bad inputs and faults, as a hostile user (or a full disk) would bring them.

Each case names the tfopt error it must raise and a word of the fix the
message must give. Faults are injected at every step of the export commit
(an OSError in-process, a kill in a subprocess) and the directory is checked
byte for byte afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

import tfopt
from tfopt import _pipeline, _recipe, errors
from tfopt.cli import main
from tfopt.export import _onnx, _staging

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


# -- tiny models and files, made once ------------------------------------------

def tiny(units=3, name="tiny"):
    inputs = keras.Input((4,), name="x")
    hidden = layers.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, layers.Dense(units, name="out")(hidden), name=name)


def two_outputs():
    inputs = keras.Input((4,), name="x")
    return keras.Model(inputs, [layers.Dense(2, name="a")(inputs),
                                layers.Dense(2, name="b")(inputs)], name="two")


X = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and broken files for the command-line cases (one export, reused)."""
    root = tmp_path_factory.mktemp("files")
    model = tiny()
    model.save(root / "m.keras")
    data = (root / "m.keras").read_bytes()
    (root / "trunc.keras").write_bytes(data[: len(data) // 2])
    np.save(root / "x.npy", X)
    np.save(root / "x_wrong.npy", np.zeros((8, 7), "float32"))
    np.save(root / "y.npy", np.zeros(8, "int64"))
    np.save(root / "y_short.npy", np.zeros(3, "int64"))
    (root / "text.npy").write_text("1,2,3\n4,5,6\n")
    tfopt.export(model, root / "export", formats=("onnx", "saved_model"), validation_data=X)
    onnx_bytes = (root / "export" / "model.onnx").read_bytes()
    (root / "trunc.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 3])
    broken = root / "broken_sm"
    broken.mkdir()
    pb = (root / "export" / "saved_model" / "1" / "saved_model.pb").read_bytes()
    (broken / "saved_model.pb").write_bytes(pb[: len(pb) // 3])
    (root / "a_file").write_text("not a folder")
    (root / "plain_folder").mkdir()
    return root


@pytest.fixture(scope="module")
def qat():
    return tfopt.quantize(tiny(name="q"), calibration_data=X)


def digest(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


# -- the API: (id, call, error type, a word of the fix) -------------------------

def _nan_model():
    model = tiny(name="nan")
    kernel = model.get_layer("out").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    return model


def _unbuilt():
    return keras.Sequential([layers.Dense(3)])


def _no_prunable():
    inputs = keras.Input((4,))
    return keras.Model(inputs, layers.BatchNormalization()(inputs))


class _Sub(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.dense = layers.Dense(2)

    def call(self, x, training=None):
        return self.dense(x)


def _subclassed():
    model = _Sub()
    model(X)
    return model


CS = tfopt.ConstantSparsity
PD = tfopt.PolynomialDecay
QC = tfopt.QuantizationConfig
E = errors

API_CASES = [
    # schedules
    ("constant_sparsity_1", lambda t: CS(1.0), E.ConfigError, "[0, 1)"),
    ("constant_sparsity_negative", lambda t: CS(-0.1), E.ConfigError, "[0, 1)"),
    ("constant_sparsity_nan", lambda t: CS(NAN), E.ConfigError, "[0, 1)"),
    ("constant_sparsity_string", lambda t: CS("0.5"), E.ConfigError, "number"),
    ("constant_sparsity_bool", lambda t: CS(True), E.ConfigError, "number"),
    ("frequency_0", lambda t: CS(0.5, frequency=0), E.ConfigError, ">= 1"),
    ("frequency_float", lambda t: CS(0.5, frequency=1.5), E.ConfigError, "integer"),
    ("begin_step_negative", lambda t: CS(0.5, begin_step=-1), E.ConfigError, ">= 0"),
    ("end_before_begin", lambda t: CS(0.5, begin_step=10, end_step=5), E.ConfigError, "-1"),
    ("power_nan", lambda t: PD(0.0, 0.8, 0, 100, power=NAN), E.ConfigError, "finite"),
    ("power_inf", lambda t: PD(0.0, 0.8, 0, 100, power=INF), E.ConfigError, "finite"),
    ("power_0", lambda t: PD(0.0, 0.8, 0, 100, power=0), E.ConfigError, "positive"),
    ("power_string", lambda t: PD(0.0, 0.8, 0, 100, power="3"), E.ConfigError, "3"),
    ("decay_no_steps", lambda t: PD(0.0, 0.8, 100, 100), E.ConfigError, "greater"),
    ("decay_final_inf", lambda t: PD(0.0, INF, 0, 100), E.ConfigError, "[0, 1)"),
    ("decay_frequency_bool", lambda t: PD(0.0, 0.8, 0, 100, frequency=True),
     E.ConfigError, "integer"),
    # quantization config
    ("ema_decay_string", lambda t: QC(activation_ema_decay="0.9"), E.ConfigError, "(0, 1)"),
    ("ema_decay_1", lambda t: QC(activation_ema_decay=1.0), E.ConfigError, "(0, 1)"),
    ("ema_decay_nan", lambda t: QC(activation_ema_decay=NAN), E.ConfigError, "(0, 1)"),
    ("per_channel_string", lambda t: QC(per_channel_weights="no"), E.ConfigError,
     "True or False"),
    ("narrow_range_int", lambda t: QC(narrow_range_weights=1), E.ConfigError, "True or False"),
    ("weight_bits_16", lambda t: QC(weight_bits=16), E.ConfigError, "2 to 8"),
    ("weight_bits_float", lambda t: QC(weight_bits=8.0), E.ConfigError, "integer"),
    ("freeze_after_negative", lambda t: QC(freeze_activation_ranges_after=-1), E.ConfigError,
     ">= 0"),
    ("freeze_after_bool", lambda t: QC(freeze_activation_ranges_after=True), E.ConfigError,
     "integer"),
    ("quantize_int4", lambda t: tfopt.quantize(tiny(), "int4"), E.ConfigError, "int8"),
    ("quantize_config_int", lambda t: tfopt.quantize(tiny(), 123), E.ConfigError,
     "QuantizationConfig"),
    # prune
    ("prune_a_path", lambda t: tfopt.prune("m.keras", CS(0.5)), E.NotAKerasModelError,
     "model"),
    ("prune_float_schedule", lambda t: tfopt.prune(tiny(), 0.5), E.ConfigError,
     "ConstantSparsity"),
    ("n_m_reversed", lambda t: tfopt.prune(tiny(), CS(0.5), n_m=(4, 2)), E.ConfigError,
     "(2, 4)"),
    ("n_m_string", lambda t: tfopt.prune(tiny(), CS(0.5), n_m=(2, "4")), E.ConfigError,
     "integers"),
    ("n_m_bool", lambda t: tfopt.prune(tiny(), CS(0.5), n_m=(True, 4)), E.ConfigError,
     "integers"),
    ("layers_int", lambda t: tfopt.prune(tiny(), CS(0.5), layers=123), E.ConfigError,
     "predicate"),
    ("layers_unknown", lambda t: tfopt.prune(tiny(), CS(0.5), layers=["nope"]), E.ConfigError,
     "Prunable layers"),
    ("layers_empty", lambda t: tfopt.prune(tiny(), CS(0.5), layers=[]), E.ConfigError,
     "predicate"),
    ("prune_twice", lambda t: tfopt.prune(tfopt.prune(tiny(), CS(0.5)), CS(0.5)),
     E.AlreadyPrunedError, "strip"),
    ("prune_qat", lambda t: tfopt.prune(t["qat"], CS(0.5)), E.ConfigError, "strip"),
    ("prune_unbuilt", lambda t: tfopt.prune(_unbuilt(), CS(0.5)), E.ModelNotBuiltError,
     "build"),
    ("prune_nothing", lambda t: tfopt.prune(_no_prunable(), CS(0.5)), E.NothingToPruneError,
     "get_prunable_weights"),
    ("n_m_bad_shape", lambda t: tfopt.prune(tiny(), CS(0.5), n_m=(2, 3), strict=True),
     E.IncompatibleShapeError, "multiple"),
    # quantize
    ("quantize_twice", lambda t: tfopt.quantize(t["qat"]), E.AlreadyQuantizedError,
     "original"),
    ("quantize_pruned", lambda t: tfopt.quantize(tfopt.prune(tiny(), CS(0.5))), E.ConfigError,
     "strip"),
    ("calibration_empty", lambda t: tfopt.quantize(tiny(), calibration_data=X[:0]),
     E.ConfigError, "at least one"),
    ("calibration_nan", lambda t: tfopt.quantize(tiny(), calibration_data=X * NAN),
     E.ConfigError, "finite"),
    ("calibration_wrong_shape", lambda t: tfopt.quantize(
        tiny(), calibration_data=np.zeros((4, 7), "float32")), E.ConfigError, "shaped"),
    ("quantize_a_string", lambda t: tfopt.quantize("model"), E.NotAKerasModelError, "model"),
    ("strip_none", lambda t: tfopt.strip(None), E.NotAKerasModelError, "model"),
    # export arguments
    ("export_a_path", lambda t: tfopt.export("m.keras", t["dir"]), E.NotAKerasModelError,
     "model"),
    ("format_unknown", lambda t: tfopt.export(tiny(), t["dir"], formats=("tflite",)),
     E.ConfigError, "Valid formats"),
    ("format_int", lambda t: tfopt.export(tiny(), t["dir"], formats=123), E.ConfigError,
     "Valid formats"),
    ("formats_empty", lambda t: tfopt.export(tiny(), t["dir"], formats=()), E.ConfigError,
     "Valid formats"),
    ("precision_int4", lambda t: tfopt.export(tiny(), t["dir"], precision="int4"),
     E.ConfigError, "fp16"),
    ("precision_int", lambda t: tfopt.export(tiny(), t["dir"], precision=16), E.ConfigError,
     "fp16"),
    ("int8_float_model", lambda t: tfopt.export(tiny(), t["dir"], precision="int8"),
     E.ConfigError, "tfopt.quantize"),
    ("fp16_qat_model", lambda t: tfopt.export(t["qat"], t["dir"], precision="fp16"),
     E.ConfigError, "int8"),
    ("version_0", lambda t: tfopt.export(tiny(), t["dir"], version=0), E.ConfigError, ">= 1"),
    ("version_string", lambda t: tfopt.export(tiny(), t["dir"], version="1"), E.ConfigError,
     "without quotes"),
    ("version_bool", lambda t: tfopt.export(tiny(), t["dir"], version=True), E.ConfigError,
     "integer"),
    ("version_float", lambda t: tfopt.export(tiny(), t["dir"], version=1.0), E.ConfigError,
     "integer"),
    ("opset_string", lambda t: tfopt.export(tiny(), t["dir"], opset="17"), E.ConfigError,
     "without quotes"),
    ("opset_99", lambda t: tfopt.export(tiny(), t["dir"], opset=99), E.ConfigError, "default"),
    ("opset_float", lambda t: tfopt.export(tiny(), t["dir"], opset=17.0), E.ConfigError,
     "integer"),
    ("tolerance_negative", lambda t: tfopt.export(tiny(), t["dir"], tolerance=-1),
     E.ConfigError, "1e-3"),
    ("tolerance_nan", lambda t: tfopt.export(tiny(), t["dir"], tolerance=NAN), E.ConfigError,
     "finite"),
    ("tolerance_string", lambda t: tfopt.export(tiny(), t["dir"], tolerance="1e-3"),
     E.ConfigError, "without quotes"),
    ("batch_sizes_unordered", lambda t: tfopt.export(tiny(), t["dir"], batch_sizes=(8, 1, 64)),
     E.ConfigError, "min <= opt <= max"),
    ("batch_sizes_0", lambda t: tfopt.export(tiny(), t["dir"], batch_sizes=(0, 1, 2)),
     E.ConfigError, ">= 1"),
    ("batch_sizes_two", lambda t: tfopt.export(tiny(), t["dir"], batch_sizes=(1, 8)),
     E.ConfigError, "(1, 8, 64)"),
    ("batch_sizes_string", lambda t: tfopt.export(tiny(), t["dir"], batch_sizes="1,8,64"),
     E.ConfigError, "(1, 8, 64)"),
    ("overwrite_string", lambda t: tfopt.export(tiny(), t["dir"], overwrite="yes"),
     E.ConfigError, "True or False"),
    ("freeze_int", lambda t: tfopt.export(tiny(), t["dir"], freeze=1), E.ConfigError,
     "True or False"),
    ("warmup_without_data", lambda t: tfopt.export(tiny(), t["dir"], warmup=True),
     E.ConfigError, "validation_data"),
    ("name_escapes", lambda t: tfopt.export(tiny(), t["dir"], formats=("triton",),
                                            name="../evil"), E.ConfigError, "folder name"),
    ("name_empty", lambda t: tfopt.export(tiny(), t["dir"], name=""), E.ConfigError,
     "folder name"),
    ("directory_int", lambda t: tfopt.export(tiny(), 123), E.ConfigError, "pathlib"),
    ("input_signature_string", lambda t: tfopt.export(tiny(), t["dir"], input_signature="x"),
     E.ConfigError, "TensorSpec"),
    ("export_pruned", lambda t: tfopt.export(tfopt.prune(tiny(), CS(0.5)), t["dir"]),
     E.ConfigError, "strip"),
    ("export_subclassed_no_signature", lambda t: tfopt.export(_Sub(), t["dir"]),
     E.ModelNotBuiltError, "input_signature"),
    # validation data
    ("validation_empty", lambda t: tfopt.export(tiny(), t["dir"], validation_data=X[:0]),
     E.ConfigError, "x_test[:64]"),
    ("validation_all_nan", lambda t: tfopt.export(tiny(), t["dir"], validation_data=X * NAN),
     E.ConfigError, "real inputs"),
    ("validation_some_nan", lambda t: tfopt.export(
        tiny(), t["dir"], validation_data=np.where(X > 1, NAN, X)), E.ModelOutputsNaNError,
     "Remove those rows"),
    ("keras_outputs_nan", lambda t: tfopt.export(_nan_model(), t["dir"], validation_data=X),
     E.ModelOutputsNaNError, "itself outputs NaN"),
    ("validation_wrong_shape", lambda t: tfopt.export(
        tiny(), t["dir"], validation_data=np.zeros((4, 7), "float32")), E.ConfigError,
     "x_test[:64]"),
    ("validation_two_arrays", lambda t: tfopt.export(tiny(), t["dir"], validation_data=[X, X]),
     E.ConfigError, "input(s)"),
    ("validation_dict_missing", lambda t: tfopt.export(tiny(), t["dir"],
                                                       validation_data={"y": X}),
     E.ConfigError, "missing"),
    ("validation_strings", lambda t: tfopt.export(tiny(), t["dir"],
                                                  validation_data=np.array(["a", "b"])),
     E.ConfigError, "expects"),
    ("validation_scalar", lambda t: tfopt.export(tiny(), t["dir"], validation_data=3.0),
     E.ConfigError, "expects"),
    # where the export goes
    ("directory_is_a_file", lambda t: tfopt.export(tiny(), t["file"]), E.ExportWriteError,
     "directory path"),
    ("directory_under_a_file", lambda t: tfopt.export(tiny(), t["file"] / "sub"),
     E.ExportWriteError, "directory path"),
    ("tensorrt_missing", lambda t: tfopt.export(tiny(), t["dir"], formats=("tensorrt",),
                                                validation_data=X),
     E.BackendUnavailableError, "pip install"),
    ("tftrt_missing", lambda t: tfopt.export(tiny(), t["dir"], formats=("tftrt",),
                                             validation_data=X),
     E.BackendUnavailableError, "tensorrt"),
    # bench
    ("bench_batch_0", lambda t: tfopt.bench.run([tiny()], X, batch_sizes=[0]), E.ConfigError,
     ">= 1"),
    ("bench_batch_negative", lambda t: tfopt.bench.run([tiny()], X, batch_sizes=[-1]),
     E.ConfigError, ">= 1"),
    ("bench_batch_string", lambda t: tfopt.bench.run([tiny()], X, batch_sizes="1"),
     E.ConfigError, "[1, 8, 32]"),
    ("bench_repeats_0", lambda t: tfopt.bench.run([tiny()], X, repeats=0), E.ConfigError,
     ">= 1"),
    ("bench_warmup_negative", lambda t: tfopt.bench.run([tiny()], X, warmup=-1), E.ConfigError,
     ">= 0"),
    ("bench_min_seconds_inf", lambda t: tfopt.bench.run([tiny()], X, min_seconds=INF),
     E.ConfigError, "finite"),
    ("bench_min_seconds_nan", lambda t: tfopt.bench.run([tiny()], X, min_seconds=NAN),
     E.ConfigError, "finite"),
    ("bench_labels_short", lambda t: tfopt.bench.run([tiny()], X, labels=np.zeros(3, int)),
     E.ConfigError, "one integer class per input row"),
    ("bench_inputs_empty", lambda t: tfopt.bench.run([tiny()], X[:0]), E.ConfigError,
     "real inputs"),
    ("bench_inputs_wrong_shape", lambda t: tfopt.bench.run(
        [tiny()], np.zeros((8, 7), "float32"), batch_sizes=[1], repeats=1, min_seconds=0),
     E.ConfigError, "shaped like"),
    ("bench_missing_artifact", lambda t: tfopt.bench.runners_for(t["dir"] / "nope.onnx"),
     E.ConfigError, "exists"),
    ("bench_plain_folder", lambda t: tfopt.bench.runners_for(t["file"].parent),
     E.ConfigError, "SavedModel"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, qat, tmp_path):
    _, call, error, fix = case
    (tmp_path / "a_file").write_text("x")
    context = {"qat": qat, "dir": tmp_path / "out", "file": tmp_path / "a_file"}
    before = digest(tmp_path)
    with pytest.raises(error) as info:
        call(context)
    assert fix.lower() in str(info.value).lower(), str(info.value)
    assert isinstance(info.value, (ValueError, TypeError, errors.ExportWriteError,
                                   errors.BackendUnavailableError))
    assert digest(tmp_path) == before  # nothing written, nothing left


def test_prune_of_a_qat_model_leaves_it_as_it_was(qat):
    weights = [w.copy() for w in qat.get_weights()]
    with pytest.raises(errors.ConfigError):
        tfopt.prune(qat, CS(0.5))
    assert all(np.array_equal(a, b) for a, b in zip(weights, qat.get_weights()))
    assert not tfopt.pruning.is_pruned(qat)


def test_compare_names_every_drifting_output_in_one_error(tmp_path, monkeypatch):
    from tfopt.export import _validate

    reference = {"a": np.ones((2, 2)), "b": np.ones((2, 2)), "c": np.ones((2, 2))}
    actual = {"a": np.ones((2, 2)) * 2, "b": np.full((2, 2), np.nan), "c": np.ones((2, 2))}
    with pytest.raises(errors.ExportValidationError) as info:
        _validate.compare("onnx", reference, actual,
                          _validate.relative_tolerances(reference, "fp32"))
    message = str(info.value)
    assert "'a' differs" in message and "'b' outputs NaN" in message and "'c'" not in message
    assert "tolerance=" in message


def test_fp16_clipping_is_one_warning_that_says_how_much(tmp_path):
    model = tiny()
    kernel = model.get_layer("hidden").kernel
    values = np.asarray(kernel).copy()
    values[0, :4] = [1e-9, -1e-9, 2e5, -3e5]
    kernel.assign(values)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(errors.ExportValidationError):  # 3e5 cannot survive float16
            tfopt.export(model, tmp_path / "out", formats=("onnx",), precision="fp16",
                         validation_data=X)
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not any("will be truncated" in t for t in texts), texts
    (summary,) = [t for t in texts if "clipped" in t]
    assert "down to 1e-09" in summary and "up to 3e+05" in summary
    assert not (tmp_path / "out").exists()


# -- recipes: (id, YAML, error type, a word of the fix) -------------------------

BASE = """\
name: tiny
model:
  source: digits_cnn
data:
  source: synthetic
  args: {shape: [8, 8, 1], classes: 10, train_samples: 8, test_samples: 8}
"""

RECIPE_CASES = [
    ("learning_rate_nan", BASE + "train: {epochs: 1, learning_rate: .nan}\n", "finite"),
    ("min_seconds_inf", BASE + "bench: {min_seconds: .inf}\n", "finite"),
    ("min_seconds_huge", BASE + "bench: {min_seconds: 1.0e+9}\n", "<= 3600"),
    ("min_seconds_unsigned_exponent", BASE + "bench: {min_seconds: 1.0e9}\n", "1.0e+9"),
    ("duplicate_key", BASE + "train: {epochs: 1}\ntrain: {epochs: 2}\n", "appears twice"),
    ("duplicate_nested_key", BASE + "prune:\n  epochs: 1\n  epochs: 2\n", "keep one"),
    ("name_escapes", BASE.replace("name: tiny", "name: ../../etc"), "folder name"),
    ("name_slash", BASE.replace("name: tiny", "name: a/b"), "folder name"),
    ("name_hidden", BASE.replace("name: tiny", "name: .hidden"), "folder name"),
    ("batch_size_0", BASE + "train: {batch_size: 0}\n", ">= 1"),
    ("epochs_negative", BASE + "train: {epochs: -1}\n", ">= 0"),
    ("epochs_float", BASE + "train: {epochs: 1.5}\n", "integer"),
    ("learning_rate_quoted", BASE + "train: {learning_rate: '0.001'}\n", "unquoted"),
    ("learning_rate_yaml_string", BASE + "train: {learning_rate: 1e-3}\n", "1.0e-3"),
    ("learning_rate_zero", BASE + "train: {learning_rate: 0}\n", "> 0"),
    ("sparsity_bool", BASE + "prune: {final_sparsity: true}\n", "number"),
    ("n_m_reversed", BASE + "prune: {n_m: [4, 2]}\n", "n < m"),
    ("n_m_strings", BASE + "prune: {n_m: [a, 2]}\n", "integer"),
    ("opset_string", BASE + "export: {opset: '17'}\n", "unquoted"),
    ("opset_high", BASE + "export: {opset: 99}\n", "<= 21"),
    ("format_unknown", BASE + "export: {formats: [tflite]}\n", "one of"),
    ("bench_batch_0", BASE + "bench: {batch_sizes: [0]}\n", ">= 1"),
    ("repeats_inf", BASE + "bench: {repeats: .inf}\n", "integer"),
    ("seed_negative", BASE + "seed: -1\n", ">= 0"),
    ("layers_not_list", BASE + "prune: {layers: conv}\n", "list"),
    ("unknown_top_key", BASE + "trian: {epochs: 1}\n", "unknown key"),
    ("integer_key", BASE + "1: x\n", "unknown key"),
    ("python_object", BASE + "train: !!python/object:os.system {}\n", "valid YAML"),
    ("not_a_mapping", "- a\n- b\n", "mapping"),
    ("bad_yaml", "name: [unclosed\n", "syntax"),
    ("missing_model", "name: x\ndata: {source: digits}\n", "missing required key"),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_bad_input(case, tmp_path):
    _, text, fix = case
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(_recipe.RecipeError) as info:
        _recipe.load(path)
    assert fix.lower() in str(info.value).lower(), str(info.value)


# Checked by check_ready(), before any model is built or trained.
READY_CASES = [
    ("model_args_unknown", BASE.replace("source: digits_cnn",
                                        "source: digits_cnn\n  args: {bogus: 1}"),
     _recipe.RecipeError, "accepts"),
    ("data_args_unknown", BASE.replace("source: synthetic", "source: digits").replace(
        "  args: {shape: [8, 8, 1], classes: 10, train_samples: 8, test_samples: 8}",
        "  args: {bogus: 1}"), _recipe.RecipeError, "accepts"),
    ("synthetic_args_unknown", BASE.replace("test_samples: 8", "test_samples: 8, colour: 1"),
     _recipe.RecipeError, "accepts"),
    ("synthetic_classes_string", BASE.replace("classes: 10", "classes: '10'"),
     _recipe.RecipeError, "without quotes"),
    ("synthetic_shape_zero", BASE.replace("shape: [8, 8, 1]", "shape: [0, 8]"),
     _recipe.RecipeError, ">= 1"),
    ("applications_args_unknown", BASE.replace(
        "source: digits_cnn", "source: keras.applications.MobileNetV2\n  args: {widht: 1}"),
     _recipe.RecipeError, "alpha"),
    ("applications_unknown", BASE.replace("source: digits_cnn",
                                          "source: keras.applications.Nope"),
     _recipe.RecipeError, "MobileNetV2"),
    ("entry_point_module_missing", BASE.replace("source: digits_cnn",
                                                "source: no_such_module:make"),
     _recipe.RecipeError, "PYTHONPATH"),
    ("entry_point_function_missing", BASE.replace("source: digits_cnn",
                                                  "source: tfopt.examples:nope"),
     _recipe.RecipeError, "defines"),
    ("entry_point_not_callable", BASE.replace("source: digits_cnn",
                                              "source: tfopt:__version__"),
     _recipe.RecipeError, "function"),
    ("keras_file_missing", BASE.replace("source: digits_cnn", "source: nope.keras"),
     _recipe.RecipeError, "path"),
    ("keras_file_with_args", BASE.replace("source: digits_cnn",
                                          "source: nope.keras\n  args: {a: 1}"),
     _recipe.RecipeError, "remove model.args"),
    ("data_source_unknown", BASE.replace("source: synthetic", "source: imagenet"),
     _recipe.RecipeError, "synthetic"),
    ("tensorrt_needs_gpu", BASE + "export: {formats: [tensorrt]}\n",
     errors.BackendUnavailableError, "tensorrt"),
    ("tftrt_missing", BASE + "export: {formats: [tftrt]}\n",
     errors.BackendUnavailableError, "tensorrt"),
]


@pytest.mark.parametrize("case", READY_CASES, ids=[c[0] for c in READY_CASES])
def test_recipe_checked_before_training(case, tmp_path, monkeypatch):
    _, text, error, fix = case
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = _recipe.load(path)
    trained = []
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: trained.append(1))
    with pytest.raises(error) as info:
        _pipeline.run(recipe, tmp_path / "out", verbose=0)
    assert fix.lower() in str(info.value).lower(), str(info.value)
    assert not trained and not (tmp_path / "out").exists()


def test_readme_says_recipes_run_code():
    readme = (ROOT / "README.md").read_text()
    assert "trusted like Python" in readme


# -- the command: exit 2, one line, no traceback ---------------------------------

def run_main(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLI_CASES = [
    ("export_truncated_keras", lambda f: ["export", f / "trunc.keras", "-o", f / "o1"],
     "save it again"),
    ("inspect_truncated_keras", lambda f: ["inspect", f / "trunc.keras"], "truncated"),
    ("bench_truncated_onnx", lambda f: ["bench", f / "trunc.onnx", "--inputs", f / "x.npy"],
     "truncated"),
    ("bench_truncated_saved_model", lambda f: ["bench", f / "broken_sm", "--inputs",
                                               f / "x.npy"], "truncated"),
    ("bench_inputs_wrong_shape", lambda f: ["bench", f / "export" / "model.onnx", "--inputs",
                                            f / "x_wrong.npy", "--batch", "1", "--repeats",
                                            "1"], "shaped like"),
    ("bench_labels_short", lambda f: ["bench", f / "export" / "model.onnx", "--inputs",
                                      f / "x.npy", "--labels", f / "y_short.npy"],
     "one integer label per input"),
    ("export_text_validation_data", lambda f: ["export", f / "m.keras", "-o", f / "o2",
                                               "--validation-data", f / "text.npy"],
     "numpy.save"),
    ("export_missing_validation_data", lambda f: ["export", f / "m.keras", "-o", f / "o3",
                                                  "--validation-data", f / "nope.npy"],
     "no file"),
    ("export_output_is_a_file", lambda f: ["export", f / "m.keras", "-o", f / "a_file"],
     "directory path"),
    ("export_into_existing", lambda f: ["export", f / "m.keras", "-o", f / "export"],
     "overwrite"),
    ("export_precision_int4", lambda f: ["export", f / "m.keras", "-o", f / "o4",
                                         "--precision", "int4"], "fp16"),
    ("export_format_tflite", lambda f: ["export", f / "m.keras", "-o", f / "o5", "-f",
                                        "tflite"], "Valid formats"),
    ("export_not_keras", lambda f: ["export", f / "x.npy", "-o", f / "o6"], "model.save"),
    ("export_folder_as_keras", lambda f: ["export", f / "plain_folder", "-o", f / "o7"],
     "model.save"),
    ("bench_batch_0", lambda f: ["bench", f / "export" / "model.onnx", "--batch", "0"],
     "positive integer"),
    ("bench_batch_negative", lambda f: ["bench", f / "export" / "model.onnx", "--batch=-1"],
     "positive integer"),
    ("bench_batch_word", lambda f: ["bench", f / "export" / "model.onnx", "--batch", "1,x"],
     "positive integer"),
    ("bench_repeats_0", lambda f: ["bench", f / "export" / "model.onnx", "--repeats", "0"],
     "positive integer"),
    ("bench_missing", lambda f: ["bench", f / "nope.onnx"], "no artifact"),
    ("bench_plain_folder", lambda f: ["bench", f / "plain_folder"], "SavedModel"),
    ("inspect_plain_folder", lambda f: ["inspect", f / "plain_folder"], "manifest.json"),
    ("inspect_missing", lambda f: ["inspect", f / "nope.keras"], "no model"),
    ("run_missing_recipe", lambda f: ["run", f / "nope.yaml"], "recipe"),
    ("run_output_is_a_file", lambda f: ["run", ROOT / "recipes" / "digits_prune_qat.yaml",
                                        "-o", f / "a_file"], "folder"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_bad_input(case, files, capsys):
    _, args, fix = case
    before = digest(files)
    code, out, err = run_main(capsys, *args(files))
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("tfopt ") and ": error: " in lines[0]
    assert fix.lower() in lines[0].lower(), lines[0]
    assert digest(files) == before


@pytest.mark.parametrize("what", ["onnx", "export folder"])
def test_inspect_reads_onnx_files_and_export_folders(what, files, capsys):
    target = files / "export" / ("model.onnx" if what == "onnx" else "")
    code, out, err = run_main(capsys, "inspect", target)
    assert code == 0, err
    assert ("Q/DQ" in out) if what == "onnx" else ("tfopt export of 'tiny'" in out)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(files, capsys,
                                                                      monkeypatch):
    from tfopt import _inspect

    def boom(path):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(_inspect, "summary", boom)
    code, _, err = run_main(capsys, "inspect", files / "m.keras")
    assert code == 2 and "Traceback" not in err and "--debug" in err
    assert "unexpected RuntimeError: something inside broke" in err
    code, _, err = run_main(capsys, "--debug", "inspect", files / "m.keras")
    assert code == 2 and "Traceback" in err


def test_ctrl_c_exits_130_and_leaves_the_export_as_it_was(files, capsys, monkeypatch, tmp_path):
    out = tmp_path / "export"
    tfopt.export(tiny(), out, formats=("onnx", "saved_model"), validation_data=X)
    before = digest(out)

    def interrupted(proto, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(_onnx, "save", interrupted)
    code, _, err = run_main(capsys, "export", files / "m.keras", "-o", out, "--overwrite")
    assert code == 130 and "Traceback" not in err and "interrupted" in err
    assert digest(out) == before


def test_ctrl_c_during_commit_rolls_back(tmp_path, monkeypatch):
    out = tmp_path / "export"
    tfopt.export(tiny(), out, formats=("onnx", "saved_model"), validation_data=X)
    before = digest(out)
    steps = []

    def hook(step):
        steps.append(step)
        if step == "install:manifest.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(_staging, "_fault_hook", hook)
    with pytest.raises(KeyboardInterrupt):
        tfopt.export(tiny(), out, formats=("onnx", "saved_model"), validation_data=X,
                     overwrite=True)
    assert "install:saved_model/1" in steps and digest(out) == before


def tfopt_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tfopt.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", ["run", "export", "bench", "inspect"])
def test_each_command_exits_2_without_a_traceback(command, files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("source: digits_cnn",
                                   "source: digits_cnn\n  args: {bogus: 1}"))
    args = {"run": ["run", recipe, "-o", tmp_path / "out"],
            "export": ["export", files / "trunc.keras", "-o", tmp_path / "out"],
            "bench": ["bench", files / "export" / "model.onnx", "--batch=-1"],
            "inspect": ["inspect", files / "trunc.keras"]}[command]
    result = tfopt_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tfopt {command}: error: ")
    assert not (tmp_path / "out").exists()


# -- export commit: faults at every step ----------------------------------------

OLD = {"saved_model/1/saved_model.pb": b"old pb", "saved_model/1/variables/v": b"old v",
       "model.onnx": b"old onnx", "frozen_graph.pb": b"old frozen",
       "manifest.json": b'{"artifacts": {"frozen_graph": {"path": "frozen_graph.pb"}}}',
       "notes.txt": b"the user's own file"}
NEW = {"saved_model/1/saved_model.pb": b"new pb", "saved_model/1/variables/v": b"new v",
       "model.onnx": b"new onnx", "manifest.json": b"{}"}
TARGETS = ["saved_model/1", "model.onnx", "manifest.json"]
STEPS = ["journal", "set_aside:saved_model/1", "install:saved_model/1", "set_aside:model.onnx",
         "install:model.onnx", "set_aside:manifest.json", "install:manifest.json",
         "remove:frozen_graph.pb", "switch"]

# Runs without importing TensorFlow: only tfopt.errors and the staging module.
STAGE_SCRIPT = textwrap.dedent("""
    import os, sys, time, types
    root, directory, fault, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    for name in ("tfopt", "tfopt.export"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = module
    from tfopt.export import _staging
    NEW = {new!r}
    def hook(step):
        if step == fault:
            os._exit(9)
    _staging._fault_hook = hook
    try:
        with _staging.Staging(directory, {targets!r}, overwrite=hold == 0,
                              owned=["frozen_graph.pb", "saved_model/2"]) as stage:
            for name, data in NEW.items():
                path = stage.root / "new" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if fault == "build":
                os._exit(9)
            time.sleep(hold)
            stage.commit()
    except Exception as exc:
        print(type(exc).__name__, exc)
        sys.exit(3)
    print("committed")
""").format(new=NEW, targets=TARGETS)


def write_tree(directory: Path, files: dict) -> None:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def stage_new(directory: Path, overwrite=True) -> _staging.Staging:
    stage = _staging.Staging(directory, TARGETS, overwrite=overwrite,
                             owned=["frozen_graph.pb", "saved_model/2"])
    return stage


def commit_new(directory: Path) -> None:
    with stage_new(directory) as stage:
        for name, data in NEW.items():
            path = stage.root / "new" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        stage.commit()


def expected_new(directory: Path) -> dict:
    scratch = directory.parent / "expected"
    write_tree(scratch, {k: v for k, v in OLD.items() if k != "frozen_graph.pb"})
    write_tree(scratch, NEW)
    want = digest(scratch)
    return want


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("step", STEPS)
def test_oserror_at_each_commit_step_restores_the_old_export(step, code, tmp_path, monkeypatch):
    directory = tmp_path / "out"
    write_tree(directory, OLD)
    before = digest(directory)

    def hook(name):
        if name == step:
            raise OSError(code, os.strerror(code), str(directory / "x"))

    monkeypatch.setattr(_staging, "_fault_hook", hook)
    with pytest.raises(errors.ExportWriteError) as info:
        commit_new(directory)
    assert ("disk is full" if code == errno.ENOSPC else "read-only") in str(info.value)
    assert digest(directory) == before


@pytest.mark.parametrize("step", ["build", *STEPS, "clean"])
def test_kill_at_each_step_then_the_next_export_finds_a_whole_export(step, tmp_path):
    directory = tmp_path / "out"
    write_tree(directory, OLD)
    before = digest(directory)
    killed = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(ROOT), str(directory),
                             step, "0"], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 9, killed.stdout + killed.stderr
    # The next export (here: its lock and recovery) undoes a commit that did not finish.
    with stage_new(directory):
        pass
    after = digest(directory)
    if step == "clean":  # killed after the switch: the new export is complete
        assert after == expected_new(directory)
    else:
        assert after == before
    assert not [p for p in directory.iterdir() if p.name.startswith(".tfopt")]
    commit_new(directory)
    assert digest(directory) == expected_new(directory)


def test_two_processes_exporting_to_one_new_directory_do_not_both_win(tmp_path):
    directory = tmp_path / "new" / "out"
    procs = [subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(ROOT), str(directory),
                               "none", "1.5"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs[1] == "committed", outputs
    assert outputs[0].startswith("ArtifactExistsError"), outputs
    write_tree(tmp_path / "expected", NEW)
    assert digest(directory) == digest(tmp_path / "expected")


def test_two_real_exports_at_once(tmp_path):
    script = textwrap.dedent("""
        import sys
        import numpy as np, keras, tfopt
        inputs = keras.Input((4,), name="x")
        model = keras.Model(inputs, keras.layers.Dense(3, name="out")(inputs))
        x = np.ones((4, 4), "float32")
        try:
            tfopt.export(model, sys.argv[1], formats=("onnx",), validation_data=x)
            print("ok")
        except tfopt.errors.ArtifactExistsError:
            print("exists")
    """)
    directory = tmp_path / "same"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    outputs = sorted(p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs)
    assert outputs == ["exists", "ok"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx"]
    assert manifest["formats"] == ["onnx"]


def test_failed_export_into_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(errors.ExportValidationError):
        tfopt.export(tiny(), tmp_path / "a" / "b", formats=("onnx",), validation_data=X,
                     tolerance=1e-30, precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_fewer_formats_over_an_old_export_leave_no_stale_files(tmp_path):
    tfopt.export(tiny(), tmp_path, formats=("onnx", "saved_model", "frozen_graph"),
                 validation_data=X)
    (tmp_path / "notes.txt").write_text("mine")
    result = tfopt.export(tiny(), tmp_path, formats=("onnx",), validation_data=X,
                          overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx",
                                                          "notes.txt"]
    assert list(result.manifest["artifacts"]) == ["onnx"]


def test_stale_staging_folders_are_removed_by_the_next_export(tmp_path):
    (tmp_path / ".tfopt-staging-deadbeef" / "new").mkdir(parents=True)
    (tmp_path / ".tfopt-staging-deadbeef" / "new" / "model.onnx").write_bytes(b"half")
    tfopt.export(tiny(), tmp_path, formats=("onnx",), validation_data=X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]


def test_disk_full_while_building_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    tfopt.export(tiny(), tmp_path, formats=("onnx",), validation_data=X)
    before = digest(tmp_path)

    def full(proto, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(_onnx, "save", full)
    with pytest.raises(errors.ExportWriteError, match="disk is full"):
        tfopt.export(tiny(), tmp_path, formats=("onnx",), validation_data=X, overwrite=True)
    assert digest(tmp_path) == before


def test_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(errors.ExportWriteError, match="read-only"):
        tfopt.export(tiny(), tmp_path / "new", formats=("onnx",), validation_data=X)


def test_tensorflow_disk_full_while_writing_a_saved_model_is_a_clear_error(tmp_path,
                                                                           monkeypatch):
    import tensorflow as tf

    from tfopt.export import _saved_model

    def full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(_saved_model, "write_saved_model", full)
    with pytest.raises(errors.ExportWriteError, match="disk is full"):
        tfopt.export(tiny(), tmp_path / "new", formats=("saved_model",), validation_data=X)
    assert list(tmp_path.iterdir()) == []

"""tfopt.optimize, tfopt.sensitivity, tfopt.Distiller and the pieces under them.

Models are trained here (the digits CNN, an MLP) so that accuracy means
something; each optimize run is kept to a few epochs and one sensitivity
fraction, with a FLOPs target where no point of the path needs timing.
"""

import json

import keras
import numpy as np
import pytest

import tfopt
from tfopt import _tree
from tfopt._optimize import _api, _measure
from tfopt.errors import ConfigError, UnsupportedModelError
from tfopt.examples import compile_classifier, digits_cnn

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

FAST = dict(epochs=1, qat_epochs=1, fractions=(0.5,), max_rounds=2, verbose=0)


def _onnx_accuracy(path, x, y):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(-1) == y))


def test_optimize_meets_a_flops_target_within_the_budget(trained_digits, digits, tmp_path):
    (x, y), (xv, yv) = digits
    before = [w.copy() for w in trained_digits.get_weights()]
    dense_accuracy = float(np.mean(trained_digits.predict(xv, verbose=0).argmax(-1) == yv))
    result = tfopt.optimize(trained_digits, (x, y), validation_data=(xv, yv),
                            target=tfopt.Target(flops=0.6), max_accuracy_drop=0.02,
                            output=tmp_path / "opt", **FAST)
    # the user's model is untouched
    for a, b in zip(before, trained_digits.get_weights()):
        np.testing.assert_array_equal(a, b)
    chosen = result.chosen
    assert result.target_met, result.message
    assert chosen.flops <= 0.6
    assert chosen.drop <= 0.02
    assert chosen.precision in ("fp32", "int8")
    assert abs(result.baseline["metric"] - dense_accuracy) < 1e-9
    # the plain model is smaller, carries no tfopt layer, and is what the candidate says
    assert not _tree.carries(result.model, _tree.PRUNING)
    assert result.model.count_params() == chosen.params < trained_digits.count_params()
    if chosen.precision == "int8":
        assert result.qat_model is not None and _tree.carries(result.qat_model,
                                                              _tree.QUANTIZATION)
    # the exported file computes the metric the table reports, measured here anew
    onnx = result.export.paths["onnx"]
    assert abs(_onnx_accuracy(onnx, xv, yv) - chosen.metric) < 1e-9
    assert dense_accuracy - _onnx_accuracy(onnx, xv, yv) <= 0.02
    assert (result.export.paths["saved_model"] / "saved_model.pb").is_file()
    # every candidate is in the table and the JSON, each flagged as its numbers say
    names = [c.name for c in result.candidates]
    assert names[:2] == ["dense fp32", "dense int8 (calibrated)"]
    for c in result.candidates:
        assert c.within_budget == (c.drop <= 0.02 + 1e-9)
        assert c.latency_ms > 0 and c.metric >= 0
    saved = json.loads((tmp_path / "opt" / "candidates.json").read_text())
    assert [c["name"] for c in saved["candidates"]] == names
    assert saved["chosen"] == chosen.name
    report = (tmp_path / "opt" / "report.md").read_text()
    assert chosen.name + " (chosen)" in report and "ISA" in report
    assert (tmp_path / "opt" / "pareto.png").stat().st_size > 1000
    assert "faster than the dense FP32 on onnxruntime at batch 1" in result.summary()
    assert result.sensitivity.groups and set(result.sensitivity.groups) <= {
        "conv1", "conv2", "dense1"}


def test_optimize_resumes_after_an_interruption(trained_digits, digits, tmp_path, monkeypatch):
    (x, y), (xv, yv) = digits
    kwargs = dict(validation_data=(xv[:120], yv[:120]), target=tfopt.Target(flops=0.7),
                  max_accuracy_drop=0.05, output=tmp_path / "opt", **FAST)
    real_recover = _api.recover

    def interrupted(*args, **kw):
        raise KeyboardInterrupt  # a Ctrl-C once sensitivity is done

    monkeypatch.setattr(_api, "recover", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tfopt.optimize(trained_digits, (x, y), **kwargs)
    state = json.loads((tmp_path / "opt" / "state.json").read_text())
    assert {"baseline", "dense int8"} <= set(state["done"])
    assert (tmp_path / "opt" / "sensitivity.json").is_file()

    exports, scans = [], []
    real_export = _measure.export_and_measure
    monkeypatch.setattr(_measure, "export_and_measure",
                        lambda model, directory, *a, **k: exports.append(directory.name)
                        or real_export(model, directory, *a, **k))
    real_scan = _api._sensitivity.measure_groups
    monkeypatch.setattr(_api._sensitivity, "measure_groups",
                        lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    monkeypatch.setattr(_api, "recover", real_recover)
    result = tfopt.optimize(trained_digits, (x, y), **kwargs)
    assert "dense-fp32" not in exports and "dense-int8-calibrated" not in exports
    assert not scans  # the sensitivity scan was read back, not redone
    assert result.chosen.within_budget
    # other settings in the same folder are refused, not mixed in
    with pytest.raises(ConfigError, match="another model, data or settings"):
        tfopt.optimize(trained_digits, (x, y), **{**kwargs, "max_accuracy_drop": 0.01})


def _mlp_with_an_outlier_weight(digits):
    """Digits as 64 pixels plus an input that is always 0, read by the first layer with a
    weight of 1000 in every unit. Float computes 0 * 1000 = 0; INT8 gives each unit one
    weight scale (1000 / 64), which rounds every real weight of the first layer to 0,
    while every other layer quantizes well. Fine-tuning cannot move the outlier: its
    input, and so its gradient, is 0."""
    (x, y), (xv, yv) = digits

    def widen(images):
        flat = images.reshape(len(images), -1)
        return np.concatenate([flat, np.zeros((len(flat), 1), "float32")], 1)

    inputs = keras.Input((65,), name="pixels")
    h = keras.layers.Dense(48, activation="relu", name="first")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    keras.utils.set_random_seed(0)
    compile_classifier(model)
    model.fit(widen(x), y, epochs=30, batch_size=32, verbose=0)
    kernel = model.get_layer("first").kernel
    kernel.assign(keras.ops.concatenate([kernel[:64], keras.ops.full((1, 48), 1000.0)], 0))
    return model, (widen(x), y), (widen(xv), yv)


def test_optimize_puts_the_layer_int8_breaks_back_to_float(digits, tmp_path):
    model, train, val = _mlp_with_an_outlier_weight(digits)
    dense = float(np.mean(model.predict(val[0], verbose=0).argmax(-1) == val[1]))
    assert dense > 0.9
    result = tfopt.optimize(model, train, validation_data=val, target=tfopt.Target(flops=0.9),
                            max_accuracy_drop=0.03, output=tmp_path / "opt", **FAST)
    by_name = {c.name: c for c in result.candidates}
    assert not by_name["dense int8 (calibrated)"].within_budget  # the fault is real
    all_int8 = [c for c in result.candidates if c.precision == "int8" and c.fractions
                and not c.float_layers]
    assert all_int8 and not all_int8[0].within_budget
    rescued = [c for c in result.candidates if c.float_layers]
    assert rescued and rescued[0].float_layers == ["first"]  # the most sensitive layer first
    assert rescued[0].within_budget
    assert result.sensitivity.layer_order()[0] == "first"
    assert result.chosen.drop <= 0.03


@pytest.mark.parametrize("bad, match", [
    (dict(max_accuracy_drop=-0.01), "max_accuracy_drop"),
    (dict(max_accuracy_drop=float("nan")), "max_accuracy_drop"),
    (dict(target="fast"), "tfopt.Target"),
    (dict(epochs=0), "epochs"),
    (dict(metric="f1"), "metric"),
    (dict(target=tfopt.Target(flops=0.001)), "cannot be reached"),
    (dict(target=tfopt.Target(speedup=1000.0)), "out of reach"),
])
def test_bad_arguments_are_refused_before_any_training(trained_digits, digits, tmp_path,
                                                       monkeypatch, bad, match):
    (x, y), (xv, yv) = digits
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit() was called"))
    kwargs = dict(validation_data=(xv, yv), target=tfopt.Target(flops=0.5),
                  output=tmp_path / "opt", **FAST)
    kwargs.update(bad)
    with pytest.raises(ConfigError, match=match):
        tfopt.optimize(trained_digits, (x, y), **kwargs)
    assert not (tmp_path / "opt").exists()  # nothing left to block a corrected call


def test_bad_data_and_a_foreign_output_folder_are_refused(trained_digits, digits, tmp_path):
    (x, y), (xv, yv) = digits
    target = tfopt.Target(flops=0.5)
    with pytest.raises(ConfigError, match="empty"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(xv[:0], yv[:0]),
                       target=target, output=tmp_path / "a")
    with pytest.raises(ConfigError, match="labels"):
        tfopt.optimize(trained_digits, (x, y[:10]), validation_data=(xv, yv), target=target,
                       output=tmp_path / "b")
    nan = xv.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(nan, yv), target=target,
                       output=tmp_path / "c")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an optimize run"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(xv, yv), target=target,
                       output=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="is a file"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(xv, yv), target=target,
                       output=tmp_path / "mine" / "notes.txt")
    import tensorflow as tf

    with pytest.raises(ConfigError, match="train_data is empty"):
        tfopt.optimize(trained_digits, tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(8),
                       validation_data=(xv, yv), target=target, output=tmp_path / "e")

    def exploding(t, p):
        raise RuntimeError("metric exploded")

    with pytest.raises(ConfigError, match="metric 'exploding' raised RuntimeError"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(xv, yv), target=target,
                       metric=exploding, output=tmp_path / "f")
    with pytest.raises(ConfigError, match="one number"):
        tfopt.optimize(trained_digits, (x, y), validation_data=(xv, yv), target=target,
                       metric=lambda t, p: "good", output=tmp_path / "d")


def test_a_subclassed_model_is_refused_with_the_fix(digits, tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(8, 3)
            self.head = keras.layers.Dense(10)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    (x, y), (xv, yv) = digits
    net = Net()
    net(x[:2])
    with pytest.raises(UnsupportedModelError, match="functional API"):
        tfopt.optimize(net, (x, y), validation_data=(xv, yv), target=tfopt.Target(flops=0.5),
                       output=tmp_path / "opt")
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one goal"),
    (dict(speedup=2.0, flops=0.5), "exactly one goal"),
    (dict(speedup=0.5), "speedup"),
    (dict(flops=1.5), "flops"),
    (dict(latency_ms=-1.0), "latency_ms"),
    (dict(engine="tensorrt", speedup=2.0), "engine"),
    (dict(batch_size=0, speedup=2.0), "batch_size"),
])
def test_target_refuses_what_it_cannot_mean(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tfopt.Target(**kwargs)


def test_sensitivity_ranks_groups_on_a_trained_model(trained_digits, digits):
    (x, y), (xv, yv) = digits
    sens = tfopt.sensitivity(trained_digits, (xv, yv), train_data=(x, y),
                             fractions=(0.5, 0.9))
    assert set(sens.groups) == {"conv1", "conv2", "dense1"}
    for name, group in sens.groups.items():
        assert set(group["metric"]) == {0.5, 0.9}
        assert group["flops"][0.9] < group["flops"][0.5] < sens.flops
        assert sens.drop(name, 0.0) == 0.0
        assert sens.drop(name, 0.9) >= sens.drop(name, 0.5) - 0.02
    # removing 90% of a trained layer's channels costs something somewhere
    assert max(sens.drop(name, 0.9) for name in sens.groups) > 0.05
    assert "| conv1 | 32 |" in sens.table()
    again = tfopt.Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert again.drop("dense1", 0.7) == pytest.approx(sens.drop("dense1", 0.7))


def test_distiller_trains_the_student_toward_the_teacher(trained_digits, digits):
    (x, y), (xv, yv) = digits
    teacher_weights = [w.copy() for w in trained_digits.get_weights()]
    keras.utils.set_random_seed(1)
    student = digits_cnn(name="student")
    wrong = np.random.default_rng(0).integers(0, 10, len(y))  # labels that teach nothing
    distiller = tfopt.Distiller(student, trained_digits, alpha=0.0, temperature=2.0)
    distiller.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x, wrong, epochs=8, batch_size=64, verbose=0)
    agreement = np.mean(student.predict(xv, verbose=0).argmax(-1)
                        == trained_digits.predict(xv, verbose=0).argmax(-1))
    assert agreement > 0.9  # learnt from the teacher alone
    for a, b in zip(teacher_weights, trained_digits.get_weights()):
        np.testing.assert_array_equal(a, b)  # the teacher is never trained
    assert not any(v is w for v in distiller.trainable_variables
                   for w in trained_digits.trainable_variables)
    with pytest.raises(ConfigError, match="alpha"):
        tfopt.Distiller(student, trained_digits, alpha=1.5)


def test_channel_groups_take_their_own_fractions(trained_digits):
    from tfopt.pruning import _channels

    pruned = tfopt.prune(trained_digits, tfopt.ConstantSparsity(0.5), structure="channels")
    _channels.set_group_fractions(pruned, {"conv1": 0.5, "dense1": 0.25})
    _channels.update_masks(pruned, 0.5)
    small = tfopt.strip(pruned)
    widths = {layer.name: getattr(layer, "filters", getattr(layer, "units", None))
              for layer in small.layers}
    assert widths["conv1"] == 16 and widths["conv2"] == 32 and widths["dense1"] == 48
    with pytest.raises(ConfigError, match="No channel group"):
        _channels.set_group_fractions(pruned, {"flatten": 0.5})


def test_quantize_leaves_the_layers_not_selected_in_float(trained_digits, digits):
    (x, _), _ = digits
    qat = tfopt.quantize(trained_digits, layers=lambda layer: layer.name != "conv1",
                         calibration_data=x[:64])
    wrapped = {w.layer.name for w in _tree.find(qat, lambda la: hasattr(la, "layer")
                                                and la.__class__.__name__ == "QuantizeWrapper")}
    assert "conv1" not in wrapped and {"conv2", "dense1", "logits"} <= wrapped
    with pytest.raises(ConfigError, match="not quantizable layers"):
        tfopt.quantize(compile_classifier(digits_cnn()), layers=["conv1", "flatten"])


def test_optimize_measures_on_openvino_when_that_is_the_engine(trained_digits, digits, tmp_path):
    pytest.importorskip("openvino")
    (x, y), (xv, yv) = digits
    result = tfopt.optimize(trained_digits, (x, y), validation_data=(xv[:150], yv[:150]),
                            target=tfopt.Target(engine="openvino", flops=0.8),
                            max_accuracy_drop=0.03, output=tmp_path / "opt", **FAST)
    assert (result.export.paths["openvino"] / "model.xml").is_file()
    runner = _measure.engine_runner(tmp_path / "opt" / "export", result.target)
    assert runner.backend == "openvino_cpu"
    predicted = np.concatenate([runner.first([xv[i:i + 50]]) for i in range(0, 150, 50)])
    assert float(np.mean(predicted.argmax(-1) == yv[:150])) == pytest.approx(
        result.chosen.metric)
    assert "on openvino at batch 1" in result.summary()

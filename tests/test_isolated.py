"""Tests that need a fresh interpreter: device setup and import side effects."""

import subprocess
import sys
import textwrap



def run_python(code: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_pruning_under_mirrored_strategy_with_two_logical_cpus():
    out = run_python(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np, tfopt
        from tfopt.examples import digits_cnn, compile_classifier

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 10, 128)
        with strategy.scope():
            pruned = tfopt.prune(digits_cnn(), tfopt.PolynomialDecay(0.0, 0.7, 0, 12, frequency=3))
            compile_classifier(pruned)
        pruned.fit(x, y, batch_size=32, epochs=4, verbose=0,
                   callbacks=[tfopt.callbacks.PruningStep()])
        for path, value in tfopt.sparsity(tfopt.strip(pruned)).items():
            print(path, round(value, 3))
            assert abs(value - 0.7) < 0.01, (path, value)
        print("OK")
        """
    )
    assert out.strip().endswith("OK")


def test_two_four_channels_and_qat_under_mirrored_strategy_keep_replicas_identical():
    out = run_python(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import warnings
        import keras, numpy as np, tfopt
        from tfopt.examples import digits_cnn, compile_classifier

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 10, 128)

        def replicas_identical(model):
            for v in model.variables:
                values = [np.asarray(c) for c in getattr(v.value, "values", [v.value])]
                assert len(values) == 2, (v.path, len(values))
                assert all(np.array_equal(values[0], o) for o in values[1:]), v.path

        schedule = tfopt.ConstantSparsity(0.5, frequency=2)
        for name, make in (
                ("2:4", lambda: tfopt.prune(digits_cnn(), schedule, n_m=(2, 4))),
                ("channels", lambda: tfopt.prune(digits_cnn(), schedule, structure="channels")),
                ("qat", lambda: tfopt.quantize(digits_cnn(), calibration_data=x[:32]))):
            with strategy.scope(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 2:4 names the layer it leaves dense
                model = compile_classifier(make())
            callbacks = [] if name == "qat" else [tfopt.callbacks.PruningStep()]
            model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=callbacks)
            replicas_identical(model)
            plain = model if name == "qat" else tfopt.strip(model)
            if name == "channels":
                assert plain.count_params() < digits_cnn().count_params()
            elif name == "2:4":
                # conv1 (one input channel) cannot take the pattern and stays dense
                values = sorted(tfopt.sparsity(plain).values())
                assert values[0] == 0 and all(abs(v - 0.5) < 0.01 for v in values[1:]), values
            print(name, "OK")
        """
    )
    assert out.split() == ["2:4", "OK", "channels", "OK", "qat", "OK"]


def test_tf_keras_models_go_through_tfmot_without_changing_tf_keras_for_the_caller():
    out = run_python(
        """
        import os
        import numpy as np
        import tensorflow as tf
        import keras
        import tf_keras
        import tfopt
        from tfopt.examples import digits_cnn

        assert "TF_USE_LEGACY_KERAS" not in os.environ
        model = digits_cnn(tf_keras)
        pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=2))
        assert os.environ.get("TF_USE_LEGACY_KERAS") is None, "tfmot's side effect leaked"
        assert tf.keras.Model is keras.Model, "tf.keras no longer means Keras 3"
        assert type(pruned).__module__.startswith("tf_keras")
        pruned.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 10, 64)
        pruned.fit(x, y, epochs=2, batch_size=16, verbose=0,
                   callbacks=[tfopt.callbacks.PruningStep()])
        plain = tfopt.strip(pruned)
        assert not any("prune" in type(la).__name__.lower() for la in plain.layers)
        sparsity = tfopt.sparsity(plain)
        assert len(sparsity) == 4, sparsity
        assert all(abs(v - 0.5) < 0.01 for v in sparsity.values()), sparsity
        try:
            tfopt.prune(pruned, tfopt.ConstantSparsity(0.5))
        except tfopt.errors.AlreadyPrunedError:
            pass
        else:
            raise AssertionError("pruning a tfmot-pruned model twice was accepted")
        # Keras 3 still works side by side, as the caller had it.
        k3 = tfopt.prune(digits_cnn(), tfopt.ConstantSparsity(0.5))
        assert isinstance(k3, keras.Model)
        print("OK")
        """
    )
    assert out.strip().endswith("OK")

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
from tfopt.examples import compile_classifier, digits_cnn  # noqa: E402

# Numerics are compared tightly: no TF32 on GPUs that have it.
tf.config.experimental.enable_tensor_float_32_execution(False)


def pytest_terminal_summary(terminalreporter):
    """The CPU beside `make test`'s time, as README quotes it."""
    from tfopt.targets._cpu_int8 import describe_cpu

    terminalreporter.write_line(describe_cpu())


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def digits():
    return tfopt.datasets.load_digits()


@pytest.fixture(scope="session")
def trained_digits_weights(digits):
    """Weights of the digits CNN trained dense (trained once per session)."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = compile_classifier(digits_cnn())
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return model.get_weights()


@pytest.fixture
def trained_digits(trained_digits_weights):
    model = compile_classifier(digits_cnn())
    model.set_weights(trained_digits_weights)
    return model


def small_data(n=64, shape=(8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    return x, y

"""Runners for Keras models, SavedModels and TensorRT engines.

A runner is built once (sessions created, functions traced) and then called
repeatedly by the timer. ONNX Runtime's runners live in ``_ort``, which needs
no TensorFlow, so that they also run on machines that have only onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from tfopt.bench._ort import Runner, cuda_available, onnx_precision, onnx_runners  # noqa: F401


def keras_runners(model: keras.Model, label: str = "keras") -> list[Runner]:
    """``model.predict`` (what users run by default) and the call under ``tf.function``."""
    single = len(model.inputs) == 1 if getattr(model, "inputs", None) else True

    def predict(arrays):
        out = model.predict(arrays[0] if single else list(arrays), verbose=0,
                            batch_size=len(arrays[0]))
        return keras.tree.flatten(out)[0]

    function = tf.function(lambda *xs: model(xs[0] if single else list(xs), training=False))

    def call(arrays):
        return keras.tree.flatten(function(*arrays))[0].numpy()

    return [Runner(f"{label} predict", "keras_predict", None, predict),
            Runner(f"{label} tf.function", "keras_function", None, call)]


def saved_model_runner(path: Path, label: str = "saved_model") -> Runner:
    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    names = list(serving.structured_input_signature[1])
    first_output = sorted(serving.structured_outputs)[0]

    def run(arrays):
        out = serving(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        return out[first_output].numpy()

    return Runner(f"{label} serving_default", "saved_model", Path(path), run)


def tensorrt_runner(path: Path, signature, label: str = "tensorrt") -> Runner:
    from tfopt.export import _tensorrt

    return Runner(f"{label} / TensorRT", "tensorrt", Path(path),
                  lambda arrays: next(iter(_tensorrt.run_engine(path, signature, arrays).values())))

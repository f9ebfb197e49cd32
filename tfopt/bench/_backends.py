"""Runners for Keras models in memory; artifacts on disk run through ``tfopt.artifacts``.

A Keras model is timed the four ways a Keras user can call it:
``model.predict`` (what users run by default), the eager call
``model(x, training=False)``, the call under ``tf.function`` (a static
graph) and under ``tf.function(jit_compile=True)`` (XLA).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfopt.artifacts._runner import Runner


def _output_names(model) -> tuple:
    names = getattr(model, "output_names", None)
    if names:
        return tuple(names)
    outputs = getattr(model, "outputs", None) or [None]
    return tuple(f"output_{i}" for i in range(len(outputs))) if len(outputs) > 1 else ("output",)


def keras_runners(model: keras.Model, label: str = "keras") -> list[Runner]:
    """``predict``, eager call, ``tf.function`` and ``tf.function(jit_compile=True)``."""
    single = len(model.inputs) == 1 if getattr(model, "inputs", None) else True
    outputs = _output_names(model)

    def args(arrays):
        return arrays[0] if single else list(arrays)

    def predict(arrays):
        out = model.predict(args(arrays), verbose=0, batch_size=len(arrays[0]))
        return keras.tree.flatten(out)

    def eager(arrays):
        return keras.tree.flatten(model(args([tf.constant(a) for a in arrays]), training=False))

    function = tf.function(lambda *xs: model(xs[0] if single else list(xs), training=False))
    xla = tf.function(lambda *xs: model(xs[0] if single else list(xs), training=False),
                      jit_compile=True)

    def call(arrays):
        return keras.tree.flatten(function(*arrays))

    def call_xla(arrays):
        return keras.tree.flatten(xla(*arrays))

    def fetch(values):
        return [np.asarray(v) for v in values]

    return [Runner(f"{label} predict", "keras_predict", None, predict, outputs=outputs, fetch=fetch),
            Runner(f"{label} eager", "keras_eager", None, eager, outputs=outputs, fetch=fetch),
            Runner(f"{label} tf.function", "keras_function", None, call, outputs=outputs,
                   fetch=fetch),
            Runner(f"{label} tf.function jit", "keras_xla", None, call_xla, outputs=outputs,
                   fetch=fetch)]

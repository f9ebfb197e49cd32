"""Small example models, shared by the README, the demo, notebooks, tests and benchmarks."""

from __future__ import annotations


def digits_cnn(keras_module=None, name: str = "digits_cnn"):
    """A small CNN for 8x8x1 digits (43k parameters), functional API.

    ``keras_module`` is ``keras`` (default) or ``tf_keras``: the same
    architecture in both, for side-by-side comparisons.
    """
    if keras_module is None:
        import keras as keras_module
    layers = keras_module.layers
    inputs = keras_module.Input((8, 8, 1), name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense1")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras_module.Model(inputs, outputs, name=name)


def compile_classifier(model, learning_rate: float = 1e-3):
    """Compile a logits classifier with Adam and sparse categorical cross-entropy."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model

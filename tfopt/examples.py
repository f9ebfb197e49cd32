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


def digits_residual_cnn(filters: int = 32, name: str = "digits_residual_cnn"):
    """A digits CNN with the patterns INT8 exports must get right (about 44k parameters
    at ``filters=32``): BatchNormalization, a residual ``Add``, a ``SeparableConv2D`` and
    ``Flatten -> Dense``, on 8x8x1 inputs."""
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    y = layers.Conv2D(filters, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.Add(name="residual")([x, y])
    x = layers.SeparableConv2D(2 * filters, 3, padding="same", activation="relu",
                               name="separable")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(2 * filters, activation="relu", name="dense1")(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name=name)


def compile_classifier(model, learning_rate: float = 1e-3):
    """Compile a logits classifier with Adam and sparse categorical cross-entropy."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model

import logging

import keras
import numpy as np
import pytest
from keras import layers

import tfopt
from tfopt import errors
from tfopt.pruning import PruneLowMagnitude

from conftest import small_data


# -- models of every kind --------------------------------------------------

def sequential():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(8, 3, activation="relu", name="conv"),
            layers.Flatten(),
            layers.Dense(16, activation="relu", name="hidden"),
            layers.Dense(10, name="out"),
        ],
        name="seq",
    )


def functional():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(inputs, layers.Dense(10, name="out")(x), name="func")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.conv = layers.Conv2D(8, 3, activation="relu", name="conv")
        self.flatten = layers.Flatten()
        self.blocks = [layers.Dense(16, activation="relu", name="hidden")]
        self.out = layers.Dense(10, name="out")

    def call(self, x, training=None):
        x = self.flatten(self.conv(x))
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


def nested():
    inner = keras.Sequential([keras.Input((144,)), layers.Dense(16, name="inner_dense")], name="inner")
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = inner(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(10, name="out")(x), name="outer")


KINDS = {"sequential": sequential, "functional": functional, "subclassed": subclassed,
         "nested": nested}


def fit(model, epochs=2, x=None, y=None, **kwargs):
    if x is None:
        x, y = small_data()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [tfopt.callbacks.PruningStep()] + kwargs.pop("callbacks", [])
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks, **kwargs)
    return model


def has_tfopt_objects(model):
    return any(
        type(layer).__module__.startswith("tfopt")
        for layer in model._flatten_layers(include_self=True, recursive=True)
    ) or any(getattr(v, "constraint", None) is not None for v in model.weights)


# -- the main path ----------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_prune_fit_strip_reaches_target_sparsity(kind):
    model = KINDS[kind]()
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1))
    fit(pruned)
    x, _ = small_data(8)
    expected = keras.ops.convert_to_numpy(pruned(x))

    plain = tfopt.strip(pruned)

    assert not has_tfopt_objects(plain)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x)), expected, rtol=1e-5, atol=1e-5)
    sparsity = tfopt.sparsity(plain)
    assert sparsity, "every prunable kernel should be reported"
    for path, value in sparsity.items():
        assert value == pytest.approx(0.5, abs=0.01), path
    # sparsity() reports the masked weights of the unstripped model identically.
    assert tfopt.sparsity(pruned) == sparsity


def test_strip_leaves_a_model_that_saves_and_loads_without_tfopt(tmp_path):
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5, frequency=1))
    plain = tfopt.strip(fit(pruned))
    path = tmp_path / "plain.keras"
    plain.save(path)
    config = keras.saving.load_model(path).get_config()
    assert "tfopt" not in str(config)


def test_weights_pruned_earlier_stay_pruned_as_sparsity_grows():
    model = functional()
    pruned = tfopt.prune(model, tfopt.PolynomialDecay(0.2, 0.6, begin_step=0, end_step=8, frequency=4))
    fit(pruned, epochs=1)  # 4 steps: masks computed at step 0 only
    wrapper = next(la for la in pruned.layers if isinstance(la, PruneLowMagnitude))
    first = keras.ops.convert_to_numpy(wrapper._masks[0].value).copy()
    fit(pruned, epochs=2)
    later = keras.ops.convert_to_numpy(wrapper._masks[0].value)
    assert np.all(later[first == 0] == 0)
    assert (later == 0).mean() == pytest.approx(0.6, abs=0.01)


def test_unpruned_weights_still_train_and_pruned_gradients_are_zero():
    import tensorflow as tf

    pruned = tfopt.prune(sequential(), tfopt.ConstantSparsity(0.5, frequency=1))
    fit(pruned, epochs=1)
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in pruned.trainable_weights}
    fit(pruned, epochs=1)
    wrapper = next(la for la in pruned.layers if isinstance(la, PruneLowMagnitude))
    (variable, _), = wrapper.masked_weights()
    mask = keras.ops.convert_to_numpy(wrapper._masks[0].value)
    assert 0 < mask.mean() < 1
    moved = keras.ops.convert_to_numpy(variable) != before[variable.path]
    assert moved[mask == 1].mean() > 0.9
    # The gradient of the loss with respect to the kernel: zero where pruned.
    x, y = small_data(16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(y, pruned(x, training=False))
    gradient = tape.gradient(value, variable.value).numpy()
    assert np.all(gradient[mask == 0] == 0)
    assert np.mean(gradient[mask == 1] != 0) > 0.9


def test_prunes_multi_head_attention_projections_and_embeddings():
    tokens = keras.Input((6,), dtype="int32")
    x = layers.Embedding(50, 16, name="embed")(tokens)
    x = layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, layers.Dense(3, name="out")(x))
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1))
    rng = np.random.default_rng(0)
    fit(pruned, epochs=1, x=rng.integers(0, 50, (32, 6)), y=rng.integers(0, 3, 32))

    sparsity = tfopt.sparsity(tfopt.strip(pruned))
    for name in ("query", "key", "value", "attention_output"):
        assert sparsity[f"mha/{name}/kernel"] == pytest.approx(0.5, abs=0.01)
    assert sparsity["embed/embeddings"] == pytest.approx(0.5, abs=0.01)


class GatedDense(layers.Layer):
    """A custom layer that opts in to pruning."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), name="w")
        self.gate = self.add_weight(shape=(4,), initializer="ones", name="gate")

    def call(self, x):
        return keras.ops.matmul(x, self.w) * self.gate

    def get_prunable_weights(self):
        return [self.w]


def test_custom_layer_opts_in_with_get_prunable_weights():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, GatedDense(name="gated")(inputs))
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.75, frequency=1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, x[:, :4], epochs=1, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    assert tfopt.sparsity(pruned) == {"gated/w": pytest.approx(0.75)}


def test_layers_selects_by_name_or_predicate():
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), layers=["hidden"])
    assert [la.layer.name for la in pruned.layers if isinstance(la, PruneLowMagnitude)] == ["hidden"]
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5),
                         layers=lambda layer: isinstance(layer, layers.Conv2D))
    assert [la.layer.name for la in pruned.layers if isinstance(la, PruneLowMagnitude)] == ["conv"]


# -- N:M structured sparsity -------------------------------------------------

def groups_along_input_channels(kernel, axis, m):
    moved = np.moveaxis(kernel, axis, -1)
    return moved.reshape(-1, m)


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_two_four_sparsity_holds_in_every_group_of_four_input_channels(kind):
    model = KINDS[kind]()
    # conv: 1 input channel cannot be grouped by 4, so prune only the Dense layers.
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), n_m=(2, 4),
                         layers=lambda layer: isinstance(layer, layers.Dense))
    fit(pruned)
    plain = tfopt.strip(pruned)
    dense_layers = [la for la in plain._flatten_layers() if isinstance(la, layers.Dense)]
    assert len(dense_layers) == 2
    for layer in dense_layers:
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        groups = groups_along_input_channels(kernel, 0, 4)
        assert np.all((groups == 0).sum(axis=1) >= 2), layer.name
        assert np.mean(kernel == 0) == pytest.approx(0.5, abs=1e-6)


def test_two_four_on_conv_groups_input_channels_not_output_channels():
    inputs = keras.Input((6, 6, 8))
    model = keras.Model(inputs, layers.Conv2D(6, 3, name="conv")(inputs))
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), n_m=(2, 4))
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 8)).astype("float32")
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, np.zeros((16, 4, 4, 6)), verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    kernel = keras.ops.convert_to_numpy(tfopt.strip(pruned).get_layer("conv").kernel)  # (3,3,8,6)
    assert np.all((groups_along_input_channels(kernel, -2, 4) == 0).sum(axis=1) == 2)


def test_n_m_strict_rejects_input_widths_not_divisible_by_m_naming_each_layer():
    with pytest.raises(errors.IncompatibleShapeError) as info:
        tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), n_m=(2, 4), strict=True)
    message = str(info.value)
    assert "conv" in message and "1 input channels" in message and "multiple of 4" in message


@pytest.mark.parametrize("n_m", [(4, 4), (5, 4), (0, 4), (2,), "2:4", (2.0, 4)])
def test_invalid_n_m(n_m):
    with pytest.raises(errors.ConfigError, match="n_m must be a pair"):
        tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), n_m=n_m)


# -- bad input ---------------------------------------------------------------

def test_not_a_model():
    with pytest.raises(errors.NotAKerasModelError, match="Expected a Keras model as `model`, got builtins.dict"):
        tfopt.prune({}, tfopt.ConstantSparsity(0.5))
    with pytest.raises(TypeError):
        tfopt.strip("model.keras")


def test_schedule_must_be_a_schedule():
    with pytest.raises(errors.ConfigError, match="schedule must be a tfopt pruning schedule, got 0.5"):
        tfopt.prune(functional(), 0.5)


def test_nothing_to_prune():
    model = keras.Sequential([keras.Input((4,)), layers.BatchNormalization(), layers.ReLU()])
    with pytest.raises(errors.NothingToPruneError, match="prunable layers found: none"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5))


def test_unknown_layer_names_list_the_prunable_ones():
    with pytest.raises(errors.ConfigError, match=r"\['nope'\].*Prunable layers: \['conv', 'hidden', 'out'\]"):
        tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), layers=["nope"])


def test_pruning_twice_is_refused():
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5))
    with pytest.raises(errors.AlreadyPrunedError, match="tfopt.strip"):
        tfopt.prune(pruned, tfopt.ConstantSparsity(0.5))


def test_unbuilt_subclassed_model_is_refused():
    with pytest.raises(errors.ModelNotBuiltError, match=r"model\(x\[:1\]\)"):
        tfopt.prune(Subclassed(), tfopt.ConstantSparsity(0.5))


def test_fit_without_pruning_step_says_to_add_it_then_works_with_it():
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5, frequency=1))
    pruned.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = small_data()
    with pytest.raises(errors.PruningStepMissingError, match=r"callbacks=\[tfopt.callbacks.PruningStep\(\)\]"):
        pruned.fit(x, y, verbose=0)
    pruned.fit(x, y, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    # A later fit() without the callback must not silently reuse the traced step.
    import tensorflow as tf

    with pytest.raises((errors.PruningStepMissingError, tf.errors.InvalidArgumentError),
                       match=r"callbacks=\[tfopt.callbacks.PruningStep\(\)\]"):
        pruned.fit(x, y, verbose=0)
    pruned.fit(x, y, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])


def test_subclassed_model_whose_call_takes_no_training_argument_is_refused():
    class NoTraining(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    model = NoTraining()
    model(np.zeros((1, 8), "float32"))
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5))
    pruned.compile(optimizer="adam", loss="mse")
    with pytest.raises(errors.ConfigError, match="def call\\(self, inputs, training=None\\)"):
        pruned.fit(np.zeros((4, 8)), np.zeros((4, 4)), verbose=0,
                   callbacks=[tfopt.callbacks.PruningStep()])


def test_pruning_step_on_an_unpruned_model_is_an_error():
    model = functional()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(errors.NothingToPruneError, match="no pruned layers"):
        model.fit(*small_data(), verbose=0, callbacks=[tfopt.callbacks.PruningStep()])


def test_skipped_layers_are_reported_once_as_one_list(caplog):
    inputs = keras.Input((8,))
    x = layers.Dense(8, name="d")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.LayerNormalization(name="ln")(x)
    model = keras.Model(inputs, layers.BatchNormalization(name="bn2")(x))
    with caplog.at_level(logging.INFO, logger="tfopt"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5))
    reports = [r for r in caplog.records if "Left unpruned" in r.getMessage()]
    assert len(reports) == 1
    assert all(name in reports[0].getMessage() for name in ("bn1", "ln", "bn2"))


# -- training setups ---------------------------------------------------------

def test_mixed_float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = functional()
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1))
    fit(pruned)
    x, _ = small_data(4)
    assert keras.ops.convert_to_numpy(pruned(x)).dtype == np.float16
    plain = tfopt.strip(pruned)
    assert plain.get_layer("hidden").kernel.dtype == "float32"
    for value in tfopt.sparsity(plain).values():
        assert value == pytest.approx(0.5, abs=0.01)


def test_save_mid_schedule_and_resume_continues_at_the_saved_step(tmp_path):
    x, y = small_data(64)  # 4 steps per epoch at batch 16
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=15, frequency=4)
    pruned = fit(tfopt.prune(functional(), schedule), epochs=2, x=x, y=y)  # 8 steps
    mid = tfopt.sparsity(pruned)
    path = tmp_path / "mid.keras"
    pruned.save(path)

    restored = keras.models.load_model(path)
    steps = [int(la.pruning_step.numpy()) for la in restored.layers if isinstance(la, PruneLowMagnitude)]
    assert steps == [8, 8, 8]
    assert tfopt.sparsity(restored) == mid
    restored.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    # Steps 8..15 run after the restore; had it restarted at 0, it would stop at 7.
    for value in tfopt.sparsity(tfopt.strip(restored)).values():
        assert value == pytest.approx(0.8, abs=0.01)


def test_sparsity_logger_writes_a_scalar_per_weight(tmp_path):
    import tensorflow as tf

    pruned = tfopt.prune(sequential(), tfopt.ConstantSparsity(0.5, frequency=1))
    fit(pruned, callbacks=[tfopt.callbacks.SparsityLogger(tmp_path)])
    tags = {}
    for event_file in tmp_path.iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    assert set(tags) == {f"sparsity/{path}" for path in tfopt.sparsity(pruned)}
    assert len(tags) == 3
    assert all(len(v) == 2 and v[-1] == pytest.approx(0.5, abs=0.01) for v in tags.values())


# -- every prunable layer type -------------------------------------------------

LAYER_CASES = {
    "conv1d": ((8, 4), lambda: layers.Conv1D(8, 3, name="target")),
    "conv1d_transpose": ((6, 4), lambda: layers.Conv1DTranspose(8, 3, name="target")),
    "conv3d_transpose": ((3, 3, 3, 4), lambda: layers.Conv3DTranspose(8, 2, name="target")),
    "depthwise_conv1d": ((8, 4), lambda: layers.DepthwiseConv1D(3, depth_multiplier=2,
                                                                 name="target")),
    "conv3d": ((4, 4, 4, 4), lambda: layers.Conv3D(8, 2, name="target")),
    "conv2d_transpose": ((4, 4, 4), lambda: layers.Conv2DTranspose(8, 3, name="target")),
    "depthwise_conv2d": ((6, 6, 4), lambda: layers.DepthwiseConv2D(3, name="target")),
    "separable_conv2d": ((6, 6, 4), lambda: layers.SeparableConv2D(8, 3, name="target")),
    "einsum_dense": ((5, 8), lambda: layers.EinsumDense("abc,cd->abd", output_shape=(5, 8),
                                                          name="target")),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_each_prunable_layer_type_reaches_its_sparsity(case):
    shape, make = LAYER_CASES[case]
    inputs = keras.Input(shape)
    target = make()
    outputs = layers.Dense(3, name="head")(layers.Flatten()(target(inputs)))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, *shape)).astype("float32")
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.75, frequency=1), layers=["target"])
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, rng.normal(size=(32, 3)), verbose=0, callbacks=[tfopt.callbacks.PruningStep()])
    sparsity = tfopt.sparsity(tfopt.strip(pruned))
    weight = {"separable_conv2d": "pointwise_kernel"}.get(case, "kernel")
    assert sparsity[f"target/{weight}"] == pytest.approx(0.75, abs=0.02)
    assert sparsity["head/kernel"] == 0.0  # not selected: left dense


@pytest.mark.parametrize("case, axis", [("conv2d_transpose", -1), ("separable_conv2d", -2),
                                        ("einsum_dense", 0)])
def test_two_four_groups_follow_each_layer_types_input_channel_axis(case, axis):
    shape, make = LAYER_CASES[case]
    inputs = keras.Input(shape)
    target = make()
    model = keras.Model(inputs, layers.Flatten()(target(inputs)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *shape)).astype("float32")
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), n_m=(2, 4))
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, rng.normal(size=(16, model.output_shape[-1])), verbose=0,
               callbacks=[tfopt.callbacks.PruningStep()])
    plain = tfopt.strip(pruned)
    weight = plain.get_layer("target")
    kernel = keras.ops.convert_to_numpy(
        weight.pointwise_kernel if case == "separable_conv2d" else weight.kernel)
    groups = groups_along_input_channels(kernel, axis, 4)
    assert np.all((groups == 0).sum(axis=1) == 2)


def test_summary_warnings_point_at_the_users_own_line():
    inputs = keras.Input((6, 6, 1))  # one input channel: the first conv cannot take 2:4
    model = keras.Model(inputs, layers.Dense(4)(layers.Flatten()(layers.Conv2D(8, 3)(inputs))))
    with pytest.warns(UserWarning, match="left dense") as caught:
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), n_m=(2, 4))
    assert [w.filename for w in caught if "left dense" in str(w.message)] == [__file__]

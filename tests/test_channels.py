"""Structured channel pruning: tfopt.prune(..., structure="channels") and tfopt.strip."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import tfopt
from tfopt import _flops, errors
from tfopt.pruning import _channels

from conftest import small_data

# These tests count channels on tiny models: no rounding of the channels kept to a
# multiple of 8 (tfopt.prune's default), so that 50% of 8 channels keeps 4.
EXACT = 1


# -- helpers -----------------------------------------------------------------------

def fit(model, x=None, y=None, epochs=2, batch_size=16, callbacks=None):
    if x is None:
        x, y = small_data(64, shape=model.input_shape[1:])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0,
              callbacks=[tfopt.callbacks.PruningStep()] if callbacks is None else callbacks)
    return model


def randomize_batchnorm(model, seed=1):
    """Give every BN non-trivial statistics, so that slicing them wrong shows."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(size=n) * 0.5,
                               rng.normal(size=n) * 0.5, rng.uniform(0.5, 1.5, n)])


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def assert_same(masked, plain, x, rtol=1e-5):
    """The stripped model computes what the masked one computed: 1e-5 of the largest output."""
    expected, got = outputs(masked, x), outputs(plain, x)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(got - expected).max() <= rtol * scale, np.abs(got - expected).max() / scale


def has_tfopt_objects(model):
    return any(type(layer).__module__.startswith("tfopt")
               for layer in model._flatten_layers(include_self=True, recursive=True))


def prune_fit_strip(model, sparsity=0.5, x=None, y=None, **kwargs):
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(sparsity, frequency=1),
                         structure="channels", channel_multiple=EXACT, **kwargs)
    fit(pruned, x, y)
    return pruned, tfopt.strip(pruned)


def width(model, name):
    layer = model.get_layer(name) if name in [la.name for la in model.layers] else next(
        la for la in model._flatten_layers() if la.name == name)
    return getattr(layer, "filters", None) or getattr(layer, "units", None)


# -- models ---------------------------------------------------------------------

def sequential():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same", name="conv1"),
        layers.BatchNormalization(name="bn1"),
        layers.ReLU(),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(16, activation="relu", name="hidden"),
        layers.Dense(10, name="out"),
    ], name="seq")


def functional():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(inputs, layers.Dense(10, name="out")(x), name="func")


def nested():
    block = keras.Sequential([
        keras.Input((8, 8, 8)),
        layers.Conv2D(8, 3, padding="same", name="conv2"),
        layers.BatchNormalization(name="bn2"),
        layers.ReLU(),
    ], name="block")
    head_in = keras.Input((8,))
    head = keras.Model(head_in, layers.Dense(16, activation="relu", name="hidden")(head_in),
                       name="head")
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = block(x)
    x = head(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(10, name="out")(x), name="outer")


KINDS = {"sequential": sequential, "functional": functional, "nested": nested}


# -- the main path ----------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_fit_then_strip_gives_a_smaller_plain_model_that_computes_the_same(kind):
    model = KINDS[kind]()
    randomize_batchnorm(model)
    x, y = small_data(64)
    dense_params = model.count_params()
    pruned, plain = prune_fit_strip(model, x=x, y=y)

    assert not has_tfopt_objects(plain)
    assert_same(pruned, plain, x[:16])
    # The masked model differs from the model it was pruned from (same layer objects,
    # unmasked): pruning did something.
    assert np.abs(outputs(pruned, x[:16]) - outputs(model, x[:16])).max() > 1e-3
    for name in ("conv1", "conv2", "hidden"):
        assert width(plain, name) == width(model, name) // 2, name
    assert width(plain, "out") == 10  # the classifier keeps its outputs
    assert plain.count_params() < 0.45 * dense_params
    assert plain.input_shape == model.input_shape


def test_the_schedule_rises_and_removed_channels_stay_removed():
    model = functional()
    schedule = tfopt.PolynomialDecay(0.25, 0.75, begin_step=0, end_step=8, frequency=4)
    pruned = tfopt.prune(model, schedule, structure="channels", channel_multiple=EXACT)
    x, y = small_data(64)
    fit(pruned, x, y, epochs=1)  # steps 0-3: masks set at step 0 only
    group = next(g for w in _channels.channel_wrappers(pruned) for g in w._owned
                 if g.name == "conv1")
    first = group.keep().copy()
    assert (~first).sum() == 2  # 25% of 8
    fit(pruned, x, y, epochs=2)  # steps 4-11: masks at 4 and 8 (end_step)
    later = group.keep()
    assert not np.any(later[~first]), "a removed channel came back"
    assert (~later).sum() == 6  # 75% of 8
    steps = {int(w.pruning_step.numpy()) for w in _channels.channel_wrappers(pruned)}
    assert steps == {12}


def test_bn_after_a_pruned_conv_is_masked_to_zero_and_sliced_with_its_statistics():
    model = functional()
    randomize_batchnorm(model)
    pruned, plain = prune_fit_strip(model)
    bn_wrapper = next(w for w in _channels.channel_wrappers(pruned) if w.layer.name == "bn1")
    (group,) = [g for w in _channels.channel_wrappers(pruned) for g in w._owned
                if g.name == "conv1"]
    keep = group.keep()
    probe = keras.Model(pruned.input, pruned.get_layer(bn_wrapper.name).output)
    after_bn = outputs(probe, small_data(8)[0])
    assert np.all(after_bn[..., ~keep] == 0), "BN must output 0, not beta, for a removed channel"
    assert np.abs(after_bn[..., keep]).max() > 0
    original = model.get_layer("bn1")
    stripped = plain.get_layer("bn1")
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(getattr(stripped, name)),
                                      keras.ops.convert_to_numpy(getattr(original, name))[keep])


def test_bn_scale_importance_keeps_the_channels_with_the_largest_gamma():
    model = functional()
    conv = model.get_layer("conv1")
    bn = model.get_layer("bn1")
    kernel = np.ones(conv.kernel.shape, "float32")
    kernel[..., :4] = 0.01  # small filters ...
    conv.kernel.assign(kernel)
    gamma = np.full(8, 0.1, "float32")
    gamma[:4] = 2.0  # ... with large BN scales
    bn.gamma.assign(gamma)
    kept = {}
    for importance in ("l2", "bn_scale"):
        pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT,
                             importance=importance)
        _channels.update_masks(pruned, 0.5)
        group = next(g for w in _channels.channel_wrappers(pruned) for g in w._owned
                     if g.name == "conv1")
        kept[importance] = np.flatnonzero(group.keep()).tolist()
    assert kept == {"l2": [4, 5, 6, 7], "bn_scale": [0, 1, 2, 3]}


# -- couplings ---------------------------------------------------------------------

def groups_of(pruned):
    return {g.name: g for w in _channels.channel_wrappers(pruned) for g in w._owned}


@pytest.mark.parametrize("merge", [layers.Add, layers.Multiply, layers.Maximum])
def test_both_sides_of_a_residual_merge_are_one_group(merge):
    inputs = keras.Input((8, 8, 1))
    a = layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(8, 3, padding="same", name="b")(a)
    b = layers.BatchNormalization(name="bn_b")(b)
    x = merge()([a, b])
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="c")(x)
    model = keras.Model(inputs, layers.Dense(10, name="out")(layers.Flatten()(x)))
    randomize_batchnorm(model)
    pruned, plain = prune_fit_strip(model)

    assert set(groups_of(pruned)) == {"a", "c"}  # b shares a's mask: one group
    assert width(plain, "a") == width(plain, "b") == 4
    a_kernel = keras.ops.convert_to_numpy(pruned.get_layer("pruned_a").masked_weights()[0][1])
    b_kernel = keras.ops.convert_to_numpy(pruned.get_layer("pruned_b").masked_weights()[0][1])
    removed_a = np.all(a_kernel == 0, axis=(0, 1, 2))
    removed_b = np.all(b_kernel == 0, axis=(0, 1, 2))
    np.testing.assert_array_equal(removed_a, removed_b)
    assert removed_a.sum() == 4
    assert_same(pruned, plain, small_data(16)[0])


def test_concatenated_branches_keep_their_own_groups_and_the_consumer_is_sliced():
    inputs = keras.Input((8, 8, 1))
    a = layers.Conv2D(6, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(inputs)
    x = layers.Concatenate()([a, b])
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="c")(x)
    x = layers.Concatenate()([x, b])  # b twice: its channels line up in both places
    x = layers.Conv2D(4, 1, name="d")(x)
    model = keras.Model(inputs, layers.Dense(10, name="out")(layers.GlobalAveragePooling2D()(x)))
    pruned, plain = prune_fit_strip(model)

    assert {"a", "b", "c", "d"} <= set(groups_of(pruned))
    assert (width(plain, "a"), width(plain, "b"), width(plain, "c")) == (3, 2, 4)
    assert tuple(plain.get_layer("c").kernel.shape) == (3, 3, 5, 4)
    assert tuple(plain.get_layer("d").kernel.shape) == (1, 1, 6, 2)
    assert_same(pruned, plain, small_data(16)[0])


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_and_separable_convolutions_follow_the_layer_that_feeds_them(multiplier):
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=multiplier, name="dw")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=multiplier,
                               activation="relu", name="sep")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(10, name="out")(x))
    randomize_batchnorm(model)
    pruned, plain = prune_fit_strip(model)

    assert tuple(plain.get_layer("dw").kernel.shape) == (3, 3, 4, multiplier)
    assert tuple(plain.get_layer("bn").gamma.shape) == (4 * multiplier,)
    assert tuple(plain.get_layer("sep").depthwise_kernel.shape) == (3, 3, 4 * multiplier,
                                                                    multiplier)
    assert tuple(plain.get_layer("sep").pointwise_kernel.shape) == (
        1, 1, 4 * multiplier * multiplier, 4)
    assert_same(pruned, plain, small_data(16)[0])


def test_dense_after_flatten_and_after_global_pooling_take_the_matching_rows():
    inputs = keras.Input((6, 6, 1))
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)  # 4x4x8
    flat = layers.Dense(12, activation="relu", name="after_flatten")(layers.Flatten()(x))
    pooled = layers.Dense(12, activation="relu", name="after_gap")(
        layers.GlobalMaxPooling2D()(x))
    x = layers.Concatenate()([flat, pooled])
    model = keras.Model(inputs, layers.Dense(10, name="out")(x))
    x_data, y_data = small_data(64, shape=(6, 6, 1))
    pruned, plain = prune_fit_strip(model, x=x_data, y=y_data)

    assert tuple(plain.get_layer("after_flatten").kernel.shape) == (16 * 4, 6)
    assert tuple(plain.get_layer("after_gap").kernel.shape) == (4, 6)
    assert tuple(plain.get_layer("out").kernel.shape) == (12, 10)
    assert_same(pruned, plain, x_data[:16])


def test_squeeze_and_excite_branch_is_pruned_with_the_channels_it_scales():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Activation("swish")(x)
    se = layers.GlobalAveragePooling2D(keepdims=True)(x)
    se = layers.Conv2D(4, 1, activation="relu", name="squeeze")(se)
    se = layers.Conv2D(8, 1, activation="sigmoid", name="excite")(se)  # sigmoid(0) = 0.5
    x = layers.Multiply()([x, se])
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="next")(x)
    x = layers.GlobalAveragePooling2D()(x)
    se2 = layers.Reshape((1, 1, 8))(x)  # EfficientNet's form: Reshape, not keepdims
    se2 = layers.Conv2D(8, 1, activation="sigmoid", name="excite2")(se2)
    x = layers.Multiply()([layers.Reshape((1, 1, 8))(x), se2])
    model = keras.Model(inputs, layers.Dense(10, name="out")(layers.Flatten()(x)))
    randomize_batchnorm(model)
    pruned, plain = prune_fit_strip(model)

    assert {"conv", "squeeze", "next"} <= set(groups_of(pruned))
    assert "excite" not in groups_of(pruned)  # joined with conv's group by the Multiply
    assert width(plain, "excite") == width(plain, "conv") == 4
    assert width(plain, "squeeze") == 2
    assert width(plain, "excite2") == width(plain, "next") == 4
    assert_same(pruned, plain, small_data(16)[0])


def test_operation_nodes_that_act_elementwise_are_followed():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.ops.relu6(x + 3.0) * (1.0 / 6.0) * x  # MobileNetV3's hard swish, as ops
    x = layers.Conv2D(8, 3, padding="same", name="next")(x)
    pooled = keras.ops.mean(x, axis=[1, 2])
    model = keras.Model(inputs, layers.Dense(10, name="out")(pooled))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing here is unfollowable
        pruned, plain = prune_fit_strip(model)
    assert width(plain, "conv") == width(plain, "next") == 4
    assert_same(pruned, plain, small_data(16)[0])


def test_inputs_and_outputs_are_never_pruned():
    inputs = keras.Input((8, 8, 4))
    a = layers.Conv2D(4, 3, padding="same", name="to_input")(inputs)
    x = layers.Add()([inputs, a])  # joined with the model's input: kept whole
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="mid")(x)
    out = layers.Conv2D(3, 1, name="head")(x)  # a model output: kept whole
    model = keras.Model(inputs, out)
    x_data = np.random.default_rng(0).normal(size=(32, 8, 8, 4)).astype("float32")
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), structure="channels", channel_multiple=EXACT)
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x_data, np.zeros((32, 8, 8, 3)), verbose=0,
               callbacks=[tfopt.callbacks.PruningStep()])
    plain = tfopt.strip(pruned)
    assert (width(plain, "to_input"), width(plain, "mid"), width(plain, "head")) == (4, 4, 3)
    assert_same(pruned, plain, x_data[:8])


# -- what cannot be followed ---------------------------------------------------------

def with_layer_norm():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="before_ln")(inputs)
    x = layers.LayerNormalization(name="ln")(x)  # normalizes across channels
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="prunable")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, name="out")(x), name="with_ln")


def snapshot(model):
    return (model.to_json(), [keras.ops.convert_to_numpy(w.value).copy() for w in model.weights],
            [type(la).__name__ for la in model.layers])


def test_an_unfollowable_coupling_warns_once_and_leaves_those_layers_unpruned():
    model = with_layer_norm()
    with pytest.warns(UserWarning) as record:
        pruned, plain = prune_fit_strip(model)
    messages = [str(w.message) for w in record if "structure='channels'" in str(w.message)]
    assert len(messages) == 1
    assert "before_ln" in messages[0] and "LayerNormalization 'ln'" in messages[0]
    assert "strict=True" in messages[0]
    assert width(plain, "before_ln") == 8
    assert width(plain, "prunable") == 4
    assert_same(pruned, plain, small_data(16)[0])


def test_strict_raises_naming_the_coupling_and_leaves_the_model_as_it_was():
    model = with_layer_norm()
    before = snapshot(model)
    with pytest.raises(errors.UnsupportedLayerError,
                       match=r"(?s)before_ln .*LayerNormalization 'ln'.*strict=False"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT, strict=True)
    after = snapshot(model)
    assert before[0] == after[0] and before[2] == after[2]
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)
    assert not has_tfopt_objects(model)
    with pytest.warns(UserWarning, match="before_ln"):  # and prunes again, warning
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)


def test_unknown_operations_on_channels_are_unfollowable():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.ops.flip(x, axis=-1)  # reorders channels
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="next")(x)
    model = keras.Model(inputs, layers.Dense(10, name="out")(layers.Flatten()(x)))
    with pytest.raises(errors.UnsupportedLayerError, match=r"conv .*Flip"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT, strict=True)


def test_a_failure_while_rewriting_leaves_the_model_unchanged(monkeypatch):
    model = functional()
    before = snapshot(model)

    def broken_build(self, input_shape=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(_channels.PruneChannels, "build", broken_build)
    with pytest.raises(RuntimeError, match="boom"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)
    after = snapshot(model)
    assert before[0] == after[0] and before[2] == after[2]
    assert not has_tfopt_objects(model)


def test_a_subclassed_model_gets_an_error_that_says_what_to_do():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv = layers.Conv2D(8, 3)
            self.out = layers.Dense(10)

        def call(self, x, training=None):
            return self.out(keras.ops.mean(self.conv(x), axis=[1, 2]))

    net = Net()
    net(np.zeros((1, 8, 8, 1), "float32"))
    with pytest.raises(errors.UnsupportedModelError,
                       match=r"subclassed model \(Net\).*functional API.*keras.Sequential"):
        tfopt.prune(net, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)


@pytest.mark.parametrize("kwargs, match", [
    ({"structure": "filters"}, "structure must be None"),
    ({"structure": "channels", "n_m": (2, 4)}, "two different patterns"),
    ({"structure": "channels", "importance": "taylor"}, "importance must be one of"),
    ({"importance": "bn_scale"}, "applies to structure='channels' only"),
    ({"structure": "channels", "layers": ["nope"]}, r"\['nope'\].*Prunable layers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(errors.ConfigError, match=match):
        tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), **kwargs)


def test_layers_picks_whose_output_channels_are_removed():
    pruned, plain = prune_fit_strip(functional(), layers=["conv2"])
    assert (width(plain, "conv1"), width(plain, "conv2"), width(plain, "hidden")) == (8, 4, 16)


def test_nothing_to_prune_when_every_channel_is_an_output():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layers.Dense(4, name="only")(inputs))
    with pytest.raises(errors.NothingToPruneError, match="by channels"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)


def test_fit_without_pruning_step_says_to_add_it():
    pruned = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)
    with pytest.raises(errors.PruningStepMissingError, match="PruningStep"):
        fit(pruned, callbacks=[])


def test_whole_save_before_strip_says_what_to_do_and_weights_round_trip(tmp_path):
    pruned, _ = prune_fit_strip(functional())
    with pytest.raises(errors.ConfigError, match="save_weights_only=True"):
        pruned.save(tmp_path / "p.keras")
    pruned.save_weights(tmp_path / "p.weights.h5")
    fresh = tfopt.prune(functional(), tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)
    fresh.load_weights(tmp_path / "p.weights.h5")
    x = small_data(8)[0]
    np.testing.assert_allclose(outputs(fresh, x), outputs(pruned, x), rtol=1e-6, atol=1e-6)
    assert width(tfopt.strip(fresh), "conv1") == 4


# -- real architectures and the rest of the pipeline -------------------------------------

@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_keras_applications_prune_and_strip_to_the_same_outputs(name):
    kwargs = {"alpha": 0.35} if name == "MobileNetV2" else {}
    model = getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None,
                                               classes=10, classifier_activation=None, **kwargs)
    randomize_batchnorm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every coupling in these is followed
        pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=EXACT)
    _channels.update_masks(pruned, 0.5)
    plain = tfopt.strip(pruned)
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 32, 32, 3)).astype("float32")
    assert_same(pruned, plain, x)
    before, after = _flops.count(model), _flops.count(plain)
    assert after.params < 0.35 * before.params
    assert after.flops < 0.35 * before.flops
    assert not has_tfopt_objects(plain)


def test_mobilenetv2_trains_a_step_with_channel_masks():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10, classifier_activation=None)
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, frequency=1), structure="channels", channel_multiple=EXACT)
    x, y = small_data(4, shape=(32, 32, 3))
    fit(pruned, x, y, epochs=1, batch_size=4)
    plain = tfopt.strip(pruned)
    assert width(plain, "block_1_expand") == width(model, "block_1_expand") // 2
    assert_same(pruned, plain, x)


def test_channels_strip_quantize_export_onnx(tmp_path):
    import onnx

    from tfopt.examples import compile_classifier, digits_cnn

    x, y = small_data(128)
    pruned = tfopt.prune(digits_cnn(), tfopt.ConstantSparsity(0.5, frequency=1),
                         structure="channels", channel_multiple=EXACT)
    fit(pruned, x, y, epochs=1)
    plain = tfopt.strip(pruned)
    qat = tfopt.quantize(plain, "int8", calibration_data=x[:32])
    compile_classifier(qat).fit(x, y, epochs=1, verbose=0)
    result = tfopt.export(qat, tmp_path / "out", formats=("onnx",), validation_data=x[:16])
    proto = onnx.load(str(result.paths["onnx"]))
    conv_out = sorted(i.dims[0] for i in proto.graph.initializer if len(i.dims) == 4)
    assert conv_out == [16, 16], conv_out  # conv1 and conv2: 16 of 32 filters each


def test_params_and_flops_before_and_after(tmp_path, capsys):
    from tfopt import _inspect
    from tfopt.examples import digits_cnn

    model = digits_cnn()
    pruned, plain = prune_fit_strip(model)
    before, after = _flops.count(model), _flops.count(plain)
    # 8x8 outputs x 3x3 kernels x in x out; dense1 reads the 4x4 pooled map (4x4x32 -> 4x4x16)
    assert before.flops == 2 * (64 * 9 * 32 + 64 * 9 * 32 * 32 + 512 * 64 + 64 * 10)
    assert after.flops == 2 * (64 * 9 * 16 + 64 * 9 * 16 * 16 + 256 * 32 + 32 * 10)
    assert after.params == plain.count_params() < before.params
    # pruning state (masks, steps) is not counted as parameters
    assert _flops.count(pruned).params == before.params
    model.save(tmp_path / "dense.keras")
    plain.save(tmp_path / "small.keras")
    text = _inspect.summary(tmp_path / "small.keras", tmp_path / "dense.keras")
    assert f"{before.params:,}" in text and f"{after.params:,}" in text
    assert f"{after.params / before.params:.3f}" in text
    assert _flops.human(after.flops) in text and _flops.human(before.flops) in text
    from tfopt.cli import main

    assert main(["inspect", str(tmp_path / "small.keras"), "--baseline",
                 str(tmp_path / "dense.keras")]) == 0
    assert f"{after.params / before.params:.3f}" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "small.keras"), "--baseline",
                 str(tmp_path / "nope.keras")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_recipe_takes_structure_channels(tmp_path):
    from tfopt import _pipeline, _recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {source: digits_cnn}\ndata: {source: digits}\n"
                    "prune: {structure: channels, final_sparsity: 0.5, importance: bn_scale}\n")
    assert _recipe.load(path).spec["prune"]["structure"] == "channels"
    path.write_text("name: r\nmodel: {source: digits_cnn}\ndata: {source: digits}\n"
                    "prune: {structure: channels, n_m: [2, 4]}\n")
    with pytest.raises(_recipe.RecipeError, match="two different patterns"):
        _recipe.load(path)
    path.write_text("name: r\nmodel: {source: digits_cnn}\ndata: {source: digits}\n"
                    "prune: {structure: rows}\n")
    with pytest.raises(_recipe.RecipeError, match=r"'prune.structure' must be one of"):
        _recipe.load(path)

    from tfopt.examples import digits_cnn

    model = digits_cnn()
    x, y = small_data(64)
    data = _pipeline._Data(((x, y), (x, y)), "synthetic")
    small = _pipeline._prune(model, {"structure": "channels", "final_sparsity": 0.5,
                                     "epochs": 1}, data, lambda _: None, 0)
    assert _pipeline._channel_counts(model, small) == {
        "conv1": [32, 16], "conv2": [32, 16], "dense1": [64, 32]}


def test_mixed_float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = functional()
    pruned, plain = prune_fit_strip(model)
    x = small_data(8)[0]
    assert outputs(pruned, x).dtype == np.float16
    assert plain.get_layer("conv1").kernel.dtype == "float32"
    assert width(plain, "conv1") == 4
    assert_same(pruned, plain, x, rtol=1e-3)


def test_channels_kept_are_rounded_up_to_the_multiple():
    importance = np.arange(20, dtype="float32")
    assert int(_channels.channel_mask(importance, 0.5).numpy().sum()) == 10
    assert int(_channels.channel_mask(importance, 0.5, 8).numpy().sum()) == 16
    assert int(_channels.channel_mask(importance, 0.9, 8).numpy().sum()) == 8
    assert int(_channels.channel_mask(importance[:6], 0.5, 8).numpy().sum()) == 6  # all
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(20, 3, name="a"),
                              layers.Conv2D(4, 3, name="b")])
    pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels")
    _channels.update_masks(pruned, 0.5)
    assert tfopt.strip(pruned).get_layer("a").filters == 16
    with pytest.raises(errors.ConfigError, match="channel_multiple"):
        tfopt.prune(model, tfopt.ConstantSparsity(0.5), structure="channels", channel_multiple=0)

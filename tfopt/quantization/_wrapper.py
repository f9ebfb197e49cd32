"""Keras 3 layer wrappers that fake-quantize inputs and weights during training."""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import tensorflow as tf

from tfopt._prunable import prunable_weights
from tfopt._substitute import call_with_weights
from tfopt._tree import QUANTIZATION
from tfopt.quantization._config import QuantizationConfig
from tfopt.quantization._ops import fake_quant_activation, fake_quant_weight, weight_amax
from tfopt.quantization._registry import SEPARABLE, table_axes, weight_axes


class _ActivationQuantizer(keras.layers.Wrapper):
    """Shared parts: activation ranges tracked by moving average, a step counter."""

    _tfopt_role = QUANTIZATION

    def __init__(self, layer, config: QuantizationConfig, **kwargs):
        kwargs.setdefault("name", f"quant_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        kwargs["autocast"] = False
        super().__init__(layer, **kwargs)
        self.config = config
        self.calibrating = False  # set by tfopt.quantize while it runs calibration data

    def _add_range(self, name: str) -> keras.Variable:
        # Replicas see different batches: average their ranges.
        return self.add_weight(name=name, shape=(), dtype="float32", initializer="zeros",
                               trainable=False, aggregation="mean")

    def _add_step(self) -> None:
        self.qat_step = self.add_weight(name="qat_step", shape=(), dtype="int64",
                                        initializer="zeros", trainable=False,
                                        aggregation="only_first_replica")

    def _quantize_input(self, x, amax_variable: keras.Variable, training):
        if training:
            batch_amax = tf.stop_gradient(tf.reduce_max(tf.abs(tf.cast(x, tf.float32))))
            old = amax_variable.value
            decay = self.config.activation_ema_decay
            new = tf.where(old > 0, decay * old + (1.0 - decay) * batch_amax, batch_amax)
            freeze = self.config.freeze_activation_ranges_after
            if freeze is not None:
                new = tf.where(self.qat_step.value < freeze, new, old)
            amax_variable.assign(new)
            amax = new
        elif self.calibrating:
            batch_amax = tf.reduce_max(tf.abs(tf.cast(x, tf.float32)))
            amax = tf.maximum(amax_variable.value, batch_amax)
            amax_variable.assign(amax)
        else:
            amax = amax_variable.value
        return fake_quant_activation(x, amax, self.config.activation_bits)

    def activation_ranges(self) -> dict[str, float]:
        """The tracked absolute maxima, by variable path."""
        return {v.path: float(v.numpy()) for v in self.non_trainable_variables
                if v.name.endswith("amax")}

    def get_config(self):
        config = super().get_config()
        config["config"] = self.config.get_config()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["config"] = QuantizationConfig.from_config(config["config"])
        return super().from_config(config, custom_objects=custom_objects)


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeWrapper(_ActivationQuantizer):
    """Fake-quantizes a layer's input (per tensor) and weights (per channel).

    Inserted by :func:`tfopt.quantize`; exported as ONNX ``QuantizeLinear``/
    ``DequantizeLinear`` pairs in front of the layer's input and weights.
    With ``config.preserve_sparsity``, weights that were exactly zero when the
    model was quantized stay zero.
    """

    def _axes(self) -> dict:
        """``{weight attribute: channel axis}`` of the weights this wrapper quantizes."""
        return weight_axes(self.layer)

    def _max_level(self):
        return self.config.weight_max_level

    def build(self, input_shape=None):
        super().build(input_shape)
        axes = self._axes()
        self._weights_axes = [(getattr(self.layer, name), axis) for name, axis in axes.items()]
        self._masks = []
        if self.config.preserve_sparsity:
            self._masks = [
                self.add_weight(name=f"{v.name}_nonzero", shape=v.shape, dtype=v.dtype,
                                initializer="ones", trainable=False,
                                aggregation="only_first_replica")
                for v, _ in self._weights_axes
            ]
        # (masked weight, range) per weight while constant_weights() is active, else None
        self._constant_weights = None
        self._build_ranges()
        self._add_step()
        self.built = True

    def _build_ranges(self) -> None:
        self.input_amax = self._add_range("input_amax")
        if isinstance(self.layer, SEPARABLE):
            self.pointwise_input_amax = self._add_range("pointwise_input_amax")

    def record_sparsity(self) -> None:
        """Remember which weights are zero now, so QAT keeps them zero."""
        for (variable, _), mask in zip(self._weights_axes, self._masks):
            mask.assign(tf.cast(tf.not_equal(variable.value, 0), mask.dtype))

    def masked_weights(self) -> list[tuple[keras.Variable, tf.Tensor]]:
        """``(variable, value QAT computes with)`` for the layer's prunable weights.

        Zeros recorded by :meth:`record_sparsity` count as zeros; this is what
        :func:`tfopt.sparsity` reports for a QAT model.
        """
        index = {id(v): i for i, (v, _) in enumerate(self._weights_axes)}
        result = []
        for target in prunable_weights(self.layer):
            i = index.get(id(target.variable))
            value = tf.convert_to_tensor(target.variable.value) if i is None else self._masked(i)
            result.append((target.variable, value))
        return result

    def quantized_weights(self) -> list[tuple[keras.Variable, tf.Tensor]]:
        """``(variable, fake-quantized value)`` for each quantized weight."""
        constants = self._constant_weights
        result = []
        for i, (variable, axis) in enumerate(self._weights_axes):
            if constants is not None:
                value, amax = constants[i]
            else:
                value, amax = self._masked(i), None
            result.append((variable, fake_quant_weight(
                value, axis, self.config.weight_bits, self.config.narrow_range_weights, amax,
                max_level=self._max_level())))
        return result

    def _masked(self, i: int) -> tf.Tensor:
        value = tf.convert_to_tensor(self._weights_axes[i][0].value)
        return value * self._masks[i].value if self._masks else value

    def call(self, inputs, training=None, **kwargs):
        x = self._quantize_input(inputs, self.input_amax, training)
        if training:
            self.qat_step.assign_add(1)
        if isinstance(self.layer, SEPARABLE):
            return self._separable(x, training)
        return call_with_weights(self, self.layer, self.quantized_weights(), x, **kwargs)

    def _separable(self, x, training):
        """A SeparableConv's depthwise and pointwise convolutions, with the tensor between
        them fake-quantized.

        Keras computes both in one op, so the layer's own call leaves that tensor
        in float: the depthwise convolution could not write int8, nor the pointwise
        one read it, and an engine ran both in float (Xception: 7 of 75 integer
        kernels on ONNX Runtime). Without the fake quantization this computes
        what the layer's ``ops.separable_conv`` does.
        """
        layer = self.layer
        dtype = layer.compute_dtype
        weights = {id(v): keras.ops.cast(q, dtype) for v, q in self.quantized_weights()}
        y = keras.ops.depthwise_conv(
            keras.ops.cast(x, dtype), weights[id(layer.depthwise_kernel)], strides=layer.strides,
            padding=layer.padding, data_format=layer.data_format,
            dilation_rate=layer.dilation_rate)
        y = self._quantize_input(y, self.pointwise_input_amax, training)
        y = keras.ops.conv(y, weights[id(layer.pointwise_kernel)], strides=1, padding="valid",
                           data_format=layer.data_format)
        if layer.use_bias:
            shape = ((1,) * (layer.rank + 1) + (layer.filters,)
                     if layer.data_format == "channels_last"
                     else (1, layer.filters) + (1,) * layer.rank)
            y = keras.ops.add(y, keras.ops.reshape(keras.ops.cast(layer.bias, dtype), shape))
        return layer.activation(y) if layer.activation is not None else y


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeTable(QuantizeWrapper):
    """Fake-quantizes a lookup table (an embedding) per row; its input (ids) is left alone.

    Symmetric int8 with one scale per row, on the full [-127, 127] grid: the
    rows looked up are dequantized before any integer kernel reads them, so
    the CPU pair-sum limit that keeps weights on [-64, 64] does not apply.
    Exported as an int8 table that the engine reads through its lookup
    (``Gather``) and scales row by row.
    """

    def _axes(self) -> dict:
        return table_axes(self.layer)

    def __getattr__(self, name):
        # Another layer may read the table it shares (a tied output projection reads
        # ``embedding.embeddings``): it finds the wrapped layer's attribute, float.
        layer = self.__dict__.get("layer")
        if layer is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(layer, name)

    def _max_level(self):
        return 2 ** (self.config.weight_bits - 1) - 1

    def _build_ranges(self) -> None:
        pass  # ids are not quantized

    def call(self, inputs, *args, training=None, **kwargs):
        if training:
            self.qat_step.assign_add(1)
        if kwargs.get("reverse"):
            # keras-hub's ReversibleEmbedding as a tied output projection: a matrix
            # product of activations with the table, which stays float (a lookup reads
            # the int8 rows; a product would need another grid).
            return self.layer(inputs, *args, **kwargs)
        return call_with_weights(self, self.layer, self.quantized_weights(), inputs,
                                 *args, **kwargs)


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeInputs(_ActivationQuantizer):
    """Fake-quantizes every input of a multi-input layer (residual ``Add``, ``Dot``)."""

    def build(self, input_shape=None):
        super().build(input_shape)
        several = isinstance(input_shape, (list, tuple)) and bool(input_shape) and \
            isinstance(input_shape[0], (list, tuple))
        count = len(input_shape) if several else 1
        self._ranges = [self._add_range(f"input_{i}_amax") for i in range(count)]
        self._add_step()
        self.built = True

    def call(self, inputs, training=None, **kwargs):
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        quantized = [self._quantize_input(x, amax, training)
                     for x, amax in zip(items, self._ranges)]
        if training:
            self.qat_step.assign_add(1)
        return self.layer(quantized[0] if single else quantized, **kwargs)


@contextlib.contextmanager
def constant_weights(wrappers) -> Iterator[None]:
    """Inside, each :class:`QuantizeWrapper` computes with its weights as constants:
    masked and with their ranges computed once, here, instead of in its graph.

    For export. A serving graph traced inside holds each quantized weight once,
    already masked, with its per-channel range beside it, and nothing for
    grappler (inside tf2onnx and the SavedModel's constant folding) to fold:
    folding ``max(abs(w * mask))`` made it hold several full-size copies of
    every weight at once. The values are those the wrapper computes anyway.
    """
    wrappers = [w for w in wrappers if isinstance(w, QuantizeWrapper)]
    try:
        for wrapper in wrappers:
            constants = []
            for i, (_, axis) in enumerate(wrapper._weights_axes):
                value = wrapper._masked(i)
                constants.append((value, weight_amax(value, axis)))
            wrapper._constant_weights = constants
        yield
    finally:
        for wrapper in wrappers:
            wrapper._constant_weights = None

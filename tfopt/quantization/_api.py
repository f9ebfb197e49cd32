"""`quantize`: quantization-aware training for Keras 3 models."""

from __future__ import annotations

import collections
import logging
import warnings
from typing import Union

from tfopt import _compat, _tree
from tfopt.errors import (
    AlreadyQuantizedError,
    ConfigError,
    NothingToQuantizeError,
    UnsupportedLayerError,
)
from tfopt.quantization import _registry, _tfmot
from tfopt.quantization._config import QuantizationConfig, resolve
from tfopt.quantization._wrapper import (QuantizeInputs, QuantizeTable, QuantizeWrapper,
                                         _ActivationQuantizer)

logger = logging.getLogger(__name__)


def quantize(model, config: Union[str, QuantizationConfig] = "int8", *, strict: bool = False,
             calibration_data=None, layers: _tree.LayerSelection = None):
    """Return a model that trains with int8 fake quantization (QAT).

    Q/DQ go where TensorRT's explicit quantization wants them: on the input
    and weights of every Conv (depthwise and separable included), Dense and
    EinsumDense layer (so the projections and feed-forward layers of
    transformers: MultiHeadAttention, keras-hub encoder and decoder blocks),
    and on both inputs of residual ``Add`` (and ``Dot``) layers. Embedding
    tables (``Embedding``, keras-hub's token and position embeddings) become
    int8 with one scale per row (``QuantizationConfig(quantize_embeddings=
    False)`` keeps them float). Normalizations (LayerNormalization, RMS norms)
    and the attention score and context products stay in float; they are
    listed in one warning. Weights
    are quantized symmetrically per output channel in [-64, 64] (the grid
    every x86 CPU computes exactly; ``QuantizationConfig(portable_weights=
    False)`` for [-127, 127]); activations per tensor with ranges tracked by
    a moving average during training. The rules are TensorRT's
    (``tfopt.targets._tensorrt``); the ONNX Runtime export re-places the
    same integers for the CPU. BatchNormalization stays in float: with
    per-channel weight scales, the engine folds it into the convolution
    exactly. Weights that are zero (a pruned and stripped model) stay zero.

    Fine-tune the result with an ordinary ``fit()`` (no callback needed),
    then export it: ``tfopt.export(qat, "out", formats=("onnx",))`` writes
    int8 Q/DQ that TensorRT and ONNX Runtime run as INT8.

    ``tf_keras`` models are handed to tfmot's ``quantize_model``; those export
    to ONNX with uint8 asymmetric, activation-only Q/DQ, which ONNX Runtime
    runs but TensorRT rejects.

    Args:
        model: A built Keras 3 (or tf_keras) model, pruned ones stripped first.
        config: ``"int8"`` or a :class:`tfopt.QuantizationConfig`.
        strict: Raise on layers with weights that tfopt cannot quantize
            (instead of leaving them in float and listing them in the
            warning). Layers kept in float by design (normalizations, and
            embeddings with ``quantize_embeddings=False``) never raise.
        calibration_data: Inputs (an array, a dict of arrays, or a
            ``tf.data.Dataset`` of inputs or ``(inputs, labels)``) whose
            activation ranges initialize the quantizers, so the model is
            accurate before fine-tuning. Without it, ranges start from the
            first training batch, and the model is not usable before ``fit()``.
        layers: Which quantizable layers to quantize: a layer name, a list of
            names, or a predicate ``layer -> bool``. ``None`` (default)
            quantizes all of them. The others stay in float, and so do they
            in the exported file (``tfopt.optimize`` keeps the layers whose
            INT8 costs the most accuracy in float this way).

    Returns:
        The QAT model: a clone sharing layers with ``model`` for Sequential
        and functional models; ``model`` itself, changed in place, if subclassed.

    Example:
        >>> qat = tfopt.quantize(tfopt.strip(pruned), "int8")
        >>> qat.compile(optimizer="adam", loss=loss)
        >>> qat.fit(x, y, epochs=2)
    """
    kind = _compat.check_keras_model(model)
    config = resolve(config)
    if kind == "tf_keras":
        if layers is not None:
            raise ConfigError("layers= works on Keras 3 models; tfmot quantizes a tf_keras "
                              "model whole.")
        if _tfmot.is_quantized(model):
            raise AlreadyQuantizedError(_ALREADY.format(name=model.name))
        return _tfmot.quantize(model)

    _compat.check_built(model)
    if is_quantized(model):
        raise AlreadyQuantizedError(_ALREADY.format(name=model.name))
    if _tree.carries(model, _tree.PRUNING):
        raise ConfigError(
            f"Model {model.name!r} still carries pruning wrappers. Strip it first: "
            "qat = tfopt.quantize(tfopt.strip(model)); zeros are kept through QAT."
        )
    if not _compat.is_graph_model(model) and not _compat.call_takes_training(model):
        raise ConfigError(
            f"Model {model.name!r}'s call() takes no `training` argument, so Keras never "
            "tells its layers they are training and activation ranges would not be "
            "tracked. Add it and pass it on: def call(self, inputs, training=None)."
        )
    select = _tree.selector(layers)
    if isinstance(layers, (str, list, tuple, set, frozenset)):
        _check_names(model, config, {layers} if isinstance(layers, str) else set(layers))
    weighted, tables, inputs_only, left_in_float = _plan(model, config, strict, select)
    _check_calibration_data(calibration_data)

    def replace(layer):
        if id(layer) in weighted:
            wrapper = QuantizeWrapper(layer, config)
        elif id(layer) in tables:
            wrapper = QuantizeTable(layer, config)
        elif id(layer) in inputs_only:
            wrapper = QuantizeInputs(layer, config)
        else:
            return None
        wrapper.build(_compat.built_input_shape(layer))
        if isinstance(wrapper, QuantizeWrapper) and config.preserve_sparsity:
            wrapper.record_sparsity()
        return wrapper

    with _tree.transaction() as journal:  # a failure puts model's layers back
        quantized = _tree.rewrite(model, replace, journal)
        if calibration_data is not None:
            calibrate(quantized, calibration_data)
    _compat.reset_compiled_functions(model)
    _compat.reset_compiled_functions(quantized)
    if left_in_float:
        warnings.warn(left_in_float, stacklevel=2)
    logger.info("Quantizing %d layer(s), %d lookup table(s) and %d residual input set(s) "
                "of %r.", len(weighted), len(tables), len(inputs_only), model.name)
    return quantized


_ALREADY = (
    "Model {name!r} is already quantized. Quantize the original (float) model once."
)


def _check_names(model, config: QuantizationConfig, names: set) -> None:
    quantizable = {layer.name for _, layer in _tree.walk(model)
                   if _registry.kind(layer, config) in ("weighted", "table")}
    missing = sorted(names - quantizable)
    if missing:
        raise ConfigError(f"layers names {missing}, which are not quantizable layers of "
                          f"{model.name!r}. Quantizable layers: {sorted(quantizable)}.")


def _plan(model, config: QuantizationConfig, strict: bool, select=None
          ) -> tuple[set[int], set[int], set[int], str]:
    """Look at the whole model: what to wrap (layers, tables, residual inputs), and the
    summary of what stays in float."""
    kept: list[str] = []
    weighted: set[int] = set()
    tables: set[int] = set()
    inputs_only: set[int] = set()
    unsupported: list[str] = []
    listed: dict[str, list[str]] = collections.defaultdict(list)
    attention: collections.Counter = collections.Counter()
    wrapped = ("weighted", "table")
    for path, layer in _tree.walk(model, stop=lambda la: _registry.kind(la, config) in wrapped):
        kind = _registry.kind(layer, config)
        if kind in wrapped and select is not None and not select(layer):
            kept.append(path)
        elif kind == "weighted":
            weighted.add(id(layer))
        elif kind == "table":
            tables.add(id(layer))
        elif kind == "inputs":
            inputs_only.add(id(layer))
        elif kind == "listed" and not _compat.direct_sublayers(layer):
            # a composite (keras-hub's TokenAndPositionEmbedding) is its sublayers
            listed[type(layer).__name__].append(path)
        elif kind == "unsupported" and not _compat.direct_sublayers(layer):
            unsupported.append(f"{path} ({type(layer).__name__})")
        if _registry.is_attention(layer):
            attention[type(layer).__name__] += 1
    if unsupported and strict:
        raise UnsupportedLayerError(
            f"strict=True, and {len(unsupported)} layer(s) with weights cannot be "
            f"quantized: {'; '.join(unsupported)}. Use strict=False to leave them in float."
        )
    if kept:
        logger.info("Keeping %d layer(s) in float as asked (layers=): %s", len(kept),
                    ", ".join(kept))
    if not weighted:
        raise NothingToQuantizeError(
            f"Nothing to quantize in model {model.name!r}: tfopt quantizes Conv*, "
            "DepthwiseConv*, SeparableConv*, Dense and EinsumDense layers"
            + (f", and layers= left out all {len(kept)} of them." if kept else ".")
        )
    parts = []
    if listed:
        parts.append("by design: " + "; ".join(
            f"{name} x{len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
            for name, paths in sorted(listed.items())))
    if attention:
        inside = ", ".join(f"{n} x{c}" for n, c in sorted(attention.items()))
        parts.append("the attention score and context products (query x key, scores x "
                     f"value) inside {inside}")
    if unsupported:
        parts.append("not supported (no quantizer for this layer type): " + "; ".join(unsupported))
    summary = ""
    if parts:
        quantized = f"{len(weighted)} layer(s)" + (
            f" and {len(tables)} lookup table(s)" if tables else "")
        summary = (f"tfopt.quantize({model.name!r}): {quantized} quantized; left in "
                   "float: " + " | ".join(parts) + ". See README, 'What stays in float'.")
    return weighted, tables, inputs_only, summary


def _check_calibration_data(data) -> None:
    """Arrays (or dicts of them) must be non-empty and finite: checked before any change."""
    import numpy as np

    if data is None or type(data).__module__.startswith("tensorflow"):
        return
    arrays = data.values() if isinstance(data, dict) else [data]
    for array in arrays:
        try:
            array = np.asarray(array)
        except (TypeError, ValueError):
            continue
        if array.ndim == 0 or len(array) == 0:
            raise ConfigError(f"calibration_data is empty (shape {array.shape}): pass at "
                              "least one batch of real inputs, e.g. x_train[:256].")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ConfigError(
                f"calibration_data holds {int(np.sum(~np.isfinite(array)))} NaN/infinite "
                "value(s), which would make activation ranges NaN: pass finite inputs.")
        if array.dtype.kind not in "biuf":
            raise ConfigError(f"calibration_data must be numeric arrays, got {array.dtype}.")


def calibrate(model, data, batch_size: int = 64) -> None:
    """Set activation ranges to the absolute maxima seen on ``data`` (eagerly)."""
    import numpy as np
    import tensorflow as tf

    wrappers = quant_wrappers(model)
    if isinstance(data, tf.data.Dataset):
        batches = (b[0] if isinstance(b, tuple) else b for b in data)
    elif isinstance(data, dict):
        size = len(next(iter(data.values())))
        batches = ({k: v[i:i + batch_size] for k, v in data.items()}
                   for i in range(0, size, batch_size))
    else:
        data = np.asarray(data)
        batches = (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    for wrapper in wrappers:
        wrapper.calibrating = True
    try:
        seen = 0
        for batch in batches:
            try:
                model(batch, training=False)
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(
                    f"The model cannot run calibration_data: {' '.join(str(exc).split())[:300]}"
                    ". Pass inputs shaped like the model's input.") from None
            seen += 1
    finally:
        for wrapper in wrappers:
            wrapper.calibrating = False
    if not seen:
        raise ConfigError("calibration_data is empty: pass at least one batch of inputs.")
    logger.info("Calibrated activation ranges of %d quantizer(s) on %d batch(es).",
                len(wrappers), seen)


def _is_quant_wrapper(layer) -> bool:
    return isinstance(layer, _ActivationQuantizer)


def quant_wrappers(model) -> list[_ActivationQuantizer]:
    return _tree.find(model, _is_quant_wrapper)


def is_quantized(model) -> bool:
    """True if the model carries tfopt (Keras 3) or tfmot (tf_keras) QAT wrappers."""
    if _compat.check_keras_model(model) == "tf_keras":
        return _tfmot.is_quantized(model)
    return bool(quant_wrappers(model))

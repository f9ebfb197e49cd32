"""What goes in and out of an exported model: names, shapes, dtypes.

Inputs are named after the model's inputs (dict keys, else Input layer
names), never Keras' internal ``keras_tensor_N``; outputs after the layers
that produce them (or the dict keys of a dict output).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfopt.errors import ConfigError, ModelNotBuiltError


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """Input specs, output names and how to call the model with named tensors."""

    inputs: tuple[tf.TensorSpec, ...]
    outputs: tuple[str, ...]
    structure: Any  # how the model takes its inputs: a dict of names, a list, or one

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def call(self, model: keras.Model, tensors: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """Call ``model`` on tensors ordered like ``inputs``; return named outputs."""
        if isinstance(self.structure, dict):
            args = dict(zip(self.structure, tensors))
        elif isinstance(self.structure, (list, tuple)):
            args = list(tensors)
        else:
            args = tensors[0]
        outputs = model(args, training=False)
        if isinstance(outputs, dict):
            return {name: outputs[name] for name in self.outputs}
        return dict(zip(self.outputs, keras.tree.flatten(outputs)))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelSignature":
        """The signature recorded in an export's ``manifest.json``."""
        described = manifest["signature"]
        inputs = tuple(tf.TensorSpec(i["shape"], i["dtype"], name=i["name"])
                       for i in described["inputs"])
        outputs = tuple(o["name"] if isinstance(o, dict) else o for o in described["outputs"])
        return cls(inputs, outputs, None if len(inputs) == 1 else list(inputs))

    def describe(self) -> dict:
        return {
            "inputs": [{"name": s.name, "shape": _shape(s.shape), "dtype": s.dtype.name}
                       for s in self.inputs],
            "outputs": list(self.outputs),
        }


def _shape(shape: tf.TensorShape) -> list:
    return [None if d is None else int(d) for d in shape]


def _safe(name: str) -> str:
    """A name TF Serving, ONNX and Triton all accept."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return name if name and name[0].isalpha() else f"input_{name}"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count}")
    return result


def infer(model: keras.Model, input_signature=None, validation_data=None) -> ModelSignature:
    """Work out a model's serving signature, or say what is missing.

    In order: ``input_signature``; the model's symbolic inputs (Sequential,
    functional); the shapes a built or called subclassed model recorded, as
    Keras' own ``model.export`` reads them (dtypes from ``validation_data``
    when given, else the model's input dtype); ``validation_data`` itself
    (batch dimension left free).
    """
    recorded = None
    if input_signature is None and not getattr(model, "inputs", None):
        recorded = _from_recorded_shapes(model, validation_data)
        if recorded is None and validation_data is not None:
            recorded = _from_data(validation_data)
    if recorded is not None:
        specs, structure = recorded
    elif input_signature is not None:
        specs, structure = _from_user_signature(input_signature)
    elif getattr(model, "inputs", None):
        structure = getattr(model, "_inputs_struct", None)
        if structure is None:
            structure = model.inputs
        if isinstance(structure, dict):
            names = list(structure)
            tensors = list(structure.values())
        else:
            tensors = keras.tree.flatten(structure)
            names = [_input_layer_name(t) for t in tensors]
        names = _unique([_safe(n) for n in names])
        specs = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=n)
                 for t, n in zip(tensors, names)]
        if not isinstance(structure, (dict, list, tuple)):
            structure = None
        elif isinstance(structure, (list, tuple)) and len(specs) == 1:
            structure = None
    else:
        raise ModelNotBuiltError(
            f"Model {model.name!r} has no known inputs: a subclassed model that was never "
            "called (or whose call() takes several tensor arguments), and no "
            "validation_data. Call it once on a batch (model(x[:1])), pass "
            "validation_data=x[:64], or pass input_signature=[tf.TensorSpec([None, ...], "
            "tf.float32, name='x')], one spec per input."
        )
    outputs = _output_names(model, specs, structure)
    return ModelSignature(tuple(specs), tuple(outputs), structure)


def _dtype_of(array) -> tf.DType:
    dtype = tf.as_dtype(np.asarray(array).dtype)
    return tf.float32 if dtype == tf.float64 else (tf.int32 if dtype == tf.int64 else dtype)


def _from_recorded_shapes(model, validation_data):
    """Specs from the input shapes a called subclassed model recorded, or None."""
    from tfopt import _compat

    recorded, dtype = _compat.recorded_input_structure(model)
    if recorded is None:
        return None

    def is_shape(value):
        return isinstance(value, (list, tuple)) and all(
            isinstance(d, (int, type(None))) for d in value)

    if is_shape(recorded):
        items, structure = [("input", recorded)], None
    elif isinstance(recorded, dict) and all(is_shape(v) for v in recorded.values()):
        items, structure = list(recorded.items()), "dict"
    elif isinstance(recorded, (list, tuple)) and all(is_shape(v) for v in recorded):
        items, structure = [(f"input_{i}", v) for i, v in enumerate(recorded)], "list"
    else:
        return None
    dtypes = [tf.as_dtype(dtype)] * len(items)
    if validation_data is not None:
        data = (list(validation_data.values()) if isinstance(validation_data, dict)
                else list(validation_data) if isinstance(validation_data, (list, tuple))
                else [validation_data])
        if len(data) == len(items):
            dtypes = [_dtype_of(a) for a in data]
    names = _unique([_safe(str(n)) for n, _ in items])
    specs = [tf.TensorSpec([None, *shape[1:]], dt, name=n)
             for (_, shape), dt, n in zip(items, dtypes, names)]
    if structure == "dict":
        return specs, {n: None for n in names}
    return specs, (specs if structure == "list" else None)


def _from_data(data):
    """Specs from validation data (batch dimension left free)."""
    if isinstance(data, dict):
        names = _unique([_safe(str(k)) for k in data])
        specs = [tf.TensorSpec([None, *np.shape(a)[1:]], _dtype_of(a), name=n)
                 for a, n in zip(data.values(), names)]
        return specs, {n: None for n in names}
    arrays = list(data) if isinstance(data, (list, tuple)) else [data]
    specs = [tf.TensorSpec([None, *np.shape(a)[1:]], _dtype_of(a),
                           name="input" if len(arrays) == 1 else f"input_{i}")
             for i, a in enumerate(arrays)]
    return specs, (specs if len(specs) > 1 else None)


def _input_layer_name(tensor) -> str:
    """The name of the layer that produces ``tensor`` (a tfopt wrapper's inner layer)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return "input"
    layer = history.operation
    if isinstance(layer, keras.layers.Wrapper) and type(layer).__module__.startswith("tfopt."):
        layer = layer.layer
    return layer.name


def _from_user_signature(signature):
    if isinstance(signature, tf.TensorSpec):
        signature = [signature]
    if isinstance(signature, dict):
        specs = [tf.TensorSpec(s.shape, s.dtype, name=_safe(k)) for k, s in signature.items()]
        return specs, {s.name: None for s in specs}
    if not isinstance(signature, (list, tuple)) or not all(
            isinstance(s, tf.TensorSpec) for s in signature):
        raise ConfigError(
            f"input_signature must be a tf.TensorSpec, a list of them or a dict of them, "
            f"got {signature!r}."
        )
    names = _unique([_safe(s.name or f"input_{i}") for i, s in enumerate(signature)])
    specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(signature, names)]
    return specs, (specs if len(specs) > 1 else None)


def _output_names(model, specs, structure) -> list[str]:
    outputs_struct = getattr(model, "_outputs_struct", None)
    if outputs_struct is None and getattr(model, "outputs", None) is not None:
        outputs_struct = model.outputs
    if outputs_struct is None:
        # A subclassed model: trace it once to learn what it returns.
        dummy = [tf.zeros([1 if d is None else d for d in s.shape], s.dtype) for s in specs]
        if isinstance(structure, dict):
            outputs_struct = model(dict(zip(structure, dummy)), training=False)
        else:
            outputs_struct = model(dummy if structure else dummy[0], training=False)
        if isinstance(outputs_struct, dict):
            return [_safe(k) for k in outputs_struct]
        flat = keras.tree.flatten(outputs_struct)
        return ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]
    if isinstance(outputs_struct, dict):
        return list(outputs_struct)
    flat = keras.tree.flatten(outputs_struct)
    return _unique([_safe(_input_layer_name(t)) for t in flat])


def as_feed(signature: ModelSignature, data) -> list[np.ndarray]:
    """Validation data (array, list or dict) as arrays ordered like the inputs."""
    if isinstance(data, dict):
        missing = [n for n in signature.input_names if n not in data]
        if missing:
            raise ConfigError(
                f"validation_data is missing input(s) {missing}; the model's inputs are "
                f"{signature.input_names}."
            )
        arrays = [np.asarray(data[n]) for n in signature.input_names]
    elif isinstance(data, (list, tuple)):
        arrays = [np.asarray(a) for a in data]
    else:
        arrays = [np.asarray(data)]
    if len(arrays) != len(signature.inputs):
        raise ConfigError(
            f"validation_data has {len(arrays)} array(s), the model takes "
            f"{len(signature.inputs)} input(s): {signature.input_names}."
        )
    for array, spec in zip(arrays, signature.inputs):
        if not tf.TensorShape(array.shape).is_compatible_with(spec.shape):
            raise ConfigError(
                f"validation_data for input {spec.name!r} has shape {array.shape}, but "
                f"the model expects {_shape(spec.shape)} (None: any size). Pass a batch "
                "of real inputs, e.g. x_test[:64]."
            )
        if spec.dtype.is_integer and array.dtype.kind == "f" \
                and not np.array_equal(array, np.trunc(array), equal_nan=False):
            raise ConfigError(
                f"validation_data for input {spec.name!r} holds fractional values (e.g. "
                f"{array[array != np.trunc(array)].flat[0]!r}), but the model takes "
                f"{spec.dtype.name} (token ids?): casting would change them. Pass the "
                "integer values the model is served with."
            )
    return [a.astype(spec.dtype.as_numpy_dtype, copy=False)
            for a, spec in zip(arrays, signature.inputs)]


def random_feed(signature: ModelSignature, batch: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random inputs when no validation data is given (real inputs are better)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in signature.inputs:
        shape = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.shape)]
        if spec.dtype.is_integer:
            arrays.append(rng.integers(0, 2, size=shape).astype(spec.dtype.as_numpy_dtype))
        else:
            arrays.append(rng.normal(size=shape).astype(spec.dtype.as_numpy_dtype))
    return arrays

"""Version branches and private imports, in one place.

tfopt supports two Keras families behind one API:

* Keras 3 (``keras`` and the ``tf.keras`` of TensorFlow 2.16+), which tfopt
  handles itself, and
* ``tf_keras`` (Keras 2), which tfopt hands to tensorflow-model-optimization
  (tfmot).

Everything that depends on which one a model belongs to, or that reaches into
a private Keras attribute, lives here so that the rest of the package reads as
plain Keras.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
from typing import Any, Iterator

import keras

from tfopt.errors import ModelNotBuiltError, NotAKerasModelError

_LEGACY_ENV = "TF_USE_LEGACY_KERAS"


def is_tf_keras_object(obj: Any) -> bool:
    """True if ``obj`` is an instance of a class from the ``tf_keras`` package.

    Checked through the class hierarchy by module name, so that ``tf_keras``
    is never imported just to answer the question.
    """
    return any(
        (cls.__module__ or "").split(".")[0] == "tf_keras" for cls in type(obj).__mro__
    )


def check_keras_model(model: Any, *, what: str = "model") -> str:
    """Return ``"keras3"`` or ``"tf_keras"`` for a model, or raise a clear error."""
    if isinstance(model, keras.Model):
        if keras.backend.backend() != "tensorflow":
            raise NotAKerasModelError(
                f"tfopt needs Keras' TensorFlow backend, but Keras is running on "
                f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before "
                "importing keras."
            )
        return "keras3"
    if is_tf_keras_object(model):
        import tf_keras  # already imported: the model comes from it

        if isinstance(model, tf_keras.Model):
            return "tf_keras"
    raise NotAKerasModelError(
        f"Expected a Keras model as `{what}`, got {type(model).__module__}."
        f"{type(model).__qualname__}. Pass a keras.Model (Sequential, functional "
        "or subclassed) or a tf_keras.Model."
    )


def check_built(model: keras.Model) -> None:
    """Raise if a Keras 3 model has not created its weights yet."""
    if not model.built:
        raise ModelNotBuiltError(
            f"Model {model.name!r} is not built, so its layers have no weights yet. "
            "Build it first: call it once on a batch (model(x[:1])) or call "
            "model.build(input_shape)."
        )


def is_layer(node: Any) -> bool:
    """True for a Keras 3 layer; False for an operation node of a functional graph.

    Functional graphs also hold operations that are not layers: ``x + 3.0``
    records a ``keras.src.ops.numpy.Add``, ``x[:, 0]`` a ``GetItem``. They
    have no weights and no sublayers.
    """
    return isinstance(node, keras.layers.Layer)


def direct_sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers a layer tracks directly (one level down), in tracking order.

    Empty for an operation node that is not a layer.
    """
    if not is_layer(layer):
        return []
    return list(layer._flatten_layers(include_self=False, recursive=False))


def recorded_input_structure(model: keras.Model):
    """The input shapes a built or called subclassed model recorded, as Keras' export reads them.

    Returns ``(structure, dtype)``: ``structure`` is one shape tuple, a list of
    them or a dict of them; ``None`` if the model was never called or its
    call takes several positional tensors.
    """
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        return None, None
    dtype = getattr(model, "input_dtype", None) or keras.config.floatx()
    return next(iter(shapes.values())), dtype


def built_input_shape(layer: keras.layers.Layer):
    """The input shape a built layer was built with (a list for multi-input layers)."""
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    return next(iter(shapes.values()), None)


def is_graph_model(layer: Any) -> bool:
    """True for Sequential and functional models (whose layers form a graph)."""
    from keras.src.models.functional import Functional

    return isinstance(layer, (keras.Sequential, Functional))


def clone_graph_model(model: keras.Model, clone_function, input_shapes=None) -> keras.Model:
    """``keras.models.clone_model`` that keeps the names of functional inputs.

    Left to itself, Keras names a cloned functional model's inputs after the
    input tensors (``keras_tensor_N``) instead of the Input layers.
    ``input_shapes`` (one batch shape per input, in ``model.inputs`` order)
    gives the clone inputs of other shapes, as when the channels feeding a
    nested model were pruned.
    """
    if input_shapes is not None:
        inputs = graph_nodes(model)[0]
        tensors = [keras.Input(batch_shape=tuple(shape), dtype=t.dtype,
                               name=t._keras_history.operation.name)
                   for t, shape in zip(inputs, input_shapes)]
        if isinstance(model, keras.Sequential):
            return keras.models.clone_model(model, input_tensors=tensors[0],
                                            clone_function=clone_function)
        structure = keras.tree.pack_sequence_as(model.input, tensors)
        return keras.models.clone_model(model, input_tensors=structure,
                                        clone_function=clone_function)
    input_tensors = None
    if not isinstance(model, keras.Sequential):
        input_tensors = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype,
                                  name=t._keras_history.operation.name),
            model.input,
        )
    return keras.models.clone_model(model, input_tensors=input_tensors,
                                    clone_function=clone_function)


def structural_copy(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new layer object with ``layer``'s weights and sublayers, whose sublayers can be swapped alone.

    The copy shares every variable and sublayer with ``layer`` (as a cloned
    functional graph shares its layers), but has its own attributes, lists,
    dicts and Keras tracking, so that :func:`replace_sublayer` on the copy
    leaves ``layer`` as it was.
    """
    new = object.__new__(type(layer))  # not copy.copy: Keras pickles a layer by saving it
    new.__dict__.update(vars(layer))
    copies = {}
    for name, value in vars(layer).items():
        if isinstance(value, (list, dict)):
            # Keras' tracked containers, built without a tracker, track nothing while copied
            tracked = hasattr(value, "tracker")
            copies[id(value)] = type(value)(value, tracker=None) if tracked else type(value)(value)
            object.__setattr__(new, name, copies[id(value)])
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None:
        own = copy.copy(tracker)
        own.config = {key: (predicate, copies.get(id(store), store))
                      for key, (predicate, store) in tracker.config.items()}
        own.stored_ids = {key: set(ids) for key, ids in tracker.stored_ids.items()}
        object.__setattr__(new, "_tracker", own)
        for value in copies.values():
            if getattr(value, "tracker", None) is tracker:
                value.tracker = own
    return new


def graph_nodes(model: keras.Model):
    """``(inputs, outputs, nodes)`` of a Sequential or functional model, nodes in call order.

    Each node has ``operation`` (a layer, or an operation such as
    ``keras.ops.add`` that is not one), ``input_tensors`` and ``outputs``
    (flat lists of ``KerasTensor``) and ``arguments``.
    """
    graph = model._functional if isinstance(model, keras.Sequential) else model
    if graph is None:
        raise ModelNotBuiltError(
            f"Sequential model {model.name!r} has no layer graph yet. Start it with "
            "keras.Input(shape) or call it once on a batch.")
    by_depth = graph._nodes_by_depth
    nodes = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
             if node.operation is not None and not node.is_input]
    return list(graph.inputs), list(graph.outputs), nodes


def node_constants(node) -> list:
    """The arguments of a graph node that are not Keras tensors (scalars, arrays, ...)."""
    values = list(node.arguments.args) + list(node.arguments.kwargs.values())
    return [v for v in keras.tree.flatten(values) if not isinstance(v, keras.KerasTensor)]


def layer_takes_training(layer: keras.layers.Layer) -> bool:
    """Whether a layer's ``call()`` has a ``training`` argument."""
    return bool(getattr(layer, "_call_has_training_arg", False))


def replace_sublayer(parent: keras.layers.Layer, old: keras.layers.Layer,
                     new: keras.layers.Layer) -> None:
    """Swap a tracked sublayer of ``parent`` in place, keeping Keras' tracking.

    Attributes, lists and dicts of the parent that refer to ``old`` are made
    to refer to ``new``; Keras' list of tracked layers is updated the same way.
    """
    tracker = getattr(parent, "_tracker", None)
    if tracker is not None:
        tracker.replace_tracked_value("layers", old, new)
    for name, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, name, new)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    list.__setitem__(value, i, new)
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if item is old:
                    dict.__setitem__(value, key, new)


def reset_compiled_functions(model: keras.Model) -> None:
    """Drop a model's traced train/test/predict functions so they are rebuilt."""
    for attr in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attr):
            setattr(model, attr, None)


def call_takes_training(model: keras.Model) -> bool:
    """Whether ``fit()`` will tell the model (and so its layers) it is training.

    Keras' train step passes ``training=True`` only to a model whose
    ``call()`` accepts a ``training`` argument.
    """
    return bool(getattr(model, "_call_has_training_arg", True))


def retrace_train_function(model: keras.Model) -> None:
    """Make ``fit()`` use a freshly traced train step from here on.

    Also clears a train function left half-traced by an exception.
    """
    model.make_train_function(force=True)


@contextlib.contextmanager
def _legacy_keras_env_preserved() -> Iterator[None]:
    """Undo tfmot's import-time ``os.environ['TF_USE_LEGACY_KERAS'] = '1'``.

    ``tf.keras`` is resolved lazily; binding it before tfmot is imported makes
    it keep meaning what it meant to the caller, and restoring the variable
    afterwards keeps later imports (and subprocesses) unaffected.
    """
    import tensorflow as tf

    before = os.environ.get(_LEGACY_ENV)
    tf.keras.Model  # noqa: B018 - resolves the lazy loader with the caller's setting
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_LEGACY_ENV, None)
        else:
            os.environ[_LEGACY_ENV] = before


def import_tfmot() -> Any:
    """Import tensorflow_model_optimization without its global side effect."""
    try:
        with _legacy_keras_env_preserved():
            return importlib.import_module("tensorflow_model_optimization")
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "tf_keras models are pruned and quantized by tensorflow-model-optimization"
            ", which is not installed: pip install tensorflow-model-optimization"
        ) from exc


def tensorflow_has_tensorrt() -> bool:
    """Whether this TensorFlow build can run TF-TRT (no pip build since 2.18 can)."""
    try:
        from tensorflow.compiler.tf2tensorrt import _pywrap_py_utils
    except ImportError:
        return False
    return bool(_pywrap_py_utils.is_tensorrt_enabled())


def import_tensorrt():
    """The ``tensorrt`` module and its major version, or a clear error."""
    from tfopt.errors import BackendUnavailableError

    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            "The 'tensorrt' format builds engines with NVIDIA TensorRT's Python API, which "
            "is not installed. Install it on a machine with an NVIDIA GPU: pip install "
            "'tfopt[tensorrt]' (TensorRT 10 or 11). The 'onnx' format needs no GPU."
        ) from exc
    return tensorrt, int(tensorrt.__version__.split(".")[0])


# Keras 3 versions whose MultiWorkerMirroredStrategy path in fit() fails the way
# keras_multi_worker_fixes() mends (keras-team/keras#20585, tensorflow#72388), and on
# which the fix was tested. Other versions: refused, so a change upstream is noticed.
MULTI_WORKER_FIXED_KERAS = ("3.15",)


@contextlib.contextmanager
def keras_multi_worker_fixes() -> Iterator[None]:
    """Mend Keras 3's TensorFlow trainer where it fails under MultiWorkerMirroredStrategy.

    1. ``TensorFlowTrainer._maybe_symbolic_build`` builds the model from the
       first distributed batch by ``strategy.reduce("MEAN", batch)``, which a
       multi-worker strategy cannot do eagerly on a ``PerReplica``
       (``Attempt to convert a value (PerReplica...) to a Tensor``). Building
       needs shapes only: the first replica's values are used.
    2. ``reduce_per_replica(..., "auto")`` averages each logged value with
       ``strategy.reduce("MEAN", v, axis=0)``, which fails on the scalar loss
       and metrics (``Invalid reduction dimension 0 for input with 0
       dimensions``). Scalars are averaged over replicas (``axis=None``).

    Both are patched on the classes for the duration of the ``with`` block and
    restored after it; nothing changes for other strategies.
    """
    from tfopt.errors import ConfigError

    version = ".".join(keras.__version__.split(".")[:2])
    if version not in MULTI_WORKER_FIXED_KERAS:
        raise ConfigError(
            f"tfopt's MultiWorkerMirroredStrategy fixes were tested on Keras "
            f"{', '.join(MULTI_WORKER_FIXED_KERAS)}, not {keras.__version__}. Try fit() "
            "without them (the upstream bug, keras-team/keras#20585, may be fixed in your "
            "version), or install a tested Keras.")
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def symbolic_build_from_local_values(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda x: strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues) else x, next(it))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    original_reduce = tf_trainer.reduce_per_replica

    def reduce_scalars_too(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
                strategy):
            def one(v):
                # one replica per worker: plain tensors; several: PerReplica values
                local = v.values[0] if tf_trainer._is_per_replica_instance(v) else v
                if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                    return strategy.reduce("MEAN", v, axis=None)
                return original_reduce(v, strategy, reduction)
            return tree.map_structure(one, values)
        return original_reduce(values, strategy, reduction)

    trainer_class = tf_trainer.TensorFlowTrainer
    original_build = trainer_class._maybe_symbolic_build
    trainer_class._maybe_symbolic_build = symbolic_build_from_local_values
    tf_trainer.reduce_per_replica = reduce_scalars_too
    try:
        yield
    finally:
        trainer_class._maybe_symbolic_build = original_build
        tf_trainer.reduce_per_replica = original_reduce

"""SavedModel in TF Serving's layout (plain, or XLA-compiled), and the frozen GraphDef.

TF Serving loads ``<directory>/saved_model/<version>/``; its
``serving_default`` signature takes the model's inputs by name, returns its
outputs by name, and has a dynamic batch dimension.

The XLA SavedModel (``saved_model_xla/<version>/``) serves through a
``tf.function(jit_compile=True)``: the function in the SavedModel carries
the ``_XlaMustCompile`` attribute, and TensorFlow's runtime compiles it with
XLA for each input shape on first use (on GPU, XLA fuses each convolution
with its bias, residual add and activation). TF Serving runs it only when
started with ``--xla_cpu_compilation_enabled=true``: its ``main.cc`` calls
``tensorflow::DisableXlaCompilation()`` otherwise, and TensorFlow's
``DeviceCompiler`` (``tensorflow/compiler/jit/device_compiler.h``) then
answers every uncompiled XLA cluster, on any device, with "XLA compilation
disabled", despite the flag's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from tfopt.export._signature import ModelSignature

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def serving_function(model: keras.Model, signature: ModelSignature) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` taking the inputs positionally, returning named outputs."""

    def serve(*tensors):
        return signature.call(model, tensors)

    return tf.function(serve, input_signature=list(signature.inputs))


XLA_ATTRIBUTE = "_XlaMustCompile"


def xla_serving_function(model: keras.Model, signature: ModelSignature):
    """A ``tf.function(jit_compile=True)`` serving ``model``; float16/bfloat16 outputs as float32.

    The signature keeps the Keras model's float32 outputs, whatever the
    compute dtype inside, so clients need not change.
    """

    def serve(*tensors):
        outputs = signature.call(model, tensors)
        return {name: tf.cast(value, tf.float32) if value.dtype in (tf.float16, tf.bfloat16)
                else value for name, value in outputs.items()}

    return tf.function(serve, input_signature=list(signature.inputs), jit_compile=True)


def float16_clone(model: keras.Model, dtype: str = "float16") -> keras.Model:
    """``model`` rebuilt layer by layer with the ``dtype`` policy, its weights cast to it.

    Functional and Sequential models only (nested ones too): each layer is
    recreated from its config with ``dtype`` as its policy, so variables are
    stored in ``dtype`` and computed in it. Keras' BatchNormalization still
    normalizes in float32 internally. The model's inputs stay float32: the
    first layer casts them. The user's model is not changed.

    Raises:
        ValueError: If the model cannot be rebuilt from its layers' configs
            (a subclassed model) or its weights do not line up.
    """
    def rebuild(layer):
        config = layer.get_config()
        config["dtype"] = dtype
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=rebuild, recursive=True)
    source, target = model.weights, clone.weights
    if len(source) != len(target):
        raise ValueError(f"the {dtype} clone has {len(target)} weights, the model "
                         f"{len(source)}")
    values = []
    for old, new in zip(source, target):
        if tuple(old.shape) != tuple(new.shape):
            raise ValueError(f"weight {old.path} has shape {tuple(old.shape)}, its {dtype} "
                             f"copy {new.path} {tuple(new.shape)}")
        values.append(np.asarray(keras.ops.convert_to_numpy(old)).astype(
            keras.backend.standardize_dtype(new.dtype)))
    for new, value in zip(target, values):
        new.assign(value)
    return clone


def write_xla_saved_model(model: keras.Model, signature: ModelSignature, path: Path, *,
                          compute_dtype: str = "float32",
                          warmup: Optional[Sequence[np.ndarray]] = None) -> dict:
    """Write a SavedModel whose ``serving_default`` is compiled by XLA; check that it is.

    ``model`` is served as given (pass :func:`float16_clone` for FP16). The
    written ``saved_model.pb`` is read back and must hold a function with
    ``_XlaMustCompile`` set, or ``RuntimeError`` is raised. Returns
    ``{"xla_functions": n, "compute_dtype": ...}`` for the manifest.
    """
    serve = xla_serving_function(model, signature)
    concrete = serve.get_concrete_function()
    root = _root(concrete.variables)
    root.serve = serve
    tf.saved_model.save(root, str(path), signatures={"serving_default": concrete})
    if warmup is not None:
        write_warmup_requests(path / WARMUP_FILE, signature, warmup)
    marked = xla_functions(path)
    if not marked:
        raise RuntimeError(f"The SavedModel at {path} lost the {XLA_ATTRIBUTE} attribute of "
                           "its serving function: TensorFlow would run it without XLA.")
    return {"xla_functions": len(marked), "xla_attribute": XLA_ATTRIBUTE,
            "compute_dtype": compute_dtype}


def xla_functions(path: Path) -> list[str]:
    """Names of the functions in a SavedModel's graph marked ``_XlaMustCompile``."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    found = []
    for meta_graph in proto.meta_graphs:
        for function in meta_graph.graph_def.library.function:
            attr = function.attr.get(XLA_ATTRIBUTE)
            if attr is not None and attr.b:
                found.append(function.signature.name)
    return found


def frozen_function(serve) -> tf.types.experimental.ConcreteFunction:
    """The serving function with variables turned into constants."""
    return convert_variables_to_constants_v2(serve.get_concrete_function())


def frozen_graph_def(concrete) -> tuple:
    """``convert_variables_to_constants_v2``'s GraphDef and I/O names, without its function.

    TensorFlow's public function wraps the frozen GraphDef in a new
    ConcreteFunction, registered in the eager context with a copy of every
    weight; measured on ConvNeXtBase, resident memory stayed 9x the weights
    above where it started. Where only the GraphDef is needed (ONNX, the
    frozen-graph format), the stage that makes it is called directly, and
    the public function is the fallback should TensorFlow move that stage.

    Returns:
        ``(graph_def, input tensor names, output tensor names)``.
    """
    from tensorflow.python.framework import convert_to_constants as c2c

    stage = getattr(c2c, "_replace_variables_by_constants", None)
    data = getattr(c2c, "_FunctionConverterDataInEager", None)
    if stage is None or data is None:
        frozen = c2c.convert_variables_to_constants_v2(concrete)
        return (frozen.graph.as_graph_def(), [t.name for t in frozen.inputs],
                [t.name for t in frozen.outputs])
    graph_def, converted = stage(converter_data=data(
        func=concrete, lower_control_flow=True, aggressive_inlining=False))
    captures = concrete.graph.internal_captures
    constant = {id(captures[i]) for i in converted}
    return (graph_def, [t.name for t in concrete.inputs if id(t) not in constant],
            [t.name for t in concrete.outputs])


def image_functions(serve, signature: ModelSignature, kinds: Sequence[str]) -> dict:
    """Signatures that take images as clients hold them and call ``serve`` on them.

    ``image_bytes``: encoded files (``tf.string``, any format ``tf.io.decode_image``
    reads), decoded to the model's channels and resized to its height and width;
    ``uint8``: uint8 images of any size, resized. Pixels go in as float [0, 255].
    """
    if not kinds:
        return {}
    spec = signature.inputs[0]
    height, width, channels = spec.shape[1], spec.shape[2], spec.shape[3]

    def to_model(image):
        resized = tf.image.resize(tf.cast(image, tf.float32), (height, width))
        return tf.cast(resized, spec.dtype)

    functions = {}
    if "image_bytes" in kinds:
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve_image_bytes(image_bytes):
            def decode(data):
                image = tf.io.decode_image(data, channels=channels, expand_animations=False)
                image.set_shape([None, None, channels])
                return to_model(image)
            batch = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
                [height, width, channels], spec.dtype))
            return serve(batch)
        functions["serving_image_bytes"] = serve_image_bytes
    if "uint8" in kinds:
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8,
                                                    name="images")])
        def serve_uint8(images):
            return serve(to_model(images))
        functions["serving_uint8"] = serve_uint8
    return functions


def write_saved_model(model: keras.Model, signature: ModelSignature, path: Path, *,
                      freeze: bool = False,
                      warmup: Optional[Sequence[np.ndarray]] = None,
                      image_signatures: Sequence[str] = ()) -> None:
    """Write a lean SavedModel with a ``serving_default`` signature (and ``serve``).

    Lean: it holds what inference reads and nothing else, each tensor once.
    Keras' own ``ExportArchive`` (behind ``model.export``) checkpoints every
    variable twice (its ``variables`` and ``_all_variables`` lists: a
    MobileNetV2 takes 30.3 MB for 14.2 MB of weights), and a QAT model's
    variables include training-only state (sparsity masks, step counters).

    * Float models: a ``tf.Module`` tracking exactly the variables the
      serving graph captures, once each.
    * QAT models and ``freeze=True``: the serving
      graph with variables as constants; for QAT, constant-folded so each
      masked weight is stored once, already masked (the fake-quantization
      ops stay, as TF Serving must run them).

    Both keep TF Serving's layout (``saved_model.pb``, ``variables/``).
    """
    serve = serving_function(model, signature)
    concrete = serve.get_concrete_function()
    from tfopt.quantization import is_quantized

    if freeze or is_quantized(model):
        frozen = frozen_function(serve)
        structure = concrete.structured_outputs
        if is_quantized(model):
            frozen = _fold_constants(frozen)

        def serve_frozen(*tensors):
            return tf.nest.pack_sequence_as(structure, frozen(*tensors))

        function = tf.function(serve_frozen, input_signature=list(signature.inputs))
        root = _root([])
        root.serve = function
        extra = image_functions(function, signature, image_signatures)
        tf.saved_model.save(root, str(path), signatures={"serving_default": function, **extra})
    else:
        root = _root(concrete.variables)  # each variable the serving graph reads, once
        root.serve = serve
        extra = image_functions(serve, signature, image_signatures)
        tf.saved_model.save(root, str(path), signatures={"serving_default": concrete, **extra})
    if warmup is not None:
        write_warmup_requests(path / WARMUP_FILE, signature, warmup)


def _root(variables):
    """The SavedModel's root object; ``loaded.variables`` lists its variables, as Keras' does."""
    root = tf.train.Checkpoint()
    root.variables = list(variables)
    return root


def _fold_constants(frozen):
    """A frozen function's graph through Grappler's constant folding, as a function again."""
    graph_def = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    folded = _grappler_fold(graph_def, inputs, outputs)

    def import_graph():
        tf.compat.v1.import_graph_def(folded, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    graph = wrapped.graph
    return wrapped.prune([graph.get_tensor_by_name(n) for n in inputs],
                         [graph.get_tensor_by_name(n) for n in outputs])


def write_warmup_requests(path: Path, signature: ModelSignature,
                          arrays: Sequence[np.ndarray], count: int = 8) -> None:
    """TF Serving warm-up records: PredictionLog protos, one example each."""
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError as exc:
        raise ImportError(
            "Warm-up requests are TF Serving protos from tensorflow-serving-api: "
            "pip install tensorflow-serving-api"
        ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = min(count, len(arrays[0]))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(rows):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name="serving_default"))
            for spec, array in zip(signature.inputs, arrays):
                request.inputs[spec.name].CopyFrom(tf.make_tensor_proto(array[i:i + 1]))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def write_frozen_graph(model: keras.Model, signature: ModelSignature,
                       path: Path) -> tuple[list[str], list[str]]:
    """A frozen GraphDef with constants folded and BatchNorm folded into convolutions.

    Returns the graph's output tensor names (in ``signature.outputs`` order)
    and input tensor names (in ``signature.inputs`` order).
    """
    from tensorflow.python.tools import optimize_for_inference_lib

    concrete = serving_function(model, signature).get_concrete_function()
    graph_def, input_names, flat_names = frozen_graph_def(concrete)
    keys = tf.nest.flatten({k: k for k in concrete.structured_outputs})
    by_key = dict(zip(keys, flat_names))
    input_nodes = [name.split(":")[0] for name in input_names]
    output_nodes = [by_key[k].split(":")[0] for k in signature.outputs]
    graph_def = _grappler_fold(graph_def, input_names, [by_key[k] for k in signature.outputs])
    graph_def = optimize_for_inference_lib.optimize_for_inference(
        graph_def, input_nodes, output_nodes,
        [spec.dtype.as_datatype_enum for spec in signature.inputs],
        toco_compatible=False,
    )
    path.write_bytes(graph_def.SerializeToString())
    return [by_key[k] for k in signature.outputs], input_names


def _grappler_fold(graph_def, inputs: list[str], outputs: list[str]):
    """Grappler's constant folding and arithmetic simplification on a frozen graph.

    Folds inference BatchNorm into constants and pushes per-channel
    multiplications into convolution weights. Fake-quantization ops stay.
    """
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers[:] = ["constfold", "arithmetic", "dependency", "function"]
    rewrite.experimental_disable_folding_quantization_emulation = True
    with tf.Graph().as_default():
        meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(inputs + outputs)
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    return tf_optimizer.OptimizeGraph(config, meta_graph)


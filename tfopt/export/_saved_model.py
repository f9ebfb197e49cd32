"""SavedModel in TF Serving's layout, and the frozen GraphDef.

TF Serving loads ``<directory>/saved_model/<version>/``; its
``serving_default`` signature takes the model's inputs by name, returns its
outputs by name, and has a dynamic batch dimension.
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


def frozen_function(serve) -> tf.types.experimental.ConcreteFunction:
    """The serving function with variables turned into constants."""
    return convert_variables_to_constants_v2(serve.get_concrete_function())


def write_saved_model(model: keras.Model, signature: ModelSignature, path: Path, *,
                      freeze: bool = False,
                      warmup: Optional[Sequence[np.ndarray]] = None) -> None:
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
        tf.saved_model.save(root, str(path), signatures={"serving_default": function})
    else:
        root = _root(concrete.variables)  # each variable the serving graph reads, once
        root.serve = serve
        tf.saved_model.save(root, str(path), signatures={"serving_default": concrete})
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

    serve = serving_function(model, signature)
    concrete = serve.get_concrete_function()
    frozen = frozen_function(serve)
    graph_def = frozen.graph.as_graph_def()
    flat_names = [t.name for t in frozen.outputs]
    keys = tf.nest.flatten({k: k for k in concrete.structured_outputs})
    by_key = dict(zip(keys, flat_names))
    input_nodes = [t.name.split(":")[0] for t in frozen.inputs]
    output_nodes = [by_key[k].split(":")[0] for k in signature.outputs]
    graph_def = _grappler_fold(graph_def, [t.name for t in frozen.inputs],
                               [by_key[k] for k in signature.outputs])
    graph_def = optimize_for_inference_lib.optimize_for_inference(
        graph_def, input_nodes, output_nodes,
        [spec.dtype.as_datatype_enum for spec in signature.inputs],
        toco_compatible=False,
    )
    path.write_bytes(graph_def.SerializeToString())
    return [by_key[k] for k in signature.outputs], [t.name for t in frozen.inputs]


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


"""ONNX through tf2onnx, FP16 through onnxconverter-common; their quirks live here.

* tf2onnx names graph outputs after TensorFlow tensors (``Identity:0``): they
  are renamed to the model's output names.
* Q/DQ of a QAT model must reach TensorRT intact, weights included: the
  converted graph is checked for weight ``DequantizeLinear`` nodes, and an
  export that lost them is refused rather than silently shipped in float.
* FP16: float16 inside, float32 at the inputs and outputs (or float16 there
  too, ``fp16_io``), with numerically sensitive ops kept in float32.
  onnxconverter-common declares an output float16 even with
  ``keep_io_types`` when a float32-kept op (a final Softmax) computes it:
  such outputs are made float32 again.
* tf2onnx deep-copies the whole graph, weights included, before each of its
  optimizer passes, so that it can roll back a pass that fails. The copies
  it drops are reference cycles, which Python frees only when its cycle
  collector runs, and that collector counts objects, not bytes: a large
  model piled up one dropped copy per pass (ResNet50V2 peaked at 7.2 GB,
  ResNet101V2 at 12.7 GB). For graphs with more than 32 MB of constants,
  the collector runs before each copy, and the copies share the weights
  (:class:`_CopiesSharingWeights`).
* Freezing and tf2onnx's ``from_graph_def`` held more copies of the weights
  than the conversion needs: TensorFlow's ``convert_variables_to_constants_v2``
  registers a function that keeps one for the life of the process, and
  from_graph_def keeps the GraphDef it was given and TensorFlow graphs
  imported with their weights to its end. tfopt calls their stages itself
  (``_saved_model.frozen_graph_def``, :func:`_from_graph_def`); a test holds the
  result to what the public functions give.
* Grappler (inside tf2onnx) held about 9 bytes per byte of weights: the
  weights are kept out of it (:func:`_weights_as_placeholders`).

Measured with ``benchmarks/export_memory.py --model ConvNeXtBase`` (table in
benchmarks/README.md), the whole export's peak: float 7.8 -> 5.2 -> 3.8 GB,
QAT to INT8 15.2 -> 9.9 -> 7.7 -> 5.0 GB (a QAT model is traced with its
weights as constants, ``quantization._wrapper.constant_weights``, so that
grappler has no per-weight range to fold).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfopt.errors import BackendUnavailableError, ExportValidationError
from tfopt.export import _saved_model
from tfopt.export._ort_quant import _set_nodes
from tfopt.export._signature import ModelSignature

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17

# Kept in float32 in FP16 exports, beyond onnxconverter-common's own list:
# reductions (normalization statistics), Softmax/Exp/Log and powers overflow
# or lose too much precision in float16.
FP32_OPS = [
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
]


def _require(module: str, extra: str = "onnx"):
    try:
        return __import__(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"ONNX export needs {module}: pip install 'tfopt[{extra}]'"
        ) from exc


def convert(serve, signature: ModelSignature, *, opset: int = DEFAULT_OPSET,
            quantized: bool = False):
    """Convert a serving ``tf.function`` to an ONNX ModelProto with named I/O.

    The function is frozen first (variables and captured tensors become
    constants) and tf2onnx converts the frozen GraphDef: handed the function
    itself, tf2onnx turns captured constants (a Normalization layer's mean
    and variance, say) into extra graph inputs.
    """
    _require("tf2onnx")
    concrete = serve.get_concrete_function()
    structured_outputs = concrete.structured_outputs
    graph_def, input_names, output_names = _saved_model.frozen_graph_def(concrete)
    graph_defs = [_inlinable(graph_def)]
    del graph_def, concrete
    proto = _from_graph_def(graph_defs, input_names, output_names, opset)
    _replace_erfc(proto)
    if opset >= 17:
        _fuse_layer_norms(proto)
    keys = tf.nest.flatten({k: k for k in structured_outputs})
    _rename_io(proto, dict(zip(input_names, signature.input_names)),
               dict(zip(output_names, keys)), signature.outputs)
    if quantized:
        store_weights_as_int8(proto)
        check_weight_qdq(proto)
    return proto


def _from_graph_def(graph_defs: list, input_names, output_names, opset: int):
    """tf2onnx's ``convert.from_graph_def``, step by step, holding fewer copies of the weights.

    The same stages with the same arguments (grappler, TensorFlow import,
    ``process_tf_graph``, the optimizer passes, ``make_model``), but:

    * the frozen GraphDef (``graph_defs``, a one-element list this function
      empties, so the caller holds no reference) is dropped once grappler has
      optimized it;
    * the weights are taken out of the optimized GraphDef before TensorFlow
      imports it (tf2onnx's ``compress_graph_def``, from its large-model
      path) and handed to ``process_tf_graph`` beside it, so the imported
      TensorFlow graph holds no copy of them;
    * ``from_graph_def`` also imports the graph once more to freeze a graph
      that is frozen already, and holds that graph to the end: skipped.
    """
    from tf2onnx import optimizer, tf_loader, tf_utils
    from tf2onnx.tfonnx import process_tf_graph

    graph_def = graph_defs.pop()
    weights = _weights_as_placeholders(graph_def)
    with tf.device("/cpu:0"), tf.Graph().as_default():  # grappler runs in graph mode
        optimized = tf_loader.tf_optimize(input_names, output_names, graph_def)
    del graph_def
    _placeholders_as_weights(optimized, weights)
    del weights
    large = _constant_bytes(optimized) >= _LARGE
    values = tf_utils.compress_graph_def(optimized)
    with tf.Graph().as_default() as tf_graph:
        tf.import_graph_def(optimized, name="")
        del optimized
        graph = process_tf_graph(tf_graph, continue_on_error=True, opset=opset,
                                 input_names=input_names, output_names=output_names,
                                 const_node_values=values)
        del values
        _scalar_addends_to_rank1(graph)
        with _collecting_between_optimizer_passes() if large else contextlib.nullcontext():
            graph = optimizer.optimize_graph(graph, catch_errors=True)
        _full_size_conv_biases(graph)
        proto = graph.make_model("converted from unknown")
    del graph, tf_graph
    if large:  # tf2onnx's graph, weights included, is a web of reference cycles
        gc.collect()
    return proto


def _scalar_addends_to_rank1(graph) -> None:
    """Give each 0-d constant added to a tensor of rank >= 1 the shape ``[1]``.

    tf2onnx's TransposeOptimizer, pushing an NCHW->NHWC Transpose past
    ``Conv -> Transpose -> Add(constant)`` to fold the constant into the Conv's
    bias, takes ``max()`` of the constant's shape: a 0-d constant (hard-sigmoid's
    ``x + 3.0`` in MobileNetV3) raises, and tf2onnx rolls the **whole** pass
    back. Every convolution then keeps its transposes, and a QAT graph's
    trained ranges sit on tensors ONNX Runtime's pre-processing folds away, so
    none of MobileNetV3's convolutions ran as an integer kernel. Broadcasting
    gives the same result with ``[1]`` for any input of rank 1 or more; the
    optimizer may then fold it into a Conv's bias (:func:`_full_size_conv_biases`).
    """
    for node in graph.get_nodes():
        if node.type != "Add" or len(node.input) != 2:
            continue
        constant = node.inputs[1]
        if constant is None or not constant.is_const():
            continue
        value = constant.get_tensor_value(as_list=False)
        rank = graph.get_rank(node.input[0])
        if value.ndim != 0 or rank is None or rank < 1:
            continue
        _set_constant_input(graph, node, 1, value.reshape([1]))


def _full_size_conv_biases(graph) -> None:
    """Widen a one-element Conv bias to the Conv's output channels.

    The TransposeOptimizer folds ``Add(constant of size 1)`` into a
    convolution's bias when it takes the weights to have one output channel:
    it reads that from the shape recorded on the weights' producer, which for
    a QAT graph's ``DequantizeLinear`` is still TensorFlow's HWIO layout, so a
    1x1 kernel looks like one channel. ONNX requires a bias of exactly M
    values; adding one value to every channel is the same sum.
    """
    for node in graph.get_nodes():
        if node.type not in ("Conv", "ConvTranspose") or len(node.input) != 3:
            continue
        bias = node.inputs[2]
        if bias is None or not bias.is_const():
            continue
        value = bias.get_tensor_value(as_list=False)
        if value.size != 1:
            continue
        weights = node.inputs[1]
        while weights is not None and weights.type in ("DequantizeLinear", "QuantizeLinear"):
            weights = weights.inputs[0]  # QAT: weights are DQ(Q(constant)) at this stage
        if weights is None or not weights.is_const():
            raise ExportValidationError(
                f"tf2onnx folded a one-value bias into {node.name!r} and its weights are not a "
                "constant, so their output channels are unknown; please report this model.")
        shape = weights.get_tensor_value(as_list=False).shape
        channels = shape[0] if node.type == "Conv" else shape[1] * (node.get_attr_value("group") or 1)
        if channels == 1:
            continue
        _set_constant_input(graph, node, 2, np.full([channels], value.reshape(()), value.dtype))


def _set_constant_input(graph, node, index: int, value) -> None:
    """Give ``node``'s constant input ``index`` the value ``value``, copying the constant
    first if other nodes read it too (they keep the old value)."""
    constant = node.inputs[index]
    if len(graph.find_output_consumers(constant.output[0])) > 1:
        constant = graph.copy_const(constant)
        graph.replace_input(node, node.input[index], constant.output[0], index)
    constant.set_tensor_value(value)


# Float constants of rank 2 or more (kernels, embedding tables) from this many bytes
# are kept out of grappler (see _weights_as_placeholders); vectors and small tensors,
# which grappler folds (BatchNormalization's statistics), are left in.
_GRAPPLER_WEIGHT_BYTES = 64 * 2**10
_FLOAT_TYPES = (tf.float32.as_datatype_enum, tf.float16.as_datatype_enum,
                tf.bfloat16.as_datatype_enum, tf.float64.as_datatype_enum)


def _weights_as_placeholders(graph_def) -> dict:
    """Replace the weights of a frozen GraphDef by placeholders of their shape, for grappler.

    Grappler (tf2onnx's ``tf_optimize``) holds several copies of the graph it
    is given, weights included: about 9 bytes per byte of weights for a float
    model, once the peak of the whole export (ConvNeXtXLarge's float export
    was killed for memory on a 24 GB machine). What grappler folds into a
    weight matrix, tf2onnx's own optimizer folds again (transposes and
    reshapes of constants; tf2onnx has grappler leave the Q/DQ of weights
    alone), and a test holds the ONNX graph to the one grappler gives with
    the weights (convolutions of each kind, dense, einsum, attention, a tied
    embedding; float and QAT). One difference is known: grappler drops an
    ``Add`` of an all-zero constant, which as a placeholder stays (the same
    values). So the large weights are taken out, and put back by
    :func:`_placeholders_as_weights`. Grappler still makes one zero-filled
    input for each placeholder.

    Returns ``{node name: AttrValue}``, the ``value`` attributes taken out.
    """
    from tensorflow.core.framework import attr_value_pb2

    taken = {}
    for node in graph_def.node:
        if node.op != "Const" or node.attr["dtype"].type not in _FLOAT_TYPES:
            continue
        tensor = node.attr["value"].tensor
        if len(tensor.tensor_shape.dim) < 2 or len(tensor.tensor_content) < _GRAPPLER_WEIGHT_BYTES:
            continue
        taken[node.name] = value = attr_value_pb2.AttrValue()
        value.CopyFrom(node.attr["value"])
        del node.attr["value"]
        node.op = "Placeholder"
        node.attr["shape"].shape.CopyFrom(value.tensor.tensor_shape)
    return taken


def _placeholders_as_weights(graph_def, taken: dict) -> None:
    """Put back the weights :func:`_weights_as_placeholders` took out (emptying ``taken``)."""
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in taken:
            node.op = "Const"
            del node.attr["shape"]
            node.attr["value"].CopyFrom(taken.pop(node.name))


# Above this many bytes of constants, the graph copies tf2onnx drops are collected
# before each pass. Below it they cost little memory, and a full collection in a
# process that holds many objects (a test session) costs more time than it saves.
_LARGE = 32 * 2**20


def _constant_bytes(graph_def) -> int:
    return sum(len(node.attr["value"].tensor.tensor_content)
               for node in graph_def.node if node.op == "Const")


class _CopiesSharingWeights:
    """Stands in for the ``copy`` module inside tf2onnx's optimizer loop.

    tf2onnx deep-copies the whole graph before each optimizer pass, to roll
    back a pass that fails. Here the cycle collector runs first, so the copy
    the last pass dropped (a reference cycle) is gone before the next one is
    made, and the copy shares the graph's large constants instead of
    duplicating them: no pass changes a constant in place (each sets a new
    value on its node), so a graph rolled back still holds its own.
    """

    def deepcopy(self, value, memo=None):
        memo = {} if memo is None else memo
        if hasattr(value, "get_nodes"):  # a tf2onnx Graph (the loop also copies a Counter)
            gc.collect()
            for node in value.get_nodes():
                attr = node.attr.get("value") if node.type == "Const" else None
                if attr is not None and 4 * int(np.prod(attr.t.dims)) >= _SHARED_CONSTANT_BYTES:
                    memo[id(attr)] = attr
        return copy.deepcopy(value, memo)


# Constants from this many bytes (counted as 4-byte elements) are shared between
# tf2onnx's graph and its backup copy.
_SHARED_CONSTANT_BYTES = 64 * 2**10


@contextlib.contextmanager
def _collecting_between_optimizer_passes():
    """Free the graph copy each tf2onnx optimizer pass drops before the next pass makes
    one, and make that copy share the weights (:class:`_CopiesSharingWeights`).

    See the module docstring. tf2onnx's optimizer loop calls ``copy.deepcopy``
    through its module's ``copy`` name; that name is replaced for the
    conversion and restored afterwards.
    """
    from tf2onnx import optimizer

    saved = optimizer.copy  # noqa: SLF001 (tf2onnx has no public hook)
    optimizer.copy = _CopiesSharingWeights()
    try:
        yield
    finally:
        optimizer.copy = saved
        gc.collect()


# Attributes that keep a function call out of grappler's inlining.
_NO_INLINE = ("_XlaMustCompile", "_noinline")


def _inlinable(graph_def):
    """Let grappler inline the functions Keras compiles with XLA, so tf2onnx sees their ops.

    Keras's TensorFlow backend runs grouped convolutions (ConvNeXt's
    depthwise ``Conv2D(groups=channels)``) inside a ``tf.function(jit_compile=True)``,
    because TensorFlow's CPU kernels lack them. The frozen graph keeps that
    call as a ``StatefulPartitionedCall`` marked for XLA, which grappler does
    not inline and tf2onnx copies through as an op ONNX does not have. ONNX
    has grouped convolutions, so the call is unmarked and inlined like any
    other: tf2onnx then converts the ``Conv2D`` inside to a grouped ``Conv``.
    """
    for node in graph_def.node:
        for key in _NO_INLINE:
            node.attr.pop(key, None)
    for function in graph_def.library.function:
        for key in _NO_INLINE:
            function.attr.pop(key, None)
    return graph_def


def _replace_erfc(proto) -> None:
    """Write TensorFlow's ``Erfc`` (exact GELU: ``0.5 x erfc(-x/sqrt 2)``) as ``1 - Erf``.

    tf2onnx 1.17 has no handler for ``Erfc`` and copies it through, but ONNX
    has no such operator, so the model would not load (ViT, DistilBERT and
    every other model with an exact GELU).
    """
    from onnx import helper, numpy_helper
    import numpy as np

    graph = proto.graph
    if not any(node.op_type == "Erfc" for node in graph.node):
        return
    one = "tfopt_erfc_one"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    nodes = []
    for node in graph.node:
        if node.op_type != "Erfc":
            nodes.append(node)
            continue
        erf_out = f"{node.output[0]}__erf"
        nodes.append(helper.make_node("Erf", [node.input[0]], [erf_out], name=f"{node.name}__erf"))
        nodes.append(helper.make_node("Sub", [one, erf_out], [node.output[0]], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _fuse_layer_norms(proto) -> int:
    """Write each Keras LayerNormalization as one ONNX ``LayerNormalization`` node.

    tf2onnx spells Keras 3's layer normalization (over the last axis) out as
    13 nodes: ``mean = GlobalAveragePool(x)``, ``var =
    GlobalAveragePool((x - mean)^2)``, ``r = 1 / Sqrt(var + eps)``, ``m = r *
    gamma``, then ``x * m + (beta - mean * m)``. ONNX Runtime recognizes none
    of them as a normalization (its fusion looks for ``ReduceMean``), so a
    BERT runs them one by one (a sixth of a small one's INT8 kernel time).
    ``GlobalAveragePool`` averages every axis from the third on, which is what
    ``LayerNormalization(axis=2)`` normalizes over, so the node computes the
    same up to float rounding. Only the whole pattern is replaced, with
    ``gamma``, ``beta`` and ``eps`` constants and no other reader of a
    tensor inside it; the output keeps its name. Returns how many were fused.
    """
    from onnx import helper, numpy_helper
    import numpy as np

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):  # Mul(d, d) reads d once
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only(tensor, op):
        """The single reader of ``tensor`` if it is an ``op`` and not a graph output."""
        readers = consumers.get(tensor, [])
        if len(readers) == 1 and readers[0].op_type == op and tensor not in outputs:
            return readers[0]
        return None

    def other(node, name):
        """The input of a two-input node that is not ``name`` (None if both are)."""
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    def constant(name):
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    replaced: dict[int, object] = {}  # id of the node the fused one takes the place of
    removed: set[int] = set()
    for mean_node in graph.node:
        if mean_node.op_type != "GlobalAveragePool" or id(mean_node) in removed:
            continue
        x, mean = mean_node.input[0], mean_node.output[0]
        readers = consumers.get(mean, [])
        sub = next((r for r in readers if r.op_type == "Sub" and list(r.input) == [x, mean]), None)
        neg = next((r for r in readers if r.op_type == "Neg"), None)
        if len(readers) != 2 or sub is None or neg is None or mean in outputs:
            continue
        square = only(sub.output[0], "Mul")
        if square is None or list(square.input) != [sub.output[0]] * 2:
            continue
        var_node = only(square.output[0], "GlobalAveragePool")
        add_eps = var_node and only(var_node.output[0], "Add")
        eps = add_eps and constant(other(add_eps, var_node.output[0]))
        sqrt = add_eps and only(add_eps.output[0], "Sqrt")
        recip = sqrt and only(sqrt.output[0], "Reciprocal")
        scale_node = recip and only(recip.output[0], "Mul")
        if scale_node is None or eps is None or np.size(eps) != 1:
            continue
        gamma = other(scale_node, recip.output[0])
        scaled = scale_node.output[0]
        pair = consumers.get(scaled, [])
        mul_x = next((r for r in pair if r.op_type == "Mul" and x in r.input), None)
        mul_mean = next((r for r in pair if r.op_type == "Mul" and neg.output[0] in r.input), None)
        if len(pair) != 2 or mul_x is None or mul_mean is None or scaled in outputs \
                or only(neg.output[0], "Mul") is not mul_mean or constant(gamma) is None:
            continue
        shift = only(mul_mean.output[0], "Add")
        beta = shift and other(shift, mul_mean.output[0])
        total = shift and only(shift.output[0], "Add")
        if total is None or constant(beta) is None or only(mul_x.output[0], "Add") is not total \
                or sorted(total.input) != sorted([mul_x.output[0], shift.output[0]]):
            continue
        names = []
        for role, name in (("scale", gamma), ("bias", beta)):
            value = constant(name)  # its own type: LayerNormalization's X, scale and bias share one
            while value.ndim > 1 and value.shape[0] == 1:  # [1, 1, H] -> [H]
                value = value[0]
            names.append(f"{total.output[0]}__tfopt_ln_{role}")
            graph.initializer.append(numpy_helper.from_array(value, names[-1]))
        fused = helper.make_node(
            "LayerNormalization", [x, *names], [total.output[0]], axis=2,
            epsilon=float(np.asarray(eps).reshape(())), name=f"{total.name}__tfopt_layer_norm")
        chain = (mean_node, sub, square, var_node, add_eps, sqrt, recip, scale_node, neg,
                 mul_x, mul_mean, shift, total)
        removed.update(id(n) for n in chain)
        replaced[id(total)] = fused
    if not replaced:
        return 0
    _set_nodes(graph, [replaced.get(id(n), n) for n in graph.node
                       if id(n) not in removed or id(n) in replaced])
    return len(replaced)


def _rename_io(proto, inputs: dict[str, str], outputs: dict[str, str], order) -> None:
    """Rename graph inputs and outputs, and order outputs like ``order``."""
    graph = proto.graph
    rename = {old: new for old, new in {**inputs, **outputs}.items() if old != new}
    for node in graph.node:
        node.output[:] = [rename.get(n, n) for n in node.output]
        node.input[:] = [rename.get(n, n) for n in node.input]
    for value in list(graph.input) + list(graph.output):
        value.name = rename.get(value.name, value.name)
    ordered = sorted(graph.output, key=lambda o: list(order).index(o.name)
                     if o.name in order else len(order))
    copies = [type(o)() for o in ordered]
    for copy, original in zip(copies, ordered):
        copy.CopyFrom(original)
    del graph.output[:]
    graph.output.extend(copies)


def check_weight_qdq(proto) -> dict[str, int]:
    """Count Q/DQ and weight DQ of a QAT export; refuse one whose weights lost theirs."""
    initializers = {i.name for i in proto.graph.initializer}
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weight_dequantize": 0}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] += 1
        if node.op_type == "DequantizeLinear":
            source = producers.get(node.input[0])
            feeds_from_constant = node.input[0] in initializers or node.input[0] in constants or (
                source is not None and source.op_type == "QuantizeLinear"
                and (source.input[0] in initializers or source.input[0] in constants))
            if feeds_from_constant:
                counts["weight_dequantize"] += 1
    if counts["weight_dequantize"] == 0:
        raise ExportValidationError(
            "The ONNX export of this QAT model has no Q/DQ on its weights (the converter "
            "folded them), so TensorRT would build it in float. Please report this with "
            "your tf2onnx version."
        )
    return counts


def store_weights_as_int8(proto) -> int:
    """Replace ``QuantizeLinear(float weight)`` by the int8 weight it computes.

    The graph then holds each quantized weight once, as int8 feeding its
    ``DequantizeLinear`` (the form ONNX Runtime's and NVIDIA's tools write,
    about 4x smaller), instead of float32 quantized at every run. Returns
    the number of weights converted.
    """
    import numpy as np
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    converted, keep = 0, []
    for node in proto.graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if source is None or consumers.get(source.name) != 1 or len(node.input) < 3:
            keep.append(node)
            continue
        weight = numpy_helper.to_array(source).astype(np.float32)
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(initializers[node.input[2]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            shape = [1] * weight.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        quantized = np.clip(np.rint(weight / scale) + zero.astype(np.int32), info.min, info.max)
        proto.graph.initializer.remove(source)
        proto.graph.initializer.append(
            numpy_helper.from_array(quantized.astype(zero.dtype), node.output[0]))
        converted += 1
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return converted


def to_fp16(proto, fp16_io: bool = False):
    """Float16 inside, sensitive ops in float32; float32 inputs/outputs unless ``fp16_io``.

    With ``fp16_io`` the graph's float inputs and outputs are float16 as well:
    no Cast of the whole input batch at the start (nor of the outputs at the
    end), for servers that keep their batches in float16 on the GPU. An
    output computed by an op kept in float32 (a final Softmax) is cast to
    float16 after it.
    """
    _require("onnxconverter_common")
    from onnxconverter_common import float16

    import onnx

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    float_outputs = {o.name for o in proto.graph.output
                     if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(proto, keep_io_types=not fp16_io,
                                                     op_block_list=block)
    _summarize_truncation(caught)
    if not fp16_io:
        _float32_outputs(converted, float_outputs)
    return converted


def _float32_outputs(proto, names) -> None:
    """Give float32 back to the outputs ``names`` that onnxconverter-common left in float16.

    With ``keep_io_types=True`` it still declares an output float16 when the
    op computing it is kept in float32 (a final Softmax): it casts the
    float32 result to float16 at the very end. That Cast is removed (the
    float32 result becomes the output); any other float16 output gets a
    Cast to float32.
    """
    import onnx
    from onnx import helper

    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for output in graph.output:
        if output.name not in names or \
                output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(output.name)
        source = node.input[0] if node is not None and node.op_type == "Cast" else None
        source_producer = producers.get(source)
        if source is not None and consumers.get(source) == 1 and source_producer is not None \
                and source_producer.op_type != "Cast" and _is_float32(graph, source):
            graph.node.remove(node)
            source_producer.output[:] = [output.name if o == source else o
                                         for o in source_producer.output]
        else:
            inner = f"{output.name}__float16"
            for other in graph.node:
                other.output[:] = [inner if o == output.name else o for o in other.output]
                other.input[:] = [inner if i == output.name else i for i in other.input]
            graph.node.append(helper.make_node("Cast", [inner], [output.name],
                                               name=f"{output.name}__to_float32",
                                               to=onnx.TensorProto.FLOAT))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _is_float32(graph, name: str) -> bool:
    """Whether ``name`` is float32: the output of a Cast to float32, or of an op kept in float32."""
    import onnx

    for info in graph.value_info:
        if info.name == name:
            return info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None:
        return False
    if producer.op_type == "Cast":
        return any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in producer.attribute)
    # An op whose inputs are all cast to float32 computes in float32 (a blocked op).
    casts = [next((n for n in graph.node if i in n.output), None) for i in producer.input]
    return bool(casts) and all(c is not None and c.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in c.attribute) for c in casts)


def edge_casts(proto) -> dict[str, int]:
    """How many Cast nodes read a graph input or write a graph output.

    What ``fp16_io`` removes: at batch 256 of 224x224x3 images the input
    Cast alone reads 154 MB and writes 77 MB per call.
    """
    inputs = {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    return {"inputs": sum(any(name in inputs for name in n.input) for n in casts),
            "outputs": sum(any(name in outputs for name in n.output) for n in casts)}


def io_dtypes(proto) -> dict[str, str]:
    """``{graph input or output name: numpy dtype name}``."""
    import onnx

    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            for v in list(proto.graph.input) + list(proto.graph.output)}


_TRUNCATED = re.compile(r"the float32 number (\S+) will be truncated to (\S+)")


def _summarize_truncation(caught) -> None:
    """onnxconverter-common warns once per clipped constant: say it once, with the range."""
    tiny, huge, others = [], [], []
    for item in caught:
        match = _TRUNCATED.search(str(item.message))
        if match is None:
            others.append(item)
            continue
        value, limit = abs(float(match.group(1))), abs(float(match.group(2)))
        (tiny if value <= limit else huge).append(value)
    parts = []
    if tiny:
        parts.append(f"{len(tiny)} with magnitudes down to {min(tiny):.3g} raised to "
                     "float16's smallest normal-range value 1e-07")
    if huge:
        parts.append(f"{len(huge)} with magnitudes up to {max(huge):.3g} clipped to "
                     "+-1e+04")
    if parts:
        warnings.warn("FP16 ONNX export: constants outside float16's range were clipped: "
                      + "; ".join(parts) + ". Check the fp16 validation error in the result; "
                      "export fp32 if it is too large.", UserWarning, stacklevel=3)
    for item in others:
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def save(proto, path: Path) -> None:
    """Write ``proto`` and check the file (checked from the file, the check holds no second
    serialized copy of the model in memory beside the one written)."""
    import onnx

    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def session(path: Path, providers=("CPUExecutionProvider",)):
    """A quiet ONNX Runtime session whose threads sleep between runs (see tfopt.artifacts)."""
    ort = _require("onnxruntime")
    from tfopt.artifacts._ort import default_session_options

    return ort.InferenceSession(str(path), default_session_options(), providers=list(providers))

"""INT8 ONNX for ONNX Runtime's CPU provider, written by ONNX Runtime's own quantizer.

tfopt's QAT graph, as tf2onnx converts it, puts Q/DQ where TensorRT wants
them (:mod:`tfopt.targets._tensorrt`): on the inputs and weights of each
convolution, with BatchNormalization and ReLU left between one convolution
and the next Q. TensorRT fuses all of that when it builds an engine; ONNX
Runtime's CPU provider fuses only the node units
:mod:`tfopt.targets._onnxruntime` lists, and runs anything else in float,
dequantizing its weights at every call. This module is the mechanics of
writing the file; the rules it follows (which ops to quantize, on which
grids, which nodes stay float) are read from that module.

So the CPU placement is rewritten from the QAT graph here, in three steps:

1. :func:`dequantize`: the float graph the QAT model computes (weights
   replaced by their fake-quantized values, activation Q/DQ pairs removed),
   and the trained range of every activation QAT quantized.
2. ``quant_pre_process`` folds BatchNormalization into the convolutions.
   With per-channel weight scales this is exact: each channel's int8
   weights stay what QAT trained, and the channel's scale absorbs BN's
   factor.
3. ``quantize_static`` (QDQ format, the writer whose output ONNX Runtime's
   fusions are written against) quantizes the folded graph with the QAT
   ranges imposed through ``TensorQuantOverrides``: tensors QAT quantized
   keep QAT's range: int8 with zero point 0 and scale ``s`` becomes uint8
   with zero point 128 and scale ``s``, QAT's grid exactly. After a ReLU,
   uint8 with zero point 0, so that ONNX Runtime absorbs the ReLU, and scale
   ``127 s / 255``: uint8 saturates where QAT does, on a grid twice as fine.
   Tensors QAT left alone between two quantized ops (a residual sum, a
   pooling, a swish) are calibrated on the export's data, as ONNX Runtime's
   post-training quantizer does. Convolutions and matrix products QAT left
   in float stay in float, and the graph's outputs stay float.

So the file departs from the QAT model by at most half of QAT's step on a
tensor after a ReLU (rounded on the finer grid), toward float, and nowhere
else but the roundings ONNX Runtime adds (BatchNorm folded into the weights,
tensors QAT left float between two integer kernels, int32 biases at the
input-times-weight scale). Saturating at twice the trained maximum instead
(uint8 at QAT's step) would keep QAT's grid, but a QAT model whose ranges
clip, which a short fine-tune of a wide ``Flatten -> Dense`` leaves, would
then compute something else entirely (VGG16 was 100% off).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from tfopt.errors import BackendUnavailableError
from tfopt.targets._onnxruntime import (COMPUTE_OPS, INTEGER_OPS, KERNEL_OPS, LAYOUT,
                                        QUANTIZABLE_OPS, VALUE_PRESERVING, activation_grid,
                                        nodes_left_in_float, weight_reduce_range)

logger = logging.getLogger(__name__)

def _require_quantization():
    try:
        from onnxruntime import quantization  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "The ONNX Runtime INT8 placement needs onnxruntime: pip install 'tfopt[onnx]'."
        ) from exc


@dataclasses.dataclass
class QatGraph:
    """The float graph a QAT model computes, and the ranges QAT trained."""

    proto: object  # onnx.ModelProto, float (None once quantize_for_cpu has written it)
    ranges: dict[str, float]  # tensor name -> trained absolute maximum
    per_channel: bool  # whether QAT's weight scales are per output channel
    # Weights QAT quantized per tensor (an EinsumDense kernel with several output axes):
    # ONNX Runtime must keep them per tensor, or it re-rounds them onto another grid.
    per_tensor_weights: frozenset = frozenset()
    # tensor -> the nodes that read it rounded (through its DQ) in the QAT graph; the
    # tensor's other readers (a residual branch) read it unrounded, as in Keras
    rounded_readers: dict = dataclasses.field(default_factory=dict)
    # the largest |int8 weight| QAT trained: within PORTABLE_WEIGHT_MAX, the file is
    # written on ONNX Runtime's reduce_range grid, which is QAT's then
    largest_weight: int = 127
    # lookup tables QAT quantized per row: float initializer -> (int8 rows, row scales);
    # the file stores them as int8 (see _int8_tables)
    tables: dict = dataclasses.field(default_factory=dict)


def dequantize(proto) -> QatGraph:
    """Remove the Q/DQ of a tfopt QAT ONNX graph, keeping what they computed.

    Weights become float initializers holding the fake-quantized values
    (``int8 * scale``), activation ``Q -> [layout ops] -> DQ`` chains become
    the layout ops alone, and each activation's trained range (``127 *
    scale``, symmetric int8 with zero point 0) is kept by tensor name, for
    the quantized tensor and for what the layout ops make of it.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # leave the caller's alone
    graph = proto.graph
    _fold_constant_layout(graph)
    _dequantize_gathered_tables(graph)
    initializers = {i.name: i for i in graph.initializer}

    def array(name):
        return numpy_helper.to_array(initializers[name])

    def fake_quantized(values, node):
        scale = array(node.input[1]).astype(np.float32)
        zero = array(node.input[2]).astype(np.float32) if len(node.input) > 2 else np.float32(0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape)
        return scale, zero

    producers = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    ranges: dict[str, float] = {}
    removed: set[int] = set()
    weights = []
    per_channel = False
    per_tensor = set()
    largest = 0
    tables = {}
    index = _GraphIndex(graph)
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        quantize = producers.get(source)
        if source in initializers and _is_table(index, node):  # an embedding, per row
            quantized = array(source)
            scale, zero = fake_quantized(quantized.astype(np.float32), node)
            tables[node.output[0]] = (quantized, scale.reshape(-1))
            weights.append(numpy_helper.from_array(
                (quantized.astype(np.float32) * scale).astype(np.float32), node.output[0]))
            removed.add(id(node))
            continue
        if source in initializers:  # an int8 weight
            quantized = array(source).astype(np.float32)
            largest = max(largest, int(np.max(np.abs(quantized), initial=0)))  # zero point 0
            scale, zero = fake_quantized(quantized, node)
            value = (quantized - zero) * scale
        elif quantize is not None and quantize.op_type == "QuantizeLinear" \
                and quantize.input[0] in initializers:  # a float weight quantized at run time
            weight = array(quantize.input[0]).astype(np.float32)
            scale, zero = fake_quantized(weight, quantize)
            info = np.iinfo(array(quantize.input[2]).dtype)
            levels = np.clip(np.rint(weight / scale) + zero, info.min, info.max) - zero
            largest = max(largest, int(np.max(np.abs(levels), initial=0)))
            value = levels * scale
            removed.add(id(quantize))
        else:  # an activation: its Q is handled below
            # The int8 tensor may come out of ops tf2onnx moved between Q and DQ (a
            # Concat of quantized inputs): it carries this DQ's range too.
            step = float(np.max(array(node.input[1])))
            ranges[source] = max(ranges.get(source, 0.0), 127.0 * step)
            rename[node.output[0]] = source
            removed.add(id(node))
            continue
        per_channel = per_channel or np.size(scale) > 1
        if np.size(scale) == 1:
            per_tensor.add(node.output[0])
        weights.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        removed.add(id(node))
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and id(node) not in removed:
            scale = float(array(node.input[1]))
            ranges[node.input[0]] = max(ranges.get(node.input[0], 0.0), 127.0 * scale)
            rename[node.output[0]] = node.input[0]
            removed.add(id(node))

    def resolve(name):
        while name in rename:
            name = rename[name]
        return name

    kept = [n for n in graph.node if id(n) not in removed]
    rounded_readers = collections.defaultdict(set)
    for node in kept:
        for name in node.input:
            if name in rename:  # read through a removed DQ: rounded in the QAT model
                rounded_readers[resolve(name)].add(node.name)
        node.input[:] = [resolve(i) for i in node.input]
        if node.op_type in LAYOUT and node.input[0] in ranges:
            ranges[node.output[0]] = ranges[node.input[0]]
    # A range trained after a value-preserving op (ZeroPadding2D before a strided
    # convolution) holds for its input too; folding may fuse the op away (a Pad
    # into the Conv's pads), and the range must survive it.
    for node in reversed(kept):  # graph order is topological: walk it backwards
        if node.op_type in VALUE_PRESERVING and node.output[0] in ranges \
                and node.input[0] not in ranges and node.input[0] not in initializers:
            ranges[node.input[0]] = ranges[node.output[0]]
    graph.initializer.extend(weights)
    del graph.value_info[:]  # layout ops between Q and DQ were typed int8; shapes are re-inferred
    _set_nodes(graph, kept)
    _transpose_before_pad(graph, ranges)
    _pad_into_max_pool(graph, ranges)
    return QatGraph(proto, ranges, per_channel, frozenset(per_tensor),
                    {k: frozenset(v) for k, v in rounded_readers.items()}, largest, tables)


# How a lookup table is read: the rows it selects (Gather on axis 0) or a block of
# them (Slice: a position table cut to the sequence's length).
_LOOKUPS = {"Gather", "Slice"}


def _is_table(index: "_GraphIndex", dq) -> bool:
    """Whether a weight's DequantizeLinear is a per-row table that is only looked up.

    Its every reader is a lookup taking it as the data input, or a Q (the
    activation quantizer of the lookup's output, which tf2onnx moves ahead of
    the lookup) read only by lookups.
    """
    from onnx import numpy_helper

    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    scale = index.initializers.get(dq.input[1])
    zero = index.initializers.get(dq.input[2]) if dq.input[2:] and dq.input[2] else None
    if axis != 0 or scale is None or len(scale.dims) != 1 \
            or (dq.input[2:] and dq.input[2] and zero is None) \
            or (zero is not None and np.any(numpy_helper.to_array(zero) != 0)):
        return False  # QAT's tables are symmetric: int8 values times one scale per row
    readers = index.consumers[dq.output[0]]

    def lookup(node, name):
        return node.op_type in _LOOKUPS and node.input[0] == name and not any(
            a.name == "axis" and a.i != 0 for a in node.attribute)

    return bool(readers) and all(
        lookup(r, dq.output[0]) or (r.op_type == "QuantizeLinear" and index.consumers[r.output[0]]
                                    and all(lookup(c, r.output[0])
                                            for c in index.consumers[r.output[0]]))
        for r in readers)


class _GraphIndex:
    """Who makes and who reads each tensor of a graph, taken once before a rewrite."""

    def __init__(self, graph):
        self.initializers = {i.name: i for i in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.readers = collections.Counter(i for n in graph.node for i in n.input)
        self.consumers = collections.defaultdict(list)  # tensor -> the nodes that read it
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}

    def lone_constant_pad(self, name: str):
        """The Pad that makes ``name``, with its pads, if moving or folding it is safe.

        That is: constant mode, pads an initializer over every axis (no
        ``axes`` input), and its output read by one node only and not a graph
        output. Else ``None``.
        """
        from onnx import numpy_helper

        pad = self.producers.get(name)
        if pad is None or pad.op_type != "Pad" or len(pad.input) < 2 \
                or pad.input[1] not in self.initializers or (len(pad.input) > 3 and pad.input[3]) \
                or self.readers[pad.output[0]] != 1 or pad.output[0] in self.outputs \
                or any(a.name == "mode" and a.s not in (b"", b"constant") for a in pad.attribute):
            return None
        return pad, numpy_helper.to_array(self.initializers[pad.input[1]]).astype(np.int64)


def _transpose_before_pad(graph, ranges: dict[str, float]) -> None:
    """``Pad -> Transpose`` becomes ``Transpose -> Pad``, so the Pad can fold into a Conv.

    tf2onnx moves the NHWC->NCHW Transpose of a float graph above a
    ZeroPadding2D, and ONNX Runtime then folds the Pad into the next
    convolution's pads. In a QAT graph the Q/DQ pair between them stopped
    it: with the pair removed, ResNet50's stem pads 224x224x3 in float and
    re-quantizes it at every call. Ranges carry over (neither op changes a
    value).
    """
    from onnx import helper, numpy_helper

    index = _GraphIndex(graph)
    nodes = list(graph.node)
    written = {i.name for i in graph.initializer}
    for transpose in [n for n in nodes if n.op_type == "Transpose"]:
        found = index.lone_constant_pad(transpose.input[0])
        if found is None:
            continue
        pad, pads = found
        perm = next(list(a.ints) for a in transpose.attribute if a.name == "perm")
        rank = len(perm)
        moved = np.concatenate([pads[:rank][perm], pads[rank:][perm]])
        pads_name = f"{pad.input[1]}_tfopt_transposed_{'_'.join(map(str, perm))}"
        if pads_name not in written:  # Pads may share one constant (and so one moved copy)
            graph.initializer.append(numpy_helper.from_array(moved, pads_name))
            written.add(pads_name)
        transposed = f"{pad.input[0]}_tfopt_transposed"
        new_transpose = helper.make_node("Transpose", [pad.input[0]], [transposed],
                                         name=transpose.name, perm=perm)
        new_pad = helper.make_node("Pad", [transposed, pads_name, *pad.input[2:]],
                                   [transpose.output[0]], name=pad.name)
        new_pad.attribute.extend(pad.attribute)
        at = nodes.index(pad)
        nodes[at:at + 1] = [new_transpose, new_pad]
        nodes.remove(transpose)
        known = [ranges[n] for n in (pad.input[0], pad.output[0], transpose.output[0])
                 if n in ranges]
        ranges.pop(pad.output[0], None)  # that tensor is gone
        if known:
            ranges.setdefault(transposed, known[0])
            ranges.setdefault(transpose.output[0], known[0])
    _set_nodes(graph, nodes)


def _pad_into_max_pool(graph, ranges: dict[str, float]) -> None:
    """Zero padding of a ReLU's output before a max pooling becomes the pooling's own pads.

    ResNet pads its stem's ReLU output with zeros before a 3x3 max pooling.
    Zero is the least a ReLU gives, so the maximum over each window is the
    same whether the zeros are there or the window skips padded positions
    (ONNX MaxPool's pads) as long as no window lies wholly in the padding.
    Kept, the Pad runs in float between a DQ and a Q on the stem's largest
    tensor: about 2.5% of ResNet50's time at batch 1.
    """
    from onnx import helper, numpy_helper

    index = _GraphIndex(graph)

    def zero(name):
        return name in index.initializers \
            and not numpy_helper.to_array(index.initializers[name]).any()

    nodes = list(graph.node)
    for pool in [n for n in nodes if n.op_type == "MaxPool" and len(n.output) == 1]:
        found = index.lone_constant_pad(pool.input[0])
        if found is None:
            continue
        pad, pads = found
        if len(pad.input) > 2 and pad.input[2] and not zero(pad.input[2]):
            continue  # pads with a value other than zero
        source = index.producers.get(pad.input[0])
        if source is None or source.op_type != "Relu":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
        kernel = list(attrs["kernel_shape"])
        rank = len(kernel) + 2
        begin, end = pads[:rank], pads[rank:]
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") \
                or attrs.get("ceil_mode", 0) or begin[:2].any() or end[:2].any() \
                or (pads < 0).any():
            continue  # batch or channel padding, or windows past the end
        own = list(attrs.get("pads", [0] * 2 * len(kernel)))
        merged = [int(a + b) for a, b in zip(list(begin[2:]) + list(end[2:]), own)]
        if any(p >= k for p, k in zip(merged, kernel + kernel)):
            continue  # a window could lie wholly in the padding
        for attribute in list(pool.attribute):
            if attribute.name in ("pads", "auto_pad"):
                pool.attribute.remove(attribute)
        pool.attribute.append(helper.make_attribute("pads", merged))
        pool.input[0] = pad.input[0]
        nodes.remove(pad)
        ranges.pop(pad.output[0], None)  # that tensor is gone
    _set_nodes(graph, nodes)


def _inferred_shapes(graph) -> dict[str, list]:
    """Each tensor's shape as shape inference left it: ints, and ``None`` for a dimension
    known only by name (the batch) or not at all."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim]
            for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.tensor_type.HasField("shape")}


def _constant_reshape_targets(graph, ranges: dict[str, float]) -> int:
    """A Reshape whose target shape is computed at run time gets it as a constant, where
    the inferred output shape leaves at most one dimension unknown (it becomes ``-1``).

    tf2onnx usually folds Keras's ``Flatten`` (``Shape -> Slice -> Concat ->
    Reshape``, the batch read at run time) into ``Reshape(x, [-1, n])``, but not
    always: the same model kept the computed target in 2 of 52 exports (the order
    its optimizers meet the nodes in varies between runs). The rewrites after this one
    read the graph as it is in the usual case (a classifier head read only by
    layout ops), and the ops computing the target are gone at run time.
    Returns how many Reshapes it changed.
    """
    from onnx import numpy_helper

    initializers = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    shapes = _inferred_shapes(graph)
    computed = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in initializers \
                or node.input[1] in inputs:
            continue
        target = shapes.get(node.output[0])
        if not target or target.count(None) > 1 or 0 in target \
                or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        computed.append(node.input[1])
        node.input[1] = f"{node.output[0]}_tfopt_target"
        graph.initializer.append(numpy_helper.from_array(
            np.asarray([-1 if d is None else d for d in target], np.int64), node.input[1]))
    changed = len(computed)
    if not changed:
        return 0
    # Drop what computed the targets, back from them, as long as nothing else reads it.
    producers = {o: n for n in graph.node for o in n.output}
    readers = collections.Counter(name for n in graph.node for name in _names_read(n))
    readers.update(o.name for o in graph.output)
    dropped = set()
    while computed:
        node = producers.get(computed.pop())
        if node is None or id(node) in dropped or any(readers[o] for o in node.output):
            continue
        dropped.add(id(node))
        readers.subtract(_names_read(node))
        computed.extend(node.input)
        for name in node.output:
            ranges.pop(name, None)
    _set_nodes(graph, [n for n in graph.node if id(n) not in dropped])
    return changed


# Ops whose output a per-channel affine (a BatchNormalization with no convolution
# before it) may follow, and that ONNX Runtime runs on uint8: DenseNet's
# concatenations, the pooling before ResNetV2's pre-activation BatchNorm.
_AFFINE_SOURCES = {"Concat", "MaxPool", "AveragePool"}


def _channel_affines_as_depthwise(graph) -> set[str]:
    """A per-channel ``Mul`` (and ``Add``) after a concatenation or a pooling becomes a
    depthwise 1x1 convolution.

    That is a BatchNormalization with no convolution before it to fold into
    (DenseNet's after each concatenation). tf2onnx writes it as ``x * a +
    b`` with per-channel constants, which ONNX Runtime runs in float, with a
    Transpose back to NCHW around it and the concatenation in float too. As
    a depthwise convolution (weight ``a``, bias ``b``) it is an integer
    kernel: each channel's factor is its own per-channel int8 weight, exact
    on the grid (one value per channel lands on the grid's end), the
    concatenation before it runs as ``QLinearConcat`` and a ReLU after it is
    absorbed. Only the concatenation's output gets a rounding the QAT model
    does not have (calibrated, as the convolution outputs that join it are).

    Returns the inputs of the new convolutions: tensors to be calibrated,
    where the rest of the placement quantizes only tensors QAT trained a
    range for.
    """
    from onnx import helper, numpy_helper

    index = _GraphIndex(graph)
    initializers, producers = index.initializers, index.producers
    consumers, outputs = index.consumers, index.outputs
    shapes = _inferred_shapes(graph)

    def per_channel(name: str, channels: int):
        if name not in initializers:
            return None
        value = numpy_helper.to_array(initializers[name])
        if value.ndim not in (3, 4) or value.size != channels \
                or value.shape[-3] != channels:  # (C, 1, 1) or (1, C, 1, 1): NCHW's axis 1
            return None
        return value.reshape(channels).astype(np.float32)

    replaced, calibrated, nodes = {}, set(), []
    for node in graph.node:
        if node.op_type != "Mul" or id(node) in replaced:
            continue
        x = next((i for i in node.input if i not in initializers), None)
        shape = shapes.get(x)
        source = producers.get(x)
        if x is None or source is None or source.op_type not in _AFFINE_SOURCES \
                or shape is None or len(shape) != 4 or shape[1] is None:
            continue
        channels = shape[1]
        factor = per_channel(next(i for i in node.input if i != x), channels)
        if factor is None or not np.all(factor != 0) or node.output[0] in outputs:
            continue
        bias, last = np.zeros(channels, np.float32), node
        readers = consumers[node.output[0]]
        if len(readers) == 1 and readers[0].op_type == "Add":
            offset = next((per_channel(i, channels) for i in readers[0].input
                           if i != node.output[0]), None)
            if offset is not None:
                bias, last = offset, readers[0]
        name = f"{node.output[0]}_tfopt_depthwise"
        graph.initializer.extend([
            numpy_helper.from_array(factor.reshape(channels, 1, 1, 1), f"{name}_weight"),
            numpy_helper.from_array(bias, f"{name}_bias")])
        conv = helper.make_node("Conv", [x, f"{name}_weight", f"{name}_bias"], [last.output[0]],
                                name=name, group=channels, kernel_shape=[1, 1])
        replaced[id(node)] = conv
        replaced[id(last)] = None if last is not node else conv
        calibrated.add(x)
    if not calibrated:
        return calibrated
    for node in graph.node:
        if id(node) not in replaced:
            nodes.append(node)
        elif replaced[id(node)] is not None:
            nodes.append(replaced[id(node)])
    _set_nodes(graph, nodes)
    return calibrated


def _names_read(node) -> set[str]:
    """The tensors a node reads, its subgraphs' (If, Loop) included."""
    read = set(node.input) - {""}
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
            for inner in subgraph.node:
                read |= _names_read(inner)
    return read


def _pointwise_head_as_matmul(graph, ranges: dict[str, float]) -> dict[str, str]:
    """A 1x1 convolution over a 1x1 map that only layout ops read becomes Flatten -> MatMul.

    That is a classifier head written as a convolution (MobileNet, MobileNetV3:
    ``Conv2D(classes, 1)`` after global pooling, then ``Flatten``). ONNX
    Runtime runs a Conv as an integer kernel only if its output is quantized,
    and tfopt keeps the model's outputs float, so the head ran in float: with
    float weights read at every call, the largest layer of MobileNetV3Small at
    batch 1 (1024x1000). The same product as a MatMul runs as
    ``MatMulIntegerToFloat``, int8 in and float out. The result is reshaped
    back to the convolution's output shape, so what reads it is unchanged.

    Needs the input's shape (``quant_pre_process`` infers it). Returns
    ``{convolution weight: matrix weight}`` for the weights it rewrote.
    """
    from onnx import helper, numpy_helper

    index = _GraphIndex(graph)
    shapes = _inferred_shapes(graph)
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    nodes, rewritten = [], {}
    for conv in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        weight = index.initializers.get(conv.input[1]) if conv.op_type == "Conv" else None
        kernel = numpy_helper.to_array(weight) if weight is not None else None
        x_shape = shapes.get(conv.input[0])
        if kernel is None or kernel.ndim < 3 or any(d != 1 for d in kernel.shape[2:]) \
                or attrs.get("group", 1) != 1 or any(attrs.get("pads", [])) \
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") \
                or not x_shape or len(x_shape) != kernel.ndim or any(d != 1 for d in x_shape[2:]) \
                or conv.output[0] in ranges or conv.output[0] in index.outputs \
                or not readers[conv.output[0]] \
                or any(r.op_type not in LAYOUT for r in readers[conv.output[0]]):
            nodes.append(conv)
            continue
        channels = kernel.shape[0]
        x, flat = conv.input[0], f"{conv.output[0]}_tfopt_flat"
        matrix = f"{conv.input[1]}_tfopt_matmul"
        product, target = f"{conv.output[0]}_tfopt_matmul", f"{conv.output[0]}_tfopt_shape"
        graph.initializer.extend([
            numpy_helper.from_array(kernel.reshape(channels, -1).T.copy(), matrix),
            numpy_helper.from_array(np.asarray([0, channels] + [1] * (kernel.ndim - 2), np.int64),
                                    target)])
        chain = [helper.make_node("Flatten", [x], [flat], name=conv.name, axis=1),
                 helper.make_node("MatMul", [flat, matrix], [product], name=f"{conv.name}_matmul")]
        if len(conv.input) > 2 and conv.input[2]:
            # The bias is added after the Reshape, in the convolution's layout: added to
            # the MatMul's output, ONNX Runtime fuses the two into a float Gemm before its
            # integer fusions run (seen when the bias is computed, not an initializer).
            shaped, bias = f"{product}_shaped", f"{conv.output[0]}_tfopt_bias"
            bias_shape = f"{conv.output[0]}_tfopt_bias_shape"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray([channels] + [1] * (kernel.ndim - 2), np.int64), bias_shape))
            chain += [
                helper.make_node("Reshape", [product, target], [shaped],
                                 name=f"{conv.name}_reshape"),
                helper.make_node("Reshape", [conv.input[2], bias_shape], [bias],
                                 name=f"{conv.name}_bias_reshape"),
                helper.make_node("Add", [shaped, bias], [conv.output[0]],
                                 name=f"{conv.name}_bias")]
        else:
            chain.append(helper.make_node("Reshape", [product, target], [conv.output[0]],
                                          name=f"{conv.name}_reshape"))
        nodes.extend(chain)
        if x in ranges:
            ranges[flat] = ranges[x]
        rewritten[conv.input[1]] = matrix
    if rewritten:
        _set_nodes(graph, nodes)
    return rewritten


def _set_nodes(graph, nodes) -> None:
    """Make ``nodes`` the graph's nodes, and drop the initializers none of them reads."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


def _fold_constant_layout(graph) -> None:
    """Apply layout ops whose inputs are all initializers (tf2onnx reshapes int8 weights
    between the initializer and its DequantizeLinear), so each weight DQ reads an initializer."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    initializers = {i.name: i for i in graph.initializer}
    kept = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in LAYOUT and inputs and all(i in initializers for i in inputs):
            values = ReferenceEvaluator(node).run(
                None, {i: numpy_helper.to_array(initializers[i]) for i in inputs})
            folded = numpy_helper.from_array(np.asarray(values[0]), node.output[0])
            graph.initializer.append(folded)
            initializers[folded.name] = folded
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


# Ops that select or rearrange the elements of their first input: an int8 table read
# through them (an embedding lookup, a position table sliced and broadcast) keeps
# its DQ after them.
_SELECTING = LAYOUT | {"Gather", "Slice", "Expand", "Tile", "Identity"}


def _dequantize_gathered_tables(graph) -> None:
    """Float tables for int8 tables read through a Gather (or Slice, Expand...) ahead of their DQ.

    tf2onnx moves a Q on an embedding lookup's output into the table itself
    (``Gather(Q(table))``, or ``Expand(Slice(Q(table)))`` for a position
    embedding) and folds it, leaving an int8 table whose DQ comes after the
    lookup. The float graph gets the table the QAT model computed with: the
    int8 values times that DQ's (per-tensor) scale.
    """
    from onnx import numpy_helper

    index = _GraphIndex(graph)
    initializers, producers, consumers = index.initializers, index.producers, index.consumers
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[1] not in initializers:
            continue
        source, chain = dq.input[0], 0
        while source in producers and producers[source].op_type in _SELECTING \
                and len(consumers[source]) == 1:
            source, chain = producers[source].input[0], chain + 1
        if not chain or source not in initializers or len(consumers[source]) != 1:
            continue
        table = numpy_helper.to_array(initializers[source])
        scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float32) \
            if len(dq.input) > 2 else np.float32(0)
        if table.dtype not in (np.int8, np.uint8) or scale.size != 1:
            continue
        values = (table.astype(np.float32) - zero) * scale
        initializers[source].CopyFrom(numpy_helper.from_array(values, source))


def _overrides(proto, ranges: dict[str, float]) -> dict:
    """``TensorQuantOverrides`` that put each QAT-quantized tensor on QAT's own grid.

    A value-preserving op (padding, max pooling, a reshape) gets its input's
    grid on its output too, so it runs on integers instead of between a DQ
    and a Q.
    """
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    params = {}
    for tensor, amax in ranges.items():
        producer = producers.get(tensor)
        op = producer.op_type if producer is not None else None
        clip_max = None
        if op == "Clip" and len(producer.input) > 2 and producer.input[2] in initializers:
            clip_max = float(initializers[producer.input[2]])
        params[tensor] = activation_grid(amax, op, clip_max)
    for node in proto.graph.node:  # each value-preserving op's output on its input's grid
        if node.op_type in VALUE_PRESERVING and node.input[0] in params \
                and node.output[0] in params:
            params[node.output[0]] = params[node.input[0]]
    return {tensor: [{"quant_type": QuantType.QUInt8,
                      "scale": np.array(step, dtype=np.float32),
                      "zero_point": np.array(zero, dtype=np.uint8)}]
            for tensor, (step, zero) in params.items()}


class _Batches:
    """ONNX Runtime's calibration reader over in-memory arrays."""

    def __init__(self, names: Sequence[str], arrays: Sequence[np.ndarray], batch_size: int):
        total = len(arrays[0])
        self._batches = iter([{n: a[i:i + batch_size] for n, a in zip(names, arrays)}
                              for i in range(0, total, batch_size)])

    def get_next(self):
        return next(self._batches, None)


def quantize_for_cpu(qat_proto, input_names: Sequence[str], calibration: Sequence[np.ndarray],
                     *, batch_size: int = 16, max_samples: int = 256):
    """The ONNX Runtime CPU placement of a tfopt QAT ONNX graph (see the module doc).

    Args:
        qat_proto: The QAT graph as tf2onnx converts it (TensorRT's placement).
        input_names: The graph's input names, in the order of ``calibration``.
        calibration: One array per input, for the ranges QAT did not train.
        batch_size: Calibration batch size.
        max_samples: At most this many samples are used for calibration.

    Returns:
        An ``onnx.ModelProto`` with int8 weights, uint8 activations and int32 biases.
    """
    _require_quantization()
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    qat = dequantize(qat_proto)
    arrays = [np.asarray(a)[:max_samples] for a in calibration]
    with tempfile.TemporaryDirectory(prefix="tfopt-ortq-") as tmp, _quiet_quantizer():
        tmp = Path(tmp)
        # Weights beside the graph: written tensor by tensor, not serialized into one
        # buffer with the graph (a serialization peaks at ~4x the weights).
        onnx.save(qat.proto, str(tmp / "float.onnx"), save_as_external_data=True,
                  location="float.onnx.data")
        qat.proto = None  # its weights: read back from the files from here on
        _fold(tmp / "float.onnx", tmp / "folded.onnx")
        folded = onnx.load(str(tmp / "folded.onnx"))
        present = {o for n in folded.graph.node for o in n.output} | \
            {i.name for i in folded.graph.input}
        ranges = {t: r for t, r in qat.ranges.items() if t in present}
        for node in folded.graph.node:  # folding renames layout ops: carry ranges through again
            if node.op_type in VALUE_PRESERVING and node.input[0] in ranges:
                ranges.setdefault(node.output[0], ranges[node.input[0]])
        lost = sorted(set(qat.ranges) - set(ranges))
        targets = _constant_reshape_targets(folded.graph, ranges)
        matrices = _pointwise_head_as_matmul(folded.graph, ranges)
        affines = _channel_affines_as_depthwise(folded.graph)
        per_tensor = set(qat.per_tensor_weights) | {
            matrices[w] for w in qat.per_tensor_weights if w in matrices}
        if lost:
            logger.info("%d trained range(s) name tensors that BatchNorm folding removed; "
                        "those tensors are calibrated instead: %s", len(lost), lost[:5])
        grids = _overrides(folded, ranges)
        weight_names = {i.name for i in folded.graph.initializer}
        in_float = nodes_left_in_float(folded, ranges, frozenset(affines))
        source = tmp / "folded.onnx"
        if targets or matrices or affines:
            # A new file (onnx appends to an existing .data); saving moves the weights
            # out of ``folded``, so it comes after everything that reads them.
            source = tmp / "rewritten.onnx"
            onnx.save(folded, str(source), save_as_external_data=True,
                      location="rewritten.onnx.data")
        del folded  # quantize_static reads it from its file
        # QAT's weight grid: [-64, 64] (portable across CPU kinds) is ONNX Runtime's
        # reduce_range grid for int8, [-127, 127] its symmetric one; the largest weight
        # of each channel lands on the grid's end both ways, so the values stay QAT's.
        reduce_range = weight_reduce_range(qat.largest_weight)
        quantize_static(
            str(source), str(tmp / "int8.onnx"),
            _Batches(input_names, arrays, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=qat.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=reduce_range, op_types_to_quantize=QUANTIZABLE_OPS,
            nodes_to_exclude=in_float,
            extra_options={
                "TensorQuantOverrides": {
                    **grids,
                    # per tensor, as QAT quantized them; max/64 (max/127) of the
                    # fake-quantized values is QAT's own scale, so the values stay QAT's
                    **{w: [{"symmetric": True, "reduce_range": reduce_range}]
                       for w in per_tensor if w in weight_names}},
                "WeightSymmetric": True,  # symmetric per channel: QAT's weight grid
                "QDQDisableWeightAdjustForInt32Bias": True,  # keep that grid
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 0},
            })
        proto = onnx.load(str(tmp / "int8.onnx"))
    _float_outputs(proto)
    _drop_idle_qdq(proto, ranges)
    _keep_qat_roundings(proto, grids, qat.rounded_readers)
    _int8_tables(proto, qat.tables)
    return proto


def _int8_tables(proto, tables: dict) -> None:
    """Store each per-row quantized table as int8 and scale only the rows looked up.

    ``Gather(table, ids)`` becomes ``Cast(Gather(int8, ids)) * Gather(scales,
    ids)`` and a ``Slice`` the same way, the scales kept as a ``[rows, 1]``
    column so that the lookup's own indices, starts and ends select them.
    The products are the float values the QAT model looks up, exactly (an
    int8 times a float32 scale). A reader of another kind (a tied output
    projection) reads the whole table through a DequantizeLinear. ONNX
    Runtime never constant-folds that one, so it dequantizes the table at
    every run: correct, and slower.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    index = _GraphIndex(graph)
    before: dict[int, list] = collections.defaultdict(list)  # node id -> nodes to put ahead
    after: dict[int, list] = collections.defaultdict(list)  # node id -> nodes to put after
    for name, (rows, scales) in tables.items():
        if name not in index.initializers:
            continue
        int8, column = f"{name}_tfopt_int8", f"{name}_tfopt_row_scales"
        readers = index.consumers[name]
        whole = []
        for reader in readers:
            if not _reads_rows(index, reader, name):
                whole.append(reader)
                continue
            selected, picked = f"{reader.output[0]}_tfopt_int8", f"{reader.output[0]}_tfopt_scales"
            scaled_input = list(reader.input)
            scaled_input[0] = column
            output = reader.output[0]
            reader.input[0] = int8
            reader.output[0] = selected
            after[id(reader)] += [
                _copy_with(reader, scaled_input, picked),
                helper.make_node("Cast", [selected], [f"{selected}_float"],
                                 to=1, name=f"{reader.name}_tfopt_cast"),
                helper.make_node("Mul", [f"{selected}_float", picked], [output],
                                 name=f"{reader.name}_tfopt_scale"),
            ]
        graph.initializer.remove(index.initializers[name])
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(rows, np.int8), int8),
            numpy_helper.from_array(np.asarray(scales, np.float32).reshape(-1, 1), column)])
        if whole:
            flat = f"{name}_tfopt_scales_flat"
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(scales, np.float32).reshape(-1), flat))
            before[id(whole[0])].append(helper.make_node(
                "DequantizeLinear", [int8, flat], [name], axis=0, name=f"{name}_tfopt_dq"))
    if not before and not after:
        return
    nodes = []
    for node in graph.node:
        nodes.extend(before.pop(id(node), []))
        nodes.append(node)
        nodes.extend(after.pop(id(node), []))
    del graph.node[:]
    graph.node.extend(nodes)


def _copy_with(node, inputs, output):
    from onnx import helper

    copy = helper.make_node(node.op_type, inputs, [output], name=f"{node.name}_tfopt_scales",
                            domain=node.domain)
    copy.attribute.extend(node.attribute)
    return copy


def _reads_rows(index: "_GraphIndex", node, table: str) -> bool:
    """Whether ``node`` looks rows up in ``table`` in a way its scale column can follow:
    a Gather on axis 0, or a Slice that starts at 0 on every axis but the first."""
    from onnx import numpy_helper

    if node.op_type not in _LOOKUPS or node.input[0] != table:
        return False
    if node.op_type == "Gather":
        return all(a.i == 0 for a in node.attribute if a.name == "axis")
    starts = index.initializers.get(node.input[1])
    axes = index.initializers.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = index.initializers.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        return False
    starts = numpy_helper.to_array(starts).reshape(-1)
    axes = numpy_helper.to_array(axes).reshape(-1) if axes is not None else np.arange(len(starts))
    steps = numpy_helper.to_array(steps).reshape(-1) if steps is not None else np.ones(len(starts))
    return all((axis == 0 and step == 1) or (start == 0 and step == 1)
               for start, axis, step in zip(starts, axes, steps))


def _fold(source: Path, target: Path) -> None:
    """``quant_pre_process``: BatchNorm folded into convolutions, shapes inferred.

    Symbolic shape inference (better for transformers) gives up on some
    graphs and then writes a scratch file into the working directory; ONNX's
    own shape inference is enough for the quantizer there.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Weights in one file beside each model it writes, as ``source`` has them: its
    # optimizer then reads them from there, and no model is serialized whole.
    external = dict(save_as_external_data=True, all_tensors_to_one_file=True,
                    external_data_location=f"{target.name}.data")
    with _working_directory(source.parent):
        try:
            quant_pre_process(str(source), str(target), **external)
        except Exception as exc:  # noqa: BLE001 - ORT raises a bare Exception here
            logger.info("Symbolic shape inference failed (%s); using ONNX's.", exc)
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True, **external)


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs a pre-processing hint and per-tensor notes at WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _float_outputs(proto) -> None:
    """Drop the Q/DQ pair in front of each graph output: outputs stay float.

    The last matrix product then runs as ``MatMulIntegerToFloat`` (or keeps a
    float bias add), instead of rounding the model's outputs to 8 bits.
    """
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = collections.Counter(i for n in graph.node for i in n.input)
    drop = set()
    for output in graph.output:
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or consumers[q.output[0]] != 1:
            continue
        source = producers.get(q.input[0])
        if source is None or consumers[q.input[0]] != 1:
            continue
        source.output[:] = [output.name if o == q.input[0] else o for o in source.output]
        drop.update((id(q), id(dq)))
    _set_nodes(graph, [n for n in graph.node if id(n) not in drop])


def _drop_idle_qdq(proto, trained) -> None:
    """Remove the ``Q -> DQ`` pairs ONNX Runtime's quantizer put where no integer kernel reads them.

    The quantizer quantizes the output of every op it quantizes. Where that
    output is read only by float ops (a projection feeding an attention score
    product QAT left in float, say), the pair runs as a rounding to 8 bits
    and back that the QAT model does not do, and buys no kernel. Tensors QAT
    trained a range for (``trained``) keep theirs: they are the QAT model's.
    So does a convolution's output when the convolution can run as an integer
    kernel (int8 input and weights): ONNX Runtime fuses one only if its output
    is quantized, and one DequantizeLinear for a float reader (DenseNet's
    Concatenate, ConvNeXt's LayerNormalization) costs far less than the
    convolution in float. That rounding is calibrated, as ONNX Runtime's
    post-training quantizer would do it. Removing one pair can idle another
    (a sum whose output is no longer quantized), so this repeats until
    nothing changes.
    """
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    while True:
        producers = {o: n for n in graph.node for o in n.output}
        consumers = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)

        def integer_reader(node) -> bool:
            if node.op_type in KERNEL_OPS:
                weight = producers.get(node.input[1]) if len(node.input) > 1 else None
                return weight is not None and weight.op_type == "DequantizeLinear" \
                    and weight.input[0] in initializers
            # a quantized unit: every activation in through a DQ, every output out through a Q
            inputs = [i for i in node.input if i and i not in initializers]
            return all(i in producers and producers[i].op_type == "DequantizeLinear"
                       for i in inputs) \
                and all(consumers[o] and all(c.op_type == "QuantizeLinear" for c in consumers[o])
                        for o in node.output)

        def integer_convolution(tensor) -> bool:
            node = producers.get(tensor)
            return node is not None and node.op_type in ("Conv", "ConvTranspose") \
                and integer_reader(node)

        drop, rename = set(), {}
        for q in graph.node:
            source = q.input[0] if q.op_type == "QuantizeLinear" else None
            if source is None or source in trained or source in initializers \
                    or integer_convolution(source):
                continue
            dqs = consumers[q.output[0]]
            if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs
                              for d in dqs):
                continue
            if any(integer_reader(c) for d in dqs for c in consumers[d.output[0]]):
                continue
            drop.update(id(n) for n in (q, *dqs))
            rename.update({d.output[0]: source for d in dqs})
        if not drop:
            return
        kept = [n for n in graph.node if id(n) not in drop]
        for node in kept:
            node.input[:] = [rename.get(i, i) for i in node.input]
        _set_nodes(graph, kept)


def _keep_qat_roundings(proto, grids: dict, readers: dict) -> None:
    """Round every tensor QAT quantized, also where ONNX Runtime left its reader in float.

    ONNX Runtime's quantizer puts a Q/DQ on a tensor only when an op it
    quantizes reads it. A tensor QAT trained a range for but whose reader
    stays float (BERT's embedding sum, read by a LayerNormalization) would
    otherwise go unrounded, and the export would compute something the QAT
    model does not. The nodes that read such a tensor rounded in the QAT
    graph (``readers``; a residual branch beside them reads it unrounded)
    read it through a ``Q -> DQ`` pair on QAT's grid (``grids``, the
    TensorQuantOverrides). Readers ONNX Runtime quantized read its own Q
    and are not among them.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    added = []
    for tensor, (grid,) in grids.items():
        targets = [r for r in consumers.get(tensor, []) if r.name in readers.get(tensor, ())]
        if tensor not in produced or not targets:
            continue
        q_name, dq_name = f"{tensor}_tfopt_qat_q", f"{tensor}_tfopt_qat_dq"
        scale, zero = f"{tensor}_tfopt_qat_scale", f"{tensor}_tfopt_qat_zero_point"
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(grid["scale"], np.float32), scale),
            numpy_helper.from_array(np.asarray(grid["zero_point"], np.uint8), zero)])
        for reader in targets:
            reader.input[:] = [dq_name if i == tensor else i for i in reader.input]
        added.append((tensor, helper.make_node("QuantizeLinear", [tensor, scale, zero], [q_name]),
                      helper.make_node("DequantizeLinear", [q_name, scale, zero], [dq_name])))
    if not added:
        return
    after = collections.defaultdict(list)
    for tensor, q, dq in added:
        after[tensor].extend([q, dq])
    inputs = {i.name for i in graph.input}
    nodes = [n for tensor in inputs for n in after.pop(tensor, [])]
    for node in graph.node:
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.pop(output, []))
    del graph.node[:]
    graph.node.extend(nodes)


def kernel_report(path) -> dict:
    """How ONNX Runtime's CPU provider runs an ONNX file's compute ops.

    Asks ONNX Runtime for its optimized graph (``optimized_model_filepath``
    at the extended level, where the QDQ fusions run) and counts the
    convolutions and matrix products that became integer kernels.

    Also lists the compute ops whose weights the file stores in float next
    to quantized inputs: ONNX Runtime quantizes those weights itself when it
    loads the file, OpenVINO runs them in float.

    Returns:
        ``{"integer": n, "total": m, "float": [names of compute ops left in
        float], "float_weights": [names], "ops": {integer op type: count}}``.
    """
    _require_quantization()
    import onnx
    import onnxruntime as ort

    stored = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in stored.graph.initializer}
    producers = {o: n for n in stored.graph.node for o in n.output}
    float_weights = [
        n.name for n in stored.graph.node
        if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in weights
        and getattr(producers.get(n.input[0]), "op_type", None) == "DequantizeLinear"]

    with tempfile.TemporaryDirectory(prefix="tfopt-ortopt-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    integer = collections.Counter(n.op_type for n in optimized.graph.node
                                  if n.op_type in INTEGER_OPS)
    left = [n.name or n.op_type for n in optimized.graph.node if n.op_type in COMPUTE_OPS]
    count = sum(integer.values())
    return {"integer": count, "total": count + len(left), "float": left,
            "float_weights": float_weights, "ops": dict(integer)}

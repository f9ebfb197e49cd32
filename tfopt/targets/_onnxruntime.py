"""ONNX Runtime's CPU provider: where it runs INT8, and on which grids.

ONNX Runtime reads a QDQ file and fuses *node units* into integer kernels
(``onnxruntime/core/optimizer/qdq_transformer/selectors_actions/``, checked
against ONNX Runtime 1.32):

* ``DQ(x) + DQ(w) [+ DQ(int32 bias)] -> Conv/ConvTranspose/Gemm/MatMul -> Q``,
  the Q being the op's only reader, becomes ``QLinearConv``/``QGemm``/
  ``QLinearMatMul``. A MatMul whose output has no Q becomes
  ``MatMulIntegerToFloat``; a convolution without one stays in float.
* A Relu or Clip between the kernel and its Q is absorbed only when the Q's
  zero point is the type's minimum (uint8, zero point 0).
* Add, Mul, Concat, the poolings and Sigmoid run as QLinear ops only with a
  DQ on every activation input and a Q on the output.
* Layout and value-preserving ops (Transpose, Reshape, Pad, MaxPool) run on
  the integers when their input and output share one scale and zero point.
* A BatchNormalization between a convolution and its Q blocks the fusion
  (ONNX Runtime folds BN only into float weights), and a DequantizeLinear of
  weights is never constant-folded: an unfused unit dequantizes its weights
  at every run.
* On x86 int8 activations are re-typed to uint8: the kernels multiply u8
  activations by s8 weights. Whether they compute the same integers on every
  CPU kind is :mod:`tfopt.targets._cpu_int8`'s rule.

So TensorRT's placement, which QAT trains (:mod:`tfopt.targets._tensorrt`),
runs slowly here, and the export re-places the Q/DQ for this engine
(``tfopt.export._ort_quant``, the mechanics of writing the file). That
placement reads its rules from here: which ops the quantizer may quantize,
the grid each trained activation range becomes, the weight grid, and which
nodes must stay float for the file to compute what the QAT model computes.
OpenVINO runs the same file (its Q/DQ become FakeQuantize) and has the same
needs, so it shares the placement.
"""

from __future__ import annotations

import collections
from typing import Optional

from tfopt.targets._cpu_int8 import PORTABLE_WEIGHT_MAX

# Layout ops a Q/DQ pair may straddle (tf2onnx moves Transpose/Squeeze between them).
LAYOUT = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten"}
# Ops that move or select values without changing them: ONNX Runtime (and OpenVINO)
# run them on int8 data when their input and output share one scale and zero point.
VALUE_PRESERVING = LAYOUT | {"Pad", "MaxPool"}

# One-input ops that keep a value within the range of what feeds them, or squash
# it: ONNX Runtime runs them on uint8 data too, in a chain of elementwise ops that
# must be quantized for the kernel before it to write uint8 (nodes_left_in_float).
UNARY_BETWEEN_KERNELS = {"Relu", "Clip", "Sigmoid", "GlobalAveragePool", "AveragePool"}

# Ops ONNX Runtime's quantizer may turn into integer kernels here. LayerNormalization,
# Softmax, Gather (embeddings) and the like stay in float, as in the QAT model.
QUANTIZABLE_OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "Relu", "Clip",
    "Sigmoid", "LeakyRelu", "GlobalAveragePool", "AveragePool", "MaxPool", "Resize", "Pad",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split",
]

# The compute ops whose fusion the export reports, and what ONNX Runtime
# turns them into when it runs them as integer kernels.
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
               "FusedMatMul", "Einsum"}
INTEGER_OPS = {"QLinearConv", "QLinearConvTranspose", "QGemm", "QLinearMatMul",
               "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "ConvInteger", "QAttention"}

# The matrix products and convolutions ONNX Runtime can run as u8 x s8 integer kernels.
KERNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# uint8 activations: the zero point of a tensor that may be negative (QAT's symmetric
# int8 grid shifted by 128), and of one after a ReLU (the type's minimum, so that
# ONNX Runtime absorbs the ReLU into the kernel before it).
SIGNED_ZERO_POINT = 128
RELU_ZERO_POINT = 0


def activation_grid(amax: float, producer: Optional[str] = None,
                    clip_max: Optional[float] = None) -> tuple[float, int]:
    """The uint8 ``(scale, zero point)`` of an activation QAT trained to ``[-amax, amax]``.

    ``producer``: the op type that writes the tensor. QAT's int8 grid (step
    ``amax / 127``, zero point 0) becomes uint8 with zero point 128 and the
    same step: QAT's grid exactly. After a ReLU (or a Clip, ``clip_max`` its
    upper bound) the tensor is non-negative: uint8 with zero point 0, so that
    ONNX Runtime absorbs the activation, and 255 steps up to QAT's maximum,
    so it saturates where QAT does on a grid twice as fine (at most half of
    QAT's step from the QAT model, toward float). The grid never reaches
    past a Clip's bound, or the Clip could not be absorbed.
    """
    if producer not in ("Relu", "Clip"):
        return amax / 127.0, SIGNED_ZERO_POINT
    step = amax / 255.0
    if producer == "Clip" and clip_max is not None and 255 * step > clip_max:
        step = clip_max / 255.0
    return step, RELU_ZERO_POINT


def weight_reduce_range(largest_weight: int) -> bool:
    """Whether ``quantize_static`` must write int8 weights on its ``reduce_range`` grid.

    ``reduce_range`` is ``[-64, 64]``, QAT's portable grid
    (:data:`~tfopt.targets._cpu_int8.PORTABLE_WEIGHT_MAX`); without it,
    ``[-127, 127]``. The largest weight of each channel lands on the grid's
    end both ways, so a QAT model's integers are written back as trained
    when the grid is the one it trained on.
    """
    return largest_weight <= PORTABLE_WEIGHT_MAX


def nodes_left_in_float(proto, ranges: dict[str, float],
                         calibrated: frozenset = frozenset()) -> list[str]:
    """The nodes ONNX Runtime's quantizer must leave in float, as the QAT model computes them.

    * Convolutions and matrix products QAT left in float: their activation
      input has no trained range, or they multiply two activations (attention
      scores and context, which QAT never quantizes).
    * Elementwise sums and products that do not sit between integer kernels
      (every input from one, the result into one): quantizing them buys no
      fused kernel, only roundings the QAT model does not do, and their
      inputs may span ranges no 8 bits hold (an attention mask's -1e9 added
      to the scores, a transformer's residual stream into its normalization).
      A residual sum between convolutions, or a swish, hard swish or
      squeeze-and-excite product, sits between integer kernels and is
      quantized. So is a longer chain of them where a kernel whose output QAT
      did not quantize starts it (MobileNetV3's hard swish, ``x * relu6(x + 3)
      / 6``, after a depthwise convolution): the chain then runs on uint8
      from that kernel's output to the next kernel's input, instead of in
      float between a DQ and a Q (``_ort_quant._drop_idle_qdq`` keeps the kernel's own
      output quantized either way). A chain after tensors QAT quantized
      (ResNet50V2's BatchNormalization after a residual sum) buys no kernel
      and stays float.

    ``calibrated``: inputs of convolutions the placement added
    (``_ort_quant._channel_affines_as_depthwise``), quantized with a calibrated range.
    """
    initializers = {i.name for i in proto.graph.initializer}
    consumers = collections.defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)

    def integer_compute(node) -> bool:
        return node.op_type in KERNEL_OPS \
            and (node.input[0] in ranges or node.input[0] in calibrated) \
            and any(i in initializers for i in node.input[1:2])

    def feeds_integer(tensor, seen, chains=False) -> bool:
        """Whether ``tensor`` reaches an integer kernel's input, through value-preserving
        ops and ReLUs or, with ``chains``, also through sums, products and poolings."""
        if tensor in ranges:
            return True
        if tensor in seen:
            return False
        seen.add(tensor)
        unary = VALUE_PRESERVING | (UNARY_BETWEEN_KERNELS if chains else {"Relu", "Clip"})
        for node in consumers.get(tensor, []):
            if integer_compute(node) and node.input[0] == tensor:
                return True
            if node.op_type in unary and node.input[0] == tensor \
                    and feeds_integer(node.output[0], seen, chains):
                return True
            if chains and node.op_type in ("Add", "Mul") and between_integer(node) \
                    and feeds_integer(node.output[0], seen, chains):
                return True
        return False

    producers = {o: n for n in proto.graph.node for o in n.output}
    memo: dict[str, bool] = {}

    def from_integer(tensor) -> bool:
        if tensor in ranges:
            return True
        if tensor not in memo:
            memo[tensor] = False  # a cycle guard; graphs are acyclic
            node = producers.get(tensor)
            if node is None:
                result = False
            elif node.op_type in KERNEL_OPS:
                result = integer_compute(node)
            elif node.op_type in VALUE_PRESERVING | {"Relu", "Clip", "Sigmoid"}:
                result = from_integer(node.input[0])
            elif node.op_type in ("Add", "Mul"):
                result = between_integer(node)
            else:
                result = False
            memo[tensor] = result
        return memo[tensor]

    def between_integer(node) -> bool:
        activations = [i for i in node.input if i and i not in initializers]
        return bool(activations) and all(from_integer(i) for i in activations)

    unranged_memo: dict[str, bool] = {}

    def after_unranged_kernel(tensor) -> bool:
        """Whether ``tensor`` comes, through elementwise ops only, from an integer
        convolution whose output QAT did not quantize (MobileNetV3's depthwise
        convolution before its hard swish): ONNX Runtime runs a convolution as an
        integer kernel only if its output is quantized. A matrix product is not a
        start: it runs as one with a float output (``MatMulIntegerToFloat``)."""
        if tensor in ranges:
            return False
        if tensor not in unranged_memo:
            unranged_memo[tensor] = False
            node = producers.get(tensor)
            if node is None:
                result = False
            elif node.op_type in ("Conv", "ConvTranspose"):
                result = integer_compute(node)
            elif node.op_type in VALUE_PRESERVING | UNARY_BETWEEN_KERNELS:
                result = after_unranged_kernel(node.input[0])
            elif node.op_type in ("Add", "Mul"):
                result = any(after_unranged_kernel(i) for i in node.input
                             if i and i not in initializers)
            else:
                result = False
            unranged_memo[tensor] = result
        return unranged_memo[tensor]

    def quantized_elementwise(node) -> bool:
        if not between_integer(node):
            return False
        if feeds_integer(node.output[0], set()):
            return True
        # a chain of sums and products (a hard swish, a squeeze-and-excite gate) between
        # a kernel with no trained output range and the next kernel
        return any(after_unranged_kernel(i) for i in node.input if i and i not in initializers) \
            and feeds_integer(node.output[0], set(), chains=True)

    excluded = []
    for node in proto.graph.node:
        if node.op_type in KERNEL_OPS:
            if not integer_compute(node):
                excluded.append(node.name)
        elif node.op_type in ("Add", "Mul") and not quantized_elementwise(node):
            excluded.append(node.name)
    return excluded

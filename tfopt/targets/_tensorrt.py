"""TensorRT's explicit quantization: where QAT puts Q/DQ, and what the file must hold.

TensorRT builds INT8 kernels from the QuantizeLinear/DequantizeLinear nodes
of an ONNX graph (explicit quantization; TensorRT 11 knows no other kind,
its networks are strongly typed). The rules tfopt's QAT trains for, and
that the ``"tensorrt"`` placement writes unchanged:

* Q/DQ are int8 and symmetric: zero points 0. TensorRT rejects a non-zero
  zero point, and a Q/DQ without one is uint8 by ONNX's default.
* Weights are quantized per output channel (a DequantizeLinear of constant
  int8 weights, ``axis`` the output channel), activations per tensor.
* A convolution or matrix product (:data:`WEIGHTED_OPS`) runs in INT8 when
  its activation input and its weights both come through a DequantizeLinear.
* BatchNormalization, the bias and the activation after a convolution are
  fused into its kernel when the engine is built. QAT leaves them in float:
  with per-channel weight scales the folding is exact.
* A residual sum with Q/DQ on every input (:data:`EVERY_INPUT_OPS`) is
  fused into the convolution that writes one of them, NVIDIA's placement
  guidance for residual networks; without them it runs as a separate pass.
* Normalizations over the features, embedding lookups and products of two
  activations (attention scores and context) stay float in QAT's placement.

The QAT tables that map Keras layers to these rules are in
``tfopt.quantization._registry``; the export checks every file it builds
TensorRT engines from with :func:`check`.
"""

from __future__ import annotations

# Ops TensorRT runs as INT8 kernels when their activation input and weights are
# dequantized; the index of the weights' input.
WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}

# Ops whose every activation input gets Q/DQ, so that TensorRT fuses them into the
# kernel before them.
EVERY_INPUT_OPS = ("Add",)

# The only zero point TensorRT accepts, and the Q/DQ element type it builds INT8 from.
ZERO_POINT = 0
INT8 = 3  # onnx.TensorProto.INT8; literal so this module needs no onnx import


def check(proto) -> list[str]:
    """What in ``proto``'s Q/DQ TensorRT would refuse or build in another precision.

    Returns one line per QuantizeLinear/DequantizeLinear whose zero point is
    missing (uint8 by ONNX's default), not int8, or not all zeros; empty when
    the file is TensorRT's kind of INT8.
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    constants = {n.output[0]: a.t for n in proto.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "value"}
    problems = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = initializers.get(zero_name) or constants.get(zero_name)
        if not zero_name:
            # A DequantizeLinear reads the type of its input: int8 weights, or the
            # output of a QuantizeLinear checked on its own.
            stored = initializers.get(node.input[0])
            if node.op_type == "QuantizeLinear" or (stored is not None
                                                    and stored.data_type != INT8):
                problems.append(f"{label} has no zero point (uint8 by ONNX's default)")
            continue
        if zero is None:
            problems.append(f"{label} takes its zero point from a computed tensor")
        elif zero.data_type != INT8:
            problems.append(f"{label} is not int8 (zero point of ONNX type {zero.data_type})")
        elif numpy_helper.to_array(zero).any():
            problems.append(f"{label} has a non-zero zero point")
    return problems


"""INT8 on x86 CPUs: the weights that compute the same integers on every CPU kind.

ONNX Runtime (MLAS) and OpenVINO (oneDNN) multiply uint8 activations by
int8 weights. On x86 CPUs without VNNI (SSE4.1, AVX2, AVX-512 without
VNNI: AMD before Zen 4, Intel before Cascade Lake) they do it with
``vpmaddubsw``, which adds two adjacent products into a *saturating* int16;
with VNNI (``vpdpbusd``) or AMX the sums are 32-bit. A pair of activations
near 255 against weights near 127 sums to ~64k, is clipped to 32767, and the
model computes something else on those CPUs only (OpenVINO's documentation
calls it the saturation issue; ONNX Runtime's ``reduce_range`` and NNCF's
``overflow_fix`` are the same cure).

The cure tfopt applies by default: int8 weights on the grid ``[-64, 64]``
(:data:`PORTABLE_WEIGHT_MAX`), trained for in QAT so nothing is lost at
export. Two products then sum to at most ``2 * 64 * 255 = 32640`` in
magnitude, inside int16 whatever the activation, so every CPU computes the
same integers. It is ONNX Runtime's own ``reduce_range`` grid for int8
weights (``quantize_static`` writes exactly QAT's values back) and within
OpenVINO's 7-bit workaround.

:func:`check` proves it for a file: for every compute op an engine may run
as a u8 x s8 integer kernel it bounds the largest pair sum from the stored
weights, whatever order the kernel pairs them in.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from typing import Optional

import numpy as np

INT16_MAX = 32767
# The largest uint8 activation a kernel can be handed. int8 activations are shifted
# to uint8 (+128) on x86, so this holds for every activation type and zero point.
ACTIVATION_MAX = 255
# The largest int8 weight magnitude for which no pair of products leaves int16.
PORTABLE_WEIGHT_MAX = INT16_MAX // (2 * ACTIVATION_MAX)  # 64
# The CPU features with 32-bit sums for u8 x s8 products (/proc/cpuinfo flag names).
WIDE_SUM_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

# Compute ops an engine may fuse, with a DequantizeLinear of constant int8 weights in
# front of input 1, into a u8 x s8 integer kernel; and the integer ops themselves,
# with the input index of their int8 weights.
_QDQ_COMPUTE = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
_INTEGER_COMPUTE = {"QLinearConv": 3, "QLinearMatMul": 3, "MatMulInteger": 1,
                    "ConvInteger": 1, "MatMulIntegerToFloat": 1, "QGemm": 3}


@dataclasses.dataclass(frozen=True)
class KernelBound:
    """The largest pair sum one integer kernel can form, from its stored weights."""

    node: str  # the compute node's name (tf2onnx keeps the Keras layer's name in it)
    weight: str  # the int8 weight tensor
    pair_sum: int  # the two largest |weight| values added: the worst pair
    bound: Optional[int]  # ACTIVATION_MAX * pair_sum, or None where weights are not constant

    @property
    def fits_int16(self) -> bool:
        return self.bound is not None and self.bound <= INT16_MAX


@dataclasses.dataclass(frozen=True)
class Portability:
    """Whether an INT8 file computes the same integers on every x86 CPU kind."""

    kernels: tuple  # KernelBound of every u8 x s8 kernel candidate
    largest_weight: int  # the largest |int8 weight| over them

    @property
    def portable(self) -> bool:
        return all(k.fits_int16 for k in self.kernels)

    @property
    def offending(self) -> list:
        return [k for k in self.kernels if not k.fits_int16]

    def as_dict(self) -> dict:
        """What ``manifest.json`` records (``int8_portability``)."""
        worst = max(self.kernels, key=lambda k: (k.bound is None, k.bound or 0), default=None)
        offending = self.offending
        return {
            "portable": self.portable,
            "rule": (f"every pair of u8 x s8 products fits int16: {ACTIVATION_MAX} x (the two "
                     f"largest |int8 weight|) <= {INT16_MAX}"),
            "integer_kernels": len(self.kernels),
            "largest_weight": self.largest_weight,
            "worst_pair_bound": None if worst is None or worst.bound is None else worst.bound,
            "offending": [{"node": k.node, "weight": k.weight, "pair_sum": k.pair_sum,
                           "bound": k.bound} for k in offending[:20]],
            "requires": [] if self.portable else list(WIDE_SUM_FLAGS),
        }

    def describe(self, limit: int = 5) -> str:
        """One sentence naming the kernels that can saturate, for errors and warnings."""
        parts = []
        for k in self.offending[:limit]:
            if k.bound is None:
                parts.append(f"{k.node} (int8 activations on both inputs)")
            else:
                parts.append(f"{k.node} (weights up to {k.pair_sum} per pair: "
                             f"{ACTIVATION_MAX} x {k.pair_sum} = {k.bound} > {INT16_MAX})")
        more = len(self.offending) - limit
        return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def pair_sum(weights: np.ndarray) -> int:
    """The two largest ``|w|`` of an integer weight tensor, added.

    Every pair a kernel can form is bounded by this, in whatever order it
    lays out the reduction axis.
    """
    magnitudes = np.abs(np.asarray(weights, dtype=np.int64)).ravel()
    if magnitudes.size < 2:
        return int(magnitudes.sum())
    top = np.partition(magnitudes, magnitudes.size - 2)[-2:]
    return int(top.sum())


def check(proto) -> Portability:
    """Bound every u8 x s8 integer kernel of an ONNX graph (Q/DQ or integer ops).

    A compute op counts when an engine may run it as an integer kernel: its
    weight is a constant int8 tensor, stored as is (``QLinearConv`` and
    kin) or behind a ``DequantizeLinear`` (the QDQ format). A matrix product
    of two int8 activations has no constant bound and counts as not
    portable; one whose second input is uint8 runs on u8 x u8 kernels,
    which widen to 16 bits before multiplying, and is left out.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    arrays: dict[str, np.ndarray] = {}

    def int8_constant(name: str) -> Optional[np.ndarray]:
        tensor = initializers.get(name)
        if tensor is None:
            node = producers.get(name)
            if node is None or node.op_type != "Constant":
                return None
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is None:
                return None
        if tensor.data_type != TensorProto.INT8:
            return None
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(tensor)
        return arrays[name]

    def int8_activation(name: str) -> bool:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        zero = node.input[2] if len(node.input) > 2 else ""
        tensor = initializers.get(zero)
        return tensor is not None and tensor.data_type == TensorProto.INT8

    kernels = []
    for node in graph.node:
        name = node.name or f"{node.op_type}:{node.output[0]}"
        weight = None
        if node.op_type in _INTEGER_COMPUTE and len(node.input) > _INTEGER_COMPUTE[node.op_type]:
            weight = node.input[_INTEGER_COMPUTE[node.op_type]]
            values = int8_constant(weight)
        elif node.op_type in _QDQ_COMPUTE and len(node.input) > 1:
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            weight = dq.input[0]
            values = int8_constant(weight)
            if values is None:
                if node.op_type == "MatMul" and int8_activation(node.input[1]) \
                        and producers.get(node.input[0]) is not None \
                        and producers[node.input[0]].op_type == "DequantizeLinear":
                    kernels.append(KernelBound(name, weight, 2 * 128, None))
                continue
        else:
            continue
        if values is None:
            continue
        total = pair_sum(values)
        kernels.append(KernelBound(name, weight, total, ACTIVATION_MAX * total))
    largest = max((int(np.max(np.abs(a.astype(np.int64)))) for a in arrays.values() if a.size),
                  default=0)
    return Portability(tuple(kernels), largest)


def _cpuinfo(key: str) -> str:
    """The first ``key`` line of ``/proc/cpuinfo`` (``""`` where it cannot be read)."""
    if not sys.platform.startswith("linux"):
        return ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set:
    """This CPU's instruction-set flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return set(_cpuinfo("flags").split())


def cpu_name() -> str:
    """This CPU's model name, as every CPU figure should name it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_sums_wide(flags: Optional[set] = None) -> Optional[bool]:
    """Whether this CPU adds u8 x s8 products in 32 bits (VNNI or AMX); ``None`` if unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return any(f in flags for f in WIDE_SUM_FLAGS)


def instruction_set(flags: Optional[set] = None) -> str:
    """The CPU's integer-kernel instruction sets, as every CPU figure should name them."""
    flags = cpu_flags() if flags is None else flags
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
             if f in flags]
    return " ".join(shown) if shown else "unknown"


def cores() -> int:
    """The CPU cores this process may run on (its affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_cpu() -> str:
    """``"CPU: <name>, <n> cores, ISA: <flags>"``: the line every CPU figure is quoted with.

    README's figures carry it as their commands print it (tests/test_readme.py
    checks the shape).
    """
    return f"CPU: {cpu_name()}, {cores()} cores, ISA: {instruction_set()}"

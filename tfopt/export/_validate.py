"""Compare an exported artifact's outputs with the Keras model's.

What an output may differ by is a :class:`Tolerance` per output, derived from
what is compared:

* float artifacts (fp32, fp16): a fraction of the output's largest magnitude
  (:func:`relative_tolerances`);
* INT8 Q/DQ artifacts: quantization steps of each output
  (:func:`int8_tolerances`). An engine that computes in another order (a
  folded BatchNorm, an integer kernel that requantizes) may round a value
  that sits on a rounding boundary to the neighbouring level: a one-step flip.
  A few flips at the last quantizers move an output by a few steps, and
  they are rare, so on average the output moves by a small fraction of a
  step. In a deep network a flip moves the values after it and flips some
  of them in turn; how far that goes is measured on the graph itself
  (:func:`rounding_noise`: the same graph run with its weight scales moved
  by 1e-5, far below anything that changes the model). A wrong scale moves
  every value in proportion: a 1% scale error moves the mean error by about
  1% of the output's mean magnitude.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from tfopt.errors import ExportValidationError

# (relative to the output's largest magnitude, absolute floor), by precision.
# bf16 (OpenVINO's inference precision on CPUs with bf16) keeps 8 bits of
# mantissa, against fp16's 11: its tolerance is looser than fp16's.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 1e-3), "int8": (5e-2, 1e-3),
              "bf16": (3e-2, 1e-3)}

# INT8 bounds, in quantization steps of each output (see int8_tolerances).
INT8_MAX_STEPS = 16.0
INT8_MEAN_STEPS = 0.5
INT8_NOISE_FACTOR = 3.0  # times the error of the graph against itself, moved by 1e-5


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What one output of an artifact may differ from Keras by.

    Attributes:
        max_abs: Bound on the largest ``|artifact - keras|`` over the output.
        mean_abs: Bound on the mean ``|artifact - keras|`` (``None``: not checked).
        basis: How the bounds were derived, for messages and the manifest.
    """

    max_abs: float
    mean_abs: Optional[float] = None
    basis: str = ""
    # For a classifier's output (batch x classes): the least fraction of rows whose
    # argmax must equal Keras's (``None``: not checked).
    min_argmax_agreement: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output of one artifact is from Keras."""

    max_abs: float
    max_rel: float  # max_abs divided by the largest magnitude of the Keras output
    tolerance: float  # the max_abs allowed
    mean_abs: float = 0.0
    mean_tolerance: Optional[float] = None  # the mean_abs allowed, if checked
    basis: str = ""
    # the fraction of rows whose argmax equals Keras's, for outputs shaped (batch, classes)
    argmax_agreement: Optional[float] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def relative_tolerances(reference: Mapping[str, np.ndarray], precision: str,
                        rtol: Optional[float] = None) -> dict[str, Tolerance]:
    """A fraction of each output's largest magnitude (plus a floor), by precision.

    ``rtol`` replaces the precision's fraction and drops the floor.
    """
    rel, floor = TOLERANCES[precision] if rtol is None else (rtol, 0.0)
    result = {}
    for name, ref in reference.items():
        scale = _largest(ref)
        result[name] = Tolerance(floor + rel * scale, None,
                                 f"{precision}: {rel:g} of the largest |value| {scale:.3g}"
                                 + (f" + {floor:g}" if floor else ""))
    return result


def int8_tolerances(steps: Mapping[str, Optional[float]], reference: Mapping[str, np.ndarray],
                    noise: Optional[Mapping[str, Mapping[str, float]]] = None, *,
                    max_steps: float = INT8_MAX_STEPS, mean_steps: float = INT8_MEAN_STEPS,
                    noise_factor: float = INT8_NOISE_FACTOR) -> dict[str, Tolerance]:
    """Bounds in quantization steps for the outputs of an INT8 Q/DQ artifact.

    For an output whose step is ``s`` (:func:`quantization_steps`) and whose
    rounding noise is ``n`` (:func:`rounding_noise`, zero if not given):

    * every element within ``max(max_steps * s, noise_factor * n.max_abs)``:
      room for one-step flips at the last quantizers, and for the flips a
      deep graph carries from earlier ones, whatever engine or Q/DQ
      placement computes it (the digits demo, pruned to 80% and run by ONNX
      Runtime, has one logit 7 steps off and averages well under a step);
    * the mean error within ``max(mean_steps * s, noise_factor * n.mean_abs)``:
      flips are rare (or, in deep graphs, measured), while a scale error
      moves every value in proportion: a 1% error moves the mean by 1% of
      the output's mean magnitude, more than half a step on any output
      whose values span more than about 50 steps on average.

    Both bounds add the fp32 tolerance for the float arithmetic around the
    Q/DQ. An output whose step is ``None`` (an op between it and the last
    quantizer that the step cannot be carried through) gets the relative
    int8 tolerance instead, and its ``basis`` says so.

    Args:
        steps: ``{output: step or None}``, from :func:`quantization_steps` of
            the ONNX the artifact was built from.
        reference: The Keras outputs.
        noise: ``{output: {"max_abs", "mean_abs"}}`` from :func:`rounding_noise`.
        max_steps, mean_steps, noise_factor: The bounds above.

    Returns:
        ``{output: Tolerance}`` for :func:`compare`.
    """
    fallback = relative_tolerances(reference, "int8")
    rel, floor = TOLERANCES["fp32"]
    result = {}
    for name, ref in reference.items():
        step = steps.get(name)
        if step is None or not np.isfinite(step):
            result[name] = dataclasses.replace(
                fallback[name], basis=fallback[name].basis + " (no quantization step found)")
            continue
        float_error = floor + rel * _largest(ref)
        measured = (noise or {}).get(name, {})
        noise_max = noise_factor * measured.get("max_abs", 0.0)
        noise_mean = noise_factor * measured.get("mean_abs", 0.0)
        result[name] = Tolerance(
            max(max_steps * step, noise_max) + float_error,
            max(mean_steps * step, noise_mean) + float_error,
            f"int8: step {step:.3g}; max: {max_steps:g} steps or {noise_factor:g} x rounding "
            f"noise {noise_max / noise_factor:.3g}; mean: {mean_steps:g} steps or "
            f"{noise_factor:g} x rounding noise {noise_mean / noise_factor:.3g}")
    return result


def widened(tolerances: Mapping[str, Tolerance], noise: Mapping[str, Mapping[str, float]],
            noise_factor: float = INT8_NOISE_FACTOR) -> dict[str, Tolerance]:
    """``tolerances`` made no tighter than ``noise_factor`` x the measured rounding noise.

    For an INT8 file whose roundings fall elsewhere than Keras's (ONNX
    Runtime's placement): in a deep network each one-step flip moves the
    values after it, and how far is what :func:`rounding_noise` measured on
    the QAT graph as converted.
    """
    result = {}
    for name, tolerance in tolerances.items():
        measured = noise.get(name, {})
        floor = noise_factor * measured.get("max_abs", 0.0)
        mean_floor = noise_factor * measured.get("mean_abs", 0.0)
        if floor <= tolerance.max_abs:
            result[name] = tolerance
            continue
        result[name] = Tolerance(
            floor, None if tolerance.mean_abs is None else max(tolerance.mean_abs, mean_floor),
            f"{tolerance.basis}, widened to {noise_factor:g} x rounding noise {floor / noise_factor:.3g}")
    return result


def run_graph(proto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an in-memory ONNX graph on ``feed``, as its Q/DQ arithmetic specifies.

    ONNX Runtime's CPU provider runs it with graph optimizations off
    (:func:`tfopt.artifacts._ort.arithmetic_session_options`): no Q/DQ pair is
    fused into an integer kernel, so the result is the graph's own and the
    same on every CPU, whatever its kernels do with int16 sums.
    """
    import onnxruntime

    from tfopt.artifacts._ort import arithmetic_session_options

    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           arithmetic_session_options(),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed))))


def rounding_noise(proto, feed: Mapping[str, np.ndarray], relative: float = 1e-5,
                   outputs: Optional[Mapping[str, np.ndarray]] = None
                   ) -> dict[str, dict[str, float]]:
    """How far a Q/DQ graph's outputs move when its arithmetic rounds differently.

    The graph is run on ``feed`` with ONNX Runtime's CPU provider as it is,
    and again with every weight ``DequantizeLinear`` scale multiplied by
    ``1 + relative``: a change far below what alters the model, which moves
    values that sit on rounding boundaries to the neighbouring level, as
    another engine's order of arithmetic does, and lets the graph carry
    those flips to its outputs.

    ``outputs``: the graph's outputs on ``feed`` (:func:`run_graph`), where
    the caller has them already; else the graph is run here.

    Returns:
        ``{output: {"max_abs", "mean_abs"}}`` of the difference between the runs.
    """
    from onnx import TensorProto, numpy_helper

    moved = type(proto)()
    moved.CopyFrom(proto)
    initializers = {i.name: i for i in moved.graph.initializer}
    scales = {n.input[1] for n in moved.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in initializers
              and initializers[n.input[0]].data_type in (TensorProto.INT8, TensorProto.UINT8)}
    for name in scales & set(initializers):
        scale = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(
            (scale * (1 + relative)).astype(scale.dtype), name))
    before = run_graph(proto, feed) if outputs is None else outputs
    after = run_graph(moved, feed)
    result = {}
    for name, value in before.items():
        diff = np.abs(np.asarray(after[name], np.float64) - np.asarray(value, np.float64))
        result[name] = {"max_abs": float(np.max(diff)) if diff.size else 0.0,
                        "mean_abs": float(np.mean(diff)) if diff.size else 0.0}
    return result


def compare(artifact: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
            tolerances: Mapping[str, Tolerance], advice: Optional[str] = None
            ) -> dict[str, OutputError]:
    """Errors per output; raise one ExportValidationError naming every output that drifts.

    Args:
        artifact: The artifact's name, for messages.
        reference: ``{output: Keras values}``.
        actual: ``{output: artifact values}``.
        tolerances: ``{output: Tolerance}``, e.g. from :func:`relative_tolerances`
            or :func:`int8_tolerances`.
        advice: What the error tells the user to do (default: check the inputs,
            or pass a larger ``tolerance=``).
    """
    errors, problems = {}, []
    for name, ref in reference.items():
        if name not in actual:
            problems.append(f"output {name!r} is missing; it returned {sorted(actual)}")
            continue
        got = np.asarray(actual[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            problems.append(f"output {name!r} has shape {got.shape}, Keras gives {ref.shape}")
            continue
        tolerance = tolerances[name]
        scale = _largest(ref)
        diff = np.abs(got - ref)
        max_abs = float(np.max(diff)) if ref.size else 0.0
        mean_abs = float(np.mean(diff)) if ref.size else 0.0
        if not np.isfinite(max_abs):
            max_abs = mean_abs = float("inf")
        agreement = argmax_agreement(ref, got)
        decisive = (_decisive_agreement(ref, got, tolerance.max_abs)
                    if tolerance.min_argmax_agreement is not None and agreement is not None
                    else None)
        errors[name] = OutputError(max_abs, max_abs / max(scale, 1e-12), tolerance.max_abs,
                                   mean_abs, tolerance.mean_abs, tolerance.basis, agreement)
        bad = int(np.sum(~np.isfinite(got)))
        if bad and np.all(np.isfinite(ref)):
            what = f"outputs NaN or infinity in {bad} of {got.size} values where Keras does not"
        elif decisive is not None and decisive < tolerance.min_argmax_agreement:
            what = (f"picks another class than the Keras model on {1 - decisive:.1%} of the "
                    f"inputs where Keras's top two scores are more than the tolerance "
                    f"{tolerance.max_abs:.3g} apart (at least "
                    f"{tolerance.min_argmax_agreement:.0%} must agree; {agreement:.2%} of all "
                    f"{len(ref)} do)")
        elif not max_abs <= tolerance.max_abs:
            what = (f"differs from the Keras model by up to {max_abs:.3g} "
                    f"({max_abs / max(scale, 1e-12):.2e} of its largest value {scale:.3g}), "
                    f"above the tolerance {tolerance.max_abs:.3g}")
        elif tolerance.mean_abs is not None and not mean_abs <= tolerance.mean_abs:
            what = (f"differs from the Keras model by {mean_abs:.3g} on average, above the "
                    f"tolerance {tolerance.mean_abs:.3g} for the mean")
        else:
            continue
        problems.append(f"output {name!r} {what} ({tolerance.basis})")
    if problems:
        raise ExportValidationError(
            f"{artifact}: " + "; ".join(problems) + ". Nothing was written. " + (
                advice or "Check the inputs, or pass a larger tolerance= if this precision "
                "loss is expected."))
    return errors


def argmax_agreement(reference: np.ndarray, actual: np.ndarray) -> Optional[float]:
    """The fraction of rows whose largest entry is at the same place (``None`` unless the
    output is a batch of class scores, shaped ``(batch, classes)`` with 2 or more classes)."""
    if reference.ndim != 2 or reference.shape[1] < 2 or not len(reference):
        return None
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(actual, axis=1)))


def _decisive_agreement(reference: np.ndarray, actual: np.ndarray, margin: float) -> float:
    """Argmax agreement over the rows whose top two reference scores are more than
    ``margin`` apart (1.0 if there are none): a row closer than that may flip within
    the tolerance, so only the others say anything about the artifact."""
    top = np.sort(reference, axis=1)[:, -2:]
    rows = (top[:, 1] - top[:, 0]) > margin
    if not rows.any():
        return 1.0
    return float(np.mean(np.argmax(reference[rows], 1) == np.argmax(actual[rows], 1)))


def _largest(values) -> float:
    return float(np.max(np.abs(values))) if np.size(values) else 0.0


# -- quantization steps of an ONNX Q/DQ graph ---------------------------------

# Ops that move no output by more than their input moves (|f(x) - f(y)| <= |x - y|
# elementwise, or a rearrangement of elements), through the first input.
_PASS_THROUGH = frozenset({
    "Identity", "Cast", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
    "Gather", "Split", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "Resize",
    "Relu", "LeakyRelu", "Clip", "Tanh", "Abs", "Neg", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceMin",
})
# Lipschitz constants below 1: the step shrinks.
_CONTRACTING = {"Softmax": 0.5, "Sigmoid": 0.25}
# Elementwise over several inputs, each moving the output by at most its own step.
_ELEMENTWISE_MAX = frozenset({"Max", "Min", "Concat"})
_LINEAR = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_LAYOUT = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def quantization_steps(proto) -> dict[str, Optional[float]]:
    """The quantization step of each output of an ONNX Q/DQ graph.

    The step of an output is how far one quantization step of one value at
    the last quantizers before it can move it:

    * the output of a ``DequantizeLinear``: its (largest) scale;
    * of a ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` with constant
      weights: the step of its input times the largest weight magnitude
      (one input value moving one step, against the largest weight); with
      two quantized inputs (``Dot``), each input's step times the other's
      largest representable magnitude, summed;
    * carried unchanged through ops that do not amplify differences (ReLU,
      pooling, reshapes, ...), halved through Softmax, summed over the
      inputs of ``Add``/``Sub``, scaled by constant factors of ``Mul``,
      ``Div`` and ``BatchNormalization``.

    Any other op on the way gives ``None`` for that output. The graph is
    read, not run: this holds for any Q/DQ placement.

    Args:
        proto: An ``onnx.ModelProto``.

    Returns:
        ``{graph output name: step or None}``.
    """
    from onnx import numpy_helper

    graph = proto.graph
    constants = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    producers = {o: n for n in graph.node for o in n.output}
    const_cache: dict[str, Optional[np.ndarray]] = {}
    step_cache: dict[str, Optional[float]] = {}

    def attribute(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return a.i if a.type == a.INT else a.f
        return default

    def const(name: str, depth: int = 0) -> Optional[np.ndarray]:
        """The value of a constant tensor (dequantized weights included), else None."""
        if not name:
            return None
        if name in const_cache:
            return const_cache[name]
        value = None
        if name in constants:
            value = numpy_helper.to_array(constants[name]).astype(np.float64)
        elif depth < 16 and name in producers:
            node = producers[name]
            if node.op_type == "DequantizeLinear":
                q, scale = const(node.input[0], depth + 1), const(node.input[1], depth + 1)
                zero = const(node.input[2], depth + 1) if len(node.input) > 2 else None
                if q is not None and scale is not None:
                    zero = 0.0 if zero is None else zero
                    if scale.ndim == 1 and q.ndim > 1:
                        shape = [1] * q.ndim
                        shape[attribute(node, "axis", 1)] = -1
                        scale, zero = scale.reshape(shape), np.reshape(zero, shape) \
                            if np.ndim(zero) else zero
                    value = (q - zero) * scale
            elif node.op_type in _LAYOUT:  # magnitudes are what count, not the layout
                value = const(node.input[0], depth + 1)
        const_cache[name] = value
        return value

    def bound(name: str) -> Optional[float]:
        """The largest magnitude a dequantized activation can take, else None."""
        node = producers.get(name)
        while node is not None and node.op_type in _LAYOUT:
            node = producers.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            return None
        scale = const(node.input[1])
        if scale is None:
            return None
        data_type = _element_type(graph, node.input[0], producers, constants)
        levels = 255.0 if data_type == "uint8" else 128.0
        return float(np.max(np.abs(scale))) * levels

    def step(name: str, depth: int = 0) -> Optional[float]:
        if name in step_cache:
            return step_cache[name]
        step_cache[name] = None  # a cycle or a deep chain gives up
        node = producers.get(name)
        if node is None or name in constants or depth > 500:
            return None
        op, result = node.op_type, None
        variable = [i for i in node.input if i and const(i) is None]
        if op == "DequantizeLinear":
            scale = const(node.input[1])
            result = None if scale is None else float(np.max(np.abs(scale)))
        elif op in _PASS_THROUGH or op in _CONTRACTING:
            if node.input and node.input[0] in variable:
                inner = step(node.input[0], depth + 1)
                result = None if inner is None else inner * _CONTRACTING.get(op, 1.0)
        elif op in _ELEMENTWISE_MAX or op in ("Add", "Sub"):
            parts = [step(i, depth + 1) for i in variable]
            if parts and None not in parts:
                result = max(parts) if op in _ELEMENTWISE_MAX else sum(parts)
        elif op in ("Mul", "Div") and len(variable) == 1 and (
                op == "Mul" or variable[0] == node.input[0]):
            other = const(next(i for i in node.input if i != variable[0]))
            inner = step(variable[0], depth + 1)
            if inner is not None and other is not None and other.size:
                factor = np.max(np.abs(other)) if op == "Mul" else 1.0 / np.min(np.abs(other))
                result = inner * float(factor)
        elif op == "BatchNormalization" and node.input[0] in variable:
            gamma, variance = const(node.input[1]), const(node.input[4])
            inner = step(node.input[0], depth + 1)
            if inner is not None and gamma is not None and variance is not None:
                factor = np.abs(gamma) / np.sqrt(variance + attribute(node, "epsilon", 1e-5))
                result = inner * float(np.max(factor))
        elif op in _LINEAR:
            a, b = node.input[0], node.input[1]
            weight_a, weight_b = const(a), const(b)
            if weight_b is not None and weight_a is None:
                inner = step(a, depth + 1)
                alpha = abs(attribute(node, "alpha", 1.0)) if op == "Gemm" else 1.0
                result = None if inner is None else \
                    inner * alpha * float(np.max(np.abs(weight_b)))
            elif weight_a is not None and weight_b is None and op == "MatMul":
                inner = step(b, depth + 1)
                result = None if inner is None else inner * float(np.max(np.abs(weight_a)))
            elif weight_a is None and weight_b is None and op == "MatMul":
                parts = [step(a, depth + 1), bound(b), step(b, depth + 1), bound(a)]
                if None not in parts:
                    result = parts[0] * parts[1] + parts[2] * parts[3]
        step_cache[name] = result
        return result

    return {output.name: step(output.name) for output in graph.output}


def _element_type(graph, name, producers, constants) -> str:
    """``"uint8"``, ``"int8"`` or ``""`` for the input of a DequantizeLinear."""
    from onnx import TensorProto

    if name in constants:
        data_type = constants[name].data_type
    else:
        node = producers.get(name)
        while node is not None and node.op_type in _LAYOUT and node.op_type != "Cast":
            node = producers.get(node.input[0])
        if node is None or node.op_type != "QuantizeLinear" or len(node.input) < 3:
            return ""
        zero = node.input[2]
        if zero not in constants:
            return ""
        data_type = constants[zero].data_type
    return {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}.get(data_type, "")


def sizes(path: Path) -> dict[str, int]:
    """Bytes on disk, and gzip-compressed (what a download or a registry stores)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = sum(p.stat().st_size for p in files)
    compressed = sum(len(gzip.compress(p.read_bytes(), compresslevel=6)) for p in files)
    return {"raw": raw, "gzip": compressed}

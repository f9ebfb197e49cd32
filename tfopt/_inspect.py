"""`tfopt inspect`: per-layer sparsity and quantization of a saved model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfopt.errors import ArtifactLoadError


def summary(path: Path, baseline: Path | None = None) -> str:
    """A text summary of a model or artifact; ``baseline``: a .keras model to compare with."""
    path = Path(path)
    if baseline is not None and (path.suffix != ".keras" or Path(baseline).suffix != ".keras"):
        raise ArtifactLoadError(
            f"--baseline compares two .keras models (parameters and FLOPs), got {path} and "
            f"{baseline}. Pass the dense model's .keras file as --baseline.")
    if path.suffix == ".keras":
        return _keras_summary(path, baseline)
    if path.suffix == ".onnx" and path.is_file():
        return _onnx_summary(path)
    if (path / "saved_model.pb").exists():
        return _saved_model_summary(path)
    if (path / "manifest.json").is_file():
        return _export_summary(path)
    if path.suffix == ".xml" and path.is_file() or (path.is_dir() and any(path.glob("*.xml"))):
        return _openvino_summary(path)
    raise ArtifactLoadError(
        f"{path} is not something tfopt inspect reads: pass a .keras file, an .onnx file, "
        "a SavedModel folder (with saved_model.pb), an OpenVINO IR (.xml or its folder) or a "
        "tfopt export folder (with manifest.json).")


def _load_failed(path, exc) -> ArtifactLoadError:
    return ArtifactLoadError(
        f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}. The "
        "file is truncated or not what its name says; export it again.")


def _export_summary(path: Path) -> str:
    import json

    try:
        manifest = json.loads((path / "manifest.json").read_text())
        artifacts = manifest["artifacts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _load_failed(path / "manifest.json", exc) from None
    rows = [f"tfopt export of {manifest.get('model', '?')!r}, precision "
            f"{manifest.get('precision', '?')}, created {manifest.get('created', '?')}"]
    errors = manifest.get("validation", {}).get("errors", {})
    for fmt, info in artifacts.items():
        worst = max((e.get("max_abs", 0.0) for e in errors.get(fmt, {}).values()), default=None)
        size = manifest.get("sizes", {}).get(fmt, {}).get("raw")
        rows.append(f"  {fmt:<14}{info.get('path', '?'):<28}"
                    f"{'' if size is None else f'{size:,} bytes':>16}"
                    f"{'' if worst is None else f'  max |diff| {worst:.2e}'}")
        portability = info.get("int8_portability")
        if isinstance(portability, dict):
            rows.append("    " + _portability_line(portability))
    sparsity = manifest.get("sparsity") or {}
    if sparsity:
        rows.append("sparsity: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sparsity.items()))
    return "\n".join(rows)


def _portability_line(portability: dict) -> str:
    kernels = portability.get("integer_kernels", "?")
    if portability.get("portable"):
        return (f"int8: portable to every x86 CPU kind ({kernels} integer kernels, largest pair "
                f"sum {portability.get('worst_pair_bound')} <= 32767)")
    names = ", ".join(o.get("node", "?") for o in portability.get("offending", [])[:3])
    return (f"int8: exact only on CPUs with {' or '.join(portability.get('requires', []))}: "
            f"int16 pair sums can saturate without them ({names})")


def _load_keras(path: Path):
    import keras

    try:
        return keras.models.load_model(path)
    except Exception as exc:  # noqa: BLE001 - zipfile, h5py, Keras: all mean the same here
        raise _load_failed(path, exc) from None


def _keras_summary(path: Path, baseline: Path | None = None) -> str:
    import keras

    import tfopt
    from tfopt import _flops, _tree
    from tfopt.pruning import PruneLowMagnitude
    from tfopt.quantization import QuantizeInputs, QuantizeTable, QuantizeWrapper

    model = _load_keras(path)
    sparsity = tfopt.sparsity(model)
    counts = _flops.count(model)
    rows = [f"{'layer':<40}{'type':<22}{'params':>10}{'FLOPs':>9}{'zeros':>8}  quantization"]
    for layer_path, layer in _tree.walk(model, stop=lambda la: isinstance(
            la, (PruneLowMagnitude, QuantizeWrapper, QuantizeInputs))):
        if not layer.weights and not isinstance(layer, QuantizeInputs):
            continue
        inner = getattr(layer, "layer", layer)
        zeros = [v for k, v in sparsity.items() if any(k == w.path for w in inner.weights)]
        quant = ""
        if isinstance(layer, QuantizeTable):
            quant = "int8 table, one scale per row"
        elif isinstance(layer, QuantizeWrapper):
            ranges = layer.activation_ranges()
            quant = f"int8 weights per channel, input |max| {max(ranges.values()):.3g}"
        elif isinstance(layer, QuantizeInputs):
            quant = "int8 inputs"
        if isinstance(layer, PruneLowMagnitude):
            quant = f"pruning wrapper, step {int(layer.pruning_step.numpy())}"
        flops = counts.per_layer.get(layer_path) or counts.per_layer.get(
            f"{layer_path}/{inner.name}", 0)
        rows.append(f"{layer_path:<40}{type(inner).__name__:<22}{inner.count_params():>10,}"
                    f"{_flops.human(flops) if flops else '':>9}"
                    f"{'' if not zeros else f'{100 * zeros[0]:.1f}%':>8}  {quant}")
    total = sum(float(np.mean(keras.ops.convert_to_numpy(w) == 0)) * np.prod(w.shape)
                for w in model.weights if w.trainable)
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    rows.append(f"\n{model.name}: {params:,} trainable parameters, "
                f"{100 * total / max(params, 1):.1f}% zeros overall")
    rows.append(f"{counts.params:,} parameters, {_flops.human(counts.flops)} FLOPs per sample "
                "(2 x multiply-accumulates of convolutions and Dense layers)")
    if baseline is not None:
        before = _flops.count(_load_keras(Path(baseline)))
        params_ratio, flops_ratio = before.ratio(counts)
        rows.append(f"{'':<14}{'parameters':>14}{'FLOPs':>12}")
        rows.append(f"{'before':<14}{before.params:>14,}{_flops.human(before.flops):>12}"
                    f"  ({Path(baseline).name})")
        rows.append(f"{'after':<14}{counts.params:>14,}{_flops.human(counts.flops):>12}"
                    f"  ({path.name})")
        rows.append(f"{'after/before':<14}{params_ratio:>14.3f}{flops_ratio:>12.3f}")
    return "\n".join(rows)


def _saved_model_summary(path: Path) -> str:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001 - TF's DecodeError, OSError, ...
        raise _load_failed(path, exc) from None
    rows = [f"{'variable':<60}{'shape':<20}{'zeros':>8}"]
    for variable in sorted(loaded.variables, key=lambda v: v.name):
        value = variable.numpy()
        rows.append(f"{variable.name:<60}{str(tuple(value.shape)):<20}"
                    f"{100 * float(np.mean(value == 0)):>7.1f}%")
    serving = loaded.signatures.get("serving_default")
    if serving is not None:
        inputs = {k: (tuple(v.shape), v.dtype.name)
                  for k, v in serving.structured_input_signature[1].items()}
        outputs = {k: (tuple(v.shape), v.dtype.name) for k, v in serving.structured_outputs.items()}
        rows.append(f"\nserving_default: inputs {inputs}, outputs {outputs}")
    return "\n".join(rows)


def _openvino_summary(path: Path) -> str:
    """Inputs, outputs, operation counts and int8 FakeQuantize nodes of an OpenVINO IR."""
    import collections

    from tfopt.artifacts._openvino import _core, import_openvino, model_path

    import_openvino()  # a clear error when OpenVINO is not installed
    xml = model_path(path)
    try:
        model = _core().read_model(str(xml))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for all of it
        raise _load_failed(xml, exc) from None
    ops = collections.Counter(op.get_type_name() for op in model.get_ops())

    def describe(ports):
        return {p.get_any_name(): str(p.get_partial_shape()) for p in ports}

    rows = [f"{xml.name}: OpenVINO IR, {sum(ops.values())} operations",
            f"inputs {describe(model.inputs)}, outputs {describe(model.outputs)}"]
    quantized = ops.get("FakeQuantize", 0)
    rows.append(f"int8: {quantized} FakeQuantize nodes (run as int8 kernels)" if quantized
                else "no FakeQuantize: a float model")
    rows.append("operations: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
    return "\n".join(rows)


def _onnx_summary(path: Path) -> str:
    """Inputs, outputs, Q/DQ placement and how ONNX Runtime's CPU provider runs it."""
    import onnx

    from tfopt.artifacts._ort import qdq_placement
    from tfopt.export import _ort_quant

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise _load_failed(path, exc) from None

    def describe(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    initializers = {i.name for i in proto.graph.initializer}
    rows = [f"{path.name}: opset {max(o.version for o in proto.opset_import)}, "
            f"{len(proto.graph.node)} nodes",
            f"inputs {describe(proto.graph.input)}, outputs {describe(proto.graph.output)}"]
    placement = qdq_placement(proto)
    if placement is None:
        rows.append("no Q/DQ: a float graph")
    else:
        weights = sum(1 for n in proto.graph.node
                      if n.op_type == "DequantizeLinear" and n.input[0] in initializers)
        rows.append(f"int8 Q/DQ, {weights} quantized weights, placed for {placement}")
    report = _ort_quant.kernel_report(path)
    rows.append(f"ONNX Runtime CPU: {report['integer']} of {report['total']} "
                "convolutions/matrix products run as integer kernels"
                + (f" {report['ops']}" if report["ops"] else ""))
    if report["float"] and placement is not None:
        rows.append(f"in float: {', '.join(report['float'])}")
    return "\n".join(rows)

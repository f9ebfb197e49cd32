"""`tfopt.export`: every artifact a server loads, each validated against Keras."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

import tfopt
from tfopt import _compat
from tfopt.errors import ConfigError, NotAKerasModelError
from tfopt.export import (
    _onnx, _ort_quant, _saved_model, _signature, _staging, _tensorrt, _tftrt, _triton,
)
from tfopt.export._validate import (compare, int8_tolerances, quantization_steps,
                                    relative_tolerances, rounding_noise, sizes)

logger = logging.getLogger(__name__)

FORMATS = ("saved_model", "frozen_graph", "onnx", "tensorrt", "tftrt", "triton")
PRECISIONS = ("fp32", "fp16", "int8")
# Where an INT8 ONNX puts its Q/DQ, by the engine that runs it as integer kernels.
PLACEMENTS = ("onnxruntime", "tensorrt")


@dataclasses.dataclass
class ExportResult:
    """What :func:`tfopt.export` wrote, and how close each artifact is to Keras.

    Attributes:
        directory: The export directory.
        paths: ``{format: path}`` of every artifact written.
        errors: ``{format: {output: {"max_abs", "max_rel", "tolerance", "mean_abs",
            "mean_tolerance", "basis"}}}``: each output's error and what it was allowed.
        sizes: ``{format: {"raw": bytes, "gzip": bytes}}``.
        manifest: The contents of ``manifest.json`` (also written to disk).
    """

    directory: Path
    paths: dict
    errors: dict
    sizes: dict
    manifest: dict

    @property
    def max_abs_error(self) -> float:
        """The largest absolute difference from Keras over all artifacts and outputs."""
        values = [e["max_abs"] for per in self.errors.values() for e in per.values()]
        return max(values) if values else 0.0

    @property
    def max_rel_error(self) -> float:
        """The largest difference relative to the output's magnitude."""
        values = [e["max_rel"] for per in self.errors.values() for e in per.values()]
        return max(values) if values else 0.0

    def summary(self) -> str:
        lines = [f"{'artifact':<14}{'size':>12}{'gzip':>12}{'max |diff|':>12}  path"]
        for fmt, path in self.paths.items():
            size = self.sizes.get(fmt, {})
            err = max((e["max_abs"] for e in self.errors.get(fmt, {}).values()), default=None)
            lines.append(
                f"{fmt:<14}{size.get('raw', 0):>12,}{size.get('gzip', 0):>12,}"
                f"{'' if err is None else f'{err:.2e}':>12}  {path}")
        return "\n".join(lines)


def export(model, directory: Union[str, os.PathLike], *,
           formats: Sequence[str] = ("saved_model", "onnx"), precision: str = "fp32",
           input_signature=None, validation_data=None, version: int = 1,
           overwrite: bool = False, freeze: bool = False, warmup: bool = False,
           opset: int = _onnx.DEFAULT_OPSET, batch_sizes: tuple[int, int, int] = (1, 8, 64),
           name: Optional[str] = None, tolerance: Optional[float] = None,
           placement: str = "onnxruntime") -> ExportResult:
    """Export a Keras model for serving and check every artifact against it.

    Artifacts (``formats``), under ``directory``:

    * ``saved_model``: ``saved_model/<version>/``, TF Serving's layout, with a
      ``serving_default`` signature whose inputs and outputs carry the
      model's names and a dynamic batch dimension (``freeze=True`` stores
      the graph with variables as constants; ``warmup=True`` adds TF
      Serving warm-up requests built from ``validation_data``).
    * ``frozen_graph``: ``frozen_graph.pb``, a GraphDef with constants and
      BatchNorm folded.
    * ``onnx``: ``model.onnx`` through tf2onnx (opset ``opset``); FP16 inside
      with float32 I/O for ``precision="fp16"``; int8 Q/DQ for QAT models,
      placed for the engine named by ``placement``.
    * ``tensorrt``: ``model.plan``, a TensorRT engine built from the ONNX
      in TensorRT's placement (needs the ``tensorrt`` package and a GPU),
      with a batch profile ``batch_sizes=(min, opt, max)`` and
      ``timing.cache`` reused across runs.
    * ``tftrt``: ``tftrt/<version>/``, only where TensorFlow has TensorRT.
    * ``triton``: ``triton/<name>/``, a Triton model repository serving the ONNX.

    Each artifact is written beside its target, run on ``validation_data``
    (random inputs if none are given), compared with the Keras outputs, and
    moved into place only when all of them pass. Existing artifacts are kept
    unless ``overwrite=True``, and survive any failure byte for byte.

    Args:
        model: A Keras 3 model (pruned ones stripped; QAT models as they are).
        directory: Where to write.
        formats: Any of ``FORMATS``.
        precision: ``"fp32"``, ``"fp16"`` (ONNX/TensorRT/TF-TRT) or ``"int8"``
            (QAT models; TF-TRT calibrates on ``validation_data``).
        input_signature: ``tf.TensorSpec`` per input, needed for subclassed
            models never called on a symbolic input.
        validation_data: Real inputs (array, list or dict by input name).
        version: The version folder for TF Serving and Triton.
        overwrite: Replace existing artifacts (after the new ones validate).
        freeze: Store the SavedModel's serving graph with constants.
        warmup: Write TF Serving warm-up requests (needs validation_data).
        opset: ONNX opset.
        batch_sizes: TensorRT profile and Triton's ``max_batch_size`` (the max).
        name: Model name for Triton (default: the Keras model's name).
        tolerance: Allowed error relative to each output's largest magnitude,
            replacing the default: fp32 1e-4 and fp16 2e-2 of it (plus a small
            floor); int8 Q/DQ a few quantization steps of each output, read
            from the ONNX's scales (``tfopt.export._validate.int8_tolerances``),
            so that a scale off by 1% is refused.
        placement: For QAT models, where the ONNX puts its Q/DQ.
            ``"onnxruntime"`` (default): BatchNormalization folded into the
            convolutions, a Q after each one, uint8 activations and int32
            biases, the form ONNX Runtime's CPU provider and OpenVINO run as
            integer kernels (ranges QAT did not train are calibrated on
            ``validation_data``). ``"tensorrt"``: int8 Q/DQ with zero points
            0 on the inputs and weights of each layer and both inputs of
            residual adds, BatchNormalization left for TensorRT to fuse
            (what ``trtexec`` and Triton's TensorRT backend build from; slow
            on ONNX Runtime's CPU provider). The manifest records which.

    Returns:
        An :class:`ExportResult`.

    Example:
        >>> result = tfopt.export(tfopt.strip(pruned), "out/digits",
        ...                       formats=("saved_model", "onnx"), validation_data=x[:64])
        >>> result.paths["onnx"], result.max_abs_error
    """
    if not isinstance(model, keras.Model):
        kind = _compat.check_keras_model(model)  # raises for anything else
        if kind == "tf_keras":
            raise NotAKerasModelError(
                "tfopt.export takes Keras 3 models. For a tf_keras model, save it with "
                "tf.saved_model.save and convert with tf2onnx.convert.from_keras; tfmot QAT "
                "models convert to uint8 activation-only Q/DQ that TensorRT rejects.")
    _compat.check_keras_model(model)
    formats = _check_formats(formats)
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}. Valid: {list(PRECISIONS)}.")
    if placement not in PLACEMENTS:
        raise ConfigError(
            f"Unknown placement {placement!r}. Valid: {list(PLACEMENTS)}: 'onnxruntime' for "
            "ONNX Runtime's CPU provider and OpenVINO, 'tensorrt' for TensorRT.")
    from tfopt.pruning import is_pruned
    from tfopt.quantization import is_quantized

    if is_pruned(model):
        raise ConfigError(
            f"Model {model.name!r} still carries pruning wrappers: export "
            "tfopt.strip(model) so the masks are baked into the weights.")
    quantized = is_quantized(model)
    precision = _effective_precision(precision, quantized, formats)
    if warmup and validation_data is None:
        raise ConfigError("warmup=True builds TF Serving warm-up requests from "
                          "validation_data: pass some real inputs.")
    if not (isinstance(version, int) and version >= 1):
        raise ConfigError(f"version must be a positive integer, got {version!r}.")

    signature = _signature.infer(model, input_signature)
    if validation_data is None:
        logger.warning("No validation_data: artifacts are checked on random inputs. "
                       "Pass real inputs (e.g. x_test[:64]) for a meaningful check.")
        feed = _signature.random_feed(signature)
    else:
        feed = _signature.as_feed(signature, validation_data)
    reference = {k: np.asarray(v) for k, v in signature.call(model, feed).items()}

    name = name or model.name
    directory = Path(directory)
    targets = {
        "saved_model": f"saved_model/{version}", "frozen_graph": "frozen_graph.pb",
        "onnx": "model.onnx", "tensorrt": "model.plan", "tftrt": f"tftrt/{version}",
        "triton": f"triton/{name}",
    }
    chosen = {f: targets[f] for f in formats}
    errors, artifact_sizes, extra = {}, {}, {}
    serve = _saved_model.serving_function(model, signature)
    with _staging.Staging(directory, [*chosen.values(), "manifest.json"], overwrite) as stage:

        def staged(fmt):  # where a format's artifact goes: committed if asked for
            if fmt in chosen:
                return stage.path(chosen[fmt])
            aux = stage.root / "aux"
            aux.mkdir(exist_ok=True)
            return aux / Path(targets[fmt]).name

        built = {}
        progress = _progress(formats)

        def need(fmt):
            if fmt not in built:
                built[fmt] = _BUILDERS[fmt](model, signature, serve, staged(fmt), need,
                                            feed=feed, precision=precision, freeze=freeze,
                                            warmup=warmup, opset=opset, quantized=quantized,
                                            batch_sizes=batch_sizes, name=name, version=version,
                                            reference=reference, directory=directory,
                                            placement=placement)
                if fmt in chosen:
                    run = built[fmt].get("run")
                    if run is not None:
                        limits = _tolerances(fmt, precision, reference, built, tolerance)
                        errors[fmt] = {k: e.as_dict() for k, e in compare(
                            fmt, reference, run(feed), limits).items()}
                    artifact_sizes[fmt] = sizes(staged(fmt))
                    extra[fmt] = {k: v for k, v in built[fmt].items()
                                  if k not in ("run", "path", "timing_cache")}
                    progress.update(1)
            return built[fmt]

        for fmt in formats:
            need(fmt)
        progress.close()
        manifest = _manifest(model, signature, reference, formats, chosen, precision, quantized,
                             errors, artifact_sizes, extra, validation_data is not None)
        stage.path("manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        stage.commit()
        if "tensorrt" in built:  # a cache, not an artifact: kept for the next build
            shutil.copy2(built["tensorrt"]["timing_cache"], directory / "timing.cache")
    paths = {fmt: directory / target for fmt, target in chosen.items()}
    result = ExportResult(directory, paths, errors, artifact_sizes, manifest)
    logger.info("Exported %s to %s (max |diff| %.2e).", ", ".join(formats), directory,
                result.max_abs_error)
    return result


def _check_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(
            f"Unknown export format(s) {unknown or list(formats)}. Valid formats: {list(FORMATS)}.")
    return tuple(dict.fromkeys(formats))


def _effective_precision(precision: str, quantized: bool, formats) -> str:
    if quantized:
        if precision == "fp16":
            raise ConfigError(
                "A QAT model exports int8 Q/DQ; precision='fp16' does not apply to it. "
                "Use precision='int8' (or leave the default).")
        return "int8"
    if precision == "int8" and any(f in formats for f in ("onnx", "tensorrt", "triton")):
        raise ConfigError(
            "precision='int8' for ONNX/TensorRT needs Q/DQ in the graph: quantize the model "
            "first with tfopt.quantize(model) and fine-tune it, then export that model.")
    return precision


def _validation_precision(fmt: str, precision: str) -> str:
    # The SavedModel and frozen graph compute exactly what Keras computes.
    return "fp32" if fmt in ("saved_model", "frozen_graph") else precision


def _tolerances(fmt: str, precision: str, reference, built, tolerance):
    """What each output of ``fmt`` may differ from Keras by.

    INT8 artifacts built from the Q/DQ ONNX (the ONNX itself, TensorRT,
    Triton) get bounds in quantization steps of each output, read from that
    ONNX's scales (``qdq_steps`` of the ONNX it runs: ``built["tensorrt"]`` when
    TensorRT built its own placement, else ``built["onnx"]``), widened where the
    graph carries rounding flips far (``qdq_noise``); everything else a
    fraction of each output's largest magnitude. ``tolerance`` replaces both.
    """
    precision = _validation_precision(fmt, precision)
    source = built.get(fmt) if "qdq_steps" in built.get(fmt, {}) else built.get("onnx", {})
    if tolerance is None and precision == "int8" and "qdq_steps" in source:
        if fmt in ("onnx", "tensorrt", "triton"):
            # ORT's placement re-derives ranges QAT did not train (and folds BN): its
            # outputs sit further from Keras than TensorRT's placement, which is Keras's graph.
            loose = source.get("qdq_placement", "tensorrt") != "tensorrt" and fmt != "tensorrt"
            return int8_tolerances(source["qdq_steps"], reference, source["qdq_noise"],
                                   **({"mean_steps": 4.0} if loose else {}))
    return relative_tolerances(reference, precision, tolerance)


def _progress(formats):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=len(formats), desc="export", unit="artifact", disable=None, leave=False)


# -- one builder per format: write the artifact, return how to run it --------

def _saved_model_runner(path: Path, signature):
    def run(arrays):
        loaded = tf.saved_model.load(str(path)).signatures["serving_default"]
        out = loaded(**{s.name: tf.constant(a) for s, a in zip(signature.inputs, arrays)})
        return {k: v.numpy() for k, v in out.items()}

    return run


def _onnx_runner(path: Path, signature):
    def run(arrays):
        session = _onnx.session(path)
        values = session.run(list(signature.outputs),
                             {s.name: a for s, a in zip(signature.inputs, arrays)})
        return dict(zip(signature.outputs, values))

    return run


def _build_saved_model(model, signature, serve, path, need, *, feed, freeze, warmup, **_):
    _saved_model.write_saved_model(model, signature, path, freeze=freeze,
                                   warmup=feed if warmup else None)
    return {"run": _saved_model_runner(path, signature), "frozen": freeze}


def _build_frozen_graph(model, signature, serve, path, need, **_):
    output_names, input_names = _saved_model.write_frozen_graph(model, signature, path)

    def run(arrays):
        fn = _saved_model.load_frozen_graph(path, input_names, output_names)
        values = fn(*[tf.constant(a) for a in arrays])
        return {k: v.numpy() for k, v in zip(signature.outputs, values)}

    return {"run": run, "inputs": input_names, "outputs": output_names}


def _build_onnx(model, signature, serve, path, need, *, precision, opset, quantized, feed,
                placement, **_):
    proto = _onnx.convert(serve, signature, opset=opset, quantized=quantized)
    info = {"opset": opset}
    if quantized:
        info["qdq"] = _onnx.check_weight_qdq(proto)
        info["qdq_placement"] = placement
        if placement == "onnxruntime":
            proto = _ort_quant.quantize_for_cpu(proto, signature.input_names, feed)
    if quantized:
        # What validation allows each output of this graph (the placement's own Q/DQ)
        # and of what is built from it.
        info["qdq_steps"] = quantization_steps(proto)
        info["qdq_noise"] = rounding_noise(
            proto, {s.name: a for s, a in zip(signature.inputs, feed)})
    if precision == "fp16":
        proto = _onnx.to_fp16(proto)
    _onnx.save(proto, path)
    if quantized:
        info["ort_cpu_kernels"] = _kernel_report(path, placement)
    return {"run": _onnx_runner(path, signature), **info}


def _kernel_report(path: Path, placement: str) -> dict:
    """Which compute ops ONNX Runtime's CPU provider runs as integer kernels; warn about the rest."""
    report = _ort_quant.kernel_report(path)
    left = report["float"]
    if left and placement == "onnxruntime":
        warnings.warn(
            f"{len(left)} of {report['total']} convolutions/matrix products run in float on "
            f"ONNX Runtime's CPU provider: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}. "
            "They are layers QAT left in float, or patterns ONNX Runtime does not fuse.",
            stacklevel=4)
    return {"integer": report["integer"], "total": report["total"], "ops": report["ops"]}


def _build_tensorrt(model, signature, serve, path, need, *, precision, batch_sizes,
                    directory, quantized, placement, opset, feed, **_):
    _compat.import_tensorrt()  # a clear error before any work
    steps = {}
    if quantized and placement != "tensorrt":
        # TensorRT builds INT8 from its own placement (int8, zero points 0), not ORT's.
        onnx_path = path.with_name("tensorrt-placement.onnx")
        proto = _onnx.convert(serve, signature, opset=opset, quantized=True)
        _onnx.save(proto, onnx_path)
        steps = {"qdq_steps": quantization_steps(proto), "qdq_noise": rounding_noise(
            proto, {s.name: a for s, a in zip(signature.inputs, feed)})}
    else:
        onnx_info = need("onnx")
        onnx_path = onnx_info["path"]
        steps = {k: onnx_info[k] for k in ("qdq_steps", "qdq_noise") if k in onnx_info}
    cache = path.parent / "timing.cache.staged"
    if (directory / "timing.cache").exists():
        shutil.copy2(directory / "timing.cache", cache)
    two_four = _two_four_weights(model)
    sparse = bool(two_four)
    _tensorrt.build_engine(onnx_path, path, signature, precision=precision,
                           batch_sizes=batch_sizes, sparse_weights=sparse, timing_cache=cache)
    return {"run": lambda arrays: _tensorrt.run_engine(path, signature, arrays),
            "timing_cache": cache, "sparse_weights": sparse, "two_four_weights": two_four,
            **steps}


def _build_tftrt(model, signature, serve, path, need, *, precision, feed, **_):
    _tftrt.convert(need("saved_model")["path"], path, precision=precision,
                   calibration=feed)
    return {"run": _saved_model_runner(path, signature)}


def _build_triton(model, signature, serve, path, need, *, reference, batch_sizes,
                  name, version, **_):
    onnx_path = need("onnx")["path"]
    shapes = {k: (v.shape, v.dtype) for k, v in reference.items()}
    _triton.write_repository(path.parent, name, version, "onnx", onnx_path, signature, shapes,
                             max_batch_size=batch_sizes[2])
    return {"run": _onnx_runner(path / str(version) / "model.onnx", signature)}


_BUILDERS = {}


def _register(fmt, builder):
    def wrapped(model, signature, serve, path, need, **kwargs):
        info = builder(model, signature, serve, path, need, **kwargs)
        info["path"] = path
        return info

    _BUILDERS[fmt] = wrapped


for _fmt, _builder in [("saved_model", _build_saved_model), ("frozen_graph", _build_frozen_graph),
                       ("onnx", _build_onnx), ("tensorrt", _build_tensorrt),
                       ("tftrt", _build_tftrt), ("triton", _build_triton)]:
    _register(_fmt, _builder)


def _two_four_weights(model) -> list[str]:
    """The weights whose every group of 4 input channels has 2 zeros, for SPARSE_WEIGHTS.

    TensorRT picks sparse kernels layer by layer, so one 2:4 layer is enough
    to turn the flag on; layers left dense (a first convolution on 3
    channels, say) are simply built dense.
    """
    from tfopt.pruning._api import n_m_weights

    try:
        found = n_m_weights(model, 2, 4)
    except Exception:  # noqa: BLE001 - a report, not a requirement
        return []
    return [path for path, two_four in found.items() if two_four]


def _manifest(model, signature, reference, formats, chosen, precision, quantized, errors,
              artifact_sizes, extra, real_inputs) -> dict:
    from tfopt.pruning import sparsity

    try:
        model_sparsity = sparsity(model)
    except Exception:  # noqa: BLE001 - a report, not a requirement
        model_sparsity = {}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.name,
        "versions": {"tfopt": tfopt.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
        "formats": list(formats),
        "artifacts": {fmt: {"path": target, **extra.get(fmt, {})} for fmt, target in chosen.items()},
        "precision": precision,
        "quantized": quantized,
        "signature": {
            "inputs": signature.describe()["inputs"],
            "outputs": [{"name": name, "shape": [None, *map(int, reference[name].shape[1:])],
                         "dtype": reference[name].dtype.name} for name in signature.outputs],
        },
        "sparsity": model_sparsity,
        "validation": {"inputs": "validation_data" if real_inputs else "random", "errors": errors},
        "sizes": artifact_sizes,
    }

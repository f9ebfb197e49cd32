"""`tfopt.export`: every artifact a server loads, each validated against Keras."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from tfopt import _checks, _compat, _data, distribute
from tfopt._quiet import third_party_quiet
from tfopt._version import __version__
from tfopt._warn import warn_user
from tfopt.errors import (ConfigError, ExportValidationError, ModelOutputsNaNError,
                          NotAKerasModelError, TfoptError)
from tfopt.export import (
    _onnx, _ort_quant, _saved_model, _signature, _staging, _tensorrt, _tftrt, _triton,
)
from tfopt.export._validate import (compare, int8_tolerances, quantization_steps,
                                    relative_tolerances, rounding_noise, run_graph, sizes,
                                    widened)
from tfopt.quantization._api import quant_wrappers
from tfopt.quantization._wrapper import constant_weights
from tfopt.targets import _cpu_int8, _tensorrt as _tensorrt_rules

logger = logging.getLogger(__name__)

FORMATS = ("saved_model", "saved_model_xla", "frozen_graph", "onnx", "openvino", "tensorrt",
           "tftrt", "triton")
PRECISIONS = ("fp32", "fp16", "int8")
# Where an INT8 ONNX puts its Q/DQ, by the engine that runs it as integer kernels.
PLACEMENTS = ("onnxruntime", "tensorrt")
# Samples read from a tf.data.Dataset given as validation_data: what every artifact is
# run on (and, for QAT models, the calibration of ranges QAT did not train).
VALIDATION_SAMPLES = 256


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
        skipped: Why nothing was written (a worker that is not the chief), or None.
    """

    directory: Path
    paths: dict
    errors: dict
    sizes: dict
    manifest: dict
    # On a worker of a multi-worker cluster that is not the chief: nothing was written,
    # and this says which worker this was (tfopt.distribute).
    skipped: Optional[str] = None

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
        if self.skipped:
            return f"Nothing written to {self.directory}: {self.skipped}."
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
           placement: str = "onnxruntime", fp16_io: bool = False,
           image_signatures: Sequence[str] = ()) -> ExportResult:
    """Export a Keras model for serving and check every artifact against it.

    Artifacts (``formats``), under ``directory``:

    * ``saved_model``: ``saved_model/<version>/``, TF Serving's layout, with a
      ``serving_default`` signature whose inputs and outputs carry the
      model's names and a dynamic batch dimension (``freeze=True`` stores
      the graph with variables as constants; ``warmup=True`` adds TF
      Serving warm-up requests built from ``validation_data``).
    * ``saved_model_xla``: ``saved_model_xla/<version>/``, TF Serving's layout,
      its ``serving_default`` a ``tf.function(jit_compile=True)`` that
      TensorFlow compiles with XLA (the SavedModel keeps the
      ``_XlaMustCompile`` attribute; the export checks it). With
      ``precision="fp16"`` it serves a float16 copy of the model (weights
      cast, each layer's dtype policy float16; float32 inputs and outputs).
      TF Serving runs it only when started with
      ``--xla_cpu_compilation_enabled=true`` (which, despite its name, lets
      it compile XLA on any device). Float models only; validated here
      through XLA on the CPU.
    * ``frozen_graph``: ``frozen_graph.pb``, a GraphDef with constants and
      BatchNorm folded.
    * ``onnx``: ``model.onnx`` through tf2onnx (opset ``opset``); FP16 inside
      with float32 I/O for ``precision="fp16"`` (float16 I/O too with
      ``fp16_io=True``); int8 Q/DQ for QAT models, placed for the engine
      named by ``placement``.
    * ``openvino``: ``openvino/model.xml`` and ``model.bin``, an OpenVINO IR
      converted by OpenVINO's own converter from the ONNX (QAT models keep
      int8 as FakeQuantize; ``precision="fp16"`` stores fp16-compressed
      weights). Validated with the f32 inference precision, and also with
      bf16 (bf16 tolerance) where the CPU has bf16.
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
        precision: ``"fp32"``, ``"fp16"`` (ONNX/TensorRT/TF-TRT/XLA SavedModel) or ``"int8"``
            (QAT models; TF-TRT calibrates on ``validation_data``).
        input_signature: ``tf.TensorSpec`` per input. Without it, inputs
            come from the model's symbolic inputs, else (a subclassed model)
            from the shapes it was built or called with, as Keras'
            ``model.export`` reads them, else from ``validation_data``.
        validation_data: Real inputs (array, list or dict by input name), or
            a ``tf.data.Dataset`` of inputs or ``(inputs, labels)``, as
            ``fit()`` takes (batched or not): its first 256 samples are
            read, the rest is never loaded.
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
        fp16_io: With ``precision="fp16"``, make the ONNX graph's float inputs
            and outputs float16 too: no Cast of the input batch on the way
            in, none of the outputs on the way out. Callers then feed
            float16 (tfopt's ONNX Runtime runners cast what they are given).
            Validated against Keras with the fp16 tolerance. ONNX only: the
            formats built from it (``openvino``, ``tensorrt``, ``triton``)
            are refused with it; export them in a call of their own.
        image_signatures: Extra SavedModel signatures for an image model
            (one input of shape ``(batch, height, width, 1|3|4)``), for TF
            Serving clients that send images as they have them:
            ``"image_bytes"`` adds ``serving_image_bytes``, taking a batch of
            encoded JPEG/PNG/GIF/BMP files (``tf.string``), decoded and
            resized to the model's size inside the SavedModel; ``"uint8"``
            adds ``serving_uint8``, taking uint8 images of any size, resized
            there. Pixels reach the model as float in [0, 255], as
            ``image_dataset_from_directory`` gives them. Each is validated
            against ``serving_default`` on the validation images (as PNG).

    Returns:
        An :class:`ExportResult`. On a worker of a multi-worker cluster that
        is not its chief (``TF_CONFIG``, see :mod:`tfopt.distribute`),
        nothing is built or written, and the result's ``skipped`` says so.

    Example:
        >>> result = tfopt.export(tfopt.strip(pruned), "out/digits",
        ...                       formats=("saved_model", "onnx"), validation_data=x[:64])
        >>> result.paths["onnx"], result.max_abs_error
    """
    worker = distribute.current_worker(getattr(model, "distribute_strategy", None))
    if not worker.is_chief:
        # Every worker of a cluster runs the same script; the chief writes for all of them.
        logger.info("Export to %s skipped: %s is not the chief.", directory, worker)
        return ExportResult(Path(directory), {}, {}, {}, {},
                            skipped=f"{worker} is not the chief; the chief exports")
    plan = _plan(model, directory, formats=formats, precision=precision,
                 input_signature=input_signature, validation_data=validation_data,
                 version=version, overwrite=overwrite, freeze=freeze, warmup=warmup,
                 opset=opset, batch_sizes=batch_sizes, name=name, tolerance=tolerance,
                 placement=placement, fp16_io=fp16_io, image_signatures=image_signatures)
    stage = _staging.Staging(plan.directory, [*plan.targets.values(), "manifest.json",
                                             "timing.cache"],
                             overwrite, owned=_owned(plan), keep=("timing.cache",))
    stage.check_target()  # fail fast, before any build; checked again under the lock
    with stage:
        built = _build(plan, stage)
        artifacts = _validate(plan, built)
        manifest = _manifest(plan, artifacts)
        stage.path("manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        stage.commit()
    paths = {a.format: plan.directory / a.target for a in artifacts}
    result = ExportResult(plan.directory, paths, {a.format: a.errors for a in artifacts},
                          {a.format: a.sizes for a in artifacts}, manifest)
    logger.info("Exported %s to %s (max |diff| %.2e).", ", ".join(plan.formats), plan.directory,
                result.max_abs_error)
    return result


# -- plan: check everything, compute the Keras reference, change nothing -------

@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What one export will write, decided and checked before anything is built."""

    model: keras.Model
    directory: Path
    formats: tuple[str, ...]
    targets: dict  # {format: path relative to directory}, the chosen formats only
    precision: str
    quantized: bool
    signature: _signature.ModelSignature
    feed: list
    reference: dict
    real_inputs: bool
    freeze: bool
    warmup: bool
    opset: int
    batch_sizes: tuple[int, int, int]
    name: str
    version: int
    tolerance: Optional[float]
    placement: str
    fp16_io: bool = False
    image_signatures: tuple = ()
    labels: Optional[np.ndarray] = None  # class labels of the feed (a labelled dataset)

    def target(self, fmt: str) -> str:
        return _targets(self.name, self.version)[fmt]


@dataclasses.dataclass
class BuiltArtifact:
    """One artifact as a builder wrote it into the staging folder."""

    format: str
    path: Path  # in the staging folder
    run: Optional[Callable[[list], dict]] = None  # arrays -> {output: array}
    info: dict = dataclasses.field(default_factory=dict)  # extra manifest fields
    # For an INT8 Q/DQ graph: {"qdq_steps", "qdq_noise"} of the ONNX it runs, from which
    # validation derives its tolerances in quantization steps (not in the manifest).
    steps: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ArtifactResult:
    """One chosen artifact after validation: what goes into the result and manifest."""

    format: str
    target: str
    errors: dict  # {output: {"max_abs", "max_rel", "tolerance"}}
    sizes: dict
    info: dict


def _targets(name: str, version: int) -> dict:
    return {"saved_model": f"saved_model/{version}",
            "saved_model_xla": f"saved_model_xla/{version}", "frozen_graph": "frozen_graph.pb",
            "onnx": "model.onnx", "openvino": "openvino", "tensorrt": "model.plan",
            "tftrt": f"tftrt/{version}", "triton": f"triton/{name}"}


def _owned(plan: ExportPlan) -> list[str]:
    """What a previous export into the directory may have written: removed if not rewritten."""
    owned = [t for fmt, t in _targets(plan.name, plan.version).items() if fmt not in plan.targets]
    previous = plan.directory / "manifest.json"
    try:
        old = json.loads(previous.read_text())
        owned += [a["path"] for a in old.get("artifacts", {}).values()
                  if isinstance(a, dict) and _is_relative(a.get("path"))]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return [t for t in dict.fromkeys(owned) if t not in plan.targets.values()]


def _is_relative(path) -> bool:
    return (isinstance(path, str) and bool(path) and not os.path.isabs(path)
            and ".." not in Path(path).parts)


def _plan(model, directory, *, formats, precision, input_signature, validation_data, version,
          overwrite, freeze, warmup, opset, batch_sizes, name, tolerance,
          placement, fp16_io=False, image_signatures=()) -> ExportPlan:
    if not isinstance(model, keras.Model):
        kind = _compat.check_keras_model(model)  # raises for anything else
        if kind == "tf_keras":
            raise NotAKerasModelError(
                "tfopt.export takes Keras 3 models. For a tf_keras model, save it with "
                "tf.saved_model.save and convert with tf2onnx.convert.from_keras; tfmot QAT "
                "models convert to uint8 activation-only Q/DQ that TensorRT rejects.")
    _compat.check_keras_model(model)
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise ConfigError(f"directory must be a path (a str or pathlib.Path), got "
                          f"{directory!r}.")
    formats = _check_formats(formats)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}. Valid: {list(PRECISIONS)}.")
    if not isinstance(placement, str) or placement not in PLACEMENTS:
        raise ConfigError(
            f"Unknown placement {placement!r}. Valid: {list(PLACEMENTS)}: 'onnxruntime' for "
            "ONNX Runtime's CPU provider and OpenVINO, 'tensorrt' for TensorRT.")
    for flag, value in (("overwrite", overwrite), ("freeze", freeze), ("warmup", warmup),
                        ("fp16_io", fp16_io)):
        _checks.boolean(flag, value)
    version = _checks.number("version", version, low=1, integer=True,
                             hint="TF Serving and Triton version folders are 1, 2, ...")
    opset = _checks.number("opset", opset, low=MIN_OPSET, high=MAX_OPSET, integer=True,
                           hint=f"The default is {_onnx.DEFAULT_OPSET}.")
    batch_sizes = _check_batch_sizes(batch_sizes)
    if tolerance is not None:
        tolerance = _checks.number("tolerance", tolerance, low=0, low_open=True,
                                   hint="It is the allowed error relative to each output's "
                                        "largest magnitude, e.g. 1e-3; None uses the "
                                        "precision's default.")
    from tfopt.pruning import is_pruned
    from tfopt.quantization import is_quantized

    if is_pruned(model):
        raise ConfigError(
            f"Model {model.name!r} still carries pruning wrappers: export "
            "tfopt.strip(model) so the masks are baked into the weights.")
    quantized = is_quantized(model)
    precision = _effective_precision(precision, quantized, formats)
    _check_fp16_io(fp16_io, precision, formats)
    if quantized and "saved_model_xla" in formats:
        raise ConfigError(
            "saved_model_xla takes float models: a QAT model's fake quantization is what "
            "its SavedModel runs; export it with formats=('saved_model',) instead.")
    if warmup and validation_data is None:
        raise ConfigError("warmup=True builds TF Serving warm-up requests from "
                          "validation_data: pass some real inputs.")
    name = _check_name(model.name if name is None else name)

    labels = None
    if _data.is_dataset(validation_data):
        inputs = getattr(model, "inputs", None)
        validation_data, labels = _data.inputs_from_dataset(
            validation_data, VALIDATION_SAMPLES, "validation_data",
            sample_rank=len(inputs[0].shape) - 1 if inputs else None, with_labels=True)
    signature = _signature.infer(model, input_signature, validation_data)
    if validation_data is None:
        logger.warning("No validation_data: artifacts are checked on random inputs. "
                       "Pass real inputs (e.g. x_test[:64]) for a meaningful check.")
        feed = _signature.random_feed(signature)
    else:
        feed = _signature.as_feed(signature, validation_data)
        _check_feed(feed, signature)
    try:
        reference = {k: np.asarray(v) for k, v in signature.call(model, feed).items()}
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        if isinstance(exc, TfoptError):
            raise
        raise ConfigError(
            f"The Keras model {model.name!r} fails on the validation inputs (shapes "
            f"{[tuple(a.shape) for a in feed]}): {' '.join(str(exc).split())[:300]}. Pass "
            "inputs the model accepts, or input_signature= matching them.") from None
    _check_reference(model, reference, feed, validation_data is not None)
    chosen = {f: _targets(name, version)[f] for f in formats}
    image_signatures = _check_image_signatures(image_signatures, formats, signature)
    return ExportPlan(model, Path(directory), formats, chosen, precision, quantized, signature,
                      feed, reference, validation_data is not None, freeze, warmup, opset,
                      batch_sizes, name, version, tolerance, placement, fp16_io,
                      image_signatures, _classifier_labels(labels, reference, signature))


MIN_OPSET, MAX_OPSET = 13, 21


def _check_batch_sizes(batch_sizes) -> tuple[int, int, int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, (tuple, list)) \
            or len(batch_sizes) != 3:
        raise ConfigError(f"batch_sizes must be three integers (min, opt, max), got "
                          f"{batch_sizes!r}; e.g. (1, 8, 64).")
    values = tuple(_checks.number(f"batch_sizes[{i}]", v, low=1, integer=True)
                   for i, v in enumerate(batch_sizes))
    if not values[0] <= values[1] <= values[2]:
        raise ConfigError(f"batch_sizes must be ordered min <= opt <= max, got {values}; "
                          "e.g. (1, 8, 64).")
    return values


def _check_fp16_io(fp16_io: bool, precision: str, formats) -> None:
    if not fp16_io:
        return
    if precision != "fp16":
        raise ConfigError(f"fp16_io=True makes the inputs and outputs of an FP16 ONNX float16; "
                          f"it needs precision='fp16', got precision={precision!r}.")
    if "onnx" not in formats:
        raise ConfigError(f"fp16_io=True applies to the ONNX export; add 'onnx' to formats "
                          f"(got {list(formats)}).")
    built_from_onnx = [f for f in formats if f in ("openvino", "tensorrt", "triton")]
    if built_from_onnx:
        raise ConfigError(
            f"fp16_io=True is for the ONNX file alone; {built_from_onnx} would be built from "
            "an ONNX with float16 inputs and outputs. Export them in a separate call without "
            "fp16_io.")


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") \
            or any(c in name for c in "/\\\0"):
        raise ConfigError(f"name must be a plain folder name (no '/', not '..'), got {name!r}: "
                          "it names the Triton model folder.")
    return name


def _check_feed(feed, signature) -> None:
    for array, spec in zip(feed, signature.inputs):
        if array.ndim == 0 or len(array) == 0:
            raise ConfigError(
                f"validation_data for input {spec.name!r} is empty (shape {array.shape}): "
                "nothing could be validated. Pass a batch of real inputs, e.g. x_test[:64].")
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.any():
                raise ConfigError(
                    f"validation_data for input {spec.name!r} is all NaN or infinity "
                    f"(shape {array.shape}). Pass real inputs, e.g. x_test[:64].")


def _check_reference(model, reference, feed, real_inputs) -> None:
    bad = {k: int(np.sum(~np.isfinite(v))) for k, v in reference.items()
           if v.dtype.kind == "f" and not np.isfinite(v).all()}
    if not bad:
        return
    where = ", ".join(f"{k!r} ({n} of {reference[k].size} values)" for k, n in bad.items())
    inputs_bad = sum(int(np.sum(~np.isfinite(a))) for a in feed if a.dtype.kind == "f")
    if inputs_bad:
        cause = (f"validation_data holds {inputs_bad} NaN/infinite value(s). Remove those "
                 "rows, or replace them with real values")
    elif real_inputs:
        cause = ("its weights or its computation produce them (a training run that "
                 "diverged?). Check model.predict(validation_data) and retrain or fix it")
    else:
        cause = ("on random inputs. Pass real inputs as validation_data=, e.g. x_test[:64]")
    raise ModelOutputsNaNError(
        f"The Keras model {model.name!r} itself outputs NaN or infinity in {where}, so no "
        f"export can be validated against it: {cause}.")


# -- build: each artifact into the staging folder -------------------------------

# What a format is built from: built first (kept out of the export if not chosen).
DEPENDS = {"openvino": ("onnx",), "tensorrt": ("onnx",), "tftrt": ("saved_model",),
           "triton": ("onnx",)}


def _build(plan: ExportPlan, stage: _staging.Staging) -> dict[str, BuiltArtifact]:
    order = []
    for fmt in plan.formats:
        for dep in (*DEPENDS.get(fmt, ()), fmt):
            if dep not in order:
                order.append(dep)
    serve = _saved_model.serving_function(plan.model, plan.signature)
    built: dict[str, BuiltArtifact] = {}
    progress = _progress(order)
    # every graph traced below holds each quantized weight once, as a constant
    with constant_weights(quant_wrappers(plan.model)):
        try:
            for fmt in order:
                if fmt in plan.targets:
                    path = stage.path(plan.targets[fmt])
                else:  # needed by another format only: built aside, not committed
                    aux = stage.root / "aux"
                    aux.mkdir(exist_ok=True)
                    path = aux / Path(plan.target(fmt)).name
                with third_party_quiet():
                    try:
                        built[fmt] = _BUILDERS[fmt](plan, serve, path, built, stage)
                    except ExportValidationError as exc:
                        exc.format = getattr(exc, "format", None) or fmt
                        raise
                    except OSError as exc:
                        if isinstance(exc, TfoptError):
                            raise
                        raise _staging.write_error(exc, plan.directory) from exc
                    except tf.errors.OpError as exc:  # TensorFlow's own file writes
                        error = _staging.disk_error(exc, plan.directory)
                        if error is None:
                            raise
                        raise error from exc
                progress.update(1)
        finally:
            progress.close()
    return built


# -- validate: run each chosen artifact, compare with Keras ---------------------

def _validate(plan: ExportPlan, built: dict[str, BuiltArtifact]) -> list[ArtifactResult]:
    results = []
    second = None  # the feed cut to a second sequence length, and Keras' outputs there
    for fmt in plan.formats:
        artifact = built[fmt]
        errors = {}
        if artifact.run is not None:
            limits = _tolerances(fmt, plan, built)
            advice = None
            try:
                if fmt == "onnx" and plan.quantized:
                    artifact.info["arithmetic_errors"], advice = _check_arithmetic(
                        plan, artifact, limits)
                with third_party_quiet():
                    actual = artifact.run(plan.feed)
                errors = {k: e.as_dict() for k, e in compare(
                    fmt, plan.reference, actual, limits, advice).items()}
                if second is None:
                    second = _second_length(plan)
                if second:
                    artifact.info["second_length"] = _validate_length(
                        fmt, artifact, second, limits, advice)
            except ExportValidationError as exc:
                exc.format = fmt  # which artifact failed: tfopt run exports the others
                raise
            if plan.labels is not None:
                artifact.info["accuracy"] = _accuracy(
                    actual[plan.signature.outputs[0]], plan.labels)
        results.append(ArtifactResult(fmt, plan.targets[fmt], errors, sizes(artifact.path),
                                      artifact.info))
    return results


def _second_length(plan: ExportPlan) -> Union[tuple, bool]:
    """The validation feed cut to half its sequence length, with Keras' outputs on it.

    For models whose inputs are all sequences of any length (``(batch, None)``
    token ids and masks, ``(batch, None, features)``): an artifact exported
    once must serve every length, so it is checked at a second one. False
    for other models.
    """
    specs = plan.signature.inputs
    lengths = {a.shape[1] for a in plan.feed if a.ndim >= 2}
    if not specs or any(len(s.shape) not in (2, 3) or s.shape[1] is not None for s in specs) \
            or len(lengths) != 1 or next(iter(lengths)) < 2:
        return False
    full = next(iter(lengths))
    length = full // 2
    feed = [np.ascontiguousarray(a[:, :length]) for a in plan.feed]
    try:
        reference = {k: np.asarray(v) for k, v in plan.signature.call(plan.model, feed).items()}
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        logger.info("Not validated at a second sequence length (%d): the Keras model fails "
                    "there: %s", length, " ".join(str(exc).split())[:200])
        return False
    return length, full, feed, reference


def _validate_length(fmt: str, artifact: BuiltArtifact, second: tuple, limits, advice) -> dict:
    """Run ``artifact`` at the second sequence length and compare it with Keras there."""
    length, full, feed, reference = second
    try:
        with third_party_quiet():
            actual = artifact.run(feed)
    except Exception as exc:  # the engine's own error type: ORT, OpenVINO, TensorFlow
        raise ExportValidationError(
            f"The {fmt} artifact runs at sequence length {full} "
            f"but fails at {length}, where the Keras model runs: "
            f"{' '.join(str(exc).split())[:300]}. Nothing was written. The model's inputs "
            "take any length (None), so the file should too; a layer that fixes the length "
            "when converted is the cause. Export with input_signature= at the one length you "
            "serve, or report it to tfopt with the model's summary.") from None
    errors = compare(f"{fmt} at sequence length {length}", reference, actual, limits, advice)
    return {"length": length, "errors": {k: e.as_dict() for k, e in errors.items()}}


def _classifier_labels(labels, reference: dict, signature) -> Optional[np.ndarray]:
    """The feed's labels, kept when the first output scores one class per column."""
    if labels is None:
        return None
    scores = reference[signature.outputs[0]]
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or scores.shape[1] < 2 or labels.dtype.kind not in "iu" \
            or len(labels) != len(scores):
        return None
    return labels


def _accuracy(scores, labels) -> float:
    return float(np.mean(np.asarray(scores).argmax(axis=1) == labels))


def _check_arithmetic(plan: ExportPlan, artifact: BuiltArtifact, limits) -> tuple[dict, str]:
    """Validate an INT8 ONNX's Q/DQ arithmetic apart from this CPU's integer kernels.

    ONNX Runtime runs the file once with graph optimizations off (each Q/DQ
    computed in float, as written: the placement's arithmetic, the same on
    every CPU) before validation runs it as served (Q/DQ fused into integer
    kernels). A failure here is the placement's; one only in the second run
    is the kernels' on this CPU. Returns the errors of this run, for the
    manifest, and the advice for a failure of the second.
    """
    run = _onnx_runner(artifact.path, plan.signature, arithmetic=True)
    with third_party_quiet():
        actual = run(plan.feed)
    errors = compare(
        "onnx: its Q/DQ arithmetic (ONNX Runtime with graph optimizations off)",
        plan.reference, actual, limits,
        ("The file's Q/DQ graph computes something other than the QAT model before any "
         "integer kernel runs: " + (
             "a fault in converting the QAT graph (tf2onnx). Report it to tfopt with the "
             "model's summary." if plan.placement == "tensorrt" else
             "ONNX Runtime's placement re-rounded it. If the QAT model's activation ranges "
             "clip (a short fine-tune), fine-tune longer; placement='tensorrt' writes the QAT "
             "graph as converted; report it to tfopt with the model's summary.")))
    worst = max((e.max_abs for e in errors.values()), default=0.0)
    portability = artifact.info.get("int8_portability", {})
    advice = (
        f"Its Q/DQ arithmetic matches Keras (ONNX Runtime with graph optimizations off: max "
        f"|diff| {worst:.3g}), so this CPU's integer kernels ({_cpu_int8.instruction_set()}) "
        "compute something else"
        + ("" if portability.get("portable", True) else
           ", as the file's int8_portability check foresaw: its weights saturate int16 pair "
           "sums on CPUs without VNNI. Quantize with portable_weights=True (the default)")
        + ". Report it to tfopt with the manifest; placement='tensorrt' exports the QAT graph "
        "as converted, without ONNX Runtime's rewrites.")
    return {k: e.as_dict() for k, e in errors.items()}, advice


def _check_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    if not isinstance(formats, (list, tuple, set, frozenset)):
        raise ConfigError(f"formats must be a format name or a list of them, got {formats!r}. "
                          f"Valid formats: {list(FORMATS)}.")
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
    if precision == "int8" and any(f in formats for f in ("onnx", "openvino", "tensorrt", "triton")):
        raise ConfigError(
            "precision='int8' for ONNX/OpenVINO/TensorRT needs Q/DQ in the graph: quantize the model "
            "first with tfopt.quantize(model) and fine-tune it, then export that model.")
    return precision


def _validation_precision(fmt: str, precision: str) -> str:
    # The SavedModel and frozen graph compute exactly what Keras computes; the XLA
    # SavedModel computes in the export's precision.
    return "fp32" if fmt in ("saved_model", "frozen_graph") else precision


def _tolerances(fmt: str, plan: ExportPlan, built: dict[str, BuiltArtifact]):
    """What each output of ``fmt`` may differ from Keras by.

    INT8 artifacts that run TensorRT's placement (Keras's own QAT graph: the
    ONNX with ``placement="tensorrt"``, the TensorRT engine, Triton and
    OpenVINO built from that ONNX) get bounds in quantization steps of each
    output, read from the scales of that graph, widened where it carries
    rounding flips far. ONNX Runtime's placement adds roundings of its own:
    its conversion is checked in steps before placing (``_check_converted``)
    and the placed file gets the relative int8 bound, as does everything
    else its precision's. A ``tolerance=`` from the user replaces both.
    """
    precision = _validation_precision(fmt, plan.precision)
    if plan.tolerance is None and plan.quantized and precision == "fp32":
        return _qat_graph_tolerances(plan, built)
    if plan.tolerance is None and precision == "int8" \
            and fmt in ("onnx", "openvino", "tensorrt", "triton"):
        source = built[fmt] if built[fmt].steps else built.get("onnx")
        if source is not None and "qdq_steps" in source.steps:
            return int8_tolerances(source.steps["qdq_steps"], plan.reference,
                                   source.steps["qdq_noise"])
        if source is not None and "qdq_noise" in source.steps:
            return widened(relative_tolerances(plan.reference, "int8"),
                           source.steps["qdq_noise"])
    return relative_tolerances(plan.reference, precision, plan.tolerance)


def _qat_graph_tolerances(plan: ExportPlan, built: dict[str, BuiltArtifact]):
    """What a QAT model's SavedModel (or frozen graph) may differ from Keras by.

    It runs Keras's own fake-quantization ops, but in another graph: a value
    on a rounding tie now and then lands one step apart, and the deep graph
    carries the flip on (a MobileNetV2 QAT model: 3.4% of the largest logit
    on one sample, no prediction changed). So it is held to the INT8 bound
    in quantization steps of each output (read from the converted ONNX when
    the export builds one; else the relative int8 bound) and, for class
    scores, to 99% argmax agreement with Keras on the inputs whose top two
    scores are further apart than that bound (nearer ones may flip within it).
    """
    onnx = built.get("onnx")
    steps = (onnx.steps.get("qat_steps") or onnx.steps.get("qdq_steps")) if onnx else None
    if steps is not None:
        limits = int8_tolerances(steps, plan.reference, onnx.steps["qdq_noise"])
    else:
        limits = relative_tolerances(plan.reference, "int8")
    return {name: dataclasses.replace(limit, min_argmax_agreement=QAT_ARGMAX_AGREEMENT,
                                      basis=f"QAT graph, {limit.basis}")
            for name, limit in limits.items()}


# A QAT graph outside Keras (SavedModel, frozen graph) picks Keras's class on this share.
QAT_ARGMAX_AGREEMENT = 0.99


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




# -- one builder per format: write the artifact, say how to run it --------------
# A builder takes (plan, serve, path, built, stage): ``built`` holds the
# artifacts of DEPENDS[format], already written.

def _saved_model_runner(path: Path, signature):
    from tfopt.artifacts._tf import saved_model_runner

    return _loaded_once(lambda: saved_model_runner(path, inputs=signature.input_names,
                                                   outputs=signature.outputs))


def _onnx_runner(path: Path, signature, arithmetic: bool = False):
    """ONNX Runtime's CPU provider on ``path``; ``arithmetic``: with graph optimizations
    off (Q/DQ computed as written, no integer kernels)."""
    from tfopt.artifacts._ort import arithmetic_session_options, onnx_runners

    return _loaded_once(lambda: onnx_runners(
        path, providers=["CPUExecutionProvider"], inputs=signature.input_names,
        outputs=signature.outputs,
        session_options=arithmetic_session_options() if arithmetic else None)[0])


def _loaded_once(make):
    """``run(arrays) -> {output: array}`` through a tfopt.artifacts runner, loaded on first use."""
    holder = []

    def run(arrays):
        if not holder:
            holder.append(make())
        return holder[0](arrays)

    return run


def _build_saved_model(plan, serve, path, built, stage) -> BuiltArtifact:
    _saved_model.write_saved_model(plan.model, plan.signature, path, freeze=plan.freeze,
                                   warmup=plan.feed if plan.warmup else None,
                                   image_signatures=plan.image_signatures)
    info = {"frozen": plan.freeze}
    if plan.image_signatures:
        info["image_signatures"] = _check_image_signature_outputs(plan, path)
    return BuiltArtifact("saved_model", path, _saved_model_runner(path, plan.signature), info)


IMAGE_SIGNATURES = {"image_bytes": "serving_image_bytes", "uint8": "serving_uint8"}


def _check_image_signatures(requested, formats, signature) -> tuple:
    """The image signatures asked for, checked against the model's one image input."""
    if isinstance(requested, str) or not isinstance(requested, (list, tuple)):
        raise ConfigError(f"image_signatures must be a list of {sorted(IMAGE_SIGNATURES)}, got "
                          f"{requested!r}.")
    unknown = [r for r in requested if r not in IMAGE_SIGNATURES]
    if unknown:
        raise ConfigError(f"Unknown image_signatures {unknown}; valid: "
                          f"{sorted(IMAGE_SIGNATURES)}.")
    if not requested:
        return ()
    if "saved_model" not in formats:
        raise ConfigError("image_signatures are SavedModel signatures: add 'saved_model' to "
                          "formats.")
    shape = signature.inputs[0].shape if len(signature.inputs) == 1 else None
    if shape is None or shape.rank != 4 or not shape[1] or not shape[2] \
            or shape[3] not in (1, 3, 4):
        raise ConfigError(
            "image_signatures need a model with one image input of shape (batch, height, "
            "width, 1, 3 or 4 channels); this one takes "
            f"{[str(s.shape) for s in signature.inputs]}.")
    return tuple(dict.fromkeys(requested))


def _check_image_signature_outputs(plan, path: Path) -> dict:
    """Each image signature against ``serving_default`` of the same SavedModel, on the
    validation inputs as uint8 images (PNG-encoded for ``image_bytes``: lossless)."""
    images = np.clip(np.round(np.asarray(plan.feed[0], np.float32)), 0, 255).astype(np.uint8)
    loaded = tf.saved_model.load(str(path))
    name = plan.signature.input_names[0]
    expected = loaded.signatures["serving_default"](
        **{name: tf.constant(images.astype(plan.signature.inputs[0].dtype.as_numpy_dtype))})
    report = {}
    for kind in plan.image_signatures:
        function = loaded.signatures[IMAGE_SIGNATURES[kind]]
        if kind == "image_bytes":
            actual = function(image_bytes=tf.constant(
                [tf.io.encode_png(image).numpy() for image in images]))
        else:
            actual = function(images=tf.constant(images))
        worst = 0.0
        for key, want in expected.items():
            want, got = want.numpy(), actual[key].numpy()
            scale = max(float(np.max(np.abs(want))), 1e-6)
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))) / scale)
        if not worst <= 1e-5:
            raise ExportValidationError(
                f"The SavedModel's {IMAGE_SIGNATURES[kind]} signature computes something other "
                f"than serving_default on the same images ({worst:.2e} of the largest output "
                "apart): its decoding or resizing changed the pixels. Nothing was written; "
                "report it to tfopt with the model's input shape.")
        report[IMAGE_SIGNATURES[kind]] = {"max_rel_to_serving_default": worst,
                                          "images": int(len(images))}
    return report


def _build_saved_model_xla(plan, serve, path, built, stage) -> BuiltArtifact:
    model, dtype = plan.model, "float32"
    if plan.precision == "fp16":
        dtype = "float16"
        try:
            model = _saved_model.float16_clone(plan.model)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ConfigError(
                f"saved_model_xla with precision='fp16' rebuilds the model with float16 layers, "
                f"which failed for {plan.model.name!r}: {' '.join(str(exc).split())[:300]}. It "
                "needs a Functional or Sequential model whose layers rebuild from their "
                "configs; export precision='fp32' for others.") from None
    info = _saved_model.write_xla_saved_model(model, plan.signature, path, compute_dtype=dtype,
                                              warmup=plan.feed if plan.warmup else None)
    return BuiltArtifact("saved_model_xla", path, _saved_model_runner(path, plan.signature),
                         info)


def _build_frozen_graph(plan, serve, path, built, stage) -> BuiltArtifact:
    output_names, input_names = _saved_model.write_frozen_graph(plan.model, plan.signature, path)
    from tfopt.artifacts._tf import frozen_graph_runner

    outputs = plan.signature.outputs
    run = _loaded_once(lambda: frozen_graph_runner(path, input_names, output_names, outputs))
    return BuiltArtifact("frozen_graph", path, run,
                         {"inputs": input_names, "outputs": output_names})


def _build_onnx(plan, serve, path, built, stage) -> BuiltArtifact:
    proto = _onnx.convert(serve, plan.signature, opset=plan.opset, quantized=plan.quantized)
    info, steps = {"opset": plan.opset}, {}
    if plan.quantized:
        info["qdq"] = _onnx.check_weight_qdq(proto)
        info["qdq_placement"] = plan.placement
        if plan.placement == "tensorrt":
            _check_tensorrt_qdq(proto, plan)
        # The QAT graph as converted (TensorRT's placement) is Keras's own: it is held
        # to bounds in quantization steps, tight enough to refuse a scale off by 1%.
        # ONNX Runtime's placement checks the converted graph itself, so it is run once
        # for both the check and the rounding noise.
        converted = (run_graph(proto, dict(zip(plan.signature.input_names, plan.feed)))
                     if plan.placement == "onnxruntime" else None)
        steps = _qdq_steps(proto, plan, converted)
        info["qdq_steps"] = steps["qdq_steps"]
        if plan.placement == "onnxruntime":
            info["converted_errors"] = _check_converted(converted, steps, plan)
            proto = _ort_quant.quantize_for_cpu(proto, plan.signature.input_names, plan.feed)
            # ORT's own roundings: the file is held to the relative int8 bound, no
            # tighter than the rounding noise the converted graph carries; the converted
            # graph's steps still bound the QAT SavedModel (_qat_graph_tolerances)
            steps = {"qdq_noise": steps["qdq_noise"], "qat_steps": steps["qdq_steps"]}
    if plan.precision == "fp16":
        proto = _onnx.to_fp16(proto, fp16_io=plan.fp16_io)
        info["io_dtypes"] = _onnx.io_dtypes(proto)
        info["edge_casts"] = _onnx.edge_casts(proto)
    if plan.quantized:
        info["int8_portability"] = _check_portability(proto, plan)
    _onnx.save(proto, path)
    if plan.quantized:
        info["ort_cpu_kernels"] = _kernel_report(path, plan.placement)
    return BuiltArtifact("onnx", path, _onnx_runner(path, plan.signature), info, steps)


def _check_portability(proto, plan) -> dict:
    """Prove that no integer kernel's pair sum can leave int16 on a CPU without VNNI.

    Refuses an ONNX Runtime placement that fails the proof unless the QAT
    model asked for full-range weights (``portable_weights=False``): then the
    manifest records that the file needs VNNI or AMX, and one warning says so.
    TensorRT's placement is for GPUs; its result is recorded only.
    """
    report = _cpu_int8.check(proto)
    if report.portable or plan.placement != "onnxruntime":
        return report.as_dict()
    full_range = sorted({w.layer.name for w in quant_wrappers(plan.model)
                         if not w.config.portable_weights})
    if full_range:
        warn_user(
            f"The INT8 ONNX of {plan.model.name!r} is exact only on CPUs with VNNI or AMX "
            f"({', '.join(_cpu_int8.WIDE_SUM_FLAGS)}): layers {', '.join(full_range[:5])}"
            f"{' ...' if len(full_range) > 5 else ''} were quantized with "
            "portable_weights=False, so on CPUs without them (AVX2, AVX-512 without VNNI) "
            f"ONNX Runtime's and OpenVINO's integer kernels saturate at {report.describe(3)}. "
            "The manifest records it (int8_portability.requires). Quantize with the default "
            "QuantizationConfig(portable_weights=True) for a file that is right on every CPU.")
        return report.as_dict()
    raise ExportValidationError(
        f"The INT8 ONNX of {plan.model.name!r} could compute wrong values on x86 CPUs without "
        f"VNNI (AVX2, AVX-512 without VNNI), whose integer kernels add two u8 x s8 products "
        f"in a saturating int16: {report.describe()}. Nothing was written. Weights within "
        f"[-{_cpu_int8.PORTABLE_WEIGHT_MAX}, {_cpu_int8.PORTABLE_WEIGHT_MAX}] cannot overflow: "
        "quantize with tfopt.quantize(model, 'int8') (portable_weights=True, the default) and "
        "fine-tune again, or pass QuantizationConfig(portable_weights=False) to export a file "
        "that is marked as needing VNNI or AMX.")


def _check_tensorrt_qdq(proto, plan) -> None:
    """Refuse a TensorRT placement whose Q/DQ TensorRT would not build as INT8."""
    problems = _tensorrt_rules.check(proto)
    if problems:
        raise ExportValidationError(
            f"The TensorRT placement of {plan.model.name!r} holds Q/DQ that TensorRT rejects "
            f"(it builds INT8 only from int8 Q/DQ with zero points 0): {'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}. Nothing was written. tfopt's QAT writes "
            "symmetric int8, so the converter changed it: please report this with your tf2onnx "
            "version; placement='onnxruntime' exports for CPUs meanwhile.")


def _check_converted(actual: dict, steps: dict, plan) -> dict:
    """Compare the QAT graph as converted (``actual``: its outputs on the feed) with
    Keras, in quantization steps.

    ONNX Runtime's placement re-quantizes this graph with QAT's ranges and
    grids, and adds roundings of its own (BatchNorm folded, tensors QAT kept
    float calibrated where they chain integer kernels), so the placed file
    can only be held to a relative bound. The conversion it starts from is
    checked here as tightly as TensorRT's placement is.
    """
    if plan.tolerance is None:
        limits = int8_tolerances(steps["qdq_steps"], plan.reference, steps["qdq_noise"])
    else:
        limits = relative_tolerances(plan.reference, "int8", plan.tolerance)
    errors = compare("onnx (the QAT graph as converted, before ONNX Runtime's placement)",
                     plan.reference, actual, limits)
    return {k: e.as_dict() for k, e in errors.items()}


def _qdq_steps(proto, plan, outputs=None) -> dict:
    """What validation allows each output of this Q/DQ graph and of what is built from it.

    ``outputs``: the graph's outputs on the export's feed, where already computed.
    """
    return {"qdq_steps": quantization_steps(proto),
            "qdq_noise": rounding_noise(proto, dict(zip(plan.signature.input_names, plan.feed)),
                                        outputs=outputs)}


def _build_openvino(plan, serve, path, built, stage) -> BuiltArtifact:
    from tfopt.artifacts import _openvino as ov_runtime
    from tfopt.export import _openvino

    ov_runtime.import_openvino()  # a clear error before any work
    info = _openvino.convert(built["onnx"].path, path,
                             compress_to_fp16=plan.precision == "fp16")
    if "int8_portability" in built["onnx"].info:  # the same int8 weights, read by oneDNN
        info["int8_portability"] = built["onnx"].info["int8_portability"]
    signature = plan.signature

    def runner(inference_precision):
        return ov_runtime.openvino_runner(path, precision=inference_precision,
                                          inputs=signature.input_names, outputs=signature.outputs)

    if ov_runtime.bf16_available():  # what OpenVINO runs by default on this CPU: check it too
        limits = relative_tolerances(plan.reference, "int8" if plan.precision == "int8"
                                     else "bf16", plan.tolerance)
        if plan.precision == "int8" and plan.tolerance is None and built["onnx"].steps:
            limits = widened(limits, built["onnx"].steps["qdq_noise"])
        errors = compare("openvino (bf16 inference precision)", plan.reference,
                         runner("bf16")(plan.feed), limits)
        info["bf16_errors"] = {k: e.as_dict() for k, e in errors.items()}
    return BuiltArtifact("openvino", path, _loaded_once(lambda: runner("f32")), info)


def _kernel_report(path: Path, placement: str) -> dict:
    """Which compute ops ONNX Runtime's CPU provider runs as integer kernels; warn about the rest."""
    report = _ort_quant.kernel_report(path)
    left = report["float"] + report["float_weights"]
    if left and placement == "onnxruntime":
        warn_user(
            f"{len(left)} of {report['total']} convolutions/matrix products run in float on "
            f"ONNX Runtime's CPU provider: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}. "
            "They are layers QAT left in float, or patterns ONNX Runtime does not fuse.")
    return {key: report[key] for key in ("integer", "total", "ops", "float_weights")}


def _build_tensorrt(plan, serve, path, built, stage) -> BuiltArtifact:
    _compat.import_tensorrt()  # a clear error before any work
    cache = stage.path("timing.cache")  # a cache, not an artifact: kept for the next build
    if (plan.directory / "timing.cache").exists():
        shutil.copy2(plan.directory / "timing.cache", cache)
    if plan.quantized and plan.placement != "tensorrt":
        # TensorRT builds INT8 from its own placement (int8, zero points 0), not ORT's.
        onnx_path = path.with_name("tensorrt-placement.onnx")
        proto = _onnx.convert(serve, plan.signature, opset=plan.opset, quantized=True)
        _check_tensorrt_qdq(proto, plan)
        _onnx.save(proto, onnx_path)
        steps = _qdq_steps(proto, plan)
    else:
        onnx_path, steps = built["onnx"].path, built["onnx"].steps
    two_four = _two_four_weights(plan.model)
    sparse = bool(two_four)
    _tensorrt.build_engine(onnx_path, path, plan.signature, precision=plan.precision,
                           batch_sizes=plan.batch_sizes, sparse_weights=sparse,
                           timing_cache=cache)
    signature = plan.signature
    return BuiltArtifact("tensorrt", path,
                         lambda arrays: _tensorrt.run_engine(path, signature, arrays),
                         {"sparse_weights": sparse, "two_four_weights": two_four}, steps)


def _build_tftrt(plan, serve, path, built, stage) -> BuiltArtifact:
    _tftrt.convert(built["saved_model"].path, path, precision=plan.precision,
                   calibration=plan.feed)
    return BuiltArtifact("tftrt", path, _saved_model_runner(path, plan.signature))


def _build_triton(plan, serve, path, built, stage) -> BuiltArtifact:
    shapes = {k: (v.shape, v.dtype) for k, v in plan.reference.items()}
    _triton.write_repository(path.parent, plan.name, plan.version, "onnx", built["onnx"].path,
                             plan.signature, shapes, max_batch_size=plan.batch_sizes[2])
    return BuiltArtifact("triton", path,
                         _onnx_runner(path / str(plan.version) / "model.onnx", plan.signature))


_BUILDERS = {"saved_model": _build_saved_model, "saved_model_xla": _build_saved_model_xla,
             "frozen_graph": _build_frozen_graph,
             "onnx": _build_onnx, "openvino": _build_openvino, "tensorrt": _build_tensorrt,
             "tftrt": _build_tftrt, "triton": _build_triton}


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


# -- commit: the manifest, then one switch (in _staging) ------------------------

def _manifest(plan: ExportPlan, artifacts: list[ArtifactResult]) -> dict:
    from tfopt.pruning import sparsity

    try:
        model_sparsity = sparsity(plan.model)
    except Exception:  # noqa: BLE001 - a report, not a requirement
        model_sparsity = {}
    reference, signature = plan.reference, plan.signature
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": plan.model.name,
        "versions": {"tfopt": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
        "formats": list(plan.formats),
        "artifacts": {a.format: {"path": a.target, **a.info} for a in artifacts},
        "precision": plan.precision,
        "quantized": plan.quantized,
        "signature": {
            "inputs": signature.describe()["inputs"],
            "outputs": [{"name": name, "shape": [None, *map(int, reference[name].shape[1:])],
                         "dtype": reference[name].dtype.name} for name in signature.outputs],
        },
        "sparsity": model_sparsity,
        "validation": {"inputs": "validation_data" if plan.real_inputs else "random",
                       "samples": int(len(plan.feed[0])),
                       "errors": {a.format: a.errors for a in artifacts},
                       **({"keras_accuracy": _accuracy(reference[signature.outputs[0]],
                                                       plan.labels),
                           "accuracy": {a.format: a.info["accuracy"] for a in artifacts
                                        if "accuracy" in a.info}}
                          if plan.labels is not None else {})},
        "sizes": {a.format: a.sizes for a in artifacts},
    }

"""Every keras.applications architecture and tiny keras-hub backbones through tfopt.

Each architecture (``weights=None``, the smallest input it accepts, 10 logits;
keras-hub backbones built from tiny configs, nothing downloaded) goes through

    prune 50% in fit() -> strip -> QAT with calibration -> fit() ->
    export SavedModel, ONNX FP32 (the stripped model), ONNX INT8 (the QAT
    model) [, OpenVINO once tfopt.export has that format] -> validation

and each step's measured max error (or the exact reason it failed) is a cell
of ``docs/support.md``. Every architecture runs in its own subprocess (one
crash or out-of-memory kill costs one row) and its row is cached in
``benchmarks/results/zoo.json``, so the zoo can run in chunks:

    python benchmarks/zoo.py --list
    python benchmarks/zoo.py --only MobileNetV3Small,BertBackbone
    python benchmarks/zoo.py --resume --budget 420   # next rows, ~7 minutes
    python benchmarks/zoo.py --table                  # docs/support.md from the cache

``make zoo`` runs every row not cached yet, then writes the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "zoo.json"
TABLE = ROOT / "docs" / "support.md"

# keras.applications: name -> smallest input side it accepts with weights=None
# (Keras' own checks: 71 for Xception, 75 for the Inception family, 32 elsewhere).
APPLICATIONS = {
    "Xception": 71, "VGG16": 32, "VGG19": 32,
    "ResNet50": 32, "ResNet101": 32, "ResNet152": 32,
    "ResNet50V2": 32, "ResNet101V2": 32, "ResNet152V2": 32,
    "InceptionV3": 75, "InceptionResNetV2": 75,
    "MobileNet": 32, "MobileNetV2": 32, "MobileNetV3Small": 32, "MobileNetV3Large": 32,
    "DenseNet121": 32, "DenseNet169": 32, "DenseNet201": 32,
    "NASNetMobile": 32, "NASNetLarge": 32,
    **{f"EfficientNetB{i}": 32 for i in range(8)},
    **{f"EfficientNetV2{s}": 32 for s in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    **{f"ConvNeXt{s}": 32 for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
}

# keras-hub backbones from tiny configs (random weights, no download).
_TEXT = dict(vocabulary_size=500, num_layers=2, hidden_dim=64, intermediate_dim=128)
HUB = {
    "BertBackbone": dict(num_heads=2, max_sequence_length=32, **_TEXT),
    "DistilBertBackbone": dict(num_heads=2, max_sequence_length=32, **_TEXT),
    "GPT2Backbone": dict(num_heads=2, max_sequence_length=32, **_TEXT),
    "GemmaBackbone": dict(num_query_heads=2, num_key_value_heads=1, head_dim=32, **_TEXT),
    "LlamaBackbone": dict(num_query_heads=2, num_key_value_heads=1, **_TEXT),
    "ViTBackbone": dict(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                        hidden_dim=64, mlp_dim=128),
}
SEQUENCE = 16

STEPS = ["prune_fit", "strip", "qat_calibrate", "qat_fit", "saved_model", "onnx_fp32",
         "onnx_int8", "openvino", "validation"]
HEADERS = {
    "prune_fit": "prune 50% in fit()", "strip": "strip", "qat_calibrate": "QAT + calibration",
    "qat_fit": "QAT fit()", "saved_model": "SavedModel", "onnx_fp32": "ONNX FP32",
    "onnx_int8": "ONNX INT8", "openvino": "OpenVINO", "validation": "validation vs Keras",
}

# What each step needs: a failed step leaves the others that do not need it to run.
NEEDS = {
    "prune_fit": [], "strip": ["prune_fit"], "qat_calibrate": ["strip"],
    "qat_fit": ["qat_calibrate"], "saved_model": ["strip"], "onnx_fp32": ["strip"],
    "onnx_int8": ["qat_fit"], "openvino": ["qat_fit"], "validation": ["onnx_fp32", "onnx_int8"],
}

NOT_AVAILABLE = "n/a: tfopt.export has no 'openvino' format yet"

# Known failures that cannot pass yet: a substring of the error -> the plan.
PLANS: dict[str, str] = {
    "killed by the OS": (
        "Not a layer type: memory. ConvNeXtXLarge (348M parameters, 1.4 GB of float32 "
        "weights) on this 24 GB machine: prune, QAT and the float exports pass, in three "
        "processes; the INT8 export takes the machine past 23 GB and is killed, also when "
        "run first in a fresh process (tried 2026-11-26). Its peak is ~15x the float32 "
        "weights (ConvNeXtBase: 15.2 -> 5.0 GB over four changes, benchmarks/"
        "export_memory.py), ~21 GB here beside the two loaded models. Plan: a machine with "
        "32 GB or more, or cut the copies left at the peak (tf2onnx's optimizer passes, "
        "ONNX Runtime's quantize_static)."),
    "(nan of": (
        "Not a layer type: with plain Adam the stem gradient of this pruned random-weight "
        "EfficientNet passes 1e19 on random data, Adam's square of it overflows "
        "(tf.debugging.enable_check_numerics: adam/Square) and the weights become NaN. "
        "Plan: rerun with the zoo's clipped optimizer (rows run before it show this)."),
    "no Q/DQ on its weights": (
        "Follows from the NaN weights left by the QAT fit() (see the float columns): "
        "tf2onnx folds the fake quantization of NaN constants. Same plan."),
}


def every_architecture() -> list[str]:
    return list(APPLICATIONS) + list(HUB)


# -- one architecture (runs in a subprocess) ---------------------------------------

def _build(name: str):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    if name in APPLICATIONS:
        side = APPLICATIONS[name]
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(side, side, 3), classes=10, classifier_activation=None)
        x = rng.uniform(0, 255, size=(8, side, side, 3)).astype("float32")
        y = rng.integers(0, 10, size=(8,))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return model, x, y, loss
    import keras_hub

    model = getattr(keras_hub.models, name)(**HUB[name])
    if name == "ViTBackbone":
        x = rng.uniform(0, 1, size=(8, 32, 32, 3)).astype("float32")
    else:
        x = {"token_ids": rng.integers(1, 500, size=(8, SEQUENCE)).astype("int32"),
             "padding_mask": np.ones((8, SEQUENCE), "int32")}
        if any(i.name == "segment_ids" for i in model.inputs):
            x["segment_ids"] = np.zeros((8, SEQUENCE), "int32")
    outputs = model(x)
    y = keras.tree.map_structure(lambda t: np.zeros(t.shape, "float32"), outputs)
    return model, x, y, "mse"


def _max_abs(a, b) -> float:
    import keras
    import numpy as np

    pairs = zip(keras.tree.flatten(a), keras.tree.flatten(b))
    return max(float(np.max(np.abs(np.asarray(u, "float64") - np.asarray(v, "float64"))))
               for u, v in pairs)


def _scale(a) -> float:
    import keras
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(u)))) for u in keras.tree.flatten(a)) or 1.0


def _fmt(error: float, scale: float) -> str:
    return f"{error:.2g} (rel {error / scale:.1g})"


def _integer_kernels(report: dict) -> str:
    """``k/n int8 kernels`` from an INT8 export's ``ort_cpu_kernels``; none of n is a failure.

    An INT8 file whose convolutions and matrix products all run in float on
    ONNX Runtime's CPU provider is not faster than the float one: a defect,
    however close its numbers are.
    """
    integer, total = report["integer"], report["total"]
    if total and not integer:
        raise AssertionError(
            f"none of the {total} convolutions/matrix products of the INT8 file runs as an "
            "integer kernel on ONNX Runtime's CPU provider: it is no faster than float")
    return f"{integer}/{total} int8 kernels"


def _export_error(result, fmt) -> float:
    return max(e["max_abs"] for e in result.errors[fmt].values())


def _fresh_check(path: Path, signature_inputs, feed_batch, expected) -> dict[str, float]:
    """Run an exported ONNX file on a batch the export never saw; max abs error by output."""
    import keras
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(feed_batch, dict):
        feed = {n: feed_batch[n] for n in names}
    else:
        feed = {names[0]: feed_batch}
    got = session.run(None, feed)
    outputs = [o.name for o in session.get_outputs()]
    want = keras.tree.flatten(expected)
    if isinstance(expected, dict):  # ONNX outputs follow the manifest's order
        want = [np.asarray(expected[n]) for n in outputs]
    return {name: float(np.max(np.abs(np.asarray(g, "float64") - np.asarray(w, "float64"))))
            for name, g, w in zip(outputs, got, want)}


# Rows above this many parameters run in three processes, as a user with a model this
# size would: prune and strip; QAT and its fit(); the exports. Each hands the next the
# stripped and QAT models as .keras files. In one process, the worker that ran two
# fit()s of ConvNeXtLarge (198M) held ~13 GB and its INT8 export was killed for memory
# on this 24 GB machine; ConvNeXtXLarge (348M) reached 24 GB in its QAT fit().
# ConvNeXtBase (88M) and NASNetLarge (85M) pass in one process.
EXPORT_APART_PARAMS = 100_000_000
HANDOFF_BEFORE = ("qat_calibrate", "saved_model")

# Gradients of random-weight networks pruned to 50% explode on random data (EfficientNet
# v1's stem gradient passes 1e19 and Adam's square of it overflows): clip them.
OPTIMIZER = "Adam(clipnorm=1.0)"

# What a row was measured with. Rows of an older version are rerun by --resume
# and marked in the table, which names the changes they predate.
CHANGES = {
    2: "ONNX Runtime's INT8 placement, the OpenVINO column, INT8 tolerances in "
       "quantization steps, grouped convolutions through ONNX",
    3: "composite layers rewritten as copies (the user's model untouched), the ONNX "
       "Runtime placement computing what QAT computes on transformers",
    4: "the ONNX Runtime placement validated as its conversion in steps and the placed "
       "file within the relative int8 bound",
    5: "ReLU outputs saturating where QAT does in the ONNX Runtime placement, pruned-away "
       "channels keeping their bias in INT8, the fresh-batch check allowing what the "
       "export allowed",
    6: "tf2onnx's layout pass no longer rolled back by 0-d constants (MobileNetV3's INT8 "
       "file ran no integer kernel), hard-swish chains after a convolution quantized, "
       "SeparableConv's inner tensor quantized in QAT (Xception ran 7 of 75 integer "
       "kernels), 1x1 convolution heads run as matrix products, the INT8 column "
       "counting integer kernels",
    7: "portable INT8: QAT weights on [-64, 64] with the export's int16 proof, INT8 "
       "files validated with ONNX Runtime's optimizations off and on, a BatchNorm with "
       "no convolution before it run as a depthwise integer convolution",
}
ZOO_VERSION = max(CHANGES)


def _optimizer():
    import keras

    return keras.optimizers.Adam(clipnorm=1.0)


def _fit_loss(model, x, y, loss) -> Optional[float]:
    """One epoch of fit(); its last loss, or None if the loss or the weights went non-finite."""
    import numpy as np
    import tensorflow as tf

    model.compile(optimizer=_optimizer(), loss=loss)
    try:
        value = float(model.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"][-1])
    except tf.errors.InvalidArgumentError:
        # NaN weights trip TensorFlow's own checks (QuantizeAndDequantizeV4's range);
        # any other such error is not a divergence.
        if all(np.isfinite(w).all() for w in model.get_weights()):
            raise
        return None
    finite = np.isfinite(value) and all(np.isfinite(w).all() for w in model.get_weights())
    return value if finite else None


def _freeze_batch_norm(model) -> int:
    """Run every BatchNormalization on its moving statistics (trainable=False); how many."""
    import keras

    count = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def run_one(name: str, progress: Optional[Path] = None,
            handoff: Optional[Path] = None) -> dict:
    """Every step on one architecture; ``{step: {"ok", "cell", "seconds"}}`` and totals.

    With ``progress``, the row so far is written there before each step, so a
    worker the OS kills (out of memory) still tells which step it died in.

    With ``handoff`` (a folder), a model above ``EXPORT_APART_PARAMS`` stops
    before each step of ``HANDOFF_BEFORE`` (QAT, then the exports): the models
    and data the next steps need are saved there and the row comes back with
    ``"handoff": True``. Called again with that folder, it loads them in this
    fresh process and runs on, up to the next handoff or the end.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import keras
    import numpy as np

    import tfopt
    from tfopt.export import _api as export_api

    keras.utils.set_random_seed(0)
    resumed = handoff is not None and (handoff / "row.json").exists()
    if resumed:
        row, state = _load_handoff(name, handoff)
    else:
        row = {"steps": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "optimizer": OPTIMIZER}
        state = {}
    t_all = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=f"zoo-{name}-"))

    def step(key, fn):
        if progress is not None:
            progress.write_text(json.dumps({**row, "running": key}))
        blockers = [k for k in NEEDS[key] if not row["steps"].get(k, {}).get("ok")]
        if blockers:
            failed = blockers[0]
            row["steps"][key] = {"ok": False, "cell": f"not reached ({HEADERS[failed]} failed)",
                                 "seconds": 0.0, "skipped": True}
            return
        t = time.perf_counter()
        try:
            cell = fn()
            row["steps"][key] = {"ok": True, "cell": cell}
        except Exception as exc:  # noqa: BLE001 - the zoo records every failure
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            row["steps"][key] = {"ok": False, "cell": message[:400]}
        row["steps"][key]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"  {name:22s} {key:14s} {'ok ' if row['steps'][key]['ok'] else 'FAIL'} "
              f"{row['steps'][key]['seconds']:7.1f}s  {row['steps'][key]['cell'][:100]}",
              flush=True)

    if resumed:
        x, y, loss = state.pop("x"), state.pop("y"), state.pop("loss")
        if isinstance(loss, dict):
            loss = keras.losses.deserialize(loss)
        first, second = state.pop("first"), state.pop("second")
    else:
        t = time.perf_counter()
        model, x, y, loss = _build(name)
        row["params"] = int(model.count_params())
        row["input"] = ({k: list(v.shape[1:]) for k, v in x.items()} if isinstance(x, dict)
                        else list(x.shape[1:]))
        row["build_seconds"] = round(time.perf_counter() - t, 1)
        first = ({k: v[:4] for k, v in x.items()} if isinstance(x, dict) else x[:4])
        second = ({k: v[4:] for k, v in x.items()} if isinstance(x, dict) else x[4:])
        # Each model is dropped once the next one is made from it: the largest rows
        # (ConvNeXtLarge, 198M parameters) need the memory for their exports.
        state["model"] = model
        del model
    apart = handoff is not None and row["params"] > EXPORT_APART_PARAMS
    ran_here = 0  # steps run in this process: a resumed one runs at least one before its handoff

    def prune_fit():
        model = state.pop("model")
        pruned = tfopt.prune(model, tfopt.ConstantSparsity(0.5, begin_step=0, frequency=1))
        del model
        gc.collect()  # a Keras model is a web of reference cycles
        pruned.compile(optimizer=_optimizer(), loss=loss)
        pruned.fit(x, y, batch_size=4, epochs=1, verbose=0,
                   callbacks=[tfopt.callbacks.PruningStep()])
        state["pruned"] = pruned
        values = list(tfopt.sparsity(pruned).values())
        return f"sparsity {np.mean(values):.2f} over {len(values)} weights"

    def strip():
        plain = tfopt.strip(state["pruned"])
        state["plain"] = plain
        err = _max_abs(state["pruned"](first, training=False), plain(first, training=False))
        state["float_out"] = plain(first, training=False)
        del state["pruned"]
        gc.collect()
        values = list(tfopt.sparsity(plain).values())
        return f"sparsity {np.mean(values):.2f}, err {err:.2g}"

    def qat_calibrate():
        qat = tfopt.quantize(state["plain"], calibration_data=x)
        state["qat"] = qat
        reference = state["float_out"]
        err = _max_abs(reference, qat(first, training=False))
        return "vs float " + _fmt(err, _scale(reference))

    def qat_fit():
        # QAT shares its layers with the stripped model, so a diverged fit() would
        # also leave NaN in the float columns: the weights are kept to restore.
        qat = state["qat"]
        start = qat.get_weights()
        value = _fit_loss(qat, x, y, loss)
        if value is not None:
            return f"loss {value:.3g}"
        # The fit diverged. Seen on random-weight EfficientNetB4 at 32x32: with batch
        # statistics of 4 samples at 1x1 resolution, BatchNormalization amplifies the
        # gradient of fake-quantized activations ~15x per block, to inf by block 5
        # (the float model's stays below 3e5). QAT fine-tuning with frozen
        # BatchNormalization statistics is the usual remedy, and what a user does.
        qat.set_weights(start)
        frozen = _freeze_batch_norm(qat)
        value = _fit_loss(qat, x, y, loss)
        if value is None:
            raise FloatingPointError(
                f"QAT fit() diverged, also with {frozen} BatchNormalization layers frozen")
        return (f"loss {value:.3g} with {frozen} BatchNormalization layers frozen "
                "(with batch statistics the gradient overflowed)")

    def saved_model():
        result = tfopt.export(state["plain"], workdir / "saved_model",
                              formats=("saved_model",), validation_data=first)
        return _fmt(_export_error(result, "saved_model"), _scale(state["float_out"]))

    def onnx_fp32():
        result = tfopt.export(state["plain"], workdir / "fp32", formats=("onnx",),
                              validation_data=first)
        state["float_export"] = result
        return _fmt(_export_error(result, "onnx"), _scale(state["float_out"]))

    def onnx_int8():
        # OpenVINO's file is converted from the ONNX one, so both come from one export,
        # as a user would ask for them (apart, the largest rows convert twice: 5 min).
        # If that export fails, ONNX is tried alone and OpenVINO's step reports its own.
        result = None
        if "openvino" in export_api._BUILDERS:
            try:
                result = tfopt.export(state["qat"], workdir / "int8",
                                      formats=("onnx", "openvino"), validation_data=first)
                state["openvino_export"] = result
            except Exception:  # noqa: BLE001 - retried below, reported by the steps
                pass
        if result is None:
            result = tfopt.export(state["qat"], workdir / "int8", formats=("onnx",),
                                  validation_data=first)
        state["int8_export"] = result
        return (_fmt(_export_error(result, "onnx"), _scale(state["float_out"])) + ", "
                + _integer_kernels(result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]))

    def openvino():
        if "openvino" not in export_api._BUILDERS:
            return NOT_AVAILABLE
        result = state.get("openvino_export")
        if result is None:
            result = tfopt.export(state["qat"], workdir / "openvino", formats=("openvino",),
                                  validation_data=first)
        return _fmt(_export_error(result, "openvino"), _scale(state["float_out"]))

    def validation():
        # A batch the exports never saw, ONNX Runtime against the Keras models, held
        # to tfopt's relative tolerance (of the largest output, plus a floor) or to
        # what the export itself allowed that output, whichever is larger: an INT8
        # export allows a deep network's rounding noise, measured on the graph.
        from tfopt.export._validate import TOLERANCES

        cells = []
        for label, result, keras_model, precision in [
                ("FP32", state["float_export"], state["plain"], "fp32"),
                ("INT8", state["int8_export"], state["qat"], "int8")]:
            expected = keras_model(second, training=False)
            errors = _fresh_check(result.paths["onnx"], None, second, expected)
            rel, floor = TOLERANCES[precision]
            scale = _scale(expected)
            for output, error in errors.items():
                allowed = max(floor + rel * scale,
                              result.errors["onnx"].get(output, {}).get("tolerance", 0.0))
                if not error <= allowed:
                    raise AssertionError(
                        f"ONNX {label} on a fresh batch differs from Keras by {error:.3g} "
                        f"(rel {error / scale:.2g}) on {output!r}, above the {precision} "
                        f"tolerance {allowed:.3g}")
            error = max(errors.values())
            cells.append(f"{label} {error:.2g} (rel {error / scale:.1g})")
        return "fresh batch: " + ", ".join(cells)

    order = [("prune_fit", prune_fit), ("strip", strip), ("qat_calibrate", qat_calibrate),
             ("qat_fit", qat_fit), ("saved_model", saved_model), ("onnx_fp32", onnx_fp32),
             ("onnx_int8", onnx_int8), ("openvino", openvino), ("validation", validation)]
    for key, fn in order:
        if key in row["steps"]:  # run before a handoff
            continue
        if apart and key in HANDOFF_BEFORE and ran_here:
            if progress is not None:
                progress.write_text(json.dumps({**row, "running": key, "doing": (
                    "saving the models for the next process (before this step)")}))
            row["seconds"] = round(row.get("seconds", row["build_seconds"])
                                   + time.perf_counter() - t_all, 1)
            _save_handoff(handoff, row, state, dict(x=x, y=y, loss=loss, first=first,
                                                    second=second))
            return {**row, "handoff": True}
        step(key, fn)
        ran_here += 1
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    if resumed:
        row["seconds"] = round(row["seconds"] + time.perf_counter() - t_all, 1)
        row["exported_apart"] = True
    else:
        row["seconds"] = round(time.perf_counter() - t_all + row["build_seconds"], 1)
    row["zoo_version"] = ZOO_VERSION
    return row


def _save_handoff(folder: Path, row: dict, state: dict, data: dict) -> None:
    """What the next steps need, for a fresh process: the stripped and QAT models as
    ``.keras`` files, as a user saves them, the data and loss, and the row so far."""
    import pickle

    import keras
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for key in ("plain", "qat"):
        if key in state:
            state[key].save(folder / f"{key}.keras")
    loss = data.pop("loss")
    if not isinstance(loss, str):
        loss = keras.losses.serialize(loss)
    arrays = {**data, "float_out": state.get("float_out")}
    arrays = keras.tree.map_structure(np.asarray, {k: v for k, v in arrays.items()
                                                   if v is not None})
    (folder / "data.pkl").write_bytes(pickle.dumps({**arrays, "loss": loss}))
    (folder / "row.json").write_text(json.dumps(row))


def _load_handoff(name: str, folder: Path) -> tuple[dict, dict]:
    """The row and state :func:`_save_handoff` wrote, the models loaded from their files."""
    import pickle

    import keras

    if name in HUB:
        import keras_hub  # noqa: F401 - registers the backbones' classes for loading
    state = pickle.loads((folder / "data.pkl").read_bytes())
    for key in ("plain", "qat"):
        if (folder / f"{key}.keras").exists():
            state[key] = keras.models.load_model(folder / f"{key}.keras")
    return json.loads((folder / "row.json").read_text()), state


# -- the driver ----------------------------------------------------------------------

def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(rows: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    tmp.replace(RESULTS)


def run_in_subprocess(name: str, timeout: float) -> dict:
    """One row in a worker process; a model above ``EXPORT_APART_PARAMS`` in one per
    phase, each going on from the models the one before saved (see :func:`run_one`)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        handoff = Path(tmp) / "handoff"
        row = _worker(name, handoff, Path(tmp) / "phase1", timeout)
        phase = 1
        while row.pop("handoff", False):
            phase += 1
            print(f"  {name}: on in a fresh process (phase {phase}) from the saved models",
                  flush=True)
            after = _worker(name, handoff, Path(tmp) / f"phase{phase}",
                            timeout - (time.perf_counter() - t))
            if after.get("crashed"):  # that worker's own progress, else the row so far
                after = {**row, **after, "steps": {**row["steps"], **after["steps"]},
                         "seconds": round(time.perf_counter() - t, 1), "exported_apart": True}
            row = after
        return row


def _worker(name: str, handoff: Path, tmp: Path, timeout: float) -> dict:
    """``run_one`` in a subprocess; a row saying why, if it crashed or ran out of time."""
    tmp.mkdir()
    out, progress = tmp / "row.json", tmp / "progress.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(out),
           "--progress", str(progress), "--handoff", str(handoff)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=max(timeout, 1), stdout=sys.stdout,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode == 0:
            reason = None
        elif proc.returncode == -signal.SIGKILL:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            reason = (f"killed by the OS (SIGKILL), which on this {memory:.0f} GB machine "
                      "means out of memory")
        else:
            reason = (f"worker exited {proc.returncode}: "
                      + " ".join((proc.stderr or "").strip().splitlines()[-3:])[-300:])
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout:.0f} s"
    if out.exists():
        return json.loads(out.read_text())
    row = {"steps": {}}
    if progress.exists():  # the steps that finished, and the one it died in
        row = json.loads(progress.read_text())
        running, doing = row.pop("running"), row.pop("doing", None)
        row["steps"][running] = {"ok": False, "seconds": None, "cell": (
            f"crashed{' ' + doing if doing else ''}: {reason or 'no result'}")}
    row.update(crashed=reason or "no result", seconds=round(time.perf_counter() - t, 1),
               zoo_version=ZOO_VERSION)
    return row


def _cell(row: dict, key: str) -> str:
    step = row.get("steps", {}).get(key)
    if step is None:
        return "not run" if not row.get("crashed") else "– not reached (the worker crashed)"
    text = step["cell"].replace("|", "\\|")
    if step["ok"]:
        return f"✅ {text}"
    if step.get("skipped"):
        return f"– {text}"
    plan = next((p for k, p in PLANS.items() if k in step["cell"]), None)
    return f"❌ {text}" + (f" **Plan:** {plan}" if plan else "")


def write_table(rows: dict) -> None:
    import keras

    try:
        import keras_hub
        hub_version = keras_hub.__version__
    except ImportError:  # pragma: no cover
        hub_version = "not installed"
    import tensorflow as tf

    names = every_architecture()
    ran = [n for n in names if n in rows]
    # A column no row could run (a format tfopt.export does not have yet) is left out.
    steps = [k for k in STEPS if k != "openvino" or any(
        rows[n].get("steps", {}).get(k, {}).get("ok")
        and rows[n]["steps"][k]["cell"] != NOT_AVAILABLE for n in ran)]
    passed = sum(1 for n in ran for k in steps if rows[n].get("steps", {}).get(k, {}).get("ok"))
    full_rows = sum(1 for n in ran if all(rows[n].get("steps", {}).get(k, {}).get("ok")
                                          for k in steps))
    total_seconds = sum(rows[n].get("seconds", 0.0) for n in ran)
    old = [n for n in ran if rows[n].get("optimizer") != OPTIMIZER]
    stale = [n for n in ran if not _current(rows[n])]
    apart = [n for n in ran if rows[n].get("exported_apart")]
    lines = [
        "# Support matrix: keras.applications and keras-hub backbones through tfopt",
        "",
        "Written by `python benchmarks/zoo.py` (`make zoo`) from "
        "`benchmarks/results/zoo.json`; do not edit by hand.",
        "",
        "Each architecture is built with `weights=None` at the smallest input it accepts "
        "(10 logits), keras-hub backbones from tiny configs (2 layers, hidden 64, sequences "
        f"of {SEQUENCE} tokens; nothing downloaded), on random data, then: "
        "`tfopt.prune(ConstantSparsity(0.5))` and one `fit()` epoch (2 steps of 4), "
        "`tfopt.strip`, `tfopt.quantize(calibration_data=...)`, one QAT `fit()` epoch, "
        "`tfopt.export` of the stripped model to SavedModel and ONNX FP32 and of the QAT "
        "model to ONNX INT8 and OpenVINO (each validated by export itself: its max abs "
        "error is the cell; OpenVINO's file is converted from the ONNX one, and rows run "
        "since EfficientNetB7 ask for both in one export, earlier rows converted twice), "
        "and last a check of both ONNX files with ONNX Runtime on a batch the "
        "exports never saw. `rel` is the error over the largest output magnitude. "
        "The ONNX INT8 cell also counts the convolutions and matrix products ONNX "
        "Runtime's CPU provider runs as integer kernels (`ort_cpu_kernels` in the "
        "export's manifest; a transformer's attention score and context products stay "
        "float by design), and a file that runs none fails: it would be no faster "
        "than float.",
        "",
        f"Models above {EXPORT_APART_PARAMS / 1e6:.0f}M parameters"
        + (f" ({', '.join(apart)}, marked *(exported apart)*)" if apart else "")
        + " run in three processes, as a user with a model this size would: prune and "
        "strip; QAT and its fit(); the exports, each process loading the "
        "stripped and QAT models the one before saved as `.keras` files (rows run before "
        "2026-11-26 16:45 UTC in two: training, then the exports). The process that ran "
        "two fit()s of ConvNeXtLarge held ~13 GB.",
        "",
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras-hub {hub_version}, "
        f"2 CPU cores; rows run on {_dates(rows, ran)}.",
        "",
        f"**Totals:** {len(ran)} of {len(names)} architectures run; {passed} of "
        f"{len(ran) * len(steps)} cells pass ({len(ran)} rows x {len(steps)} columns); "
        f"{full_rows} rows pass every column. Time: {total_seconds / 60:.1f} min of "
        "work (sum of each row's subprocess, build to validation).",
        "",
        f"Rows marked *(stale)* were measured by an older version of the zoo "
        f"({', '.join(stale) or 'none now'})" + (
            ", before: " + "; ".join(CHANGES[v] for v in sorted(CHANGES) if v > min(
                rows[n].get("zoo_version", 1) for n in stale)) if stale else "")
        + ". `python benchmarks/zoo.py --resume` reruns them.",
        "",
        f"Both fits use `{OPTIMIZER}`"
        + (f", except rows run before it was introduced, with plain `Adam()`: "
           f"{', '.join(old)}." if old else ".") + " A QAT fit() that diverges (NaN loss "
        "or weights) is run again from its starting weights with every BatchNormalization "
        "on its moving statistics, and its cell says so." + " Cells: ✅ passed (the measured max abs "
        "error), ❌ failed (the exception, and where known the layer type and the plan), "
        "– not reached because a step it needs failed.",
        "",
        "| architecture | params | input | "
        + " | ".join(HEADERS[k] for k in steps) + " | seconds |",
        "| --- | ---: | --- | " + " | ".join("---" for _ in steps) + " | ---: |",
    ]
    for name in names:
        row = rows.get(name)
        if row is None:
            lines.append(f"| {name} | | | " + " | ".join("not run" for _ in steps) + " | |")
            continue
        crashed = row.get("crashed")
        cells = [_cell(row, k) for k in steps]
        if crashed and not row.get("steps"):
            cells = [f"❌ {crashed}"] + ["–"] * (len(steps) - 1)
        label = name if _current(row) else f"{name} *(stale)*"
        if row.get("exported_apart"):
            label += " *(exported apart)*"
        lines.append(f"| {label} | {row.get('params', '')} | {_input(row.get('input'))} | "
                     + " | ".join(cells) + f" | {row.get('seconds', '')} |")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")


def _current(row) -> bool:
    return bool(row) and row.get("zoo_version") == ZOO_VERSION


def _input(shape) -> str:
    if isinstance(shape, dict):
        return ", ".join(f"{k} {v}" for k, v in shape.items())
    return "x".join(str(d) for d in shape) if shape else ""


def _dates(rows, ran) -> str:
    days = sorted({rows[n].get("started", "")[:10] for n in ran} - {""})
    return ", ".join(days) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--resume", action="store_true",
                        help="skip architectures already in the cache (rows measured by an "
                             "older version of this script are rerun)")
    parser.add_argument("--budget", type=float, default=None,
                        help="start no new architecture after this many seconds")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one architecture may take")
    parser.add_argument("--grace", type=float, default=150,
                        help="with --budget: an architecture still running this many seconds "
                             "after the budget is stopped and left for the next run")
    parser.add_argument("--list", action="store_true", help="print the architectures")
    parser.add_argument("--table", action="store_true",
                        help="only write docs/support.md from the cache")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--progress", help=argparse.SUPPRESS)
    parser.add_argument("--handoff", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        row = run_one(args.worker, Path(args.progress) if args.progress else None,
                      Path(args.handoff) if args.handoff else None)
        Path(args.out).write_text(json.dumps(row))
        return 0
    names = every_architecture()
    if args.list:
        print("\n".join(names))
        return 0
    rows = load()
    if not args.table:
        chosen = names if not args.only else [n.strip() for n in args.only.split(",")]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            parser.error(f"unknown architecture(s) {unknown}; see --list")
        if args.resume:
            chosen = [n for n in chosen if not _current(rows.get(n)) or rows[n].get("crashed")]
        start = time.perf_counter()
        for i, name in enumerate(chosen, 1):
            elapsed = time.perf_counter() - start
            if args.budget is not None and elapsed > args.budget:
                print(f"budget of {args.budget:.0f} s spent; {len(chosen) - i + 1} left "
                      "(rerun with --resume)", flush=True)
                break
            print(f"[{i}/{len(chosen)}] {name} ({elapsed:.0f} s so far)", flush=True)
            timeout = args.timeout
            if args.budget is not None:
                timeout = min(timeout, args.budget + args.grace - elapsed)
            row = run_in_subprocess(name, timeout)
            if timeout < args.timeout and "timed out" in str(row.get("crashed", "")):
                print(f"[{i}/{len(chosen)}] {name}: stopped at the end of this run's budget; "
                      "left for the next run (--resume)", flush=True)
                break
            rows[name] = row
            save(rows)
            ok = sum(1 for s in rows[name].get("steps", {}).values() if s["ok"])
            print(f"[{i}/{len(chosen)}] {name}: {ok}/{len(STEPS)} steps pass in "
                  f"{rows[name].get('seconds', 0):.0f} s"
                  + (f" ({rows[name]['crashed']})" if rows[name].get("crashed") else ""),
                  flush=True)
    write_table(rows)
    print(f"wrote {TABLE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

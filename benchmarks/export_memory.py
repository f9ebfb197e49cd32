"""Peak memory of each stage of ``tfopt.export``, for one keras.applications model.

    python benchmarks/export_memory.py --model ConvNeXtTiny
    python benchmarks/export_memory.py --model ConvNeXtTiny --int8 --formats onnx,openvino

Prints one row per stage (the Keras model, QAT, then each stage of the
export, the stages of tf2onnx's conversion nested under it): how often it ran,
its peak resident memory and the resident memory after it. The peak of a
stage is Linux's high-water mark (``VmHWM``), reset when the stage starts
(``/proc/self/clear_refs``), so each row is what that stage itself reached,
nested stages included. Run it alone: it measures this process only, but
another job's memory can push the OS to reclaim pages and lower the numbers.

The zoo (``benchmarks/zoo.py``) records which architectures run out of memory;
this script says where.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, module, attribute): wrapped in this order; ``table[key]`` wraps one entry
# of a module's dict. Labels with a leading space run inside the one above them
# (these run inside tfopt.export).
STAGES = [
    (" plan (trace, Keras reference outputs)", "tfopt.export._api", "_plan"),
    (" SavedModel", "tfopt.export._api", "_BUILDERS[saved_model]"),
    (" ONNX", "tfopt.export._api", "_BUILDERS[onnx]"),
    ("  freeze", "tfopt.export._saved_model", "frozen_graph_def"),
    ("  freeze", "tensorflow.python.framework.convert_to_constants",
     "convert_variables_to_constants_v2"),  # tfopt before 2026-11-26
    ("  tf2onnx conversion", "tfopt.export._onnx", "_from_graph_def"),
    ("  tf2onnx conversion", "tf2onnx.convert", "from_graph_def"),  # tfopt before 2026-11-26
    ("   tf2onnx freeze_session", "tf2onnx.tf_loader", "freeze_session"),
    ("   tf2onnx tf_optimize (grappler)", "tf2onnx.tf_loader", "tf_optimize"),
    ("   tf2onnx process_tf_graph", "tf2onnx.tfonnx", "process_tf_graph"),
    ("   tf2onnx process_tf_graph", "tf2onnx.convert", "process_tf_graph"),
    ("   tf2onnx optimize_graph", "tf2onnx.optimizer", "optimize_graph"),
    ("   tf2onnx make_model", "tf2onnx.graph", "Graph.make_model"),
    ("  weights stored as int8", "tfopt.export._onnx", "store_weights_as_int8"),
    ("  run the converted graph", "tfopt.export._api", "run_graph"),
    ("  quantization steps and noise", "tfopt.export._api", "_qdq_steps"),
    ("  ORT placement (quantize_for_cpu)", "tfopt.export._ort_quant", "quantize_for_cpu"),
    ("   quant_pre_process (BN folding)", "tfopt.export._ort_quant", "_fold"),
    ("   quantize_static", "onnxruntime.quantization", "quantize_static"),
    ("  save", "tfopt.export._onnx", "save"),
    ("  kernel report", "tfopt.export._api", "_kernel_report"),
    (" OpenVINO", "tfopt.export._api", "_BUILDERS[openvino]"),
    (" validation", "tfopt.export._api", "_validate"),
]


def _status(key: str) -> float:
    """``VmHWM`` or ``VmRSS`` of this process, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {key}: this script needs Linux")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Recorder:
    """Peaks of nested stages: a stage's peak includes its children's."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.stack: list[list[float]] = [[0.0]]  # running peak of each open stage

    @contextlib.contextmanager
    def stage(self, label: str):
        self.stack[-1][0] = max(self.stack[-1][0], _status("VmHWM"))
        _reset_peak()
        self.rows.setdefault(label, {"calls": 0, "peak": 0.0, "seconds": 0.0})  # start order
        self.stack.append([_status("VmRSS")])
        t = time.perf_counter()
        try:
            yield
        finally:
            peak = max(self.stack.pop()[0], _status("VmHWM"))
            row = self.rows.setdefault(label, {"calls": 0, "peak": 0.0, "seconds": 0.0})
            row["calls"] += 1
            row["peak"] = max(row["peak"], peak)
            row["seconds"] += time.perf_counter() - t
            row["after"] = _status("VmRSS")
            self.stack[-1][0] = max(self.stack[-1][0], peak)
            _reset_peak()

    def wrap(self, label: str, module: str, attribute: str) -> bool:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            return False
        if attribute.endswith("]"):  # an entry of a dict: _BUILDERS[onnx]
            attribute, key = attribute[:-1].split("[")
            owner, attribute = getattr(owner, attribute), key
            original = owner.get(attribute)
            put = owner.__setitem__
        else:
            while "." in attribute:  # a method: Graph.make_model
                head, attribute = attribute.split(".", 1)
                owner = getattr(owner, head)
            original = getattr(owner, attribute, None)
            put = functools.partial(setattr, owner)
        if original is None:
            return False

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with self.stage(label):
                return original(*args, **kwargs)

        put(attribute, wrapped)
        return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ConvNeXtTiny", help="a keras.applications name")
    parser.add_argument("--input", type=int, default=32, help="input height and width")
    parser.add_argument("--int8", action="store_true", help="export the QAT model instead")
    parser.add_argument("--formats", default="onnx", help="comma-separated export formats")
    parser.add_argument("--fit", action="store_true",
                        help="one fit() epoch before the export, as a user would have run")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import tfopt

    recorder = Recorder()
    missing = [label.strip() for label, module, attribute in STAGES
               if not recorder.wrap(label, module, attribute)]
    keras.utils.set_random_seed(0)
    with recorder.stage("build the Keras model"):
        model = getattr(keras.applications, args.model)(
            weights=None, input_shape=(args.input, args.input, 3), classes=10)
    weight_gb = sum(int(np.prod(w.shape)) * 4 for w in model.weights) / 2**30
    x = np.random.default_rng(0).random((8, args.input, args.input, 3), dtype=np.float32)
    if args.int8:
        with recorder.stage("tfopt.quantize (calibrated)"):
            model = tfopt.quantize(model, calibration_data=x)
    if args.fit:
        with recorder.stage("fit() one epoch (2 steps of 4)"):
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
            model.fit(x, np.arange(len(x)) % 10, batch_size=4, epochs=1, verbose=0)
    failure = None
    with tempfile.TemporaryDirectory(prefix="tfopt-export-memory-") as tmp:
        try:
            with recorder.stage("tfopt.export"):
                tfopt.export(model, Path(tmp) / "out", formats=tuple(args.formats.split(",")),
                             validation_data=x[:4])
        except tfopt.errors.TfoptError as exc:  # the stages up to it were measured
            failure = exc

    print(f"{args.model} at {args.input}x{args.input}, {'QAT' if args.int8 else 'float'}, "
          f"formats {args.formats}; float32 weights {weight_gb:.3f} GB")
    print(f"{'stage':48s} {'calls':>5s} {'peak GB':>8s} {'x weights':>9s} {'after GB':>8s} "
          f"{'seconds':>8s}")
    for label, row in recorder.rows.items():
        print(f"{label:48s} {row['calls']:5d} {row['peak']:8.2f} {row['peak'] / weight_gb:9.1f} "
              f"{row['after']:8.2f} {row['seconds']:8.1f}")
    if failure is not None:
        print(f"the export failed, in the last stage above: {failure}")
    if missing:
        print(f"not measured (not present in this install): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

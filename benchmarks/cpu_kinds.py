"""INT8 on every CPU kind: the same file, this CPU's integer kernels and an emulated AVX2 CPU's.

A digits CNN with BatchNorm, a residual Add, a SeparableConv2D and Flatten ->
Dense (``tfopt.examples.digits_residual_cnn``) is trained on scikit-learn's
digits, then QAT-trained twice from the same weights: with portable weights
(tfopt's default, int8 weights on [-64, 64]) and with full-range ones
(``portable_weights=False``, [-127, 127]). Each is exported to the default
INT8 ONNX (the full-range one with ``tolerance=`` forced, since validation
refuses it on a CPU without VNNI) and run on the 450 test images:

* with ONNX Runtime's graph optimizations off (each Q/DQ computed as written:
  the file's own arithmetic, the same on every CPU);
* as served, with integer kernels, on this CPU;
* as served on an emulated Haswell (AVX2, no VNNI: ``vpmaddubsw``, whose int16
  pair sums saturate), through ``qemu-x86_64 -cpu Haswell`` where installed
  (Debian: ``apt-get install qemu-user``).

For each: accuracy, argmax agreement with the Keras QAT model and the largest
logit difference from it (also as a share of the largest logit), beside the
export's static proof (``int8_portability``).

Usage: python benchmarks/cpu_kinds.py [--seed 0] [--json benchmarks/results/cpu_kinds.json]
       [--keep DIR]   (keeps the files, for benchmarks/cpu_kinds_run.py on another machine)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import tfopt  # noqa: E402
from tfopt.examples import compile_classifier, digits_residual_cnn  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

_RUN = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    path, data, out, optimized = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    np.save(out, session.run(None, {session.get_inputs()[0].name: np.load(data)})[0])
""")


def logits(path: Path, x: np.ndarray, optimized: bool, emulate: str | None = None) -> np.ndarray:
    """The file's outputs from ONNX Runtime in a fresh process (under qemu as ``emulate``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        (tmp / "run.py").write_text(_RUN)
        command = [sys.executable, str(tmp / "run.py"), str(path), str(tmp / "x.npy"),
                   str(tmp / "y.npy"), "1" if optimized else "0"]
        if emulate:
            command = [shutil.which("qemu-x86_64"), "-cpu", emulate, *command]
        subprocess.run(command, check=True, capture_output=True, timeout=900)
        return np.load(tmp / "y.npy")


def row(label: str, out: np.ndarray, qat: np.ndarray, y: np.ndarray) -> dict:
    diff = float(np.max(np.abs(out - qat)))
    return {"run": label, "accuracy": float(np.mean(out.argmax(1) == y)),
            "agreement": float(np.mean(out.argmax(1) == qat.argmax(1))),
            "max_diff": diff, "max_diff_share": diff / float(np.max(np.abs(qat)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--json", default="benchmarks/results/cpu_kinds.json")
    parser.add_argument("--keep", default=None,
                        help="a folder to keep the two ONNX files and the test images in "
                             "(to run them on another machine)")
    args = parser.parse_args()

    emulated = "Haswell" if shutil.which("qemu-x86_64") else None
    cpu = {"isa": _cpu_int8.instruction_set(), "onnxruntime": ort.__version__}
    print(f"this CPU: {cpu['isa']}; emulated: "
          f"{emulated + ' (avx2, no VNNI)' if emulated else 'none (qemu-x86_64 not installed)'}",
          flush=True)
    (x, y), (x_test, y_test) = tfopt.datasets.load_digits()
    keras.utils.set_random_seed(args.seed)
    model = compile_classifier(digits_residual_cnn())
    model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=0)
    weights = model.get_weights()
    results = {"cpu": cpu, "emulated": emulated, "seed": args.seed,
               "float_accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1]),
               "files": {}}
    with tempfile.TemporaryDirectory(prefix="tfopt-cpu-kinds-") as tmp:
        for portable in (True, False):
            keras.utils.set_random_seed(args.seed)
            model.set_weights(weights)
            qat = compile_classifier(tfopt.quantize(
                model, tfopt.QuantizationConfig(portable_weights=portable),
                calibration_data=x[:256]), 2e-4)
            qat.fit(x, y, epochs=args.qat_epochs, batch_size=32, verbose=0)
            reference = qat.predict(x_test, verbose=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the full-range file's VNNI warning
                result = tfopt.export(qat, Path(tmp) / str(portable), formats=("onnx",),
                                      validation_data=x_test,
                                      tolerance=None if portable else 1.0)
            path = result.paths["onnx"]
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, keep / f"digits_{'portable' if portable else 'full'}.onnx")
                np.save(keep / "digits_x_test.npy", x_test)
                np.save(keep / f"digits_{'portable' if portable else 'full'}_qat.npy", reference)
            runs = [row("Q/DQ arithmetic (optimizations off)", logits(path, x_test, False),
                        reference, y_test),
                    row("integer kernels, this CPU", logits(path, x_test, True),
                        reference, y_test)]
            if emulated:
                runs.append(row(f"integer kernels, emulated {emulated}",
                                logits(path, x_test, True, emulated), reference, y_test))
            label = "portable [-64, 64]" if portable else "full range [-127, 127]"
            results["files"][label] = {
                "qat_accuracy": float(np.mean(reference.argmax(1) == y_test)),
                "int8_portability": result.manifest["artifacts"]["onnx"]["int8_portability"],
                "runs": runs}
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


def print_table(results: dict) -> None:
    print(f"\ndigits CNN, float accuracy {results['float_accuracy']:.2%}; this CPU: "
          f"{results['cpu']['isa']}")
    print(f"| weights | proof | run | accuracy (QAT) | argmax agreement | max diff vs QAT |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for label, entry in results["files"].items():
        proof = entry["int8_portability"]
        verdict = ("portable" if proof["portable"] else
                   f"needs {' or '.join(proof['requires'])}")
        for run in entry["runs"]:
            print(f"| {label} | {verdict} | {run['run']} | {run['accuracy']:.2%} "
                  f"({entry['qat_accuracy']:.2%}) | {run['agreement']:.2%} | "
                  f"{run['max_diff']:.3g} ({run['max_diff_share']:.1%} of max) |")
    print(flush=True)


if __name__ == "__main__":
    main()

"""Run INT8 ONNX files on this machine's CPU: the Q/DQ arithmetic against the integer kernels.

Needs only numpy and onnxruntime, so it runs on a machine without TensorFlow
(another CPU kind). For each ``NAME.onnx`` in a folder with ``NAME_qat.npy``
(the Keras QAT model's outputs) and an inputs file (``--inputs``), prints the
CPU's instruction sets and, per file, the largest difference from the QAT
model with graph optimizations off and on, and the argmax agreement.

Usage: python benchmarks/cpu_kinds_run.py FOLDER --inputs FOLDER/digits_x_test.npy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def isa() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "?")
    flags = set(next(line for line in text.splitlines() if line.startswith("flags"))
                .split(":", 1)[1].split())
    return f"{model}: {' '.join(f for f in FLAGS if f in flags)}"


def run(path: Path, x: np.ndarray, optimized: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--inputs", required=True)
    args = parser.parse_args()
    x = np.load(args.inputs)
    result = {"cpu": isa(), "onnxruntime": ort.__version__, "files": {}}
    print(f"CPU {result['cpu']}; onnxruntime {ort.__version__}")
    for path in sorted(Path(args.folder).glob("*.onnx")):
        qat = np.load(path.with_name(f"{path.stem}_qat.npy"))
        row = {}
        for label, optimized in (("arithmetic", False), ("kernels", True)):
            out = run(path, x, optimized)
            row[label] = {"max_diff": float(np.max(np.abs(out - qat))),
                          "share": float(np.max(np.abs(out - qat)) / np.max(np.abs(qat))),
                          "agreement": float(np.mean(out.argmax(1) == qat.argmax(1)))}
        result["files"][path.name] = row
        print(f"{path.name}: " + "; ".join(
            f"{k} max diff {v['max_diff']:.3g} ({v['share']:.1%} of max), argmax agreement "
            f"{v['agreement']:.2%}" for k, v in row.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Where ONNX Runtime's CPU provider spends its time in each of several files, side by side.

Each file gets a session with ONNX Runtime's profiler on; the sessions run in
turn, round by round, on the same random input (so no file is timed warmer
than another), and the median kernel time of every node is summed per op
type. Two files that run the same integer kernels for the same time are
level, whatever a wall-clock median says on a noisy machine.

Usage: python benchmarks/ort_profile.py A.onnx B.onnx [...] [--batch 1] [--rounds 40]
       [--low 0 --high 255]   (the input's value range; images by default)
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # importing tfopt imports TensorFlow

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from tfopt.targets._cpu_int8 import describe_cpu  # noqa: E402

def profile(paths: list[str], batch: int, rounds: int, low: float, high: float) -> dict:
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="tfopt-ort-profile-") as tmp:
        for i, path in enumerate(paths):
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"file{i}")
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            sessions[path] = ort.InferenceSession(path, options,
                                                  providers=["CPUExecutionProvider"])
        feeds = {}
        for path, session in sessions.items():
            first = session.get_inputs()[0]
            shape = [batch if not isinstance(d, int) else d for d in first.shape]
            shape[0] = batch
            feeds[path] = {first.name: np.random.default_rng(0).uniform(
                low, high, size=shape).astype(np.float32)}
        for _ in range(rounds):
            for path, session in sessions.items():
                session.run(None, feeds[path])
        result = {}
        for path, session in sessions.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            per_node = collections.defaultdict(list)
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    per_node[(event["args"]["op_name"], event["name"])].append(event["dur"])
            per_op = collections.Counter()
            for (op, _), durations in per_node.items():
                per_op[op] += float(np.median(durations))
            result[path] = dict(per_op.most_common())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--low", type=float, default=0.0)
    parser.add_argument("--high", type=float, default=255.0)
    args = parser.parse_args()
    print(f"{describe_cpu()}; onnxruntime {ort.__version__}; batch {args.batch}, "
          f"{args.rounds} interleaved rounds; median microseconds per node, summed per op type")
    for path, per_op in profile(args.files, args.batch, args.rounds, args.low,
                                args.high).items():
        total = sum(per_op.values())
        ops = ", ".join(f"{op} {us:.0f}" for op, us in per_op.items())
        print(f"{path}: {total:.0f} us in kernels ({ops})")


if __name__ == "__main__":
    main()

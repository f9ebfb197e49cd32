"""Peak memory of one runner serving, measured in a fresh process.

Run as a script (``python _probe.py SPEC_JSON``), not as ``-m tfopt...``: the
``tfopt`` package is registered without running its ``__init__``, so a probe
of ONNX Runtime or OpenVINO imports neither TensorFlow nor Keras, and its
resident memory is the engine's own, as in a server process.

Prints one JSON line: ``{"peak_rss_bytes": ..., "device_bytes": ...,
"tensorflow_imported": ...}`` (device memory from ``nvidia-smi`` for CUDA
engines, else null).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import types
from pathlib import Path


def _register_package() -> None:
    root = Path(__file__).resolve().parents[1]
    for name, path in (("tfopt", root), ("tfopt.artifacts", root / "artifacts")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module


def _device_bytes() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(used.strip()) * 2**20
    return None


def _peak_rss() -> int:
    """This process's resident-memory high-water mark, in bytes.

    On Linux from ``VmHWM`` (of this process's own address space):
    ``getrusage``'s ``ru_maxrss`` carries over the parent's high-water mark
    through fork and exec, so a probe started by a process holding
    TensorFlow would report TensorFlow's memory as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def main(spec: dict) -> dict:
    _register_package()
    import numpy as np

    from tfopt.artifacts._load import from_spec

    runner = from_spec(spec["runner"])
    rng = np.random.default_rng(0)
    feed = [rng.uniform(size=shape).astype(dtype) for shape, dtype in spec["inputs"]]
    for _ in range(int(spec.get("calls", 10))):
        runner.run(feed)
    peak = _peak_rss()
    cuda = spec["runner"].get("provider", "").startswith("CUDA") or \
        spec["runner"]["loader"] == "tensorrt"
    return {"peak_rss_bytes": int(peak), "device_bytes": _device_bytes() if cuda else None,
            "tensorflow_imported": "tensorflow" in sys.modules}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

"""Peak memory of one runner serving, measured in a fresh process.

Run as a script (``python _probe.py SPEC_JSON``), not as ``-m tfopt...``: the
``tfopt`` package is registered without running its ``__init__``, so a probe
of ONNX Runtime or OpenVINO imports neither TensorFlow nor Keras, and its
resident memory is the engine's own, as in a server process.

Prints one JSON line: ``{"peak_rss_bytes": ..., "device_bytes": ...,
"tensorflow_imported": ...}`` (for CUDA engines the GPU memory the process
holds after the calls, from NVML or ``nvidia-smi``; else null).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional


def _register_package() -> None:
    root = Path(__file__).resolve().parents[1]
    for name, path in (("tfopt", root), ("tfopt.artifacts", root / "artifacts")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module


def _device_bytes(pid: Optional[int] = None) -> Optional[int]:
    """GPU memory this process (``pid``) holds now, in bytes; None where none is seen.

    From NVML (``pynvml``, the nvidia-ml-py package) where it imports, else
    from ``nvidia-smi --query-compute-apps``. An engine's memory pool keeps
    what its largest run took, so after the timed calls this is the engine's
    peak, allocator slack included.
    """
    pid = os.getpid() if pid is None else pid
    found = _nvml_bytes(pid)
    return found if found is not None else _smi_bytes(pid)


def _nvml_bytes(pid: int) -> Optional[int]:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPU to report
        return None
    try:
        total, seen = 0, False
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == pid and process.usedGpuMemory is not None:
                    total, seen = total + int(process.usedGpuMemory), True
        return total if seen else None
    except Exception:  # noqa: BLE001 - NVML without per-process accounting: try nvidia-smi
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _smi_bytes(pid: int) -> Optional[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, seen = 0, False
    for line in out.splitlines():
        found, _, used = line.partition(",")
        if found.strip() == str(pid) and used.strip().isdigit():
            total, seen = total + int(used.strip()) * 2**20, True
    return total if seen else None


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

"""The runner: one loaded artifact on one engine, ready to be called many times.

Imports only numpy, so that the ONNX Runtime and OpenVINO runners built on it
work on machines without TensorFlow (``benchmarks/gpu_onnx.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Runner:
    """A ready-to-time way of running one artifact on one engine.

    Every runner returns its outputs in the same order, named the same way:
    the order of the model's outputs as ``tfopt.export`` recorded them
    (``manifest.json``'s ``signature.outputs``), whichever engine runs them.

    Attributes:
        name: What a report shows, e.g. ``"optimized onnx int8 / ORT CPU"``.
        backend: ``keras_*``, ``saved_model``, ``saved_model_xla``, ``frozen_graph``,
            ``ort_cpu``, ``ort_cuda``, ``openvino_cpu``, ``tensorrt``.
        artifact: The file or folder run (None for a model in memory).
        run: The timed call: arrays ordered like the inputs in, the outputs
            (ordered like ``outputs``) out. On a GPU they may stay on the
            device; ``fetch`` brings them to the host.
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
        outputs: Output names, in order.
        fetch: Turns what ``run`` returned into host numpy arrays.
        spec: How to load this runner again in another process (for the
            memory probe); None if it cannot be.
        details: Engine settings worth reporting (OpenVINO's hints, ...).
    """

    name: str
    backend: str
    artifact: Optional[Path]
    run: Callable[[Sequence[np.ndarray]], object]
    precision: str = "fp32"
    outputs: tuple = ()
    fetch: Optional[Callable[[object], list]] = None
    spec: Optional[dict] = None
    details: dict = dataclasses.field(default_factory=dict)

    def __call__(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Run and return ``{output name: host array}`` in output order."""
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        values = self.run(arrays)
        if not self.outputs:  # a hand-made runner returning its one output
            return {"output": _host(values)}
        values = self.fetch(values) if self.fetch is not None else values
        return {name: _host(v) for name, v in zip(self.outputs, values)}

    def first(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The first output, on the host."""
        return next(iter(self(arrays).values()))


def _host(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def ordered(names: Sequence[str], wanted: Optional[Sequence[str]]) -> list[str]:
    """``names`` in the order of ``wanted`` (those in ``wanted`` first), else as given."""
    if not wanted:
        return list(names)
    rank = {n: i for i, n in enumerate(wanted)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def find_manifest(path: Path, levels: int = 4) -> Optional[dict]:
    """The ``manifest.json`` that ``tfopt.export`` wrote for an artifact at ``path``.

    An export directory holds ``manifest.json`` beside ``model.onnx`` and above
    ``saved_model/<version>/``, ``openvino/`` and ``triton/<name>/<version>/``.
    """
    path = Path(path).resolve()
    for parent in list(path.parents)[:levels]:
        candidate = parent / "manifest.json"
        if candidate.is_file():
            try:
                manifest = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(manifest.get("signature"), dict):
                return manifest
    return None


def manifest_io(manifest: Optional[dict]) -> tuple[Optional[list[dict]], Optional[list[str]]]:
    """Input specs (``name``, ``shape``, ``dtype``) and output names from a manifest."""
    if not manifest:
        return None, None
    signature = manifest["signature"]
    inputs = [dict(i) for i in signature.get("inputs", [])]
    outputs = [o["name"] if isinstance(o, dict) else o for o in signature.get("outputs", [])]
    return inputs or None, outputs or None


def portability_warning(path: Path) -> str:
    """A warning for an INT8 artifact whose manifest says it needs VNNI or AMX, on a CPU
    without either (``""`` otherwise).

    A file exported with ``QuantizationConfig(portable_weights=False)`` has
    weight pairs whose products can leave int16 on such CPUs, where ONNX
    Runtime's and OpenVINO's integer kernels then saturate.
    """
    from tfopt.targets._cpu_int8 import cpu_sums_wide, instruction_set

    manifest = find_manifest(Path(path)) or {}
    if not manifest.get("quantized"):
        return ""
    needs = [a.get("int8_portability") for a in manifest.get("artifacts", {}).values()
             if isinstance(a, dict) and isinstance(a.get("int8_portability"), dict)
             and not a["int8_portability"].get("portable", True)]
    if not needs or cpu_sums_wide() is not False:
        return ""
    return (f"{path} is an INT8 file exported with portable_weights=False: its integer "
            f"kernels are exact only on CPUs with {' or '.join(needs[0]['requires'])}, and this "
            f"CPU has none ({instruction_set()}); its outputs here are wrong where a pair of "
            "products saturates int16. Export the QAT model with the default "
            "QuantizationConfig(portable_weights=True) to serve it on this CPU.")

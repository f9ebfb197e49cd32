"""Compare an exported artifact's outputs with the Keras model's."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Optional

import numpy as np

from tfopt.errors import ExportValidationError

# (relative to the output's largest magnitude, absolute floor), by precision.
# bf16 (OpenVINO's inference precision on CPUs with bf16) keeps 8 bits of
# mantissa, against fp16's 11: its tolerance is looser than fp16's.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 1e-3), "int8": (5e-2, 1e-3),
              "bf16": (3e-2, 1e-3)}


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output of one artifact is from Keras."""

    max_abs: float
    max_rel: float  # max_abs divided by the largest magnitude of the Keras output
    tolerance: float  # the max_abs allowed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(artifact: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
            precision: str, rtol: Optional[float] = None) -> dict[str, OutputError]:
    """Errors per output; raise one ExportValidationError naming every output that drifts."""
    rel, floor = TOLERANCES[precision] if rtol is None else (rtol, 0.0)
    errors, problems = {}, []
    for name, ref in reference.items():
        if name not in actual:
            problems.append(f"output {name!r} is missing; it returned {sorted(actual)}")
            continue
        got = np.asarray(actual[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            problems.append(f"output {name!r} has shape {got.shape}, Keras gives {ref.shape}")
            continue
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        if not np.isfinite(max_abs):
            max_abs = float("inf")
        tolerance = floor + rel * scale
        errors[name] = OutputError(max_abs, max_abs / max(scale, 1e-12), tolerance)
        if not max_abs <= tolerance:
            bad = int(np.sum(~np.isfinite(got)))
            what = (f"outputs NaN or infinity in {bad} of {got.size} values where Keras does "
                    "not" if bad else
                    f"differs from the Keras model by up to {max_abs:.3g} "
                    f"({max_abs / max(scale, 1e-12):.2e} of its largest value {scale:.3g})")
            problems.append(f"output {name!r} {what}, above the {precision} tolerance "
                            f"{tolerance:.3g}")
    if problems:
        raise ExportValidationError(
            f"{artifact}: " + "; ".join(problems) + ". Nothing was written. Check the "
            "inputs, or pass a larger tolerance= if this precision loss is expected.")
    return errors


def sizes(path: Path) -> dict[str, int]:
    """Bytes on disk, and gzip-compressed (what a download or a registry stores)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = sum(p.stat().st_size for p in files)
    compressed = sum(len(gzip.compress(p.read_bytes(), compresslevel=6)) for p in files)
    return {"raw": raw, "gzip": compressed}

"""`Target`: what "fast enough" means for :func:`tfopt.optimize`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from tfopt import _checks
from tfopt.errors import ConfigError

ENGINES = ("onnxruntime", "openvino")


@dataclasses.dataclass(frozen=True)
class Target:
    """The engine a model will be served on, and how fast it must be there.

    Give exactly one of ``speedup``, ``latency_ms`` and ``flops``. Speed-ups
    and latencies are *measured*: every candidate is exported and timed on
    ``engine`` on this machine's CPU, at ``batch_size``, against the dense
    float model exported and timed the same way.

    Args:
        engine: ``"onnxruntime"`` (ONNX Runtime's CPU provider, INT8 as
            integer kernels) or ``"openvino"`` (OpenVINO CPU, from the same
            ONNX).
        batch_size: The batch the latency is measured at.
        speedup: How many times faster than the dense FP32 model on ``engine``.
        latency_ms: The latency to reach, in milliseconds per batch.
        flops: The fraction of the dense model's FLOPs to keep (0.4: 40%);
            the model is then also quantized if that stays within the budget.

    Example:
        >>> tfopt.Target(engine="onnxruntime", batch_size=1, speedup=3.0)
        >>> tfopt.Target(flops=0.4)
    """

    engine: str = "onnxruntime"
    batch_size: int = 1
    speedup: Optional[float] = None
    latency_ms: Optional[float] = None
    flops: Optional[float] = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"Target.engine must be one of {list(ENGINES)}, got "
                              f"{self.engine!r}.")
        _checks.number("Target.batch_size", self.batch_size, low=1, integer=True)
        given = [name for name in ("speedup", "latency_ms", "flops")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                "Give a Target exactly one goal: speedup= (times faster than the dense FP32 "
                "model on the engine), latency_ms= or flops= (fraction of FLOPs kept); got "
                f"{given or 'none'}. For example tfopt.Target(speedup=3.0).")
        if self.speedup is not None:
            _checks.number("Target.speedup", self.speedup, low=1.0, low_open=True,
                           hint="A speed-up of 3.0 means three times faster than the dense "
                                "FP32 model.")
        if self.latency_ms is not None:
            _checks.number("Target.latency_ms", self.latency_ms, low=0.0, low_open=True)
        if self.flops is not None:
            _checks.number("Target.flops", self.flops, low=0.0, high=1.0, low_open=True,
                           high_open=True, hint="flops=0.4 keeps 40% of the dense FLOPs.")

    def describe(self) -> str:
        where = f"on {self.engine} at batch {self.batch_size}"
        if self.speedup is not None:
            return f"{self.speedup:g}x faster than the dense FP32 model {where}"
        if self.latency_ms is not None:
            return f"{self.latency_ms:g} ms per batch {where}"
        return f"{self.flops:.0%} of the dense FLOPs, measured {where}"

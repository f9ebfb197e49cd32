"""QuantizationConfig, and the one place where string shortcuts are resolved."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Union

from tfopt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How :func:`tfopt.quantize` fake-quantizes a model.

    The defaults follow TensorRT's explicit-quantization rules, so the
    exported ONNX carries Q/DQ pairs that TensorRT builds INT8 kernels from:
    symmetric int8 everywhere (zero points 0), weights per output channel in
    the narrow range [-127, 127], activations per tensor.

    Args:
        weight_bits: Bits for weights (2-8; ONNX Q/DQ export needs 8).
        activation_bits: Bits for activations (2-8; ONNX Q/DQ export needs 8).
        per_channel_weights: One scale per output channel (else one per tensor).
        narrow_range_weights: Use [-127, 127] instead of [-128, 127] for weights,
            as TensorRT requires.
        activation_ema_decay: Decay of the moving average that tracks each
            activation's absolute maximum during training.
        freeze_activation_ranges_after: Training step after which activation
            ranges stop moving (``None``: they move for as long as training runs).
        quantize_residual_adds: Put Q/DQ on both inputs of ``Add`` layers, as
            NVIDIA's placement guidance recommends, so TensorRT fuses the add.
        preserve_sparsity: Keep weights that are exactly zero at zero during
            QAT, so that a pruned model stays pruned.

    Example:
        >>> config = tfopt.QuantizationConfig(freeze_activation_ranges_after=500)
        >>> qat = tfopt.quantize(model, config)
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel_weights: bool = True
    narrow_range_weights: bool = True
    activation_ema_decay: float = 0.999
    freeze_activation_ranges_after: Optional[int] = None
    quantize_residual_adds: bool = True
    preserve_sparsity: bool = True

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise ConfigError(
                    f"{name} must be an integer from 2 to 8, got {value!r}. "
                    "TensorRT and ONNX Q/DQ use 8."
                )
        decay = self.activation_ema_decay
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) \
                or not 0.0 < decay < 1.0:
            raise ConfigError(
                f"activation_ema_decay must be a number in (0, 1), got {decay!r} "
                f"({type(decay).__name__}); the default is 0.999."
            )
        for name in ("per_channel_weights", "narrow_range_weights", "quantize_residual_adds",
                     "preserve_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r} "
                                  f"({type(value).__name__}).")
        freeze = self.freeze_activation_ranges_after
        if freeze is not None and (isinstance(freeze, bool) or not isinstance(freeze, int)
                                   or freeze < 0):
            raise ConfigError(
                "freeze_activation_ranges_after must be None or an integer >= 0, "
                f"got {freeze!r}."
            )

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "QuantizationConfig":
        return cls(**config)


_PRESETS = {
    "int8": QuantizationConfig(),
}


def resolve(config: Union[str, QuantizationConfig]) -> QuantizationConfig:
    """Turn ``"int8"`` (or a QuantizationConfig) into a QuantizationConfig."""
    if isinstance(config, QuantizationConfig):
        return config
    if isinstance(config, str) and config.lower() in _PRESETS:
        return _PRESETS[config.lower()]
    raise ConfigError(
        f"Unknown quantization config {config!r}. Valid strings: {sorted(_PRESETS)}; "
        "or pass tfopt.QuantizationConfig(...)."
    )

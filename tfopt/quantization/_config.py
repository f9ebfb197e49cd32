"""QuantizationConfig, and the one place where string shortcuts are resolved."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Union

from tfopt.errors import ConfigError
from tfopt.targets._cpu_int8 import PORTABLE_WEIGHT_MAX


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How :func:`tfopt.quantize` fake-quantizes a model.

    The defaults follow TensorRT's explicit-quantization rules, so the
    exported ONNX carries Q/DQ pairs that TensorRT builds INT8 kernels from:
    symmetric int8 everywhere (zero points 0), weights per output channel,
    activations per tensor. Weights stay on ``[-64, 64]`` so that the CPU
    export computes the same integers on every x86 CPU (see
    ``portable_weights``).

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
        portable_weights: Keep int8 weights on ``[-64, 64]`` (ONNX Runtime's
            ``reduce_range`` grid). x86 CPUs without VNNI (AVX2, AVX-512
            without VNNI) add two u8 x s8 products in a saturating int16; with
            these weights no pair can leave it, so the INT8 file computes the
            same on every CPU, and the export proves it. ``False`` uses
            ``[-127, 127]``: one more bit of weight precision, but the CPU
            INT8 file is then right only on CPUs with VNNI or AMX, and its
            manifest says so.
        quantize_embeddings: Store lookup tables (``Embedding`` layers,
            keras-hub's token, segment and position embeddings) as int8 with
            one scale per row, fake-quantized the same way in training. The
            exported file is about 4x smaller there (a BERT's token table is a
            fifth of its weights) and no slower; the engine dequantizes only
            the rows it looks up. ``False`` keeps tables in float.

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
    portable_weights: bool = True
    quantize_embeddings: bool = True

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
                     "preserve_sparsity", "portable_weights", "quantize_embeddings"):
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

    @property
    def weight_max_level(self) -> int:
        """The largest int8 weight magnitude QAT trains (64 when portable)."""
        level = 2 ** (self.weight_bits - 1) - 1
        return min(level, PORTABLE_WEIGHT_MAX) if self.portable_weights else level

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "QuantizationConfig":
        config = dict(config)
        # Saved before portable weights existed: those models trained on [-127, 127].
        config.setdefault("portable_weights", False)
        # ... and before int8 tables: their embeddings stayed float.
        config.setdefault("quantize_embeddings", False)
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

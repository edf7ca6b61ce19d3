"""``CacheFootprint``: the bytes a KIVI cache holds, by kind, and the dense bytes it replaces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheFootprint:
    """Bytes of a KIVI cache (summed over layers), and what a dense cache of the same tokens takes.

    ``total_bytes`` equals the summed storage of every tensor the cache holds: the state's bytes
    plus ``reserved_bytes``, the spare rows of the quantized-value buffers (under 1/16 of the
    quantized values + 16 tokens; they spare each decode step a copy of the value history).
    """

    codes_bytes: int = 0  # packed uint8 key and value codes
    scale_zero_bytes: int = 0  # per-group scales and zeros
    residual_bytes: int = 0  # full-precision keys and values not yet quantized
    mask_bytes: int = 0  # pad-token bookkeeping of the key residual (only in padded batches)
    reserved_bytes: int = 0  # spare rows of the quantized-value buffers (filled by the next decode steps)
    dense_bytes: int = 0  # the same tokens in a dense cache of the model's dtype
    fp16_bytes: int = 0  # the same tokens in a dense fp16 cache
    tokens: int = 0  # tokens held (per sequence, first layer)

    @property
    def total_bytes(self) -> int:
        return self.codes_bytes + self.scale_zero_bytes + self.residual_bytes + self.mask_bytes + self.reserved_bytes

    @property
    def compression_vs_fp16(self) -> float:
        """How many times smaller than an fp16 cache (inf for an empty cache is avoided: 1.0)."""
        return self.fp16_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def compression_vs_dense(self) -> float:
        return self.dense_bytes / self.total_bytes if self.total_bytes else 1.0

    def __add__(self, other: "CacheFootprint") -> "CacheFootprint":
        return CacheFootprint(
            codes_bytes=self.codes_bytes + other.codes_bytes,
            scale_zero_bytes=self.scale_zero_bytes + other.scale_zero_bytes,
            residual_bytes=self.residual_bytes + other.residual_bytes,
            mask_bytes=self.mask_bytes + other.mask_bytes,
            reserved_bytes=self.reserved_bytes + other.reserved_bytes,
            dense_bytes=self.dense_bytes + other.dense_bytes,
            fp16_bytes=self.fp16_bytes + other.fp16_bytes,
            tokens=max(self.tokens, other.tokens),
        )

"""``KIVIConfig``: the user-facing description of a KIVI cache (bits, grouping, residual, backend)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from kivi_ops.ops import BACKENDS
from kivi_ops.ops.layout import SUPPORTED_BITS


@dataclass(frozen=True)
class KIVIConfig:
    """How a KIVI cache quantizes keys and values (arXiv 2402.02750; defaults are the paper's KIVI-2).

    Args:
        k_bits: bits per key code (2, 4 or 8); keys are grouped per channel.
        v_bits: bits per value code (2, 4 or 8); values are grouped per token.
        group_size: G, elements per quantization group (a positive multiple of 8). Key groups span G
            tokens of one channel, value groups G channels of one token, so head_dim must be a
            multiple of G.
        residual_length: R, a positive multiple of G. Keys are quantized in blocks of R tokens, the
            newest R values stay in full precision.
        backend: which ``kivi_ops.ops`` implementation runs the kernels (``"auto"`` picks per device).

    Frozen, so one config can be shared by many caches without one of them changing the others'.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    backend: str = "auto"

    def __post_init__(self) -> None:
        if "torchao" in sys.modules:  # the user works with torchao: make its quantize_ accept this config
            from kivi_ops.quantize import register_torchao

            register_torchao()
        for name in ("k_bits", "v_bits"):
            bits = getattr(self, name)
            if not _is_int(bits) or bits not in SUPPORTED_BITS:
                raise ValueError(f"KIVIConfig.{name} must be one of {SUPPORTED_BITS}, got {bits!r}")
        g = self.group_size
        if not _is_int(g) or g <= 0 or g % 8 != 0:
            raise ValueError(f"KIVIConfig.group_size must be a positive multiple of 8 (e.g. 32), got {g!r}")
        r = self.residual_length
        if not _is_int(r) or r <= 0 or r % g != 0:
            raise ValueError(
                f"KIVIConfig.residual_length must be a positive multiple of group_size ({g}), got {r!r}: keys are "
                "quantized in whole blocks of residual_length tokens, each made of whole groups"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"KIVIConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def name(self) -> str:
        """Short label: ``KIVI-2`` when both bit widths agree, else ``KIVI-K4V2``."""
        if self.k_bits == self.v_bits:
            return f"KIVI-{self.k_bits}"
        return f"KIVI-K{self.k_bits}V{self.v_bits}"


def _is_int(x) -> bool:
    # bool is an int subclass; True as a bit width is a bug, not a 1.
    return isinstance(x, int) and not isinstance(x, bool)

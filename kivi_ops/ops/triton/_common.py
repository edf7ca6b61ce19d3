"""Small host-side helpers shared by the Triton launchers (no kernels here)."""

from __future__ import annotations

import os

import torch
import triton.language as tl

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pow2_group(group_size: int) -> int:
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two group_size (32, 64, 128), got {group_size}")
    return int(group_size)


def interpreting(t: torch.Tensor) -> bool:
    """True when the kernels run through Triton's interpreter (CPU tensors, or TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# float conversions that are exact under the interpreter too. Triton's interpreter truncates
# float32 -> bfloat16 instead of rounding to nearest even (GPUs round), so bfloat16 goes through
# explicit bit manipulation; float16 / float32 use the native casts.
# ----------------------------------------------------------------------------------------------

import triton  # noqa: E402


@triton.jit
def f32(x):
    """Any float tensor -> float32 (exact)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """float32 tensor -> ``DTYPE``, rounding to nearest even (NaN stays NaN)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = tl.where(x != x, 0x7FC00000, u)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def cast_round_up(x, DTYPE: tl.constexpr):
    """float32 ``x >= 0`` -> ``DTYPE``: round to nearest, then one step up where that fell below ``x``
    (``reference.round_up_cast``: a stored scale never undershoots, so the top code never clamps)."""
    y = cast(x, DTYPE)
    if DTYPE == tl.float32:
        return y
    else:
        bumped = (y.to(tl.int16, bitcast=True) + 1).to(DTYPE, bitcast=True)
        return tl.where(f32(y) < x, bumped, y)

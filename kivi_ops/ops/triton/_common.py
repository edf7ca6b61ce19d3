"""Helpers shared by the Triton launchers (host side) and kernels (float conversions)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode


def dot_mode(dtype: torch.dtype) -> int:
    """The ``_tiles.DOT_*`` operand mode for inputs of ``dtype``."""
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[dtype]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pow2_group(group_size: int) -> int:
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two group_size (32, 64, 128), got {group_size}")
    return int(group_size)


def interpreting(t: torch.Tensor) -> bool:
    """True when the kernels run through Triton's interpreter (CPU tensors, or TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def shapes_only(t: torch.Tensor, kernel) -> bool:
    """True when a launcher should only allocate its outputs and launch nothing.

    Compiled Triton kernels go through ``wrap_triton``, which traces them under fake tensors. The
    interpreter's kernels (``TRITON_INTERPRET=1``) cannot run on fake tensors and ``wrap_triton``
    cannot trace them: under FakeTensorMode (shape propagation, ``opcheck``'s fake test) only the
    output shapes matter, so nothing is launched; under functionalization (torch.compile's AOT
    dispatch) skipping would silently drop the computation, so that is an error.
    """
    if type(kernel).__name__ != "InterpretedFunction":
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(t, FunctionalTensor):
        raise RuntimeError(
            "kivi_ops Triton ops cannot be compiled under TRITON_INTERPRET=1: Inductor can only trace "
            "compiled (GPU) Triton kernels; call the op eagerly, or compile on a CUDA device"
        )
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def plain_eager(*tensors) -> bool:
    """True when every tensor argument is a plain ``torch.Tensor`` and nothing traces (no dispatch
    mode such as FakeTensorMode / FunctionalTensorMode / make_fx's proxy mode, not under Dynamo):
    then a kernel can be launched directly."""
    return (all(type(t) is torch.Tensor for t in tensors if isinstance(t, torch.Tensor))
            and _get_current_dispatch_mode() is None and not torch.compiler.is_compiling())


def launcher(kernel, grid, *tensors):
    """``kernel[grid]`` when ``plain_eager(*tensors)``; ``wrap_triton(kernel)[grid]`` otherwise, so
    tracing still records the launch.

    Why: outside a ``triton_op`` body, ``wrap_triton`` dispatches every launch through a
    higher-order op (torch's own docs: "~1ms"); measured 0.25-0.5 ms of host time per call on the
    H200 host, against 0.08 ms of GPU time for a [1, 32, 32768, 128] fp16 cache. Inside a
    ``triton_op`` body torch already launches directly; this gives the same path to the op bodies
    that eager callers reach without the op (``kivi_ops.ops.triton``'s wrappers, benchmarks)."""
    if plain_eager(*tensors):
        return kernel[grid]
    return wrap_triton(kernel)[grid]


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, H, n, C] itself when its rows (dims 2, 3) are contiguous, else a contiguous copy.

    Kernels that take each tensor's batch and head strides read a cache's views in place: the used
    rows of a buffer with spare rows (``kivi_ops.cache.row_buffer``) would otherwise be copied
    whole on every decode step."""
    rows_ok = (t.shape[3] <= 1 or t.stride(3) == 1) and (t.shape[2] <= 1 or t.stride(2) == t.shape[3])
    return t if rows_ok else t.contiguous()


def batch_head_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """(stride(0), stride(1)) of each tensor, flattened: the kernels' per-tensor (batch, head) steps."""
    return tuple(s for t in tensors for s in (t.stride(0), t.stride(1)))


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

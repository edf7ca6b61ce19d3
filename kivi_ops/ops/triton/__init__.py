"""Triton implementations of the kivi ops, each a ``torch.library.triton_op`` named ``kivi::triton_<op>``.

The op bodies launch their kernels through ``torch.library.wrap_triton``, so torch.compile (Inductor)
and AOTInductor trace into the kernels instead of treating the op as opaque. Eager calls on plain
tensors skip the op dispatcher and call the op's body directly (``_eager``): the dispatcher's
custom-op path (autograd wrapper, redispatch, ``torch._dynamo.disable``) costs ~17 us of the
~38 us of host time an eager call took on this project's CPU machine, for a kernel that runs
~75 us on an H200 at 32k tokens. CUDA tensors run the
compiled kernels; CPU tensors run through Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests exercise them on machines without a GPU.

Triton is imported only here: ``import kivi_ops`` works without it and never imports this package;
importing this package registers the ops when ``available()``. Under the interpreter, set
``TRITON_INTERPRET=1`` before importing it (``@triton.jit`` reads it when the kernels are defined).

Layout and numerics: ``kivi_ops.ops.layout``; ground truth: ``kivi_ops.ops.reference``.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

__all__ = [
    "available", "register", "quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values",
    "qmatmul_keys", "qmatmul_values", "decode_attention",
]

_AVAILABLE: Optional[bool] = None


def available() -> bool:
    """True when the triton package can be imported."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = importlib.util.find_spec("triton") is not None
            if _AVAILABLE:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
        except Exception:  # a broken install counts as absent
            _AVAILABLE = False
    return _AVAILABLE


_REGISTERED = False
_EAGER: dict = {}  # op name -> the op's body, for eager calls on plain tensors
_plain_eager = None  # _common.plain_eager, bound by register() (importing _common imports triton)


def register() -> None:
    """Import the kernel modules, registering the ``kivi::triton_*`` ops (idempotent)."""
    global _REGISTERED, _plain_eager
    if _REGISTERED:
        return
    if not available():
        raise ImportError("kivi_ops' Triton kernels need the triton package (pip install triton)")
    import importlib

    modules = {name: importlib.import_module(f"{__name__}.{name}") for name in ("quantize", "qmatmul", "decode_attention")}
    for module, names in (("quantize", ("quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values")),
                          ("qmatmul", ("qmatmul_keys", "qmatmul_values")), ("decode_attention", ("decode_attention",))):
        for name in names:
            _EAGER[name] = getattr(modules[module], "_" + name)
    _plain_eager = importlib.import_module(f"{__name__}._common").plain_eager
    # Importing the submodule ``decode_attention`` rebinds this package's attribute of that name to
    # the module; put the public function back.
    globals()["decode_attention"] = _decode_attention
    _REGISTERED = True


def _ops():
    if not _REGISTERED:
        register()
    return torch.ops.kivi


def _run(name: str, *args):
    """``kivi::triton_<name>`` on ``args``; its body directly when nothing traces (same result)."""
    ops = _ops()
    # a tensor that needs gradients goes through the op, which owns the autograd behaviour
    if _plain_eager(*args) and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _EAGER[name](*args)
    return getattr(ops, "triton_" + name)(*args)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int):
    """k [B, H, T, D] -> (codes [B, H, T*bits/8, D] uint8, scale, zero [B, H, T/G, D])."""
    return _run("quantize_keys", k, bits, group_size)


def quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """v [B, H, T, D] -> (codes [B, H, T, D*bits/8] uint8, scale, zero [B, H, T, D/G])."""
    return _run("quantize_values", v, bits, group_size)


def dequantize_keys(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Packed keys -> [B, H, T, D] in scale.dtype."""
    return _run("dequantize_keys", codes, scale, zero, bits, group_size)


def dequantize_values(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Packed values -> [B, H, T, D] in scale.dtype."""
    return _run("dequantize_values", codes, scale, zero, bits, group_size)


def qmatmul_keys(q, codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """q [B, Hq, M, D] @ dequant(K)^T -> scores [B, Hq, M, T] in q.dtype."""
    return _run("qmatmul_keys", q, codes, scale, zero, bits, group_size)


def qmatmul_values(p, codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """p [B, Hq, M, T] @ dequant(V) -> [B, Hq, M, D] in p.dtype."""
    return _run("qmatmul_values", p, codes, scale, zero, bits, group_size)


def _decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                     k_bits: int, v_bits: int, group_size: int, scale: float,
                     lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused attention of q [B, Hq, M, D] over [dequant(Kq) ‖ k_residual], [dequant(Vq) ‖ v_residual]."""
    return _run("decode_attention", q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                k_bits, v_bits, group_size, float(scale), lengths)


decode_attention = _decode_attention


# Register now, while this package is being imported: importing the submodule ``decode_attention``
# later (``import kivi_ops.ops.triton.decode_attention``) would otherwise rebind this package's
# ``decode_attention`` to the module.
if available():
    register()

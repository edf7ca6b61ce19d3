"""KIVI ops: quantize, dequantize, Q_MatMul and fused decode attention over packed caches.

Every function validates its inputs (a ``TypeError``/``ValueError`` naming the argument) and then
dispatches to one implementation, chosen by ``backend``:

- ``"auto"`` (default): the CUDA kernels for CUDA tensors (Triton where the extension was built
  without CUDA, and for traced or graph-captured decode attention over small caches, where
  Triton's kernel measured faster: ``AUTO_TRITON_DECODE_*``), the C++ kernels for CPU tensors;
- ``"cuda"`` / ``"cpu"``: the C++ ``kivi::<op>`` kernels of ``csrc/`` for that device;
- ``"triton"``: the ``kivi::triton_<op>`` kernels of ``kivi_ops/ops/triton`` (CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``);
- ``"reference"``: the pure-PyTorch ground truth of ``kivi_ops/ops/reference.py``.

The packed layout (shapes, dtypes, bit order, where scales and zeros live) and the exact
numerics are documented once, in ``kivi_ops.ops.layout``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from kivi_ops import _extension
from kivi_ops.ops import fake as _fake  # noqa: F401  (registers the fake kernels)
from kivi_ops.ops import layout, reference
from kivi_ops.ops.layout import codes_per_byte

__all__ = [
    "BACKENDS", "quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values",
    "qmatmul_keys", "qmatmul_values", "decode_attention", "resolve_backend", "codes_per_byte",
]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# backend="auto" for decode attention on CUDA: Triton's kernel is the faster one for small caches,
# under AUTO_TRITON_DECODE_BELOW_TOKENS tokens and AUTO_TRITON_DECODE_MAX_HEAD_TOKENS batch x KV
# heads x tokens; CUDA's beyond (H200, 2026-11-30, CUDA-graph replay, fp16 KIVI-2: Triton won by
# 1-6 us up to 32k head-tokens, e.g. 9.8 vs 10.3 us Llama-3-8B B1 1.5k, 14.5 vs 20.5 us Llama-3-8B
# B8 512; CUDA won beyond, e.g. 22.6 vs 30.5 us Llama-3-8B B8 1.5k, 60.6 vs 94.3 us Llama-2-7B B8
# 1.5k). Kernel time only: auto takes Triton there only for traced or CUDA-graph-captured calls.
# An eager call pays Triton's Python launchers, 180-295 us of host time against CUDA's 42-72 us,
# far more than the kernel saves: eager calls take CUDA (eager generate at 1k tokens 1.2-1.4x
# faster; scripts/ab_decode_backend_eager.py, benchmarks/results/2026-11-30-h200-eager-backend/).
AUTO_TRITON_DECODE_BELOW_TOKENS = 2048
AUTO_TRITON_DECODE_MAX_HEAD_TOKENS = 32768
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _triton_module():
    from kivi_ops.ops import triton as triton_ops

    if not triton_ops.available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    return triton_ops


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation ``backend`` names for tensors on ``device`` (``"auto"`` resolved)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if _extension.has_cuda_kernels() else "triton"
        return "reference" if _extension.EXTENSION_ERROR else "cpu"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
        _extension.require_extension()
        if backend == "cuda" and not _extension.has_cuda_kernels():
            raise ValueError("backend='cuda': kivi_ops was built without its CUDA kernels; rebuild on a machine "
                             "with nvcc and a CUDA build of torch, or use backend='triton'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    return backend


def cpp_kernels_for(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` on ``device`` runs the C++ ``kivi::<op>`` kernels of ``csrc/`` and they are
    built (``auto`` or the device's own name; never raises, unlike ``resolve_backend``)."""
    if backend not in ("auto", device.type):
        return False
    if device.type == "cuda":
        return _extension.has_cuda_kernels()
    return device.type == "cpu" and _extension.EXTENSION_ERROR is None


def _same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all inputs must share one device")
    return first


def _call(name: str, backend: str, device: torch.device, *args):
    impl = resolve_backend(backend, device)
    if impl == "reference":
        return getattr(reference, name)(*args)
    if impl == "triton":
        return getattr(_triton_module(), name)(*args)
    return getattr(torch.ops.kivi, name)(*args)


def quantize_keys(k: torch.Tensor, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> Packed:
    """Quantize keys per channel (groups of ``group_size`` consecutive tokens of one channel).

    k [B, H, T, D] (T a multiple of group_size) -> (codes uint8 [B, H, T*bits/8, D],
    scale [B, H, T/G, D], zero [B, H, T/G, D]), scale/zero in k.dtype.
    """
    layout.check_keys_input(k, bits, group_size)
    return _call("quantize_keys", backend, k.device, k, bits, group_size)


def quantize_values(v: torch.Tensor, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> Packed:
    """Quantize values per token (groups of ``group_size`` consecutive channels of one token).

    v [B, H, T, D] (D a multiple of group_size) -> (codes uint8 [B, H, T, D*bits/8],
    scale [B, H, T, D/G], zero [B, H, T, D/G]).
    """
    layout.check_values_input(v, bits, group_size)
    return _call("quantize_values", backend, v.device, v, bits, group_size)


def dequantize_keys(codes, scale, zero, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> torch.Tensor:
    """Packed keys -> [B, H, T, D] in scale.dtype."""
    layout.check_packed_keys(codes, scale, zero, bits, group_size)
    return _call("dequantize_keys", backend, codes.device, codes, scale, zero, bits, group_size)


def dequantize_values(codes, scale, zero, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> torch.Tensor:
    """Packed values -> [B, H, T, D] in scale.dtype."""
    layout.check_packed_values(codes, scale, zero, bits, group_size)
    return _call("dequantize_values", backend, codes.device, codes, scale, zero, bits, group_size)


def _check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def qmatmul_keys(q, codes, scale, zero, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> torch.Tensor:
    """Scores ``q @ dequant(K)^T`` straight from packed keys, with grouped-query mapping.

    q [B, Hq, M, D], keys packed from [B, Hkv, T, D] (Hq a multiple of Hkv; query head h reads
    KV head h // (Hq // Hkv)) -> [B, Hq, M, T] in q.dtype, accumulated in float32.
    """
    kv_shape = layout.check_packed_keys(codes, scale, zero, bits, group_size)
    layout.check_query("q", q, kv_shape, kv_shape[3], "head_dim")
    _check_same_dtype("q", q, scale=scale)
    device = _same_device(q=q, codes=codes, scale=scale, zero=zero)
    return _call("qmatmul_keys", backend, device, q, codes, scale, zero, bits, group_size)


def qmatmul_values(p, codes, scale, zero, bits: int = 2, group_size: int = 32, *, backend: str = "auto") -> torch.Tensor:
    """``p @ dequant(V)`` straight from packed values: p [B, Hq, M, T] -> [B, Hq, M, D] in p.dtype."""
    kv_shape = layout.check_packed_values(codes, scale, zero, bits, group_size)
    layout.check_query("p", p, kv_shape, kv_shape[2], "the token count")
    _check_same_dtype("p", p, scale=scale)
    device = _same_device(p=p, codes=codes, scale=scale, zero=zero)
    return _call("qmatmul_values", backend, device, p, codes, scale, zero, bits, group_size)


def decode_attention(
    q: torch.Tensor,
    k_quant: Packed,
    v_quant: Packed,
    k_residual: torch.Tensor,
    v_residual: torch.Tensor,
    *,
    k_bits: int = 2,
    v_bits: int = 2,
    group_size: int = 32,
    scale: Optional[float] = None,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the newest query tokens over a KIVI cache, fused (scores never hit memory).

    q [B, Hq, M, D] (M = 1 for decoding, up to 8 for speculative decoding); ``k_quant`` and
    ``v_quant`` the ``(codes, scale, zero)`` triples of ``quantize_keys``/``quantize_values``
    holding the oldest Tk keys and Tv values; ``k_residual`` [B, Hkv, T-Tk, D] and
    ``v_residual`` [B, Hkv, T-Tv, D] the newest tokens in full precision. The keys and values
    may split at different tokens (KIVI keeps up to R values but only T mod R keys in full
    precision); both must hold the same T tokens. ``scale`` defaults to 1/sqrt(D);
    ``lengths`` (int [B], optional, each in [0, T]) masks positions >= lengths[b] for a ragged
    batch; a sequence of length 0 has nothing to attend to and gets NaN, as SDPA gives an
    all-masked row. Eager calls check the range (one host sync for CUDA lengths); traced and
    CUDA-graph-captured calls cannot sync, and there the kernels clamp lengths to [0, T].
    Every query token attends to every valid token (the queries are the newest tokens).
    Returns [B, Hq, M, D] in q.dtype.
    """
    k_shape = layout.check_packed_keys(*k_quant, k_bits, group_size)
    v_shape = layout.check_packed_values(*v_quant, v_bits, group_size)
    B, Hkv, Tk, D = k_shape
    layout.check_query("q", q, k_shape, D, "head_dim")
    for name, res in (("k_residual", k_residual), ("v_residual", v_residual)):
        layout.check_float_4d(name, res)
        if res.shape[0] != B or res.shape[1] != Hkv or res.shape[3] != D:
            raise ValueError(f"{name} must be [{B}, {Hkv}, tokens, {D}], got {tuple(res.shape)}")
    if v_shape[:2] != (B, Hkv) or v_shape[3] != D:
        raise ValueError(f"packed values hold [B, Hkv, T, D] = {v_shape}; keys hold {k_shape}: batch, heads and "
                         "head_dim must match")
    T = Tk + k_residual.shape[2]
    if v_shape[2] + v_residual.shape[2] != T:
        raise ValueError(f"keys hold {T} tokens ({Tk} quantized + {k_residual.shape[2]} residual) but values hold "
                         f"{v_shape[2] + v_residual.shape[2]} ({v_shape[2]} + {v_residual.shape[2]})")
    _check_same_dtype("q", q, k_scale=k_quant[1], v_scale=v_quant[1], k_residual=k_residual, v_residual=v_residual)
    if lengths is not None:
        if lengths.dtype not in (torch.int32, torch.int64) or tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be an int32/int64 tensor of shape [{B}], got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
    device = _same_device(q=q, k_codes=k_quant[0], k_scale=k_quant[1], k_zero=k_quant[2], v_codes=v_quant[0],
                          v_scale=v_quant[1], v_zero=v_quant[2], k_residual=k_residual, v_residual=v_residual,
                          lengths=lengths)
    if lengths is not None and lengths.numel() and not _kernel_time_only():
        lo, hi = (int(x) for x in torch.aminmax(lengths))
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must be in [0, {T}] (the tokens the cache holds), got values from {lo} to {hi}")
    scale = _softmax_scale(scale, D)
    if backend == "auto" and device.type == "cuda" and _extension.has_cuda_kernels() and _small_cache(B, Hkv, T) and (
            _kernel_time_only()) and _triton_available():
        backend = "triton"  # the fastest kernel for small caches (see AUTO_TRITON_DECODE_BELOW_TOKENS)
    return _call("decode_attention", backend, device, q, *k_quant, *v_quant, k_residual, v_residual,
                 k_bits, v_bits, group_size, scale, lengths)


def decode_attention_of_cache(q: torch.Tensor, k_quant: Packed, v_quant: Packed, k_residual: torch.Tensor,
                              v_residual: torch.Tensor, *, k_bits: int, v_bits: int, group_size: int,
                              scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``decode_attention`` for a cache whose packed tensors the caller built and keeps consistent
    (``KIVIState.attend``): where the C++ kernels run, their own checks (which name every bad
    argument, q's included) replace this module's Python checks, which cost ~20 us of host time on
    every layer of every eager decode step. Other backends, and traced or graph-captured calls
    (``auto`` may take Triton there), go through ``decode_attention`` unchanged. Same arguments and
    result as ``decode_attention`` (no ``lengths``)."""
    if not _kernel_time_only() and cpp_kernels_for(backend, q.device):
        scale = _softmax_scale(scale, q.shape[-1])
        return torch.ops.kivi.decode_attention(q, *k_quant, *v_quant, k_residual, v_residual, k_bits, v_bits,
                                               group_size, scale, None)
    return decode_attention(q, k_quant, v_quant, k_residual, v_residual, k_bits=k_bits, v_bits=v_bits,
                            group_size=group_size, scale=scale, backend=backend)


def _softmax_scale(scale: Optional[float], head_dim: int) -> float:
    """The softmax scale as a float: 1/sqrt(head_dim) by default; NaN or infinite is refused (every
    output would be NaN)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {value}")
    return value


def _small_cache(batch: int, kv_heads: int, tokens: int) -> bool:
    return tokens < AUTO_TRITON_DECODE_BELOW_TOKENS and batch * kv_heads * tokens <= AUTO_TRITON_DECODE_MAX_HEAD_TOKENS


def _kernel_time_only() -> bool:
    """Whether the call's host time is not paid per call: traced (torch.compile, export: the graph
    launches it) or captured into a CUDA graph. An eager call pays Triton's Python launcher, more
    than the kernel time it saves (see AUTO_TRITON_DECODE_BELOW_TOKENS)."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def _triton_available() -> bool:
    from kivi_ops.ops import triton as triton_ops

    return triton_ops.available()

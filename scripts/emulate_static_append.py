"""A Python mirror of csrc/cuda/static_append.cu's index math, checked against the CPU composite.

It mirrors the key window, the code rows, the value rows and the ring slots. The numerics are the
reference's, since the kernel's are bit-equal to it. Tokens are appended one step at a time, the
mirror on one store and kivi::static_kv_append_'s composite on another, and the store bytes must be
equal after every step. No GPU needed.

If the CUDA test test_cuda_fused_append_writes_the_composites_bytes fails while this passes, the
bug is in the CUDA code, not in the indexing.

    python scripts/emulate_static_append.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kivi_ops.cache.static import StaticKIVICache  # noqa: E402
from kivi_ops.config import KIVIConfig  # noqa: E402
from kivi_ops.ops import reference  # noqa: E402


def align16(n: int) -> int:
    return (n + 15) // 16 * 16


def carve(store: torch.Tensor, D: int, bits: int, G: int, R: int, kind: str) -> dict:
    """The regions of a store, as csrc/static_cache.cpp's key_state / value_state carve them."""
    B, H, L, _ = store.shape
    raw = store.view(-1).view(torch.uint8)
    off = 0

    def take(dtype, shape):
        nonlocal off
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        t = raw[off:off + nbytes].view(dtype).view(shape)
        off += align16(nbytes)
        return t

    if kind == "keys":
        NG = (L + G - 1) // G + 1
        return dict(ring=take(store.dtype, (B, H, R, D)), scale=take(store.dtype, (B, H, NG, D)),
                    zero=take(store.dtype, (B, H, NG, D)), codes=take(torch.uint8, (B, H, NG * G * bits // 8, D)))
    return dict(ring=take(store.dtype, (B, H, R, D)), scale=take(store.dtype, (B, H, L, D // G)),
                zero=take(store.dtype, (B, H, L, D // G)), codes=take(torch.uint8, (B, H, L, D * bits // 8)))


def append_like_the_kernel(keys: dict, values: dict, k, v, n: int, k_bits: int, v_bits: int, G: int, R: int):
    """static_append_one_kernel's writes for the token at position n (k, v [B, H, 1, D])."""
    B, H, _, D = k.shape
    PK = 8 // k_bits
    g0, newest, slot = n // G, n % G, n % R
    for b in range(B):
        for h in range(H):
            window = torch.zeros(G, D, dtype=k.dtype)  # older tokens from the ring, the new one, zeros
            for j in range(newest):
                window[j] = keys["ring"][b, h, (g0 * G + j) % R]
            window[newest] = k[b, h, 0]
            codes, scale, zero = reference.quantize_keys(window.view(1, 1, G, D), k_bits, G)
            keys["codes"][b, h, g0 * (G // PK):(g0 + 1) * (G // PK)] = codes[0, 0]
            keys["scale"][b, h, g0] = scale[0, 0, 0]
            keys["zero"][b, h, g0] = zero[0, 0, 0]
            keys["ring"][b, h, slot] = k[b, h, 0]
            codes, scale, zero = reference.quantize_values(v[b, h, 0].view(1, 1, 1, D), v_bits, G)
            values["codes"][b, h, n] = codes[0, 0, 0]
            values["scale"][b, h, n] = scale[0, 0, 0]
            values["zero"][b, h, n] = zero[0, 0, 0]
            values["ring"][b, h, slot] = v[b, h, 0]


def check(dtype, k_bits: int, v_bits: int, D: int, G: int, R: int, L: int = 512, prefill: int = 37) -> None:
    config = KIVIConfig(k_bits, v_bits, G, R)
    mirror, composite = (StaticKIVICache(1, 2, 3, L, D, config, dtype=dtype) for _ in range(2))
    k, v = torch.randn(2, 3, prefill, D, dtype=dtype), torch.randn(2, 3, prefill, D, dtype=dtype)
    for cache in (mirror, composite):
        cache.append_(0, k, v, cache.positions(prefill))
        cache.advance_(prefill)
    k_store, v_store = mirror.stores(0)
    keys, values = carve(k_store, D, k_bits, G, R, "keys"), carve(v_store, D, v_bits, G, R, "values")
    for n in range(prefill, L):
        k, v = torch.randn(2, 3, 1, D, dtype=dtype), torch.randn(2, 3, 1, D, dtype=dtype)
        k[..., 5] *= 50  # an outlier key channel
        append_like_the_kernel(keys, values, k, v, n, k_bits, v_bits, G, R)
        composite.append_(0, k, v, composite.positions(1))
        mirror.advance_(1)
        composite.advance_(1)
        for got, want in zip(mirror.stores(0), composite.stores(0)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (dtype, k_bits, v_bits, D, G, R, n)
    print(f"{dtype} K{k_bits}V{v_bits} D={D} G={G} R={R}: equal bytes at every step to position {L - 1}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for bits, D, G, R in [((2, 2), 128, 32, 128), ((4, 2), 64, 64, 64), ((8, 8), 128, 32, 128),
                              ((2, 4), 64, 64, 64)]:
            check(dtype, *bits, D, G, R)

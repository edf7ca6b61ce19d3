"""Runs every CUDA kivi op once on small, odd shapes: the program compute-sanitizer checks
(memcheck for out-of-bounds access, racecheck for shared-memory races). See gpu_check.sh."""

import os

import torch

from kivi_ops import ops

KNOBS = ("KIVI_ATTN_SPLITS", "KIVI_ATTN_RING", "KIVI_ATTN_TAIL_CHUNK", "KIVI_ATTN_TAIL_APART", "KIVI_ATTN_LIGHT")


def set_knobs(knobs: dict) -> None:
    """The split plan's knobs (decode_attention.cu) to exactly ``knobs``; {}: the library's own choice."""
    for knob in KNOBS:
        os.environ.pop(knob, None)
    os.environ.update(knobs)


torch.manual_seed(0)
ONE_SPLIT = {"KIVI_ATTN_SPLITS": "1", "KIVI_ATTN_RING": "1"}
for dtype, bits, (B, Hkv, n_rep, M, Tk, Tv, T, D, G), knobs in [
    (torch.float16, 2, (1, 2, 4, 1, 256, 160, 300, 128, 32), {}),
    (torch.bfloat16, 4, (2, 1, 3, 3, 96, 33, 130, 64, 32), {}),
    (torch.float32, 8, (1, 3, 1, 8, 128, 0, 128, 128, 64), {}),
    (torch.float16, 4, (1, 2, 4, 2, 512, 384, 600, 64, 32), {}),  # fast path, two tail blocks, GQA, M = 2
    (torch.float16, 2, (1, 4, 1, 1, 512, 400, 530, 128, 32), {}),  # fast path, MHA: the paired kernels (one row) and tail
    (torch.bfloat16, 4, (1, 2, 1, 1, 1280, 1180, 1300, 128, 32), ONE_SPLIT),  # paired kernel (one row), one-stage ring
    # 4 bits, head_dim 128: the one-stage split-phase ring, with one split per head, so each warp
    # streams several tiles through it
    (torch.float16, 4, (1, 2, 4, 1, 1280, 1180, 1300, 128, 32), ONE_SPLIT),
    # light splits: 4 bulk splits of 18 tiles, the 3 that run a 64-token tail chunk 2 tiles per warp lighter
    (torch.float16, 2, (2, 2, 4, 1, 1280, 1180, 1300, 128, 32),
     {"KIVI_ATTN_SPLITS": "4", "KIVI_ATTN_TAIL_CHUNK": "64", "KIVI_ATTN_TAIL_APART": "0", "KIVI_ATTN_LIGHT": "2"}),
    # a split of 80 tiles (160 key groups): the q.z prologue's later rounds, prefetched into L2
    (torch.bfloat16, 4, (1, 1, 4, 1, 5120, 5000, 5130, 128, 32), ONE_SPLIT),
    # 2-bit values, 4 query rows, head_dim 64, G = 64: the narrow kernel (ldmatrix value codes, one segment)
    (torch.bfloat16, 2, (1, 2, 4, 1, 768, 640, 780, 64, 64), {}),
    # 160 splits per row: the split combine's loads in several batches per thread
    (torch.float16, 2, (1, 1, 4, 1, 10240, 10240, 10300, 128, 32), {"KIVI_ATTN_SPLITS": "160"}),
]:
    set_knobs(knobs)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
    kq = ops.quantize_keys(k[:, :, :Tk].contiguous(), bits, G, backend="cuda")
    vq = ops.quantize_values(v[:, :, :Tv].contiguous(), bits, G, backend="cuda")
    ops.dequantize_keys(*kq, bits, G, backend="cuda")
    ops.dequantize_values(*vq, bits, G, backend="cuda")
    q = torch.randn(B, Hkv * n_rep, M, D, device="cuda", dtype=dtype)
    ops.qmatmul_keys(q, *kq, bits, G, backend="cuda")
    if Tv:
        ops.qmatmul_values(torch.randn(B, Hkv * n_rep, M, Tv, device="cuda", dtype=dtype), *vq, bits, G, backend="cuda")
    lengths = torch.full((B,), T - 3, dtype=torch.int32, device="cuda")
    ops.decode_attention(q, kq, vq, k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous(), k_bits=bits, v_bits=bits,
                         group_size=G, lengths=lengths, backend="cuda")
set_knobs({})

# value scales/zeros as views that start off a 16-byte boundary and end where their storage ends: the
# decode loop copies their runs in whole 16-byte chunks, so the op hands such a view's last whole tile
# to its tail (vsz_reads_in_storage, kv_tile.cuh). memcheck sees a read past a storage only with
# PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1; gpu_check.sh runs this script
# that way too).
for dtype, (kb, vb), D, knobs in [(torch.float16, (2, 2), 128, {}), (torch.bfloat16, (2, 4), 128, ONE_SPLIT),
                                  (torch.float16, (4, 4), 64, {}), (torch.float16, (4, 2), 128, ONE_SPLIT)]:
    set_knobs(knobs)
    T, G = 1280, 32  # 20 whole tiles, no residual
    k = torch.randn(1, 1, T, D, device="cuda", dtype=dtype)
    v = torch.randn(1, 1, T, D, device="cuda", dtype=dtype)
    kq = ops.quantize_keys(k, kb, G, backend="cuda")
    codes, scale, zero = ops.quantize_values(v, vb, G, backend="cuda")
    ends = []
    for x in (scale, zero):  # one element into a storage of exactly numel + 1 elements
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
        buf[1:] = x.flatten()
        ends.append(buf[1:].view(x.shape))
    q = torch.randn(1, 4, 1, D, device="cuda", dtype=dtype)
    ops.decode_attention(q, kq, (codes, *ends), k[:, :, :0], v[:, :, :0], k_bits=kb, v_bits=vb, group_size=G,
                         backend="cuda")
set_knobs({})

# the static cache's fused decode step (kivi::_static_decode_attention): stores filled to the last
# position (ring wrap, full capacity), with and without a key mask
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kivi_ops.cache.static import StaticKIVICache  # noqa: E402
from kivi_ops.config import KIVIConfig  # noqa: E402

for dtype, bits, D, L in [(torch.float16, 2, 128, 264), (torch.bfloat16, 4, 64, 200)]:
    cache = StaticKIVICache(1, 2, 2, L, D, KIVIConfig(bits, bits, 32, 64), dtype=dtype, device="cuda")
    n = L - 70
    # the prefill runs SDPA; its math backend keeps cuDNN's flash kernel out of the report (racecheck
    # flags that kernel's own shared-memory use: 2 hazards on the H200, 5bac30d)
    with sdpa_kernel(SDPBackend.MATH):
        cache.attend(0, *(torch.randn(2, h, n, D, device="cuda", dtype=dtype) for h in (6, 2, 2)), cache.positions(n))
    cache.advance_(n)
    mask = torch.ones(2, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[0, ..., :5] = False
    for step in range(70):
        q, k, v = (torch.randn(2, h, 1, D, device="cuda", dtype=dtype) for h in (6, 2, 2))
        cache.attend(0, q, k, v, cache.positions(1), attn_mask=mask if step % 2 else None)
        cache.advance_(1)

# the dynamic cache's fused decode step (kivi::_dynamic_append_one_): odd value head_dim, strided
# new tokens, a 4-bit and a 2-bit state, past a buffer growth
from kivi_ops.cache.state import KIVIState  # noqa: E402

for dtype, bits, D in [(torch.float16, 2, 96), (torch.bfloat16, 4, 64)]:
    state = KIVIState(KIVIConfig(bits, bits, 32, 64))
    k, v = (torch.randn(2, 90, 3, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
    state.append(k[:, :, :70], v[:, :, :70])
    for i in range(70, 90):
        state.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
torch.cuda.synchronize()
print("sanitize_ops: all CUDA ops ran")

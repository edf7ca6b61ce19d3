"""Runs every CUDA kivi op once on small, odd shapes: the program compute-sanitizer checks
(memcheck for out-of-bounds access, racecheck for shared-memory races). See gpu_check.sh."""

import torch

from kivi_ops import ops

torch.manual_seed(0)
for dtype, bits, (B, Hkv, n_rep, M, Tk, Tv, T, D, G) in [
    (torch.float16, 2, (1, 2, 4, 1, 256, 160, 300, 128, 32)),
    (torch.bfloat16, 4, (2, 1, 3, 3, 96, 33, 130, 64, 32)),
    (torch.float32, 8, (1, 3, 1, 8, 128, 0, 128, 128, 64)),
    (torch.float16, 4, (1, 2, 4, 2, 512, 384, 600, 64, 32)),  # fast path, two tail blocks, GQA, M = 2
]:
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
torch.cuda.synchronize()
print("sanitize_ops: all CUDA ops ran")

"""Driver for Nsight Compute: one warm-up and one profiled call of the fused CUDA decode kernel, or
of a Q_MatMul kernel.

    ncu -k regex:attn_fused --launch-skip 1 --launch-count 1 ... python3 scripts/ncu_decode.py B Hkv T BITS [OP]

B: batch, Hkv: KV heads (32 query heads of 128 channels; 32 = Llama-2-7B MHA, 8 = Llama-3-8B GQA),
T: context (the KIVI split of benchmarks/bench_decode_attention.py: 64 fp16 keys, 128 fp16 values),
BITS: key and value bits. OP: "decode" (default), "qk" (kivi::qmatmul_keys over the packed keys;
ncu -k regex:qk_fast) or "pv" (kivi::qmatmul_values over the packed values; -k regex:pv_fast).
"""
import sys

import torch

from benchmarks.bench_decode_attention import G, make_inputs
from kivi_ops import ops

B, Hkv, T, bits = (int(a) for a in sys.argv[1:5])
op = sys.argv[5] if len(sys.argv) > 5 else "decode"
q, _, _, k_q, v_q, k_r, v_r = make_inputs(B, 32, Hkv, 128, T, bits, bits)
p = torch.softmax(torch.randn(B, 32, 1, v_q[0].shape[2], device="cuda"), -1).to(q.dtype)
calls = {
    "decode": lambda: ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=bits, v_bits=bits, group_size=G,
                                           backend="cuda"),
    "qk": lambda: ops.qmatmul_keys(q, *k_q, bits, G, backend="cuda"),
    "pv": lambda: ops.qmatmul_values(p, *v_q, bits, G, backend="cuda"),
}
for _ in range(2):  # launch 0 warms up, launch 1 is profiled
    calls[op]()
torch.cuda.synchronize()

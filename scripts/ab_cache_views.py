"""A/B: decode attention over cache views read in place vs copied first (CPU, or CUDA/Triton on a GPU).

The dynamic KIVI cache holds its quantized values as views of buffers with spare rows
(kivi_ops/cache/row_buffer.py). Until 2026-11-30 the CPU and Triton kernels called
``.contiguous()`` on them, a copy of the whole value history per call. This times the kernel on
such views (now read in place) against the same call on ``.contiguous()`` copies made first (what
the kernel did before), in one process, fastest of 60 calls each (wall time of an eager call, the
GPU synchronized after each): SmolLM2-135M's shape (3 KV heads x 64, float32, the demo's) and
Llama-3-8B's (8 x 128, bfloat16), batch 1, KIVI-2 split as in decoding (R = 128).

    PYTHONPATH=. python scripts/ab_cache_views.py [--device cuda --backend triton]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import sync
from kivi_ops import ops
from kivi_ops.cache import row_buffer

SHAPES = {"smollm2-135m f32": (3, 3, 64, torch.float32), "llama3-8b bf16": (8, 4, 128, torch.bfloat16)}


def fastest_ms(fn, device: torch.device, calls: int = 60) -> float:
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="decode_attention's backend (cpu, cuda, triton, auto)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1536, 8192, 32768])
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    print("device", dev, "backend", args.backend, "threads", torch.get_num_threads())
    for name, (hkv, n_rep, d, dtype) in SHAPES.items():
        if dev.type == "cuda" and dtype == torch.float32:
            dtype = torch.float16  # the GPU kernels' dtype
        for tokens in args.tokens:
            k, v = (torch.randn(1, hkv, tokens, d, device=dev).to(dtype) for _ in range(2))
            tk, tv = tokens // 128 * 128, tokens - 128
            k_q = ops.quantize_keys(k[:, :, :tk].contiguous(), 2, 32)
            v_q = ops.quantize_values(v[:, :, :tv].contiguous(), 2, 32)
            k_r, v_r = k[:, :, tk:].contiguous(), v[:, :, tv:].contiguous()
            # the values as the dynamic cache holds them: views of buffers with spare rows
            v_views, _ = row_buffer.append_rows(tuple(x[:, :, :0] for x in v_q), None, v_q)
            q = torch.randn(1, hkv * n_rep, 1, d, device=dev).to(dtype)
            kw = dict(backend=args.backend)
            in_place = fastest_ms(lambda: ops.decode_attention(q, k_q, v_views, k_r, v_r, **kw), dev)
            copied = fastest_ms(lambda: ops.decode_attention(q, k_q, tuple(x.contiguous() for x in v_views), k_r, v_r,
                                                             **kw), dev)
            print(f"{name.split()[0]} {dtype} T={tokens}: in place {in_place:.3f} ms, copied {copied:.3f} ms, "
                  f"copy share {(copied - in_place) / copied * 100:.0f} %")


if __name__ == "__main__":
    main()

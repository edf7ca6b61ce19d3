"""A/B on the CPU: decode attention over cache views read in place vs copied first.

The dynamic KIVI cache holds its quantized values as views of buffers with spare rows
(kivi_ops/cache/row_buffer.py). Until 2026-11-30 the CPU kernels called ``.contiguous()`` on them,
a copy of the whole value history per call. This times the kernel on such views (now read in place)
against the same call on ``.contiguous()`` copies made first (what the kernel did before), in one
process, fastest of 60 calls each: SmolLM2-135M's shape (3 KV heads x 64, float32, the demo's) and
Llama-3-8B's (8 x 128, bfloat16), batch 1, KIVI-2 split as in decoding (R = 128).

    PYTHONPATH=. python scripts/ab_cpu_cache_views.py
"""

from __future__ import annotations

import time

import torch

from kivi_ops import ops
from tests.conftest import view_with_spare_rows

SHAPES = {"smollm2-135m f32": (3, 3, 64, torch.float32), "llama3-8b bf16": (8, 4, 128, torch.bfloat16)}


def fastest_ms(fn, calls: int = 60) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    torch.manual_seed(0)
    print("threads", torch.get_num_threads())
    for name, (hkv, n_rep, d, dtype) in SHAPES.items():
        for tokens in (1536, 8192, 32768):
            k, v = (torch.randn(1, hkv, tokens, d).to(dtype) for _ in range(2))
            tk, tv = tokens // 128 * 128, tokens - 128
            k_q = ops.quantize_keys(k[:, :, :tk].contiguous(), 2, 32)
            v_q = ops.quantize_values(v[:, :, :tv].contiguous(), 2, 32)
            k_r, v_r = k[:, :, tk:].contiguous(), v[:, :, tv:].contiguous()
            v_views = tuple(view_with_spare_rows(x, spare=max(16, tv // 16)) for x in v_q)  # row_buffer's spare
            q = torch.randn(1, hkv * n_rep, 1, d).to(dtype)
            in_place = fastest_ms(lambda: ops.decode_attention(q, k_q, v_views, k_r, v_r))
            copied = fastest_ms(lambda: ops.decode_attention(q, k_q, tuple(x.contiguous() for x in v_views), k_r, v_r))
            print(f"{name} T={tokens}: in place {in_place:.3f} ms, copied {copied:.3f} ms, "
                  f"copy share {(copied - in_place) / copied * 100:.0f} %")


if __name__ == "__main__":
    main()

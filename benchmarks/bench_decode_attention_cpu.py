"""Decode attention on the CPU: the KIVI CPU kernel against PyTorch's SDPA in the same dtype, one run.

Shapes: SmolLM2-135M (9 query / 3 KV heads x 64, the demo's model) and Llama-3-8B (32 / 8 x 128);
batch 1; context 640 (the demo's), 4k and 16k; float32 and bfloat16; KIVI-2 with R = 128 split as in
decoding (keys T - 64 quantized, values T - 128). Each row: median time over repeated calls, speedup
over SDPA, and the threads used (torch.get_num_threads()).

    python benchmarks/bench_decode_attention_cpu.py --out benchmarks/results/<dir>
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import run_header
from kivi_ops import ops

SHAPES = {"smollm2-135m (GQA 9/3x64)": (9, 3, 64), "llama3-8b (GQA 32/8x128)": (32, 8, 128)}
G, R = 32, 128


def median_us(fn, min_s: float = 0.3) -> float:
    """Median wall time of ``fn`` in us, after warm-up, over at least ``min_s`` seconds and 10 calls."""
    for _ in range(3):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < 10 or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def measure(name, Hq, Hkv, D, T, dtype) -> dict:
    torch.manual_seed(0)
    k = torch.randn(1, Hkv, T, D, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(1, Hq, 1, D, dtype=dtype)
    Tk, Tv = (T - R // 2) // G * G, T - R
    k_q = ops.quantize_keys(k[:, :, :Tk].contiguous(), 2, G)
    v_q = ops.quantize_values(v[:, :, :Tv].contiguous(), 2, G)
    k_r, v_r = k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()
    kivi = median_us(lambda: ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=2, v_bits=2, group_size=G, backend="cpu"))
    sdpa = median_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv))
    row = dict(shape=name, T=T, dtype=str(dtype).replace("torch.", ""), kivi_us=kivi, sdpa_us=sdpa, speedup=sdpa / kivi)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu-decode")
    args = parser.parse_args()
    rows = [measure(name, *shape, T, dtype) for dtype in (torch.float32, torch.bfloat16)
            for name, shape in SHAPES.items() for T in (640, 4096, 16384)]
    os.makedirs(args.out, exist_ok=True)
    lines = ["# Decode attention on the CPU: KIVI-2 CPU kernel vs PyTorch SDPA (same dtype)\n", run_header(),
             f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {torch.get_num_threads()}",
             "- batch 1, one new token; median wall time of repeated calls\n",
             "| shape | T | dtype | KIVI us | SDPA us | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['T']} | {r['dtype']} | {r['kivi_us']:.0f} | {r['sdpa_us']:.0f} | {r['speedup']:.2f}x |"
              for r in rows]
    with open(os.path.join(args.out, "decode_attention_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

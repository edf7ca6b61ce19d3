"""Decode-step append of the dynamic KIVI cache (KIVIState) vs fp16 DynamicCache, on the GPU.

One decode step appends one token per layer. The rows, all from the same run:

- ``fp16 DynamicCache``: transformers' ``DynamicLayer.update`` (``torch.cat`` of keys and values);
- ``KIVI (exact-size values)``: ``KIVIState.append`` as it was before the spare-row buffers: the
  quantized values re-allocated with ``torch.cat`` at each step (``row_buffer.append_rows`` swapped
  for that cat here, nothing else changed);
- ``KIVI``: ``KIVIState.append`` with the spare-row value buffers (``kivi_ops/cache/row_buffer.py``).

Per row, averaged over ``--steps`` consecutive decode steps from ``T`` tokens: GPU kernel time per
step (torch.profiler, summed over the step's kernels: the bytes the step moves) and wall time per
step (host included: eager PyTorch). Llama-3-8B's KV heads (8 x 128), fp16.

    python benchmarks/bench_cache_append.py --out benchmarks/results/<dir>
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import run_header, sync
from kivi_ops.cache import row_buffer
from kivi_ops.cache.state import KIVIState
from kivi_ops.config import KIVIConfig

HKV, D = 8, 128


def fp16_cache(k, v):
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.update(k, v)
    return lambda kn, vn: layer.update(kn, vn)


def kivi_state(k, v, bits):
    s = KIVIState(KIVIConfig(k_bits=bits, v_bits=bits, backend="cuda" if k.is_cuda else "auto"))
    s.append(k, v)
    return s.append


def measure(step, new_tokens) -> tuple[float, float]:
    """(GPU kernel ms per step, wall ms per step) over the given new tokens (kernel time: NaN off CUDA)."""
    device = new_tokens[0][0].device
    n = len(new_tokens) // 2
    for kn, vn in new_tokens[:4]:  # warm-up (first growth, allocator)
        step(kn, vn)
    sync(device)
    t = time.perf_counter()
    for kn, vn in new_tokens[4:n]:
        step(kn, vn)
    sync(device)
    wall = (time.perf_counter() - t) * 1e3 / (n - 4)
    if device.type != "cuda":
        return float("nan"), wall
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for kn, vn in new_tokens[n:]:
            step(kn, vn)
        torch.cuda.synchronize()
    # kernel events only (a CPU op's device_time_total would count its kernels a second time)
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if str(e.device_type).endswith("CUDA"))
    return kernel_us / 1e3 / (len(new_tokens) - n), wall


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shapes", nargs="+", default=["8x4096", "8x16384", "8x65536", "1x131072"],
                   help="BATCHxCONTEXT")
    p.add_argument("--bits", type=int, nargs="+", default=[2])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--device", default="cuda", help="cuda (kernel and wall time) or cpu (wall time only)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    header = run_header()
    rows = []
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        dev = dict(device=args.device, dtype=torch.float16)
        g = torch.Generator(device=args.device).manual_seed(0)
        k, v = (torch.randn(B, HKV, T, D, generator=g, **dev) for _ in range(2))
        new = [tuple(torch.randn(B, HKV, 1, D, generator=g, **dev) for _ in range(2))
               for _ in range(2 * args.steps + 8)]
        cases = [("fp16 DynamicCache", lambda: fp16_cache(k, v))]
        for bits in args.bits:
            cases += [(f"KIVI-{bits} (exact-size values, before)", lambda b=bits: kivi_state(k, v, b), True),
                      (f"KIVI-{bits}", lambda b=bits: kivi_state(k, v, b), False)]
        for case in cases:
            name, make = case[0], case[1]
            original = row_buffer.append_rows
            if len(case) > 2 and case[2]:
                row_buffer.append_rows = row_buffer.exact_size_append
            try:
                step = make()
                kernel_ms, wall_ms = measure(step, new)
            finally:
                row_buffer.append_rows = original
            del step
            row = dict(batch=B, context=T, cache=name, kernel_ms=round(kernel_ms, 4), wall_ms=round(wall_ms, 4))
            rows.append(row)
            print(" ".join(f"{a}={b}" for a, b in row.items()), flush=True)
        del k, v, new
    with open(os.path.join(args.out, "cache_append.json"), "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)
    lines = [f"# Dynamic cache: one decode step's append per layer (Llama-3-8B KV heads {HKV} x {D}, fp16)", "",
             header, "", f"Averaged over {args.steps} consecutive steps from the context length; GPU kernel time "
             "summed by torch.profiler, wall time with the host (eager).", "",
             "| batch | context | cache | GPU kernel ms / step | wall ms / step |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['context']} | {r['cache']} | {r['kernel_ms']:.4f} | {r['wall_ms']:.4f} |"
              for r in rows]
    with open(os.path.join(args.out, "cache_append.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Eager decode attention at short contexts: which backend should ``"auto"`` pick? (GPU, one process)

``backend="auto"`` picked Triton below 2048 cached tokens because its *kernel* time was lower there
(CUDA-graph replay: ~2 us at 1k). An eager call also pays its host time: Triton's Python launcher
and its combine launch against the C++ op's one launch + PDL combine. This measures, for backend
"cuda", "triton" and "auto", on fp16 caches of 512-1536 tokens (KIVI-2, R = 128):

- ``kernel us``: CUDA-graph replay (``benchmarks.common.bench_graph_ms``: the GPU time alone, as
  under CUDA graphs; the run recorded on 2026-11-30 used a graph of 20 calls replayed 10 times);
- ``eager us``: 300 back-to-back eager calls, synchronized once at the end (a decode loop's cost
  per attention call when the host is the bottleneck, as it is in eager generate);

then eager ``generate`` (random 8-layer Llama-3-8B-shaped model, fp16, 64 new tokens, KIVI-2 via
``quantize_(model, KIVIConfig(backend=...))``), decode ms per token, against fp16 DynamicCache.

    PYTHONPATH=. python scripts/ab_decode_backend_eager.py
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import bench_graph_ms
from kivi_ops import ops

SHAPES = {"smollm2 9/3x64": (3, 3, 64), "llama3-8b 32/8x128": (8, 4, 128), "llama2-7b 32x128": (32, 1, 128)}


def make_call(batch: int, hkv: int, n_rep: int, d: int, tokens: int, backend: str):
    k, v = (torch.randn(batch, hkv, tokens, d, device="cuda", dtype=torch.float16) for _ in range(2))
    tk, tv = tokens // 128 * 128, tokens - 128
    k_q = ops.quantize_keys(k[:, :, :tk].contiguous(), 2, 32)
    v_q = ops.quantize_values(v[:, :, :tv].contiguous(), 2, 32)
    k_r, v_r = k[:, :, tk:].contiguous(), v[:, :, tv:].contiguous()
    q = torch.randn(batch, hkv * n_rep, 1, d, device="cuda", dtype=torch.float16)
    return lambda: ops.decode_attention(q, k_q, v_q, k_r, v_r, backend=backend)


def eager_us(call, calls: int = 300) -> float:
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / calls


def op_rows(batches, contexts) -> None:
    for name, (hkv, n_rep, d) in SHAPES.items():
        for batch in batches:
            for tokens in contexts:
                cells = []
                for backend in ("cuda", "triton", "auto"):
                    call = make_call(batch, hkv, n_rep, d, tokens, backend)
                    call()  # Triton compiles on its first call, outside the graph capture
                    kernel_us = 1e3 * bench_graph_ms(call)
                    cells.append(f"{backend} kernel {kernel_us:6.1f} us eager {eager_us(call):6.1f} us")
                print(f"op {name} B={batch} T={tokens}: " + " | ".join(cells), flush=True)


def generate_rows(batches, context: int, backends) -> None:
    import kivi_ops
    from benchmarks import bench_generate as bg
    from benchmarks.common import random_llama

    args = argparse.Namespace(device="cuda", layers=8, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                              new_tokens=64, reps=3)
    model = random_llama(args, torch.float16, bg.VOCAB)
    for batch in batches:
        prompt = bg.prompt_ids(batch, context, "cuda")
        base = bg.measure(model, prompt, args, dict)["decode_ms"]
        cells = [f"fp16 dynamic {base:.2f} ms"]
        for backend in backends:
            kivi_ops.quantize_(model, kivi_ops.KIVIConfig(k_bits=2, v_bits=2, backend=backend))
            try:
                ms = bg.measure(model, prompt, args, dict)["decode_ms"]
            finally:
                kivi_ops.unquantize_(model)
            cells.append(f"KIVI-2 {backend} {ms:.2f} ms ({base / ms:.2f}x)")
        print(f"generate B={batch} T={context}: " + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 1536])
    ap.add_argument("--generate-context", type=int, default=1024)
    ap.add_argument("--generate-backends", nargs="+", default=["cuda", "triton", "auto"])
    ap.add_argument("--skip-ops", action="store_true", help="generate rows only")
    args = ap.parse_args()
    torch.manual_seed(0)
    print("GPU", torch.cuda.get_device_name(), "torch", torch.__version__)
    if not args.skip_ops:
        op_rows(args.batches, args.contexts)
    generate_rows(args.batches, args.generate_context, args.generate_backends)


if __name__ == "__main__":
    main()

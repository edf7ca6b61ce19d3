"""Eager decode steps of the dynamic KIVICache: one fused append kernel and the C++-checked attention
call ("fused") against the composite append and the Python-checked call before them ("composite").

Eager decoding is host-bound: each ATen op of a layer's step costs its dispatch and launch time.
The composite append ran ~8 ops per layer (two cats, a contiguous copy, a value quantize, three
copies into the value buffers, a clone); ``kivi::_dynamic_append_one_`` is one. Measured, one
process, both variants alternated:

- ``step us``: one layer's decode step (``KIVIState.append`` of one token + ``KIVIState.attend``),
  300 back-to-back steps synchronized once at the end, against ``DynamicCache``'s step
  (``DynamicLayer.update``: two cats, then SDPA with GQA) on the same shapes;
- eager ``generate`` (random Llama-shaped model: 8 Llama-3-8B layers on the GPU, 4 small ones on
  the CPU; prompt ``--generate-contexts``, 64 new tokens, KIVI-2 through ``quantize_``), decode ms
  per token against ``DynamicCache``.

fp16 on the GPU, float32 on the CPU (there, the kernels' fast dtype).

    PYTHONPATH=. python scripts/ab_eager_decode_step.py
    # CPU (float32, a small model): the same comparison for the CPU kernels
    PYTHONPATH=. python scripts/ab_eager_decode_step.py --device cpu --batches 1 --contexts 1024 --generate-contexts 1024
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import run_header, sync
from kivi_ops import ops
from kivi_ops.cache.state import KIVIState
from kivi_ops.config import KIVIConfig

SHAPES = {"llama3-8b 32/8x128": (8, 4, 128), "llama2-7b 32x128": (32, 1, 128)}


@contextlib.contextmanager
def variant(name: str):
    """``composite``: the append and attention call as they were before the fused step."""
    if name == "fused":
        yield
        return
    fused_ok, of_cache = KIVIState._fused_step_ok, ops.decode_attention_of_cache
    KIVIState._fused_step_ok = lambda self, k, valid: False
    ops.decode_attention_of_cache = lambda q, kq, vq, kr, vr, **kw: ops.decode_attention(q, kq, vq, kr, vr, **kw)
    try:
        yield
    finally:
        KIVIState._fused_step_ok, ops.decode_attention_of_cache = fused_ok, of_cache


def timed_us(step, steps: int, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return (time.perf_counter() - t) * 1e6 / steps


def step_rows(batches, contexts, device: str, dtype: torch.dtype, steps: int = 300, reps: int = 3) -> None:
    for name, (hkv, n_rep, d) in SHAPES.items():
        for batch in batches:
            for tokens in contexts:
                kv = [torch.randn(batch, hkv, tokens + steps + 20, d, device=device, dtype=dtype) for _ in range(2)]
                q = torch.randn(batch, hkv * n_rep, 1, d, device=device, dtype=dtype)
                times = {"DynamicCache": [], "composite": [], "fused": []}
                for _ in range(reps):
                    k_all, v_all = (x[:, :, :tokens] for x in kv)

                    def dense_step(i, state=[k_all, v_all]):
                        state[0] = torch.cat([state[0], kv[0][:, :, tokens + i:tokens + i + 1]], 2)
                        state[1] = torch.cat([state[1], kv[1][:, :, tokens + i:tokens + i + 1]], 2)
                        F.scaled_dot_product_attention(q, state[0], state[1], enable_gqa=True)

                    times["DynamicCache"].append(timed_us(dense_step, steps, device))
                    for v_name in ("composite", "fused"):
                        with variant(v_name):
                            s = KIVIState(KIVIConfig())
                            s.append(kv[0][:, :, :tokens], kv[1][:, :, :tokens])

                            def kivi_step(i):
                                s.append(kv[0][:, :, tokens + i:tokens + i + 1], kv[1][:, :, tokens + i:tokens + i + 1])
                                s.attend(q)

                            for i in range(10):  # warm-up (first buffer growth, allocator)
                                kivi_step(i)
                            times[v_name].append(timed_us(lambda i: kivi_step(i + 10), steps, device))
                med = {k: statistics.median(v) for k, v in times.items()}
                base = med["DynamicCache"]
                print(f"step {name} B={batch} T={tokens}: DynamicCache {base:6.1f} us | " + " | ".join(
                    f"{k} {med[k]:6.1f} us ({base / med[k]:.2f}x)" for k in ("composite", "fused")), flush=True)


def generate_rows(batches, context: int, reps: int, device: str, dtype: torch.dtype) -> None:
    import kivi_ops
    from benchmarks import bench_generate as bg
    from benchmarks.common import random_llama

    # the benchmark model: 8 Llama-3-8B-shaped layers on the GPU; 4 small ones (hidden 512) on the CPU
    shape = dict(layers=8, hidden=4096, heads=32, kv_heads=8, intermediate=14336) if device == "cuda" else \
        dict(layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1024)
    args = argparse.Namespace(device=device, new_tokens=64, reps=reps, **shape)
    model = random_llama(args, dtype, bg.VOCAB)
    for batch in batches:
        prompt = bg.prompt_ids(batch, context, device)
        cells = {"DynamicCache": [], "composite": [], "fused": []}
        tokens = {}
        for _ in range(2):  # alternate the variants twice: the host's speed drifts between runs
            cells["DynamicCache"].append(bg.measure(model, prompt, args, dict)["decode_ms"])
            for v_name in ("composite", "fused"):
                kivi_ops.quantize_(model, kivi_ops.KIVIConfig(k_bits=2, v_bits=2))
                try:
                    with variant(v_name):
                        row = bg.measure(model, prompt, args, dict)
                    cells[v_name].append(row["decode_ms"])
                    tokens[v_name] = row["tokens"]
                finally:
                    kivi_ops.unquantize_(model)
        base = statistics.median(cells["DynamicCache"])
        print(f"generate B={batch} T={context}: DynamicCache {cells['DynamicCache']} ms | " + " | ".join(
            f"KIVI-2 {k} {cells[k]} ms ({base / statistics.median(cells[k]):.2f}x)" for k in ("composite", "fused"))
            + f" | same greedy tokens: {torch.equal(tokens['composite'], tokens['fused'])}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--generate-contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-steps", action="store_true", help="generate rows only")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.float16 if args.device == "cuda" else torch.float32  # (CPU: the kernels' fast dtype)
    print(run_header(), f"device {args.device}, {dtype}", flush=True)
    if not args.skip_steps:
        step_rows(args.batches, args.contexts, args.device, dtype)
    for context in args.generate_contexts:
        generate_rows(args.batches, context, args.reps, args.device, dtype)


if __name__ == "__main__":
    main()

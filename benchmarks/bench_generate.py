"""End-to-end ``model.generate``: fp16 DynamicCache vs quantize_ + KIVICache (KIVI-2, KIVI-4).

What users run today against ``kivi_ops.quantize_``, in one run, on the same random Llama-shaped
model (default: Llama-3-8B shape, 8 layers; fp16 on CUDA, float32 on CPU) and the same random
prompts. Every row is a greedy ``generate`` (``do_sample=False``) of exactly N new tokens
(``min_new_tokens == max_new_tokens``, so EOS never stops a row early), batch B, prompt length T:

- ``fp16 dynamic``: transformers' default ``DynamicCache``, sdpa attention;
- ``KIVI-2`` / ``KIVI-4``: ``kivi_ops.quantize_(model, KIVIConfig(k_bits=b, v_bits=b))``, then the
  same ``generate`` (quantize_ hands it a ``KIVICache``; "kivi" attention, fused decode on CUDA);
  ``unquantize_`` afterwards, always;
- with ``--static``: ``fp16 static``, a transformers ``StaticCache(max_cache_len=T+N)`` passed to
  ``generate``, and ``KIVI-b static``, ``quantize_`` + a ``KIVIStaticCache`` (compact KIVI stores)
  passed the same way.
- with ``--quanto``: ``HF QuantizedCache quanto-b``, transformers' own KIVI-like cache
  (``cache_implementation="quantized"``, optimum-quanto backend, groups of 32, residual 128). A
  baseline that cannot run (quanto not installed, its kernels fail to build) is recorded as
  ``unavailable (reason)``. transformers itself then compiles the decode step (``torch.compile(model.__call__)``
  with its default ``CompileConfig``: Inductor, ``mode="reduce-overhead"``; the prefill stays eager)
  -- but only on CUDA: on CPU it runs eagerly. The ``compiled`` field says which happened.

Timing (median over ``--reps`` timed runs, after one untimed warm-up run of the *same* shapes: the
Triton kernels specialize on shapes, KIVI's flushes fall at places set by T mod R, and CUDA graphs
are recorded per shape, so only an identical run guarantees nothing compiles while the clock runs):

- a logits processor takes a timestamp the first time ``generate`` calls it, i.e. right after the
  prefill forward (CUDA synchronized there, once); another is taken when ``generate`` returns
  (synchronized again). No other synchronization is added to the decode loop.
- prefill ms = first timestamp - call start. It includes ``generate``'s own set-up (argument
  checks, cache creation, mask preparation), which is host work of a few ms.
- decode ms/token = (return - first timestamp) / (N - 1): the N - 1 decode forwards and all of
  ``generate``'s per-step work (input preparation, logits processors, argmax, stopping checks).
  Token 1 comes from the prefill's logits, so it is not counted as a decode step.
- decode tok/s = B * 1000 / (decode ms/token).

Memory: ``cache MB`` is what the cache holds when ``generate`` returns (T + N - 1 tokens): for
DynamicCache/StaticCache the keys/values tensors' bytes (StaticCache: its whole preallocation),
for KIVICache ``memory_footprint().total_bytes`` (codes, scales/zeros, fp residual). ``peak GB`` is
``torch.cuda.max_memory_allocated`` during ``generate`` (weights included; ``nan`` on CPU).
Ratios are against the ``fp16 dynamic`` row of the same (B, T): decode speedup and cache ratio
(fp16 bytes / this row's bytes). A row that runs out of GPU memory is recorded as ``OOM`` and
the run goes on (fp16 may not fit where KIVI does).

Fidelity (informational, the weights are random): the greedy tokens of each row against the
``fp16 dynamic`` row's, as "equal tokens k / (B*N)" and the common prefix (smallest over the batch).

    # H200 (torch 2.11, transformers 5.17)
    python benchmarks/bench_generate.py --out benchmarks/results [--batches 1 8] [--contexts 4096 16384] [--static] [--quanto]
    # CPU smoke run (head_dim = hidden / heads must be a multiple of group_size 32)
    python benchmarks/bench_generate.py --device cpu --layers 1 --hidden 256 --heads 4 --kv-heads 2 \\
        --intermediate 512 --contexts 256 --new-tokens 8 --out /tmp/bg
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import add_model_args, random_llama, run_header, sync  # noqa: E402

VOCAB = 32000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    add_model_args(p)
    p.add_argument("--batches", "--batch", type=int, nargs="+", default=[1], dest="batches")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=3, help="timed runs per row (median); one warm-up run before")
    p.add_argument("--static", action="store_true", help="also a StaticCache row (compiled by generate on CUDA)")
    p.add_argument("--quanto", action="store_true",
                   help="also transformers' QuantizedCache with the optimum-quanto backend (needs optimum-quanto)")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2: decode time is measured over tokens 2..N")
    return args


def prompt_ids(batch: int, context: int, device: str) -> torch.Tensor:
    """The same random prompt for every row of a (batch, context): ids away from the special tokens 0-2."""
    g = torch.Generator().manual_seed(batch * 1_000_003 + context)
    return torch.randint(3, VOCAB, (batch, context), generator=g).to(device)


class PrefillClock:
    """Logits processor that timestamps its first call: generate calls it right after the prefill."""

    def __init__(self, device: str):
        self.device = device
        self.t_first = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            sync(self.device)  # once: the prefill forward must have finished on the GPU
            self.t_first = time.perf_counter()
        return scores


def cache_bytes(cache) -> int:
    """Bytes the cache holds: KIVICache reports its own; the others are their layers' tensors (for
    transformers' QuantizedCache: the quantized tensors' packed data, scales and shifts, plus the
    full-precision residual)."""
    if hasattr(cache, "memory_footprint"):
        return cache.memory_footprint().total_bytes
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True):
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            if getattr(layer, name, None) is not None:
                total += tensor_bytes(getattr(layer, name))
    return total


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor, through tensor subclasses (quanto's QTensors) to their inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def returned_cache(out):
    """The cache of a dict-style generate output (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise RuntimeError("generate returned no cache (use_cache off?)")


def generate_once(model, prompt: torch.Tensor, n: int, device: str, cache_kwargs: dict) -> dict:
    """One timed greedy generate of exactly ``n`` tokens: times, tokens, cache bytes, peak memory."""
    from transformers import LogitsProcessorList

    clock = PrefillClock(device)
    eos = model.generation_config.eos_token_id
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=eos, logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, **cache_kwargs)
    sync(device)
    t_end = time.perf_counter()
    tokens = out.sequences[:, prompt.shape[1]:].cpu()
    if tokens.shape[1] != n:
        raise RuntimeError(f"generate made {tokens.shape[1]} tokens instead of {n}")
    return dict(prefill_ms=(clock.t_first - t0) * 1e3, decode_ms=(t_end - clock.t_first) * 1e3 / (n - 1),
                tokens=tokens, cache_bytes=cache_bytes(returned_cache(out)),
                peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else math.nan)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(model, prompt: torch.Tensor, args, cache_kwargs) -> dict:
    """Warm-up run, then ``--reps`` timed runs; medians of the times, the last run's tokens and bytes.

    ``cache_kwargs()`` gives generate's cache arguments for one run (a reset StaticCache, or none)."""
    generate_once(model, prompt, args.new_tokens, args.device, cache_kwargs())  # warm-up: compiles, records graphs
    runs = [generate_once(model, prompt, args.new_tokens, args.device, cache_kwargs()) for _ in range(args.reps)]
    last = runs[-1]
    return dict(prefill_ms=statistics.median(r["prefill_ms"] for r in runs),
                decode_ms=statistics.median(r["decode_ms"] for r in runs),
                tokens=last["tokens"], cache_bytes=last["cache_bytes"],
                peak_gb=max(r["peak_gb"] for r in runs))


@contextlib.contextmanager
def kivi_quantized(model, bits: int):
    """The model with quantize_(KIVI-bits) applied for the duration; unquantize_ even on errors (OOM)."""
    import kivi_ops

    kivi_ops.quantize_(model, kivi_ops.KIVIConfig(k_bits=bits, v_bits=bits))
    try:
        yield
    finally:
        kivi_ops.unquantize_(model)


def configurations(model, args, context: int):
    """(label, context manager around the row, factory of generate's cache kwargs) per row."""
    dense = "fp16" if model.dtype == torch.float16 else str(model.dtype).replace("torch.", "")
    yield f"{dense} dynamic", contextlib.nullcontext(), dict
    if args.static:
        yield f"{dense} static", contextlib.nullcontext(), static_cache_kwargs(model, context + args.new_tokens)
    for bits in args.bits:
        yield f"KIVI-{bits}", kivi_quantized(model, bits), dict
    if args.quanto:  # transformers' own KIVI-like QuantizedCache (optimum-quanto backend), same group and R
        for bits in args.bits:
            yield f"HF QuantizedCache quanto-{bits}", contextlib.nullcontext(), quanto_cache_kwargs(bits)
    if args.static:  # the recommended compile path: quantize_ + KIVIStaticCache (compiled by generate too)
        for bits in args.bits:
            yield (f"KIVI-{bits} static", kivi_quantized(model, bits),
                   static_cache_kwargs(model, context + args.new_tokens, bits))


def quanto_cache_kwargs(bits: int):
    """generate's arguments for transformers' QuantizedCache with the quanto backend (per-channel
    groups for keys and values, 32 per group, residual 128: KIVIConfig's defaults)."""
    import importlib

    def kwargs():
        importlib.import_module("optimum.quanto")  # ImportError: the row is recorded as unavailable
        return dict(cache_implementation="quantized",
                    cache_config=dict(backend="quanto", nbits=bits, q_group_size=32, residual_length=128))
    return kwargs


def static_cache_kwargs(model, max_cache_len: int, kivi_bits: int | None = None):
    """One static cache for all runs of the row, reset before each: its buffers keep their addresses
    (marked static), so the CUDA graphs recorded in the warm-up are replayed. ``kivi_bits``: a
    ``KIVIStaticCache`` (compact KIVI stores) instead of transformers' fp16 ``StaticCache``."""
    from transformers import StaticCache

    import kivi_ops
    from kivi_ops.cache import KIVIStaticCache
    from kivi_ops.integrations.transformers import cache_kwarg_name

    if kivi_bits is None:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    else:
        cfg = kivi_ops.KIVIConfig(k_bits=kivi_bits, v_bits=kivi_bits)
        cache = KIVIStaticCache(model.config, max_cache_len=max_cache_len, kivi_config=cfg)
    name = cache_kwarg_name(model)

    def kwargs():
        cache.reset()
        return {name: cache}

    # a fresh compile per static row: no recompile limit reached, no graphs of another shape reused
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    return kwargs


def run_row(model, label: str, ctx, cache_kwargs, prompt: torch.Tensor, args) -> dict:
    """One row; a CUDA out-of-memory error is a result ("OOM"), not a crash."""
    row = dict(batch=prompt.shape[0], context=prompt.shape[1], new_tokens=args.new_tokens, cache=label)
    oom = (torch.cuda.OutOfMemoryError,) if args.device == "cuda" else ()
    free_memory(args.device)
    row["allocated_before_gb"] = torch.cuda.memory_allocated() / 1e9 if args.device == "cuda" else math.nan
    try:
        with ctx:
            row.update(status="ok", **measure(model, prompt, args, cache_kwargs))
        # generate compiled the forward itself (transformers' auto-compile for static caches on CUDA)
        row["compiled"] = "_compiled_call" in model.__dict__ and label.endswith("static")
    except oom:
        row.update(status="OOM")
    except Exception as e:  # a third-party baseline (quanto) that cannot run here is a result too
        if not label.startswith("HF "):
            raise
        row.update(status=f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    free_memory(args.device)
    return row


def compare(rows: list[dict]) -> None:
    """Ratios and token agreement against the dense dynamic row of the same (batch, context), in place."""
    base = rows[0]
    for r in rows:
        ok = r["status"] == "ok" and base["status"] == "ok"
        r["decode_tok_s"] = r["batch"] * 1e3 / r["decode_ms"] if r["status"] == "ok" else math.nan
        r["decode_speedup"] = base["decode_ms"] / r["decode_ms"] if ok else math.nan
        r["cache_ratio"] = base["cache_bytes"] / r["cache_bytes"] if ok else math.nan
        if ok:
            same = r["tokens"] == base["tokens"]  # [B, N] bool
            r["tokens_equal"] = int(same.sum())
            # leading run of equal tokens per sequence (after the first difference they see different histories)
            r["common_prefix"] = int(same.int().cumprod(dim=1).sum(dim=1).min())
        r["tokens_total"] = r["batch"] * r["new_tokens"]


def fmt(v, spec: str) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_line(r: dict) -> str:
    head = f"| {r['batch']} | {r['context']} | {r['cache']} |"
    if r["status"] != "ok":
        return head + f" {r['status']} |" + " — |" * 7
    return (head + f" {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{fmt(r['decode_speedup'], '.2f')}x | {r['cache_bytes'] / 1e6:.1f} | {fmt(r['cache_ratio'], '.2f')}x | "
            f"{fmt(r['peak_gb'], '.2f')} | {r.get('tokens_equal', 'n/a')}/{r['tokens_total']} "
            f"(prefix {r.get('common_prefix', 'n/a')}) |")


def print_row(r: dict) -> None:
    keep = {k: v for k, v in r.items() if k != "tokens"}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()), flush=True)


def write_results(rows: list[dict], args, model) -> None:
    os.makedirs(args.out, exist_ok=True)
    from kivi_ops import KIVIConfig

    kivi = KIVIConfig()  # the rows change only the bits: group size and residual are the defaults
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    lines = ["# End-to-end generate: fp16 DynamicCache vs quantize_ + KIVICache\n", run_header(),
             f"- model: random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} KV "
             f"heads x {args.hidden // args.heads}, intermediate {args.intermediate}, vocab {VOCAB}, {model.dtype}, "
             f"device {args.device}, sdpa; weights {weights_gb:.2f} GB\n",
             f"- greedy, exactly {args.new_tokens} new tokens per sequence; median of {args.reps} timed runs after "
             f"one identical warm-up run; KIVI group {kivi.group_size}, residual {kivi.residual_length}\n",
             "- prefill ms: generate's call to the first logits-processor call (prefill forward + generate set-up); "
             "decode ms/token: the rest of generate / (N - 1); peak GB: max_memory_allocated during generate "
             "(weights included); ratios vs the fp16 dynamic row; tokens equal: informational (random weights)\n"]
    if args.static:
        compiled = {r["compiled"] for r in rows if r["cache"].endswith("static") and r["status"] == "ok"}
        lines.append(f"- static rows compiled by generate (Inductor, reduce-overhead): {sorted(compiled)}\n")
    lines += ["| batch | context | cache | prefill ms | decode ms/token | decode tok/s | decode speedup | cache MB | "
              "cache ratio | peak GB | tokens equal to fp16's |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [table_line(r) for r in rows]
    with open(os.path.join(args.out, "generate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    def plain(v):  # JSON: tokens as lists, nan as null
        if isinstance(v, torch.Tensor):
            return v.tolist()
        return None if isinstance(v, float) and math.isnan(v) else v

    with open(os.path.join(args.out, "generate.json"), "w") as f:
        json.dump([{k: plain(v) for k, v in r.items()} for r in rows], f, indent=1)


def main() -> None:
    args = parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = random_llama(args, dtype, VOCAB)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            prompt = prompt_ids(batch, context, args.device)
            group = [run_row(model, label, ctx, kw, prompt, args)
                     for label, ctx, kw in configurations(model, args, context)]
            compare(group)
            for r in group:
                print_row(r)
            rows += group
    write_results(rows, args, model)


if __name__ == "__main__":
    main()

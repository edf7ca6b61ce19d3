"""One compiled decode step of a Llama-shaped model: fp16 StaticCache vs quantize_ + KIVIStaticCache.

The recommended compile path (README) against what users run today, in the same run, same random
weights: transformers' StaticCache compiled by Inductor, and ``quantize_`` + the compact
``KIVIStaticCache`` compiled with ``kivi_backend``. Both use ``mode="reduce-overhead"`` (CUDA
graphs) and ``fullgraph=True``. Each row: median time of one decode step (CUDA events, after
warm-up; the step is replayed at a fixed context, the cache count rewound each call), the KV
bytes each cache holds, and the ratio. On CUDA the KIVI decode step runs the fused decode kernel
over the stores (kivi::_static_decode_attention); ``--composite`` adds a row per config with
KIVI_STATIC_COMPOSITE=1, the earlier path (kivi::qmatmul_keys / qmatmul_values over the whole
capacity in float32), measured in the same run.

    python benchmarks/bench_static_cache.py --out benchmarks/results [--layers 8] [--contexts 4096 16384] [--batch 8] [--composite]
    python benchmarks/bench_static_cache.py --device cpu --layers 1 --contexts 256 --hidden 1024 --intermediate 2048  # smoke

``--profile`` also writes profile.txt: the kernels of a decode step by time (where the KIVI step's
extra time at batch 1, 4k goes: the append's small ops or the attention). ``--host-profile`` writes
host_profile.txt: the host's Python functions in a step's call (cProfile), fp16 and KIVI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import add_model_args, random_llama, run_header  # noqa: E402


def step_kwargs(model, cache) -> dict:
    """The forward keywords of a decode step: the cache under the name this transformers uses."""
    from kivi_ops.integrations.transformers import cache_kwarg_name

    return {cache_kwarg_name(getattr(model, "_orig_mod", model)): cache, "use_cache": True}


def rewind(cache, context: int) -> None:
    """Set every layer back to ``context`` cached tokens, so each step decodes token ``context``
    again, and start a new CUDA-graph step."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(context)
    torch.compiler.cudagraph_mark_step_begin()


def step_ms(model, cache, context: int, device: str, reps: int, batch: int = 1) -> dict:
    """One decode step at ``context`` cached tokens (cache counters rewound each call), three ways:

    - ``latency``: median ms of a step from its start to its end on the GPU, the stream synchronized
      after each step (as ``generate`` does: it reads the new token on the host). On CUDA this
      includes the host's dispatch when the GPU waits for it;
    - ``host``: median ms the host spends in the call (guards, CUDA-graph replay bookkeeping, the
      launches) before it returns, without waiting for the GPU;
    - ``pipelined``: ms per step of ``reps`` steps issued back to back without synchronizing, so the
      host's dispatch of a step overlaps the GPU's work on the previous one (CUDA only; the GPU's
      own time per step when the host keeps ahead, plus the rewind's one small fill per layer).
    """
    kw = step_kwargs(model, cache)
    prompt = torch.randint(0, 32000, (batch, context), device=device)
    tok = prompt[:, -1:]
    cuda = device == "cuda"

    with torch.no_grad():
        # eager prefill, as generate does: the cache's buffers are made (and marked static) outside
        # the compiled graph, which CUDA graphs need
        getattr(model, "_orig_mod", model)(prompt, **kw)
        times, hosts = [], []
        for i in range(reps + 5):
            rewind(cache, context)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            model(tok, **kw)
            host = (time.perf_counter() - t0) * 1e3
            if cuda:
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = host
            if i >= 5:
                times.append(ms)
                hosts.append(host)
        pipelined = float("nan")
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                rewind(cache, context)
                model(tok, **kw)
            end.record()
            torch.cuda.synchronize()
            pipelined = start.elapsed_time(end) / reps
    return dict(latency=statistics.median(times), host=statistics.median(hosts), pipelined=pipelined)


def kernel_breakdown(model, cache, context: int, device: str, batch: int = 1, steps: int = 5, top: int = 25) -> str:
    """Where one decode step's time goes: the kernels (CUDA) or ops (CPU) of ``steps`` steps under
    torch.profiler, as a table of time and calls per step, largest first (a text block)."""
    kw = step_kwargs(model, cache)
    tok = torch.randint(0, 32000, (batch, 1), device=device)
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    # the first two steps are not recorded: turning the profiler on can make Dynamo recompile
    sched = torch.profiler.schedule(wait=1, warmup=1, active=steps)
    with torch.no_grad(), torch.profiler.profile(activities=[activity], schedule=sched) as prof:
        for _ in range(steps + 2):
            rewind(cache, context)
            model(tok, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            prof.step()

    def us(e):  # total time of the event's kernels (device) or ops (CPU self time), microseconds
        if device == "cuda":
            return getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        return e.self_cpu_time_total

    def kept(e):  # device kernels on CUDA; operators (not Dynamo/Inductor phases) on CPU
        return e.device_type.name == "CUDA" if device == "cuda" else "::" in e.key and "dynamo" not in e.key

    events = [e for e in prof.key_averages() if us(e) > 0 and kept(e)]
    events.sort(key=us, reverse=True)
    total = sum(us(e) for e in events) / steps
    lines = [f"{'us/step':>9} {'share':>6} {'calls/step':>10}  kernel", f"{total:9.1f} {'100%':>6} {'':>10}  (all)"]
    for e in events[:top]:
        lines.append(f"{us(e) / steps:9.1f} {us(e) / steps / total:6.1%} {e.count / steps:10.1f}  {e.key[:110]}")
    return "\n".join(lines)


def host_profile(model, cache, context: int, device: str, batch: int = 1, steps: int = 100, top: int = 30) -> str:
    """Where the host's time in one step's call goes: cProfile over ``steps`` calls (the synchronize
    after each call is outside the profiled span), the functions by own time per step.

    cProfile sees Python frames only: Dynamo's guard checks (C++) and the CUDA-graph replay count
    in the frame that runs them. Its own overhead inflates Python-heavy rows; compare fp16 and KIVI
    row by row, not the totals against ``step_ms``'s host time.
    """
    import cProfile
    import pstats

    kw = step_kwargs(model, cache)
    tok = torch.randint(0, 32000, (batch, 1), device=device)

    def one_step(prof=None):
        rewind(cache, context)
        if prof is not None:
            prof.enable()
        model(tok, **kw)
        if prof is not None:
            prof.disable()
        if device == "cuda":
            torch.cuda.synchronize()

    prof = cProfile.Profile()
    with torch.no_grad():
        for _ in range(3):
            one_step()
        for _ in range(steps):
            one_step(prof)
    stats = pstats.Stats(prof)
    total_us = stats.total_tt / steps * 1e6
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # by own (tot) time
    lines = [f"profiled host time per call: {total_us:.1f} us (cProfile, {steps} calls)",
             f"{'own us':>8} {'cum us':>8} {'calls':>6}  function"]
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = "/".join(file.split("/")[-2:])
        lines.append(f"{tottime / steps * 1e6:8.1f} {cumtime / steps * 1e6:8.1f} {ncalls / steps:6.1f}  {name} ({where}:{line})")
    return "\n".join(lines)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    add_model_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--composite", action="store_true", help="also time the KIVI step without the fused kernel")
    p.add_argument("--profile", action="store_true",
                   help="also write profile.txt: each step's kernels by time (torch.profiler), fp16 and KIVI")
    p.add_argument("--host-profile", action="store_true",
                   help="also write host_profile.txt: the host's Python functions in a step's call (cProfile), fp16 and KIVI")
    args = p.parse_args()

    from transformers import StaticCache

    import kivi_ops
    from kivi_ops.cache import KIVIStaticCache

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    mode = "reduce-overhead" if args.device == "cuda" else None
    model = random_llama(args, dtype)
    rows, profiles, host_profiles = [], [], []
    torch._dynamo.utils.counters.clear()
    for T in args.contexts:
        L = T + 64
        torch._dynamo.reset()
        fp16 = torch.compile(model, mode=mode, fullgraph=True)
        base = StaticCache(config=model.config, max_cache_len=L)
        base_t = step_ms(fp16, base, T, args.device, args.reps, args.batch)
        if args.profile:
            profiles.append(f"## fp16 StaticCache, batch {args.batch}, context {T}\n"
                            + kernel_breakdown(fp16, base, T, args.device, args.batch))
        if args.host_profile:
            host_profiles.append(f"## fp16 StaticCache, batch {args.batch}, context {T}\n"
                                 + host_profile(fp16, base, T, args.device, args.batch))
        paths = ["fused", "composite"] if args.composite else ["fused"]
        for bits, path in [(b, path) for b in args.bits for path in paths]:
            if path == "composite":
                os.environ["KIVI_STATIC_COMPOSITE"] = "1"
            cfg = kivi_ops.KIVIConfig(k_bits=bits, v_bits=bits)
            kivi_ops.quantize_(model, cfg)
            try:
                torch._dynamo.reset()
                fast = torch.compile(model, backend=kivi_ops.make_kivi_backend(cfg), mode=mode, fullgraph=True)
                kivi = KIVIStaticCache(model.config, max_cache_len=L, kivi_config=cfg)
                kivi_t = step_ms(fast, kivi, T, args.device, args.reps, args.batch)
                if args.profile:
                    profiles.append(f"## KIVIStaticCache {bits}-bit ({path}), batch {args.batch}, context {T}\n"
                                    + kernel_breakdown(fast, kivi, T, args.device, args.batch))
                if args.host_profile:
                    host_profiles.append(f"## KIVIStaticCache {bits}-bit ({path}), batch {args.batch}, context {T}\n"
                                         + host_profile(fast, kivi, T, args.device, args.batch))
            finally:
                kivi_ops.unquantize_(model)
                os.environ.pop("KIVI_STATIC_COMPOSITE", None)
            fused = args.device == "cuda" and path == "fused"
            row = dict(batch=args.batch, context=T, bits=bits, path="fused kernel" if fused else "composite",
                       static_ms=base_t["latency"], kivi_ms=kivi_t["latency"], speedup=base_t["latency"] / kivi_t["latency"],
                       static_host_ms=base_t["host"], kivi_host_ms=kivi_t["host"],
                       static_pipelined_ms=base_t["pipelined"], kivi_pipelined_ms=kivi_t["pipelined"],
                       pipelined_speedup=base_t["pipelined"] / kivi_t["pipelined"],
                       static_mb=cache_bytes(base) / 1e6, kivi_mb=cache_bytes(kivi) / 1e6,
                       memory_ratio=cache_bytes(base) / cache_bytes(kivi))
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    os.makedirs(args.out, exist_ok=True)
    lines = ["# One compiled decode step: fp16 StaticCache vs quantize_ + KIVIStaticCache\n", run_header(),
             f"- model: random Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.heads} q / {args.kv_heads} KV "
             f"heads, {dtype}, device {args.device}, mode={mode!r}, fullgraph; batch {args.batch}; eager prefill\n",
             f"- graphs Inductor ran without CUDA graphs: {torch._dynamo.utils.counters['inductor']['cudagraph_skips']}\n",
             "Step latency (synchronized after each step, as in `generate`), the host's time in the call, and the "
             "time per step when steps are issued back to back (host dispatch hidden under the GPU's work).\n",
             "| batch | context | bits | KIVI decode path | StaticCache ms | KIVIStaticCache ms | speedup | host ms (fp16 / KIVI) "
             "| pipelined ms (fp16 / KIVI) | pipelined speedup | StaticCache MB | KIVI MB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['bits']} | {r['path']} | {r['static_ms']:.3f} | {r['kivi_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['static_host_ms']:.3f} / {r['kivi_host_ms']:.3f} | "
                     f"{r['static_pipelined_ms']:.3f} / {r['kivi_pipelined_ms']:.3f} | {r['pipelined_speedup']:.2f}x | "
                     f"{r['static_mb']:.1f} | {r['kivi_mb']:.1f} | {r['memory_ratio']:.2f}x |")
    with open(os.path.join(args.out, "static_cache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "static_cache.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if profiles:
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(run_header() + "\n" + "\n\n".join(profiles) + "\n")
    if host_profiles:
        with open(os.path.join(args.out, "host_profile.txt"), "w") as f:
            f.write(run_header() + "\n" + "\n\n".join(host_profiles) + "\n")


if __name__ == "__main__":
    main()

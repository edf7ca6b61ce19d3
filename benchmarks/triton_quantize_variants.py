"""Triton quantize kernels, candidate launch configurations side by side on the GPU (pick the default).

For every (tensor, bits, configuration): the outputs are checked equal to the reference backend
(torch.equal, except that NaN must sit where the reference has NaN) on the 32k-token cache (randn
with a x1e3 outlier channel, all-equal key and value groups, a NaN and an Inf) and on small odd
shapes (masked tails, head_dim 64 and 96); the 32k cache is then timed twice and reported as % of
the copy bandwidth measured in the same run, with the byte count of benchmarks/bench_quantize.py
(input read once + codes, scales and zeros written once), plus the compiled kernel's registers and
spills:

- "eager": benchmarks.common.bench_ms on the launcher as Python calls it (L2 flushed before each
  call; host launch cost included where it exceeds the GPU time);
- "graph": benchmarks.common.bench_graph_ms, the same call replayed from a CUDA graph: the kernel's
  own time. The fastest exact configuration is chosen on this one (host noise does not move it).

Each tensor and bit width also gets an "op" line: the public op (kivi_ops.ops.quantize_*,
backend="triton", default configuration) timed eagerly, i.e. what a caller pays per call.

History (H200, torch 2.11, Triton 3.6): the eager numbers used to sit at 15-40 % because every call
of the private launchers went through wrap_triton's higher-order-op dispatch (0.25-0.5 ms of host
time); the kernels themselves (graph) ran at 79-99 %. The launchers now launch directly for plain
tensors (quantize._launcher).

One line per configuration; a "MISMATCH" line names the first failing check (such a configuration
must not become the default); the last lines name the fastest exact configuration per tensor and
bit width.

    PYTHONPATH=. python3 benchmarks/triton_quantize_variants.py    # < 110 s on an H200 (~70 compiles)
    PYTHONPATH=. python3 benchmarks/triton_quantize_variants.py --only keys --bits 2 --configs k1 k3

The defaults live in kivi_ops/ops/triton/quantize.py (KEYS_CONFIG, VALUES_CONFIG).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_graph_ms, bench_ms, copy_bandwidth_tbs, tensor_bytes  # noqa: E402
from kivi_ops import _extension, ops  # noqa: E402
from kivi_ops.ops.triton import quantize as TQ  # noqa: E402

G = 32
# Keys: vec_bytes = bytes of one token's channels per thread (a thread holds all G tokens of those
# channels: 8 -> 4 fp16 channels = 128 values), gpp = token groups per program; reload = read the
# tile a second time (L1/L2) to encode it instead of keeping it in registers (default: only when a
# thread would keep more than 128 values); asm=False = float32 min/max instead of packed PTX.
KEYS = {
    "k1": dict(vec_bytes=8, gpp=1, num_warps=1),  # the default: 8-byte loads (2 words), 128 values per thread
    "k2": dict(vec_bytes=8, gpp=2, num_warps=2),
    "k3": dict(vec_bytes=4, gpp=1, num_warps=2),  # 2 channels x 32 tokens = 64 values per thread, 4-byte loads
    "k4": dict(vec_bytes=4, gpp=2, num_warps=4),
    "k5": dict(vec_bytes=8, gpp=4, num_warps=4),  # k1's threads, 4 groups per program: 4x fewer programs
    "k6": dict(vec_bytes=4, gpp=4, num_warps=8),  # 64 values per thread, 256 threads per program
    "k1-reload": dict(vec_bytes=8, gpp=1, num_warps=1, reload=True),
}
# Values: vec_bytes = bytes per vector load (a thread holds whole groups of G channels),
# block_n = tokens per program (x head_dim / G groups; raised to one group per thread at least).
VALUES = {
    "v1": dict(vec_bytes=16, block_n=8, num_warps=1),  # one group per thread, 1 warp
    "v2": dict(vec_bytes=16, block_n=16, num_warps=2),  # the default: one group per thread, 2 warps
    "v3": dict(vec_bytes=16, block_n=16, num_warps=1),  # two groups per thread
    "v4": dict(vec_bytes=8, block_n=8, num_warps=1),  # 8-byte loads
    "v5": dict(vec_bytes=16, block_n=64, num_warps=8),  # 8 warps, 256 groups per program
    "v6": dict(vec_bytes=16, block_n=32, num_warps=4),  # 4 warps, one group per thread
}


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """Outlier channel, all-equal key and value groups, a NaN and an Inf (each poisons one group)."""
    B, H, T, D = x.shape
    x[..., 3 % D] *= 1e3
    x[0, 0, :G, 5 % D] = 1.25  # all-equal key group (channel 5, tokens 0..31)
    x[0, -1, T - 1, :G] = -0.75  # all-equal value group (last token, channels 0..31)
    x[-1, 0, T // 2, 7 % D] = float("nan")
    x[-1, -1, 1, D - 1] = float("inf")
    return x


def make_inputs(dtype=torch.float16):
    torch.manual_seed(0)
    big = with_specials(torch.randn(1, 32, 32768, 128, device="cuda", dtype=dtype))
    small = {
        "keys": [with_specials(torch.randn(s, device="cuda", dtype=dtype)) for s in
                 ((2, 3, 96, 64), (1, 1, 32, 128), (1, 3, 64, 96))],
        "values": [with_specials(torch.randn(s, device="cuda", dtype=dtype)) for s in
                   ((2, 3, 96, 64), (1, 1, 32, 128), (2, 3, 5, 96))],
    }
    return big, small


def first_mismatch(got, want) -> str | None:
    for g, w, what in zip(got, want, ("codes", "scale", "zero")):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{what} {tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}"
        same = (g == w) | (torch.isnan(g) & torch.isnan(w)) if g.is_floating_point() else g == w
        if not bool(same.all()):
            idx = tuple(int(i) for i in (~same).nonzero()[0])
            return f"{what} at {idx}: {g[idx].item()} vs {w[idx].item()}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("keys", "values"), default=None)
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--configs", nargs="*", default=None, help="names from KEYS / VALUES (default: all)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--budget", type=float, default=100.0, help="stop starting new lines after this many seconds")
    args = parser.parse_args()
    t0 = time.time()
    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth (read + write): {copy_tbs:.2f} TB/s; defaults: keys {TQ.KEYS_CONFIG}, values {TQ.VALUES_CONFIG}")
    big, small = make_inputs(getattr(torch, args.dtype))
    best = {}
    # bits outermost: if the time budget runs out, both tensors have been measured
    for bits in args.bits:
        for kind in [k for k in ("keys", "values") if args.only in (None, k)]:
            if not run_kind(kind, bits, big, small[kind], copy_tbs, args, t0, best):
                break
    for (kind, bits), (name, pct) in best.items():
        print(f"best exact {kind} {bits}b: {name} {(KEYS if kind == 'keys' else VALUES)[name]} ({pct:.1f} % of copy, graph)")
    print(f"done in {time.time() - t0:.0f} s")


def run_kind(kind, bits, big, small, copy_tbs, args, t0, best) -> bool:
    """One line per configuration of ``kind`` at ``bits``; False once the time budget is spent."""
    public = ops.quantize_keys if kind == "keys" else ops.quantize_values
    launch = TQ._launch_quantize_keys if kind == "keys" else TQ._launch_quantize_values
    table = KEYS if kind == "keys" else VALUES
    want_big = public(big, bits, G, backend="reference")
    want_small = [public(x, bits, G, backend="reference") for x in small]
    n_bytes = tensor_bytes(big, *want_big)

    def report(name, fn, cfg_text, kern=None, err=None, graph=True):
        pct = lambda ms: 100 * n_bytes / (ms * 1e-3) / 1e12 / copy_tbs  # noqa: E731
        ms = bench_ms(fn)
        gms = bench_graph_ms(fn) if graph else None
        regs = f"regs {getattr(kern, 'n_regs', '?'):>3} spills {getattr(kern, 'n_spills', '?'):>2}" if kern else " " * 18
        status = "exact" if err is None else f"MISMATCH {err}"
        gtext = f"graph {gms:6.3f} ms {pct(gms):5.1f} %" if gms is not None else " " * 23
        print(f"{kind:6s} {bits}b {name:9s} {cfg_text:52s} {regs} eager {ms:6.3f} ms {pct(ms):5.1f} %  {gtext} of copy  "
              f"{status}", flush=True)
        if err is None and gms is not None and name not in ("cuda", "op") and pct(gms) > best.get((kind, bits), ("", -1.0))[1]:
            best[(kind, bits)] = (name, pct(gms))

    if _extension.has_cuda_kernels():
        got = public(big, bits, G, backend="cuda")
        report("cuda", lambda: public(big, bits, G, backend="cuda"), "(CUDA extension, for comparison)",
               err=first_mismatch(got, want_big), graph=False)
    got = public(big, bits, G, backend="triton")
    report("op", lambda: public(big, bits, G, backend="triton"), "(public op, backend=triton, default config)",
           err=first_mismatch(got, want_big), graph=False)
    B, H, T, D = big.shape
    for name, cfg in table.items():
        if args.configs and name not in args.configs:
            continue
        if time.time() - t0 > args.budget:
            print(f"(time budget of {args.budget:.0f} s spent: skipping {kind} {bits}b {name} and the rest)")
            return False
        try:
            *got, kern = launch(big, bits, G, cfg)
            err = first_mismatch(got, want_big)
            for x, want in zip(small, want_small):
                if err is None:
                    e = first_mismatch(launch(x, bits, G, cfg)[:3], want)
                    err = None if e is None else f"{tuple(x.shape)}: {e}"
            lc = (TQ._keys_launch(big, D, G, B * H * T // G, cfg) if kind == "keys"
                  else TQ._values_launch(big, D, G, bits, B * H * T, cfg))
            shown = " ".join(f"{k}={int(v)}" for k, v in lc.items()
                             if k in ("VEC", "GPP", "BLOCK_N", "num_warps", "WORDS", "ASM", "RELOAD"))
            report(name, lambda: launch(big, bits, G, cfg), shown, kern, err)
        except Exception as e:  # a configuration that fails to compile or run is reported, not fatal
            print(f"{kind:6s} {bits}b {name:9s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return True


if __name__ == "__main__":
    main()

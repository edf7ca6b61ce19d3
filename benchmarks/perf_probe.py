"""One-call probe for docs/perf_plan.md §4: decode floor/tail/splits, scalar path, quantize sweeps. -> $OUT/probe.*"""
import json, os, re, sys, time, torch, triton
from benchmarks.common import bench_graph_ms, bench_ms, copy_bandwidth_tbs, tensor_bytes
from benchmarks.bench_decode_attention import sdpa
from kivi_ops import ops
from kivi_ops.ops.triton import quantize as TQ

OUT, G, T0, BUDGET = os.environ.get("OUT", "/tmp/probe"), 32, time.time(), float(os.environ.get("PROBE_BUDGET_S", 270))
MHA, GQA, KNOBS = (32, 32), (32, 8), ("KIVI_ATTN_SPLITS", "KIVI_ATTN_TAIL_CHUNK", "KIVI_CUDA_GENERIC", "KIVI_ATTN_TAIL_APART")
rows, res = [], {}

def add(**r):
    r["t"] = round(time.time() - T0); rows.append(r); print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    json.dump(dict(rows=rows, **res), open(f"{OUT}/probe.json", "w"), indent=0)

def flat(x): return [t for y in x for t in (flat(y) if isinstance(y, tuple) else (y,))]
def clone(x): return tuple(clone(t) for t in x) if isinstance(x, tuple) else x.clone()
def copies(inp):  # cycle copies so that the inputs never sit in the 60 MB L2
    nb = tensor_bytes(*flat(inp)); return [inp] + [clone(inp) for _ in range(-(-(256 << 20) // nb) - 1)], nb
def gms(call, cps): return 1e3 * bench_graph_ms(lambda: [call(*c) for c in cps], rep_ms=60) / len(cps)  # us
def env(kn):
    for k in KNOBS: os.environ.pop(k, None)
    os.environ.update({k: str(v) for k, v in kn.items()})
def kivi(kb, vb, be="cuda"): return lambda q, kq, vq, kr, vr: ops.decode_attention(q, kq, vq, kr, vr, k_bits=kb,
                                                                                   v_bits=vb, group_size=G, backend=be)
def kernels_us(call, cps, reps=2):  # device us per call by kernel name (eager, L2 cycled)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps): [call(*c) for c in cps]
        torch.cuda.synchronize()
    out = {}
    for e in p.key_averages():  # kernel rows only (device_type CUDA); anything but attn_* is 'other'
        t, m = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), re.search(r"attn_(\w+)_kernel", e.key)
        if t and str(getattr(e, "device_type", "")).endswith("CUDA"):
            n = m.group(1) if m else "other"; out[n] = round(out.get(n, 0) + t / reps / len(cps), 1)
    return out

def guard(f):  # a failing row (OOM, missing knob...) is recorded, not fatal
    def g(*a, **k):
        try: return f(*a, **k)
        except Exception as e: env({}); add(tag="ERR", fn=f.__name__, args=str(a)[:60], e=repr(e)[:200]); torch.cuda.empty_cache()
    return g

def inputs(B, heads, T, kb, vb, rk=64, rv=128):  # as benchmarks/bench_decode_attention.py, residual split (rk, rv)
    k = torch.randn(B, heads[1], T, 128, device="cuda", dtype=torch.float16); v = torch.randn_like(k)
    q = torch.randn(B, heads[0], 1, 128, device="cuda", dtype=torch.float16)
    return (q, k, v), (q, ops.quantize_keys(k[:, :, :T - rk].contiguous(), kb, G),
                       ops.quantize_values(v[:, :, :T - rv].contiguous(), vb, G), k[:, :, T - rk:].contiguous(),
                       v[:, :, T - rv:].contiguous())

@guard
def decode(tag, B, heads, T, kb=2, vb=2, rk=64, rv=128, ref=False, be="cuda", **kn):
    if time.time() - T0 > BUDGET: return
    (q, k, v), inp = inputs(B, heads, T, kb, vb, rk, rv); Hkv = heads[1]
    env({}); want = kivi(kb, vb)(*inp).float(); env(kn); got = kivi(kb, vb, be)(*inp).float()
    cps, nb = copies(inp)
    r = dict(tag=tag, B=B, Hkv=Hkv, T=T, bits=f"{kb}{vb}", rk=rk, rv=rv, be=be, **kn, MB=round(nb / 1e6, 1),
             err=f"{((got - want).norm() / want.norm()).item():.0e}", us=round(gms(kivi(kb, vb, be), cps), 1))
    r.update(TBs=round(nb / r["us"] / 1e6, 2), **kernels_us(kivi(kb, vb, be), cps))
    if ref:
        del cps; scp, _ = copies((q, k, v))
        r["sdpa_us"] = round(gms(sdpa, scp), 1); r["x"] = round(r["sdpa_us"] / r["us"], 2)
    env({}); add(**r); torch.cuda.empty_cache()

@guard
def quant():
    x = torch.randn(1, 32, 32768, 128, device="cuda", dtype=torch.float16); B, H, T, D = x.shape
    for bits in (2, 4):
        for what, fn in (("keys", ops.quantize_keys), ("values", ops.quantize_values)):
            ref = fn(x, bits, G, backend="cuda"); nb = tensor_bytes(x, *ref)
            pct = lambda ms: round(100 * nb / (ms * 1e9) / res["copy_tbs"], 1)
            add(tag="Q_cuda", what=what, bits=bits, pct=pct(bench_ms(lambda: fn(x, bits, G, backend="cuda"))))
            if bits == 4: continue
            c, s, z = (torch.empty_like(t) for t in ref)
            for blk in ((32, 64, 128) if what == "keys" else (8, 16, 32)):
                for nw in (1, 2, 4):
                    if time.time() - T0 > BUDGET + 40: return
                    f = (lambda: TQ._quantize_keys_kernel[(B * H * T // G, triton.cdiv(D, blk))](
                        x, c, s, z, T, D, BITS=bits, GROUP=G, BLOCK_D=blk, num_warps=nw)) if what == "keys" else \
                        (lambda: TQ._quantize_values_kernel[(triton.cdiv(B * H * T, blk),)](
                            x, c, s, z, B * H * T, D, BITS=bits, GROUP=G, BLOCK_N=blk, BLOCK_D=128, num_warps=nw))
                    kobj = f(); exact = all(torch.equal(a, b) for a, b in zip((c, s, z), ref))
                    add(tag="Q_triton", what=what, bits=bits, blk=blk, nw=nw, exact=exact, pct=pct(bench_ms(f)),
                        regs=getattr(kobj, "n_regs", "?"), spills=getattr(kobj, "n_spills", "?"))

def ncu_driver():  # under ncu: one NVTX range 'probe' around each profiled call
    for B, heads, T, kb in ((8, MHA, 32768, 2), (1, GQA, 4096, 2), (1, MHA, 32768, 2), (8, MHA, 32768, 4)):
        _, inp = inputs(B, heads, T, kb, kb)
        kivi(kb, kb)(*inp); torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("probe"); kivi(kb, kb)(*inp); torch.cuda.nvtx.range_pop(); torch.cuda.synchronize()
    x = torch.randn(1, 32, 32768, 128, device="cuda", dtype=torch.float16)
    for i, be in enumerate(("cuda", "triton") * 2):  # the first pair warms up, the second is profiled
        torch.cuda.nvtx.range_push("probe" if i > 1 else "warm"); ops.quantize_keys(x, 2, G, backend=be)
        torch.cuda.nvtx.range_pop(); torch.cuda.synchronize()

if __name__ == "__main__":
    if "--ncu" in sys.argv: ncu_driver(); sys.exit()
    os.makedirs(OUT, exist_ok=True); res["copy_tbs"] = round(copy_bandwidth_tbs(), 3)
    y = torch.randn(1 << 31, device="cuda", dtype=torch.float16); res["read_tbs"] = round(4.295 / bench_ms(y.sum), 3); del y
    sections = os.environ.get("PROBE_SECTIONS", "ABCDQ")
    if "A" in sections:  # A: baseline against SDPA, device time per kernel
        for B, heads, T in ((1, GQA, 4096), (1, MHA, 4096), (1, MHA, 32768), (1, GQA, 32768), (1, GQA, 131072),
                            (8, GQA, 4096), (8, GQA, 32768), (1, MHA, 131072), (8, MHA, 32768)):
            for kb in (2, 4): decode("A", B, heads, T, kb, kb, ref=True)
    if "B" in sections:  # B: no tail
        for B, heads, T in ((1, GQA, 4096), (1, MHA, 4096), (1, GQA, 32768), (8, GQA, 4096)):
            decode("B", B, heads, T, rk=0, rv=0)
    if "C" in sections:  # C: split count and tail chunk knobs
        for B, heads, T, ns in ((1, GQA, 32768, (24, 45, 90)), (1, GQA, 131072, (24, 45, 90)), (8, GQA, 32768, (12, 24)),
                                (1, MHA, 32768, (9, 12, 16))):
            for n in ns: decode("C", B, heads, T, KIVI_ATTN_SPLITS=n)
        for B, heads, T in ((1, GQA, 4096), (1, MHA, 4096), (1, MHA, 32768), (8, GQA, 4096)):
            for tc in (16, 64, 192): decode("C", B, heads, T, KIVI_ATTN_TAIL_CHUNK=tc)
    if "T" in sections:  # T: Triton against CUDA where the cache is small (backend="auto" threshold)
        for B, heads, T in ((1, GQA, 1024), (1, GQA, 4096), (1, MHA, 1024), (1, MHA, 4096), (8, GQA, 4096), (1, GQA, 16384)):
            for be in ("cuda", "triton"): decode("T", B, heads, T, be=be, ref=be == "cuda")
    if "D" in sections:  # D: scalar path
        for T in (4096, 8192): decode("D", 1, GQA, T, KIVI_CUDA_GENERIC=1)
    if "Q" in sections:
        quant()
    print(f"done in {time.time() - T0:.0f} s")

#!/usr/bin/env python3
"""Smoke test of the CUDA kernels (csrc/cuda/*.cu) against kivi_ops.ops.reference; no pytest.

On a CUDA machine with the extension built (``KIVI_OPS_BUILD_CUDA=1 python setup.py build_ext --inplace``):

    python scripts/cuda_smoke.py            # correctness: every op, fast and generic CUDA paths
    python scripts/cuda_smoke.py --bench    # + decode attention timings against SDPA (flash)
    python scripts/cuda_smoke.py --only decode --paths fast

Calls ``torch.ops.kivi.*`` directly (the C++ ops, their own input checks). The generic path is
forced with the environment variable KIVI_CUDA_GENERIC=1, read at every call. Prints one line per
check: PASS/FAIL, the op, the path (fast = tensor-core / vectorized kernels where the shape allows
them, generic = scalar kernels), the case and its error; exits 1 if any check fails.
Quantize/dequantize must match the reference bit for bit; Q_MatMul and attention within the
tolerances of tests/ops (norm-wise relative error).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
RESULTS: list[bool] = []


def report(ok: bool, op: str, path: str, case: str, detail: str) -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {op:<18} {path:<7} {case:<58} {detail}", flush=True)


def set_path(path: str) -> None:
    os.environ["KIVI_CUDA_GENERIC"] = "1" if path == "generic" else "0"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    return ((got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1e-30)).item()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.uint8:
        return torch.equal(a, b)
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    nan = torch.isnan(a)  # any NaN payload is the same NaN
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(view)[~nan], b.view(view)[~nan])


def diff_detail(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.cpu().float(), b.cpu().float()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs()
    d[both_nan] = 0
    n = int((d != 0).sum() + (torch.isnan(a) != torch.isnan(b)).sum())
    return f"{n} differ, max|d|={d.nan_to_num(float('inf')).max().item():.3g}"


def guarded(fn):
    def wrapper(*args, **kw):
        try:
            fn(*args, **kw)
        except Exception as exc:  # a crash is a FAIL line, the run goes on
            report(False, fn.__name__, os.environ.get("KIVI_CUDA_GENERIC", "?"), str(args[1:])[:58],
                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            traceback.print_exc(limit=2)
            torch.cuda.synchronize()
    return wrapper


# ------------------------------------------------------------------------------------------------
# quantize / dequantize: bit for bit
# ------------------------------------------------------------------------------------------------

def cache_tensor(shape, dtype, G, special=True):
    B, H, T, D = shape
    x = torch.randn(B, H, T, D) * 2 + 0.5
    x[..., min(3, D - 1)] *= 1e3  # an outlier channel
    if special:
        x[0, 0, :G, 0] = 7.0  # a constant key group (channel 0, first G tokens)
        x[0, 0, 0, :G] = -2.5  # a constant value group (token 0, first G channels)
        x[-1, -1, G - 1, min(5, D - 1)] = float("nan")  # one NaN: its key and value groups -> NaN
        x[-1, 0, T - 1, D - 1] = float("inf")
    return x.to(dtype)


@guarded
def check_quantize(path, dtype, bits, shape, G):
    from kivi_ops.ops import reference as ref
    x = cache_tensor(shape, dtype, G)
    xc = x.cuda()
    case = f"{DT[dtype]} b{bits} {tuple(shape)} G{G}"
    for kind in ("keys", "values"):
        got = getattr(torch.ops.kivi, f"quantize_{kind}")(xc, bits, G)
        want = getattr(ref, f"quantize_{kind}")(x, bits, G)
        names = ("codes", "scale", "zero")
        bad = [f"{n}: {diff_detail(g, w)}" for n, g, w in zip(names, got, want) if not bits_equal(g, w)]
        report(not bad, f"quantize_{kind}", path, case, "bit-exact" if not bad else "; ".join(bad))
        xh = getattr(torch.ops.kivi, f"dequantize_{kind}")(*[t.cuda() for t in want], bits, G)
        xw = getattr(ref, f"dequantize_{kind}")(*want, bits, G)
        ok = bits_equal(xh, xw)
        report(ok, f"dequantize_{kind}", path, case, "bit-exact" if ok else diff_detail(xh, xw))


# ------------------------------------------------------------------------------------------------
# Q_MatMul
# ------------------------------------------------------------------------------------------------

@guarded
def check_qmatmul(path, dtype, bits, B, Hkv, n_rep, M, T, D, G):
    from kivi_ops.ops import reference as ref
    kv = torch.randn(B, Hkv, T, D, device="cuda").to(dtype)
    kp = ref.quantize_keys(kv, bits, G)
    vp = ref.quantize_values(kv, bits, G)
    q = torch.randn(B, Hkv * n_rep, M, D, device="cuda").to(dtype)
    case = f"{DT[dtype]} b{bits} B{B} Hkv{Hkv} rep{n_rep} M{M} T{T} D{D} G{G}"
    s = torch.ops.kivi.qmatmul_keys(q, *kp, bits, G)
    e = rel_err(s, ref.qmatmul_keys(q, *kp, bits, G))
    report(s.shape == (B, Hkv * n_rep, M, T) and e < TOL[dtype], "qmatmul_keys", path, case, f"rel_err {e:.2e}")
    p = torch.softmax(torch.randn(B, Hkv * n_rep, M, T, device="cuda"), -1).to(dtype)
    o = torch.ops.kivi.qmatmul_values(p, *vp, bits, G)
    e = rel_err(o, ref.qmatmul_values(p, *vp, bits, G))
    report(o.shape == (B, Hkv * n_rep, M, D) and e < TOL[dtype], "qmatmul_values", path, case, f"rel_err {e:.2e}")


# ------------------------------------------------------------------------------------------------
# decode attention
# ------------------------------------------------------------------------------------------------

def strided(t: torch.Tensor, extra: int = 5) -> torch.Tensor:
    """The same values as a slice of a longer static buffer (dims 0/1 strided, rows contiguous)."""
    B, H, R, C = t.shape
    big = torch.zeros(B, H, R + extra, C, dtype=t.dtype, device=t.device)
    big[:, :, :R] = t
    return big[:, :, :R]


@guarded
def check_decode(path, dtype, kb, vb, B, Hkv, n_rep, M, Tk, Tv, T, D, G, lengths=None, views=False, outlier=True):
    from kivi_ops.ops import reference as ref
    k = torch.randn(B, Hkv, T, D, device="cuda")
    if outlier:
        k[..., 1] *= 1e3 / 4
    v = torch.randn(B, Hkv, T, D, device="cuda")
    k, v = k.to(dtype), v.to(dtype)
    kq = ref.quantize_keys(k[:, :, :Tk].contiguous(), kb, G)
    vq = ref.quantize_values(v[:, :, :Tv].contiguous(), vb, G)
    kr, vr = k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()
    q = torch.randn(B, Hkv * n_rep, M, D, device="cuda").to(dtype)
    scale = 1 / math.sqrt(D)
    want = ref.decode_attention(q, *kq, *vq, kr, vr, kb, vb, G, scale, lengths)
    args = [*kq, *vq, kr, vr]
    if views:
        args = [strided(t) for t in args]
    got = torch.ops.kivi.decode_attention(q, *args, kb, vb, G, scale, lengths)
    e = rel_err(got, want)
    tag = f"{DT[dtype]} k{kb}v{vb} B{B} Hkv{Hkv} rep{n_rep} M{M} Tk{Tk} Tv{Tv} T{T} D{D} G{G}"
    if lengths is not None:
        tag += f" len{lengths.dtype}".replace("torch.", "")
    if views:
        tag += " views"
    ok = got.shape == q.shape and got.dtype == dtype and e < 2 * TOL[dtype]
    report(ok, "decode_attention", path, tag, f"rel_err {e:.2e}")


# ------------------------------------------------------------------------------------------------
# timings
# ------------------------------------------------------------------------------------------------

def time_cuda(fn, iters=50, warmup=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2] * 1e-3  # median, seconds


def bench():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    set_path("fast")
    print("\n# decode attention, 1 query token, G=32, R=128 residual tokens; median of 50 (CUDA events)")
    print("(* = SDPA without the flash backend)")
    print(f"{'model':<10} {'B':>2} {'T':>6} {'bits':>5} {'kivi us':>9} {'sdpa us':>9} {'speedup':>8} "
          f"{'kivi GB/s':>10} {'sdpa GB/s':>10}")
    G, Rres, D = 32, 128, 128
    for name, Hkv, n_rep in (("llama2-7b", 32, 1), ("llama3-8b", 8, 4)):
        for B in (1, 8):
            for T in (4096, 32768):
                Tk = (T // Rres) * Rres - Rres  # packed keys; the rest in the key residual
                Tv = T - Rres
                kf = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
                vf = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
                q = torch.randn(B, Hkv * n_rep, 1, D, device="cuda", dtype=torch.float16)
                label = name

                def sdpa():
                    return torch.nn.functional.scaled_dot_product_attention(q, kf, vf, enable_gqa=n_rep > 1)
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        t_sdpa = time_cuda(sdpa)
                except RuntimeError:  # no flash kernel for this call: SDPA's own choice
                    t_sdpa = time_cuda(sdpa)
                    label = name + "*"

                sdpa_bytes = kf.numel() * 2 * 2
                for kb, vb in ((2, 2), (4, 4)):
                    kc = torch.randint(0, 256, (B, Hkv, Tk * kb // 8, D), device="cuda", dtype=torch.uint8)
                    ks = torch.rand(B, Hkv, Tk // G, D, device="cuda", dtype=torch.float16) * 0.1
                    kz = -torch.rand(B, Hkv, Tk // G, D, device="cuda", dtype=torch.float16)
                    vc = torch.randint(0, 256, (B, Hkv, Tv, D * vb // 8), device="cuda", dtype=torch.uint8)
                    vs = torch.rand(B, Hkv, Tv, D // G, device="cuda", dtype=torch.float16) * 0.1
                    vz = -torch.rand(B, Hkv, Tv, D // G, device="cuda", dtype=torch.float16)
                    kr, vr = kf[:, :, Tk:].contiguous(), vf[:, :, Tv:].contiguous()
                    t = time_cuda(lambda: torch.ops.kivi.decode_attention(
                        q, kc, ks, kz, vc, vs, vz, kr, vr, kb, vb, G, 1 / math.sqrt(D), None))
                    nbytes = sum(x.numel() * x.element_size() for x in (kc, ks, kz, vc, vs, vz, kr, vr))
                    print(f"{label:<10} {B:>2} {T:>6} {f'{kb}/{vb}':>5} {t * 1e6:>9.1f} {t_sdpa * 1e6:>9.1f} "
                          f"{t_sdpa / t:>7.2f}x {nbytes / t / 1e9:>10.0f} {sdpa_bytes / t_sdpa / 1e9:>10.0f}", flush=True)
                    del kc, ks, kz, vc, vs, vz
                del kf, vf
                torch.cuda.empty_cache()
    # quantize bandwidth: 32k tokens x 32 heads x 128 fp16
    x = torch.randn(1, 32, 32768, 128, device="cuda", dtype=torch.float16)
    for kind in ("keys", "values"):
        for bits in (2, 4):
            fn = getattr(torch.ops.kivi, f"quantize_{kind}")
            t = time_cuda(lambda: fn(x, bits, 32), iters=20)
            out = fn(x, bits, 32)
            nbytes = x.numel() * 2 + sum(o.numel() * o.element_size() for o in out)
            print(f"quantize_{kind:<7} b{bits}: {t * 1e6:8.1f} us  {nbytes / t / 1e9:7.0f} GB/s (read + write)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="also time decode attention vs SDPA and quantize")
    ap.add_argument("--only", choices=("quantize", "qmatmul", "decode"), action="append")
    ap.add_argument("--paths", default="fast,generic", help="comma list of fast,generic")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("FAIL  no CUDA device")
        return 1
    from kivi_ops import _extension
    import kivi_ops.ops  # noqa: F401  (loads the extension, registers the ops)
    if not _extension.has_cuda_kernels():
        print(f"FAIL  kivi_ops._C has no CUDA kernels ({_extension.EXTENSION_ERROR or 'built without CUDA'})")
        return 1
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    only = set(args.only or ("quantize", "qmatmul", "decode"))
    t0 = time.time()
    for path in args.paths.split(","):
        set_path(path)
        if "quantize" in only:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for bits in (2, 4, 8):
                    for shape, G in (((1, 1, 32, 64), 32), ((2, 3, 96, 128), 32), ((1, 2, 256, 128), 128),
                                     ((2, 5, 64, 96), 32), ((1, 2, 128, 64), 64), ((1, 1, 48, 48), 24),
                                     ((1, 1, 64, 40), 8)):
                        check_quantize(path, dtype, bits, shape, G)
            # a large one: the shape of the bandwidth target (32k tokens x 32 heads x 128)
            check_quantize(path, torch.float16, 2, (1, 32, 4096, 128), 32)
        if "qmatmul" in only:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for bits in (2, 4, 8):
                    for shp in ((1, 1, 1, 1, 32, 64, 32), (2, 2, 3, 1, 96, 128, 32), (1, 4, 4, 8, 128, 128, 64),
                                (3, 1, 8, 2, 256, 64, 64), (1, 2, 1, 5, 160, 128, 32)):
                        check_qmatmul(path, dtype, bits, *shp)
            for bits in (2, 4):
                check_qmatmul(path, torch.float16, bits, 1, 8, 4, 1, 4096, 128, 32)
                check_qmatmul(path, torch.bfloat16, bits, 2, 4, 2, 3, 1088, 128, 64)
        if "decode" in only:
            cases = [  # B, Hkv, n_rep, M, Tk, Tv, T, D, G
                (1, 1, 1, 1, 0, 0, 7, 64, 32),
                (1, 2, 4, 1, 128, 0, 128, 128, 32),
                (2, 2, 3, 1, 256, 160, 288, 128, 32),
                (1, 1, 8, 4, 512, 389, 517, 64, 64),
                (3, 4, 1, 1, 96, 33, 150, 128, 32),
                (1, 2, 4, 8, 1024, 1000, 1100, 128, 128),
                (1, 8, 4, 1, 8192, 8128, 8200, 128, 32),  # Llama-3-like GQA, bulk + tail
                (2, 4, 1, 1, 4096, 4000, 4100, 128, 64),
                (1, 2, 4, 4, 2048, 2000, 2050, 128, 32),  # 16 query rows: two row chunks
                (1, 1, 1, 1, 64, 64, 64, 128, 32),  # exactly one tile
            ]
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for kb, vb in ((2, 2), (4, 4), (4, 2), (2, 4)):
                    for case in cases:
                        check_decode(path, dtype, kb, vb, *case)
            for kb, vb in ((2, 2), (4, 4)):  # few splits per head: blocks with the q.z table's full capacity
                check_decode(path, torch.float16, kb, vb, 8, 32, 1, 1, 16384, 16320, 16400, 128, 32)
                check_decode(path, torch.bfloat16, kb, vb, 4, 32, 1, 1, 32768, 32640, 32800, 128, 128)
            for kb, vb in ((8, 8), (2, 8)):
                check_decode(path, torch.float16, kb, vb, 2, 2, 3, 1, 256, 160, 288, 128, 32)
            for ldt in (torch.int32, torch.int64):  # ragged batch: one sequence empty (NaN output), one short
                lengths = torch.tensor([4100, 2500, 17, 0], dtype=ldt, device="cuda")
                for dtype in (torch.float16, torch.bfloat16):
                    check_decode(path, dtype, 2, 2, 4, 2, 2, 1, 4096, 4000, 4100, 128, 32, lengths=lengths)
            for dtype in (torch.float16, torch.bfloat16):  # slices of longer static buffers
                check_decode(path, dtype, 2, 2, 2, 4, 2, 1, 2048, 1984, 2100, 128, 32, views=True)
                check_decode(path, dtype, 4, 2, 2, 3, 3, 2, 1024, 1000, 1050, 64, 64, views=True)
    n_fail = RESULTS.count(False)
    print(f"\n{len(RESULTS) - n_fail} passed, {n_fail} failed in {time.time() - t0:.0f} s")
    if args.bench:
        bench()
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA quantize_keys, exactness on hard inputs and bandwidth; the proof check of its encode.

    python benchmarks/quantize_keys_exactness.py           # on the GPU (extension built with CUDA), ~10 s
    python benchmarks/quantize_keys_exactness.py --math    # CPU only (g++): the proof check of code_bits

GPU mode: codes, scales and zeros bit for bit against the reference (x1e3 outlier channels, odd
shapes, head_dim 96, G = 8..128, constant / NaN / Inf groups, values placed exactly on k + 1/2),
then % of the measured copy bandwidth on a [1, 32, 32768, 128] cache, group 32 (bytes = the input
read once + codes, scales and zeros written once, as benchmarks/bench_quantize.py).

Measured on the H200 (2026-11-29, fp16 2/4-bit, bf16 2-bit, % of copy): the column kernel 88.0 /
87.5 / 88.4; the vector kernel it replaced 33.7 / 37.0 / 32.4; two more variants tried then
(16 tokens per thread: ~80 %; a cp.async-staged persistent version: ~85 %) were dropped.
ptxas -v (nvcc 13.0, sm_90): column kernel 64 registers (launch bounds 256 x 4), no spill; ~755 SASS
per 64 elements: 8 per code (cvt, sub, mul, 2 fma, add, add.rm, shift-add), the rest loads,
min/max, 2 group_params, stores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `benchmarks.`

G = 32


def same(got, want) -> bool:
    """Bit-identical codes, scales and zeros (NaN scales compare by their bits)."""
    for g, w in zip(got, want):
        g = g.cpu()
        if g.dtype != w.dtype or g.shape != w.shape:
            return False
        if g.is_floating_point():
            g, w = g.view(torch.int16 if g.element_size() == 2 else torch.int32), w.view(
                torch.int16 if w.element_size() == 2 else torch.int32)
        if not torch.equal(g, w):
            return False
    return True


def cases():
    """(name, x, group): outlier channels, odd shapes and group sizes, constant, non-finite and tied groups."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(1, 32, 32768, 128, generator=gen)
    big[..., [3, 77, 100]] *= 1e3  # outlier channels, as keys have
    out = [("big", big, G)]
    for shape, g in (((2, 3, 96, 64), 32), ((1, 1, 32, 128), 32), ((2, 5, 64, 96), 32), ((1, 2, 256, 128), 64),
                     ((3, 1, 256, 64), 128), ((1, 3, 48, 128), 16), ((1, 2, 64, 128), 8)):
        out.append((f"{list(shape)}/G{g}", torch.randn(*shape, generator=gen) * 2 + 0.5, g))
    sp = torch.randn(1, 4, 128, 128, generator=gen)
    sp[0, 0, 0:32] = 3.140625           # constant groups: scale 0, codes 0
    sp[0, 1, 32:64, 5] = -7.5
    sp[0, 2, 64 + 3, 7] = float("nan")  # one NaN group
    sp[0, 3, 96 + 1, 9] = float("inf")  # one Inf group
    k = torch.arange(32.0)
    sp[0, 3, 0:32, 11] = (k % 7) * 0.5        # 2-bit scale 1: (x - z) / s hits every k + 1/2 exactly
    sp[0, 3, 0:32, 12] = (k % 31) * 0.125     # 4-bit scale 1/4: the same
    sp[0, 3, 0:32, 13] = (k * 16 + 1) / 32    # 8-bit scale 1/16: every element a tie...
    sp[0, 3, 0, 13], sp[0, 3, 31, 13] = 0.0, 510 / 32  # ...once lo = 0 and hi = 255/16
    out.append(("special", sp, G))
    return out


def run_kernel(inputs, refs, copy_tbs, ops, bench_ms, tensor_bytes):
    bad = []
    for (name, dtype, bits), want in refs.items():
        x, g = inputs[name, dtype]
        if not same(ops.quantize_keys(x, bits, g, backend="cuda"), want):
            bad.append(f"{name} {str(dtype)[6:]} {bits}b")
    times = []
    for dtype, bits in ((torch.float16, 2), (torch.float16, 4), (torch.bfloat16, 2)):
        x, _ = inputs["big", dtype]
        n_bytes = tensor_bytes(x, *ops.quantize_keys(x, bits, G, backend="cuda"))
        ms = bench_ms(lambda: ops.quantize_keys(x, bits, G, backend="cuda"))
        tbs = n_bytes / (ms * 1e-3) / 1e12
        times.append(f"{str(dtype)[6:]} {bits}b {ms * 1e3:6.1f} us {tbs:4.2f} TB/s {100 * tbs / copy_tbs:5.1f} %")
    exact = "exact" if not bad else "MISMATCH: " + ", ".join(bad)
    print(f"cuda quantize_keys | {exact} | " + " | ".join(times), flush=True)
    return not bad


def main_gpu() -> int:
    from benchmarks.common import bench_ms, copy_bandwidth_tbs, tensor_bytes
    from kivi_ops import ops

    t0 = time.time()
    copy_tbs = copy_bandwidth_tbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_tbs:.2f} TB/s (read + write); "
          f"timed: [1, 32, 32768, 128], group {G}; % = of copy", flush=True)
    inputs, refs = {}, {}
    for name, x, g in cases():
        for dtype in (torch.float16, torch.bfloat16):
            inputs[name, dtype] = (x.to(dtype).cuda(), g)
            for bits in ((2, 4) if name == "big" else (2, 4, 8)):
                xr = inputs[name, dtype][0] if name == "big" else inputs[name, dtype][0].cpu()  # big: reference on GPU
                refs[name, dtype, bits] = tuple(t.cpu() for t in ops.quantize_keys(xr, bits, g, backend="reference"))
    ok = run_kernel(inputs, refs, copy_tbs, ops, bench_ms, tensor_bytes)
    print(f"done in {time.time() - t0:.0f} s; {'exact' if ok else 'NOT EXACT'}")
    return 0 if ok else 1


# code_bits (csrc/cuda/quantize.cu) on the host: q = fma(fma(-q0, s, d), inv, q0), q0 = d * inv, inv = RN(1/s)
# must equal RN(d / s) (hence the reference's code) for every scale with <= 11 significant bits in
# [2^-100, 2^100]. Every float16 scale and every bfloat16 mantissa there, d within 40/24 ulps of each
# rounding boundary (k + 1/2) s for k = 0..255 and of (1/2 - 2^-25) s, plus random d: ~1.7e9 checks, ~10 s.
MATH_CHECK = r"""
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static long long n = 0, bad = 0;
static void check(float d, float s, float inv) {
  if (!(d >= 0)) return;
  const float q0 = d * inv, q = std::fmaf(std::fmaf(-q0, s, d), inv, q0), want = d / s;
  const bool code_ok = want >= 1024.f || std::floor(q + 0.5f) == std::floor(want + 0.5f);
  ++n;
  if ((want >= 0.25f && f2u(q) != f2u(want)) || !code_ok) { if (bad++ < 10) printf("d=%a s=%a q=%a want=%a\n", d, s, q, want); }
}
static void scale(float s, std::mt19937& rng, int span) {
  const float inv = 1.0f / s;
  for (int k = 0; k <= 256; ++k) {
    const float b = k < 256 ? (float)((k + 0.5) * (double)s) : (float)((0.5 - std::ldexp(1.0, -25)) * (double)s);
    for (int u = -span; u <= span; ++u) check(u2f(f2u(b) + u), s, inv);
  }
  std::uniform_real_distribution<double> U(0, 256);
  for (int i = 0; i < 64; ++i) check((float)(U(rng) * s), s, inv);
}
int main() {
  std::mt19937 rng(1);
  for (uint32_t h = 1; h < 0x7C00; ++h) {
    const uint32_t e = (h >> 10) & 31, m = h & 1023;
    scale((float)(e ? std::ldexp(1024 + m, (int)e - 25) : std::ldexp(m, -24)), rng, 40);
  }
  for (int e = -100; e <= 100; ++e)
    for (uint32_t m = 0; m < 128; ++m) scale((float)std::ldexp(128 + m, e - 7), rng, 24);
  printf("%lld checks, %lld wrong\n", n, bad);
  return bad != 0;
}
"""


def main_math() -> int:
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "check.cpp"), os.path.join(d, "check")
        with open(src, "w") as f:
            f.write(MATH_CHECK)
        # no contraction: each operation rounds once, as the __*_rn intrinsics do on the GPU
        subprocess.run(["g++", "-O2", "-ffp-contract=off", "-o", exe, src], check=True)
        return subprocess.run([exe]).returncode


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math", action="store_true", help="CPU: check code_bits' exactness argument (needs g++)")
    args = parser.parse_args()
    raise SystemExit(main_math() if args.math else main_gpu())

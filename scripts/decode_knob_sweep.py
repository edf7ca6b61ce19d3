"""Sweep the decode kernel's split knobs (tail chunk, bulk splits) on the GPU: one line per setting.

Uses benchmarks/perf_probe.py's `decode` (CUDA-graph time with the inputs cycled past L2, device time
per kernel, error against the default plan). Writes $OUT/probe.json and prints each row.
"""
import os
import sys

os.environ.setdefault("PROBE_BUDGET_S", "400")
from benchmarks.perf_probe import GQA, MHA, decode  # noqa: E402

if "--apart" in sys.argv:  # the tail-apart choice of the split planner, both ways, where it is close
    for B, heads, T in ((1, GQA, 4096), (1, GQA, 16384), (1, GQA, 32768), (1, MHA, 4096), (1, MHA, 32768), (8, GQA, 4096),
                        (1, GQA, 131072)):
        decode("plan", B, heads, T)
        for apart in (0, 1):
            decode("apart", B, heads, T, KIVI_ATTN_TAIL_APART=apart)
    sys.exit()

SHAPES = [(1, MHA, 32768), (8, MHA, 32768), (1, GQA, 32768), (8, GQA, 32768), (1, MHA, 131072), (1, GQA, 131072),
          (1, GQA, 4096), (8, GQA, 4096), (1, MHA, 4096)]
for B, heads, T in SHAPES:
    decode("base", B, heads, T, ref=True)
    for tc in (32, 64, 128):
        decode("tail", B, heads, T, KIVI_ATTN_TAIL_CHUNK=tc)
for B, heads, T, splits in ((1, MHA, 32768, (8, 10, 11)), (1, GQA, 32768, (30, 40, 45)), (8, GQA, 32768, (4, 6, 8))):
    for n in splits:
        decode("splits", B, heads, T, KIVI_ATTN_SPLITS=n, KIVI_ATTN_TAIL_CHUNK=64)
decode("base", 8, MHA, 32768, 4, 4, ref=True)
decode("tail", 8, MHA, 32768, 4, 4, KIVI_ATTN_TAIL_CHUNK=128)

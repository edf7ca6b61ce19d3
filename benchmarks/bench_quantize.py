"""Quantize bandwidth on the GPU: a 32k-token, 32-head, 128-dim fp16 cache, keys and values,
2 and 4 bits, CUDA and Triton, against the copy bandwidth measured in the same run.

bytes = the fp16 input read once + the packed codes, scales and zeros written once.
Target (issue 2): >= 60 % of the measured copy bandwidth.

Two times per row: "eager" (one public-op call per iteration, L2 flushed, host launch cost
included when it exceeds the GPU time) and "graph" (the same call replayed from a CUDA graph: the
kernel's own time, as a compiled decode loop with mode="reduce-overhead" runs it).

    python benchmarks/bench_quantize.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import bench_graph_ms, bench_ms, copy_bandwidth_tbs, run_header, tensor_bytes
from kivi_ops import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    copy_tbs = copy_bandwidth_tbs()
    x = torch.randn(1, 32, args.tokens, 128, device="cuda", dtype=torch.float16)
    rows = []
    for kind, quantize in (("keys", ops.quantize_keys), ("values", ops.quantize_values)):
        for bits in (2, 4):
            for backend in ("cuda", "triton", "reference"):
                out = quantize(x, bits, 32, backend=backend)
                n_bytes = tensor_bytes(x, *out)
                call = lambda: quantize(x, bits, 32, backend=backend)  # noqa: E731
                ms = bench_ms(call)
                graph_ms = bench_graph_ms(call) if backend != "reference" else float("nan")
                tbs, graph_tbs = (n_bytes / (t * 1e-3) / 1e12 for t in (ms, graph_ms))
                rows.append(dict(kind=kind, bits=bits, backend=backend, ms=ms, graph_ms=graph_ms, mbytes=n_bytes / 1e6,
                                 tbs=tbs, pct_copy=100 * tbs / copy_tbs, graph_pct_copy=100 * graph_tbs / copy_tbs))
                print(f"{kind:6s} {bits}b {backend:9s} eager {ms:7.3f} ms {100 * tbs / copy_tbs:5.1f} % of copy, "
                      f"graph {graph_ms:7.3f} ms {100 * graph_tbs / copy_tbs:5.1f} %")

    lines = ["# Quantize bandwidth: 1 x 32 heads x %d tokens x 128, fp16, group 32\n" % args.tokens, run_header(),
             f"- measured copy bandwidth (read + write): {copy_tbs:.2f} TB/s\n",
             "| tensor | bits | backend | eager ms | bytes moved (MB) | eager TB/s | eager % of copy | graph ms | "
             "graph % of copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['bits']} | {r['backend']} | {r['ms']:.3f} | {r['mbytes']:.1f} | {r['tbs']:.2f} | "
              f"{r['pct_copy']:.0f} % | {r['graph_ms']:.3f} | {r['graph_pct_copy']:.0f} % |" for r in rows]
    with open(os.path.join(args.out, "quantize.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "quantize.json"), "w") as f:
        json.dump(dict(copy_tbs=copy_tbs, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

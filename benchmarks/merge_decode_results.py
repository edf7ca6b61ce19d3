"""One decode-attention table and plot from several bench_decode_attention.py runs.

A GPU call is limited to 10 minutes, so the full grid (2 shapes x batch 1/8/32 x 1k..128k x 2/4
bits) is measured in parts. Every row keeps its run (commit, date) and its SDPA baseline from the
same run; ratios are never formed across runs.

    python benchmarks/merge_decode_results.py OUT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode_attention import plot  # noqa: E402


def load(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "decode_attention.json")) as f:
        rows = json.load(f)["rows"]
    with open(os.path.join(run_dir, "decode_attention.md")) as f:
        header = f.read()
    commit = re.search(r"commit: ([\w+-]+)", header).group(1)
    date = re.search(r"date: ([\d-]+ [\d:]+)", header).group(1)
    for r in rows:
        r["source"] = f"{commit} ({date} UTC)"
    return rows


def main() -> None:
    out_dir, runs = sys.argv[1], sys.argv[2:]
    rows = [r for d in runs for r in load(d)]
    rows.sort(key=lambda r: (r["shape"], r["B"], r["T"], r["bits"]))
    lines = ["# Decode attention, fused KIVI (CUDA) vs fp16 SDPA (flash): the full grid\n",
             "Merged from the runs listed per row (each row's SDPA baseline is from its own run; same GPU, "
             "torch 2.11.0+cu130, Triton 3.6.0). Times: CUDA-graph replay, inputs cycled past L2. "
             "Bytes and columns as in bench_decode_attention.py.\n",
             "| shape | B | T | bits | SDPA ms | cuda ms | speedup | cuda TB/s | % of SDPA BW | run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['B']} | {r['T']} | {r['bits']} | {r['sdpa_ms']:.3f} | {r['cuda_ms']:.3f} | "
                     f"{r['cuda_speedup']:.2f}x | {r['cuda_tbs']:.2f} | {100 * r['cuda_tbs'] / r['sdpa_tbs']:.0f} % | "
                     f"{r['source']} |")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_attention_full.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out_dir, rows, ["cuda"])
    os.replace(os.path.join(out_dir, "decode_attention.png"), os.path.join(out_dir, "decode_attention_full.png"))
    print(f"{len(rows)} rows -> {out_dir}/decode_attention_full.md, decode_attention_full.png")


if __name__ == "__main__":
    main()

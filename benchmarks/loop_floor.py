"""What the decode loop's own throughput allows: the "loop floor" of every long-context row of a
decode-attention grid (``benchmarks/bench_decode_attention.py``'s JSON), against the issue-4 budget.

For each (shape, bits), the loop's best time per (64-token tile, KV head) is taken from the rows
whose grid is full (batch >= 8, >= 32k tokens): there the fixed costs (launch, prologue, tail,
merges, combine, one-round occupancy) are amortized over many tiles per warp. A row's loop floor
is its tile count x that best time: what the same loop would take with every fixed cost removed.
The budget is SDPA's time / 4 at 2 bits and / 2.5 at 4 bits (issue 4's targets). floor / budget
> 1 means no schedule of this loop reaches the target: the loop itself needs fewer cycles per tile.

    python benchmarks/loop_floor.py benchmarks/results/2026-11-29-h200-9e25cd9/grid/decode_attention*.json
"""

from __future__ import annotations

import argparse
import json

TILE = 64
KV_HEADS = {"llama2": 32, "llama3": 8}  # shape names of bench_decode_attention.py start with these
TARGET = {"K2V2": 4.0, "K4V4": 2.5}


def load_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [r for r in json.load(f)["rows"] if r.get("cuda_ms") is not None]
    return rows


def tile_heads(row: dict) -> float:
    return row["B"] * KV_HEADS[row["shape"][:6]] * row["T"] / TILE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="bench_decode_attention.py JSON files (batch 1/8, batch 32)")
    args = ap.parse_args()
    rows = [r for r in load_rows(args.json) if r["bits"] in TARGET]
    best: dict[tuple, float] = {}
    for r in rows:
        if r["B"] >= 8 and r["T"] >= 32768:
            key = (r["shape"], r["bits"])
            best[key] = min(best.get(key, float("inf")), r["cuda_ms"] * 1e6 / tile_heads(r))
    print("| shape | B | T | bits | now us (speedup) | ns per tile-head | best ns | budget us | loop floor us | "
          "floor / budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["shape"], r["bits"])
        if r["T"] < 32768 or key not in best:
            continue
        budget = r["sdpa_ms"] * 1e3 / TARGET[r["bits"]]
        floor = tile_heads(r) * best[key] / 1e3
        now = f"{r['cuda_ms'] * 1e3:.1f} ({r['cuda_speedup']:.2f}x)"
        print(f"| {r['shape']} | {r['B']} | {r['T']} | {r['bits']} | {now} | "
              f"{r['cuda_ms'] * 1e6 / tile_heads(r):.2f} | {best[key]:.2f} | {budget:.1f} | {floor:.1f} | "
              f"{floor / budget:.2f} |")


if __name__ == "__main__":
    main()

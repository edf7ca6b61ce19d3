"""A markdown A/B table from bench_decode_attention.py runs of one GPU call (different builds or knobs).

gpu_check.sh's `ab` stage writes the default build's quick grid to $OUT/bench and the variants' to
$OUT/bench_ab, $OUT/bench_ab2. This prints, per row, each run's CUDA kernel time, its ratio to the
first run's, and each run's speedup over the SDPA measured in that same run:

    python benchmarks/ab_decode_results.py "before=OUT/bench_ab" "after=OUT/bench" [label=DIR ...]

Compare only runs of one call (one machine): between calls SDPA itself moves by up to 10 %.
"""

from __future__ import annotations

import json
import os
import sys


def row_key(r: dict) -> tuple:
    """(shape, batch, context, bits) of a result row: 'MHA B1 32k 2/2'."""
    shape = "GQA" if "GQA" in r["shape"] else "MHA"
    bits = r["bits"].replace("K", "").replace("V", "/")
    return shape, r["B"], r["T"], bits


def load(run_dir: str) -> dict[tuple, dict]:
    with open(os.path.join(run_dir, "decode_attention.json")) as f:
        return {row_key(r): r for r in json.load(f)["rows"] if "cuda_ms" in r}


def ab_table(runs: list[tuple[str, dict[tuple, dict]]]) -> str:
    """runs: (label, rows) pairs, the first the baseline. Rows missing from any run are left out."""
    base_label, base = runs[0]
    keys = [k for k in base if all(k in rows for _, rows in runs[1:])]
    head = ["row", f"{base_label} us"]
    for label, _ in runs[1:]:
        head += [f"{label} us", f"{label} / {base_label}"]
    head += ["speedup over SDPA: " + " -> ".join(label for label, _ in runs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        t0 = base[k]["cuda_ms"] * 1e3
        cells = [f"{k[0]} B{k[1]} {k[2] // 1024}k {k[3]}", f"{t0:.2f}"]
        for _, rows in runs[1:]:
            t = rows[k]["cuda_ms"] * 1e3
            cells += [f"{t:.2f}", f"{t / t0:.3f}"]
        cells.append(" -> ".join(f"{rows[k]['cuda_speedup']:.2f}x" for _, rows in runs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv):
        sys.exit(__doc__)
    runs = [(label, load(path)) for label, path in (a.split("=", 1) for a in argv)]
    print(ab_table(runs))


if __name__ == "__main__":
    main(sys.argv[1:])

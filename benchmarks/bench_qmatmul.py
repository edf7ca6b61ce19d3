"""Q_MatMul on the GPU: kivi::qmatmul_keys / qmatmul_values (CUDA) against the fp16 matmul over the
full-precision cache and against the unfused path (dequantize, then matmul), in one run.

One decode step's two products at M = 1 query token: scores = q [B, Hq, 1, D] @ K^T and
out = p [B, Hq, 1, T] @ V, with grouped-query heads (query head h reads KV head h // (Hq / Hkv)).
The fp16 baseline views q as [B, Hkv, Hq/Hkv, D], so it reads each KV head once, like the op.
Each row: CUDA-graph time per call (inputs cycled past the 60 MB L2), the bytes the kernel must
move (packed cache + q or p + the output), achieved TB/s, speedup over the fp16 matmul, and the
relative error against the fp16 matmul over the dequantized cache.

    python benchmarks/bench_qmatmul.py --out benchmarks/results [--quick] [--ab KIVI_ATTN_PDL=0 ...]

--ab NAME=VALUE (repeatable): also time the KIVI op with that environment variable set (the host
reads its knobs at every call), in the same run: one more column per setting, "ms" and "new/old"
(the default's time over the setting's), for same-run A/B of a runtime knob.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

from benchmarks.common import copy_bandwidth_tbs, graph_ms, rel_err, run_header, tensor_bytes
from kivi_ops import ops

SHAPES = {"llama2-7b (MHA 32x128)": (32, 32, 128), "llama3-8b (GQA 32/8x128)": (32, 8, 128)}
SHAPE_NAMES = {"mha": "llama2-7b (MHA 32x128)", "gqa": "llama3-8b (GQA 32/8x128)"}  # --shapes
G = 32


def grouped_matmul(a, b):
    """a [B, Hq, 1, X] @ b [B, Hkv, X, Y] without repeating b's heads -> [B, Hq, 1, Y]."""
    B, Hq, _, X = a.shape
    return (a.view(B, b.shape[1], Hq // b.shape[1], X) @ b).view(B, Hq, 1, -1)


@contextlib.contextmanager
def env_setting(setting: str):
    """Sets NAME=VALUE in os.environ for the block (the CUDA host reads its knobs at each call)."""
    name, value = setting.split("=", 1)
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def measure(shape, B, Hq, Hkv, D, T, bits, ab=()) -> list[dict]:
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    kq, vq = ops.quantize_keys(k, bits, G), ops.quantize_values(v, bits, G)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    p = torch.softmax(torch.randn(B, Hq, 1, T, device="cuda"), -1).half()
    kt = k.transpose(-1, -2)  # [B, Hkv, D, T]: the fp16 baseline reads K in its cache layout
    rows = []
    for op, x, packed, fp16_b, fused, unfused in (
        ("keys", q, kq, kt, lambda x, c, s, z: ops.qmatmul_keys(x, c, s, z, bits, G, backend="cuda"),
         lambda x, c, s, z: grouped_matmul(x, ops.dequantize_keys(c, s, z, bits, G).transpose(-1, -2))),
        ("values", p, vq, v, lambda x, c, s, z: ops.qmatmul_values(x, c, s, z, bits, G, backend="cuda"),
         lambda x, c, s, z: grouped_matmul(x, ops.dequantize_values(c, s, z, bits, G))),
    ):
        out = fused(x, *packed)
        want = unfused(x, *packed)
        fp16_bytes = tensor_bytes(x, fp16_b, out)
        kivi_bytes = tensor_bytes(x, *packed, out)
        fp16_ms = graph_ms(grouped_matmul, (x, fp16_b), tensor_bytes(x, fp16_b))
        kivi_ms = graph_ms(fused, (x, *packed), tensor_bytes(x, *packed))
        unfused_ms = graph_ms(unfused, (x, *packed), tensor_bytes(x, *packed))
        row = dict(shape=shape, op=op, B=B, T=T, bits=bits, fp16_ms=fp16_ms, kivi_ms=kivi_ms,
                   unfused_ms=unfused_ms, fp16_mb=fp16_bytes / 1e6, kivi_mb=kivi_bytes / 1e6,
                   fp16_tbs=fp16_bytes / fp16_ms / 1e9, kivi_tbs=kivi_bytes / kivi_ms / 1e9,
                   speedup=fp16_ms / kivi_ms, unfused_speedup=fp16_ms / unfused_ms,
                   rel_err=rel_err(out, want))
        for setting in ab:
            with env_setting(setting):
                row[f"ms {setting}"] = graph_ms(fused, (x, *packed), tensor_bytes(x, *packed))
                row[f"rel_err {setting}"] = rel_err(fused(x, *packed), want)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    return rows


def write_results(out_dir, rows, copy_tbs, ab=()) -> None:
    with open(os.path.join(out_dir, "qmatmul.json"), "w") as f:
        json.dump(dict(header=run_header(), copy_tbs=copy_tbs, ab=list(ab), rows=rows), f, indent=1)
    head = ["shape", "op", "B", "T", "bits", "fp16 ms", "fp16 TB/s", "KIVI ms", "KIVI TB/s", "speedup",
            "unfused speedup", "rel. error", "fp16 MB", "KIVI MB"]
    head += [f"{label} {setting}" for setting in ab for label in ("ms", "new/old")]
    lines = ["# Q_MatMul: KIVI (CUDA) vs fp16 matmul vs unfused\n", run_header(), "",
             f"- measured copy bandwidth (read + write): {copy_tbs:.2f} TB/s",
             "- bytes: the packed cache (codes, scales, zeros) or fp16 K/V, plus q or p and the output",
             "- ms: CUDA-graph replay, inputs cycled past L2; rel. error: against fp16 matmul over the "
             "dequantized cache", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['op']} | {r['B']} | {r['T']} | {r['bits']} | {r['fp16_ms']:.4f} | "
                     f"{r['fp16_tbs']:.2f} | {r['kivi_ms']:.4f} | {r['kivi_tbs']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['unfused_speedup']:.2f}x | {r['rel_err']:.1e} | {r['fp16_mb']:.0f} | {r['kivi_mb']:.0f} |"
                     + "".join(f" {r[f'ms {a}']:.4f} | {r['kivi_ms'] / r[f'ms {a}']:.3f} |" for a in ab))
    with open(os.path.join(out_dir, "qmatmul.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, contexts 4k and 32k only")
    parser.add_argument("--ab", action="append", default=[], metavar="NAME=VALUE",
                        help="also time KIVI with this environment variable set (repeatable)")
    parser.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    parser.add_argument("--contexts", nargs="+", type=int, help="override the context lengths")
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4], choices=[2, 4])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPE_NAMES), default=list(SHAPE_NAMES),
                        help="Llama-2-7B (MHA) and/or Llama-3-8B (GQA) heads")
    args = parser.parse_args()
    for setting in args.ab:
        if "=" not in setting:
            parser.error(f"--ab expects NAME=VALUE, got {setting!r}")
    if not ops._extension.has_cuda_kernels():
        raise SystemExit("bench_qmatmul.py needs the CUDA kernels (build with KIVI_OPS_BUILD_CUDA=1)")
    os.makedirs(args.out, exist_ok=True)
    batches = args.batches or ((1, 8) if args.quick else (1, 8, 32))
    contexts = args.contexts or ((4096, 32768) if args.quick else (1024, 4096, 32768, 131072))
    copy_tbs = copy_bandwidth_tbs()
    rows = []
    for shape in (name for key, name in SHAPE_NAMES.items() if key in args.shapes):
        Hq, Hkv, D = SHAPES[shape]
        for B in batches:
            for T in contexts:
                if 6 * B * Hkv * T * D * 2 > torch.cuda.get_device_properties(0).total_memory * 0.6:
                    print(f"skip {shape} B={B} T={T}: does not fit")
                    continue
                for bits in args.bits:
                    rows += measure(shape, B, Hq, Hkv, D, T, bits, args.ab)
                    write_results(args.out, rows, copy_tbs, args.ab)  # a cut-short run keeps its rows
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

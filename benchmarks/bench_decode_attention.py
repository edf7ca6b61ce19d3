"""Decode attention on the GPU: fused KIVI (CUDA, Triton) against fp16 SDPA (flash backend) and
the unfused path (dequantize, then SDPA), all in one run.

Shapes: Llama-2-7B (32 heads x 128, MHA) and Llama-3-8B (32 query / 8 KV heads x 128); batch
1, 8, 32; context 1k to 128k (skipped where it does not fit). The KIVI cache is split as in
decoding with R = 128: keys T - 64 quantized + 64 residual, values T - 128 quantized + 128.
Each row: median time, the bytes the kernel must move (cache read once + q and output), achieved
TB/s, speedup over SDPA. Two timings: "graph" replays the call from a CUDA graph (the kernel's own
time, as a decode loop compiled with mode="reduce-overhead" runs it), cycling through enough
copies of the inputs that they never sit in the 60 MB L2; "eager" is a plain Python call
(CUDA events, L2 flushed), which includes the host-side launch cost where that dominates.

    python benchmarks/bench_decode_attention.py --out benchmarks/results [--quick] [--providers cuda]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import bench_ms, copy_bandwidth_tbs, graph_ms, rel_err, run_header, tensor_bytes
from kivi_ops import ops

SHAPES = {"llama2-7b (MHA 32x128)": (32, 32, 128), "llama3-8b (GQA 32/8x128)": (32, 8, 128)}
G, R = 32, 128


def make_inputs(B, Hq, Hkv, D, T, k_bits, v_bits):
    """Random fp16 K/V of T tokens; returns q, the fp16 K/V, and the KIVI cache pieces."""
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    Tk, Tv = T - R // 2, T - R
    k_q = ops.quantize_keys(k[:, :, :Tk].contiguous(), k_bits, G)
    v_q = ops.quantize_values(v[:, :, :Tv].contiguous(), v_bits, G)
    return q, k, v, k_q, v_q, k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()


def sdpa_on(backend: SDPBackend, q, k, v):
    """fp16 SDPA pinned to one backend (GQA native: enable_gqa where the head counts differ)."""
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])


def sdpa(q, k, v):
    """The issue-4 baseline: fp16 SDPA on the flash backend."""
    return sdpa_on(SDPBackend.FLASH_ATTENTION, q, k, v)


def sdpa_cudnn(q, k, v):
    """fp16 SDPA on the cuDNN backend: what torch.compile's decode step picks on the H200 for MHA
    (the fp16 StaticCache baseline of bench_static_cache.py). GQA runs only if cuDNN takes enable_gqa."""
    return sdpa_on(SDPBackend.CUDNN_ATTENTION, q, k, v)


def unfused(q, k_q, v_q, k_r, v_r, k_bits, v_bits):
    k = torch.cat([ops.dequantize_keys(*k_q, k_bits, G), k_r], 2)
    v = torch.cat([ops.dequantize_values(*v_q, v_bits, G), v_r], 2)
    return sdpa(q, k, v)


def fits(B, Hkv, D, T) -> bool:
    fp16_kv = 2 * B * Hkv * T * D * 2
    return 3 * fp16_kv < torch.cuda.get_device_properties(0).total_memory * 0.8


def measure(shape_name, B, Hq, Hkv, D, T, k_bits, v_bits, providers, cudnn: bool = False) -> dict:
    q, k, v, k_q, v_q, k_r, v_r = make_inputs(B, Hq, Hkv, D, T, k_bits, v_bits)
    ref = sdpa(q, k, v)
    sdpa_bytes = tensor_bytes(q, k, v, ref)
    kivi_bytes = tensor_bytes(q, *k_q, *v_q, k_r, v_r, ref)
    row = dict(shape=shape_name, B=B, T=T, bits=f"K{k_bits}V{v_bits}", fp16_mb=sdpa_bytes / 1e6,
               kivi_mb=kivi_bytes / 1e6, sdpa_ms=graph_ms(sdpa, (q, k, v), sdpa_bytes),
               sdpa_eager_ms=bench_ms(lambda: sdpa(q, k, v)))
    row["sdpa_tbs"] = sdpa_bytes / row["sdpa_ms"] / 1e9
    if cudnn:  # a second fp16 baseline, informational: the targets stay against the flash backend
        try:
            err = rel_err(sdpa_cudnn(q, k, v), ref)
            assert err < 1e-2, f"cuDNN SDPA disagrees with flash: relative error {err:.3g}"
            row["cudnn_ms"] = graph_ms(sdpa_cudnn, (q, k, v), sdpa_bytes)
        except RuntimeError as e:  # no cuDNN kernel for this shape (e.g. GQA)
            print(f"cudnn unavailable for {shape_name} B={B} T={T}: {str(e).splitlines()[0][:120]}")
            row["cudnn_ms"] = float("nan")
    for p in providers:
        def fused(q, k_q, v_q, k_r, v_r, p=p):
            return ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=k_bits, v_bits=v_bits, group_size=G, backend=p)

        want = unfused(q, k_q, v_q, k_r, v_r, k_bits, v_bits)  # same quantized cache, plain SDPA
        row[f"{p}_relerr"] = rel_err(fused(q, k_q, v_q, k_r, v_r), want)
        row[f"{p}_ms"] = graph_ms(fused, (q, k_q, v_q, k_r, v_r), kivi_bytes)
        row[f"{p}_eager_ms"] = bench_ms(lambda: fused(q, k_q, v_q, k_r, v_r))
        row[f"{p}_tbs"] = kivi_bytes / row[f"{p}_ms"] / 1e9
        row[f"{p}_speedup"] = row["sdpa_ms"] / row[f"{p}_ms"]
        row[f"{p}_eager_speedup"] = row["sdpa_eager_ms"] / row[f"{p}_eager_ms"]
        if cudnn:
            row[f"{p}_cudnn_speedup"] = row["cudnn_ms"] / row[f"{p}_ms"]
    row["unfused_ms"] = bench_ms(lambda: unfused(q, k_q, v_q, k_r, v_r, k_bits, v_bits))
    row["unfused_speedup"] = row["sdpa_eager_ms"] / row["unfused_ms"]
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def bit_widths(text: str) -> tuple[int, int]:
    """--bits item: "2" or "4" (keys and values alike) or "K/V", e.g. "2/4" -> (2, 4)."""
    parts = text.split("/")
    if len(parts) not in (1, 2) or any(p not in ("2", "4") for p in parts):
        raise argparse.ArgumentTypeError(f"expected 2, 4 or K/V with K, V in {{2, 4}}, got {text!r}")
    return int(parts[0]), int(parts[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, contexts 4k, 32k and 128k only")
    parser.add_argument("--providers", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"],
                        help="fused implementations to time (default both)")
    parser.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    parser.add_argument("--contexts", nargs="+", type=int, help="override the context lengths")
    parser.add_argument("--bits", nargs="+", type=bit_widths, default=[(2, 2), (4, 4)], metavar="B|K/V",
                        help="bit widths to time: 2 or 4 for keys and values alike, K/V (e.g. 2/4) for mixed "
                             "widths (default 2 4)")
    parser.add_argument("--cudnn", action="store_true",
                        help="also time fp16 SDPA on the cuDNN backend and each provider's speedup over it")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    batches = args.batches or ((1, 8) if args.quick else (1, 8, 32))
    contexts = args.contexts or ((4096, 32768, 131072) if args.quick else (1024, 4096, 16384, 32768, 131072))
    providers = [p for p in args.providers if p != "cuda" or ops._extension.has_cuda_kernels()]

    copy_tbs = copy_bandwidth_tbs()
    rows = []
    for shape_name, (Hq, Hkv, D) in SHAPES.items():
        for B in batches:
            for T in contexts:
                if not fits(B, Hkv, D, T):
                    print(f"skip {shape_name} B={B} T={T}: does not fit")
                    continue
                for k_bits, v_bits in args.bits:
                    rows.append(measure(shape_name, B, Hq, Hkv, D, T, k_bits, v_bits, providers, args.cudnn))
                    write_results(args.out, rows, providers, copy_tbs, with_plot=False)  # a cut-short run keeps its rows
                    torch.cuda.empty_cache()
    write_results(args.out, rows, providers, copy_tbs)


def write_results(out_dir, rows, providers, copy_tbs, with_plot: bool = True) -> None:
    cudnn = any("cudnn_ms" in r for r in rows)
    head = ["shape", "B", "T", "bits", "SDPA ms", "SDPA TB/s"] + (["cuDNN SDPA ms"] if cudnn else [])
    for p in providers:
        head += [f"{p} ms", f"{p} TB/s", f"{p} speedup", f"{p} % of SDPA BW", f"{p} eager speedup"]
        head += [f"{p} speedup over cuDNN"] if cudnn else []
    head += ["unfused (eager) speedup", "fp16 MB", "KIVI MB"]
    lines = ["# Decode attention: fused KIVI vs fp16 SDPA (flash) vs unfused\n", run_header(),
             f"- measured copy bandwidth (read + write): {copy_tbs:.2f} TB/s",
             "- bytes: the cache read once (codes, scales, zeros, residual) + q + output; "
             "SDPA: fp16 K and V + q + output",
             "- ms, TB/s, speedup: CUDA-graph replay (kernel time, inputs cycled past L2); "
             "eager speedup: plain Python calls of both\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], r["B"], r["T"], r["bits"], f"{r['sdpa_ms']:.3f}", f"{r['sdpa_tbs']:.2f}"]
        cells += [f"{r.get('cudnn_ms', float('nan')):.3f}"] if cudnn else []
        for p in providers:
            cells += [f"{r[p + '_ms']:.3f}", f"{r[p + '_tbs']:.2f}", f"{r[p + '_speedup']:.2f}x",
                      f"{100 * r[p + '_tbs'] / r['sdpa_tbs']:.0f} %", f"{r[p + '_eager_speedup']:.2f}x"]
            cells += [f"{r.get(p + '_cudnn_speedup', float('nan')):.2f}x"] if cudnn else []
        cells += [f"{r['unfused_speedup']:.2f}x", f"{r['fp16_mb']:.0f}", f"{r['kivi_mb']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(os.path.join(out_dir, "decode_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "decode_attention.json"), "w") as f:
        json.dump(dict(copy_tbs=copy_tbs, rows=rows), f, indent=1)
    if with_plot:
        plot(out_dir, rows, providers)


def plot(out_dir, rows, providers) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = providers[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    series = sorted({(r["shape"], r["B"]) for r in rows})
    colors = plt.get_cmap("tab10")
    for key in sorted({(r["shape"], r["B"], r["bits"]) for r in rows}):
        pts = sorted((r["T"], r[f"{best}_speedup"]) for r in rows if (r["shape"], r["B"], r["bits"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors(series.index(key[:2])),
                linestyle="-" if key[2] == "K2V2" else "--", label=f"{key[0]} B={key[1]} {key[2]}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"speedup of fused KIVI ({best}) over fp16 SDPA")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "decode_attention.png"), dpi=120)


if __name__ == "__main__":
    main()

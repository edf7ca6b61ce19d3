"""Shared by the benchmark scripts: timing, the measured copy bandwidth, the run's header, and the
random Llama-shaped model of the whole-model benchmarks."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def sync(device) -> None:
    """Wait for ``device`` (a torch.device or its name) when it is a GPU; nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of ``fn`` in ms: CUDA events, after warm-up, L2 flushed before each run.

    Includes the host-side launch cost when it exceeds the GPU time (eager calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph_ms(fn, rep_ms: float = 100) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph: the kernel's own time, as a decode
    loop compiled with mode="reduce-overhead" runs it (no Python or launch overhead)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


L2_FLUSH_BYTES = 256 << 20  # several times the H200's 60 MB L2


def graph_ms(call, inputs, n_bytes: int) -> float:
    """CUDA-graph time of one ``call(*inputs)`` (tensors, or tuples of tensors such as a packed
    cache), cycling through copies of the ``n_bytes`` of inputs so that L2 never holds them."""
    copies = [inputs] + [tuple(t.clone() if isinstance(t, torch.Tensor) else tuple(x.clone() for x in t)
                               for t in inputs) for _ in range(max(0, -(-L2_FLUSH_BYTES // n_bytes) - 1))]
    return bench_graph_ms(lambda: [call(*c) for c in copies]) / len(copies)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def copy_bandwidth_tbs(n_bytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_header() -> str:
    """Date, GPU, software versions and commit: every results file starts with it."""
    import triton

    # KIVI_COMMIT: the caller's commit where the checkout's .git is stale (the GPU machine's copy)
    commit = os.environ.get("KIVI_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n- GPU: {gpu}\n"
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"transformers {tf}, Python {platform.python_version()}\n- commit: {commit or 'unknown'}\n")


def add_model_args(parser) -> None:
    """The device and the random model's shape (default: Llama-3-8B's layer shape, 8 layers)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=14336)


def random_llama(args, dtype: torch.dtype, vocab: int = 32000):
    """A random Llama-shaped causal LM (shape from ``add_model_args``), sdpa attention, built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                      max_position_embeddings=1 << 18)
    with torch.device(args.device):  # initializing 1.7 B parameters on the host would take minutes
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model

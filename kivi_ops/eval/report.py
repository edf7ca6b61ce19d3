"""Write the evaluation's markdown table and plot."""

from __future__ import annotations

import os


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def markdown_table(rows: list[dict], meta: dict) -> str:
    """rows: one dict per scheme (label, ppl, dppl, agree, passkey {len: (hits, trials)}, bytes, ratio, note)."""
    lengths = sorted({n for r in rows for n in (r.get("passkey") or {})})
    head = ["scheme", "perplexity", "Δ ppl", "next-token agreement"] + [f"passkey {n // 1024}k" for n in lengths] + \
        ["KV bytes", "vs fp16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("note"):
            lines.append("| " + " | ".join([r["label"], r["note"]] + [""] * (len(head) - 2)) + " |")
            continue
        pk = [f"{r['passkey'][n][0]}/{r['passkey'][n][1]}" if n in (r.get("passkey") or {}) else "n/a"
              for n in lengths]
        lines.append("| " + " | ".join([
            r["label"], _fmt(r.get("ppl"), ".3f"),
            "—" if r.get("dppl") is None else f"{r['dppl']:+.1f} %",
            "—" if r.get("agree") is None else f"{100 * r['agree']:.1f} %",
            *pk, _fmt(r.get("bytes"), ","), "—" if r.get("ratio") is None else f"{r['ratio']:.2f}x"]) + " |")
    notes = [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Bar chart: Δ perplexity (left) and passkey accuracy by length (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("note")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    labels = [r["label"] for r in rows]
    a.bar(labels, [r.get("dppl") or 0.0 for r in rows], color="tab:blue")
    a.set_ylabel("Δ perplexity vs full precision (%)")
    a.set_title("Streaming perplexity, SmolLM2-135M")
    a.tick_params(axis="x", rotation=20, labelsize=7)
    lengths = sorted({n for r in rows for n in (r.get("passkey") or {})})
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        acc = [r["passkey"][n][0] / r["passkey"][n][1] if n in (r.get("passkey") or {}) else 0 for n in lengths]
        b.bar([j + i * width for j in range(len(lengths))], acc, width, label=r["label"])
    b.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(lengths))], [f"{n // 1024}k" for n in lengths])
    b.set_ylim(0, 1.05)
    b.set_ylabel("passkey retrieval accuracy")
    b.set_title("Passkey retrieval")
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

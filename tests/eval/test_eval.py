"""The fidelity evaluation: report formatting (fast) and the quick run on SmolLM2 in a sane band (slow)."""

import os

import pytest

from kivi_ops.eval.report import markdown_table, plot
from smollm2_model import smollm2

ROWS = [
    dict(key="fp", label="full precision", ppl=10.0, dppl=None, agree=1.0, passkey={1024: (1, 1)}, bytes=100,
         ratio=0.5),
    dict(key="kivi2", label="KIVI-2", ppl=12.5, dppl=25.0, agree=0.8, passkey={1024: (0, 1)}, bytes=20, ratio=2.5),
    dict(key="hf2", label="HF 2-bit", note="not run: neither optimum-quanto nor hqq is installed"),
]


def test_markdown_table_and_plot(tmp_path):
    md = markdown_table(ROWS, {"model": "x"})
    assert "| KIVI-2 | 12.500 | +25.0 % | 80.0 % | 0/1 | 20 | 2.50x |" in md
    assert "not run: neither optimum-quanto nor hqq is installed" in md
    plot(ROWS, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 1000


@pytest.mark.slow
def test_passkey_prompt_hides_the_key_at_the_requested_length():
    from kivi_ops.eval.data import passkey_prompt

    _, tok = smollm2()
    ids, key = passkey_prompt(tok, 1024, 0.5)
    assert 900 <= ids.shape[1] <= 1024 and key in tok.decode(ids[0]) and len(key) == 5


@pytest.mark.slow
def test_quick_eval_lands_in_a_sane_band(tmp_path):
    from kivi_ops.eval.run import run_eval

    model, tok = smollm2()
    result = run_eval(out_dir=str(tmp_path), quick=True, model=model, tokenizer=tok)
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["kivi4"]["dppl"] < 3.0, rows["kivi4"]  # DESIGN §6: +0.5 %
    assert 5.0 < rows["kivi2"]["dppl"] < 60.0, rows["kivi2"]  # DESIGN §6: +25 %
    assert rows["kivi4"]["agree"] > 0.9 and rows["kivi2"]["agree"] > 0.6
    assert rows["kivi2"]["bytes"] < rows["kivi4"]["bytes"] < rows["fp"]["bytes"]
    assert rows["fp"]["passkey"][1024] == (1, 1)
    for name in ("results.md", "results.json", "results.png"):
        assert (tmp_path / name).exists()

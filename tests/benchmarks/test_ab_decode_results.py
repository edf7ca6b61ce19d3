"""benchmarks/ab_decode_results.py: the A/B table of one GPU call's runs."""

from __future__ import annotations

import json

import pytest

from benchmarks.ab_decode_results import ab_table, load, main


def write_run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "decode_attention.json").write_text(json.dumps({"rows": rows}))
    return str(d)


def row(shape, B, T, bits, cuda_ms, speedup):
    return {"shape": shape, "B": B, "T": T, "bits": bits, "cuda_ms": cuda_ms, "cuda_speedup": speedup}


def test_ratios_are_against_the_first_run_and_rows_missing_anywhere_are_left_out(tmp_path):
    before = write_run(tmp_path, "before", [row("llama2-7b (MHA 32x128)", 1, 32768, "K2V2", 0.050, 3.0),
                                            row("llama3-8b (GQA 32/8x128)", 8, 4096, "K4V4", 0.020, 1.5)])
    after = write_run(tmp_path, "after", [row("llama2-7b (MHA 32x128)", 1, 32768, "K2V2", 0.045, 3.3)])
    table = ab_table([("before", load(before)), ("after", load(after))])
    lines = table.splitlines()
    assert lines[0] == "| row | before us | after us | after / before | speedup over SDPA: before -> after |"
    assert lines[2] == "| MHA B1 32k 2/2 | 50.00 | 45.00 | 0.900 | 3.00x -> 3.30x |"
    assert len(lines) == 3  # the GQA row is in one run only


def test_arguments_need_a_label_each(tmp_path, capsys):
    run = write_run(tmp_path, "r", [row("llama2-7b (MHA 32x128)", 1, 4096, "K2V2", 0.018, 1.5)])
    with pytest.raises(SystemExit):
        main([run, run])
    main([f"a={run}", f"b={run}"])
    assert "| MHA B1 4k 2/2 | 18.00 | 18.00 | 1.000 | 1.50x -> 1.50x |" in capsys.readouterr().out

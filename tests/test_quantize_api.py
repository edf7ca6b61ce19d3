"""kivi_ops.quantize_: generate uses a KIVI cache with no other change; errors at quantize_ time."""

import dataclasses
import importlib.util

import pytest
import torch
from transformers import DynamicCache

from kivi_ops.cache.transformers_cache import KIVICache, KIVILayer
from kivi_ops.config import KIVIConfig
from kivi_ops.integrations.transformers import cache_kwarg_name
from kivi_ops.models import RANDOM_ARCHS, random_model
from kivi_ops.quantize import kivi_filter_fn, quantize_, unquantize_

CFG = KIVIConfig(group_size=16, residual_length=32)


def returned_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def prompt(batch=1, T=40, pad=0):
    ids = torch.randint(1, 128, (batch, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0
        ids[-1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("arch", RANDOM_ARCHS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "padded"])
def test_generate_uses_a_kivi_cache(arch, mode):
    model = random_model(arch)
    quantize_(model, CFG)
    ids, mask = prompt(batch=1 if mode == "beam" else 3, pad=9 if mode == "padded" else 0)
    kwargs = dict(max_new_tokens=20, do_sample=mode == "sample", return_dict_in_generate=True)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kwargs)
    cache = returned_cache(out)
    assert isinstance(cache, KIVICache)
    assert out.sequences.shape[1] == 60
    N = cache.get_seq_length()
    assert N == 59 and cache.token_counts() == dict(keys_quantized=N - N % 32, keys_residual=N % 32,
                                                    values_quantized=N - 32, values_residual=32)
    assert cache.memory_footprint().total_bytes > 0


def test_greedy_generate_equals_an_explicit_cache_and_beam_search_reorders(monkeypatch):
    model = random_model("smollm2")
    ids, mask = prompt(batch=2, pad=5)
    with torch.no_grad():
        explicit = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  **{cache_kwarg_name(model): KIVICache(CFG, config=model.config)})
        quantize_(model, CFG)
        implicit = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(explicit, implicit)

    calls = []
    original = KIVILayer.reorder_cache
    monkeypatch.setattr(KIVILayer, "reorder_cache", lambda self, idx: (calls.append(1), original(self, idx)))
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=8, num_beams=2, do_sample=False)
    assert calls


def test_a_cache_passed_by_the_caller_is_left_alone():
    model = random_model("qwen2")
    quantize_(model, CFG)
    ids, _ = prompt()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True,
                             **{cache_kwarg_name(model): DynamicCache(config=model.config)})
    assert type(returned_cache(out)) is DynamicCache


def test_unquantize_restores_the_model():
    model = random_model("smollm2")
    ids, _ = prompt()
    with torch.no_grad():
        before = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        quantize_(model, CFG)
        quantize_(model, KIVIConfig(k_bits=4, v_bits=4, group_size=16, residual_length=32))  # replaces the config
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True)
        assert returned_cache(out).kivi_config.k_bits == 4
        unquantize_(model)
        after = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert type(returned_cache(after)) is DynamicCache and torch.equal(before.sequences, after.sequences)
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)


def test_models_it_cannot_serve_fail_at_quantize_time():
    with pytest.raises(ValueError, match="head_dim"):
        quantize_(random_model("smollm2"), KIVIConfig(group_size=64, residual_length=128))
    with pytest.raises(ValueError, match="generative model"):
        quantize_(torch.nn.Linear(4, 4), CFG)

    class NoAttention(torch.nn.Module):
        config = random_model("smollm2").config

        def generate(self):
            pass

    with pytest.raises(ValueError, match="no attention layers"):
        quantize_(NoAttention(), CFG)
    with pytest.raises(TypeError):
        quantize_(random_model("smollm2"), {"k_bits": 2})


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_torchao_quantize_accepts_a_kivi_config():
    from torchao.quantization import quantize_ as ao_quantize_

    cfg = dataclasses.replace(CFG)  # a config made once torchao is imported registers itself with it
    model = random_model("smollm2")
    ao_quantize_(model, cfg, filter_fn=kivi_filter_fn)
    ids, _ = prompt()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), KIVICache)
    with pytest.raises(ValueError, match="filter_fn"):
        ao_quantize_(random_model("smollm2"), cfg)  # default filter: Linear layers, not a model

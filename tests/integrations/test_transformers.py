"""The "kivi" attention function and hooks: fused decode on the packed state, fallbacks, attach/detach."""

import pytest
import torch

from kivi_ops.cache.state import KIVIState
from kivi_ops.cache.transformers_cache import KIVICache
from kivi_ops.config import KIVIConfig
from kivi_ops.integrations import transformers as kt
from kivi_ops.models import random_model

CFG = KIVIConfig(group_size=16, residual_length=32)


def run(model, ids, mask, prefill):
    cache = KIVICache(CFG, config=model.config)
    name = kt.cache_kwarg_name(model)
    outs = []
    with torch.no_grad():
        outs.append(model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], **{name: cache}).logits)
        for i in range(prefill, ids.shape[1]):
            outs.append(model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], **{name: cache}).logits)
    return torch.cat(outs, 1)


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    original = KIVIState.attend

    def attend(self, q, scale=None):
        calls.append(q.shape)
        return original(self, q, scale)

    monkeypatch.setattr(KIVIState, "attend", attend)
    return calls


def test_cache_kwarg_name_matches_the_installed_transformers():
    import inspect

    model = random_model("smollm2")
    params = inspect.signature(model.forward).parameters
    assert kt.cache_kwarg_name(model) in params


def test_fused_decode_runs_on_the_packed_state_and_matches_dequantize_then_sdpa(count_fused):
    model = random_model("smollm2")
    ids = torch.randint(1, 128, (2, 80))
    mask = torch.ones_like(ids)
    dense_path = run(model, ids, mask, 40)
    assert count_fused == []
    kt.attach(model)
    assert model.config._attn_implementation == "kivi"
    fused = run(model, ids, mask, 40)
    assert len(count_fused) == 40 * model.config.num_hidden_layers  # every decode step of every layer
    torch.testing.assert_close(fused, dense_path, atol=1e-4, rtol=1e-4)
    kt.detach(model)
    assert model.config._attn_implementation == "sdpa" and model._forward_pre_hooks == {}


def test_padded_batches_fall_back_to_masked_attention(count_fused):
    model = random_model("smollm2")
    kt.attach(model)
    ids = torch.randint(1, 128, (2, 60))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    run(model, ids, mask, 40)
    assert count_fused == []  # the fused kernel has no left-padding mask


@pytest.mark.parametrize("call", ["positional", "past_key_values_keyword"])
def test_call_arguments_reach_the_hook(call):
    # positional: input_ids, attention_mask, position_ids, cache. keyword: positional ids + the
    # past_key_values keyword, which lands in forward's **kwargs where forward names its cache
    # parameter `cache` (transformers >= 5.24); the hook must see the cache and mask either way.
    model = random_model("qwen2")
    kt.attach(model)
    ids = torch.randint(1, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = KIVICache(CFG, config=model.config)
    with torch.no_grad():
        if call == "positional":
            model(ids, mask, None, cache)
        else:
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.layers[0].padded and not cache._fused  # mask seen; post-hook cleared the forward state


def test_positional_calls_read_the_forward_signature_once_and_keep_no_model_alive():
    import gc
    import weakref

    kt._method_signature.cache_clear()
    model = random_model("qwen2")
    ids = torch.randint(1, 128, (1, 4))
    for _ in range(3):
        bound = kt._call_kwargs(model, (ids,), {"use_cache": True})
        assert bound["input_ids"] is ids and bound["use_cache"] is True
    info = kt._method_signature.cache_info()
    assert (info.misses, info.hits) == (1, 2)  # one signature per model class, not per call
    alive = weakref.ref(model)
    del model, bound
    gc.collect()
    assert alive() is None  # cached by function, so the cache holds no bound method


def test_attach_is_idempotent():
    model = random_model("smollm2")
    kt.attach(model)
    kt.attach(model)
    assert len(model._forward_pre_hooks) == 1
    kt.detach(model)
    kt.detach(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H200)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_decode_matches_dequantize_then_sdpa(dtype, count_fused):
    model = random_model("smollm2").to("cuda", dtype)
    ids = torch.randint(1, 128, (2, 90), device="cuda")
    mask = torch.ones_like(ids)
    dense_path = run(model, ids, mask, 40)
    kt.attach(model)
    fused = run(model, ids, mask, 40)
    assert len(count_fused) == 50 * model.config.num_hidden_layers
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(fused.float(), dense_path.float(), atol=tol, rtol=tol)
    from kivi_ops.quantize import quantize_

    quantize_(model, CFG)
    mask[1, :6] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert out.shape == (2, 110)

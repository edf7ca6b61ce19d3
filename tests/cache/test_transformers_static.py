"""KIVIStaticCache: the compact static KIVI cache for transformers models gives eager KIVI's tokens
(eagerly and compiled with fullgraph, without recompiles, and for left-padded batches), holds ~4x
less memory than fp16 buffers, and refuses what it cannot do with clear errors, leaving the cache
unchanged."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "passes"))

from models import assert_logits_close, cudagraph_skips, greedy, padded_batch, padded_greedy, tiny_llama  # noqa: E402

from kivi_ops.cache import KIVICache, KIVIStaticCache, static_ops  # noqa: E402
from kivi_ops.config import KIVIConfig  # noqa: E402
from kivi_ops.passes import make_kivi_backend  # noqa: E402
from kivi_ops.quantize import quantize_, unquantize_  # noqa: E402

CFG = KIVIConfig(residual_length=32)
STEPS = 30


def forward(model, ids, cache, **kwargs):
    """One forward over ``cache``, by the cache keyword this transformers version uses."""
    from kivi_ops.integrations.transformers import cache_kwarg_name

    with torch.no_grad():
        return model(ids, **{cache_kwarg_name(model): cache}, use_cache=True, **kwargs)


@pytest.fixture
def model_and_reference():
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    reference = greedy(model, KIVICache(CFG, config=model.config), ids, STEPS)  # eager, dynamic KIVI cache
    quantize_(model, CFG)
    yield model, ids, reference
    unquantize_(model)


def test_eager_decoding_matches_the_dynamic_kivi_cache(model_and_reference):
    model, ids, (ref_tokens, ref_logits) = model_and_reference
    cache = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=CFG)
    tokens, logits = greedy(model, cache, ids, STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert int(cache.layers[0].cumulative_length) == ids.shape[1] + STEPS


def test_compiled_fullgraph_matches_without_recompiles(model_and_reference):
    from torch._dynamo.utils import counters

    model, ids, (ref_tokens, ref_logits) = model_and_reference
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
    cache = KIVIStaticCache(model.config, max_cache_len=128)  # no kivi_config: quantize_'s CFG, taken when traced
    tokens, logits = greedy(compiled, cache, ids, STEPS)
    assert cache.kivi_config == CFG
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # prefill + one decode graph for all 30 steps


def test_generate_with_the_static_cache(model_and_reference):
    from kivi_ops.integrations.transformers import cache_kwarg_name

    model, ids, _ = model_and_reference
    default = model.generate(ids, max_new_tokens=20, do_sample=False)  # quantize_: a dynamic KIVICache
    static = model.generate(ids, max_new_tokens=20, do_sample=False,
                            **{cache_kwarg_name(model): KIVIStaticCache(model.config, 128, kivi_config=CFG)})
    assert torch.equal(static, default)


def test_compact_stores_hold_far_less_than_fp16_buffers():
    # Llama-3-8B-like layer at 4k tokens: 8 KV heads x 128, fp16, KIVI-2 / KIVI-4 with G 32, R 128
    full = 1 * 8 * 4096 * 128 * 2
    for bits, at_least in ((2, 4.0), (4, 2.7)):
        shape = static_ops.compact_store_shape(1, 8, 4096, 128, 2, bits, bits, 32, 128)
        assert static_ops.store_fits(shape, 2, bits, bits, 32, 128, head_dim=128) is None
        assert full / (shape[0] * shape[1] * shape[2] * shape[3] * 2) >= at_least, (bits, shape)


def test_real_cache_bytes(model_and_reference):
    model, ids, _ = model_and_reference
    cache = KIVIStaticCache(model.config, max_cache_len=1024, kivi_config=CFG)
    forward(model, ids, cache)
    layers, kv_heads, head_dim = model.config.num_hidden_layers, 2, 32
    fp32_static = layers * 2 * 1 * kv_heads * 1024 * head_dim * 4  # what transformers' StaticCache allocates
    assert cache.nbytes * 4 <= fp32_static * 1.0, (cache.nbytes, fp32_static)


def test_needs_kivi_attention():
    model = tiny_llama(num_kv_heads=2)  # not quantize_'d: plain sdpa would read the stores as keys
    cache = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=CFG)
    with pytest.raises(RuntimeError, match="quantize_"):
        forward(model, torch.zeros(1, 4, dtype=torch.long), cache)


def test_overflow_is_refused_and_leaves_the_cache_unchanged(model_and_reference):
    model, ids, _ = model_and_reference
    cache = KIVIStaticCache(model.config, max_cache_len=48, kivi_config=KIVIConfig(residual_length=32))
    forward(model, ids, cache)  # 40 of 48
    before = [(int(l.cumulative_length), l.keys.clone(), l.values.clone()) for l in cache.layers]
    with pytest.raises(ValueError, match="overflow: 40 cached \\+ 9 new tokens > max_cache_len 48"):
        forward(model, torch.zeros(1, 9, dtype=torch.long), cache)
    for (n, k, v), layer in zip(before, cache.layers):
        assert int(layer.cumulative_length) == n
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_max_cache_len_is_rounded_up_to_a_multiple_of_8():
    # the fused CUDA decode step needs 16-byte aligned store regions (a length that is a multiple of 8)
    model = tiny_llama(num_kv_heads=2)
    cache = KIVIStaticCache(model.config, max_cache_len=45, kivi_config=KIVIConfig(residual_length=32))
    assert all(layer.max_cache_len == 48 for layer in cache.layers)
    with pytest.raises(ValueError, match="positive int"):
        KIVIStaticCache(model.config, max_cache_len=0)


def test_padded_batch_matches_the_dynamic_kivi_cache(model_and_reference):
    # the dynamic KIVICache keeps pads out of key groups (tested in test_transformers_cache.py);
    # the static cache must give the same logits, and the pad token id must not matter
    model, _, _ = model_and_reference
    ids, mask = padded_batch(0)
    ref = padded_greedy(model, KIVICache(CFG, config=model.config), ids, mask, 12)
    got = padded_greedy(model, KIVIStaticCache(model.config, 128, kivi_config=CFG), ids, mask, 12)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    ids77, _ = padded_batch(77)
    other = padded_greedy(model, KIVIStaticCache(model.config, 128, kivi_config=CFG), ids77, mask, 12)
    torch.testing.assert_close(other, got, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()  # compiled with fullgraph: the pad fill runs on the device, no host sync
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
    fast = padded_greedy(compiled, KIVIStaticCache(model.config, 128, kivi_config=CFG), ids, mask, 3)
    torch.testing.assert_close(fast, ref[:3], rtol=1e-4, atol=1e-4)


def test_a_mask_that_does_not_cover_the_tokens_is_refused(model_and_reference):
    model, ids, _ = model_and_reference
    cache = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=CFG)
    with pytest.raises(ValueError, match="must cover the cached and the new tokens"):
        forward(model, ids, cache, attention_mask=torch.ones(1, ids.shape[1] - 1, dtype=torch.long))


def test_too_short_for_the_residual_is_refused(model_and_reference):
    model, ids, _ = model_and_reference
    cache = KIVIStaticCache(model.config, max_cache_len=16, kivi_config=KIVIConfig(residual_length=32))
    with pytest.raises(ValueError, match="too short"):
        forward(model, ids[:, :8], cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_reduce_overhead(dtype):
    model = tiny_llama(num_kv_heads=2).to("cuda", dtype)
    ids = torch.randint(0, 128, (1, 40), device="cuda")
    ref_tokens, ref_logits = greedy(model, KIVICache(CFG, config=model.config), ids, STEPS)
    quantize_(model, CFG)
    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend=make_kivi_backend(CFG), mode="reduce-overhead", fullgraph=True)
        # eager prefill, compiled decode: what generate does, and what marks the stores static
        cache = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=CFG)
        tokens, logits = greedy(compiled, cache, ids, STEPS, prefill_model=model, force=ref_tokens)
    finally:
        unquantize_(model)
    assert cudagraph_skips() == 0  # the decode step really ran as a CUDA graph
    assert_logits_close(logits, ref_logits, tokens, ref_tokens)


def test_without_a_kivi_config_it_takes_the_models_quantize_config():
    # quantize_(model, KIVI-4) then KIVIStaticCache(model.config, ...): the cache must be KIVI-4 too,
    # not the default KIVI-2 (a silently different cache than the one the user configured).
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg4 = KIVIConfig(k_bits=4, v_bits=4, residual_length=32)
    reference = greedy(model, KIVICache(cfg4, config=model.config), ids, 10)
    quantize_(model, cfg4)
    try:
        cache = KIVIStaticCache(model.config, max_cache_len=128)
        tokens, logits = greedy(model, cache, ids, 10)
        assert cache.kivi_config == cfg4 and all(layer.kivi_config == cfg4 for layer in cache.layers)
        assert tokens == reference[0]
        torch.testing.assert_close(logits, reference[1], rtol=1e-4, atol=1e-4)
        # an explicit kivi_config is the user's choice and stays
        explicit = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=CFG)
        forward(model, ids, explicit)
        assert explicit.kivi_config == CFG and explicit.layers[0].kivi_config == CFG
    finally:
        unquantize_(model)


def test_without_quantize_config_the_default_stays():
    from kivi_ops.integrations.transformers import attach, detach

    model = tiny_llama(num_kv_heads=2)
    attach(model)  # kivi attention and hooks, but no quantize_ config
    try:
        cache = KIVIStaticCache(model.config, max_cache_len=256)
        forward(model, torch.zeros(1, 4, dtype=torch.long), cache)
        assert cache.kivi_config == KIVIConfig()
    finally:
        detach(model)

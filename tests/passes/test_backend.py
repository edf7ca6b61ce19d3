"""kivi_backend end to end: a stock transformers model with a StaticCache, compiled with the
backend, decodes exactly like eager KIVI (the dynamic KIVICache) on the same weights."""

import gc
import warnings

import pytest
import torch

from kivi_ops.cache import KIVICache
from kivi_ops.config import KIVIConfig
from kivi_ops.passes import kivi_backend, last_rewrites, make_kivi_backend
from models import (OneLayerAttention, assert_logits_close, cudagraph_skips, greedy, padded_batch, padded_greedy,
                    tiny_llama)

CFG = KIVIConfig(residual_length=32)
STEPS = 40  # crosses a key flush (R = 32) after the 20-token prompt


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = greedy(model, KIVICache(CFG, config=model.config), ids, STEPS)
    return model, ids, ref


def test_greedy_tokens_match_eager_kivi_without_recompiles(model_and_reference):
    from transformers import StaticCache

    model, ids, (ref_tokens, ref_logits) = model_and_reference
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=128)
    with torch._dynamo.config.patch(error_on_recompile=False):
        tokens, logits = greedy(compiled, cache, ids, 2)  # prefill graph + decode graph
    assert len(last_rewrites()) == 2 and last_rewrites()[0].new_tokens == 1
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # decode must not recompile as the cache grows
        cache2 = StaticCache(config=model.config, max_cache_len=128)
        tokens, logits = greedy(compiled, cache2, ids, STEPS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # and the test can tell: a full-precision static cache decodes differently
    fp_tokens, fp_logits = greedy(model, StaticCache(config=model.config, max_cache_len=128), ids, STEPS)
    assert (fp_logits - ref_logits).abs().max() > 1e-2


def test_padded_batch_matches_eager_kivi(model_and_reference):
    # left padding: the rewritten graph keeps pad keys out of the key groups (as the dynamic cache
    # does), so a stock StaticCache compiled with the backend gives eager KIVI's logits
    from transformers import StaticCache

    from kivi_ops.quantize import quantize_, unquantize_

    model = model_and_reference[0]
    ids, mask = padded_batch(0)
    quantize_(model, CFG)  # its hooks hand the dynamic KIVICache the mask
    try:
        ref = padded_greedy(model, KIVICache(CFG, config=model.config), ids, mask, 12)
    finally:
        unquantize_(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
    got = padded_greedy(compiled, StaticCache(config=model.config, max_cache_len=128), ids, mask, 12)
    assert {r.mask for r in last_rewrites()} <= {"bool", "float"}
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the pad token id must not matter
    ids77, _ = padded_batch(77)
    other = padded_greedy(compiled, StaticCache(config=model.config, max_cache_len=128), ids77, mask, 12)
    torch.testing.assert_close(other, got, rtol=1e-5, atol=1e-5)


def test_mode_and_options_pass_through(model_and_reference):
    from transformers import StaticCache

    model, ids, (ref_tokens, _) = model_and_reference
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), options={"epilogue_fusion": False},
                             mode=None, fullgraph=True)
    tokens, _ = greedy(compiled, StaticCache(config=model.config, max_cache_len=128), ids, 8)
    assert tokens == ref_tokens[:8]


def test_default_backend_and_fallback_warning():
    # default KIVIConfig (R = 128) does not fit a 64-token cache: plain Inductor, with the reason
    mod = OneLayerAttention(max_len=64)
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend=kivi_backend, fullgraph=True)
    x = torch.randn(1, 1, 64)
    with pytest.warns(UserWarning, match="too short for residual_length 128"):
        out = compiled(x, torch.tensor([0]))
    assert last_rewrites() == []
    ref = OneLayerAttention(max_len=64)
    ref.load_state_dict(mod.state_dict())
    ref.k_cache.zero_(), ref.v_cache.zero_()
    torch.testing.assert_close(out, ref(x, torch.tensor([0])))


def test_kivi_state_follows_the_storage_not_its_address():
    """A rewritten graph's cache buffers count as KIVI state while their storage lives (any view of
    it); a new buffer at a freed buffer's address does not. Keyed by data pointer, the backend
    refused to compile such a fresh full-precision cache (an address the allocator reused)."""
    from kivi_ops.passes import backend

    memory = bytearray(4096)
    old = torch.frombuffer(memory, dtype=torch.float32)
    backend._mark_kivi_stores([old])
    assert backend._hold_kivi_state([old]) and backend._hold_kivi_state([old[16:].view(4, -1)])
    address = old.data_ptr()
    del old
    gc.collect()
    new = torch.frombuffer(memory, dtype=torch.float32)  # the same bytes, a new storage
    assert new.data_ptr() == address
    assert not backend._hold_kivi_state([new])
    backend._mark_kivi_stores([])  # forgets the freed storage
    assert all(not ref.expired() for ref in backend._KIVI_STORES)


def test_quantize_then_compile(model_and_reference):
    # torchao-style: quantize_(model, cfg), then compile with the backend and a StaticCache
    from transformers import StaticCache

    from kivi_ops.quantize import quantize_, unquantize_

    model, ids, (ref_tokens, _) = model_and_reference
    quantize_(model, CFG)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
        tokens, _ = greedy(compiled, StaticCache(config=model.config, max_cache_len=128), ids, 12)
        assert len(last_rewrites()) == 2
        assert tokens == ref_tokens[:12]
    finally:
        unquantize_(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduce_overhead_cuda_graphs(dtype):
    from transformers import StaticCache

    model = tiny_llama(num_kv_heads=2).to("cuda", dtype)
    ids = torch.randint(0, 128, (1, 20), device="cuda")
    ref_tokens, ref_logits = greedy(model, KIVICache(CFG, config=model.config), ids, STEPS)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), mode="reduce-overhead", fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=128)
    # buffers made (and marked static) before compiling, as generate's eager prefill would: without
    # that Inductor skips CUDA graphs ("mutated inputs") and this test would not test them
    cache.early_initialization(1, 2, 32, dtype, torch.device("cuda"))
    tokens, logits = greedy(compiled, cache, ids, STEPS, force=ref_tokens)
    assert len(last_rewrites()) == 2
    assert cudagraph_skips() == 0
    assert_logits_close(logits, ref_logits, tokens, ref_tokens)

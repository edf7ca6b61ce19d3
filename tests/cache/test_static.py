"""StaticKIVICache / kivi::static_kv_* ops: same streaming rules and outputs as the dynamic KIVIState."""

import pytest
import torch
import torch.nn.functional as F

from kivi_ops.cache.state import KIVIState
from kivi_ops.cache.static import StaticKIVICache
from kivi_ops.cache import static_ops
from kivi_ops.config import KIVIConfig

CFG = KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=64)
B, HKV, HQ, D, L = 2, 2, 4, 64, 256


def _reference_step(state: KIVIState, q, k, v):
    """What the dynamic KIVICache + sdpa compute for one forward: append, then attend."""
    was_empty = state.is_empty
    state.append(k, v)
    if was_empty:
        K, V = k, v
    else:
        K, V = state.dequantized()
    M, T = q.shape[2], K.shape[2]
    mask = torch.arange(T).view(1, -1) <= (T - M + torch.arange(M)).view(-1, 1)  # causal by position
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)


def _stream(chunks, dtype=torch.float32, config=CFG):
    cache = StaticKIVICache(1, B, HKV, L, D, config, dtype=dtype)
    state = KIVIState(config)
    errs = []
    for M in chunks:
        q, k, v = (torch.randn(B, h, M, D, dtype=dtype) for h in (HQ, HKV, HKV))
        k[:, :, :, 3] *= 8  # an outlier channel, as keys have
        pos = cache.positions(M)
        out = cache.attend(0, q, k, v, pos)
        cache.advance_(M)
        ref = _reference_step(state, q, k, v)
        errs.append((out.float() - ref.float()).abs().max().item())
    assert int(cache.length) == state.seq_length
    return errs


@pytest.mark.parametrize("prefill", [1, 5, 63, 64, 100, 150])
def test_decode_stream_matches_dynamic_cache(prefill):
    # prefill then decode across several key flushes (R = 64) and the value window sliding
    errs = _stream([prefill] + [1] * 80)
    assert max(errs) < 1e-5, errs


def test_chunked_appends_match_dynamic_cache():
    # multi-token appends into a non-empty cache (chunked prefill / speculative decoding)
    errs = _stream([20, 7, 64, 1, 33, 70, 1, 1])
    assert max(errs) < 1e-5, errs


def test_kivi4_float16():
    errs = _stream([40, 1, 1, 30, 1], dtype=torch.float16, config=KIVIConfig(4, 4, 32, 32))
    assert max(errs) < 2e-3, errs


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_decode_from_packed_state(dtype, tol):
    # decode steps attend from the packed codes in float32; the reference rounds the dequantized
    # cache to dtype first, so they differ by a few of dtype's ulps (fp16 2^-10, bf16 2^-7 at 1)
    errs = _stream([40] + [1] * 40, dtype=dtype, config=KIVIConfig(2, 2, 32, 32))
    assert max(errs) < tol, errs


def test_store_too_small_is_refused():
    with pytest.raises(ValueError, match="too short"):
        StaticKIVICache(1, 1, 2, 64, 64, KIVIConfig(residual_length=128))
    assert static_ops.store_fits((1, 2, 192, 64), 2, 2, 2, 32, 128) is None


def test_opcheck():
    cache = StaticKIVICache(1, B, HKV, L, D, CFG, dtype=torch.float32)
    cache.attend(0, *(torch.randn(B, h, 70, D) for h in (HQ, HKV, HKV)), cache.positions(70))
    cache.advance_(70)
    ks, vs = cache.stores(0)
    k, v = torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
    pos = cache.positions(1)
    torch.library.opcheck(torch.ops.kivi.static_kv_append_.default,
                          (ks.clone(), vs.clone(), k, v, pos, 2, 2, 32, 64))
    torch.library.opcheck(torch.ops.kivi.static_kv_attention.default,
                          (torch.randn(B, HQ, 1, D), ks, vs, k, v, pos, None, True, 2, 2, 32, 64, 0.125))


def _decode_step(cache, q, k, v):
    pos = cache.positions(1)
    out = cache.attend(0, q, k, v, pos)
    cache.advance_(1)
    return out


def test_compiled_decode_does_not_recompile():
    torch._dynamo.reset()
    eager = StaticKIVICache(1, B, HKV, L, D, CFG, dtype=torch.float32)
    comp = StaticKIVICache(1, B, HKV, L, D, CFG, dtype=torch.float32)
    step = torch.compile(_decode_step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(70):  # crosses a key flush at 64
            q, k, v = (torch.randn(B, h, 1, D) for h in (HQ, HKV, HKV))
            ref = _decode_step(eager, q, k, v)
            out = step(comp, q, k, v)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (runs on the H200)")
def test_cuda_graph_decode():
    cfg = KIVIConfig(residual_length=128)
    eager = StaticKIVICache(1, B, HKV, 512, D, cfg, dtype=torch.float16, device="cuda")
    comp = StaticKIVICache(1, B, HKV, 512, D, cfg, dtype=torch.float16, device="cuda")
    step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    for i in range(300):
        q, k, v = (torch.randn(B, h, 1, D, dtype=torch.float16, device="cuda") for h in (HQ, HKV, HKV))
        ref = _decode_step(eager, q, k, v)
        out = step(comp, q, k, v).clone()
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)

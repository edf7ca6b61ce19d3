"""StaticKIVICache / kivi::static_kv_* ops: same streaming rules and outputs as the dynamic KIVIState."""

import pytest
import torch
import torch.nn.functional as F

from kivi_ops.cache.state import KIVIState
from kivi_ops.cache.static import StaticKIVICache
from kivi_ops.cache import static_ops
from kivi_ops.config import KIVIConfig
from tests.conftest import requires_cuda_kernels

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


def _mask_bits_reference(mask):
    """Word w of row b holds mask[b, 32 w + j] at bit j (as int32), bits past the end 0."""
    Bm, L = mask.shape
    words = torch.zeros(Bm, (L + 31) // 32, dtype=torch.int64)
    for t in range(L):
        words[:, t // 32] |= mask[:, t].cpu().long() << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


MASK_DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]


@pytest.mark.parametrize("device", MASK_DEVICES)
@pytest.mark.parametrize("Bm, L", [(1, 1), (2, 31), (3, 32), (1, 33), (2, 100), (1, 4101)])
def test_mask_bits_packs_each_position_into_its_bit(device, Bm, L):
    g = torch.Generator().manual_seed(L)
    mask = torch.rand(Bm, L, generator=g) < 0.6
    mask[:, -1] = True  # bit 31 of a full last word: the int32 sign bit
    want = _mask_bits_reference(mask)
    got = torch.ops.kivi._mask_bits(mask.to(device))
    assert got.dtype == torch.int32 and got.device.type == device
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    # a strided view, as the cache passes it: [Bm, 1, 1, L] -> [Bm, L], and a column slice
    wide = torch.zeros(Bm, 1, 1, L + 7, dtype=torch.bool, device=device)
    wide[..., 3:L + 3] = mask.to(device).view(Bm, 1, 1, L)
    strided = wide.select(2, 0).select(1, 0)[:, 3:L + 3]
    torch.testing.assert_close(torch.ops.kivi._mask_bits(strided).cpu(), want, rtol=0, atol=0)


def test_mask_bits_opcheck_and_bad_input():
    torch.library.opcheck(torch.ops.kivi._mask_bits.default, (torch.rand(2, 70) < 0.5,))
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        torch.ops.kivi._mask_bits(torch.ones(2, 70))
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        torch.ops.kivi._mask_bits(torch.ones(2, 1, 70, dtype=torch.bool))


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


# --- the fused CUDA decode step (kivi::_static_decode_attention) --------------------------------

FUSED_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}  # P and the products round to the dtype


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _fused_and_composite(cache, q, k, v, pos, monkeypatch, mask=None):
    """One step: append, attend with the default path (fused on CUDA) and, on the same stores, with
    decode_from_packed (float32, checked against the dynamic cache above)."""
    out = cache.attend(0, q, k, v, pos, attn_mask=mask)
    with monkeypatch.context() as m:
        m.setenv("KIVI_STATIC_COMPOSITE", "1")
        ref = cache.attention(0, q, k, v, pos, attn_mask=mask)
    return out, ref


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (2, 4)])
@pytest.mark.parametrize("D, hq, hkv, G, R", [(128, 8, 2, 32, 128), (64, 4, 4, 32, 64), (128, 4, 1, 128, 128)])
def test_cuda_fused_decode_matches_composite(dtype, bits, D, hq, hkv, G, R, monkeypatch):
    _check_fused_decode_to_the_end(dtype, bits, D, hq, hkv, G, R, monkeypatch)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype, bits, D, hq, hkv, G, R", [(torch.float16, (4, 4), 128, 8, 2, 32, 128),
                                                           (torch.bfloat16, (2, 4), 128, 4, 1, 128, 128)])
def test_cuda_fused_decode_one_stage_ring_matches_composite(dtype, bits, D, hq, hkv, G, R, monkeypatch):
    """The one-stage ring (4-bit, head_dim 128; picked for long stores) in static-store mode, where
    each block finds its tiles from the device-side length: forced on a short store, one split per
    head so the warps take up to two tiles each."""
    monkeypatch.setenv("KIVI_ATTN_RING", "1")
    monkeypatch.setenv("KIVI_ATTN_SPLITS", "1")
    _check_fused_decode_to_the_end(dtype, bits, D, hq, hkv, G, R, monkeypatch)


def _check_fused_decode_to_the_end(dtype, bits, D, hq, hkv, G, R, monkeypatch):
    # prefill, then decode to the store's last position: key flushes, the value window sliding, full
    L = 512
    cache = StaticKIVICache(1, 2, hkv, L, D, KIVIConfig(*bits, G, R), dtype=dtype, device="cuda")
    n = 100
    q, k, v = (torch.randn(2, h, n, D, dtype=dtype, device="cuda") for h in (hq, hkv, hkv))
    cache.attend(0, q, k, v, cache.positions(n))
    cache.advance_(n)
    errs = []
    for _ in range(L - n):
        q, k, v = (torch.randn(2, h, 1, D, dtype=dtype, device="cuda") for h in (hq, hkv, hkv))
        k[..., 3] *= 8  # an outlier key channel
        out, ref = _fused_and_composite(cache, q, k, v, cache.positions(1), monkeypatch)
        cache.advance_(1)
        errs.append(_rel(out, ref))
    assert max(errs) < FUSED_TOL[dtype], (max(errs), errs.index(max(errs)))


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (2, 4), (8, 8)])
@pytest.mark.parametrize("D, G, R", [(128, 32, 128), (64, 64, 64)])
def test_cuda_fused_append_writes_the_composites_bytes(dtype, bits, D, G, R, monkeypatch):
    """kivi::_static_append_one_ (one kernel per decode step) against the ATen composite
    (KIVI_STATIC_APPEND_COMPOSITE=1): the same store bytes after every step, through key-group
    ends, ring wrap-around and the store's end; k, v as strided views, as transformers passes them."""
    L, n0 = 512, 37  # (8-bit keys need a store of ~4 R or more)
    caches = [StaticKIVICache(1, 2, 3, L, D, KIVIConfig(*bits, G, R), dtype=dtype, device="cuda") for _ in range(2)]
    k, v = (torch.randn(2, 3, n0, D, dtype=dtype, device="cuda") for _ in range(2))
    for c in caches:  # a multi-token prefill: the composite in both
        c.append_(0, k, v, c.positions(n0))
        c.advance_(n0)
    for step in range(L - n0):
        k, v = (torch.randn(2, 1, 3, D, dtype=dtype, device="cuda").transpose(1, 2) for _ in range(2))
        k[..., 5] *= 50  # an outlier key channel
        caches[0].append_(0, k, v, caches[0].positions(1))
        with monkeypatch.context() as m:
            m.setenv("KIVI_STATIC_APPEND_COMPOSITE", "1")
            caches[1].append_(0, k, v, caches[1].positions(1))
        for c in caches:
            c.advance_(1)
        for got, want in zip(caches[0].stores(0), caches[1].stores(0)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (step, n0 + step)


@requires_cuda_kernels
def test_cuda_decode_append_is_one_kernel():
    cache = StaticKIVICache(1, 1, 2, 512, 128, KIVIConfig(), dtype=torch.float16, device="cuda")
    k, v = (torch.randn(1, 2, 300, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    cache.append_(0, k, v, cache.positions(300))
    cache.advance_(300)
    k, v = (torch.randn(1, 2, 1, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    pos = cache.positions(1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cache.append_(0, k, v, pos)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert any("static_append_one_kernel" in name for name in names), names
    assert len(names) == 1, names


@requires_cuda_kernels
@pytest.mark.parametrize("mask_batch", [3, 1])
def test_cuda_fused_decode_with_key_mask(mask_batch, monkeypatch):
    # a bool key mask [B|1, 1, 1, L] (left padding, a hole) goes to the kernel as bits
    L, D, dtype = 512, 128, torch.float16
    cache = StaticKIVICache(1, 3, 2, L, D, KIVIConfig(2, 2, 32, 128), dtype=dtype, device="cuda")
    n = 300
    q, k, v = (torch.randn(3, h, n, D, dtype=dtype, device="cuda") for h in (4, 2, 2))
    cache.attend(0, q, k, v, cache.positions(n))
    cache.advance_(n)
    for step in range(70):
        end = n + step + 1
        mask = torch.zeros(mask_batch, 1, 1, L, dtype=torch.bool, device="cuda")
        mask[..., :end] = True
        mask[0, ..., :37] = False  # left padding of sequence 0
        mask[-1, ..., 100:170] = False  # a hole across tile and word boundaries
        q, k, v = (torch.randn(3, h, 1, D, dtype=dtype, device="cuda") for h in (4, 2, 2))
        out, ref = _fused_and_composite(cache, q, k, v, cache.positions(1), monkeypatch, mask=mask)
        cache.advance_(1)
        assert _rel(out, ref) < FUSED_TOL[dtype], step


@requires_cuda_kernels
def test_cuda_mask_bits_is_one_kernel():
    mask = torch.rand(3, 1, 1, 4096, device="cuda") < 0.5
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.kivi._mask_bits(mask.select(2, 0).select(1, 0))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(names) == 1 and "mask_bits_kernel" in names[0], names


@requires_cuda_kernels
def test_cuda_decode_step_runs_the_fused_kernel():
    cache = StaticKIVICache(1, 1, 2, 512, 128, KIVIConfig(), dtype=torch.float16, device="cuda")
    q, k, v = (torch.randn(1, h, 300, 128, dtype=torch.float16, device="cuda") for h in (8, 2, 2))
    cache.attend(0, q, k, v, cache.positions(300))
    cache.advance_(300)
    q, k, v = (torch.randn(1, h, 1, 128, dtype=torch.float16, device="cuda") for h in (8, 2, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cache.attend(0, q, k, v, cache.positions(1))
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any("attn_fused_kernel" in name for name in names), sorted(names)
    assert not any("qmatmul" in name for name in names), sorted(names)

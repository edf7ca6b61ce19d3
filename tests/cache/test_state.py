"""KIVIState: the streaming rules (token counts), numerics vs the reference ops, padding, bytes."""

import pytest
import torch

from kivi_ops.cache.state import KIVIState, fill_pad_keys
from kivi_ops.config import KIVIConfig
from kivi_ops.ops import reference as ref

G, R = 16, 32
CFG = KIVIConfig(group_size=G, residual_length=R)


def expected_counts(n):
    """DESIGN §1 after n tokens, however they were chunked."""
    kq = n - n % R
    vq = n - min(n, R)
    return kq, n - kq, vq, n - vq


def counts(s):
    return s.num_quantized_keys, s.num_residual_keys, s.num_quantized_values, s.num_residual_values


def rand_kv(B, T, H=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


@pytest.mark.parametrize("T", [1, G - 1, G, R - 1, R, R + 1, 2 * R, 2 * R + G + 3])
@pytest.mark.parametrize("n", [0, 1, R - 1, R, R + 5])
def test_counts_follow_the_rules_after_prefill_and_decode(T, n):
    s = KIVIState(CFG)
    k, v = rand_kv(1, T + n)
    s.append(k[:, :, :T], v[:, :, :T])
    assert counts(s) == expected_counts(T)
    for i in range(T, T + n):
        s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        assert counts(s) == expected_counts(i + 1)
    assert s.seq_length == T + n


def simulated(k, v, cfg=CFG):
    """What a KIVI cache of these N tokens holds, built from the reference ops in one go."""
    N = k.shape[2]
    kq, _, vq, _ = expected_counts(N)
    G, kb, vb = cfg.group_size, cfg.k_bits, cfg.v_bits
    kd = ref.dequantize_keys(*ref.quantize_keys(k[:, :, :kq], kb, G), kb, G)
    vd = ref.dequantize_values(*ref.quantize_values(v[:, :, :vq], vb, G), vb, G)
    return torch.cat([kd, k[:, :, kq:]], 2), torch.cat([vd, v[:, :, vq:]], 2)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_matches_reference_ops(bits, dtype):
    cfg = KIVIConfig(k_bits=bits, v_bits=bits, group_size=G, residual_length=R)
    s = KIVIState(cfg)
    k, v = (x.to(dtype) for x in rand_kv(2, 3 * R + 7))
    s.append(k[:, :, :50], v[:, :, :50])
    for i in range(50, k.shape[2]):
        s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    got_k, got_v = s.dequantized()
    exp_k, exp_v = simulated(k, v, cfg)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_k, exp_k, **tol)
    torch.testing.assert_close(got_v, exp_v, **tol)


def test_fused_attend_matches_dense_attention_over_dequantized():
    s = KIVIState(CFG)
    k, v = rand_kv(2, 2 * R + 5)
    s.append(k, v)
    q = torch.randn(2, 6, 1, 32)
    kd, vd = s.dequantized()
    kd, vd = kd.repeat_interleave(3, 1), vd.repeat_interleave(3, 1)
    expected = torch.softmax(q @ kd.transpose(-1, -2) / 32 ** 0.5, -1) @ vd
    torch.testing.assert_close(s.attend(q), expected, atol=1e-5, rtol=1e-5)


def test_fill_pad_keys_uses_a_real_key_of_the_same_group():
    block = torch.arange(2 * 1 * 32 * 1, dtype=torch.float32).view(2, 1, 32, 1)
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[0, :5] = False  # left padding inside group 0
    valid[1, :16] = False  # a whole group of pads
    valid[1, 16:20] = False
    out = fill_pad_keys(block, valid, 16)
    assert torch.equal(out[0, 0, :5, 0], torch.full((5,), 5.0))  # first real token of group 0
    assert torch.equal(out[0, 0, 5:, 0], block[0, 0, 5:, 0])
    assert torch.equal(out[1, 0, :16, 0], torch.zeros(16))  # an all-pad group is zeroed
    assert torch.equal(out[1, 0, 16:20, 0], torch.full((4,), block[1, 0, 20, 0].item()))
    assert torch.equal(out[1, 0, 20:, 0], block[1, 0, 20:, 0])


def test_pad_keys_never_enter_group_statistics():
    """Two states whose pad keys differ wildly hold the same codes/scales for the real tokens."""
    k, v = rand_kv(2, 2 * R + 3)
    valid = torch.ones(2, k.shape[2], dtype=torch.bool)
    valid[1, :21] = False
    k2 = k.clone()
    k2[1, :, :21] = 1000.0
    a, b = KIVIState(CFG), KIVIState(CFG)
    a.append(k, v, valid)
    b.append(k2, v, valid)
    assert torch.equal(a.k_scale, b.k_scale) and torch.equal(a.k_zero, b.k_zero)
    # real-token codes agree, and the real-token range is the real tokens' own
    ka, kb = a.dequantized()[0], b.dequantized()[0]
    assert torch.equal(ka[1, :, 21:], kb[1, :, 21:])
    assert b.k_scale.abs().max() < 10


def test_pad_bookkeeping_follows_the_residual_into_a_later_flush():
    s = KIVIState(CFG)
    k, v = rand_kv(2, R)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :4] = False
    k[0, :, :4] = 1e4  # pads with huge keys, still in the residual after the prefill
    s.append(k[:, :, :10], v[:, :, :10], valid)
    assert s.has_padding and s.num_quantized_keys == 0
    for i in range(10, R):
        s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert not s.has_padding and s.num_quantized_keys == R  # flushed, pads neutralised
    assert s.k_scale.abs().max() < 10


def storage_bytes(tensors):
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("T", [5, R, 3 * R + 1])
def test_footprint_is_exactly_the_storage_held(T):
    s = KIVIState(CFG)
    k, v = rand_kv(2, T)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :3] = False
    s.append(k, v, valid)
    s.append(*rand_kv(2, 1, seed=1))
    fp = s.footprint()
    assert fp.total_bytes == storage_bytes(s.tensors().values())
    N = T + 1
    assert fp.fp16_bytes == 2 * 2 * 2 * N * 32 * 2 and fp.dense_bytes == 2 * fp.fp16_bytes
    kq, kr, vq, vr = expected_counts(N)
    B, H, D = 2, 2, 32
    assert fp.codes_bytes == B * H * (kq + vq) * D * 2 // 8
    assert fp.scale_zero_bytes == 2 * 4 * B * H * (kq // G * D + vq * D // G)
    assert fp.residual_bytes == 4 * B * H * (kr + vr) * D


def test_invalid_appends_leave_the_state_unchanged():
    s = KIVIState(CFG)
    k, v = rand_kv(2, 40)
    s.append(k, v)
    before = {n: t.clone() for n, t in s.tensors().items()}
    bad = [
        (torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)),  # head_dim changed
        (torch.randn(3, 2, 1, 32), torch.randn(3, 2, 1, 32)),  # batch changed
        (torch.randn(2, 2, 1, 32, dtype=torch.float64), torch.randn(2, 2, 1, 32, dtype=torch.float64)),
        (torch.randn(2, 2, 1, 32), torch.randn(2, 2, 2, 32)),  # k/v disagree
        (torch.randn(2, 2, 32), torch.randn(2, 2, 32)),  # 3-D
        (torch.randn(2, 2, 1, 32).half(), torch.randn(2, 2, 1, 32).half()),  # dtype changed
    ]
    for kk, vv in bad:
        with pytest.raises((ValueError, TypeError)):
            s.append(kk, vv)
    with pytest.raises(ValueError, match="valid"):
        s.append(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of group_size"):
        KIVIState(CFG).append(torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24))
    assert s.seq_length == 40
    for n, t in s.tensors().items():
        assert torch.equal(t, before[n]), n


def test_batch_surgery_and_reset():
    s = KIVIState(CFG)
    k, v = rand_kv(3, R + 9)
    s.append(k, v)
    full = s.dequantized()
    s.index_batch(torch.tensor([2, 0]))
    got = s.dequantized()
    assert torch.equal(got[0], full[0][[2, 0]]) and torch.equal(got[1], full[1][[2, 0]])
    s.repeat_batch(2)
    assert s.dequantized()[0].shape[0] == 4 and torch.equal(s.dequantized()[0][1], full[0][2])
    s.reset()
    assert s.is_empty and s.tensors() == {} and s.footprint().total_bytes == 0

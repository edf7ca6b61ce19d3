"""KIVIState's one-kernel decode step (kivi::_dynamic_append_one_, csrc/dynamic_append.h): the same
bytes as the composite append it replaces, taken exactly where its conditions hold, and clear
errors for bad arguments. CPU here (CI); the same tests run on CUDA on the GPU machine."""

import pytest
import torch

from kivi_ops.cache.state import KIVIState
from kivi_ops.config import KIVIConfig
from tests.conftest import requires_cuda_kernels

G, R = 32, 64
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]
FIELDS = ("k_codes", "k_scale", "k_zero", "k_residual", "v_codes", "v_scale", "v_zero", "v_residual")


def projections(B, H, T, D, dtype, device, seed):
    """Keys and values as a model's projection leaves them: [B, T, H, D] transposed, not contiguous."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, D, generator=g) * 2 + 0.5
    v = torch.randn(B, T, H, D, generator=g)
    k[:, :, 0, 3] *= 1e3  # an outlier channel
    v[:, T // 3, :, :5] = 1e4  # an outlier token among the values that leave the window
    return (x.to(dtype).to(device).transpose(1, 2) for x in (k, v))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def run(cfg, k, v, prefill, fused, monkeypatch, q=None):
    """Prefill, then one token per step; returns the state and the fused steps taken."""
    taken = []
    original = KIVIState._append_one_fused

    def spy(self, key, value):
        taken.append(self.seq_length)
        return original(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(KIVIState, "_append_one_fused", spy)
        if not fused:
            m.setattr(KIVIState, "_fused_step_ok", lambda self, key, valid: False)
        s = KIVIState(cfg)
        s.append(k[:, :, :prefill], v[:, :, :prefill])
        outs = []
        for i in range(prefill, k.shape[2]):
            s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
            if q is not None:
                outs.append(s.attend(q[:, :, i:i + 1]))
    return s, taken, outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4])
def test_fused_steps_write_the_composite_bytes(device, dtype, bits, monkeypatch):
    cfg = KIVIConfig(k_bits=bits, v_bits=bits, group_size=G, residual_length=R)
    k, v = projections(2, 3, 400, 64, dtype, device, seed=bits)
    q = torch.randn(2, 6, 400, 64, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)
    fused, taken, out_fused = run(cfg, k, v, 100, True, monkeypatch, q)
    composite, none, out_composite = run(cfg, k, v, 100, False, monkeypatch, q)
    assert none == []
    # every step but those that flush a key block (residual reaching R) or grow the value buffers
    assert len(taken) >= 300 - 300 // R - 12, len(taken)
    assert all((t + 1) % R != 0 for t in taken)  # a step that flushes keys is never fused
    assert fused.seq_length == composite.seq_length == 400
    for name in FIELDS:
        assert same_bytes(getattr(fused, name), getattr(composite, name)), name
    for a, b in zip(out_fused, out_composite):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_value_head_dim_other_than_the_keys(device, monkeypatch):
    """Keys of head_dim 96, values of 32 (the state allows it; attention needs them equal)."""
    cfg = KIVIConfig(group_size=G, residual_length=R)
    k, _ = projections(1, 2, 200, 96, torch.float16, device, seed=6)
    _, v = projections(1, 2, 200, 32, torch.float16, device, seed=7)
    fused, taken, _ = run(cfg, k, v, 70, True, monkeypatch)
    composite, _, _ = run(cfg, k, v, 70, False, monkeypatch)
    assert len(taken) > 100
    for name in FIELDS:
        assert same_bytes(getattr(fused, name), getattr(composite, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_not_fused_where_the_composite_must_run(device, monkeypatch):
    cfg = KIVIConfig(group_size=G, residual_length=R)
    k, v = projections(1, 2, 200, 64, torch.float16, device, seed=3)
    # a prefill shorter than R: no value leaves the window (and no buffers) until token R + 1
    s, taken, _ = run(cfg, k, v, 10, True, monkeypatch)
    assert taken and min(taken) >= R
    # padding bookkeeping (a pad key in the residual) keeps the composite
    s = KIVIState(cfg)
    valid = torch.ones(1, 100, dtype=torch.bool, device=device)
    valid[0, 98] = False
    s.append(k[:, :, :100], v[:, :, :100], valid)
    assert s.k_valid is not None
    assert not s._fused_step_ok(k[:, :, 100:101], None)
    # an explicit backend other than this device's C++ kernels keeps the composite
    s = KIVIState(KIVIConfig(group_size=G, residual_length=R, backend="reference"))
    s.append(k[:, :, :100], v[:, :, :100])
    assert not s._fused_step_ok(k[:, :, 100:101], None)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_appends_keep_the_composite(device):
    """Traced code keeps exact-size tensors (row_buffer) and never calls the fused op."""
    cfg = KIVIConfig(group_size=G, residual_length=R)
    k, v = projections(1, 2, 101, 64, torch.float32, device, seed=4)
    s = KIVIState(cfg)
    s.append(k[:, :, :100], v[:, :, :100])

    def ok(key):
        return s._fused_step_ok(key, None)

    torch._dynamo.reset()
    assert ok(k[:, :, 100:101])
    assert not torch.compile(ok, backend="eager", fullgraph=True)(k[:, :, 100:101])


def op_args(device, B=1, H=2, r=5, n=R, D=64, bits=2, cap=40):
    dt = torch.float16
    return [torch.randn(B, H, r, D, dtype=dt, device=device), torch.randn(B, H, n, D, dtype=dt, device=device),
            torch.randn(B, H, 1, D, dtype=dt, device=device), torch.randn(B, H, 1, D, dtype=dt, device=device),
            torch.zeros(B, H, cap, D * bits // 8, dtype=torch.uint8, device=device),
            torch.zeros(B, H, cap, D // G, dtype=dt, device=device),
            torch.zeros(B, H, cap, D // G, dtype=dt, device=device), 7, bits, G]


@pytest.mark.parametrize("device", DEVICES)
def test_op_returns_the_new_residuals_and_writes_one_row(device):
    args = op_args(device)
    k_res, v_res, k, v, codes, scale, zero = args[:7]
    before = codes.clone()
    k_out, v_out = torch.ops.kivi._dynamic_append_one_(*args)
    assert torch.equal(k_out, torch.cat([k_res, k], 2))
    assert torch.equal(v_out, torch.cat([v_res[:, :, 1:], v], 2))
    c, s, z = torch.ops.kivi.quantize_values(v_res[:, :, :1].contiguous(), 2, G)
    assert torch.equal(codes[:, :, 7:8], c) and torch.equal(scale[:, :, 7:8], s) and torch.equal(zero[:, :, 7:8], z)
    rest = torch.ones(codes.shape[2], dtype=torch.bool)
    rest[7] = False
    assert torch.equal(codes[:, :, rest], before[:, :, rest])  # no other row written


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.kivi._dynamic_append_one_.default, op_args(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(7, 40), "cache overflow"),
    (lambda a: a.__setitem__(7, -1), "outside the value buffers"),
    (lambda a: a.__setitem__(2, a[2].expand(1, 2, 2, 64)), "takes one token"),
    (lambda a: a.__setitem__(1, a[1].transpose(2, 3).contiguous().transpose(2, 3)), "must be contiguous"),
    (lambda a: a.__setitem__(3, a[3].float()), "v must be a 4-D"),
    (lambda a: a.__setitem__(8, 3), "bits must be 2, 4 or 8"),
    (lambda a: a.__setitem__(9, 24), "group_size 24"),
    (lambda a: a.__setitem__(5, a[5][:, :, :30]), "value buffers must be"),
])
def test_bad_arguments_raise_and_write_nothing(device, change, message):
    args = op_args(device)
    change(args)
    codes = args[4].clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kivi._dynamic_append_one_(*args)
    assert torch.equal(args[4], codes)


@pytest.mark.parametrize("device", DEVICES)
def test_attend_names_a_bad_query(device):
    s = KIVIState(KIVIConfig(group_size=G, residual_length=R))
    k, v = projections(1, 2, 100, 64, torch.float16, device, seed=5)
    s.append(k, v)
    with pytest.raises(RuntimeError, match="q"):
        s.attend(torch.randn(1, 3, 1, 64, dtype=torch.float16, device=device))  # 3 heads over 2 KV heads
    with pytest.raises(RuntimeError, match="q is Float"):
        s.attend(torch.randn(1, 4, 1, 64, device=device))

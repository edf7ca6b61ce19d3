"""Q_MatMul (scores from packed keys, output from packed values) against the reference."""

import pytest
import torch

from kivi_ops import ops
from kivi_ops.ops import reference
from tests.conftest import kernel_backends, requires_cuda_kernels, view_with_spare_rows

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel_err(got, want):
    """‖got - want‖ / ‖want‖ in float64, on the CPU (the tensors may live on different devices)."""
    return ((got.cpu().double() - want.cpu().double()).norm() / want.cpu().double().norm()).item()


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("B,Hkv,n_rep,M,T,D,G", [
    (1, 1, 1, 1, 32, 64, 32), (2, 2, 3, 1, 96, 128, 32), (1, 4, 4, 8, 128, 128, 64),
    (3, 1, 8, 2, 256, 64, 64), (1, 2, 1, 5, 160, 128, 32),
])
def test_qmatmul_matches_reference(backend, dtype, bits, B, Hkv, n_rep, M, T, D, G):
    name, device = backend
    kv = torch.randn(B, Hkv, T, D, device=device).to(dtype)
    k_packed = ops.quantize_keys(kv, bits, G, backend=name)
    v_packed = ops.quantize_values(kv, bits, G, backend=name)
    q = torch.randn(B, Hkv * n_rep, M, D, device=device).to(dtype)
    scores = ops.qmatmul_keys(q, *k_packed, bits, G, backend=name)
    assert scores.shape == (B, Hkv * n_rep, M, T) and scores.dtype == dtype
    assert rel_err(scores, reference.qmatmul_keys(q, *k_packed, bits, G)) < TOL[dtype]
    p = torch.softmax(torch.randn(B, Hkv * n_rep, M, T, device=device), -1).to(dtype)
    out = ops.qmatmul_values(p, *v_packed, bits, G, backend=name)
    assert out.shape == (B, Hkv * n_rep, M, D) and out.dtype == dtype
    assert rel_err(out, reference.qmatmul_values(p, *v_packed, bits, G)) < TOL[dtype]


# A softmax over 32k tokens gives p ~ 3e-5, and p * s ~ 1e-5: below fp16's normal range (2^-14).
# The bound is fp16 / bf16 rounding of the values and of the output (dequantize-then-matmul's own
# error); a kernel that rounds p * s to fp16 was 2.6-2.9e-3 from the reference here at 4 bits.
LONG_SOFTMAX_TOL = {torch.float16: 6e-4, torch.bfloat16: 4e-3}


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", list(LONG_SOFTMAX_TOL))
@pytest.mark.parametrize("bits", [2, 4])
def test_qmatmul_values_of_a_long_softmax(backend, dtype, bits):
    """p = softmax over 32768 tokens (GQA, 4 query heads per KV head): the output keeps the accuracy
    of dequantize-then-matmul, however small each p is."""
    name, device = backend
    B, Hkv, n_rep, T, D, G = 1, 2, 4, 32768, 128, 32
    v = torch.randn(B, Hkv, T, D, device=device).to(dtype)
    v_packed = ops.quantize_values(v, bits, G, backend=name)
    p = torch.softmax(torch.randn(B, Hkv * n_rep, 1, T, device=device), -1).to(dtype)
    out = ops.qmatmul_values(p, *v_packed, bits, G, backend=name)
    err = rel_err(out, reference.qmatmul_values(p, *v_packed, bits, G))
    assert err < LONG_SOFTMAX_TOL[dtype], err


@requires_cuda_kernels
@pytest.mark.parametrize("knob", [None, "KIVI_ATTN_PDL=0", "KIVI_ATTN_PDL=2", "KIVI_ATTN_PDL=3", "KIVI_QM_SPLITS=3",
                                  "KIVI_QM_SPLITS=1000", "KIVI_QM_MIN_TPS=1"])
@pytest.mark.parametrize("B,Hkv,n_rep,T,D", [(1, 8, 4, 4096, 128), (2, 4, 1, 2080, 128), (1, 2, 2, 8224, 64)])
def test_cuda_split_plans_and_combines(knob, B, Hkv, n_rep, T, D, monkeypatch):
    """Both ops split the tokens over many blocks here; the values' splits are summed by the split
    combine (KIVI_QM_SPLITS=1000: a split per tile, 129 at 8224 tokens, more than one batch of loads
    per combine thread). The A/B knobs (no programmatic dependent launch, the split kernels launched
    early too, and the combine's early trigger of the next kernel; a forced split count, value
    splits of one tile where the plan wants them instead of at least 4), timed against the default
    by benchmarks/bench_qmatmul.py --ab, give the reference too."""
    if knob is not None:
        monkeypatch.setenv(*knob.split("="))
    kv = torch.randn(B, Hkv, T, D, device="cuda").half()
    q = torch.randn(B, Hkv * n_rep, 1, D, device="cuda").half()
    p = torch.softmax(torch.randn(B, Hkv * n_rep, 1, T, device="cuda"), -1).half()
    for bits in (2, 4):
        k_packed, v_packed = ops.quantize_keys(kv, bits, 32), ops.quantize_values(kv, bits, 32)
        scores = ops.qmatmul_keys(q, *k_packed, bits, 32, backend="cuda")
        assert rel_err(scores, reference.qmatmul_keys(q, *k_packed, bits, 32)) < TOL[torch.float16]
        out = ops.qmatmul_values(p, *v_packed, bits, 32, backend="cuda")
        assert rel_err(out, reference.qmatmul_values(p, *v_packed, bits, 32)) < LONG_SOFTMAX_TOL[torch.float16]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("heads_major", [False, True])
def test_cache_views_are_read_in_place(backend, heads_major):
    """Packed keys/values as the used rows of larger buffers (rows contiguous, batch and head strides
    free, NaN in the spare rows): the result of contiguous copies, bit for bit, without copying them."""
    name, device = backend
    kv = torch.randn(2, 2, 96, 64, device=device).half()
    k_packed, v_packed = ops.quantize_keys(kv, 2, 32, backend=name), ops.quantize_values(kv, 4, 32, backend=name)
    q = torch.randn(2, 4, 1, 64, device=device).half()
    p = torch.softmax(torch.randn(2, 4, 1, 96, device=device), -1).half()
    want = (ops.qmatmul_keys(q, *k_packed, 2, 32, backend=name), ops.qmatmul_values(p, *v_packed, 4, 32, backend=name))
    k_views = [view_with_spare_rows(x, heads_major=heads_major) for x in k_packed]
    v_views = [view_with_spare_rows(x, heads_major=heads_major) for x in v_packed]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = (ops.qmatmul_keys(q, *k_views, 2, 32, backend=name), ops.qmatmul_values(p, *v_views, 4, 32, backend=name))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
    assert copies == []


def test_reference_qmatmul_is_matmul_of_dequantized():
    """The reference itself: grouped-query mapping reads KV head h // n_rep (transformers' repeat_kv)."""
    kv = torch.randn(1, 2, 64, 64)
    packed = ops.quantize_keys(kv, 4, 32)
    q = torch.randn(1, 6, 1, 64)
    k = ops.dequantize_keys(*packed, 4, 32)
    want = torch.cat([q[:, h : h + 1] @ k[:, h // 3].unsqueeze(1).transpose(-1, -2) for h in range(6)], 1)
    torch.testing.assert_close(reference.qmatmul_keys(q, *packed, 4, 32), want)

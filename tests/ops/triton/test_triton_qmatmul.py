"""Triton Q_MatMul (kivi::triton_qmatmul_keys / _values) against the pure-PyTorch reference:
q @ dequant(K)^T and p @ dequant(V) straight from packed codes, grouped-query attention ratios
1/3/4/8, M = 1..8 query tokens, head_dim 64/96/128, token counts that are not a multiple of the
kernel's block, every bits x group_size, three dtypes; split and unsplit token ranges.

Tolerances are relative Frobenius errors against the float32 reference: the kernels round the
dequantized K/V (and p) to the input dtype for the tensor-core dot and round the output to it."""

import os

import pytest

from tests.conftest import requires_interpreter_3_7, view_with_spare_rows
from tests.ops.test_qmatmul import rel_err
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from kivi_ops.ops import reference  # noqa: E402
from kivi_ops.ops import triton as kt  # noqa: E402

kt.register()  # the kivi::triton_* ops, for the tests that call torch.ops directly

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
pytestmark = requires_interpreter_3_7
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


# B, Hkv, n_rep, M, T, D, G, bits
KEY_CASES = [
    (1, 1, 1, 1, 32, 64, 32, 2),  # one group, one block
    (2, 2, 3, 1, 96, 128, 32, 4),  # GQA 3, T not a multiple of the 64-token block
    (1, 3, 4, 8, 128, 64, 64, 8),  # speculative M = 8
    (3, 1, 8, 2, 256, 128, 128, 2),  # GQA 8, G = 128
    (1, 4, 1, 5, 160, 128, 32, 2),  # MHA, odd M
]
# B, Hkv, n_rep, M, T, D, G, bits
VALUE_CASES = [
    (1, 1, 1, 1, 1, 64, 32, 2),  # a single token
    (2, 2, 3, 1, 37, 128, 32, 4),  # odd T
    (1, 3, 4, 8, 100, 64, 64, 8),  # M = 8, T split across programs
    (1, 1, 8, 2, 300, 128, 128, 2),  # one KV head: many splits + the split-sum kernel
    (2, 1, 1, 3, 45, 96, 32, 2),  # head_dim 96 (not a power of two)
]


def _ids(cases):
    return ["B{}-Hkv{}-rep{}-M{}-T{}-D{}-G{}-b{}".format(*c) for c in cases]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", KEY_CASES, ids=_ids(KEY_CASES))
def test_qmatmul_keys(dtype, case):
    B, Hkv, n_rep, M, T, D, G, bits = case
    k = torch.randn(B, Hkv, T, D)
    k[..., 2] *= 100  # outlier channel
    k_packed = reference.quantize_keys(k.to(dtype), bits, G)
    q = torch.randn(B, Hkv * n_rep, M, D).to(dtype)
    got = kt.qmatmul_keys(q.to(DEVICE), *(t.to(DEVICE) for t in k_packed), bits, G)
    assert got.shape == (B, Hkv * n_rep, M, T) and got.dtype == dtype
    assert rel_err(got, reference.qmatmul_keys(q, *k_packed, bits, G)) < TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", VALUE_CASES, ids=_ids(VALUE_CASES))
def test_qmatmul_values(dtype, case):
    B, Hkv, n_rep, M, T, D, G, bits = case
    v_packed = reference.quantize_values(torch.randn(B, Hkv, T, D).to(dtype), bits, G)
    p = torch.softmax(torch.randn(B, Hkv * n_rep, M, T) * 3, -1).to(dtype)
    got = kt.qmatmul_values(p.to(DEVICE), *(t.to(DEVICE) for t in v_packed), bits, G)
    assert got.shape == (B, Hkv * n_rep, M, D) and got.dtype == dtype
    assert rel_err(got, reference.qmatmul_values(p, *v_packed, bits, G)) < TOL[dtype]


def test_constant_groups_are_exact():
    """All-equal groups (scale 0) dequantize exactly: q @ K^T is exact for small integers in fp32."""
    k = torch.full((1, 1, 64, 64), 2.0)
    v = torch.full((1, 1, 5, 64), -3.0)
    q = torch.ones(1, 2, 1, 64)
    scores = kt.qmatmul_keys(q.to(DEVICE), *(t.to(DEVICE) for t in reference.quantize_keys(k, 2, 32)), 2, 32)
    assert torch.equal(scores.cpu(), torch.full((1, 2, 1, 64), 128.0))
    p = torch.full((1, 2, 1, 5), 0.5)
    out = kt.qmatmul_values(p.to(DEVICE), *(t.to(DEVICE) for t in reference.quantize_values(v, 2, 32)), 2, 32)
    assert torch.equal(out.cpu(), torch.full((1, 2, 1, 64), -7.5))


def test_empty_token_range():
    q = torch.randn(1, 2, 1, 64, device=DEVICE)
    k_packed = reference.quantize_keys(torch.randn(1, 1, 0, 64), 2, 32)
    assert kt.qmatmul_keys(q, *(t.to(DEVICE) for t in k_packed), 2, 32).shape == (1, 2, 1, 0)
    v_packed = reference.quantize_values(torch.randn(1, 1, 0, 64), 2, 32)
    out = kt.qmatmul_values(torch.randn(1, 2, 1, 0, device=DEVICE), *(t.to(DEVICE) for t in v_packed), 2, 32)
    assert torch.equal(out.cpu(), torch.zeros(1, 2, 1, 64))


def test_opcheck():
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE != "cpu":  # AOT dispatch traces into compiled kernels only (not the interpreter's)
        utils += ("test_aot_dispatch_dynamic",)
    k_packed = [t.to(DEVICE) for t in reference.quantize_keys(torch.randn(1, 2, 64, 64).half(), 2, 32)]
    v_packed = [t.to(DEVICE) for t in reference.quantize_values(torch.randn(1, 2, 40, 64).half(), 4, 32)]
    q = torch.randn(1, 4, 2, 64, device=DEVICE).half()
    p = torch.softmax(torch.randn(1, 4, 2, 40, device=DEVICE), -1).half()
    torch.library.opcheck(torch.ops.kivi.triton_qmatmul_keys, (q, *k_packed, 2, 32), test_utils=utils)
    torch.library.opcheck(torch.ops.kivi.triton_qmatmul_values, (p, *v_packed, 4, 32), test_utils=utils)


@pytest.mark.parametrize("heads_major", [False, True])
def test_cache_views_are_read_in_place(heads_major):
    """Packed keys/values as the used rows of larger buffers (NaN in the spare rows; heads-major
    storage: batch stride < head stride) give the contiguous result bit for bit: the kernels step
    through each tensor's batch and head strides. Values over 300 tokens and one KV head take the
    split path (partial sums + the split-sum kernel). That no copy is made is checked on the GPU
    (tests/ops/test_qmatmul.py, triton-cuda): the interpreter itself copies every argument."""
    k = torch.randn(2, 2, 96, 64).half()
    v = torch.randn(2, 1, 300, 64).half()
    k_packed, v_packed = reference.quantize_keys(k, 2, 32), reference.quantize_values(v, 4, 32)
    q = torch.randn(2, 4, 1, 64).half().to(DEVICE)
    p = torch.softmax(torch.randn(2, 3, 2, 300), -1).half().to(DEVICE)
    k_dev, v_dev = [t.to(DEVICE) for t in k_packed], [t.to(DEVICE) for t in v_packed]
    want = (kt.qmatmul_keys(q, *k_dev, 2, 32), kt.qmatmul_values(p, *v_dev, 4, 32))
    k_views = [view_with_spare_rows(t, heads_major=heads_major) for t in k_dev]
    v_views = [view_with_spare_rows(t, heads_major=heads_major) for t in v_dev]
    assert not k_views[0].is_contiguous() and not v_views[0].is_contiguous()
    got = (kt.qmatmul_keys(q, *k_views, 2, 32), kt.qmatmul_values(p, *v_views, 4, 32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

"""Triton fused decode attention (kivi::triton_decode_attention) against the pure-PyTorch reference:
keys [dequant(Kq) (Tk) ‖ k_residual], values [dequant(Vq) (Tv) ‖ v_residual] with Tk != Tv either way,
residuals of 0..R tokens, Tk or Tv = 0, grouped-query ratios 1/3/4/8, M = 1..8, head_dim 64/128,
bits 2/4/8 for K and V independently, group 32/64/128, ragged ``lengths`` (int32/int64, 0),
outlier channels, NaN groups, and one or many flash-decoding splits.

Tolerances: relative Frobenius error against the float32 reference (the kernel rounds dequantized
K/V and the probabilities to the input dtype for the tensor-core dots)."""

import math
import os

import pytest

from tests.ops.test_qmatmul import rel_err

from tests.conftest import requires_interpreter_3_7, view_with_spare_rows
from tests.ops.test_decode_attention import dtype_rounding_error
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


def make_inputs(B, Hkv, n_rep, M, Tk, Tv, T, D, G, k_bits, v_bits, dtype, outlier=True):
    """Packed keys for tokens [0, Tk), packed values for [0, Tv), the rest as residuals (CPU)."""
    k = torch.randn(B, Hkv, T, D)
    if outlier:
        k[..., 1] *= 50  # outlier key channel
    v = torch.randn(B, Hkv, T, D)
    k, v = k.to(dtype), v.to(dtype)
    kq = reference.quantize_keys(k[:, :, :Tk].contiguous(), k_bits, G)
    vq = reference.quantize_values(v[:, :, :Tv].contiguous(), v_bits, G)
    q = torch.randn(B, Hkv * n_rep, M, D).to(dtype)
    return q, kq, vq, k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()


def run_both(q, kq, vq, k_r, v_r, k_bits, v_bits, G, scale=None, lengths=None, num_splits=0):
    D = q.shape[-1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    dev = [t.to(DEVICE) for t in (q, *kq, *vq, k_r, v_r)]
    len_dev = None if lengths is None else lengths.to(DEVICE)
    if num_splits:
        got = torch.ops.kivi.triton_decode_attention(*dev, k_bits, v_bits, G, scale, len_dev, num_splits)
    else:
        got = kt.decode_attention(*dev, k_bits, v_bits, G, scale, len_dev)
    want = reference.decode_attention(q, *kq, *vq, k_r, v_r, k_bits, v_bits, G, scale, lengths)
    return got.cpu(), want


CASES = [  # B, Hkv, n_rep, M, Tk, Tv, T, D, G, k_bits, v_bits
    (1, 1, 1, 1, 0, 0, 7, 64, 32, 2, 2),  # residual only (short prompt)
    (1, 2, 4, 1, 128, 128, 128, 128, 32, 2, 2),  # no residual at all
    (2, 2, 3, 1, 256, 160, 288, 128, 32, 4, 2),  # KIVI split: Tk = T - T mod R, Tv = T - R (R = 128)
    (1, 1, 8, 4, 256, 197, 261, 64, 64, 2, 4),  # odd T, speculative M = 4, GQA 8
    (3, 4, 1, 1, 96, 33, 150, 128, 32, 8, 8),  # MHA, three sequences, 8-bit
    (1, 2, 4, 8, 256, 250, 300, 128, 128, 2, 2),  # M = 8, group 128
    (2, 1, 3, 2, 64, 100, 120, 64, 32, 4, 4),  # values quantized further than keys (Tv > Tk)
    (1, 3, 1, 3, 0, 40, 70, 64, 32, 2, 8),  # no packed keys, packed values
]


def _ids(cases):
    return ["B{}-Hkv{}-rep{}-M{}-Tk{}-Tv{}-T{}-D{}-G{}-K{}V{}".format(*c) for c in cases]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_matches_reference(dtype, case):
    B, Hkv, n_rep, M, Tk, Tv, T, D, G, kb, vb = case
    q, kq, vq, k_r, v_r = make_inputs(B, Hkv, n_rep, M, Tk, Tv, T, D, G, kb, vb, dtype)
    got, want = run_both(q, kq, vq, k_r, v_r, kb, vb, G)
    assert got.shape == q.shape and got.dtype == dtype
    # fp16/bf16: rounding the dequantized cache itself to that dtype can move the result (outlier
    # key channels); the kernel may differ by what that rounding alone causes
    rounding = dtype_rounding_error(q, kq, vq, k_r, v_r, kb, vb, G, want)
    assert rel_err(got, want) < TOL[dtype] + 2 * rounding


@pytest.mark.parametrize("num_splits", [1, 2, 5, 100])
def test_split_count_does_not_matter(num_splits):
    """One split (direct write) and many (workspace + combine), down to splits of one block."""
    q, kq, vq, k_r, v_r = make_inputs(2, 2, 2, 2, 320, 200, 330, 64, 32, 2, 2, torch.float32)
    got, want = run_both(q, kq, vq, k_r, v_r, 2, 2, 32, num_splits=num_splits)
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("heads_major", [False, True])
def test_cache_views_are_read_in_place(heads_major):
    """Cache tensors that are the used rows of larger buffers (NaN in the spare rows; heads-major
    storage: batch stride < head stride) give the contiguous result bit for bit: the kernel steps
    through each tensor's batch and head strides instead of copying the views."""
    q, kq, vq, k_r, v_r = make_inputs(2, 2, 3, 1, 256, 160, 288, 64, 32, 2, 4, torch.float16)
    dev = [t.to(DEVICE) for t in (q, *kq, *vq, k_r, v_r)]
    want = torch.ops.kivi.triton_decode_attention(*dev, 2, 4, 32, 0.125, None, 3)
    views = [dev[0]] + [view_with_spare_rows(t, heads_major=heads_major) for t in dev[1:]]
    assert not views[4].is_contiguous()
    got = torch.ops.kivi.triton_decode_attention(*views, 2, 4, 32, 0.125, None, 3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("len_dtype", [torch.int32, torch.int64])
def test_lengths_mask_a_ragged_batch(len_dtype):
    q, kq, vq, k_r, v_r = make_inputs(4, 2, 2, 1, 256, 160, 300, 64, 32, 2, 2, torch.float16)
    # full; inside the key residual; inside the packed values; a single token
    lengths = torch.tensor([300, 270, 100, 1], dtype=len_dtype)
    got, want = run_both(q, kq, vq, k_r, v_r, 2, 2, 32, lengths=lengths, num_splits=3)
    assert rel_err(got, want) < TOL[torch.float16]
    # a sequence depends only on its first lengths[b] tokens
    moved, _ = run_both(q, kq, vq, torch.randn_like(k_r), torch.randn_like(v_r), 2, 2, 32, lengths=lengths,
                        num_splits=3)
    assert torch.equal(moved[2:], got[2:])
    assert not torch.equal(moved[0], got[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 under the interpreter
def test_zero_length_gives_nan_like_the_reference():
    q, kq, vq, k_r, v_r = make_inputs(2, 1, 2, 1, 64, 64, 70, 64, 32, 2, 2, torch.float32)
    lengths = torch.tensor([70, 0], dtype=torch.int32)
    for splits in (1, 2):
        got, want = run_both(q, kq, vq, k_r, v_r, 2, 2, 32, lengths=lengths, num_splits=splits)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want[1]).all()
        assert rel_err(got[0], want[0]) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # NaN scores under the interpreter
def test_nan_group_poisons_only_its_head():
    k = torch.randn(1, 2, 64, 64)
    k[0, 1, 5, 3] = float("nan")  # one key group of KV head 1
    kq = reference.quantize_keys(k, 2, 32)
    vq = reference.quantize_values(torch.randn(1, 2, 64, 64), 2, 32)
    q = torch.randn(1, 4, 1, 64)
    got, want = run_both(q, kq, vq, torch.randn(1, 2, 0, 64), torch.randn(1, 2, 0, 64), 2, 2, 32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[0, 2:]).all() and not torch.isnan(got[0, :2]).any()
    assert rel_err(got[0, :2], want[0, :2]) < 1e-5


def test_constant_keys_and_custom_scale():
    """All-equal key groups -> uniform attention -> the mean of exactly dequantized constant-row values."""
    k = torch.full((1, 1, 64, 64), 0.5)
    v = torch.arange(64, dtype=torch.float32).view(1, 1, 64, 1).expand(1, 1, 64, 64).contiguous()
    kq, vq = reference.quantize_keys(k, 2, 32), reference.quantize_values(v, 2, 32)
    q = torch.randn(1, 1, 1, 64)
    got, _ = run_both(q, kq, vq, k[:, :, :0], v[:, :, :0], 2, 2, 32, scale=0.3)
    torch.testing.assert_close(got, torch.full_like(got, 31.5))


def test_no_tokens_at_all():
    q, kq, vq, k_r, v_r = make_inputs(1, 1, 2, 1, 0, 0, 0, 64, 32, 2, 2, torch.float32)
    got, want = run_both(q, kq, vq, k_r, v_r, 2, 2, 32)
    assert torch.equal(got, want) and torch.equal(got, torch.zeros_like(got))


def test_opcheck():
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE != "cpu":  # AOT dispatch traces into compiled kernels only (not the interpreter's)
        utils += ("test_aot_dispatch_dynamic",)
    q, kq, vq, k_r, v_r = make_inputs(1, 2, 2, 1, 64, 40, 70, 64, 32, 2, 4, torch.float16)
    args = [t.to(DEVICE) for t in (q, *kq, *vq, k_r, v_r)]
    lengths = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.kivi.triton_decode_attention, (*args, 2, 4, 32, 0.125, lengths), test_utils=utils)
    torch.library.opcheck(torch.ops.kivi.triton_decode_attention, (*args, 2, 4, 32, 0.125, None, 1), test_utils=utils)


@pytest.mark.skipif(DEVICE == "cpu", reason=(
    "Inductor cannot compile Triton-interpreter kernels: under TRITON_INTERPRET=1 @triton.jit yields an "
    "InterpretedFunction, which torch.library.wrap_triton returns untraced, and AOT dispatch cannot run it on "
    "fake/functional tensors (verified with torch 2.13 + triton 3.9); compiled on CUDA only"))
def test_torch_compile_fullgraph():
    q, kq, vq, k_r, v_r = make_inputs(1, 2, 4, 1, 128, 64, 150, 128, 32, 2, 2, torch.float16)
    args = [t.to(DEVICE) for t in (q, *kq, *vq, k_r, v_r)]

    def step(q, kc, ks, kz, vc, vs, vz, kr, vr):
        out = torch.ops.kivi.triton_decode_attention(q * 2, kc, ks, kz, vc, vs, vz, kr, vr, 2, 2, 32, 0.1, None)
        return out.float().sum(-1)

    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)

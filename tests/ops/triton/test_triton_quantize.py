"""Triton quantize/dequantize (kivi::triton_*) against the pure-PyTorch reference: codes, scales and
zeros bit for bit, dequantized values bit for bit, over every bits x group_size x dtype, with outlier
channels, all-equal groups, NaN / Inf / overflowing groups, odd token counts and head_dim 96.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
before triton is imported); with one they run compiled on CUDA tensors."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from kivi_ops.ops import reference  # noqa: E402
from kivi_ops.ops import triton as kt  # noqa: E402

kt.register()  # the kivi::triton_* ops, for the tests that call torch.ops directly

# a group whose range overflows float32 makes the interpreter's numpy warn; the result (NaN group) is checked
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Exactly equal (same dtype, shape and values; NaN where the reference has NaN)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {got.shape} vs {want.dtype} {want.shape}"
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def special_keys(B, H, T, D, G, dtype):
    """Random keys [B, H, T, D] with, per-channel groups of G tokens: an outlier channel, an all-equal
    group, a group with a NaN, one with +Inf, and (where the dtype reaches it) one whose range overflows."""
    x = torch.randn(B, H, T, D) * 2 + 0.5
    x[..., 3] *= 1e3  # outlier channel
    x[0, 0, :G, 5] = 1.25  # all-equal group: scale 0, dequantizes exactly
    x[0, -1, G // 2, 7] = float("nan")  # NaN poisons its group only
    x[-1, 0, :G, 9] = torch.linspace(-1, 1, G)
    x[-1, 0, 1, 9] = float("inf")
    if dtype != torch.float16:
        x[-1, -1, 0, 11], x[-1, -1, 1, 11] = -3e38, 3e38  # hi - lo overflows float32
    x[0, 0, :G, 13] = 1.0 + torch.arange(G) * 2**-10  # tiny range: scale rounding matters
    return x.to(dtype)


def special_values(B, H, T, D, G, dtype):
    """Random values [B, H, T, D] with the same specials laid out along per-token channel groups."""
    x = torch.randn(B, H, T, D) * 2 + 0.5
    x[..., :, 3] *= 1e3
    x[0, 0, 1, :G] = -0.75
    x[0, -1, 2, G // 2] = float("nan")
    x[-1, 0, 0, 1] = float("-inf")
    if dtype != torch.float16:
        x[-1, -1, -1, 0], x[-1, -1, -1, 1] = 3e38, -3e38
    x[0, 0, 0, :G] = 1.0 + torch.arange(G) * 2**-10
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_keys_bit_exact(dtype, bits, G):
    B, H, D = (2, 3, 64) if G < 128 else (1, 2, 128)
    k = special_keys(B, H, 2 * G, D, G, dtype)
    got = kt.quantize_keys(k.to(DEVICE), bits, G)
    want = reference.quantize_keys(k, bits, G)
    for g, w, what in zip(got, want, ("codes", "scale", "zero")):
        assert_bits_equal(g, w, f"keys {what}")
    assert_bits_equal(kt.dequantize_keys(*got, bits, G), reference.dequantize_keys(*want, bits, G), "dequantized keys")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("G,D,T", [(32, 64, 7), (32, 96, 5), (64, 128, 3), (128, 128, 4)])
def test_values_bit_exact(dtype, bits, G, D, T):
    v = special_values(2, 2, T, D, G, dtype)
    got = kt.quantize_values(v.to(DEVICE), bits, G)
    want = reference.quantize_values(v, bits, G)
    for g, w, what in zip(got, want, ("codes", "scale", "zero")):
        assert_bits_equal(g, w, f"values {what}")
    assert_bits_equal(kt.dequantize_values(*got, bits, G), reference.dequantize_values(*want, bits, G),
                      "dequantized values")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_every_code(dtype, bits):
    """Arbitrary bytes (every code value) with arbitrary scales, zeros, zero scales and NaN groups."""
    G, D, T = 32, 64, 64
    P = 8 // bits
    codes_k = torch.randint(0, 256, (2, 2, T // P, D), dtype=torch.uint8)
    s_k = (torch.rand(2, 2, T // G, D) * 3).to(dtype)
    s_k[0, 0, 0, :4] = 0
    s_k[1, 1, 1, 5] = float("nan")
    z_k = (torch.randn(2, 2, T // G, D) * 10).to(dtype)
    assert_bits_equal(kt.dequantize_keys(codes_k.to(DEVICE), s_k.to(DEVICE), z_k.to(DEVICE), bits, G),
                      reference.dequantize_keys(codes_k, s_k, z_k, bits, G), "dequantized keys")
    codes_v = torch.randint(0, 256, (2, 2, 9, D // P), dtype=torch.uint8)
    s_v = (torch.rand(2, 2, 9, D // G) * 3).to(dtype)
    s_v[0, 0, 0, 0] = 0
    z_v = (torch.randn(2, 2, 9, D // G) * 10).to(dtype)
    assert_bits_equal(kt.dequantize_values(codes_v.to(DEVICE), s_v.to(DEVICE), z_v.to(DEVICE), bits, G),
                      reference.dequantize_values(codes_v, s_v, z_v, bits, G), "dequantized values")


def test_empty_inputs():
    k = torch.randn(1, 2, 0, 64, device=DEVICE)
    codes, scale, zero = kt.quantize_keys(k, 2, 32)
    assert codes.shape == (1, 2, 0, 64) and scale.shape == (1, 2, 0, 64)
    assert kt.dequantize_keys(codes, scale, zero, 2, 32).shape == (1, 2, 0, 64)
    codes, scale, zero = kt.quantize_values(k, 4, 32)
    assert codes.shape == (1, 2, 0, 32) and scale.shape == (1, 2, 0, 2)
    assert kt.dequantize_values(codes, scale, zero, 4, 32).shape == (1, 2, 0, 64)


def test_non_contiguous_input():
    k = torch.randn(1, 64, 2, 64).transpose(1, 2)  # [1, 2, 64, 64], not contiguous
    got = kt.quantize_keys(k.to(DEVICE), 2, 32)
    for g, w in zip(got, reference.quantize_keys(k, 2, 32)):
        assert_bits_equal(g, w, "keys from a strided input")


def _opcheck_utils():
    # Under the interpreter the ops can run on fake tensors (shape propagation) but cannot be traced
    # by AOT dispatch / Inductor (wrap_triton cannot see into interpreted kernels).
    if DEVICE == "cpu":
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck():
    k = torch.randn(1, 2, 64, 64, device=DEVICE, dtype=torch.float16)
    codes, scale, zero = kt.quantize_keys(k, 2, 32)
    vcodes, vscale, vzero = kt.quantize_values(k, 4, 32)
    samples = [
        (torch.ops.kivi.triton_quantize_keys, (k, 2, 32)),
        (torch.ops.kivi.triton_quantize_values, (k, 4, 32)),
        (torch.ops.kivi.triton_dequantize_keys, (codes, scale, zero, 2, 32)),
        (torch.ops.kivi.triton_dequantize_values, (vcodes, vscale, vzero, 4, 32)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=_opcheck_utils())

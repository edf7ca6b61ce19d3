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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kivi_ops.ops import reference  # noqa: E402
from kivi_ops.ops import triton as kt  # noqa: E402
from kivi_ops.ops.triton import quantize as kq  # noqa: E402
from tests.conftest import requires_interpreter_3_9  # noqa: E402

kt.register()  # the kivi::triton_* ops, for the tests that call torch.ops directly

# a group whose range overflows float32 (or a NaN alone in a reduced slice) makes the interpreter's numpy
# warn; the result (NaN group) is checked
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

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


@requires_interpreter_3_9
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


def extreme_groups(x: torch.Tensor, G: int, keys: bool) -> torch.Tensor:
    """Groups whose scale is tiny (< 2**-60) or huge (> 2**64), plus one spanning both ends, for the
    kernels' power-of-two rescaling (bf16/fp32 only; fp16 cannot hold such ranges)."""
    x = x.clone()
    grp = (lambda b, h, i, c: (b, h, slice(i * G, (i + 1) * G), c)) if keys else \
        (lambda b, h, i, c: (b, h, c, slice(i * G, (i + 1) * G)))
    n = torch.randn(G)
    x[grp(0, 0, 0, 2)] = (1e-30 * n).to(x.dtype)  # scale ~1e-31
    x[grp(0, 0, 1, 2)] = (1e-40 * n).to(x.dtype)  # subnormal values (fp32 / bf16)
    x[grp(-1, 0, 0, 4)] = (1e30 * n).to(x.dtype)  # scale ~1e30
    spread = torch.full((G,), 1e-30)
    spread[1] = torch.nextafter(torch.tensor(1e-30), torch.tensor(1.0))
    spread[2], spread[3] = 1e30, 3e29
    x[grp(-1, -1, 0, 6)] = spread.to(x.dtype)  # huge scale, an element one ulp above the tiny zero
    return x


@requires_interpreter_3_9
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 8])
def test_extreme_scales(dtype, bits):
    G = 32
    k = extreme_groups(special_keys(2, 2, 2 * G, 64, G, dtype), G, keys=True)
    for g, w, what in zip(kt.quantize_keys(k.to(DEVICE), bits, G), reference.quantize_keys(k, bits, G), "csz"):
        assert_bits_equal(g, w, f"keys {what}")
    v = extreme_groups(special_values(2, 2, 7, 64, G, dtype), G, keys=False)
    for g, w, what in zip(kt.quantize_values(v.to(DEVICE), bits, G), reference.quantize_values(v, bits, G), "csz"):
        assert_bits_equal(g, w, f"values {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [96, 36, 7])
def test_keys_odd_head_dims(dtype, D):
    """head_dim not a power of two (masked channel vectors) and odd (no 32-bit words, unaligned rows)."""
    G = 32
    k = torch.randn(2, 3, 2 * G, D) * 3
    k[0, 0, :G, 0] = 2.5
    k[1, 2, 5, D - 1] = float("nan")
    k = k.to(dtype)
    for bits in (2, 4):
        for g, w, what in zip(kt.quantize_keys(k.to(DEVICE), bits, G), reference.quantize_keys(k, bits, G), "csz"):
            assert_bits_equal(g, w, f"keys D={D} {bits} bits {what}")


# (keys configurations, values configurations): every layout is bit-exact, only speed differs
KEY_CFGS = [dict(vec_bytes=4, gpp=1, num_warps=2), dict(vec_bytes=8, gpp=2, num_warps=1),
            dict(vec_bytes=16, gpp=4, num_warps=4), dict(vec_bytes=8, gpp=1, num_warps=1, reload=True)]
VALUE_CFGS = [dict(vec_bytes=16, block_n=8, num_warps=1), dict(vec_bytes=8, block_n=16, num_warps=2),
              dict(vec_bytes=4, block_n=1, num_warps=1), dict(vec_bytes=32, block_n=4, num_warps=1)]


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 2), (torch.float16, 4), (torch.bfloat16, 8),
                                        (torch.bfloat16, 2), (torch.float32, 4)])
def test_launch_configurations(dtype, bits):
    """The kinds of configurations the benchmark compares, with group and token counts that leave
    partial programs (masked tails), against the reference."""
    G = 32
    k = special_keys(1, 3, 3 * G, 64, G, dtype)  # 9 token groups: no gpp > 1 divides it
    want = reference.quantize_keys(k, bits, G)
    for cfg in KEY_CFGS:
        for g, w, what in zip(kq._quantize_keys(k.to(DEVICE), bits, G, cfg), want, "csz"):
            assert_bits_equal(g, w, f"keys {cfg} {what}")
    v = special_values(1, 3, 7, 96, G, dtype)  # 21 tokens, 3 groups per token
    want = reference.quantize_values(v, bits, G)
    for cfg in VALUE_CFGS:
        for g, w, what in zip(kq._quantize_values(v.to(DEVICE), bits, G, cfg), want, "csz"):
            assert_bits_equal(g, w, f"values {cfg} {what}")


def test_unaligned_16bit_input():
    """A contiguous fp16 tensor at an odd storage offset cannot be read as 32-bit words: the kernels
    fall back to 16-bit loads."""
    G = 32
    flat = special_keys(2, 2, 2 * G, 64, G, torch.float16).reshape(-1)
    buf = torch.empty(flat.numel() + 1, dtype=torch.float16, device=DEVICE)
    buf[1:] = flat.to(DEVICE)
    k = buf[1:].view(2, 2, 2 * G, 64)
    assert k.is_contiguous() and k.storage_offset() == 1
    for g, w, what in zip(kt.quantize_keys(k, 4, G), reference.quantize_keys(k.cpu(), 4, G), "csz"):
        assert_bits_equal(g, w, f"keys {what}")
    for g, w, what in zip(kt.quantize_values(k, 2, G), reference.quantize_values(k.cpu(), 2, G), "csz"):
        assert_bits_equal(g, w, f"values {what}")


@triton.jit
def _encode_probe(d_ptr, s_ptr, out_ptr, n, MARKSTEIN: tl.constexpr, BLOCK: tl.constexpr):
    # codes of d (>= 0) for scale s, zero 0, through the kernels' own _encode
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    code = kq._encode(d, 1.0, tl.zeros_like(d), inv, -s, s * -(2.0**-24), False, MARKSTEIN)
    tl.store(out_ptr + offs, code, mask=mask)


def _near_boundaries(s: torch.Tensor, ks, span: int):
    """float32 d within +-span ulps of every rounding boundary k - 0.5 (k >= 2) and 0.5 - 2**-25 of
    d / s, for every scale in ``s``."""
    ss, dd = [], []
    for k in ks:
        th = 0.5 - 2.0**-25 if k == 1 else k - 0.5
        c = (s.double() * th).float()
        bits = c.view(torch.int32)[:, None] + torch.arange(-span, span + 1, dtype=torch.int32)[None, :]
        dd.append(bits.view(torch.float32).reshape(-1))
        ss.append(s[:, None].expand(bits.shape).reshape(-1))
    return torch.cat(dd), torch.cat(ss)


@requires_interpreter_3_9
@pytest.mark.skipif(DEVICE != "cpu", reason="exercises the encode arithmetic through the interpreter")
@pytest.mark.parametrize("scales", ["fp16", "bf16", "fp32"])
def test_encode_at_rounding_boundaries(scales):
    """_encode against the reference formula floor(RN(RN(d / s) + 0.5)) where it is hardest: d
    within a few ulps of every code boundary (including the double-rounding one just below 0.5),
    for every fp16 scale, every bf16 scale of the range the kernels use, and random fp32 scales.
    The Markstein path serves 16-bit scales, the threshold test fp32 (both are checked on 16-bit)."""
    gen = torch.Generator().manual_seed(0)
    if scales == "fp16":
        s = torch.arange(1, 0x7C00, dtype=torch.int16).view(torch.float16).float()
    elif scales == "bf16":
        s = (torch.arange(1, 0x7F80, dtype=torch.int32) << 16).view(torch.float32)
        s = s[(s >= 2.0**-85) & (s <= 2.0**64)]  # after the kernels' rescaling
    else:
        s = torch.rand(20000, generator=gen, dtype=torch.float64).add(1).float()
        s = s * torch.pow(2.0, torch.randint(-60, 60, s.shape, generator=gen).float())
    d, ss = _near_boundaries(s, [1, 2, 3, 4, 15, 16, 255, 256], 3)
    r = torch.rand(ss.numel() // 8, generator=gen) * 256.5
    d = torch.cat([d, (r.double() * ss[: r.numel()].double()).float()])
    ss = torch.cat([ss, ss[: r.numel()]])
    keep = d >= 0
    d, ss = d[keep].contiguous(), ss[keep].contiguous()
    want = torch.floor(((d.double() / ss.double()).float() + 0.5).float())  # RN32(d/s): no double rounding here
    for markstein in ([True, False] if scales != "fp32" else [False]):
        out = torch.empty_like(d)
        BLOCK = 1 << 18
        _encode_probe[(triton.cdiv(d.numel(), BLOCK),)](d, ss, out, d.numel(), MARKSTEIN=markstein, BLOCK=BLOCK)
        bad = (out != want).nonzero()
        assert bad.numel() == 0, (f"markstein={markstein}: {bad.numel()} of {d.numel()} differ, e.g. "
                                  f"d={d[bad[0]].item()!r} s={ss[bad[0]].item()!r}: {out[bad[0]].item()} vs {want[bad[0]].item()}")


@pytest.mark.skipif(DEVICE != "cuda", reason="the packed-min/max PTX path runs only compiled on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_minmax_matches(dtype):
    """Packed 16-bit min/max (inline PTX, the CUDA default) and float32 min/max give the reference,
    for 4-channel (32-bit word loads) and 2-channel (16-bit loads) key vectors."""
    G = 32
    x = special_keys(2, 4, 8 * G, 128, G, dtype).to(DEVICE)
    for bits in (2, 4):
        want = reference.quantize_keys(x.cpu(), bits, G)
        for vec_bytes in (8, 4):
            for asm in (True, False):
                cfg = dict(vec_bytes=vec_bytes, gpp=1, num_warps=16 // vec_bytes, asm=asm)
                for g, w, what in zip(kq._quantize_keys(x, bits, G, cfg), want, "csz"):
                    assert_bits_equal(g, w, f"keys {cfg} {what}")
        want = reference.quantize_values(x.cpu(), bits, G)
        for asm in (True, False):
            cfg = dict(kq.VALUES_CONFIG, asm=asm)
            for g, w, what in zip(kq._quantize_values(x, bits, G, cfg), want, "csz"):
                assert_bits_equal(g, w, f"values asm={asm} {what}")


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

"""Property tests (hypothesis): for any shape, bits, group size, dtype and value range, the
compiled CPU kernels equal the reference and the error bound holds."""

import torch
from hypothesis import given, settings, strategies as st

from kivi_ops import ops
from kivi_ops.ops import reference


def output_rounding(x_hat, zero, scale, bits):
    """What computing code*s + z in float32 and casting it to x_hat's dtype may add to |x - x_hat|."""
    info = torch.finfo(x_hat.dtype)
    cast = torch.maximum(x_hat.double().abs() * info.eps, torch.full_like(zero, info.smallest_normal * info.eps)) / 2
    float32_math = (zero.abs() + scale * (2**bits - 1)) * 2.0**-23
    return cast + float32_math


@st.composite
def caches(draw):
    G = draw(st.sampled_from([32, 64, 128]))
    D = G * draw(st.integers(1, 3))
    T = G * draw(st.integers(1, 3))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.floats(-100, 100))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, H, T, D, generator=gen) * magnitude + offset).to(dtype)
    return x, draw(st.sampled_from([2, 4, 8])), G


@settings(max_examples=60, deadline=None)
@given(caches())
def test_cpu_kernels_equal_reference_and_bound_holds(case):
    x, bits, G = case
    for quantize, dequantize, dim in ((ops.quantize_keys, ops.dequantize_keys, 2),
                                      (ops.quantize_values, ops.dequantize_values, 3)):
        codes, scale, zero = quantize(x, bits, G)
        want = getattr(reference, quantize.__name__)(x, bits, G)
        assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and torch.equal(zero, want[2])
        x_hat = dequantize(codes, scale, zero, bits, G)
        s = scale.double().repeat_interleave(G, dim=dim)
        err = (x.double() - x_hat.double()).abs()
        z = zero.double().repeat_interleave(G, dim=dim)
        assert bool((err <= s / 2 + output_rounding(x_hat, z, s, bits)).all())

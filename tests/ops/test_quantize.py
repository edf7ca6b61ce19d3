"""quantize/dequantize keys and values: every compiled implementation against the reference,
the error bound |x - x_hat| <= s/2, constant groups, outliers, non-finite input, bad input."""

import pytest
import torch

from kivi_ops import ops
from kivi_ops.ops import reference
from tests.conftest import kernel_backends
from tests.ops.test_properties import output_rounding

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, H, T, D, G): odd batch/head counts, the smallest token count, head_dim 64/128/96
SHAPES = [(1, 1, 32, 64, 32), (2, 3, 96, 128, 32), (3, 1, 128, 64, 64), (1, 2, 256, 128, 128), (2, 5, 64, 96, 32)]


def _ulp_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within one unit in the last place of their dtype (NaN == NaN)."""
    if torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)]):
        return True
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a.float() - b.float()).abs() <= ulp).all())


def _random_cache(shape, dtype, device):
    B, H, T, D = shape
    x = torch.randn(B, H, T, D, dtype=torch.float32) * 2 + 0.5
    x[..., 3] *= 1e3  # an outlier channel, as keys have
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, bits, shape):
    name, device = backend
    B, H, T, D, G = shape
    x = _random_cache((B, H, T, D), dtype, device)
    for quantize, dequantize in ((ops.quantize_keys, ops.dequantize_keys), (ops.quantize_values, ops.dequantize_values)):
        got = quantize(x, bits, G, backend=name)
        want = getattr(reference, quantize.__name__)(x.cpu(), bits, G)
        assert torch.equal(got[0].cpu(), want[0]), f"{quantize.__name__}: codes differ"
        assert _ulp_equal(got[1].cpu(), want[1]) and _ulp_equal(got[2].cpu(), want[2]), "scale/zero differ"
        x_hat = dequantize(*got, bits, G, backend=name)
        assert _ulp_equal(x_hat.cpu(), getattr(reference, dequantize.__name__)(*want, bits, G))


def _bound_holds(x, x_hat, scale, zero, bits):
    """|x - x_hat| <= s/2 plus the rounding of computing and casting x_hat (see test_properties)."""
    err = (x.double() - x_hat.double()).abs()
    return bool((err <= scale.double() / 2 + output_rounding(x_hat, zero.double(), scale.double(), bits)).all())


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_bound(backend, dtype, bits):
    name, device = backend
    x = _random_cache((2, 2, 64, 128), dtype, device)
    codes, scale, zero = ops.quantize_keys(x, bits, 32, backend=name)
    assert _bound_holds(x, ops.dequantize_keys(codes, scale, zero, bits, 32, backend=name),
                        scale.repeat_interleave(32, dim=2), zero.repeat_interleave(32, dim=2), bits)
    codes, scale, zero = ops.quantize_values(x, bits, 32, backend=name)
    assert _bound_holds(x, ops.dequantize_values(codes, scale, zero, bits, 32, backend=name),
                        scale.repeat_interleave(32, dim=3), zero.repeat_interleave(32, dim=3), bits)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_are_exact(backend, dtype):
    name, device = backend
    x = torch.full((1, 2, 64, 64), 3.140625, dtype=dtype, device=device)
    x[0, 1] = -7.5
    for quantize, dequantize in ((ops.quantize_keys, ops.dequantize_keys), (ops.quantize_values, ops.dequantize_values)):
        codes, scale, zero = quantize(x, 2, 32, backend=name)
        assert (scale == 0).all() and (codes == 0).all()
        assert torch.equal(dequantize(codes, scale, zero, 2, 32, backend=name), x)


@pytest.mark.parametrize("backend", kernel_backends())
def test_outliers_stay_in_their_channel(backend):
    """Per-channel key groups: a 1e3 outlier channel must not degrade its neighbours."""
    name, device = backend
    x = torch.randn(1, 1, 64, 64, device=device)
    x[..., 5] = 1e3 + torch.randn(64, device=device)
    codes, scale, zero = ops.quantize_keys(x, 2, 32, backend=name)
    err = (ops.dequantize_keys(codes, scale, zero, 2, 32, backend=name) - x).abs()
    normal_channels = torch.ones(64, dtype=torch.bool)
    normal_channels[5] = False
    assert err[..., normal_channels].max() < 2.0  # standard normals: range ~6 -> s/2 ~ 1
    assert err[..., 5].max() < 2.0


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_poisons_only_its_group(backend, bad):
    name, device = backend
    x = torch.randn(1, 1, 64, 64, device=device)
    x[0, 0, 40, 7] = bad  # key group (token group 1, channel 7); value group (token 40, channels 0..31)
    k_hat = ops.dequantize_keys(*ops.quantize_keys(x, 2, 32, backend=name), 2, 32, backend=name)
    v_hat = ops.dequantize_values(*ops.quantize_values(x, 2, 32, backend=name), 2, 32, backend=name)
    k_nan = torch.zeros_like(x, dtype=torch.bool)
    k_nan[0, 0, 32:64, 7] = True
    v_nan = torch.zeros_like(x, dtype=torch.bool)
    v_nan[0, 0, 40, 0:32] = True
    assert torch.equal(torch.isnan(k_hat), k_nan)
    assert torch.equal(torch.isnan(v_hat), v_nan)


def test_codes_take_bits_over_8_bytes_per_element():
    x = torch.randn(1, 2, 128, 64)
    for bits in (2, 4, 8):
        for quantize in (ops.quantize_keys, ops.quantize_values):
            codes, _, _ = quantize(x, bits, 32)
            assert codes.numel() * codes.element_size() == x.numel() * bits // 8

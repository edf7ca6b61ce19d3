"""Fake (meta) kernels of the C++-defined kivi ops: output shapes and dtypes only, for
torch.compile, torch.export and AOTInductor. Shapes follow kivi_ops.ops.layout."""

from __future__ import annotations

import torch

from kivi_ops._extension import EXTENSION_ERROR


def _register() -> None:
    @torch.library.register_fake("kivi::quantize_keys")
    def _(k, bits, group_size):
        B, H, T, D = k.shape
        codes = k.new_empty((B, H, T * bits // 8, D), dtype=torch.uint8)
        scale = k.new_empty((B, H, T // group_size, D))
        return codes, scale, torch.empty_like(scale)

    @torch.library.register_fake("kivi::quantize_values")
    def _(v, bits, group_size):
        B, H, T, D = v.shape
        codes = v.new_empty((B, H, T, D * bits // 8), dtype=torch.uint8)
        scale = v.new_empty((B, H, T, D // group_size))
        return codes, scale, torch.empty_like(scale)

    @torch.library.register_fake("kivi::dequantize_keys")
    def _(codes, scale, zero, bits, group_size):
        B, H, rows, D = codes.shape
        return scale.new_empty((B, H, rows * (8 // bits), D))

    @torch.library.register_fake("kivi::dequantize_values")
    def _(codes, scale, zero, bits, group_size):
        B, H, T, cols = codes.shape
        return scale.new_empty((B, H, T, cols * (8 // bits)))

    @torch.library.register_fake("kivi::qmatmul_keys")
    def _(q, codes, scale, zero, bits, group_size):
        B, Hq, M, _ = q.shape
        return q.new_empty((B, Hq, M, codes.shape[2] * (8 // bits)))

    @torch.library.register_fake("kivi::qmatmul_values")
    def _(p, codes, scale, zero, bits, group_size):
        B, Hq, M, _ = p.shape
        return p.new_empty((B, Hq, M, codes.shape[3] * (8 // bits)))

    @torch.library.register_fake("kivi::decode_attention")
    def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual, k_bits, v_bits,
          group_size, scale, lengths):
        return torch.empty_like(q)

    @torch.library.register_fake("kivi::_dynamic_append_one_")
    def _(k_residual, v_residual, k, v, v_codes, v_scale, v_zero, row, bits, group_size):
        B, H, r, D = k_residual.shape
        return k_residual.new_empty((B, H, r + 1, D)), v_residual.new_empty(v_residual.shape)


if EXTENSION_ERROR is None:
    _register()

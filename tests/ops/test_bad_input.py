"""Bad input gets a clear error naming the argument and what was expected — from the Python
entry points (ValueError/TypeError) and from the C++ ops called directly (RuntimeError)."""

import pytest
import torch

from kivi_ops import ops

K = torch.randn(1, 2, 64, 64)
KQ = ops.quantize_keys(K, 2, 32)
VQ = ops.quantize_values(K, 2, 32)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.quantize_keys(K.double(), 2, 32), TypeError, "float16, bfloat16 or float32"),
    (lambda: ops.quantize_keys(K.int(), 2, 32), TypeError, "got torch.int32"),
    (lambda: ops.quantize_keys(K[0], 2, 32), ValueError, "4-D"),
    (lambda: ops.quantize_keys(K, 3, 32), ValueError, "bits must be one of"),
    (lambda: ops.quantize_keys(K, 2, 12), ValueError, "group_size"),
    (lambda: ops.quantize_keys(K[:, :, :40], 2, 32), ValueError, r"token count \(40\) must be a multiple of group_size"),
    (lambda: ops.quantize_values(torch.randn(1, 1, 8, 48), 2, 32), ValueError, r"head_dim \(48\)"),
    (lambda: ops.quantize_keys(K, 2, 32, backend="tpu"), ValueError, "backend must be one of"),
    (lambda: ops.quantize_keys(K, 2, 32, backend="cuda"), ValueError, "needs cuda tensors"),
    (lambda: ops.dequantize_keys(KQ[0].float(), KQ[1], KQ[2], 2, 32), TypeError, "codes must be a uint8"),
    (lambda: ops.dequantize_keys(KQ[0], KQ[1][:, :, :1], KQ[2][:, :, :1], 2, 32), ValueError, "scale and zero must be"),
    (lambda: ops.dequantize_keys(KQ[0], KQ[1], KQ[2].half(), 2, 32), TypeError, "same dtype"),
    (lambda: ops.dequantize_keys(*KQ, 4, 32), ValueError, "hold 32 tokens"),
    (lambda: ops.dequantize_values(*VQ, 2, 64), ValueError, "scale and zero must be"),
    (lambda: ops.qmatmul_keys(torch.randn(1, 3, 1, 64), *KQ, 2, 32), ValueError, r"multiple of the KV heads"),
    (lambda: ops.qmatmul_keys(torch.randn(2, 2, 1, 64), *KQ, 2, 32), ValueError, "batch"),
    (lambda: ops.qmatmul_keys(torch.randn(1, 2, 1, 32), *KQ, 2, 32), ValueError, "head_dim = 64"),
    (lambda: ops.qmatmul_keys(torch.randn(1, 2, 1, 64).half(), *KQ, 2, 32), TypeError, "dtype"),
    (lambda: ops.qmatmul_values(torch.randn(1, 2, 1, 63), *VQ, 2, 32), ValueError, "token count = 64"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 1, 64), KQ, VQ, K[:, :, :1], K[:, :, :0]), ValueError,
     "keys hold 65 tokens"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 1, 64), KQ, VQ, K[:, :, :0], K[:, :, :0],
                                  lengths=torch.tensor([1.0])), ValueError, "lengths must be"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 1, 64), KQ, VQ, K[:, :, :0], K[:, :, :0],
                                  lengths=torch.tensor([-1])), ValueError, r"lengths must be in \[0, 64\].*-1 to -1"),
    (lambda: ops.decode_attention(torch.randn(2, 2, 1, 64), *(tuple(x.repeat(2, 1, 1, 1) for x in t)
                                                              for t in (KQ, VQ)),
                                  K[:, :, :0].repeat(2, 1, 1, 1), K[:, :, :0].repeat(2, 1, 1, 1),
                                  lengths=torch.tensor([3, 65])), ValueError, r"\[0, 64\].*from 3 to 65"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 1, 64), KQ, VQ, K[:, :, :0], K[:, :, :0], scale=float("nan")),
     ValueError, "scale must be a finite number, got nan"),
    (lambda: ops.decode_attention_of_cache(torch.randn(1, 2, 1, 64), KQ, VQ, K[:, :, :0], K[:, :, :0], k_bits=2,
                                           v_bits=2, group_size=32, scale=float("inf")),
     ValueError, "scale must be a finite number, got inf"),
])
def test_python_entry_points_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.kivi.quantize_keys(K, 3, 32), "bits must be 2, 4 or 8"),
    (lambda: torch.ops.kivi.quantize_keys(K[:, :, :40], 2, 32), "multiple of group_size"),
    (lambda: torch.ops.kivi.quantize_values(K.double(), 2, 32), "float16, bfloat16 or float32"),
    (lambda: torch.ops.kivi.dequantize_keys(KQ[0], KQ[1][:, :, :1], KQ[2][:, :, :1], 2, 32), "scale/zero must be"),
    (lambda: torch.ops.kivi.qmatmul_keys(torch.randn(1, 3, 1, 64), *KQ, 2, 32), "multiple of the KV heads"),
    (lambda: torch.ops.kivi.qmatmul_values(torch.randn(1, 2, 1, 63), *VQ, 2, 32), "token count"),
    (lambda: torch.ops.kivi.decode_attention(torch.randn(1, 2, 1, 64), *KQ, *VQ, K[:, :, :1], K[:, :, :0], 2, 2, 32,
                                             0.1, None), "keys hold 65 tokens"),
])
def test_cpp_ops_called_directly_raise_runtime_error(call, match):
    """AOTInductor and C++ callers skip the Python checks: the kernels must check for themselves."""
    with pytest.raises(RuntimeError, match=match):
        call()

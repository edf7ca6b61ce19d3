"""kivi_ops.ops.triton's wrappers: eager calls on plain tensors run the op's body directly (no
dispatcher, less host time) and give exactly what the registered ``kivi::triton_*`` op gives;
anything that traces or needs gradients still goes through the op."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import triton  # noqa: E402
from packaging import version  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from kivi_ops.ops import triton as kt  # noqa: E402
from kivi_ops.ops.triton import _common as kc  # noqa: E402
from kivi_ops.ops.triton import quantize as kq  # noqa: E402

kt.register()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def body_calls(monkeypatch):
    """Counts the direct (dispatcher-free) calls of each op body."""
    calls = []
    for name in ("quantize_keys", "quantize_values", "dequantize_keys", "qmatmul_keys", "decode_attention"):
        body = kt._EAGER[name]
        monkeypatch.setitem(kt._EAGER, name, lambda *a, _n=name, _b=body: (calls.append(_n), _b(*a))[1])
    return calls


def test_eager_plain_tensors_skip_the_dispatcher_with_identical_results(body_calls):
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 32, device=DEVICE, dtype=torch.float16)
    direct = kt.quantize_keys(k, 2, 32)
    via_op = torch.ops.kivi.triton_quantize_keys(k, 2, 32)
    assert body_calls == ["quantize_keys"]
    for a, b in zip(direct, via_op):
        assert torch.equal(a, b)
    deq = kt.dequantize_keys(*direct, 2, 32)
    assert torch.equal(deq, torch.ops.kivi.triton_dequantize_keys(*via_op, 2, 32))
    q = torch.randn(1, 4, 1, 32, device=DEVICE, dtype=torch.float16)
    assert torch.equal(kt.qmatmul_keys(q, *direct, 2, 32), torch.ops.kivi.triton_qmatmul_keys(q, *via_op, 2, 32))
    assert body_calls == ["quantize_keys", "dequantize_keys", "qmatmul_keys"]


@pytest.mark.skipif(not torch.cuda.is_available() and version.parse(triton.__version__) < version.parse("3.9"),
                    reason="Triton < 3.9's interpreter cannot run the decode kernel on CPU (compiled on a GPU it runs)")
def test_eager_decode_attention_skips_the_dispatcher(body_calls):
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 32, device=DEVICE, dtype=torch.float16)
    q = torch.randn(1, 4, 1, 32, device=DEVICE, dtype=torch.float16)
    direct = kt.quantize_keys(k, 2, 32)
    v = kt.quantize_values(k, 2, 32)
    res = torch.randn(1, 2, 5, 32, device=DEVICE, dtype=torch.float16)
    args = (q, *direct, *v, res, res.clone(), 2, 2, 32, 0.2)  # 64 quantized + 5 residual tokens
    out = kt.decode_attention(*args)
    assert torch.equal(out, torch.ops.kivi.triton_decode_attention(*args, None))
    assert body_calls == ["quantize_keys", "quantize_values", "decode_attention"]


def test_tracing_and_gradients_go_through_the_op(body_calls):
    k = torch.randn(1, 2, 64, 32, device=DEVICE, dtype=torch.float32, requires_grad=True)
    codes, scale, zero = kt.quantize_keys(k, 2, 32)  # needs grad: through the registered op
    assert body_calls == [] and codes.shape == (1, 2, 16, 32)
    with FakeTensorMode():  # a dispatch mode is active: through the op (its fake kernel)
        fake = torch.empty(1, 2, 64, 32, device=DEVICE, dtype=torch.float16)
        codes, scale, zero = kt.quantize_keys(fake, 4, 32)
    assert body_calls == [] and tuple(codes.shape) == (1, 2, 32, 32) and tuple(scale.shape) == (1, 2, 2, 32)


def test_launcher_bypasses_wrap_triton_only_for_eager_plain_tensors(monkeypatch):
    """Eager calls on plain tensors launch the kernel directly (wrap_triton's higher-order-op dispatch
    costs 0.25-0.5 ms of host time per call); anything traced keeps going through wrap_triton."""
    wrapped = []
    monkeypatch.setattr(kc, "wrap_triton", lambda kernel: wrapped.append(kernel) or {(1,): "traced"})
    kern = kq._quantize_keys_kernel
    x = torch.empty(4, device=DEVICE)
    assert kc.launcher(kern, (1,), x, x, 3) != "traced" and not wrapped
    with FakeTensorMode() as mode:
        assert kc.launcher(kern, (1,), mode.from_tensor(x)) == "traced"
        # a plain tensor while a dispatch mode is active is traced as well
        assert kc.launcher(kern, (1,), x) == "traced"
    assert wrapped == [kern, kern]

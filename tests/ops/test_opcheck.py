"""torch.library.opcheck on every kivi op and sample (schema, fake kernel, dispatcher
registrations), and torch.compile(fullgraph=True) / torch.export of functions calling them."""

import pytest
import torch

from kivi_ops import ops
from tests.conftest import kernel_backends


def samples(device):
    """(op, args) pairs covering bits 2/4/8, fp16/bf16/fp32, MHA and GQA, odd batch/heads."""
    out = []
    for dtype, bits, (B, Hkv, n_rep, T, D, G) in [
        (torch.float16, 2, (1, 1, 1, 32, 64, 32)),
        (torch.bfloat16, 4, (2, 3, 3, 96, 128, 32)),
        (torch.float32, 8, (3, 2, 4, 128, 64, 64)),
    ]:
        kv = torch.randn(B, Hkv, T, D, device=device).to(dtype)
        kq = ops.quantize_keys(kv, bits, G)
        vq = ops.quantize_values(kv, bits, G)
        q = torch.randn(B, Hkv * n_rep, 2, D, device=device).to(dtype)
        p = torch.randn(B, Hkv * n_rep, 2, T, device=device).to(dtype)
        k_res = torch.randn(B, Hkv, 5, D, device=device).to(dtype)
        v_res = torch.cat([kv[:, :, -T // 2 :], k_res], 2)
        v_half = ops.quantize_values(kv[:, :, : T // 2].contiguous(), bits, G)
        lengths = torch.full((B,), T, dtype=torch.int32, device=device)
        kivi = torch.ops.kivi
        out += [
            (kivi.quantize_keys.default, (kv, bits, G)),
            (kivi.quantize_values.default, (kv, bits, G)),
            (kivi.dequantize_keys.default, (*kq, bits, G)),
            (kivi.dequantize_values.default, (*vq, bits, G)),
            (kivi.qmatmul_keys.default, (q, *kq, bits, G)),
            (kivi.qmatmul_values.default, (p, *vq, bits, G)),
            (kivi.decode_attention.default, (q, *kq, *v_half, k_res, v_res, bits, bits, G, 0.1, None)),
            (kivi.decode_attention.default, (q, *kq, *v_half, k_res, v_res, bits, bits, G, 0.1, lengths)),
        ]
    return out


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b.values[0][0] != "triton"])
def test_opcheck_every_op(backend):
    _, device = backend
    for op, args in samples(device):
        torch.library.opcheck(op, args)


def _attend(q, k, v):
    """A decode step written with the public API, as a model would call it."""
    kq = ops.quantize_keys(k, 2, 32)
    vq = ops.quantize_values(v, 2, 32)
    scores = ops.qmatmul_keys(q, *kq, 2, 32) * q.shape[-1] ** -0.5
    return ops.qmatmul_values(torch.softmax(scores, -1), *vq, 2, 32)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v = torch.randn(2, 6, 1, 64), torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    compiled = torch.compile(_attend, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v), _attend(q, k, v))


def test_export_keeps_the_kivi_ops():
    class Step(torch.nn.Module):
        def forward(self, q, k, v):
            return _attend(q, k, v)

    ep = torch.export.export(Step(), (torch.randn(1, 3, 1, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"kivi.quantize_keys.default", "kivi.qmatmul_keys.default", "kivi.qmatmul_values.default"} <= targets

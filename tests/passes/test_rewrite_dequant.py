"""The dequantize -> attention pass: single-token SDPA over a dequantized KIVI cache becomes one
fused kivi::decode_attention (expect tests on the rewritten graphs), everything else is left alone,
and the rewritten graph computes what the original computes."""

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase

from kivi_ops import ops
from kivi_ops.passes import DequantRewrite, last_rewrites, make_kivi_backend, rewrite_dequant_attention

G = 32


def packed_cache(B=1, H=2, Tk=64, Tv=48, R=21, D=32, bits=2, seed=0):
    """A KIVI cache split as in decoding: Tk quantized keys + (T - Tk) residual, same T for values."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, Tk + R, D, generator=g), torch.randn(B, H, Tk + R, D, generator=g)
    T = Tk + R
    kq, vq = ops.quantize_keys(k[:, :, :Tk].contiguous(), bits, G), ops.quantize_values(v[:, :, :Tv].contiguous(), bits, G)
    return kq, vq, k[:, :, Tk:].contiguous(), v[:, :, Tv:T].contiguous()


def dense(kq, vq, kr, vr, bits=2):
    k = torch.cat([ops.dequantize_keys(*kq, bits, G), kr], 2)
    v = torch.cat([ops.dequantize_values(*vq, bits, G), vr], 2)
    return k, v


def repeat_kv(x, n):  # transformers' repeat_kv
    B, H, T, D = x.shape
    return x[:, :, None, :, :].expand(B, H, n, T, D).reshape(B, H * n, T, D)


def attend_gqa(q, kq, vq, kr, vr):
    k, v = dense(kq, vq, kr, vr)
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n))


def attend_mha_scaled(q, kq, vq, kr, vr):
    k, v = dense(kq, vq, kr, vr)
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def attend_masked(q, kq, vq, kr, vr, mask):
    k, v = dense(kq, vq, kr, vr)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_causal(q, kq, vq, kr, vr):
    k, v = dense(kq, vq, kr, vr)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attend_and_return_keys(q, kq, vq, kr, vr):
    k, v = dense(kq, vq, kr, vr)
    return F.scaled_dot_product_attention(q, k, v), k


def capture(fn, *args):
    """Compile ``fn`` with a backend that only runs the pass; returns (gm, rewrites, output)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, rewrite_dequant_attention(gm)))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm, rewrites), = seen
    return gm, rewrites, out


def kivi_lines(gm) -> str:
    return "\n".join(n.format_node() for n in gm.graph.nodes
                     if n.op == "call_function" and ("kivi" in str(n.target) or "scaled_dot" in str(n.target)))


class TestDequantRewrite(TestCase):
    def test_gqa_repeat_kv_becomes_one_fused_op(self):
        kq, vq, kr, vr = packed_cache()
        q = torch.randn(1, 4, 1, 32)
        gm, rewrites, out = capture(attend_gqa, q, kq, vq, kr, vr)
        self.assertExpectedInline("\n".join(map(str, rewrites)), """scaled_dot_product_attention: dequantize+sdpa -> decode_attention q_heads=4 kv_heads=2 K2V2 G=32 view=repeat_kv""")
        self.assertExpectedInline(kivi_lines(gm), """%decode_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.decode_attention.default](args = (%l_q_, %l_kq_0_, %l_kq_1_, %l_kq_2_, %l_vq_0_, %l_vq_1_, %l_vq_2_, %l_kr_, %l_vr_, 2, 2, 32, 0.17677669529663687, None), kwargs = {})""")
        # the dense cache is gone from the graph: no dequantize, cat or expand left
        self.assertFalse([n for n in gm.graph.nodes if "dequantize" in str(n.target) or n.target is torch.cat])
        torch.testing.assert_close(out, attend_gqa(q, kq, vq, kr, vr), rtol=1e-5, atol=1e-5)

    def test_mha_with_explicit_scale(self):
        kq, vq, kr, vr = packed_cache(B=2, H=3, seed=1)
        q = torch.randn(2, 3, 1, 32)
        gm, rewrites, out = capture(attend_mha_scaled, q, kq, vq, kr, vr)
        self.assertExpectedInline("\n".join(map(str, rewrites)), """scaled_dot_product_attention: dequantize+sdpa -> decode_attention q_heads=3 kv_heads=3 K2V2 G=32 view=identity""")
        self.assertIn("0.3, None)", kivi_lines(gm))
        torch.testing.assert_close(out, attend_mha_scaled(q, kq, vq, kr, vr), rtol=1e-5, atol=1e-5)

    def test_dense_keys_read_elsewhere_stay(self):
        kq, vq, kr, vr = packed_cache()
        q = torch.randn(1, 2, 1, 32)
        gm, rewrites, (out, k) = capture(attend_and_return_keys, q, kq, vq, kr, vr)
        self.assertEqual(len(rewrites), 1)
        targets = [str(n.target) for n in gm.graph.nodes]
        self.assertIn("kivi.dequantize_keys", " ".join(targets))  # still returned
        self.assertNotIn("kivi.dequantize_values", " ".join(targets))  # dead after the rewrite
        ref_out, ref_k = attend_and_return_keys(q, kq, vq, kr, vr)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, ref_k)


@pytest.mark.parametrize("case", ["two_query_tokens", "mask", "causal"])
def test_off_contract_attention_is_left_alone(case):
    kq, vq, kr, vr = packed_cache()
    if case == "two_query_tokens":
        fn, args = attend_gqa, (torch.randn(1, 4, 2, 32), kq, vq, kr, vr)
    elif case == "mask":
        fn, args = attend_masked, (torch.randn(1, 2, 1, 32), kq, vq, kr, vr, torch.rand(1, 1, 1, 85) > 0.3)
    else:
        fn, args = attend_causal, (torch.randn(1, 2, 1, 32), kq, vq, kr, vr)
    gm, rewrites, out = capture(fn, *args)
    assert rewrites == []
    assert any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(out, fn(*args))


def test_kivi_backend_fuses_and_reports():
    kq, vq, kr, vr = packed_cache(bits=2)
    q = torch.randn(1, 4, 1, 32)
    torch._dynamo.reset()
    out = torch.compile(attend_gqa, backend=make_kivi_backend(), fullgraph=True)(q, kq, vq, kr, vr)
    assert [type(r) for r in last_rewrites()] == [DequantRewrite]
    torch.testing.assert_close(out, attend_gqa(q, kq, vq, kr, vr), rtol=1e-5, atol=1e-5)


def test_tiny_llama_over_kivi_cache_compiles_onto_the_fused_op():
    """A stock transformers Llama over the dynamic KIVICache (sdpa attention over what update()
    returns): compiled with the kivi backend, each decode graph's attention layers run the fused
    op, and greedy decoding gives eager KIVI's tokens.

    Under tracing, transformers < 5.24 (5.17 on the GPU machine) hands sdpa an explicit mask in
    decode steps instead of None (it cannot check for padding without a data-dependent branch);
    the pass must then leave the attention alone (a mask is off the fused op's contract: with
    padding it would matter) and the tokens must still be eager KIVI's."""
    from models import greedy, tiny_llama

    from kivi_ops.cache import KIVICache
    from kivi_ops.config import KIVIConfig

    cfg = KIVIConfig(residual_length=32)
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits = greedy(model, KIVICache(cfg, config=model.config), ids, 12)
    kivi, masked = make_kivi_backend(cfg), []

    def backend(gm, example_inputs, **kwargs):  # notes whether the graph's SDPA calls get a mask
        masked.append(any(n.kwargs.get("attn_mask") is not None for n in gm.graph.nodes
                          if "scaled_dot_product_attention" in str(n.target)))
        return kivi(gm, example_inputs, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    tokens, logits = greedy(compiled, KIVICache(cfg, config=model.config), ids, 12)
    rewrites = last_rewrites()  # the last compiled graph: a decode step
    if masked[-1]:
        assert rewrites == []
    else:
        assert len(rewrites) == 2 and all(isinstance(r, DequantRewrite) for r in rewrites), rewrites
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


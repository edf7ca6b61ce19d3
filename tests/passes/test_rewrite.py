"""The FX pass on captured graphs: what it rewrites (expect tests), what it leaves alone, and
that the rewritten graph computes what eager KIVI computes."""

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase

from kivi_ops.config import KIVIConfig
from kivi_ops.passes import rewrite_static_cache_attention
from models import OneLayerAttention, tiny_llama

CFG = KIVIConfig(residual_length=32)


def capture(fn, *calls, config=CFG):
    """Compile ``fn`` with a backend that only runs the pass (the rewritten graph then runs
    eagerly); call it once per args tuple in ``calls``; returns [(graph module, PassResult)]."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, rewrite_static_cache_attention(gm, config)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    outs = [compiled(*args) for args in calls]
    return graphs, outs


def kivi_lines(gm) -> str:
    """The graph's kivi op, pad-key fill and SDPA calls, one per line."""
    shown = ("kivi", "keys_without_pads", "scaled_dot")
    return "\n".join(n.format_node() for n in gm.graph.nodes
                     if n.op == "call_function" and any(s in str(n.target) for s in shown))


def assert_prefill_form(got: str, causal: str, masked: str) -> None:
    """A traced prefill reaches SDPA in one of two forms, by transformers version: no mask and
    ``is_causal=True`` over a prefix slice of the buffers (5.24), or an explicit bool mask over the
    whole buffers (5.17). The pass rewrites both; ``got`` must be exactly one of them."""
    assert got in (causal, masked), f"prefill rewritten as neither expected form:\n{got}"


class TestRewrite(TestCase):
    def test_one_layer(self):
        mod = OneLayerAttention()
        x, pos = torch.randn(1, 1, 64), torch.tensor([0])
        (gm, res), = capture(mod, (x, pos))[0]
        self.assertEqual(len(res.rewrites), 1)
        self.assertExpectedInline(str(res.rewrites[0]), """l_self_buffers_k_cache_/l_self_buffers_v_cache_ [1, 2, 96, 32] q_heads=4 new_tokens=1 view=identity mask=bool causal=False""")
        self.assertExpectedInline(kivi_lines(gm), """\
%keys_without_pads : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k, %mask, %l_pos_, 32), kwargs = {})
%static_kv_append__default : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%l_self_buffers_k_cache_, %l_self_buffers_v_cache_, %keys_without_pads, %v, %l_pos_, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q, %l_self_buffers_k_cache_, %l_self_buffers_v_cache_, %k, %v, %l_pos_, %mask, False, 2, 2, 32, 32, 0.17677669529663687), kwargs = {})""")
        self.assertFalse(any("index_copy_" in str(n.target) for n in gm.graph.nodes))

    def test_tiny_llama_mha_decode(self):
        from transformers import StaticCache

        model = tiny_llama(num_kv_heads=4)
        cache = StaticCache(config=model.config, max_cache_len=64)
        ids = torch.randint(0, 128, (1, 5))
        graphs, _ = capture(lambda i: model(i, past_key_values=cache, use_cache=True).logits, (ids,), (ids[:, :1],))
        (prefill, rp), (decode, rd) = graphs
        assert_prefill_form("\n".join(map(str, rp.rewrites)), """\
keys/values [1, 4, 64, 32] q_heads=4 new_tokens=5 view=prefix_slice mask=none causal=True
keys_1/values_1 [1, 4, 64, 32] q_heads=4 new_tokens=5 view=prefix_slice mask=none causal=True""", """\
keys/values [1, 4, 64, 32] q_heads=4 new_tokens=5 view=identity mask=bool causal=False
keys_1/values_1 [1, 4, 64, 32] q_heads=4 new_tokens=5 view=identity mask=bool causal=False""")
        assert_prefill_form(kivi_lines(prefill), """\
%static_kv_append__default : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%keys, %values, %k_embed, %value_states, %cache_position, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed, %keys, %values, %k_embed, %value_states, %cache_position, None, True, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})
%static_kv_append__default_1 : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%keys_1, %values_1, %k_embed_1, %value_states_1, %cache_position_1, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default_1 : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed_1, %keys_1, %values_1, %k_embed_1, %value_states_1, %cache_position_1, None, True, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})""", """\
%keys_without_pads : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k_embed, %attention_mask_1, %cache_position, 32), kwargs = {})
%static_kv_append__default : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%keys, %values, %keys_without_pads, %value_states, %cache_position, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed, %keys, %values, %k_embed, %value_states, %cache_position, %attention_mask_1, False, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})
%keys_without_pads_1 : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k_embed_1, %attention_mask_1, %cache_position_1, 32), kwargs = {})
%static_kv_append__default_1 : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%keys_1, %values_1, %keys_without_pads_1, %value_states_1, %cache_position_1, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default_1 : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed_1, %keys_1, %values_1, %k_embed_1, %value_states_1, %cache_position_1, %attention_mask_1, False, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})""")
        self.assertExpectedInline("\n".join(map(str, rd.rewrites)), """\
l_cache_layers_0_keys/l_cache_layers_0_values [1, 4, 64, 32] q_heads=4 new_tokens=1 view=identity mask=bool causal=False
l_cache_layers_1_keys/l_cache_layers_1_values [1, 4, 64, 32] q_heads=4 new_tokens=1 view=identity mask=bool causal=False""")
        self.assertExpectedInline(kivi_lines(decode), """\
%keys_without_pads : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k_embed, %attention_mask_1, %cache_position, 32), kwargs = {})
%static_kv_append__default : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%l_cache_layers_0_keys, %l_cache_layers_0_values, %keys_without_pads, %value_states, %cache_position, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed, %l_cache_layers_0_keys, %l_cache_layers_0_values, %k_embed, %value_states, %cache_position, %attention_mask_1, False, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})
%keys_without_pads_1 : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k_embed_1, %attention_mask_1, %cache_position_1, 32), kwargs = {})
%static_kv_append__default_1 : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%l_cache_layers_1_keys, %l_cache_layers_1_values, %keys_without_pads_1, %value_states_1, %cache_position_1, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default_1 : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed_1, %l_cache_layers_1_keys, %l_cache_layers_1_values, %k_embed_1, %value_states_1, %cache_position_1, %attention_mask_1, False, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})""")

    def test_tiny_llama_gqa_decode(self):
        from transformers import StaticCache

        model = tiny_llama(num_kv_heads=2, layers=1)
        cache = StaticCache(config=model.config, max_cache_len=64)
        ids = torch.randint(0, 128, (1, 5))
        graphs, _ = capture(lambda i: model(i, past_key_values=cache, use_cache=True).logits, (ids,), (ids[:, :1],))
        (prefill, rp), (decode, rd) = graphs
        assert_prefill_form("\n".join(map(str, rp.rewrites)),
                            "keys/values [1, 2, 64, 32] q_heads=4 new_tokens=5 view=prefix_slice mask=none causal=True",
                            "keys/values [1, 2, 64, 32] q_heads=4 new_tokens=5 view=repeat_kv mask=bool causal=False")
        self.assertExpectedInline("\n".join(map(str, rd.rewrites)), """\
l_cache_layers_0_keys/l_cache_layers_0_values [1, 2, 64, 32] q_heads=4 new_tokens=1 view=repeat_kv mask=bool causal=False""")
        self.assertExpectedInline(kivi_lines(decode), """\
%keys_without_pads : [num_users=1] = call_function[target=kivi_ops.passes.rewrite_attention.keys_without_pads](args = (%k_embed, %attention_mask_1, %cache_position, 32), kwargs = {})
%static_kv_append__default : [num_users=0] = call_function[target=torch.ops.kivi.static_kv_append_.default](args = (%l_cache_layers_0_keys, %l_cache_layers_0_values, %keys_without_pads, %value_states, %cache_position, 2, 2, 32, 32), kwargs = {})
%static_kv_attention_default : [num_users=1] = call_function[target=torch.ops.kivi.static_kv_attention.default](args = (%q_embed, %l_cache_layers_0_keys, %l_cache_layers_0_values, %k_embed, %value_states, %cache_position, %attention_mask_1, False, 2, 2, 32, 32, 0.1767766952966369), kwargs = {})""")


class TestLeavesAlone(TestCase):
    def test_graph_without_cache_attention_is_unchanged(self):
        def attn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        q = torch.randn(1, 2, 8, 32)
        (gm, res), = capture(attn, (q, q, q))[0]
        self.assertEqual(res.rewrites, [])
        self.assertIsNone(res.fallback_reason)
        self.assertIn("scaled_dot_product_attention", gm.code)

    def test_other_reader_of_the_cache_falls_back(self):
        class Leaky(OneLayerAttention):
            def forward(self, x, pos):
                return super().forward(x, pos), self.k_cache.sum()

        (gm, res), = capture(Leaky(), (torch.randn(1, 1, 64), torch.tensor([0])))[0]
        self.assertEqual(res.rewrites, [])
        self.assertExpectedInline(res.fallback_reason, """the cache buffer l_self_buffers_k_cache_ has other readers (sum_1): their fp values would be KIVI state after the rewrite""")
        self.assertIn("index_copy_", gm.code)

    def test_cache_too_short_falls_back(self):
        (gm, res), = capture(OneLayerAttention(max_len=32), (torch.randn(1, 1, 64), torch.tensor([0])))[0]
        self.assertEqual(res.rewrites, [])
        self.assertExpectedInline(res.fallback_reason, """a [1, 2, 32, 32] cache buffer has 8192 bytes but KIVI keys state needs 10240 (max_cache_len 32 is too short for residual_length 32; use a longer cache or a smaller residual_length)""")


def test_rewritten_one_layer_matches_static_cache_eagerly():
    # the rewritten graph, run eagerly, equals StaticKIVICache fed the same k, v
    from kivi_ops.cache.static import StaticKIVICache

    mod = OneLayerAttention()
    ref_cache = StaticKIVICache(1, 1, 2, 96, 32, CFG, dtype=torch.float32)
    xs = [torch.randn(1, 1, 64) for _ in range(50)]
    graphs, outs = capture(mod, *[(x, torch.tensor([i])) for i, x in enumerate(xs)])
    assert len(graphs) == 1 and len(graphs[0][1].rewrites) == 1
    for i, (x, out) in enumerate(zip(xs, outs)):
        q, k, v = mod.qkv(x).view(1, 1, -1, 32).transpose(1, 2).split([4, 2, 2], dim=1)
        ref = ref_cache.attend(0, q, k, v, ref_cache.positions(1))
        ref_cache.advance_(1)
        torch.testing.assert_close(out, ref)

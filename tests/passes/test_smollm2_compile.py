"""The real SmolLM2-135M-Instruct with a StaticCache, compiled with kivi_backend, decodes the same
greedy tokens as the eager KIVI model (the dynamic KIVICache) on CPU."""

import pytest
import torch

from kivi_ops.cache import KIVICache
from kivi_ops.config import KIVIConfig
from kivi_ops.passes import last_rewrites, make_kivi_backend
from models import greedy
from tests.smollm2_model import smollm2

CFG = KIVIConfig(residual_length=32)
STEPS = 24  # the 40-token prompt leaves 8 keys in the residual: the 24 steps cross a key flush


@pytest.mark.slow
def test_compiled_smollm2_decodes_like_eager_kivi():
    from pydoc_data.topics import topics
    from transformers import DynamicCache, StaticCache

    model, tok = smollm2()
    ids = tok(topics["assert"], return_tensors="pt").input_ids[:, :40]
    ref_tokens, ref_logits = greedy(model, KIVICache(CFG, config=model.config), ids, STEPS)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_kivi_backend(CFG), fullgraph=True)
    tokens, logits = greedy(compiled, StaticCache(config=model.config, max_cache_len=96), ids, STEPS)
    rewrites = last_rewrites()
    assert len(rewrites) == model.config.num_hidden_layers  # every attention layer of the decode graph
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=2e-3)
    # and the comparison can tell KIVI from full precision on this model
    _, fp_logits = greedy(model, DynamicCache(config=model.config), ids, STEPS)
    assert (fp_logits - ref_logits).abs().max() > 0.05

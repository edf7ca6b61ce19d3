"""KIVICache inside real transformers models (tiny random ones): exactness, rules, padding, bytes."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kivi_ops.cache.transformers_cache import KIVICache
from kivi_ops.config import KIVIConfig
from kivi_ops.integrations.transformers import attach, cache_kwarg_name, detach
from kivi_ops.models import RANDOM_ARCHS, random_model
from kivi_ops.ops import reference as ref

G, R = 16, 32
CFG = KIVIConfig(group_size=G, residual_length=R)


def forward(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg_name(model): cache}).logits


def stream(model, cache, ids, prefill, mask=None):
    """Prefill ``prefill`` tokens, then feed the rest one by one; logits of every step, concatenated."""
    out = [forward(model, ids[:, :prefill], cache, None if mask is None else mask[:, :prefill])]
    for i in range(prefill, ids.shape[1]):
        out.append(forward(model, ids[:, i:i + 1], cache, None if mask is None else mask[:, :i + 1]))
    return torch.cat(out, 1)


class SimulatedKIVILayer(DynamicLayer):
    """Keeps everything dense and returns what DESIGN §1 says a KIVI cache holds, via the reference ops."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def update(self, k, v, *args, **kwargs):
        first = self.get_seq_length() == 0
        keys, values = super().update(k, v)
        if first:
            return k, v
        N, c = keys.shape[2], self.cfg
        nk, nv = N - N % c.residual_length, N - min(N, c.residual_length)
        kd = ref.dequantize_keys(*ref.quantize_keys(keys[:, :, :nk], c.k_bits, c.group_size), c.k_bits, c.group_size)
        vd = ref.dequantize_values(*ref.quantize_values(values[:, :, :nv], c.v_bits, c.group_size), c.v_bits,
                                   c.group_size)
        return torch.cat([kd, keys[:, :, nk:]], 2), torch.cat([vd, values[:, :, nv:]], 2)


def simulated_cache(model, cfg):
    c = DynamicCache(config=model.config)
    c.layers = [SimulatedKIVILayer(cfg) for _ in range(model.config.num_hidden_layers)]
    return c


@pytest.mark.parametrize("arch", RANDOM_ARCHS)
def test_residual_longer_than_sequence_is_bitwise_dynamic_cache(arch):
    model = random_model(arch)
    ids = torch.randint(1, 128, (2, 30))
    big = KIVIConfig(group_size=G, residual_length=1024)
    got = stream(model, KIVICache(big, config=model.config), ids, 20)
    expected = stream(model, DynamicCache(config=model.config), ids, 20)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_logits_match_a_reference_ops_simulation(bits):
    model = random_model("smollm2")
    cfg = KIVIConfig(k_bits=bits, v_bits=bits, group_size=G, residual_length=R)
    ids = torch.randint(1, 128, (2, 110))
    got = stream(model, KIVICache(cfg, config=model.config), ids, 45)
    expected = stream(model, simulated_cache(model, cfg), ids, 45)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    dense = stream(model, DynamicCache(config=model.config), ids, 45)
    assert (got - dense).abs().max() > 1e-3  # quantization is really happening


@pytest.mark.parametrize("T, n", [(15, 0), (16, 17), (31, 1), (32, 0), (33, 31), (64, 33), (70, 60)])
def test_counts_in_every_layer_follow_the_rules(T, n):
    model = random_model("qwen2")
    cache = KIVICache(CFG, config=model.config)
    stream(model, cache, torch.randint(1, 128, (1, T + n)), T)
    N = T + n
    for i in range(model.config.num_hidden_layers):
        assert cache.token_counts(i) == dict(keys_quantized=N - N % R, keys_residual=N % R,
                                             values_quantized=N - min(N, R), values_residual=min(N, R))
    assert cache.get_seq_length() == N


def storage_bytes(cache):
    seen = {}
    for layer in cache.layers:
        for t in layer.state.tensors().values():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_memory_footprint_equals_storage_and_counts_dense_bytes():
    model = random_model("smollm2")
    cache = KIVICache(KIVIConfig(group_size=16, residual_length=32), config=model.config)
    stream(model, cache, torch.randint(1, 128, (2, 100)), 70)
    fp = cache.memory_footprint()
    assert fp.total_bytes == storage_bytes(cache)
    L, B, H, T, D = model.config.num_hidden_layers, 2, 3, 100, 32
    assert fp.fp16_bytes == L * B * H * T * D * 2 * 2 and fp.dense_bytes == 2 * fp.fp16_bytes  # fp32 model
    assert fp.compression_vs_dense > 1.5


def padded_batch(pad_id):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 60), generator=g)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :11] = 0  # left padding: 11 pads, spanning a whole group and part of the next
    ids[1, :11] = pad_id
    return ids, mask


def padded_stream(model, pad_id, prefill=45):
    ids, mask = padded_batch(pad_id)
    cache = KIVICache(CFG, config=model.config)
    return stream(model, cache, ids, prefill, mask)


def test_pad_token_id_changes_no_real_logits():
    model = random_model("smollm2")
    attach(model)  # the hook hands the attention mask to the cache
    a, b = padded_stream(model, 0), padded_stream(model, 77)
    real = torch.ones(2, 60, dtype=torch.bool)
    real[1, :11] = False
    assert torch.equal(a[real], b[real])
    # The test bites: without the mask the pads stretch the key groups and the logits move.
    detach(model)
    with pytest.warns(UserWarning, match="attention mask"):
        c = padded_stream(model, 0)
    d = padded_stream(model, 77)
    assert not torch.allclose(c[real], d[real], atol=1e-5)


def test_an_all_real_mask_reaches_no_layer(monkeypatch):
    # the mask is checked for pads once per forward (one host sync on a GPU), not in every layer:
    # decode steps of an unpadded batch hand the layers no mask; the prefill of a padded one does
    from kivi_ops.cache.transformers_cache import KIVILayer

    model = random_model("smollm2")
    attach(model)
    seen = []
    update = KIVILayer.update

    def spy(self, k, v, *args, valid=None, **kwargs):
        seen.append(valid)
        return update(self, k, v, *args, valid=valid, **kwargs)

    monkeypatch.setattr(KIVILayer, "update", spy)
    ids, mask = padded_batch(0)
    cache = KIVICache(CFG, config=model.config)
    stream(model, cache, ids, 40, mask)
    layers = model.config.num_hidden_layers
    assert all(v is not None for v in seen[:layers])  # the padded prefill
    assert all(v is None for v in seen[layers:]) and len(seen) == layers * 21  # 20 unpadded decode steps
    detach(model)


def test_mask_can_be_given_by_hand():
    model = random_model("smollm2")
    ids, mask = padded_batch(5)
    cache = KIVICache(CFG, config=model.config)
    cache.set_attention_mask(mask[:, :40])
    forward(model, ids[:, :40], cache, mask[:, :40])
    assert cache.layers[0].padded
    with pytest.raises(ValueError, match="covers"):
        cache.set_attention_mask(mask[:, :40])  # must also cover the new tokens


def test_sliding_window_layers_keep_exact_outputs_with_a_long_residual():
    model = random_model("mistral", sliding_window=24)
    attach(model)
    ids = torch.randint(1, 128, (1, 50))
    big = KIVIConfig(group_size=G, residual_length=1024)
    got = stream(model, KIVICache(big, config=model.config), ids, 20)
    expected = stream(model, DynamicCache(config=model.config), ids, 20)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reset_crop_and_errors():
    model = random_model("llama3")
    cache = KIVICache(CFG, config=model.config)
    ids = torch.randint(1, 128, (1, 40))
    first = stream(model, cache, ids, 33)
    cache.crop(0)  # a no-op is fine
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_footprint().total_bytes == 0
    assert torch.equal(stream(model, cache, ids, 33), first)
    before = cache.memory_footprint()
    with pytest.raises(ValueError):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert cache.memory_footprint() == before and cache.get_seq_length() == 40


def test_models_it_cannot_serve_are_refused():
    model = random_model("smollm2")
    with pytest.raises(ValueError, match="head_dim"):
        KIVICache(KIVIConfig(group_size=64, residual_length=128), config=model.config)
    with pytest.raises(TypeError):
        KIVICache({"k_bits": 2}, config=model.config)


@pytest.mark.parametrize("with_config", [True, False])
def test_without_a_kivi_config_it_takes_the_models_quantize_config(with_config):
    # quantize_(model, KIVI-4) then a bare KIVICache(): KIVI-4 too, not the default KIVI-2
    from kivi_ops.quantize import quantize_, unquantize_

    model = random_model(RANDOM_ARCHS[0])
    ids = torch.randint(1, 128, (1, 50))
    cfg4 = KIVIConfig(k_bits=4, v_bits=4, group_size=G, residual_length=R)
    expected = stream(model, simulated_cache(model, cfg4), ids, 10)
    quantize_(model, cfg4)
    try:
        cache = KIVICache(config=model.config) if with_config else KIVICache()
        got = stream(model, cache, ids, 10)
        assert cache.kivi_config == cfg4 and all(layer.state.config == cfg4 for layer in cache.layers)
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)
        explicit = KIVICache(CFG, config=model.config)  # an explicit config is the user's choice and stays
        forward(model, ids[:, :10], explicit)
        assert explicit.kivi_config == CFG and explicit.layers[0].state.config == CFG
    finally:
        unquantize_(model)

"""row_buffer: the quantized values' buffers with spare rows (one decode step writes one token)."""

import pytest
import torch

from kivi_ops import ops
from kivi_ops.cache import row_buffer
from kivi_ops.cache.state import KIVIState
from kivi_ops.config import KIVIConfig
from kivi_ops.ops import reference as ref
from tests.conftest import requires_cuda_kernels

G, R = 16, 32


def rows(n, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (2, 3, n, C), generator=g, dtype=torch.uint8), torch.randn(2, 3, n, 4, generator=g)


@pytest.mark.parametrize("used", [0, 1, 15, 16, 17, 255, 256, 4096, 100000])
def test_spare_rows_bound_the_memory_and_keep_16_byte_head_strides(used):
    spare = row_buffer.spare_rows(used)
    assert (used + spare) % 16 == 0
    assert row_buffer.MIN_SPARE_ROWS <= spare < max(row_buffer.MIN_SPARE_ROWS, used // 16) + 16


def test_append_rows_equals_cat_and_writes_in_place_until_full():
    used = tuple(x[:, :, :0] for x in rows(0, 8, 0))
    store, expected, allocations, kept = None, [torch.empty_like(u) for u in used], 0, []
    for step in range(300):
        new = rows(1 if step else 40, 8, step + 1)
        before = None if store is None else store[0].data_ptr()
        used, store = row_buffer.append_rows(used, store, new)
        allocations += store[0].data_ptr() != before
        expected = [torch.cat([e, x], 2) for e, x in zip(expected, new)]
        for u, e in zip(used, expected):
            assert torch.equal(u, e)
        kept.append((used[0], used[0].clone()))
        assert store[0].shape[2] >= used[0].shape[2] and store[0].shape[2] % 16 == 0
    # 339 rows appended one at a time: the buffers grew a handful of times, not at every step
    assert allocations <= 20
    # a view taken at any earlier step still holds what it held (used rows are never rewritten)
    for view, copy in kept:
        assert torch.equal(view, copy)


def test_traced_by_torch_compile_it_appends_exact_size_tensors():
    """Under Dynamo the buffers' capacity would be one more shape to guard on (a recompile at each
    growth), so a compiled append concatenates, as the state did before the buffers."""
    used = tuple(x[:, :, :7] for x in rows(7, 8, 0))
    new = rows(1, 8, 1)

    def append(used, new):
        views, store = row_buffer.append_rows(used, None, new)
        return views, store is None

    torch._dynamo.reset()
    views, no_store = torch.compile(append, backend="eager", fullgraph=True)(used, new)
    assert no_store
    for v, u, x in zip(views, used, new):
        assert torch.equal(v, torch.cat([u, x], 2)) and v.shape[2] == 8


def decode(state, k, v, start):
    for i in range(start, k.shape[2]):
        state.append(k[:, :, i:i + 1], v[:, :, i:i + 1])


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_steps_write_values_in_place_and_match_the_reference(bits):
    cfg = KIVIConfig(k_bits=bits, v_bits=bits, group_size=G, residual_length=R)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 700, 32, generator=g), torch.randn(2, 2, 700, 32, generator=g)
    s = KIVIState(cfg)
    s.append(k[:, :, :100], v[:, :, :100])
    ptrs = set()
    for i in range(100, 700):
        s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        ptrs.add(s.v_codes.untyped_storage().data_ptr())
    assert len(ptrs) <= 20  # 600 value tokens quantized one per step, a handful of re-allocations
    vq = 700 - R
    want = ref.quantize_values(v[:, :, :vq], bits, G)
    for got, w in zip((s.v_codes, s.v_scale, s.v_zero), want):
        assert torch.equal(got, w)
    fp = s.footprint()
    used_rows = fp.reserved_bytes // (2 * 2 * (32 * bits // 8 + 2 * (32 // G) * 4))
    assert 0 < fp.reserved_bytes and used_rows <= vq // 16 + 32


def test_batch_surgery_after_growth_keeps_appending_correctly():
    cfg = KIVIConfig(group_size=G, residual_length=R)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 2, 200, 32, generator=g), torch.randn(3, 2, 200, 32, generator=g)
    s = KIVIState(cfg)
    s.append(k[:, :, :60], v[:, :, :60])
    decode(s, k[:, :, :120], v[:, :, :120], 60)
    idx = torch.tensor([2, 0])
    s.index_batch(idx)
    assert s.footprint().reserved_bytes == 0  # index_select made exact-size tensors
    decode(s, k[idx], v[idx], 120)
    want = ref.quantize_values(v[idx][:, :, :200 - R], 2, G)
    for got, w in zip((s.v_codes, s.v_scale, s.v_zero), want):
        assert torch.equal(got, w)


@requires_cuda_kernels
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_fused_attention_reads_the_value_views_without_copies(bits):
    """The views of the spare-row buffers keep the fused kernel's fast path: same output as contiguous
    copies, the tensor-core kernel runs, and no copy kernel precedes it."""
    cfg = KIVIConfig(k_bits=bits, v_bits=bits, group_size=32, residual_length=128, backend="cuda")
    k, v = (torch.randn(2, 4, 2300, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    s = KIVIState(cfg)
    s.append(k[:, :, :2200], v[:, :, :2200])
    decode(s, k, v, 2200)
    assert s.footprint().reserved_bytes > 0 and not s.v_codes.is_contiguous()
    q = torch.randn(2, 16, 1, 128, dtype=torch.float16, device="cuda")
    want = ops.decode_attention(q, (s.k_codes, s.k_scale, s.k_zero),
                                tuple(x.contiguous() for x in (s.v_codes, s.v_scale, s.v_zero)),
                                s.k_residual, s.v_residual, k_bits=bits, v_bits=bits, group_size=32, backend="cuda")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = s.attend(q)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert torch.equal(got, want)
    assert any("attn_fused_kernel" in n for n in names), names
    assert not any("copy" in n.lower() or "elementwise" in n.lower() for n in names), names

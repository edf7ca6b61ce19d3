"""Fused decode attention over [quantized ‖ residual] against the reference and against plain
SDPA on the dequantized cache."""

import math

import pytest
import torch

from kivi_ops import ops
from kivi_ops.ops import reference
from tests.conftest import kernel_backends, requires_cuda_kernels, view_with_spare_rows
from tests.ops.test_qmatmul import TOL, rel_err


def make_cache(B, Hkv, Tk, Tv, T, D, G, k_bits, v_bits, dtype, device, backend="reference", outlier=True):
    """Random KV of T tokens, keys quantized up to Tk, values up to Tv (Tk, Tv multiples/any)."""
    k = torch.randn(B, Hkv, T, D)
    if outlier:
        k[..., 1] *= 1e3 / 4  # outlier key channel
    v = torch.randn(B, Hkv, T, D)
    k, v = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
    k_q = ops.quantize_keys(k[:, :, :Tk].contiguous(), k_bits, G, backend=backend)
    v_q = ops.quantize_values(v[:, :, :Tv].contiguous(), v_bits, G, backend=backend)
    return k_q, v_q, k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()


def dtype_rounding_error(q, k_q, v_q, k_r, v_r, k_bits, v_bits, G, want, scale=None):
    """How far attention moves from the float32 reference when only the inputs are rounded to
    q.dtype (the dequantized cache, q): what any attention kernel in that dtype, fp16 SDPA
    included, may differ by. Outlier key channels make it large for fp16/bf16. ``scale``: the
    softmax scale (1/sqrt(D) by default)."""
    if q.dtype == torch.float32:
        return 0.0
    keys = torch.cat([ops.dequantize_keys(*k_q, k_bits, G, backend="reference").to(q.device), k_r], 2)  # q.dtype
    values = torch.cat([ops.dequantize_values(*v_q, v_bits, G, backend="reference").to(q.device), v_r], 2)
    n_rep = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(n_rep, 1).float(), values.repeat_interleave(n_rep, 1).float()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q.float() @ keys.transpose(-1, -2) * scale, -1)
    return rel_err((p.to(q.dtype).float() @ values), want)


def attention_tolerance(q, k_q, v_q, k_r, v_r, k_bits, v_bits, G, want, scale=None) -> float:
    """The dtype's base tolerance plus twice the error that rounding the inputs alone causes."""
    return TOL[q.dtype] * 2 + 2 * dtype_rounding_error(q, k_q, v_q, k_r, v_r, k_bits, v_bits, G, want, scale)


def assert_cuda_matches_reference(B, Hkv, n_rep, M, Tk, Tv, T, D, G, bits, lengths=(None,), dtype=torch.float16):
    """The CUDA op on a random cache (make_cache's arguments; fp16 unless ``dtype``) against the
    reference, for each of ``lengths`` (None or an int tensor [B] on the GPU), within
    attention_tolerance."""
    k_q, v_q, k_r, v_r = make_cache(B, Hkv, Tk, Tv, T, D, G, *bits, dtype, "cuda")
    q = torch.randn(B, Hkv * n_rep, M, D, device="cuda").to(dtype)
    for lens in lengths:
        got = ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=bits[0], v_bits=bits[1], group_size=G,
                                   lengths=lens, backend="cuda")
        want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, *bits, G, 1 / math.sqrt(D), lens)
        assert rel_err(got, want) < attention_tolerance(q, k_q, v_q, k_r, v_r, *bits, G, want)


CASES = [  # B, Hkv, n_rep, M, Tk, Tv, T, D, G
    (1, 1, 1, 1, 0, 0, 7, 64, 32),  # residual only (short prompt)
    (1, 2, 4, 1, 128, 0, 128, 128, 32),  # quantized keys only, no key residual
    (2, 2, 3, 1, 256, 160, 288, 128, 32),  # KIVI split: Tk = T - T mod R, Tv = T - R (R = 128)
    (1, 1, 8, 4, 512, 389, 517, 64, 64),  # odd T, speculative M = 4
    (3, 4, 1, 1, 96, 33, 150, 128, 32),  # MHA, three sequences
    (1, 2, 4, 8, 1024, 1000, 1100, 128, 128),
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_matches_reference(backend, dtype, bits, case):
    name, device = backend
    B, Hkv, n_rep, M, Tk, Tv, T, D, G = case
    k_q, v_q, k_r, v_r = make_cache(B, Hkv, Tk, Tv, T, D, G, *bits, dtype, device)
    q = torch.randn(B, Hkv * n_rep, M, D, device=device).to(dtype)
    got = ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=bits[0], v_bits=bits[1], group_size=G, backend=name)
    want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, *bits, G, 1 / math.sqrt(D))
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_err(got, want) < attention_tolerance(q, k_q, v_q, k_r, v_r, *bits, G, want)


@requires_cuda_kernels
@pytest.mark.parametrize("ring", ["1", "2"])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (2, 4), (4, 2)])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_warps_stream_several_tiles_through_the_ring(monkeypatch, ring, bits, D):
    """One split per head (KIVI_ATTN_SPLITS=1): each warp streams 5 tiles through its cp.async ring.
    KIVI_ATTN_RING=1 picks the one-stage split-phase ring where the shape has one (4-bit keys or
    values at head_dim 128: the next tile's keys, then values, load into the region the warp has
    just read); elsewhere both runs take the two-stage ring."""
    monkeypatch.setenv("KIVI_ATTN_SPLITS", "1")
    monkeypatch.setenv("KIVI_ATTN_RING", ring)
    assert_cuda_matches_reference(2, 2, 4, 1, 1280, 1180, 1300, D, 32, bits)  # 20 tiles of 64 tokens


@requires_cuda_kernels
@pytest.mark.parametrize("bits", [(2, 2), (4, 4)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("splits", ["1", "160"])
def test_cuda_long_splits_and_many_splits(monkeypatch, splits, bits, D):
    """160 bulk tiles per head. KIVI_ATTN_SPLITS=1 (raised to 2 by the q.z table's cap of 127
    tiles): each block holds 80 tiles, 160 key groups, so its q.z prologue takes three rounds of
    64 groups, the later two prefetched into L2. KIVI_ATTN_SPLITS=160: a split per tile, so the
    split combine merges more than 64 (D = 128) or 128 (D = 64) splits per row: several batches of
    loads per thread."""
    monkeypatch.setenv("KIVI_ATTN_SPLITS", splits)
    assert_cuda_matches_reference(1, 2, 4, 1, 10240, 10240, 10300, D, 32, bits)  # 160 tiles of 64 tokens


@requires_cuda_kernels
@pytest.mark.parametrize("light", ["1", "2"])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4)])
def test_cuda_light_splits_cover_the_bulk_once(monkeypatch, light, bits):
    """Light splits (KIVI_ATTN_LIGHT=1 or 2 tiles per warp): the bulk splits that also run a tail
    chunk take fewer tiles and the others more, so split s starts at s * tps minus the light
    splits before it. 4 merged splits of 18 bulk tiles with 3 tail chunks of 64 tokens: every tile
    must be counted once, also for a sequence that ends inside a light split."""
    for knob, value in (("KIVI_ATTN_SPLITS", "4"), ("KIVI_ATTN_TAIL_CHUNK", "64"), ("KIVI_ATTN_TAIL_APART", "0"),
                        ("KIVI_ATTN_LIGHT", light)):
        monkeypatch.setenv(knob, value)
    assert_cuda_matches_reference(2, 2, 4, 1, 1280, 1180, 1300, 128, 32, bits,
                                  lengths=(None, torch.tensor([1300, 230], device="cuda")))


@requires_cuda_kernels
@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (3, 1), (4, 1), (5, 1), (8, 1)])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4)])
def test_cuda_tail_for_each_row_count(rows, bits):
    """The vector tail is built for 1, 4 and 8 query rows, and a block takes the smallest that holds
    its rows (two-stage kernels, c4292da). (n_rep, M) gives blocks of 1, 2, 3, 4, 5 and 8 rows: each
    copy, full and part-used. 146 tail tokens past 6 bulk tiles: packed keys and values, then fp16."""
    n_rep, M = rows
    assert_cuda_matches_reference(1, 2, n_rep, M, 512, 400, 530, 128, 32, bits)


@requires_cuda_kernels
@pytest.mark.parametrize("rows", [(1, 1), (4, 1), (2, 2), (5, 1)])
@pytest.mark.parametrize("bits", [(2, 2), (4, 2)])
@pytest.mark.parametrize("D, G", [(128, 32), (128, 64), (128, 128), (64, 32), (64, 64)])
@pytest.mark.parametrize("lengths", [None, (700, 64)])
def test_cuda_narrow_value_kernels_every_group_size(rows, bits, D, G, lengths):
    """2-bit values with at most 4 query rows per block take the narrow kernels (value_accum_narrow:
    ldmatrix codes, query rows 0-3 twice in the mma's columns, one scale block per column half);
    5 rows take the byte loads. Every value group size and head_dim, ragged lengths included (the
    tile holding a sequence's end masks tokens that rows 0-3 and their repeats both see)."""
    n_rep, M = rows
    lens = (None,) if lengths is None else (torch.tensor(lengths, device="cuda"),)
    assert_cuda_matches_reference(2, 2, n_rep, M, 768, 640, 780, D, G, bits, lengths=lens)


@requires_cuda_kernels
@pytest.mark.parametrize("rows", [(1, 1), (4, 1), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (2, 4), (4, 2)])
@pytest.mark.parametrize("D, G", [(128, 32), (128, 128), (64, 64)])
@pytest.mark.parametrize("ring", ["1", "2"])
@pytest.mark.parametrize("splits", ["1", "0"])
def test_cuda_paired_kernels(monkeypatch, rows, dtype, bits, D, G, ring, splits):
    """Blocks of at most 4 query rows ((n_rep, M): MHA, GQA 4:1 and 3:1) take the kernels
    whose key mma carries Q'hi and Q'lo of row r in columns 2r and 2r + 1 (kv_tile.cuh key_scores,
    PAIRED), and whose lanes each run one row's softmax: the value sums' rescale factors then come
    from other lanes. Every dtype, bit width, head_dim and a key group per tile and per two tiles,
    both rings where the shape has two (KIVI_ATTN_RING), the outlier key channel of make_cache, and
    a batch of two lengths (one ending inside a tile). With one split per head (KIVI_ATTN_SPLITS=1)
    each warp streams 5 tiles, so its softmax rescales the value sums; 0: the library's own plan
    (a tile or two per warp)."""
    monkeypatch.setenv("KIVI_ATTN_RING", ring)
    if splits != "0":
        monkeypatch.setenv("KIVI_ATTN_SPLITS", splits)
    n_rep, M = rows
    assert_cuda_matches_reference(2, 3, n_rep, M, 1280, 1180, 1300, D, G, bits, dtype=dtype,
                                  lengths=(None, torch.tensor([1300, 711], device="cuda")))


@requires_cuda_kernels
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("signs", [(1,), (-1,), (1, -1, -1, 1)])
def test_cuda_running_max_that_rises_in_every_tile_or_never(monkeypatch, bits, signs):
    """A warp skips its lanes' max reduction for a tile whose scores all stay under the running max
    (decode_attention.cu, kLazyMax). Keys lie along a direction u with a ramp over the packed tokens
    (0 on the residual): query rows +u see every tile raise the max, rows -u see it only in their
    first tile. One split per head (KIVI_ATTN_SPLITS=1), so each warp streams 5 tiles; signs with
    4 entries put both kinds of rows in one block (GQA 4:1)."""
    monkeypatch.setenv("KIVI_ATTN_SPLITS", "1")
    B, Hkv, Tk, Tv, T, D, G = 1, 2, 1280, 1180, 1300, 128, 32
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    ramp = torch.cat([torch.linspace(0, 1, Tk), torch.zeros(T - Tk)])
    k = (0.2 * torch.randn(B, Hkv, T, D) + 4 * ramp[:, None] * u).cuda().half()
    v = torch.randn(B, Hkv, T, D).cuda().half()
    k_q = ops.quantize_keys(k[:, :, :Tk].contiguous(), bits[0], G, backend="reference")
    v_q = ops.quantize_values(v[:, :, :Tv].contiguous(), bits[1], G, backend="reference")
    k_r, v_r = k[:, :, Tk:].contiguous(), v[:, :, Tv:].contiguous()
    q = (torch.tensor(signs, dtype=torch.float32)[:, None] * 24 * u).expand(B, Hkv, -1, -1).reshape(B, -1, 1, D)
    q = (q + 0.1 * torch.randn_like(q)).cuda().half()  # scores from 0 to ~8.5 (ln) along the ramp
    got = ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=bits[0], v_bits=bits[1], group_size=G, backend="cuda")
    want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, *bits, G, 1 / math.sqrt(D))
    assert rel_err(got, want) < attention_tolerance(q, k_q, v_q, k_r, v_r, *bits, G, want)


@requires_cuda_kernels
@pytest.mark.parametrize("shape", [(8, 8, 4, 4096, 2), (1, 32, 1, 32768, 4)])
def test_cuda_light_splits_of_the_default_plan(shape):
    """Shapes of the issue-4 benchmark where the H200's own split plan takes light splits (no knob):
    Llama-3-8B at batch 8, 4k tokens, 2 bits, and Llama-2-7B at batch 1, 32k tokens, 4 bits."""
    B, Hkv, n_rep, T, bits = shape
    assert_cuda_matches_reference(B, Hkv, n_rep, 1, T, T - 128, T, 128, 32, (bits, bits))


@requires_cuda_kernels
@pytest.mark.parametrize("pdl", ["2", "3"])
@pytest.mark.parametrize("splits", ["0", "1"])
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_chained_calls_wait_for_the_call_before(monkeypatch, pdl, splits, graph):
    """Each call's output is the next call's query, with no kernel between: the split kernel is
    launched early (programmatic dependent launch) while the call before still runs (its combine;
    with one split per head, splits="1", its split kernel, which writes the output itself), so its
    blocks must wait for that kernel's end before they read q. Queued back to back behind a 20 ms
    sleep (eager) or replayed from a CUDA graph. A softmax scale of 1 (no outlier key channel) makes
    each query pick out few tokens, so a stale query gives another answer (rel. error ~1.4 on the
    CPU reference). Each step against the reference on the query it was given. KIVI_ATTN_PDL=3: the
    combine also lets the next call's split kernel launch at its start."""
    monkeypatch.setenv("KIVI_ATTN_PDL", pdl)
    if splits == "1":  # 126 bulk tiles and the 128-token tail in one block per head
        for knob, value in (("KIVI_ATTN_SPLITS", "1"), ("KIVI_ATTN_TAIL_APART", "0"), ("KIVI_ATTN_TAIL_CHUNK", "128")):
            monkeypatch.setenv(knob, value)
    bits, G, D, scale, steps = (2, 2), 32, 128, 1.0, 6
    k_q, v_q, k_r, v_r = make_cache(1, 8, 8192, 8064, 8192, D, G, *bits, torch.float16, "cuda", outlier=False)
    q0 = torch.randn(1, 8, 1, D, device="cuda").half()  # MHA: out [1, 8, 1, D] is a query again

    def chain(q):
        outs = [q]
        for _ in range(steps):
            outs.append(ops.decode_attention(outs[-1], k_q, v_q, k_r, v_r, k_bits=bits[0], v_bits=bits[1],
                                              group_size=G, scale=scale, backend="cuda"))
        return outs

    chain(q0)  # warm-up: the workspaces exist, nothing is made in the capture
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = chain(q0)
        g.replay()
    else:
        torch.cuda._sleep(40_000_000)  # ~20 ms: the host queues the whole chain behind it
        outs = chain(q0)
    torch.cuda.synchronize()
    for q, got in zip(outs, outs[1:]):
        want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, *bits, G, scale)
        assert rel_err(got, want) < attention_tolerance(q, k_q, v_q, k_r, v_r, *bits, G, want, scale)


@pytest.mark.parametrize("backend", kernel_backends())
def test_lengths_mask_a_ragged_batch(backend):
    name, device = backend
    k_q, v_q, k_r, v_r = make_cache(3, 2, 256, 160, 300, 64, 32, 2, 2, torch.float16, device)
    q = torch.randn(3, 4, 1, 64, device=device).half()
    lengths = torch.tensor([300, 200, 17], dtype=torch.int32, device=device)
    got = ops.decode_attention(q, k_q, v_q, k_r, v_r, lengths=lengths, backend=name)
    want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, 2, 2, 32, 0.125, lengths)
    assert rel_err(got, want) < 4e-3
    # a sequence's output depends only on its own first lengths[b] tokens: new residuals change
    # nothing for the sequence of 17 tokens (all of them quantized)
    moved = ops.decode_attention(q, k_q, v_q, torch.randn_like(k_r), torch.randn_like(v_r), lengths=lengths,
                                 backend=name)
    assert torch.equal(moved[2], got[2])
    assert not torch.equal(moved[0], got[0])
    # lengths on the cache's device outside [0, T] are refused (one host sync on the GPU)
    for bad in ([301, 200, 17], [300, -1, 17]):
        with pytest.raises(ValueError, match=r"lengths must be in \[0, 300\]"):
            ops.decode_attention(q, k_q, v_q, k_r, v_r, lengths=torch.tensor(bad, device=device), backend=name)


@pytest.mark.parametrize("scale", [0.125, 8.0, 60.0])
def test_cpu_softmax_exponents_far_below_the_max(scale):
    """The CPU kernel's vectorized e^x (csrc/cpu/code_rows.h, exp_softmax) returns 0 below -87.3,
    where float32's e^x leaves the normal range. With a large softmax scale most tokens' exponents
    are far below that (the scores spread over hundreds): the result must still match the
    reference to float32 rounding."""
    k_q, v_q, k_r, v_r = make_cache(1, 2, 256, 160, 300, 64, 32, 2, 2, torch.float32, "cpu")
    q = torch.randn(1, 4, 1, 64)
    got = ops.decode_attention(q, k_q, v_q, k_r, v_r, scale=scale, backend="cpu")
    want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, 2, 2, 32, scale)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 2 * TOL[torch.float32]
    if scale == 60.0:  # the case is what it claims: most exponents are under the cutoff
        k = torch.cat([reference.dequantize_keys(*k_q, 2, 32), k_r], 2)
        s = (q.view(1, 2, 2, 64) @ k.transpose(-1, -2)) * scale
        assert ((s - s.amax(-1, keepdim=True)) < -87.3).float().mean() > 0.5


@pytest.mark.parametrize("threads", [1, 8])
def test_cpu_token_chunks_merge_like_one_pass(threads):
    """The CPU kernel splits a head's tokens into chunks (more with more threads) and merges them:
    chunks past a sequence's length, an empty sequence (NaN, like the reference) and chunk edges
    inside key groups and inside the residual must not change the result."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k_q, v_q, k_r, v_r = make_cache(4, 1, 1056, 1000, 1100, 64, 32, 2, 4, torch.float32, "cpu")
        q = torch.randn(4, 3, 1, 64)
        lengths = torch.tensor([1100, 700, 0, 257])
        got = ops.decode_attention(q, k_q, v_q, k_r, v_r, k_bits=2, v_bits=4, lengths=lengths, backend="cpu")
    finally:
        torch.set_num_threads(before)
    want = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, 2, 4, 32, 0.125, lengths)
    assert torch.isnan(got[2]).all() and torch.isnan(want[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert rel_err(got[keep], want[keep]) < 2 * TOL[torch.float32]  # float32: summation order only


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("heads_major", [False, True])
def test_cache_views_are_read_in_place(backend, heads_major):
    """A cache's tensors are often views: the used rows of a buffer with spare rows (row_buffer, a
    static cache's slice). Such views (rows contiguous, batch and head strides free) give the
    result of contiguous copies bit for bit, never read the spare rows (NaN there), and every
    kernel reads them without copying (a copy per call is a pass over the whole history)."""
    name, device = backend
    k_q, v_q, k_r, v_r = make_cache(2, 2, 256, 160, 288, 128, 32, 2, 4, torch.float16, device)
    q = torch.randn(2, 6, 1, 128, device=device).half()
    kw = dict(k_bits=2, v_bits=4, group_size=32, backend=name)
    want = ops.decode_attention(q, k_q, v_q, k_r, v_r, **kw)
    views = [tuple(view_with_spare_rows(x, heads_major=heads_major) for x in part) for part in (k_q, v_q)]
    k_rv, v_rv = (view_with_spare_rows(x, heads_major=heads_major) for x in (k_r, v_r))
    assert not views[1][0].is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = ops.decode_attention(q, *views, k_rv, v_rv, **kw)
    assert torch.equal(got, want)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
    assert copies == []


def at_storage_end(x: torch.Tensor, skew_elems: int) -> torch.Tensor:
    """x's values in a view that starts skew_elems elements into a storage of exactly
    x.numel() + skew_elems elements: its last byte is its storage's last byte."""
    buf = torch.empty(x.numel() + skew_elems, dtype=x.dtype, device=x.device)
    buf[skew_elems:] = x.flatten()
    return buf[skew_elems:].view(x.shape)


@requires_cuda_kernels
@pytest.mark.parametrize("bits", [(2, 2), (2, 4)])
def test_cuda_scale_zero_views_that_end_their_storage(bits):
    """The decode loop copies each tile's value scale/zero run in whole 16-byte chunks, so for a view
    that starts off a 16-byte boundary the last chunk reaches up to 15 bytes past the run. Where that
    would pass the end of the view's storage, the op hands the last whole tile to its tail (exact
    copies; scripts/sanitize_ops.py has memcheck check the reads). Either way the views are read in
    place and the result is the reference's; aligned views give the bits of contiguous inputs."""
    B, Hkv, T, D, G = 1, 1, 1280, 128, 32
    k_q, v_q, k_r, v_r = make_cache(B, Hkv, T, T, T, D, G, *bits, torch.float16, "cuda")
    q = torch.randn(B, 4, 1, D, device="cuda").half()
    kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, backend="cuda")
    want = ops.decode_attention(q, k_q, v_q, k_r, v_r, **kw)
    ref = reference.decode_attention(q, *k_q, *v_q, k_r, v_r, *bits, G, 1 / math.sqrt(D))
    codes, scale, zero = v_q
    for skew_elems in (1, 3, 8):  # 2 and 6 bytes off a boundary; 16 bytes: aligned
        v_view = (codes, at_storage_end(scale, skew_elems), at_storage_end(zero, skew_elems))
        assert v_view[1].data_ptr() % 16 == 2 * skew_elems % 16
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = ops.decode_attention(q, k_q, v_view, k_r, v_r, **kw)
        assert [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")] == []
        assert rel_err(got, ref) < attention_tolerance(q, k_q, v_q, k_r, v_r, *bits, G, ref)
        if skew_elems == 8:
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", kernel_backends())
def test_all_equal_groups_and_custom_scale(backend):
    name, device = backend
    k = torch.full((1, 1, 64, 64), 0.5, device=device)
    v = torch.arange(64, device=device, dtype=torch.float32).view(1, 1, 64, 1).expand(1, 1, 64, 64).contiguous()
    k_q, v_q = ops.quantize_keys(k, 2, 32, backend=name), ops.quantize_values(v, 2, 32, backend=name)
    q = torch.randn(1, 1, 1, 64, device=device)
    out = ops.decode_attention(q, k_q, v_q, k[:, :, :0], v[:, :, :0], scale=0.3, backend=name)
    # constant keys -> uniform attention -> the mean of the (exactly dequantized, constant-row) values
    torch.testing.assert_close(out, torch.full_like(out, 31.5))


def test_reference_equals_sdpa_on_dequantized_cache():
    """The reference's definition: SDPA over the concatenated dequantized cache."""
    k_q, v_q, k_r, v_r = make_cache(2, 2, 128, 64, 150, 64, 32, 2, 2, torch.float32, "cpu")
    q = torch.randn(2, 6, 1, 64)
    keys = torch.cat([ops.dequantize_keys(*k_q), k_r], 2).repeat_interleave(3, 1)
    values = torch.cat([ops.dequantize_values(*v_q), v_r], 2).repeat_interleave(3, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    torch.testing.assert_close(reference.decode_attention(q, *k_q, *v_q, k_r, v_r, 2, 2, 32), want, atol=1e-5, rtol=1e-4)


def test_auto_picks_triton_only_for_small_caches():
    """backend="auto" on CUDA: Triton's kernel below the measured crossover (under 2k tokens and at
    most 32k batch x KV heads x tokens), CUDA's beyond; eager calls always CUDA."""
    assert ops._small_cache(1, 8, 1536) and ops._small_cache(8, 8, 512) and ops._small_cache(1, 1, 2047)
    assert not ops._small_cache(1, 1, 2048) and not ops._small_cache(8, 8, 1024) and not ops._small_cache(1, 32, 1536)
    assert not ops._kernel_time_only()  # a plain eager call pays its launch: CUDA


@requires_cuda_kernels
def test_auto_takes_triton_for_short_caches_only_where_host_time_is_not_paid(monkeypatch):
    """Eager calls take CUDA at every length (Triton's launcher costs more host time than its kernel
    saves); calls captured into a CUDA graph take Triton for small caches, CUDA beyond."""
    taken = []  # the implementation each decode_attention call resolved to
    real_call = ops._call

    def recording_call(name, backend, device, *args):
        if name == "decode_attention":
            taken.append(ops.resolve_backend(backend, device))
        return real_call(name, backend, device, *args)

    monkeypatch.setattr(ops, "_call", recording_call)
    calls = {}
    for tokens in (1024, 4096):
        k_q, v_q, k_r, v_r = make_cache(1, 2, tokens, tokens - 128, tokens + 64, 128, 32, 2, 2, torch.float16, "cuda")
        q = torch.randn(1, 8, 1, 128, device="cuda").half()
        calls[tokens] = lambda args=(q, k_q, v_q, k_r, v_r): ops.decode_attention(*args)
    calls[1024](), calls[4096]()
    assert taken == ["cuda", "cuda"]
    monkeypatch.setattr(ops, "_kernel_time_only", lambda: True)  # warm-up: Triton compiles on its first call
    calls[1024]()
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_call", recording_call)
    taken.clear()
    for tokens in (1024, 4096):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls[tokens]()
    assert taken == ["triton", "cuda"]

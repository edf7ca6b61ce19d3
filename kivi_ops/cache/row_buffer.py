"""Row buffers with spare capacity for the quantized values of ``KIVIState``.

KIVI quantizes one value token per decode step (the one that leaves the newest-R window). Kept at
its exact size, the packed value history would be re-allocated with ``torch.cat`` at every step:
a copy of all T tokens' codes, scales and zeros per layer per token, i.e. quadratic in the
generated length (at batch 8 and 128k tokens, more bytes than the attention itself reads). Here the
history lives in buffers ``[B, H, capacity, C]`` with spare rows; the state's fields are views of
the used rows, and a step writes its token into the next free row. When the buffers are full they
are re-allocated with ``spare_rows`` extra rows, so the copying per appended token stays bounded
(~16 rows on average) and the memory held beyond the used rows stays under 1/16 of them + 16 rows.
``KIVIState.footprint`` reports those spare rows as ``reserved_bytes``. Under torch.compile the
append concatenates as before (see ``append_rows``).
"""

from __future__ import annotations

from typing import Optional

import torch

MIN_SPARE_ROWS = 16
SPARE_FRACTION = 16  # grow by 1/16 of the used rows


def spare_rows(used: int) -> int:
    """Rows to reserve past ``used`` when the buffers grow; the capacity stays a multiple of 16, so the
    head stride of every buffer stays 16-byte aligned (the fused CUDA kernel's cp.async needs it)."""
    cap = used + max(MIN_SPARE_ROWS, used // SPARE_FRACTION)
    return -(-cap // 16) * 16 - used


def exact_size_append(used: tuple[torch.Tensor, ...], store: Optional[tuple[torch.Tensor, ...]],
                      new: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], None]:
    """``append_rows`` without buffers: a new exact-size tensor per field (``torch.cat``), no store.
    What ``append_rows`` does under torch.compile, and the append before the spare-row buffers
    (benchmarks/bench_cache_append.py and scripts/ab_dynamic_generate.py compare against it)."""
    return tuple(torch.cat([u, x], 2) for u, x in zip(used, new)), None


def append_rows(used: tuple[torch.Tensor, ...], store: Optional[tuple[torch.Tensor, ...]],
                new: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Append ``new[i]`` [B, H, m, C_i] after ``used[i]`` [B, H, n, C_i] along the token dim.

    ``store``: None, or the buffers [B, H, capacity, C_i] that the previous call returned, whose
    first n rows ``used`` views (the caller drops them when it replaces ``used`` by other tensors;
    comparing data pointers here would break torch.compile's graph). Writes into their free rows
    when there is room, else allocates larger buffers and copies ``used`` over. Returns (views of
    the n + m used rows, the buffers). Rows < n of an existing store are never written, so tensors
    taken from ``used`` earlier keep their contents.
    """
    if torch.compiler.is_compiling():
        # Traced by Dynamo (a stock model over KIVICache, compiled): the buffers' capacity would be
        # one more shape to guard on and recompile for; exact-size tensors, as before, and no store.
        return exact_size_append(used, store, new)
    n, m = used[0].shape[2], new[0].shape[2]
    fits = store is not None and store[0].shape[2] >= n + m
    if not fits:
        cap = n + m + spare_rows(n + m)
        store = tuple(u.new_empty(u.shape[0], u.shape[1], cap, u.shape[3]) for u in used)
        if n:
            for s, u in zip(store, used):
                s[:, :, :n].copy_(u)
    for s, x in zip(store, new):
        s[:, :, n:n + m].copy_(x)
    return tuple(s[:, :, :n + m] for s in store), store


def reserved_bytes(used: tuple[torch.Tensor, ...], store: Optional[tuple[torch.Tensor, ...]]) -> int:
    """Bytes of ``store`` beyond the rows that ``used`` views (0 without a store)."""
    if store is None:
        return 0
    return sum((s.numel() - u.numel()) * s.element_size() for s, u in zip(store, used))

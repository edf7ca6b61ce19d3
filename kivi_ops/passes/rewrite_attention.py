"""FX pass: attention over a transformers static KV cache -> KIVI static-cache ops.

It runs on the graph that Dynamo captures (torch-level FX, before AOTAutograd), where the cache
update is still an in-place ``index_copy_`` into a cache buffer. The pattern, per attention layer
(transformers ``StaticLayer.update`` + ``sdpa_attention_forward``)::

    k_buf.index_copy_(2, pos, k_new)            k_buf, v_buf  [B, Hkv, L, D]   (graph inputs, or
    v_buf.index_copy_(2, pos, v_new)                                            zeros made in-graph)
    key   = view_chain(k_buf)                   identity | repeat_kv (x[:, :, None].expand().reshape())
    value = view_chain(v_buf)                   | prefix slice x[:, :, :M] (prefill with is_causal)
    out   = scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=s, is_causal=c, [enable_gqa])

becomes::

    kivi.static_kv_append_(k_buf, v_buf, k_new, v_new, pos, k_bits, v_bits, G, R)
    out = kivi.static_kv_attention(q, k_buf, v_buf, k_new, v_new, pos, mask, c, k_bits, v_bits, G, R, s)

With a mask, the keys handed to the append first go through ``keys_without_pads`` (a pad key,
one whose own mask row hides it, is replaced by a real key of its group), so left-padded batches
quantize exactly as the dynamic KIVICache does.

The buffers themselves become the KIVI stores (their bytes are reinterpreted, DESIGN §3), so the
state is shared by the prefill and decode graphs, which both receive them. Why at this level and
not with Inductor's pattern_matcher: after functionalization the in-place ``index_copy_`` is a
functional copy plus a write-back epilogue, and what must be rewritten is precisely the in-place
write into a buffer that lives across graphs; here it is one node.

Anything off the pattern (another reader of a buffer, a dropout, a mask that does not cover the
buffer, a buffer too small for KIVI state, ...) leaves the whole graph unchanged and the reason is
returned, so the backend can warn and fall back to plain Inductor: never a wrong graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from kivi_ops.cache import static_ops
from kivi_ops.cache.state import fill_pad_keys_of_step

_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)


class Unsupported(Exception):
    """The graph has cache attention the pass cannot rewrite safely (the message says why)."""


@dataclass
class Rewrite:
    """One rewritten attention layer (what ``kivi_ops.passes.last_rewrites()`` returns)."""

    k_cache: str
    v_cache: str
    shape: tuple  # [B, Hkv, L, D] of the cache buffers
    query_heads: int
    new_tokens: int
    view: str  # "identity" | "repeat_kv" | "prefix_slice" | combinations, joined with "+"
    mask: str  # "none" | "bool" | "float"
    is_causal: bool

    def __str__(self):
        return (f"{self.k_cache}/{self.v_cache} {list(self.shape)} q_heads={self.query_heads} "
                f"new_tokens={self.new_tokens} view={self.view} mask={self.mask} causal={self.is_causal}")


@dataclass
class PassResult:
    rewrites: list = field(default_factory=list)
    fallback_reason: Optional[str] = None


def _meta(node):
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_index_copy_(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "index_copy_") or (
        n.op == "call_function" and n.target in (torch.Tensor.index_copy_, torch.ops.aten.index_copy_.default))


def _full(s) -> bool:
    return isinstance(s, slice) and s == slice(None, None, None)


def _view_step(n: fx.Node) -> Optional[tuple[str, fx.Node]]:
    """If ``n`` is one view step the pass understands, (kind, its input); else None."""
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], tuple):
        idx = n.args[1]
        if len(idx) in (3, 5) and idx[2] is None and all(_full(s) for i, s in enumerate(idx) if i != 2):
            return "unsqueeze2", n.args[0]  # x[:, :, None, :, :] (transformers' repeat_kv) or x[:, :, None]
        if len(idx) in (3, 4) and _full(idx[0]) and _full(idx[1]) and (len(idx) == 3 or _full(idx[3])):
            s = idx[2]
            if isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) and isinstance(s.stop, (int, fx.Node)):
                return "prefix_slice", n.args[0]
        return None
    if n.op == "call_method" and n.target in ("expand", "reshape", "view", "contiguous"):
        return n.target, n.args[0]
    return None


def _chain(node: fx.Node, buffer: fx.Node) -> tuple[list[fx.Node], str]:
    """Walk from an SDPA key/value argument back to ``buffer``; returns (view nodes, description)."""
    nodes, kinds = [], []
    while node is not buffer:
        step = _view_step(node) if isinstance(node, fx.Node) else None
        if step is None:
            raise Unsupported(f"the attention reads the cache through {getattr(node, 'format_node', lambda: node)()}, "
                              "which is not a view the pass understands")
        nodes.append(node)
        kinds.append(step[0])
        node = step[1]
    kinds.reverse()
    desc = "+".join(k for k in kinds if k not in ("expand", "reshape", "view", "contiguous"))
    if "unsqueeze2" in kinds:
        desc = desc.replace("unsqueeze2", "repeat_kv")
    return nodes, desc or "identity"


def _find_pattern(sdpa: fx.Node, copies: dict) -> Optional[dict]:
    """Match one SDPA node against the static-cache pattern; None if it reads no cache buffer."""
    args = list(sdpa.args) + [None] * (3 - len(sdpa.args))
    q, key, value = args[:3]
    kw = dict(sdpa.kwargs)
    for name, i in (("attn_mask", 3), ("dropout_p", 4), ("is_causal", 5)):
        if len(sdpa.args) > i:
            kw[name] = sdpa.args[i]

    def root(n):
        while isinstance(n, fx.Node) and n not in copies:
            step = _view_step(n)
            if step is None:
                return None
            n = step[1]
        return n if isinstance(n, fx.Node) else None

    kb, vb = root(key), root(value)
    if kb is None and vb is None:
        return None  # attention that does not read a static cache: not ours
    if kb is None or vb is None:
        raise Unsupported("only one of the attention's key/value comes from a static cache buffer")
    (kc,), (vc,) = copies[kb], copies[vb]
    if kc.args[2] is not vc.args[2]:
        raise Unsupported("the key and value caches are written at different positions")
    for c in (kc, vc):
        if c.args[1] not in (2, -2) or len(c.args) != 4 or c.kwargs:
            raise Unsupported(f"{c.format_node()} is not index_copy_(2, positions, new_states)")
    if kw.get("dropout_p", 0.0) not in (0, 0.0):
        raise Unsupported("attention with dropout")
    k_nodes, k_view = _chain(key, kb)
    v_nodes, v_view = _chain(value, vb)
    if k_view != v_view:
        raise Unsupported(f"keys are read as {k_view} but values as {v_view}")
    return dict(sdpa=sdpa, q=q, kb=kb, vb=vb, kc=kc, vc=vc, views=k_nodes + v_nodes, view=k_view,
                mask=kw.get("attn_mask"), is_causal=bool(kw.get("is_causal", False)), scale=kw.get("scale"))


def _check(m: dict, config, graph: fx.Graph) -> Rewrite:
    kb, vb, kc, vc = m["kb"], m["vb"], m["kc"], m["vc"]
    metas = {n: _meta(x) for n, x in (("k_cache", kb), ("v_cache", vb), ("q", m["q"]), ("k_new", kc.args[3]),
                                      ("v_new", vc.args[3]), ("positions", kc.args[2]))}
    missing = [n for n, v in metas.items() if v is None]
    if missing:
        raise Unsupported(f"no example value (shape) recorded for {missing}")
    K, V, q, kn, pos = metas["k_cache"], metas["v_cache"], metas["q"], metas["k_new"], metas["positions"]
    if any(not isinstance(s, int) for t in (K, V) for s in t.shape):
        raise Unsupported("the cache buffers have symbolic shapes; they must be static (a StaticCache's are)")
    if K.shape != V.shape or K.dim() != 4 or K.dtype != V.dtype or not K.dtype.is_floating_point:
        raise Unsupported(f"key/value caches {tuple(K.shape)} {K.dtype} / {tuple(V.shape)} {V.dtype} are not two "
                          "float [B, H, L, D] buffers of one shape and dtype")
    if not (K.is_contiguous() and V.is_contiguous()):
        raise Unsupported("cache buffers are not contiguous")
    if pos.dtype != torch.long or pos.dim() != 1:
        raise Unsupported(f"cache positions are {pos.dtype} {tuple(pos.shape)}, not int64 [M]")
    B, H, L, D = K.shape
    M = kn.shape[2]
    why = static_ops.store_fits(K.shape, K.element_size(), config.k_bits, config.v_bits, config.group_size,
                                config.residual_length)
    if why:
        raise Unsupported(why)
    if q.dim() != 4 or q.shape[0] != B or q.shape[1] % H or q.shape[3] != D:
        raise Unsupported(f"query {tuple(q.shape)} does not fit caches {tuple(K.shape)} with {M} new tokens")
    if "prefix_slice" in m["view"]:
        sl = next(n.args[1][2] for n in m["views"] if _view_step(n)[0] == "prefix_slice")
        if not (m["is_causal"] and m["mask"] is None and (isinstance(sl.stop, fx.Node) or sl.stop == M)):
            raise Unsupported("a cache read through a prefix slice is only understood for a causal prefill "
                              "(is_causal=True, no mask, slice of the new tokens)")
    mask_kind = "none"
    if m["mask"] is not None:
        mk = _meta(m["mask"])
        if mk is None or mk.dim() != 4 or mk.shape[-1] != L or not (mk.shape[-2] == 1 or mk.shape[-2] is M or mk.shape[-2] == M):
            raise Unsupported(f"attention mask {None if mk is None else tuple(mk.shape)} does not cover the cache's "
                              f"{L} positions")
        mask_kind = "bool" if mk.dtype == torch.bool else "float"
    users = lambda b: {u for u in b.users if u.op != "output"}  # returning a buffer is fine
    allowed = {kc, vc, m["sdpa"], *m["views"]}
    for b in (kb, vb):
        extra = users(b) - allowed
        if extra:
            raise Unsupported(f"the cache buffer {b.name} has other readers ({', '.join(u.name for u in extra)}): "
                              "their fp values would be KIVI state after the rewrite")
    for c in (kc, vc):
        if c.users:
            raise Unsupported(f"the result of {c.name} is used")
    return Rewrite(kb.name, vb.name, (B, H, L, D), q.shape[1], M, m["view"], mask_kind, m["is_causal"])


def keys_without_pads(k_new: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, group_size: int) -> torch.Tensor:
    """The new keys with each pad key replaced by a real key of its group (zeros for a lone pad).

    k_new [B, H, M, D]; mask [B|1, 1|Hq, M|1, L] (bool = visible, or additive float) over the cache
    positions; pos int64 [M]. A new token is a pad when its own mask row hides its own position
    (a real token always sees itself). This is what KIVIStaticCache and the dynamic KIVICache do
    with the 2-D mask, so pads never enter a key group's min/max. Device ops only (no host sync).
    """
    B, M = k_new.shape[0], k_new.shape[2]
    rows = pos.new_zeros(M) if mask.shape[2] == 1 else torch.arange(M, device=pos.device)
    own = mask[:, 0][:, rows, pos.to(mask.device)]  # [B|1, M]: what each token's row says of itself
    valid = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    return fill_pad_keys_of_step(k_new, valid.to(k_new.device).expand(B, M), group_size)


def rewrite_static_cache_attention(gm: fx.GraphModule, config) -> PassResult:
    """Rewrite every static-cache attention of ``gm`` onto the KIVI static-cache ops, in place.

    All or nothing: if any cache attention cannot be rewritten, ``gm`` is left exactly as it was
    and ``fallback_reason`` says why. A graph without cache attention gives no rewrites.
    """
    graph = gm.graph
    copies: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if _is_index_copy_(n) and isinstance(n.args[0], fx.Node):
            copies.setdefault(n.args[0], []).append(n)
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA]
    result = PassResult()
    if not copies:
        return result
    try:
        for b, cs in copies.items():
            if len(cs) != 1:
                raise Unsupported(f"the cache buffer {b.name} is written {len(cs)} times")
        plans = []
        for s in sdpas:
            m = _find_pattern(s, copies)
            if m is not None:
                plans.append((s, m, _check(m, config, graph)))
        used = {c for _, m, _ in plans for c in (m["kc"], m["vc"])}
        stray = [c for cs in copies.values() for c in cs if c not in used]
        if stray and plans:
            raise Unsupported(f"index_copy_ into {stray[0].args[0].name} is not followed by an attention the pass "
                              "understands")
    except Unsupported as e:
        result.fallback_reason = str(e)
        return result

    order = {n: i for i, n in enumerate(graph.nodes)}
    for sdpa, m, info in plans:
        kc, vc = m["kc"], m["vc"]
        pos, k_new, v_new = kc.args[2], kc.args[3], vc.args[3]
        last_copy = kc if order[kc] > order[vc] else vc
        # the append goes where the copies were, or just before the attention when the mask it
        # needs (pad keys) is made after them; nothing else reads the buffers in between (checked)
        mask_after = isinstance(m["mask"], fx.Node) and order[m["mask"]] > order[last_copy]
        c = config
        with graph.inserting_before(sdpa if mask_after else last_copy):
            k_store = k_new  # a mask may mark pads: they must stay out of the key groups
            if m["mask"] is not None:
                k_store = graph.call_function(keys_without_pads, (k_new, m["mask"], pos, c.group_size))
            graph.call_function(torch.ops.kivi.static_kv_append_.default,
                                (m["kb"], m["vb"], k_store, v_new, pos, c.k_bits, c.v_bits, c.group_size,
                                 c.residual_length))
        scale = m["scale"] if m["scale"] is not None else 1.0 / math.sqrt(info.shape[3])
        with graph.inserting_before(sdpa):
            attn = graph.call_function(torch.ops.kivi.static_kv_attention.default,
                                       (m["q"], m["kb"], m["vb"], k_new, v_new, pos, m["mask"], m["is_causal"],
                                        c.k_bits, c.v_bits, c.group_size, c.residual_length, float(scale)))
        attn.meta.update(sdpa.meta)
        sdpa.replace_all_uses_with(attn)
        graph.erase_node(sdpa)
        for n in reversed(sorted(set(m["views"]), key=order.get)):
            if not n.users:
                graph.erase_node(n)
        graph.erase_node(kc)
        graph.erase_node(vc)
        result.rewrites.append(info)
    graph.lint()
    gm.recompile()
    return result

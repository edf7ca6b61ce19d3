"""FX pass: decode attention over a dequantized KIVI cache -> one fused ``kivi::decode_attention``.

The eager way to attend over a KIVI cache (``KIVILayerState.dequantized()`` followed by SDPA, or
hand-written code in the same shape) materialises the whole cache in full precision::

    k = cat([kivi.dequantize_keys(kc, ks, kz, k_bits, G), k_residual], 2)     [B, Hkv, T, D]
    v = cat([kivi.dequantize_values(vc, vs, vz, v_bits, G), v_residual], 2)
    key, value = view_chain(k), view_chain(v)       identity | repeat_kv (x[:, :, None].expand().reshape())
    out = scaled_dot_product_attention(q, key, value, scale=s, [enable_gqa])    q [B, Hq, 1, D]

For one query token with no mask, no dropout and ``is_causal=False`` (a decode step of an unpadded
batch) that is exactly the fused op's contract, so it becomes::

    out = kivi.decode_attention(q, kc, ks, kz, vc, vs, vz, k_residual, v_residual, k_bits, v_bits, G, s, None)

which reads the packed bytes once and never writes the dense cache or the scores. Anything else
(several query tokens, a mask, causal, dropout, views the pass does not know) is left as it is:
this rewrite is an optimisation of an already correct graph, so "not matched" is never an error.
The dequantize/cat nodes stay if something else reads them; otherwise they are erased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from kivi_ops.passes.rewrite_attention import _SDPA, _meta, _view_step

# dequantize ops the eager KIVI path calls (the C++ op on CPU/CUDA, the Triton op where it is chosen)
_DEQUANT_KEYS = ("kivi.dequantize_keys", "kivi.triton_dequantize_keys")
_DEQUANT_VALUES = ("kivi.dequantize_values", "kivi.triton_dequantize_values")


@dataclass
class DequantRewrite:
    """One dequantize -> SDPA attention rewritten onto ``kivi::decode_attention``."""

    sdpa: str
    query_heads: int
    kv_heads: int
    k_bits: int
    v_bits: int
    group_size: int
    view: str

    def __str__(self):
        return (f"{self.sdpa}: dequantize+sdpa -> decode_attention q_heads={self.query_heads} "
                f"kv_heads={self.kv_heads} K{self.k_bits}V{self.v_bits} G={self.group_size} view={self.view}")


def _op_name(n: fx.Node) -> str:
    """'kivi.dequantize_keys' for the op packet or any of its overloads; '' for other nodes."""
    if n.op != "call_function":
        return ""
    name = getattr(n.target, "_name", None) or getattr(n.target, "_qualified_op_name", None) or ""
    return name.replace("::", ".")


def _sdpa_args(sdpa: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    kw = dict(zip(names, sdpa.args))
    kw.update(sdpa.kwargs)
    return kw


def _through_views(node) -> tuple[Optional[fx.Node], list[str], list[fx.Node]]:
    """Walk back from an SDPA key/value argument through identity / repeat_kv views."""
    kinds, nodes = [], []
    while isinstance(node, fx.Node):
        step = _view_step(node)
        if step is None:
            return node, kinds, nodes
        if step[0] == "prefix_slice":  # would drop tokens: not the whole cache
            return None, kinds, nodes
        kinds.append(step[0])
        nodes.append(node)
        node = step[1]
    return None, kinds, nodes


def _packed(cat: Optional[fx.Node], names: tuple) -> Optional[tuple[fx.Node, fx.Node]]:
    """``cat([dequantize(...), residual], 2)`` -> (dequantize node, residual node), else None."""
    if cat is None or cat.op != "call_function" or cat.target is not torch.cat:
        return None
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (2, -2) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    deq, res = parts
    if not isinstance(deq, fx.Node) or _op_name(deq) not in names or not isinstance(res, fx.Node):
        return None
    if len(deq.args) != 5 or deq.kwargs:
        return None
    return deq, res


def _match(sdpa: fx.Node) -> Optional[dict]:
    kw = _sdpa_args(sdpa)
    q = kw.get("query")
    if kw.get("attn_mask") is not None or kw.get("dropout_p", 0.0) not in (0, 0.0) or kw.get("is_causal", False):
        return None
    k_root, k_kinds, k_views = _through_views(kw.get("key"))
    v_root, v_kinds, v_views = _through_views(kw.get("value"))
    kp, vp = _packed(k_root, _DEQUANT_KEYS), _packed(v_root, _DEQUANT_VALUES)
    if kp is None or vp is None or k_kinds != v_kinds:
        return None
    qm, km = _meta(q), _meta(kp[1])
    scale_meta = _meta(kp[0].args[1])
    if qm is None or km is None or scale_meta is None:
        return None
    if qm.dim() != 4 or qm.shape[2] != 1 or qm.shape[1] % km.shape[1] or qm.dtype != scale_meta.dtype:
        return None
    (kdq, kres), (vdq, vres) = kp, vp
    k_bits, kg = kdq.args[3], kdq.args[4]
    v_bits, vg = vdq.args[3], vdq.args[4]
    if kg != vg:
        return None
    view = "repeat_kv" if "unsqueeze2" in k_kinds else "identity"
    scale = kw.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(qm.shape[-1])
    if not isinstance(scale, (int, float)):
        return None
    return dict(q=q, kdq=kdq, vdq=vdq, kres=kres, vres=vres, k_bits=k_bits, v_bits=v_bits, group=kg,
                scale=float(scale), views=k_views + v_views, cats=[k_root, v_root], view=view,
                info=DequantRewrite(sdpa.name, qm.shape[1], km.shape[1], k_bits, v_bits, kg, view))


def _decode_op(dequant_keys: fx.Node, q: torch.Tensor):
    """The fused op on the backend the graph already used: Triton where it dequantized with
    Triton or where the extension has no CUDA kernels, else the C++ op (CPU / CUDA)."""
    from kivi_ops import _extension

    if _op_name(dequant_keys).startswith("kivi.triton_") or (q.device.type == "cuda"
                                                             and not _extension.has_cuda_kernels()):
        import kivi_ops.ops.triton.decode_attention  # noqa: F401  (registers kivi::triton_decode_attention)

        return torch.ops.kivi.triton_decode_attention.default
    return torch.ops.kivi.decode_attention.default


def rewrite_dequant_attention(gm: fx.GraphModule) -> list[DequantRewrite]:
    """Rewrite every single-token, unmasked SDPA over a dequantized KIVI cache in ``gm`` (in
    place) onto ``kivi::decode_attention``; returns what it rewrote (empty: ``gm`` unchanged)."""
    graph = gm.graph
    done = []
    for sdpa in [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA]:
        m = _match(sdpa)
        if m is None:
            continue
        kdq, vdq = m["kdq"], m["vdq"]
        with graph.inserting_before(sdpa):
            attn = graph.call_function(
                _decode_op(kdq, _meta(m["q"])),
                (m["q"], *kdq.args[:3], *vdq.args[:3], m["kres"], m["vres"], m["k_bits"], m["v_bits"], m["group"],
                 m["scale"], None))
        attn.meta.update(sdpa.meta)
        sdpa.replace_all_uses_with(attn)
        graph.erase_node(sdpa)
        # outermost first (each chain was collected from the SDPA argument inwards); dead unless read elsewhere
        for n in dict.fromkeys([*m["views"], *m["cats"], kdq, vdq]):
            if not getattr(n, "_erased", False) and not n.users:
                graph.erase_node(n)
        done.append(m["info"])
    if done:
        graph.lint()
        gm.recompile()
    return done

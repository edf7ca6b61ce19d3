"""``KIVIState``: one attention layer's KIVI cache and its streaming rules (DESIGN §1).

Pure PyTorch + ``kivi_ops.ops``; no transformers here. Shapes (``B`` batch, ``H`` KV heads,
``D``/``Dv`` key/value head_dim, ``G`` group_size, ``R`` residual_length, packed layout of
``kivi_ops.ops.layout``)::

    k_codes    [B, H, Tkq * k_bits / 8, D] uint8    the oldest Tkq keys, Tkq a multiple of R
    k_scale    [B, H, Tkq / G, D]                    (k_zero alike)
    k_residual [B, H, Tkr, D]                        the newest Tkr = T - Tkq keys, Tkr < R
    k_valid    [B, Tkr] bool or None                 False at pad tokens (None: all real)
    v_codes    [B, H, Tvq, Dv * v_bits / 8] uint8    the oldest Tvq = T - Tvr values
    v_scale    [B, H, Tvq, Dv / G]                   (v_zero alike)
    v_residual [B, H, Tvr, Dv]                       the newest Tvr = min(T, R) values

Rules, applied after every append of t tokens (prefill or decode alike):

- keys go to the residual; while it holds >= R tokens its oldest R are quantized as one block
  (a prefill of T leaves T - T mod R quantized, T mod R in the residual; decode flushes a block
  each time the residual reaches R);
- values go to the residual; everything but the newest R is quantized, one token at a time
  (per-token groups need no neighbours).

Pad tokens of a left-padded batch never enter a key group's min/max: before a block is
quantized, each pad key is replaced by a real key of the same group (the attention mask hides
the pad positions, so what they dequantize to does not matter; what matters is that they do not
stretch the real tokens' range). Value groups are single tokens, so pad values harm no one.

Every tensor is allocated at its exact size (``torch.cat`` / ``clone``) except the quantized
values, which grow by a token per decode step: they are views of buffers with a few spare rows
(``row_buffer``), so a step writes one token instead of copying the whole value history.
``footprint()`` equals the summed storage of the tensors held, spare rows included.
"""

from __future__ import annotations

from typing import Optional

import torch

from kivi_ops import ops
from kivi_ops.cache import row_buffer
from kivi_ops.cache.footprint import CacheFootprint
from kivi_ops.config import KIVIConfig
from kivi_ops.ops.layout import SUPPORTED_DTYPES

_TENSOR_FIELDS = ("k_codes", "k_scale", "k_zero", "k_residual", "k_valid",
                  "v_codes", "v_scale", "v_zero", "v_residual")


def fill_pad_keys(block: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Replace each pad key by the first real key of its group, so pads leave groups' min/max alone.

    block [B, H, n, D] (n a multiple of group_size), valid [B, n] bool -> [B, H, n, D].
    A group without any real token becomes zeros (it is all masked; zeros make the cache's content
    independent of what the pads were).
    """
    B, H, n, D = block.shape
    G = group_size
    vg = valid.view(B, n // G, G)
    first_real = vg.to(torch.int8).argmax(-1, keepdim=True)  # [B, n/G, 1]; argmax returns the first max
    within = torch.arange(G, device=block.device).view(1, 1, G)
    src = torch.where(vg, within, first_real) + torch.arange(0, n, G, device=block.device).view(1, -1, 1)
    out = block.gather(2, src.reshape(B, 1, n, 1).expand(B, H, n, D))
    any_real = vg.any(-1, keepdim=True).expand(B, n // G, G).reshape(B, 1, n, 1)
    return torch.where(any_real, out, torch.zeros((), dtype=block.dtype, device=block.device))


def fill_pad_keys_of_step(k: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """``fill_pad_keys`` for the new keys of one append (a static cache's step, starting a group).

    k [B, H, M, D], valid [B, M] bool -> [B, H, M, D]. A single new token is its own block: kept if
    real, zeros if a pad. Device ops only (no host sync).
    """
    B, H, M, D = k.shape
    if M == 1:
        return torch.where(valid.view(B, 1, 1, 1), k, torch.zeros((), dtype=k.dtype, device=k.device))
    extra = -M % group_size  # fill_pad_keys works on whole groups: pad the block with non-real slots
    if extra:
        k = torch.cat([k, k.new_zeros(B, H, extra, D)], 2)
        valid = torch.cat([valid, valid.new_zeros(B, extra)], 1)
    return fill_pad_keys(k, valid, group_size)[:, :, :M]


class KIVIState:
    """The KIVI cache of one attention layer: packed history + full-precision residual (see module doc)."""

    def __init__(self, config: KIVIConfig):
        if not isinstance(config, KIVIConfig):
            raise TypeError(f"config must be a KIVIConfig, got {type(config).__name__}")
        self.config = config
        self.reset()

    # ---------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        """Drop every token (the config stays)."""
        for name in _TENSOR_FIELDS:
            setattr(self, name, None)
        self._v_store = None  # buffers with spare rows behind v_codes/v_scale/v_zero (row_buffer)
        self.seq_length = 0

    @property
    def is_empty(self) -> bool:
        return self.seq_length == 0

    @property
    def num_quantized_keys(self) -> int:
        return 0 if self.k_scale is None else self.k_scale.shape[2] * self.config.group_size

    @property
    def num_residual_keys(self) -> int:
        return 0 if self.k_residual is None else self.k_residual.shape[2]

    @property
    def num_quantized_values(self) -> int:
        return 0 if self.v_codes is None else self.v_codes.shape[2]

    @property
    def num_residual_values(self) -> int:
        return 0 if self.v_residual is None else self.v_residual.shape[2]

    @property
    def has_padding(self) -> bool:
        """Whether some key in the residual is a pad token (quantized pads are already neutralised)."""
        return self.k_valid is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, by field name (for accounting and tests)."""
        return {n: getattr(self, n) for n in _TENSOR_FIELDS if getattr(self, n) is not None}

    # ---------------------------------------------------------------- appending
    def _check(self, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
        """Validate an append before anything changes (an invalid input leaves the state as it was)."""
        for name, x in (("key_states", k), ("value_states", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must be [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
            if x.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"key_states {tuple(k.shape)} and value_states {tuple(v.shape)} must agree on batch, "
                             "heads and tokens")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError("key_states and value_states must share dtype and device")
        G = self.config.group_size
        if v.shape[3] % G != 0:
            raise ValueError(f"value head_dim ({v.shape[3]}) must be a multiple of group_size ({G}): values are "
                             "grouped per token over channels")
        if not self.is_empty:
            ref_k, ref_v = self.k_residual, self.v_residual
            if (k.shape[0], k.shape[1], k.shape[3]) != (ref_k.shape[0], ref_k.shape[1], ref_k.shape[3]) or \
                    v.shape[3] != ref_v.shape[3]:
                raise ValueError(f"new states {tuple(k.shape)}/{tuple(v.shape)} do not match the cached "
                                 f"[batch, heads, *, head_dim] = {tuple(ref_k.shape)}/{tuple(ref_v.shape)}")
            if k.dtype != ref_k.dtype or k.device != ref_k.device:
                raise ValueError(f"new states are {k.dtype} on {k.device}, the cache holds {ref_k.dtype} on "
                                 f"{ref_k.device}")
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or \
                    tuple(valid.shape) != (k.shape[0], k.shape[2]):
                raise ValueError(f"valid must be a bool tensor [batch, new tokens] = [{k.shape[0]}, {k.shape[2]}], "
                                 f"got {getattr(valid, 'dtype', type(valid).__name__)} "
                                 f"{tuple(getattr(valid, 'shape', ()))}")

    def _empty_like_state(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        B, H, _, D = k.shape
        Dv = v.shape[3]
        u8 = dict(dtype=torch.uint8, device=k.device)
        fl = dict(dtype=k.dtype, device=k.device)
        return dict(
            k_codes=torch.empty(B, H, 0, D, **u8), k_scale=torch.empty(B, H, 0, D, **fl),
            k_zero=torch.empty(B, H, 0, D, **fl), k_residual=torch.empty(B, H, 0, D, **fl),
            v_codes=torch.empty(B, H, 0, Dv * cfg.v_bits // 8, **u8),
            v_scale=torch.empty(B, H, 0, Dv // cfg.group_size, **fl),
            v_zero=torch.empty(B, H, 0, Dv // cfg.group_size, **fl), v_residual=torch.empty(B, H, 0, Dv, **fl),
            k_valid=None,
        )

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> None:
        """Append t tokens and apply the streaming rules.

        key_states [B, H, t, D], value_states [B, H, t, Dv], valid [B, t] bool (False at pad
        tokens; None: all real). All-or-nothing: on any error the state is unchanged.
        """
        self._check(key_states, value_states, valid)
        if self._fused_step_ok(key_states, valid):
            self._append_one_fused(key_states, value_states)
            return
        cfg = self.config
        G, R = cfg.group_size, cfg.residual_length
        s = self._empty_like_state(key_states, value_states) if self.is_empty else self.tensors()
        s.setdefault("k_valid", None)
        t = key_states.shape[2]

        # Pad bookkeeping only exists while a pad key waits in the residual (one host sync per append
        # that brings a mask; batches without padding never allocate it).
        k_valid = s["k_valid"]
        if valid is not None and (k_valid is not None or not bool(valid.all())):
            if k_valid is None:
                k_valid = torch.ones(key_states.shape[0], s["k_residual"].shape[2], dtype=torch.bool,
                                     device=key_states.device)
            k_valid = torch.cat([k_valid, valid.to(key_states.device)], 1)
        elif k_valid is not None:
            k_valid = torch.cat([k_valid, torch.ones(key_states.shape[0], t, dtype=torch.bool,
                                                     device=key_states.device)], 1)

        # Keys: flush whole blocks of R from the residual.
        k_res = torch.cat([s["k_residual"], key_states], 2)
        n = (k_res.shape[2] // R) * R
        k_codes, k_scale, k_zero = s["k_codes"], s["k_scale"], s["k_zero"]
        if n:
            block = k_res[:, :, :n]
            if k_valid is not None:
                block = fill_pad_keys(block, k_valid[:, :n], G)
            c, sc, z = ops.quantize_keys(block.contiguous(), cfg.k_bits, G, backend=cfg.backend)
            k_codes, k_scale, k_zero = (torch.cat([a, b], 2) for a, b in ((k_codes, c), (k_scale, sc), (k_zero, z)))
            k_res = k_res[:, :, n:].clone()
            if k_valid is not None:
                k_valid = k_valid[:, n:].clone()
                if bool(k_valid.all()):
                    k_valid = None

        # Values: keep the newest R in full precision, quantize the rest token by token.
        v_res = torch.cat([s["v_residual"], value_states], 2)
        m = v_res.shape[2] - R
        v_codes, v_scale, v_zero = s["v_codes"], s["v_scale"], s["v_zero"]
        v_store = self._v_store
        if m > 0:
            c, sc, z = ops.quantize_values(v_res[:, :, :m].contiguous(), cfg.v_bits, G, backend=cfg.backend)
            # into the free rows of the value buffers (rows already in use are never written)
            (v_codes, v_scale, v_zero), v_store = row_buffer.append_rows((v_codes, v_scale, v_zero), v_store,
                                                                         (c, sc, z))
            v_res = v_res[:, :, m:].clone()

        # Commit (nothing above touched self).
        self.k_codes, self.k_scale, self.k_zero = k_codes, k_scale, k_zero
        self.k_residual, self.k_valid = k_res, k_valid
        self.v_codes, self.v_scale, self.v_zero, self.v_residual = v_codes, v_scale, v_zero, v_res
        self._v_store = v_store
        self.seq_length += t

    def _fused_step_ok(self, k: torch.Tensor, valid: Optional[torch.Tensor]) -> bool:
        """Whether this append is a plain decode step that ``kivi::_dynamic_append_one_`` does in one
        kernel (csrc/dynamic_append.h): one token, no pad bookkeeping, no key block to flush, a full
        value window, a free row in the value buffers, eager (traced code keeps the composite and its
        exact-size tensors), and the C++ kernels for this device and backend."""
        R = self.config.residual_length
        if k.shape[2] != 1 or valid is not None or self.k_valid is not None or self._v_store is None:
            return False
        if self.k_residual.shape[2] + 1 >= R or self.v_residual.shape[2] != R or \
                self._v_store[0].shape[2] <= self.v_codes.shape[2]:
            return False
        if not (self.k_residual.is_contiguous() and self.v_residual.is_contiguous()):
            return False
        return not torch.compiler.is_compiling() and ops.cpp_kernels_for(self.config.backend, k.device)

    def _append_one_fused(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The composite's decode step in one kernel: k joins the key residual, the oldest residual
        value leaves it quantized into the next free row of the value buffers (the same bytes)."""
        n = self.v_codes.shape[2]
        codes, scale, zero = self._v_store
        self.k_residual, self.v_residual = torch.ops.kivi._dynamic_append_one_(
            self.k_residual, self.v_residual, k, v, codes, scale, zero, n, self.config.v_bits, self.config.group_size)
        self.v_codes, self.v_scale, self.v_zero = codes[:, :, :n + 1], scale[:, :, :n + 1], zero[:, :, :n + 1]
        self.seq_length += 1

    # ---------------------------------------------------------------- reading
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All T tokens as dense tensors: keys [B, H, T, D], values [B, H, T, Dv] in the cache dtype."""
        if self.is_empty:
            raise RuntimeError("the KIVI cache is empty")
        cfg = self.config
        k, v = self.k_residual, self.v_residual
        if self.num_quantized_keys:
            kq = ops.dequantize_keys(self.k_codes, self.k_scale, self.k_zero, cfg.k_bits, cfg.group_size,
                                     backend=cfg.backend)
            k = torch.cat([kq, k], 2)
        if self.num_quantized_values:
            vq = ops.dequantize_values(self.v_codes, self.v_scale, self.v_zero, cfg.v_bits, cfg.group_size,
                                       backend=cfg.backend)
            v = torch.cat([vq, v], 2)
        return k, v

    def attend(self, query: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Fused decode attention of query [B, Hq, M, D] over the whole cache -> [B, Hq, M, Dv].

        Every query attends to every cached token (no causal or padding mask): use it for single
        token decode steps of unpadded batches.
        """
        cfg = self.config
        return ops.decode_attention_of_cache(
            query, (self.k_codes, self.k_scale, self.k_zero), (self.v_codes, self.v_scale, self.v_zero),
            self.k_residual, self.v_residual, k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
            scale=scale, backend=cfg.backend)

    # ---------------------------------------------------------------- batch surgery
    def _map(self, fn) -> None:
        for name, x in self.tensors().items():
            setattr(self, name, fn(x))
        self._v_store = None  # the fields are new exact-size tensors now

    def index_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder sequences: every tensor becomes ``x[index]`` along the batch dim (beam search)."""
        if not self.is_empty:
            index = index.to(self.k_residual.device)
            self._map(lambda x: x.index_select(0, index))

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times in place (b0 b0 b1 b1 ...)."""
        if not self.is_empty:
            self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    # ---------------------------------------------------------------- accounting
    def footprint(self) -> CacheFootprint:
        """Exact bytes held (see ``CacheFootprint``)."""
        if self.is_empty:
            return CacheFootprint()
        nb = {n: x.numel() * x.element_size() for n, x in self.tensors().items()}
        reserved = row_buffer.reserved_bytes((self.v_codes, self.v_scale, self.v_zero), self._v_store)
        B, H, _, D = self.k_residual.shape
        Dv = self.v_residual.shape[3]
        elems = B * H * self.seq_length * (D + Dv)
        return CacheFootprint(
            codes_bytes=nb["k_codes"] + nb["v_codes"],
            scale_zero_bytes=nb["k_scale"] + nb["k_zero"] + nb["v_scale"] + nb["v_zero"],
            residual_bytes=nb["k_residual"] + nb["v_residual"],
            mask_bytes=nb.get("k_valid", 0),
            reserved_bytes=reserved,
            dense_bytes=elems * self.k_residual.element_size(),
            fp16_bytes=elems * 2,
            tokens=self.seq_length,
        )

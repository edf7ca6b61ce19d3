"""``KIVIStaticCache``: a transformers ``Cache`` whose preallocated buffers hold only KIVI state.

The compile-friendly KIVI cache for transformers models: static shapes, the token count on the
device, in-place updates through ``kivi::static_kv_append_`` (so ``torch.compile`` with
``fullgraph=True`` and CUDA graphs work), and, unlike a transformers ``StaticCache`` rewritten by
the FX pass, *compact* buffers: per layer two ``[B, H, L, Ds]`` stores with Ds just large enough
for codes, scales, zeros and the residual ring (``static_ops.compact_store_shape``: 29 of 128 at
2 bits, 45 of 128 at 4 bits for L = 4096), so the cache takes ~4.4x / ~2.8x less memory than
fp16 buffers of the same length.

    kivi_ops.quantize_(model, cfg)                     # kivi attention + hooks on the model
    cache = KIVIStaticCache(model.config, max_cache_len=4096, kivi_config=cfg)
    fast = torch.compile(model, backend=kivi_ops.kivi_backend, fullgraph=True)
    out = fast(prompt_ids, past_key_values=cache)      # prefill, then one token per call

How attention reaches the stores: ``update`` appends the new keys/values and returns the stores;
the model's attention function (kivi's, which ``quantize_``/``attach`` install) then finds the
layer's pending step (new k, v, positions) and runs ``kivi::static_kv_attention`` on the stores.
The model must use kivi's attention: the cache refuses to update otherwise (plain sdpa over the
stores would be wrong). Streaming rules and logits are those of the dynamic ``KIVICache``.

Padded batches: kivi's model hook hands the cache the 2-D attention mask; before an append, pad
keys take the value of a real key of their group (``fill_pad_keys``, as the dynamic cache does),
so pads never enter a group's min/max, and the attention mask keeps them out of attention. Groups
are aligned from position 0, which holds for a prefill into an empty cache (where left padding
lives); a later multi-token append that itself contains pads fills within the appended block.

Not supported (clear errors): sliding-window layers, keys and values of different head_dim, more
tokens than ``max_cache_len``.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, StaticLayer

from kivi_ops.cache import static_ops
from kivi_ops.cache.state import fill_pad_keys_of_step

# layer_idx -> (layer, k_new, v_new, positions): set by update(), taken by the attention function
# that transformers calls next in the same attention module; cleared by the model's post-hook. A
# plain module-level dict (not thread-local) because Dynamo traces it with fullgraph=True: one
# forward over a KIVIStaticCache at a time per process.
_PENDING: dict = {}


def take_static_step(layer_idx: Optional[int]):
    """(layer, k, v, pos) that ``KIVIStaticLayer.update`` left for ``layer_idx``, or None."""
    if layer_idx is None or not _PENDING:
        return None
    return _PENDING.pop(layer_idx, None)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class KIVIStaticLayer(StaticLayer):
    """One attention layer's compact KIVI stores (``keys``, ``values``: [B, H, L, Ds])."""

    def __init__(self, max_cache_len: int, kivi_config, layer_idx: int):
        super().__init__(max_cache_len=max_cache_len)
        self.kivi_config = kivi_config
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if value_states.shape[-1] != D:
            raise ValueError(f"KIVIStaticCache needs keys and values of one head_dim, got {D} and "
                             f"{value_states.shape[-1]}")
        c, es = self.kivi_config, key_states.element_size()
        shape = static_ops.compact_store_shape(B, H, self.max_cache_len, D, es, c.k_bits, c.v_bits, c.group_size,
                                               c.residual_length)
        why = static_ops.store_fits(shape, es, c.k_bits, c.v_bits, c.group_size, c.residual_length, head_dim=D)
        if why is not None:
            raise ValueError(f"KIVIStaticCache: {why}")
        self.device = key_states.device
        self.batch_size, self.num_heads = B, H
        self.k_head_dim = self.v_head_dim = D
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _compiling():  # fixed addresses: no recompiles, CUDA graphs can capture the updates
            for t in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append k, v [B, H, M, D]; returns the stores (read only by kivi's attention function)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        M = key_states.shape[-2]
        if not _compiling() and int(self.cumulative_length) + M > self.max_cache_len:  # eager only: a host sync
            raise ValueError(f"KIVIStaticCache overflow: {int(self.cumulative_length)} cached + {M} new tokens "
                             f"> max_cache_len {self.max_cache_len}")
        c = self.kivi_config
        pos = torch.arange(M, device=self.device) + self.cumulative_length
        torch.ops.kivi.static_kv_append_(self.keys, self.values, key_states, value_states, pos, c.k_bits, c.v_bits,
                                         c.group_size, c.residual_length)
        self.cumulative_length.add_(M)
        _PENDING[self.layer_idx] = (self, key_states, value_states, pos)
        return self.keys, self.values

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               attention_mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float]) -> torch.Tensor:
        """query [B, Hq, M, D] over the stores after this step's append -> [B, Hq, M, D]."""
        c = self.kivi_config
        return static_ops.static_kv_attention(query, self.keys, self.values, k, v, pos, attention_mask, is_causal,
                                              c.k_bits, c.v_bits, c.group_size, c.residual_length, scale)


class KIVIStaticCache(Cache):
    """Compact static KIVI cache for a transformers model (see the module docstring).

    ``config``: the model's config (its decoder text config gives the layer count);
    ``max_cache_len``: tokens per sequence, rounded up to a multiple of 8 (the stores' regions then
    meet the fused CUDA decode kernel's 16-byte alignment; ``max_cache_len`` of the layers reports
    the rounded value); ``kivi_config``: a ``KIVIConfig`` (None, the default: the config that
    ``kivi_ops.quantize_`` gave the model, taken at the first forward, else ``KIVIConfig()``).
    Buffers are allocated at the first update (dtype, device, batch and heads from the first keys), like
    transformers' ``StaticCache``.
    """

    def __init__(self, config, max_cache_len: int, kivi_config=None):
        from kivi_ops.config import KIVIConfig

        # None: the model's quantize_ config once a forward brings it (begin_forward), else the default
        self._config_from_model = kivi_config is None
        kivi_config = kivi_config if kivi_config is not None else KIVIConfig()
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        if any(t != "full_attention" for t in types):
            raise NotImplementedError(f"KIVIStaticCache supports full-attention layers only, got {sorted(set(types))}")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        max_cache_len = -(-max_cache_len // 8) * 8
        self.kivi_config = kivi_config
        self.uses_kivi_attention = False  # set per forward by kivi's model hook (begin_forward)
        self.padding_mask: Optional[torch.Tensor] = None  # [B, positions] 1 = real token, from the hook
        super().__init__(layers=[KIVIStaticLayer(max_cache_len, kivi_config, i) for i in range(len(types))])

    def begin_forward(self, attention_mask: Optional[torch.Tensor], fused: bool, model_kivi_config=None) -> None:
        """Called by kivi's model pre-hook: ``fused`` = the model uses kivi's attention function;
        ``attention_mask`` [B, positions] (2-D) marks real tokens (pads are kept out of key groups);
        ``model_kivi_config``: the config ``quantize_`` gave the model (adopted by a cache made without
        one, before its stores exist)."""
        if self._config_from_model and model_kivi_config is not None:
            self._config_from_model = False
            if not any(layer.is_initialized for layer in self.layers):
                self.kivi_config = model_kivi_config
                for layer in self.layers:
                    layer.kivi_config = model_kivi_config
        self.uses_kivi_attention = fused
        is_2d = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        self.padding_mask = attention_mask if is_2d else None

    def end_forward(self) -> None:
        _PENDING.clear()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.uses_kivi_attention:
            raise RuntimeError("KIVIStaticCache needs the model to use kivi's attention function: call "
                               "kivi_ops.quantize_(model, cfg) (or kivi_ops.integrations.transformers.attach(model)) "
                               "first; plain attention over its compact stores would be wrong")
        if self.padding_mask is not None:
            key_states = self._fill_pads(key_states, self.layers[layer_idx].cumulative_length)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _fill_pads(self, k: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """k [B, H, M, D] with each pad key replaced by a real key of its group (device-side, no sync)."""
        B, M = k.shape[0], k.shape[2]
        mask = self.padding_mask.to(k.device)
        if mask.shape[0] != B:
            raise ValueError(f"the attention mask has batch {mask.shape[0]}, the keys {B}")
        if not _compiling() and int(cached) + M > mask.shape[1]:  # eager only: a host sync
            raise ValueError(f"the attention mask covers {mask.shape[1]} positions but the cache will hold "
                             f"{int(cached) + M} tokens: it must cover the cached and the new tokens")
        pos = torch.arange(M, device=k.device) + cached.to(k.device)
        valid = mask.index_select(1, pos.clamp(max=mask.shape[1] - 1)).bool()  # [B, M]
        return fill_pad_keys_of_step(k, valid, self.kivi_config.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stores (0 before the first update)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

"""``KIVICache``: a transformers ``Cache`` whose layers keep KIVI state (``KIVIState``).

Works with transformers 5.x (checked on 5.17 and 5.24): a ``Cache`` of per-layer
``CacheLayerMixin`` objects. The layer returns to the model's attention:

- on the first update (prefill) the given full-precision keys/values: prefill attends in full
  precision (DESIGN §1), the state stores them quantized per the rules;
- afterwards the dequantized cache (quantized history ‖ residual), or, when the fused path is on
  (attention implementation ``"kivi"``, see ``kivi_ops.integrations.transformers``), nothing to
  speak of: the registered attention function reads the packed state itself.

Padding: the cache learns which tokens are pads from ``set_attention_mask`` (called for you by the
hooks that ``kivi_ops.quantize_`` / ``kivi_ops.integrations.transformers.attach`` install).
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kivi_ops.cache.footprint import CacheFootprint
from kivi_ops.cache.state import KIVIState
from kivi_ops.config import KIVIConfig

# Layer types (transformers' ``config.layer_types``) a KIVI layer serves. Sliding/chunked layers
# keep every token; the mask hides the ones outside the window (their memory is not bounded).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# Hand-off from a layer's update() to the attention function that runs right after it in the same
# attention module: (layer_idx, layer) when the fused path was taken. Thread-local so that two
# models decoding in two threads never see each other's layers.
_handoff = threading.local()


def take_fused_handoff(layer_idx: Optional[int]):
    """The layer whose update() chose the fused path for ``layer_idx`` (cleared on read), or None."""
    pending = getattr(_handoff, "pending", None)
    _handoff.pending = None
    if pending is None or (layer_idx is not None and pending[0] != layer_idx):
        return None
    return pending[1]


def layer_types_of(config) -> tuple[list[str], list[Optional[int]]]:
    """(layer type, attention window or None) per decoder layer of a transformers config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types is None:
        if getattr(text, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(text, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    windows = [text.sliding_window if t == "sliding_attention" else
               text.attention_chunk_size if t == "chunked_attention" else None for t in types]
    return list(types), windows


class UnsupportedModelError(ValueError):
    """A model (or a model and a ``KIVIConfig``) that a KIVI cache cannot serve; the message says why."""


def check_model_config(kivi_config: KIVIConfig, config) -> None:
    """Raise an ``UnsupportedModelError`` (a ValueError) naming the problem if a model of ``config``
    cannot hold a KIVI cache of ``kivi_config``."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, _ = layer_types_of(text)
    bad = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if bad:
        raise UnsupportedModelError(f"KIVICache serves attention layers of types {SUPPORTED_LAYER_TYPES}; this "
                                    f"model has {bad} layers (linear-attention, shared-KV or MoE-only layers are "
                                    "not supported)")
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is None:
        raise UnsupportedModelError("cannot tell the model's head_dim from its config (no head_dim, hidden_size "
                                    "or num_attention_heads): no attention layers KIVI recognises")
    if head_dim % kivi_config.group_size != 0:
        raise UnsupportedModelError(f"head_dim ({head_dim}) must be a multiple of group_size "
                                    f"({kivi_config.group_size}): KIVI groups values per token over channels; pick "
                                    "a group_size that divides it")


class KIVILayer(CacheLayerMixin):
    """One attention layer of a ``KIVICache``: a ``KIVIState`` behind transformers' layer API."""

    is_compileable = False
    is_croppable = False  # quantization is lossy: a flushed block cannot be un-flushed

    def __init__(self, kivi_config: KIVIConfig, sliding_window: Optional[int] = None):
        super().__init__()
        self.kivi_config = kivi_config
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.state = KIVIState(kivi_config)
        self.padded = False  # a pad token was ever cached: the fused kernel cannot mask it
        self.fused_pending = False

    def __repr__(self):
        s = self.state
        return (f"KIVILayer({self.kivi_config.name}, tokens={s.seq_length}, keys {s.num_quantized_keys}q+"
                f"{s.num_residual_keys}r, values {s.num_quantized_values}q+{s.num_residual_values}r)")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: Optional[torch.Tensor] = None,
               fused: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states/value_states [B, H, t, D] and return what the attention should see.

        ``valid`` [B, t] bool marks real (non-pad) tokens; ``fused`` says the caller's attention
        function can read the packed state itself (then, for single-token decode steps of unpadded
        batches, the return value is the unused new states and ``fused_pending`` is set).
        """
        was_empty = self.state.is_empty
        padded = self.padded or (valid is not None and not bool(valid.all()))
        self.state.append(key_states, value_states, valid)  # validates first: errors leave it unchanged
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.padded = padded
        if was_empty:
            return key_states, value_states  # prefill attends in full precision
        t = key_states.shape[2]
        in_window = self.sliding_window is None or self.state.seq_length <= self.sliding_window
        if fused and t == 1 and not self.padded and in_window:
            self.fused_pending = True
            return key_states, value_states
        return self.state.dequantized()

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers <= 4.5x passed cache_position (a tensor of the new positions) instead of a length
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.state.seq_length + q, 0

    def get_seq_length(self) -> int:
        return self.state.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state.reset()
        self.padded = False
        self.fused_pending = False
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.state.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state.repeat_batch(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "KIVICache cannot crop: its oldest tokens are already quantized in blocks, and removing tokens would "
            "leave keys and values split at the wrong places. Assisted/speculative decoding and DoLa, which roll "
            "the cache back, need a DynamicCache.")

    def offload(self):
        raise NotImplementedError("KIVICache does not support offloading its layers")

    def prefetch(self):
        raise NotImplementedError("KIVICache does not support offloading its layers")


class KIVICache(Cache):
    """A transformers cache that stores keys and values the KIVI way (DESIGN §1).

    Args:
        kivi_config: bits, group size, residual length, backend. None (the default): the config that
            ``kivi_ops.quantize_`` gave the model, taken at the first forward through its hooks, else
            ``KIVIConfig()`` (KIVI-2).
        config: the model's config; gives the layer count and types and is checked (head_dim must
            be a multiple of group_size). Without it, layers are created as the model asks for them.

    Use: ``model(input_ids, cache=KIVICache(KIVIConfig(), config=model.config))`` (transformers
    5.24; ``past_key_values=`` before) or ``model.generate(..., cache=...)``; with
    ``kivi_ops.quantize_(model, config)`` generate builds one for you and padding masks are seen.
    """

    def __init__(self, kivi_config: Optional[KIVIConfig] = None, config=None):
        # None: the model's quantize_ config once a forward brings it (begin_forward), else the default
        self._config_from_model = kivi_config is None
        kivi_config = KIVIConfig() if kivi_config is None else kivi_config
        if not isinstance(kivi_config, KIVIConfig):
            raise TypeError(f"kivi_config must be a KIVIConfig, got {type(kivi_config).__name__}")
        self.kivi_config = kivi_config
        self._model_config = config
        if config is not None:
            check_model_config(kivi_config, config)
            _, windows = layer_types_of(config)
            super().__init__(layers=[KIVILayer(kivi_config, w) for w in windows])
        else:
            super().__init__(layer_class_to_replicate=lambda: KIVILayer(self.kivi_config))
        self._mask_new: Optional[torch.Tensor] = None  # [B, t] bool: the next forward's new tokens
        self._mask_at = -1  # sequence length at which _mask_new applies
        self._mask_has_pads = False  # whether _mask_new marks a pad (checked once per forward)
        self._fused = False  # set by the integration hooks while a "kivi" attention model runs
        self._warned_no_mask = False
        self._hooked = False  # inside a forward whose model has the integration hooks

    # ------------------------------------------------------------ forward-scoped context
    def set_attention_mask(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Tell the cache which tokens of the next forward are pads.

        attention_mask [B, past + t] (the usual 2-D mask: 1/True real, 0/False pad) covering the
        cached tokens and the t tokens of the next forward. Other shapes (e.g. 4-D masks) are
        rejected with a ValueError; ``None`` means all real. Only the new tokens' columns are used.
        """
        if attention_mask is None:
            self._mask_new, self._mask_at, self._mask_has_pads = None, -1, False
            return
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D [batch, past + new tokens] tensor, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        past = self.get_seq_length()
        if attention_mask.shape[1] <= past:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens but the cache already holds "
                             f"{past}: it must cover the cached tokens and the new ones")
        self._mask_new = attention_mask[:, past:].to(torch.bool)
        self._mask_at = past
        # One host sync per forward, here, instead of two per layer: a forward without pads (every
        # decode step of generate) hands its layers no mask at all.
        self._mask_has_pads = not bool(self._mask_new.all())

    def begin_forward(self, attention_mask=None, fused: bool = False,
                      model_kivi_config: Optional[KIVIConfig] = None) -> None:
        """Called by the integration's forward pre-hook: the padding mask, whether fused attention
        runs, and the config ``quantize_`` gave the model (adopted by a cache made without one,
        before it holds any token)."""
        if self._config_from_model and model_kivi_config is not None:
            self._adopt(model_kivi_config)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.set_attention_mask(attention_mask)
        else:
            self.set_attention_mask(None)
        self._fused = fused
        self._hooked = True

    def _adopt(self, kivi_config: KIVIConfig) -> None:
        """Become a cache of ``kivi_config`` (only while empty: its layers' states are remade)."""
        self._config_from_model = False
        if kivi_config == self.kivi_config or any(not layer.state.is_empty for layer in self.layers):
            return
        if self._model_config is not None:
            check_model_config(kivi_config, self._model_config)
        self.kivi_config = kivi_config
        for layer in self.layers:
            layer.kivi_config = kivi_config
            layer.state = KIVIState(kivi_config)

    def end_forward(self) -> None:
        self._mask_new, self._mask_at, self._fused, self._hooked = None, -1, False, False
        self._mask_has_pads = False
        take_fused_handoff(None)

    # ------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append to layer ``layer_idx``; returns the (keys, values) the model's attention should use."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx]
        valid = None
        if self._mask_new is not None and layer.get_seq_length() == self._mask_at:
            valid = self._mask_new
            if tuple(valid.shape) != (key_states.shape[0], key_states.shape[2]):
                raise ValueError(f"the attention mask gives {valid.shape[1]} new tokens for batch {valid.shape[0]}, "
                                 f"but layer {layer_idx} received states {tuple(key_states.shape)}")
            valid = valid.to(key_states.device) if self._mask_has_pads else None  # all real: as if no mask
        elif key_states.shape[0] > 1 and layer.get_seq_length() == 0 and not self._hooked and \
                not self._warned_no_mask:
            self._warned_no_mask = True
            warnings.warn("KIVICache got a batch without its attention mask, so it cannot keep pad tokens out of "
                          "the key groups' statistics. If the batch is padded, use kivi_ops.quantize_(model, ...) "
                          "(or kivi_ops.integrations.transformers.attach(model)), or call "
                          "cache.set_attention_mask(mask) before each forward.", stacklevel=2)
        out = layer.update(key_states, value_states, valid=valid, fused=self._fused)
        if layer.fused_pending:
            layer.fused_pending = False
            _handoff.pending = (layer_idx, layer)
        return out

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    # ------------------------------------------------------------ KIVI extras
    def memory_footprint(self) -> CacheFootprint:
        """Exact bytes of every layer's codes, scales/zeros, residual (and pad bookkeeping), summed."""
        total = CacheFootprint()
        for layer in self.layers:
            total = total + layer.state.footprint()
        return total

    def token_counts(self, layer_idx: int = 0) -> dict[str, int]:
        """Quantized/residual token counts of one layer: keys_quantized, keys_residual, values_*."""
        s = self.layers[layer_idx].state
        return dict(keys_quantized=s.num_quantized_keys, keys_residual=s.num_residual_keys,
                    values_quantized=s.num_quantized_values, values_residual=s.num_residual_values)

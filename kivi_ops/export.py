"""Export a KIVI model's decode step with torch.export and package it with AOTInductor.

    kivi_ops.quantize_(model, cfg)                                          # recommended: compact state
    cache = KIVIStaticCache(model.config, max_cache_len=L, kivi_config=cfg)
    model(prompt_ids, past_key_values=cache)                                # prefill (eager is fine)
    path = export_decode_step(model, cache, cfg, "decode.pt2")

    from transformers import StaticCache                                    # or a stock model

    cache = StaticCache(config=model.config, max_cache_len=L)
    fast = torch.compile(model, backend=kivi_ops.make_kivi_backend(cfg))   # prefill with KIVI
    fast(prompt_ids, past_key_values=cache)
    path = export_decode_step(model, cache, cfg, "decode.pt2")
    state = cache_tensors(cache)                                            # the KIVI state

    runner = torch._inductor.aoti_load_package(path)      # any process; no transformers needed
    logits = runner(token_ids, *state)                    # [B, 1, vocab]; state updated in place

The decode step is the graph Dynamo captures for one token of ``model`` over ``cache``, rewritten
by kivi's FX pass (attention over the static cache -> ``kivi::static_kv_*`` ops, the cache
buffers reinterpreted as KIVI state). Its inputs are the token ids [B, 1] and the cache tensors
(per layer: the token count, key store, value store, in ``cache_tensors`` order), which it
updates in place; the weights are baked into the package.

Runtime: the ``kivi::static_kv_*`` ops and the quantize/dequantize ops they call are defined and
implemented in C++ (``TORCH_LIBRARY``), so the package runs without Python, given the kivi_ops
extension library (``kivi_ops/_C*.so``) loaded into the process that runs it (from Python:
``import kivi_ops``; from C++: dlopen the library before loading the package). The loading
process must use the C++ runtime of the compiler that built the package: see
``package_runtime_env`` (a crash in ``std::regex`` while loading means it does not).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch


def _is_kivi_static(cache) -> bool:
    from kivi_ops.cache.transformers_static import KIVIStaticCache

    return isinstance(cache, KIVIStaticCache)


def cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors of a transformers ``StaticCache`` (or a ``KIVIStaticCache``) that a decode step
    reads and writes, in the exported step's argument order: per layer ``cumulative_length``,
    ``keys``, ``values``."""
    out = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            raise ValueError("the StaticCache is not initialised: run the prefill (compiled with the kivi "
                             "backend) before exporting the decode step")
        out += [layer.cumulative_length, layer.keys, layer.values]
    return out


class _DecodeStep(torch.nn.Module):
    """The rewritten Dynamo graph as a module: token ids + cache tensors in, logits out; every other
    graph input (weights, rotary buffers) becomes a buffer of this module (constants of the package)."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, ids: torch.Tensor, state: list[torch.Tensor]):
        super().__init__()
        self.gm = gm
        self.slots = []  # per graph input: ("ids", None) | ("state", index) | ("const", buffer name)
        for i, x in enumerate(example_inputs):
            if x is ids:
                self.slots.append(("ids", None))
            elif any(x is s for s in state):
                self.slots.append(("state", next(j for j, s in enumerate(state) if x is s)))
            elif isinstance(x, torch.Tensor):
                name = f"const_{i}"
                self.register_buffer(name, x.detach())
                self.slots.append(("const", name))
            else:
                raise ValueError(f"the decode graph takes a non-tensor input {type(x).__name__}; export it with "
                                 "static shapes")

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        args = [ids if kind == "ids" else state[ref] if kind == "state" else getattr(self, ref)
                for kind, ref in self.slots]
        out = self.gm(*args)
        return out[-1] if isinstance(out, (tuple, list)) else out  # the logits


def capture_decode_step(model, cache, config=None, batch_size: Optional[int] = None):
    """(rewritten decode-step module, example args) for ``model`` over ``cache``; ``cache`` is not
    touched (the capture runs on a deep copy)."""
    from kivi_ops.passes import rewrite_static_cache_attention
    from kivi_ops.passes.backend import _config
    from kivi_ops.passes.rewrite_dequant_attention import _op_name

    config = _config(config)
    work = copy.deepcopy(cache)
    state = cache_tensors(work)
    B = batch_size or state[1].shape[0]
    ids = torch.zeros(B, 1, dtype=torch.long, device=state[1].device)
    captured = []

    native = _is_kivi_static(cache)

    def backend(gm, example_inputs):
        if native:  # KIVIStaticCache: the graph calls the static KIVI ops itself
            if not any(_op_name(n) == "kivi.static_kv_append_" for n in gm.graph.nodes):
                raise RuntimeError("export_decode_step: the decode graph does not update the KIVIStaticCache; was "
                                   "the model prepared with kivi_ops.quantize_ (kivi attention)?")
        else:
            result = rewrite_static_cache_attention(gm, config)
            if result.fallback_reason or not result.rewrites:
                raise RuntimeError(f"export_decode_step: the decode graph was not rewritten onto KIVI ops: "
                                   f"{result.fallback_reason or 'no static-cache attention found'}")
        captured.append((gm, list(example_inputs)))
        return gm.forward

    from kivi_ops.integrations.transformers import cache_kwarg_name

    torch._dynamo.reset()
    step = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        step(ids, **{cache_kwarg_name(model): work}, use_cache=True)
    torch._dynamo.reset()
    gm, example_inputs = captured[-1]
    module = _DecodeStep(gm, example_inputs, ids, state)
    return module, (ids, *[s.clone() for s in state])


def export_decode_step(model, cache, config=None, package_path: str = "kivi_decode.pt2",
                       inductor_configs: Optional[dict] = None) -> str:
    """Export ``model``'s one-token decode step over the KIVI state in ``cache`` and package it
    with AOTInductor at ``package_path``; returns the path. ``cache``: a ``KIVIStaticCache`` after
    the prefill of a ``quantize_``'d model (eager or compiled), or a transformers ``StaticCache``
    whose prefill ran through the kivi backend with the same ``config``. See the module docstring
    for how to call the package."""
    module, args = capture_decode_step(model, cache, config)
    with torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
    os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
    return torch._inductor.aoti_compile_and_package(ep, package_path=package_path,
                                                    inductor_configs=inductor_configs)


def package_runtime_env() -> dict:
    """Environment for a process that loads an AOTInductor package built on this machine.

    The package's shared library is compiled by the machine's C++ compiler and must resolve the
    C++ runtime to that compiler's libstdc++. On the GPU machine (g++ 13.3, libstdc++ 6.0.33) a
    fresh Python crashed while loading ANY package, with or without kivi ops (a segfault in
    ``std::regex`` inside AOTInductor's ``parse_device_str``: a locale facet looked up through
    another C++ runtime), and loaded it fine with the compiler's libstdc++ preloaded
    (``scripts/diagnose_aoti.py``). Returns ``{"LD_PRELOAD": <compiler's libstdc++>}`` on Linux
    when the compiler reports one (harmless where the process would map the same library anyway),
    else ``{}``. In a shell: ``LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 run.py``.
    """
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        return {}
    try:
        lib = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libstdc++.so.6"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not os.path.isabs(lib) or not os.path.exists(lib):  # the compiler did not find it: prints the bare name
        return {}
    preload = " ".join(p for p in (os.path.realpath(lib), os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload}

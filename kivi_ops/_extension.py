"""Loads kivi_ops._C, the compiled op schemas and CPU (and, where built, CUDA) kernels."""

from __future__ import annotations

import torch

try:
    from kivi_ops import _C  # noqa: F401  (importing registers the kivi::* ops)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # a source checkout that was never built
    EXTENSION_ERROR = f"{exc}. Build it with: pip install --no-build-isolation -e ."


def require_extension() -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"kivi_ops' compiled extension is missing: {EXTENSION_ERROR}")


# Asked once, here: importing _C registered every kernel it has. A constant is also what traced code
# needs: Dynamo cannot trace the dispatcher query (a graph break, an error under fullgraph=True).
_CUDA_KERNELS: bool = EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kivi::quantize_keys", "CUDA")


def has_cuda_kernels() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return _CUDA_KERNELS

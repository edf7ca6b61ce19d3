"""Shared test fixtures: which (backend, device) pairs this machine can run."""

import os

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. Triton reads
# this when a kernel is decorated, so it must be set before anything imports kivi_ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kivi_ops import _extension  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H200)")
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_cuda_kernels()),
    reason="needs a CUDA GPU and kivi_ops built with its CUDA kernels (runs on the H200)")


def kernel_backends() -> list:
    """Every compiled implementation this machine can run, as pytest params (backend, device)."""
    params = [pytest.param(("cpu", "cpu"), id="cpu")]
    if torch.cuda.is_available():
        params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(
            not _extension.has_cuda_kernels(), reason="extension built without CUDA kernels")))
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def view_with_spare_rows(x: torch.Tensor, spare: int = 16, heads_major: bool = False) -> torch.Tensor:
    """x [B, H, n, C] as the used rows of a larger buffer, the way caches hold their history.

    The buffer has ``spare`` more rows per head, filled with NaN (0xFF for uint8 codes), so a
    kernel that reads past the used rows gets a wrong answer. ``heads_major`` stores the buffer
    [H, B, ...] and transposes it back: the batch stride is then smaller than the head stride.
    Rows (dims 2 and 3) stay contiguous; x's values are kept.
    """
    B, H, n, C = x.shape
    fill = 255 if x.dtype == torch.uint8 else float("nan")
    if heads_major:
        buf = torch.full((H, B, n + spare, C), fill, dtype=x.dtype, device=x.device).transpose(0, 1)
    else:
        buf = torch.full((B, H, n + spare, C), fill, dtype=x.dtype, device=x.device)
    view = buf[:, :, :n]
    view.copy_(x)
    return view

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

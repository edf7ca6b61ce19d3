"""Shared test fixtures: which (backend, device) pairs this machine can run."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. Triton reads
# this when a kernel is decorated, so it must be set before anything imports kivi_ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's compile cache defaults to /tmp/torchinductor_<user> and is never pruned: on the dev machine,
# whose disk CI shares, runs of this suite grew it to 9.5 GB, and CI then died of a full disk. Each test
# session compiles into its own directory, removed when the session ends. Its precompiled headers
# (135-149 MB each) ignore TORCHINDUCTOR_CACHE_DIR: they go to tempfile.gettempdir(), read when
# torch._inductor.codecache is imported (later than this), keyed by the compile command, so a checkout
# in a new place (a new venv path) added new ones every run (3 GB in one day). TMPDIR keeps them in the
# session's directory too.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _session_tmp = tempfile.mkdtemp(prefix="kivi_tests_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_session_tmp, "inductor")
    os.environ["TMPDIR"] = _session_tmp
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    atexit.register(shutil.rmtree, _session_tmp, ignore_errors=True)

from kivi_ops import _extension  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H200)")
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_cuda_kernels()),
    reason="needs a CUDA GPU and kivi_ops built with its CUDA kernels (runs on the H200)")


def triton_interpreter_before(major: int, minor: int) -> bool:
    """Whether the Triton kernels run in the interpreter (no GPU) of a Triton older than major.minor.
    Older interpreters fail on these kernels where compiled Triton of the same version does not (a
    CUDA build of torch pins one: torch 2.11 Triton 3.6, torch 2.14 Triton 3.8)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) < (major, minor)


# Triton 3.6's interpreter stops at loops whose bounds are program-id tensors (range(start, end, BLOCK)
# in the split loops: "only 0-dimensional arrays can be converted to Python scalars").
requires_interpreter_3_7 = pytest.mark.skipif(triton_interpreter_before(3, 7), reason=(
    "Triton 3.6's interpreter cannot run loops with tensor bounds (these kernels' split loops); compiled "
    "Triton 3.6 runs them on the GPU, and the interpreter from 3.7 on"))
# Before 3.9 the interpreter does not round each float32 step as compiled code does (RN(d / s) + 0.5 at
# a code boundary came out one code high): bit-exact quantize checks need 3.9 when interpreted.
requires_interpreter_3_9 = pytest.mark.skipif(triton_interpreter_before(3, 9), reason=(
    "Triton's interpreter before 3.9 does not round float32 steps as compiled code does (quantize "
    "codes off by one at rounding boundaries); compiled Triton on the GPU and the 3.9 interpreter are exact"))


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

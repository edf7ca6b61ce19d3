"""kivi_ops._extension: what the compiled extension holds, asked in a way traced code can use."""

import torch

from kivi_ops import _extension, ops


def test_backend_choice_traces_without_a_graph_break():
    """has_cuda_kernels, resolve_backend and cpp_kernels_for run inside compiled code (the caches'
    fused-step checks, the op entry points): fullgraph=True fails on any graph break. The
    dispatcher query behind has_cuda_kernels was one, for CUDA devices (even from a CPU machine)."""
    cuda = torch.device("cuda")

    def choose(x):
        picked = ops.resolve_backend("auto", cuda) == ("cuda" if _extension.has_cuda_kernels() else "triton")
        # decode_attention's auto choice for small traced caches on CUDA asks these too
        triton_for_small = ops._small_cache(1, 8, 1000) and ops._kernel_time_only() and ops._triton_available()
        return x + int(picked) + int(ops.cpp_kernels_for("auto", cuda)) + int(triton_for_small)

    torch._dynamo.reset()
    traced = torch.compile(choose, fullgraph=True, backend="eager")(torch.zeros(2))
    eager_picked = ops.resolve_backend("auto", cuda) == ("cuda" if _extension.has_cuda_kernels() else "triton")
    # traced, _kernel_time_only() is True: the small-cache term is whether Triton is installed
    want = int(eager_picked) + int(ops.cpp_kernels_for("auto", cuda)) + int(ops._triton_available())
    assert torch.equal(traced, torch.full((2,), float(want)))


def test_has_cuda_kernels_matches_the_dispatcher():
    registered = _extension.EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kivi::quantize_keys", "CUDA")
    assert _extension.has_cuda_kernels() == registered

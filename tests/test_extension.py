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
        return x + int(picked) + int(ops.cpp_kernels_for("auto", cuda))

    torch._dynamo.reset()
    want = choose(torch.zeros(2))
    assert torch.equal(torch.compile(choose, fullgraph=True, backend="eager")(torch.zeros(2)), want)


def test_has_cuda_kernels_matches_the_dispatcher():
    registered = _extension.EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kivi::quantize_keys", "CUDA")
    assert _extension.has_cuda_kernels() == registered

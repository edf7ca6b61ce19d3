"""Builds kivi_ops._C: the op schemas and CPU kernels always; the CUDA kernels when a CUDA build
of torch and nvcc are present (or KIVI_OPS_BUILD_CUDA=1 forces them, =0 skips them).

Build against the torch you will run with: ``pip install --no-build-isolation -e .``
"""

import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch


def _want_cuda() -> bool:
    flag = os.environ.get("KIVI_OPS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    if not _want_cuda():
        return CppExtension("kivi_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    arch = os.environ.get("KIVI_OPS_CUDA_ARCH", "90")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    nvcc += os.environ.get("KIVI_OPS_NVCC_FLAGS", "").split()  # build variants to A/B (scripts/gpu_check.sh ab)
    return CUDAExtension("kivi_ops._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})

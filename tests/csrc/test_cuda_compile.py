"""The CUDA kernels (csrc/cuda/*.cu) compile for the H200 (sm_90) against the installed torch's
headers, on a machine without a GPU: nvcc -c per source, with the flags torch's CUDAExtension and
setup.py use. Also checks ptxas's report: the tensor-core kernels must not spill registers or use a
stack frame (a spill in the decode loop costs more than it saves); the vectorized quantize kernels
may keep the few bytes of frame of the IEEE-division slow path (a subroutine call on a cold branch).

Skipped only when no nvcc is found (PATH, then CUDA_HOME / CUDA_PATH).
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCH = os.environ.get("KIVI_OPS_CUDA_ARCH", "90")
# name fragments of the mangled kernel names: tensor-core kernels (no frame, no spill) and the
# vectorized memory-bound kernels, the one-token appends (static store, dynamic cache) and the
# key-mask packing (at most a small call frame)
TC_KERNELS = ("attn_fused_kernel", "qk_fast_kernel", "pv_fast_kernel")
VEC_KERNELS = ("_vec_kernel", "static_append_one_kernel", "dynamic_append_one_kernel", "mask_bits_kernel")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in CUDA_HOME: cannot compile csrc/cuda")


def _command(src: pathlib.Path, obj: pathlib.Path) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    # C++20, as torch.utils.cpp_extension builds extensions since torch 2.13 (2.14 headers require it)
    cmd = [NVCC, "-c", str(src), "-o", str(obj), "-std=c++20", "-O3", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}",
           "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-Xcompiler", "-fPIC"]
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"]))
    if "--expt-relaxed-constexpr" not in cmd:
        cmd.append("--expt-relaxed-constexpr")
    # torch's CPU wheels ship c10/cuda headers without the generated cmake macros header; it only
    # holds export macros, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE lets c10 define itself.
    if not any((pathlib.Path(i) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for i in includes):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in includes:
        cmd += ["-I", inc]
    return cmd


def _compile(src: pathlib.Path, out_dir: pathlib.Path):
    obj = out_dir / (src.stem + ".o")
    proc = subprocess.run(_command(src, obj), capture_output=True, text=True, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, obj


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every source compiled once, in parallel (each takes ~40-60 s of host-side header parsing)."""
    out = tmp_path_factory.mktemp("kivi_cuda_objs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(SOURCES))) as pool:
        futures = {src.name: pool.submit(_compile, src, out) for src in SOURCES}
        return {name: f.result() for name, f in futures.items()}


def _resources(log: str) -> dict[str, tuple[int, int, int]]:
    """ptxas -v: mangled kernel name -> (registers, stack frame bytes, spill store bytes)."""
    res, name, frame = {}, None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name, frame = m.group(1), None
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m:
            frame = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None and frame is not None:
            res[name] = (int(m.group(1)), *frame)
            name = None
    return res


def test_all_sources_present():
    names = {s.name for s in SOURCES}
    assert {"quantize.cu", "qmatmul.cu", "decode_attention.cu"} <= names, names
    for src in SOURCES:
        assert "TORCH_LIBRARY_IMPL(kivi, CUDA" in src.read_text(), f"{src.name} registers no CUDA kernels"


@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_compiles_for_sm90(builds, name):
    rc, log, obj = builds[name]
    errors = "\n".join(line for line in log.splitlines() if "error" in line.lower())
    assert rc == 0, f"nvcc failed on {name}:\n{errors or log[-4000:]}"
    assert obj.exists() and obj.stat().st_size > 0


@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_fast_kernels_do_not_spill(builds, name):
    rc, log, _ = builds[name]
    if rc != 0:
        pytest.fail(f"{name} did not compile")
    res = _resources(log)
    assert res, f"no ptxas resource report for {name}"
    tc = {k: v for k, v in res.items() if any(f in k for f in TC_KERNELS)}
    vec = {k: v for k, v in res.items() if any(f in k for f in VEC_KERNELS)}
    assert tc or vec, f"no fast kernel found in {name}"
    bad = {k: v for k, v in tc.items() if v[1] or v[2]}
    bad.update({k: v for k, v in vec.items() if v[1] > 16 or v[2] > 16})
    assert not bad, "fast kernels with a stack frame or spills (registers, frame, spill bytes): " + "; ".join(
        f"{k}: {v}" for k, v in bad.items())

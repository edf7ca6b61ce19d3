"""Why does loading an AOTInductor package segfault on the GPU machine (issue 5)?

gdb showed the crash inside the package's own wrapper .so, in ``std::regex`` construction
(``torch::aot_inductor::parse_device_str``), before any kivi op runs: the pattern of a C++
``std::locale`` facet looked up through a different libstdc++ than the one that built the
locale. This script separates the suspects, each in a fresh process:

  1. a trivial package (one Linear, no kivi ops) loaded without ``import kivi_ops``;
  2. the same package loaded after ``import kivi_ops``;
  3. the same as 1 with the system libstdc++ preloaded (LD_PRELOAD);
and prints, for each, the exit status and which libstdc++ the process mapped, plus the compiler
that built the package.

    python3 scripts/diagnose_aoti.py [cuda|cpu]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

LOADER = """
import sys, torch
if sys.argv[2] == "1":
    import kivi_ops  # noqa: F401
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(2, 8, device=sys.argv[3])
print("ok", tuple(runner(x).shape))
maps = {l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}
print("libstdc++ mapped:", sorted(maps))
"""


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    from kivi_ops.export import package_runtime_env

    cxx = os.environ.get("CXX", "g++")
    print(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    preload = package_runtime_env()
    print("compiler's libstdc++:", preload.get("LD_PRELOAD", "not found"))
    folder = tempfile.mkdtemp()
    model = torch.nn.Linear(8, 4).to(device)
    ep = torch.export.export(model, (torch.randn(2, 8, device=device),))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(folder, "trivial.pt2"))
    cases = [("trivial package, no kivi_ops", "0", {}),
             ("trivial package, import kivi_ops first", "1", {}),
             ("trivial package, LD_PRELOAD the compiler's libstdc++", "0", preload)]
    for name, with_kivi, env in cases:
        proc = subprocess.run([sys.executable, "-c", LOADER, path, with_kivi, device], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)
        print(f"== {name}: exit {proc.returncode}")
        print("   " + "\n   ".join((proc.stdout + proc.stderr[-600:]).strip().splitlines()[-4:]))


if __name__ == "__main__":
    main()

"""A/B of the dynamic KIVICache in generate, one process each: the spare-row value buffers (default)
vs the exact-size torch.cat append they replaced (``--exact``). Passes the other arguments on to
benchmarks/bench_generate.py.

    python scripts/ab_dynamic_generate.py [--exact] --out DIR --batches 8 --contexts 16384 --bits 2
"""
import runpy
import sys

from kivi_ops.cache import row_buffer

if "--exact" in sys.argv:
    sys.argv.remove("--exact")
    row_buffer.append_rows = row_buffer.exact_size_append
    print("append: exact-size torch.cat (before the spare-row buffers)")
sys.argv[0] = "benchmarks/bench_generate.py"
runpy.run_path("benchmarks/bench_generate.py", run_name="__main__")

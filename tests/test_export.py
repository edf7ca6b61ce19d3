"""kivi_ops.export: the decode step packaged with AOTInductor decodes, in a fresh process, the
same tokens as eager KIVI (the dynamic KIVICache) on the same weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "passes"))

from models import greedy, tiny_llama  # noqa: E402

STEPS = 24

# Runs in a fresh interpreter: no transformers, no model code; only the package, the state, and
# the kivi ops library (import kivi_ops loads kivi_ops/_C, where the ops are defined in C++).
RUNNER = textwrap.dedent("""
    import json, sys, torch
    import kivi_ops  # noqa: F401  (loads the C++ kivi::* ops the package calls)
    folder = sys.argv[1]
    runner = torch._inductor.aoti_load_package(folder + "/decode.pt2")
    saved = torch.load(folder + "/state.pt")
    state, tok = saved["state"], saved["first_token"]
    tokens = [tok[:, 0].tolist()]
    for _ in range(%d):
        logits = runner(tok, *state)
        tok = logits[:, -1:].argmax(-1)
        tokens.append(tok[:, 0].tolist())
    assert "transformers" not in sys.modules
    print(json.dumps(tokens))
""" % (STEPS - 1))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU (runs on the H200)"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_kind", ["stock StaticCache", "KIVIStaticCache"])
def test_aoti_package_decodes_like_eager_kivi(tmp_path, device, cache_kind):
    from transformers import StaticCache

    from kivi_ops.cache import KIVICache, KIVIStaticCache
    from kivi_ops.config import KIVIConfig
    from kivi_ops.export import cache_tensors, export_decode_step, package_runtime_env
    from kivi_ops.integrations.transformers import cache_kwarg_name
    from kivi_ops.passes import make_kivi_backend
    from kivi_ops.quantize import quantize_

    cfg = KIVIConfig(residual_length=32)
    model = tiny_llama(num_kv_heads=2).to(device)  # float32: token equality without fp16 argmax ties
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2)).to(device)
    ref_tokens, _ = greedy(model, KIVICache(cfg, config=model.config), ids, STEPS)
    kw = cache_kwarg_name(model)

    torch._dynamo.reset()
    if cache_kind == "KIVIStaticCache":  # quantize_ + the compact cache; an eager prefill writes KIVI state
        quantize_(model, cfg)
        cache = KIVIStaticCache(model.config, max_cache_len=128, kivi_config=cfg)
        with torch.no_grad():
            out = model(ids, **{kw: cache}, use_cache=True)
    else:  # prefill through the kivi backend: the StaticCache buffers now hold KIVI state
        cache = StaticCache(config=model.config, max_cache_len=128)  # buffers allocated on the first update
        with torch.no_grad():
            out = torch.compile(model, backend=make_kivi_backend(cfg), fullgraph=True)(ids, **{kw: cache})
    first = out.logits[:, -1:].argmax(-1)
    path = export_decode_step(model, cache, cfg, str(tmp_path / "decode.pt2"))
    torch.save({"state": cache_tensors(cache), "first_token": first}, tmp_path / "state.pt")

    # package_runtime_env: the compiler's libstdc++ where Python maps an older one (the GPU machine)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **package_runtime_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(path)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ref_tokens


def test_package_runtime_env_preloads_the_compilers_libstdcxx(monkeypatch):
    from kivi_ops.export import package_runtime_env

    if not sys.platform.startswith("linux"):
        assert package_runtime_env() == {}
        return
    env = package_runtime_env()
    lib = env["LD_PRELOAD"].split()[0]
    assert os.path.isabs(lib) and os.path.exists(lib) and "libstdc++" in lib
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # no compiler: nothing to preload
    assert package_runtime_env() == {}

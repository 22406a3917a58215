"""mistral-torch: a readable, fast PyTorch Mistral-7B and its whole life cycle."""

from __future__ import annotations

import importlib
from typing import Any

from .args import ModelArgs
from .cache import RollingKVCache
from .model import Mistral7B, Transformer

__version__ = "0.1.0"

# Heavier parts are imported on first use, so `import mistral_torch` stays fast.
_LAZY = {
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "generate": "generate",
    "stream": "generate",
}

__all__ = ["ModelArgs", "RollingKVCache", "Transformer", "Mistral7B", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mistral_torch' has no attribute {name!r}")

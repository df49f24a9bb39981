"""alibi-lm: ALiBi (Attention with Linear Biases, Press, Smith & Lewis 2021) — train short, test long.

Public API:
    alibi_slopes(n_heads)                 the paper's fixed per-head slopes
    attention(q, k, v, slopes=..., ...)   attention with an in-kernel ALiBi bias (or none)
    ModelConfig, TransformerLM, KVCache   a decoder-only LM with a choice of position method
    load_config                           a training config (preset or TOML) with overrides
    UserError                             raised for mistakes in user input

The names are loaded on first use (PEP 562), so that `import alibi_lm.config`, `alibi_lm.plots` and
`alibi-lm --help` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "UserError": "alibi_lm.errors",
    "ModelConfig": "alibi_lm.model_config",
    "load_config": "alibi_lm.config",
    "attention": "alibi_lm.kernels",
    "KVCache": "alibi_lm.model",
    "TransformerLM": "alibi_lm.model",
    "POSITIONS": "alibi_lm.positions",
    "alibi_slopes": "alibi_lm.positions",
}

__all__ = ["POSITIONS", "KVCache", "ModelConfig", "TransformerLM", "UserError", "__version__", "alibi_slopes",
           "attention", "load_config"]

if TYPE_CHECKING:
    from alibi_lm.config import load_config
    from alibi_lm.errors import UserError
    from alibi_lm.kernels import attention
    from alibi_lm.model import KVCache, TransformerLM
    from alibi_lm.model_config import ModelConfig
    from alibi_lm.positions import POSITIONS, alibi_slopes


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'alibi_lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

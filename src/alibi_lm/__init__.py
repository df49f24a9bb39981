"""alibi-lm: ALiBi (Attention with Linear Biases, Press, Smith & Lewis 2021) — train short, test long.

Public API:
    alibi_slopes(n_heads)                 the paper's fixed per-head slopes
    attention(q, k, v, slopes=..., ...)   attention with an in-kernel ALiBi bias (or none)
    ModelConfig, TransformerLM            a decoder-only LM with a choice of position method
    UserError                             raised for mistakes in user input
"""

from alibi_lm.errors import UserError
from alibi_lm.kernels import attention
from alibi_lm.model import KVCache, ModelConfig, TransformerLM
from alibi_lm.positions import POSITIONS, alibi_slopes

__version__ = "0.1.0"

__all__ = ["POSITIONS", "KVCache", "ModelConfig", "TransformerLM", "UserError", "__version__", "alibi_slopes",
           "attention"]

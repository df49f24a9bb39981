"""The model's configuration: a plain dataclass, no torch (the config layer, STYLE.md).

`ModelConfig` is the [model] section of a training config and the "model" entry of every checkpoint's
meta.json. The names it accepts for its choices live here too (positions, slope rules, attention
backends); the registries that act on them (`positions.POSITIONS`, `positions.SLOPE_RULES`,
`kernels.BACKENDS`) are checked against these names by the tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from alibi_lm.errors import UserError, closest_match_hint

__all__ = ["ACTIVATIONS", "ATTENTION_BACKENDS", "NORMS", "POSITION_NAMES", "SLOPE_RULE_NAMES", "ModelConfig"]

#: the position methods (positions.POSITIONS builds them)
POSITION_NAMES = ("alibi", "sinusoidal", "learned", "rotary", "t5", "none")
#: ALiBi slope constructions (positions.SLOPE_RULES)
SLOPE_RULE_NAMES = ("paper", "mpt")
#: attention backends (kernels.BACKENDS)
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "triton")

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    #: key/value heads (GQA/MQA); None means n_heads
    n_kv_heads: int | None = None
    #: feed-forward width; None means 4 * d_model
    d_ff: int | None = None
    #: dropout on embeddings and on each residual branch
    dropout: float = 0.0
    #: dropout on the attention probabilities (the paper's WikiText-103 recipe: 0.1); training only
    attn_dropout: float = 0.0
    #: dropout after the feed-forward activation (fairseq's activation_dropout; the paper: 0.1)
    act_dropout: float = 0.0
    #: inference only: the share of each query row's softmax mass attention may leave out, so that the
    #: Triton kernel skips the key tiles ALiBi's bias has provably killed (0: exact; e.g. 1e-4)
    attn_tolerance: float = 0.0
    #: alibi | sinusoidal | learned | rotary | t5 | none
    position: str = "alibi"
    #: size of the `learned` position table (the longest input it can read)
    max_len: int = 1024
    norm: str = "layernorm"
    #: gelu | gelu_tanh (BLOOM, GPT-2) | swiglu
    activation: str = "gelu"
    tie_embeddings: bool = True
    #: biases in linear layers and layer norms
    bias: bool = True
    #: a layer norm right after the token embeddings (BLOOM's word_embeddings_layernorm)
    embed_norm: bool = False
    norm_eps: float = 1e-5
    #: ALiBi slopes become parameters (the Triton backward returns their gradient)
    trainable_slopes: bool = False
    #: paper (Press et al., also BLOOM) | mpt (MosaicML's rule for non-power-of-two heads)
    slope_rule: str = "paper"
    #: the 8 of 2^(-8h/n); MPT calls it alibi_bias_max
    alibi_max_bias: float = 8.0
    #: clamp the fused q/k/v projection to [-qkv_clip, qkv_clip] (MPT's clip_qkv); None: no clamp
    qkv_clip: float | None = None
    #: the attention score scale (MPT's softmax_scale); None means 1/sqrt(head_dim)
    attn_scale: float | None = None
    rotary_base: float = 10000.0
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    #: attention backend: auto | triton | sdpa | reference
    attention_backend: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_width(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ValueError (a UserError) naming the first invalid field."""
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})")
        if self.ff_width < 1:
            raise UserError(f"model.d_ff must be positive, got {self.d_ff}")
        for name in ("dropout", "attn_dropout", "act_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UserError(f"model.{name} must be in [0, 1), got {value!r}")
        choices = {"position": POSITION_NAMES, "norm": NORMS, "activation": ACTIVATIONS,
                   "slope_rule": SLOPE_RULE_NAMES, "attention_backend": ATTENTION_BACKENDS}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise UserError(f"unknown model.{name} {value!r}{closest_match_hint(str(value), valid)}; "
                                f"valid: {', '.join(valid)}")
        tol = self.attn_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
            raise UserError(f"model.attn_tolerance must be in [0, 1) (e.g. 1e-4; 0 is exact), got {tol!r}")
        for name in ("qkv_clip", "attn_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise UserError(f"model.{name} must be a positive number or unset, got {value!r}")
        bias = self.alibi_max_bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not 0 < bias < math.inf:
            raise UserError(f"model.alibi_max_bias must be a positive finite number, got {bias!r}")
        if self.position == "rotary" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head dimension, got {self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(f"unknown model config key {key!r}{closest_match_hint(key, known)}")
        return cls(**values)

"""Position methods: ALiBi and the five it is compared with in the paper.

Every method is a small `nn.Module` with one contract, used by `model.TransformerLM`:

- `embed(x, offset)` adds position information to the token embeddings (sinusoidal, learned);
- `rotate(q, k, offset)` rotates queries and keys (rotary);
- `attention_slopes()` gives the per-head ALiBi slopes the attention kernel adds in-kernel (alibi);
- `attention_bias(n_queries, n_keys, offset, device)` gives an additive (heads, queries, keys) score
  bias (t5);
- traits: `absolute` (tied to absolute indices: a left-padded batch cannot use it), `max_positions`
  (the longest input it can read), `lookup_parameters()` (parameters that are a table lookup, not a
  matrix product: no FLOPs).

Positions are absolute token indices: `offset` is the index of the first token of `x` (or `q`), which
is the KV-cache length during incremental decoding. Keys always start at position 0. Only ALiBi's
slopes reach the attention kernel; no method but T5 builds a (heads, queries, keys) tensor, and T5's
is learned and bucketed, so it cannot be computed in-kernel from the positions alone. The model runs
attention (this module never calls a kernel: positions and kernels are one layer, STYLE.md).
`build_position(cfg)` is the one place a method is chosen by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alibi_lm.model_config import ModelConfig

__all__ = [
    "POSITIONS",
    "ALiBi",
    "Learned",
    "NoPosition",
    "PositionMethod",
    "Rotary",
    "Sinusoidal",
    "T5Bias",
    "alibi_slopes",
    "build_position",
    "mpt_alibi_slopes",
]


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> Tensor:
    """The paper's fixed per-head slopes, float32 of shape (n_heads,).

    For n a power of two, slope h (1-based) is 2^(-max_bias * h / n): 8 heads give 1/2 ... 1/256.
    Otherwise the paper's code takes the slopes of the closest lower power of two c, then every
    other slope (1st, 3rd, ...) of the 2c rule until there are n. BLOOM uses the same rule.
    """
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"alibi_slopes needs a positive whole number of heads, got {n_heads!r}")

    def power_of_two_rule(n: int) -> list[float]:
        return [2.0 ** (-max_bias * h / n) for h in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_rule(closest)
    if closest < n_heads:
        slopes += power_of_two_rule(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)


def mpt_alibi_slopes(n_heads: int, max_bias: float = 8.0) -> Tensor:
    """MosaicML MPT's construction of the slopes, written as MPT writes it: round n *up* to
    c = 2^ceil(log2 n) and take the odd-indexed slopes of the c rule before the even ones.

    It looks different from the paper's rule but yields the same slopes in the same order for every
    head count and max_bias (the lower power's rule is every second slope of the doubled one); the
    tests check this, which is why an imported MPT model only needs its `alibi_bias_max`."""
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"mpt_alibi_slopes needs a positive whole number of heads, got {n_heads!r}")
    padded = 2 ** math.ceil(math.log2(n_heads))
    slopes = [2.0 ** (-max_bias * h / padded) for h in range(1, padded + 1)]
    if padded != n_heads:
        slopes = (slopes[1::2] + slopes[0::2])[:n_heads]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)


SLOPE_RULES = {"paper": alibi_slopes, "mpt": mpt_alibi_slopes}


class PositionMethod(nn.Module):
    """No position information at all; the base class of every method (identity hooks)."""

    name = "none"
    #: information tied to absolute token indices (added to the embeddings): a left-padded batch shifts
    #: every index, so such methods cannot run prompts of different lengths in one batch
    absolute = False
    #: the largest position the method can represent (None: unbounded)
    max_positions: int | None = None
    #: whether `attention_bias` gives a tensor (the fused kernel cannot take one)
    score_bias = False

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> PositionMethod:
        return cls()

    def embed(self, x: Tensor, offset: int) -> Tensor:  # x: (B, T, d_model)
        return x

    def rotate(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        return q, k

    def attention_slopes(self) -> Tensor | None:
        """(H,) slopes of the in-kernel ALiBi bias, or None."""
        return None

    def attention_bias(self, n_queries: int, n_keys: int, offset: int, device: torch.device) -> Tensor | None:
        """(H, Lq, Lk) additive score bias of queries offset..offset+Lq-1 over keys 0..Lk-1, or None."""
        return None

    def lookup_parameters(self) -> int:
        """How many of the method's parameters are a table lookup (no matrix product, so no FLOPs)."""
        return 0

    def reset_parameters(self) -> None:
        """The method's own initialisation, after the model's GPT-2 one has touched every table."""


class NoPosition(PositionMethod):
    """`none`: a causal LM can still infer order from the causal mask (NoPE)."""


class ALiBi(PositionMethod):
    """`alibi`: no embeddings; the kernel adds -m_h * (i - j) to each score."""

    name = "alibi"

    def __init__(self, n_heads: int, *, rule: str = "paper", max_bias: float = 8.0, trainable: bool = False):
        super().__init__()
        if rule not in SLOPE_RULES:
            raise ValueError(f"unknown ALiBi slope rule {rule!r}; valid: {', '.join(SLOPE_RULES)}")
        slopes = SLOPE_RULES[rule](n_heads, max_bias)
        if trainable:
            self.slopes = nn.Parameter(slopes)
        else:
            # Fixed, as in the paper; persistent so a checkpoint records exactly what was used.
            self.register_buffer("slopes", slopes)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ALiBi:
        return cls(cfg.n_heads, rule=cfg.slope_rule, max_bias=cfg.alibi_max_bias, trainable=cfg.trainable_slopes)

    def attention_slopes(self) -> Tensor:
        return self.slopes


def sinusoid_table(positions: Tensor, dim: int) -> Tensor:
    """(T, dim) sin/cos features of Vaswani et al. (sines in the first half, cosines in the second,
    as fairseq lays them out), computed in float32 for any position."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / max(half - 1, 1)
    )
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(table, (0, dim - 2 * half))


class Sinusoidal(PositionMethod):
    """`sinusoidal`: fixed sin/cos vectors added to the token embeddings.

    The vectors are scaled by d_model^-0.5: fairseq adds unit-amplitude sinusoids to embeddings
    multiplied by sqrt(d_model); we keep GPT-2's small embeddings instead, so scaling the sinusoids
    down keeps fairseq's ratio of token to position signal."""

    name = "sinusoidal"
    absolute = True

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Sinusoidal:
        return cls(cfg.d_model)

    def embed(self, x: Tensor, offset: int) -> Tensor:
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        table = sinusoid_table(positions, self.d_model) * self.d_model**-0.5
        return x + table.to(x.dtype)


class Learned(PositionMethod):
    """`learned`: a trained table of max_len vectors (GPT-2); it cannot go beyond max_len."""

    name = "learned"
    absolute = True

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_positions = max_len
        self.table = nn.Embedding(max_len, d_model)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Learned:
        return cls(cfg.d_model, cfg.max_len)

    def lookup_parameters(self) -> int:
        return self.table.weight.numel()

    def embed(self, x: Tensor, offset: int) -> Tensor:
        end = offset + x.shape[1]
        if end > self.max_positions:
            raise ValueError(
                f"learned position embeddings cover positions 0..{self.max_positions - 1}, but position "
                f"{end - 1} was asked for; they cannot extrapolate (use alibi, rotary, t5, sinusoidal or none)"
            )
        positions = torch.arange(offset, end, device=x.device)
        return x + self.table(positions)


class Rotary(PositionMethod):
    """`rotary` (RoFormer): rotate each pair of query/key features by an angle proportional to the
    position, so q·k depends on i - j. Uses the half-split pairing of GPT-NeoX and Llama."""

    name = "rotary"

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Rotary:
        return cls(cfg.head_dim, cfg.rotary_base)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def rotate(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(offset, offset + q.shape[2], device=q.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(q.device)[None, :]  # (T, D/2)
        cos, sin = angles.cos(), angles.sin()
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def t5_buckets(relative: Tensor, num_buckets: int, max_distance: int, causal: bool) -> Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, then
    logarithmic up to max_distance, beyond which all distances share the last bucket."""
    buckets = torch.zeros_like(relative)
    if causal:
        distance = (-relative).clamp(min=0)
    else:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    exact = num_buckets // 2
    is_small = distance < exact
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5Bias(PositionMethod):
    """`t5`: a learned scalar per (head, bucket of i - j), added to the scores (Raffel et al.),
    shared by all layers as in T5."""

    name = "t5"
    score_bias = True

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.table = nn.Embedding(num_buckets, n_heads)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> T5Bias:
        return cls(cfg.n_heads, cfg.t5_num_buckets, cfg.t5_max_distance)

    def attention_bias(self, n_queries: int, n_keys: int, offset: int, device: torch.device) -> Tensor:
        q_pos = torch.arange(offset, offset + n_queries, device=device)
        k_pos = torch.arange(n_keys, device=device)
        buckets = t5_buckets(k_pos[None, :] - q_pos[:, None], self.num_buckets, self.max_distance, True)
        return self.table(buckets).permute(2, 0, 1)  # (H, Lq, Lk)

    def reset_parameters(self) -> None:
        # a zero bias at the start: every method begins as the plain causal attention of `none`
        nn.init.zeros_(self.table.weight)


#: position name -> class; `build_position` constructs them from a ModelConfig
POSITIONS: dict[str, type[PositionMethod]] = {
    "alibi": ALiBi,
    "sinusoidal": Sinusoidal,
    "learned": Learned,
    "rotary": Rotary,
    "t5": T5Bias,
    "none": NoPosition,
}


def build_position(cfg: ModelConfig) -> PositionMethod:
    """The position method `cfg.position` names, built from the config's fields."""
    return POSITIONS[cfg.position].from_config(cfg)

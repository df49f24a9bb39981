"""A pre-LayerNorm decoder-only transformer whose position method is chosen by name.

Single-device and loop-free: no optimizer, data, I/O or printing here (STYLE.md). The position
method is one module shared by every layer; attention goes through `kernels.attention`, so ALiBi
hands its slopes to the fused kernel and no (heads, L, L) bias exists in the model.

Axis names in shape comments: B batch, T new tokens, S all tokens so far (cache + new), H query
heads, K key/value heads, D head dimension, C d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alibi_lm.kernels import attention
from alibi_lm.kernels.sdpa import attend_in_query_chunks
from alibi_lm.model_config import ModelConfig
from alibi_lm.positions import PositionMethod, build_position

__all__ = ["KVCache", "ModelConfig", "TransformerLM", "inference_autocast_dtype", "set_attention_tolerance",
           "token_nll"]

#: the most elements (heads x queries x keys) of an additive score bias (T5's, a padding mask) built at
#: once; more are taken in query chunks
BIAS_CHUNK_ELEMENTS = 1 << 25

class KVCache:
    """Keys and values of every layer for incremental decoding, in buffers that double when full.

    Keys are stored after the position method's rotation, so a cached key never changes. With
    `key_norms` (bounded-error attention, `ModelConfig.attn_tolerance`) the cache also keeps, per layer,
    the running maximum of the key norms along the cache (B, K, S) float32, extended on every append:
    the bound needs it for every step, and recomputing it would read the whole cache it exists to skip."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype, *, key_norms: bool = False):
        shape = (batch, cfg.kv_heads, max(capacity, 1), cfg.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.norm_max = ([torch.empty(shape[:3], device=device, dtype=torch.float32) for _ in range(cfg.n_layers)]
                         if key_norms else None)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's k, v (B, K, T, D) for `layer`; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:
            grow = max(end, 2 * self.keys[layer].shape[2])
            self.keys[layer] = _grown(self.keys[layer], grow, start)
            self.values[layer] = _grown(self.values[layer], grow, start)
            if self.norm_max is not None:
                self.norm_max[layer] = _grown(self.norm_max[layer][..., None], grow, start)[..., 0]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        if self.norm_max is not None:
            running = torch.linalg.vector_norm(k.float(), dim=-1)  # (B, K, T)
            if start > 0:
                running = torch.maximum(running, self.norm_max[layer][:, :, start - 1 : start])
            self.norm_max[layer][:, :, start:end] = torch.cummax(running, dim=-1).values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def key_norm_max(self, layer: int) -> Tensor | None:
        """Running maximum of the key norms of `layer` over the cache so far (B, K, S), or None."""
        return None if self.norm_max is None else self.norm_max[layer][:, :, : self.length]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens


def _grown(buffer: Tensor, capacity: int, used: int) -> Tensor:
    bigger = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    bigger[:, :, :used] = buffer[:, :, :used]
    return bigger


def padding_bias(padding_mask: Tensor, n_queries: int, offset: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, T, S) additive mask that hides padded keys. A padded query still sees itself, so that
    no row is empty (an empty row is NaN, and 0 * NaN would leak into real rows through V)."""
    keys = torch.arange(padding_mask.shape[1], device=padding_mask.device)
    queries = torch.arange(offset, offset + n_queries, device=padding_mask.device)
    visible = padding_mask[:, None, :].bool() | (keys[None, None, :] == queries[None, :, None])  # (B, T, S)
    zero = torch.zeros((), dtype=dtype, device=padding_mask.device)
    return torch.where(visible, zero, torch.tensor(-math.inf, dtype=dtype, device=padding_mask.device))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def project(self, x: Tensor, position: PositionMethod, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """The attention inputs of x (B, T, C): q (B, H, T, D), k and v (B, K, T, D), after the position
        method's rotation (what the kernels see; benchmarks/bounded.py measures on them)."""
        B, T, _ = x.shape
        H, K, D = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim
        qkv = self.qkv(x)
        if self.cfg.qkv_clip is not None:
            qkv = qkv.clamp(-self.cfg.qkv_clip, self.cfg.qkv_clip)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        if self.cfg.attn_scale is not None:
            # every backend scales by 1/sqrt(D); folding the rest into q keeps one kernel signature
            q = q * (self.cfg.attn_scale * math.sqrt(D))
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)
        return (*position.rotate(q, k, offset), v)

    def forward(self, x: Tensor, position: PositionMethod, offset: int, layer: int, cache: KVCache | None,
                padding_mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, position, offset)
        key_norm_max = None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
            if cache.norm_max is not None:  # the running maximum up to and including this step's keys
                key_norm_max = cache.norm_max[layer][:, :, : k.shape[2]]
        # dropout while training, the bounded-error skip (inference only) otherwise
        dropout_p, tolerance = (self.cfg.attn_dropout, 0.0) if self.training else (0.0, self.cfg.attn_tolerance)
        out = attend(q, k, v, position, offset, self.cfg.attention_backend, padding_mask, dropout_p=dropout_p,
                     tolerance=tolerance, key_norm_max=key_norm_max)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def attend(q: Tensor, k: Tensor, v: Tensor, position: PositionMethod, offset: int, backend: str,
           padding_mask: Tensor | None = None, *, dropout_p: float = 0.0, tolerance: float = 0.0,
           key_norm_max: Tensor | None = None, chunk_elements: int = BIAS_CHUNK_ELEMENTS) -> Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, K, S, D) with what the position method adds:
    ALiBi's slopes go to the kernel; an additive bias (T5's learned one, a padding mask) is built per
    query chunk, since at 16k tokens a whole (H, T, S) bias and its int64 buckets take tens of GiB; a
    causal chunk reads only the keys up to its last query. Typical training shapes fit one chunk."""
    slopes = position.attention_slopes()
    mask = None if padding_mask is None else padding_bias(padding_mask, q.shape[2], offset, q.dtype)
    if mask is None and not position.score_bias:
        return attention(q, k, v, slopes=slopes, causal=True, q_offset=offset, backend=backend, dropout_p=dropout_p,
                         tolerance=tolerance, key_norm_max=key_norm_max)
    if backend in ("auto", "triton"):
        backend = "sdpa"  # the fused kernel computes its bias in-kernel and takes no bias tensor

    def attend_chunk(q_part: Tensor, k_part: Tensor, v_part: Tensor, start: int, end: int) -> Tensor:
        bias = position.attention_bias(end - start, k_part.shape[2], offset + start, q.device)
        bias = None if bias is None else bias.to(q.dtype)
        if mask is not None:
            part = mask[..., start:end, : k_part.shape[2]]
            bias = part if bias is None else part + bias
        return attention(q_part, k_part, v_part, slopes=slopes, causal=True, q_offset=offset + start,
                         backend=backend, bias=bias, dropout_p=dropout_p)

    rows = max(1, chunk_elements // (q.shape[1] * k.shape[2]))
    return attend_in_query_chunks(q, k, v, rows=rows, q_offset=offset, causal=True, attend=attend_chunk)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.ff_width * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.ff_width, cfg.d_model, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        # fairseq's activation_dropout: on the hidden units, between the activation and the down projection
        # (none at 0, so that a model without it draws from the RNG exactly as before it existed)
        self.act_dropout = nn.Dropout(cfg.act_dropout) if cfg.act_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            return self.down(self.act_dropout(F.silu(gate) * value))
        return self.down(self.act_dropout(F.gelu(h, approximate=self.approximate)))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_mlp = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, position: PositionMethod, offset: int, layer: int, cache: KVCache | None,
                padding_mask: Tensor | None) -> Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x), position, offset, layer, cache, padding_mask))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


def set_attention_tolerance(model: TransformerLM, tolerance: float) -> None:
    """Let `model`'s attention leave out at most `tolerance` of each row's softmax mass at inference
    (`ModelConfig.attn_tolerance`); a UserError names a value outside [0, 1)."""
    from dataclasses import replace

    config = replace(model.cfg, attn_tolerance=tolerance)
    config.validate()
    for module in model.modules():
        if getattr(module, "cfg", None) is model.cfg and module is not model:
            module.cfg = config
    model.cfg = config


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood of each target token, float32, shape of `targets`; the one loss
    function behind training (its mean) and evaluation (per position)."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape)


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), and infinity where that overflows a float (a diverged model's loss past ~709
    nats would otherwise raise OverflowError after a long evaluation)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def inference_autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The autocast dtype evaluation and generation run an fp32 model in: bf16 on CUDA (what training
    uses and what the fused kernel takes), none on the CPU or for a model already in low precision
    (so that an fp32 CPU run stays exact)."""
    weight = next(model.parameters())
    return torch.bfloat16 if weight.device.type == "cuda" and weight.dtype == torch.float32 else None


class TransformerLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, V), plus the mean cross-entropy when targets are given."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.position = build_position(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections that write into
        the residual stream scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)
        self.position.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel() + self.position.lookup_parameters()
        return n

    def new_cache(self, batch: int, capacity: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.cfg, batch, capacity, device or weight.device, dtype or weight.dtype,
                       key_norms=self.cfg.attn_tolerance > 0)

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        padding_mask: Tensor | None = None,
        logits_from: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens (B, T) int64; with a cache they continue the cached sequence (positions start at
        cache.length). padding_mask (B, S) marks the real tokens of everything so far (1) versus
        left padding (0), for batches of prompts of different lengths; it needs a relative method.
        logits_from = s returns the logits of positions s..T-1 only, (B, T - s, V), and targets, if
        given, are those positions' targets: a sliding evaluation window or a prompt's prefill needs
        only its last predictions, and the output layer over the others is most of a window's cost
        when the vocabulary is large."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        if not 0 <= logits_from < tokens.shape[1]:
            raise ValueError(f"logits_from must be in [0, {tokens.shape[1]}) for {tokens.shape[1]} tokens, "
                             f"got {logits_from}")
        offset = cache.length if cache is not None else 0
        if padding_mask is not None:
            if self.position.absolute:
                raise ValueError(f"padded batches need a relative position method; {self.cfg.position} "
                                 "positions are absolute: run prompts one by one")
            if padding_mask.shape != (tokens.shape[0], offset + tokens.shape[1]):
                raise ValueError(f"padding_mask must be (batch, cached + new tokens) = "
                                 f"{(tokens.shape[0], offset + tokens.shape[1])}, got {tuple(padding_mask.shape)}")
        x = self.embed(tokens)  # (B, T, C)
        x = self.position.embed(x, offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, self.position, offset, layer, cache, padding_mask)
        if cache is not None:
            cache.advance(tokens.shape[1])
        if logits_from:
            x = x[:, logits_from:]
        logits = self.lm_head(self.norm(x))  # (B, T - logits_from, V)
        loss = None if targets is None else token_nll(logits, targets).mean()
        return logits, loss

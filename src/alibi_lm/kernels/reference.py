"""Plain PyTorch attention with the ALiBi bias materialised: the ground truth for every other backend.

It computes in float32 for half-precision inputs and in float64 for float64 inputs, and builds the
full (heads, queries, keys) bias, which is exactly what the fused kernel avoids. Tests and
benchmarks compare against it; the `sdpa` backend reuses its bias builder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_reference", "materialized_bias"]


def materialized_bias(
    slopes: Tensor | None,
    n_queries: int,
    n_keys: int,
    *,
    q_offset: int = 0,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """The additive bias of query i (position q_offset + i) and key j: -slope_h * (pos_q - j),
    or -slope_h * |pos_q - j| without the causal mask, and -inf where j > pos_q when causal.

    Returns (H, Lq, Lk) with slopes, (1, Lq, Lk) with only the causal mask, None when there is
    nothing to add. Distances and products are exact before the final cast (a bf16 bias, as BLOOM
    builds it, cannot tell 4097 from 4098): float32 holds every distance below 2^24 exactly, and the
    product of a float32 slope and such a distance rounds to float32 as the float64 product does, so
    float64 is used only beyond that or for a float64 result."""
    if slopes is None and not causal:
        return None
    device = slopes.device if slopes is not None and device is None else device
    exact32 = dtype != torch.float64 and max(q_offset + n_queries, n_keys) < 2**24
    if slopes is not None and slopes.dtype == torch.float64:
        exact32 = False
    work = torch.float32 if exact32 else torch.float64
    q_pos = torch.arange(q_offset, q_offset + n_queries, device=device, dtype=work)
    k_pos = torch.arange(n_keys, device=device, dtype=work)
    distance = q_pos[:, None] - k_pos[None, :]  # (Lq, Lk)
    if slopes is None:
        bias = torch.zeros(1, n_queries, n_keys, device=device, dtype=work)
    else:
        bias = -slopes.to(device=device, dtype=work)[:, None, None] * distance.abs()[None]
    if causal:
        bias = bias.masked_fill(distance[None] < 0, -math.inf)
    return bias.to(dtype)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    slopes: Tensor | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q k^T * scale + alibi + bias) v, written out; shapes as in `alibi_lm.attention`.

    `bias` is an extra additive term broadcastable to (B, H, Lq, Lk) (T5's learned bias, padding
    masks). With `dropout_p`, each probability is kept with probability 1 - p (a uniform draw from
    torch's default generator of q's device, taken at the call) and scaled by 1 / (1 - p): the
    expected output is the output without dropout. Gradients flow to q, k, v, slopes and bias."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    group = n_heads // n_kv_heads
    # query head h reads key/value head h // group
    k = k.to(compute).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute), k) * scale  # (B, H, Lq, Lk)
    if slopes is not None:
        # differentiable in the slopes (trainable-slope tests take gradients through this)
        q_pos = torch.arange(q_offset, q_offset + q.shape[2], device=q.device, dtype=compute)
        k_pos = torch.arange(k.shape[2], device=q.device, dtype=compute)
        distance = (q_pos[:, None] - k_pos[None, :]).abs()
        scores = scores - slopes.to(compute)[:, None, None] * distance
    mask = materialized_bias(None, q.shape[2], k.shape[2], q_offset=q_offset, causal=causal, dtype=compute,
                             device=q.device)
    if mask is not None:
        scores = scores + mask
    if bias is not None:
        scores = scores + bias.to(compute)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        keep = torch.rand(probs.shape, device=probs.device, dtype=torch.float32) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return torch.einsum("bhij,bhjd->bhid", probs, v).to(q.dtype)

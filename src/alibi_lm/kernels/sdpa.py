"""torch's scaled_dot_product_attention with the ALiBi bias materialised as a float mask.

This is how ALiBi is usually run today (BLOOM, MPT, x-transformers): an (H, Lq, Lk) tensor in the
input dtype. It is here for comparison and as the CPU path; it costs L^2 memory per head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alibi_lm.kernels.reference import materialized_bias

__all__ = ["attention_sdpa"]


def attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    slopes: Tensor | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    enable_gqa = q.shape[1] != k.shape[1]
    if slopes is None and bias is None and (not causal or q_offset == 0):
        # SDPA's own causal mask is aligned to the top-left corner, which is ours only at offset 0.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
    mask = materialized_bias(slopes, q.shape[2], k.shape[2], q_offset=q_offset, causal=causal,
                             dtype=q.dtype, device=q.device)
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)

"""torch's scaled_dot_product_attention with the ALiBi bias materialised as a float mask.

This is how ALiBi is usually run today (BLOOM, MPT, x-transformers): an (H, Lq, Lk) tensor in the
input dtype. It is here for comparison and as the CPU path. Its L^2 memory per head is bounded by
taking the queries in chunks when the mask would be large (a 16k-token evaluation on the CPU would
otherwise build a 12-head mask of 24 GiB on the way); causal chunks also skip the keys after their
last query, which every row of the chunk masks anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alibi_lm.kernels.reference import materialized_bias

__all__ = ["attend_in_query_chunks", "attention_sdpa"]

#: the most mask elements (batch x heads x queries x keys) built at once; more are taken in query chunks
MAX_MASK_ELEMENTS = 1 << 25


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
    dropout_p: float = 0.0,
) -> Tensor:
    enable_gqa = q.shape[1] != k.shape[1]
    if slopes is None and bias is None and (not causal or q_offset == 0):
        # SDPA's own causal mask is aligned to the top-left corner, which is ours only at offset 0.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa,
                                              dropout_p=dropout_p)
    # the mask's leading dims: (H) from the slopes, (B, H or 1) from an extra bias, broadcast together
    mask_batch = bias.shape[0] if bias is not None and bias.dim() == 4 else 1
    mask_heads = max(len(slopes) if slopes is not None else 1,
                     bias.shape[-3] if bias is not None and bias.dim() >= 3 else 1)
    rows = max(1, MAX_MASK_ELEMENTS // (mask_batch * mask_heads * k.shape[2]))
    if bias is not None and bias.dim() < 2:  # (Lk,) or a scalar: broadcast over the queries
        bias = bias.reshape((1,) * (2 - bias.dim()) + tuple(bias.shape))

    def attend(q_part: Tensor, k_part: Tensor, v_part: Tensor, start: int, end: int) -> Tensor:
        part = bias
        if part is not None:
            part = part[..., start:end, :] if part.shape[-2] != 1 else part
            part = part[..., : k_part.shape[2]] if part.shape[-1] != 1 else part
        return _masked(q_part, k_part, v_part, slopes, causal, q_offset + start, scale, part, enable_gqa, dropout_p)

    return attend_in_query_chunks(q, k, v, rows=rows, q_offset=q_offset, causal=causal, attend=attend)


def attend_in_query_chunks(q: Tensor, k: Tensor, v: Tensor, *, rows: int, q_offset: int, causal: bool,
                           attend: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]) -> Tensor:
    """`attend(q_part, k_part, v_part, start, end)` for the queries start..end-1, `rows` at a time, the
    outputs concatenated: for a mask or bias that is built per (query, key) pair and would be too large
    at once. A causal chunk gets only the keys up to its last query (q_offset + end), which every one
    of its rows masks after; a single chunk gets every key."""
    n_queries, n_keys = q.shape[2], k.shape[2]
    if n_queries <= rows:
        return attend(q, k, v, 0, n_queries)
    outs = []
    for start in range(0, n_queries, rows):
        end = min(start + rows, n_queries)
        keys = min(n_keys, q_offset + end) if causal else n_keys
        outs.append(attend(q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], start, end))
    return torch.cat(outs, dim=2)


def _masked(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
            scale: float | None, bias: Tensor | None, enable_gqa: bool, dropout_p: float) -> Tensor:
    mask = materialized_bias(slopes, q.shape[2], k.shape[2], q_offset=q_offset, causal=causal,
                             dtype=q.dtype, device=q.device)
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)
    if mask.dim() == 3 and q.device.type == "cpu":
        # a (1, H, Lq, Lk) mask: with a 3-D one, torch 2.13's CPU SDPA falls back to its math path,
        # which builds the B x H x Lq x Lk scores (5.7x slower at B=16, H=4, L=1024). On CUDA a 4-D
        # mask would move bf16 to another kernel (cuDNN), which is not measured yet: left as it was.
        mask = mask[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa,
                                          dropout_p=dropout_p)

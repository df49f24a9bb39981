"""Validation during training: the mean next-token loss of the validation split (or its first
`data.valid_tokens`), over consecutive non-overlapping windows of `data.valid_len`, shared by ranks.

Not here: extrapolation to other lengths, sliding windows and per-position loss (evaluate.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from alibi_lm import distributed as D
from alibi_lm.data import gather_windows
from alibi_lm.model import token_nll

__all__ = ["validate"]


@torch.no_grad()
def validate(model: nn.Module, tokens: np.ndarray, length: int, batch: int, info: D.DistInfo, *, max_tokens: int,
             autocast, lockstep: bool) -> tuple[float, int]:
    """Mean NLL over consecutive non-overlapping windows of the split (or its first `max_tokens`),
    and the number of predicted tokens. Ranks take every world-th window; with `lockstep` (FSDP)
    every rank runs the same number of forward passes."""
    n_windows = (len(tokens) - 1) // length
    if max_tokens:
        n_windows = min(n_windows, max(1, max_tokens // length))
    mine = np.arange(info.rank, n_windows, info.world_size, dtype=np.int64) * length
    n_batches = math.ceil(math.ceil(n_windows / info.world_size) / batch) if lockstep else math.ceil(len(mine) / batch)
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for b in range(n_batches):
        starts = mine[b * batch:(b + 1) * batch]
        real = len(starts) > 0
        x, y = gather_windows(tokens, starts if real else np.zeros(1, dtype=np.int64), length)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with autocast:
            logits, _ = model(x)
        if real:
            nll_sum += float(token_nll(logits, y).double().sum())
            count += y.numel()
    model.train(was_training)
    nll_sum, count = D.all_reduce_sum([nll_sum, float(count)], info.device)
    return nll_sum / max(count, 1), int(count)

"""Sampling with the KV cache: temperature, top-k, top-p, greedy, streaming, batches of prompts.

The prompt is read in one forward pass (prefill); each new token is then one forward pass of a
single position against the cache. Nothing limits the length to the training length: an ALiBi
model keeps penalising distance linearly however far it goes; a `learned` table stops at max_len.

Batches: prompts of different lengths are left-padded and run as one batch with a padding mask,
which is exact for relative position methods (alibi, rotary, t5, none), since a padded row only
shifts every position by the same amount. Absolute methods (sinusoidal, learned) would see other
positions, so their prompts are run in groups of equal length instead.

Randomness: each prompt has its own torch.Generator seeded with `seed + index`, and a token is
drawn by inverting the cumulative distribution with one uniform number, so a prompt samples the
same text alone (with seed + index) or inside any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from alibi_lm.errors import UserError
from alibi_lm.model import TransformerLM, inference_autocast_dtype

__all__ = ["filter_logits", "generate"]


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top_k largest and outside the nucleus of probability
    top_p (the smallest set of most likely tokens whose probabilities add up to at least top_p).
    logits: (B, V) float. The most likely token always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_CACHE_HEADROOM = 1024


def _check(model: TransformerLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None, seed: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    vocab = model.cfg.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):  # also rejects nan, which samples garbage
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= seed <= 2**64 - len(prompts):  # prompt i samples with seed + i, a 64-bit generator seed
        raise UserError(f"seed must be an integer in [0, 2**64 - {len(prompts)}], got {seed}")
    limit = model.position.max_positions
    longest = max(len(p) for p in prompts) + max_new_tokens
    if limit is not None and longest > limit:
        raise UserError(f"{model.cfg.position} positions stop at {limit} tokens but prompt + new tokens need "
                        f"{longest}; lower --max-new-tokens")


def _sample(logits: Tensor, generators: list[torch.Generator], temperature: float, top_k: int | None,
            top_p: float | None) -> Tensor:
    """One token per row of logits (B, V) -> (B,) int64."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    cumulative = probs.double().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    u = u * cumulative[:, -1]  # (B,) in [0, total): robust to a sum that is not exactly 1
    # the first token whose cumulative probability exceeds u; zero-probability tokens are never chosen
    index = torch.searchsorted(cumulative, u[:, None], right=True).squeeze(1)
    return index.clamp(max=probs.shape[-1] - 1)


def _generate_batch(model: TransformerLM, prompts: list[list[int]], generators: list[torch.Generator],
                    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    stop_id: int | None, on_token: Callable[[list[int | None]], None] | None,
                    cache_dtype: torch.dtype | None) -> list[list[int]]:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    padded = any(len(p) != width for p in prompts)
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    # under autocast the keys and values come out in the autocast dtype, and the cache must match
    # Sized for the prompt and the first new tokens only: it grows as generation goes on, so a large
    # --max-new-tokens (generate until the end-of-text token) does not allocate its worst case up front.
    cache = model.new_cache(len(prompts), width + min(max_new_tokens, _CACHE_HEADROOM), dtype=cache_dtype)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits, _ = model(tokens, cache=cache, padding_mask=mask if padded else None, logits_from=tokens.shape[1] - 1)
    for step in range(max_new_tokens):
        nxt = _sample(logits[:, -1], generators, temperature, top_k, top_p)  # (B,)
        ids = nxt.tolist()
        streamed: list[int | None] = []
        for row, token in enumerate(ids):
            if done[row]:
                streamed.append(None)
                continue
            out[row].append(token)
            streamed.append(token)
            done[row] = stop_id is not None and token == stop_id
        if on_token is not None:
            on_token(streamed)
        if all(done) or step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        if padded:
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        logits, _ = model(nxt[:, None], cache=cache, padding_mask=mask if padded else None)
    return out


def generate(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_token: Callable[[list[int | None]], None] | None = None,
    stop_id: int | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens; return the new tokens.

    temperature 0 is greedy decoding (argmax); otherwise logits are divided by the temperature,
    filtered by top_k / top_p, and sampled with the per-prompt generator seeded `seed + index`.
    `on_token(tokens)` is called after every step with the new token of each prompt (None for a
    prompt that has stopped), for streaming. A prompt stops early after emitting `stop_id`.
    autocast_dtype: "auto" (bf16 autocast for an fp32 model on CUDA), None (off) or a dtype.
    The model is put in eval mode for the call.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, seed)
    device = next(model.parameters()).device
    amp = inference_autocast_dtype(model) if autocast_dtype == "auto" else autocast_dtype
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if model.position.absolute:  # left padding would shift every absolute position
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        index_groups = list(groups.values())
    else:
        index_groups = [list(range(len(prompts)))]

    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        amp_context = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with torch.inference_mode(), amp_context:
            for indices in index_groups:
                if on_token is None or len(index_groups) == 1:
                    callback = on_token
                else:
                    # report in the caller's prompt order even when a group holds some of the prompts
                    def callback(tokens: list[int | None], indices: list[int] = indices) -> None:
                        full: list[int | None] = [None] * len(prompts)
                        for i, t in zip(indices, tokens):
                            full[i] = t
                        on_token(full)
                new = _generate_batch(model, [prompts[i] for i in indices], [generators[i] for i in indices],
                                      max_new_tokens, temperature, top_k, top_p, stop_id, callback, amp)
                for i, tokens in zip(indices, new):
                    results[i] = tokens
    finally:
        model.train(was_training)
    return results

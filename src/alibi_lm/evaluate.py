"""Perplexity at several evaluation lengths: the measurement behind "train short, test long".

Two modes, as in the paper (Press et al. 2022, sections 4 and 5):

- **nonoverlapping** (the paper's main results): the tokens to predict, `tokens[1:]`, are cut into
  consecutive windows of L. The model reads `tokens[s : s + L]` and predicts `tokens[s + 1 : s + L + 1]`,
  so the k-th prediction of a window is conditioned on k tokens (k = 1..L) and never on the previous
  window. A trailing partial window is evaluated too, so every length scores exactly the same
  N - 1 tokens of an N-token split and the perplexities of different lengths are comparable.
- **sliding** window (the early-token-curse analysis): the model always reads L tokens and each
  window scores only its last `stride` predictions; with stride 1 (the paper) every token after the
  first L is predicted from the full L-token model input, which is the paper's "L_valid - 1 tokens of
  context" once the predicted token is counted in the window. The first window scores all its
  predictions (nothing earlier exists). A stride S > 1 is an approximation: the last S predictions
  of a window see between L - S + 1 and L tokens, so the result lies between nonoverlapping and the
  exact sliding value, and costs S times less.

Word-level perplexity is exp(total NLL / number of words) with the words of the split counted by
whitespace (the paper's WikiText-103 convention); with a word-level tokenizer it is the token
perplexity. The first token of the split is never predicted, a 1/N difference we do not correct.

Memory: windows are batched so that a batch holds at most `max_batch_tokens` input tokens (one
window when L is larger), and the cross-entropy is taken in slices along the window so that no
float32 copy of the whole (B, L, V) logits exists. Attention memory at long L is the kernel's
business (the fused ALiBi kernel and SDPA's flash path are linear in L).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alibi_lm.checkpoint import Checkpoint
from alibi_lm.data import gather_windows, read_meta
from alibi_lm.errors import UserError
from alibi_lm.files import RESULTS_FORMAT, read_json_or_none
from alibi_lm.kernels import tile_stats
from alibi_lm.model import TransformerLM, inference_autocast_dtype, perplexity, token_nll
from alibi_lm.progress import progress_bar
from alibi_lm.tokenizer import load_tokenizer

__all__ = ["MODES", "RESULTS_FORMAT", "check_same_tokenizer", "default_lengths", "evaluate_lengths", "evaluate_model",
           "find_data_dir", "fit_lengths", "forward_tokens", "plan_windows", "window_nll"]

MODES = ("nonoverlapping", "sliding")

#: logits are scored in slices of this many positions, to bound the float32 copy in token_nll
_NLL_SLICE = 2048


@dataclass(frozen=True)
class Window:
    """The model reads tokens[start : start + length] and scores its last `scored` predictions."""

    start: int
    length: int
    scored: int


def plan_windows(n_tokens: int, length: int, mode: str, stride: int = 1) -> list[Window]:
    """The windows that cover the N - 1 predictions of an N-token split exactly once."""
    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}; valid: {', '.join(MODES)}")
    if length < 1:
        raise UserError(f"evaluation length must be a positive integer, got {length}")
    if stride < 1 or stride > length:
        raise UserError(f"sliding-window stride must be between 1 and the evaluation length {length}, got {stride}")
    targets = n_tokens - 1
    if targets < 1:
        raise UserError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    if mode == "nonoverlapping" or targets <= length:
        return [Window(s, min(length, targets - s), min(length, targets - s)) for s in range(0, targets, length)]
    windows = [Window(0, length, length)]
    end = length  # predictions 1..end are scored so far
    while end < targets:
        scored = min(stride, targets - end)
        end += scored
        windows.append(Window(end - length, length, scored))
    return windows


def forward_tokens(n_tokens: int, length: int, mode: str, stride: int = 1) -> int:
    """The tokens the model reads to score an N-token split at `length` (the sum of the window lengths of
    `plan_windows`, without building them): N - 1 for nonoverlapping windows, about (N / stride) * L for
    sliding ones, which is what makes stride 1 at long L expensive."""
    targets = n_tokens - 1
    if mode == "nonoverlapping" or targets <= length:
        return max(targets, 0)
    return length + math.ceil((targets - length) / stride) * length


def window_nll(model: TransformerLM, inputs: Tensor, targets: Tensor, scored: int) -> Tensor:
    """NLL (B, scored) of the last `scored` predictions of a batch of windows (B, L), float32."""
    first = inputs.shape[1] - scored
    logits, _ = model(inputs, logits_from=first)  # (B, scored, V)
    targets = targets[:, first:]
    parts = [token_nll(logits[:, i : i + _NLL_SLICE], targets[:, i : i + _NLL_SLICE])
             for i in range(0, scored, _NLL_SLICE)]
    return torch.cat(parts, dim=1)


def _autocast(device: torch.device, model: TransformerLM):
    dtype = inference_autocast_dtype(model)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _as_array(tokens) -> np.ndarray:
    if isinstance(tokens, Tensor):
        return tokens.detach().cpu().numpy().reshape(-1)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise UserError(f"tokens must be a 1-D sequence of token ids, got shape {array.shape}")
    return array


def _evaluate_one(model: TransformerLM, tokens: np.ndarray, length: int, mode: str, stride: int,
                  max_batch_tokens: int, word_count: int | None, bar, on_batch: Callable[[int], None] | None
                  ) -> dict:
    device = next(model.parameters()).device
    windows = plan_windows(len(tokens), length, mode, stride)
    batch_size = max(1, max_batch_tokens // length)
    # windows of one length share a batch; only the trailing window of a short split differs
    groups: dict[tuple[int, int], list[Window]] = {}
    for w in windows:
        groups.setdefault((w.length, w.scored), []).append(w)

    nll_sum = 0.0
    scored_total = 0
    position_sum = np.zeros(length, dtype=np.float64)
    position_count = np.zeros(length, dtype=np.int64)
    started = time.perf_counter()
    with torch.inference_mode(), _autocast(device, model), tile_stats() as tiles:
        for (win_len, scored), group in groups.items():
            for i in range(0, len(group), batch_size):
                batch = group[i : i + batch_size]
                x, y = gather_windows(tokens, np.array([w.start for w in batch], dtype=np.int64), win_len)
                nll = window_nll(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                 scored).double()  # (B, scored)
                nll_sum += nll.sum().item()
                scored_total += nll.numel()
                first = win_len - scored
                position_sum[first:win_len] += nll.sum(0).cpu().numpy()
                position_count[first:win_len] += nll.shape[0]
                bar.update(x.numel())
                if on_batch is not None:
                    on_batch(nll.numel())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    loss = nll_sum / scored_total
    with np.errstate(invalid="ignore", divide="ignore"):
        by_position = position_sum / position_count
    record = {
        "mode": mode,
        "length": length,
        "stride": stride if mode == "sliding" else length,
        "windows": len(windows),
        "tokens": scored_total,
        "nll_sum": nll_sum,
        "loss": loss,
        "ppl": perplexity(loss),
        "words": word_count,
        "word_ppl": perplexity(nll_sum / word_count) if word_count else None,
        "seconds": seconds,
        "tokens_per_second": sum(w.length for w in windows) / max(seconds, 1e-9),
        # with model.attn_tolerance > 0 on the Triton backend: the share of the dense key tiles read
        "tiles_visited_share": tiles["tiles_visited"] / tiles["tiles_dense"] if tiles["tiles_dense"] else None,
    }
    # Mean NLL at each position of the window (0 = the first prediction, conditioned on one token).
    # Only nonoverlapping windows cover every position; sliding windows score their tail.
    record["loss_by_position"] = ([None if c == 0 else round(float(v), 5) for v, c in zip(by_position, position_count)]
                                  if mode == "nonoverlapping" else None)
    return record


def _evaluate_plan(model: TransformerLM, array: np.ndarray, plan: Sequence[tuple[str, int, int]], *,
                   word_count: int | None, max_batch_tokens: int, progress: bool,
                   on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """One record per (mode, length, stride) of `plan`, under one progress bar over every forward token
    of the request, so that its time left covers the whole evaluation. The model is put in eval mode."""
    total = sum(forward_tokens(len(array), n, mode, stride) for mode, n, stride in plan)
    was_training = model.training
    model.eval()
    records = []
    bar = progress_bar(total=total, unit="tok", unit_scale=True, disable=not progress, leave=False)
    try:
        for mode, length, stride in plan:
            bar.set_description(f"{mode} L={length}")
            records.append(_evaluate_one(model, array, length, mode, stride, max_batch_tokens, word_count, bar,
                                         on_batch))
    finally:
        bar.close()
        model.train(was_training)
    return records


def evaluate_lengths(
    model: TransformerLM,
    tokens: Sequence[int] | np.ndarray | Tensor,
    lengths: Sequence[int],
    *,
    mode: str = "nonoverlapping",
    stride: int = 1,
    word_count: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Perplexity of `model` on the 1-D token sequence `tokens` at each evaluation length.

    Returns {"mode", "stride", "split_tokens", "words", "records": [one dict per length]}; a record
    holds length, windows, tokens (predictions scored: N - 1 for every length), nll_sum, loss (mean
    NLL in nats), ppl, word_ppl (when `word_count` is given), seconds, tokens_per_second (tokens
    read by the model) and loss_by_position (nonoverlapping only). The model is put in eval mode.
    """
    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}; valid: {', '.join(MODES)}")
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise UserError(f"evaluation lengths must be positive integers, got {lengths}")
    array = _as_array(tokens)
    max_position = model.position.max_positions
    if max_position is not None and max(lengths) > max_position:
        raise UserError(f"this model's {model.cfg.position} positions stop at {max_position} tokens; "
                        f"drop the lengths above {max_position}")
    if word_count is not None and word_count < 1:
        word_count = None
    for n in lengths:  # every window plan is checked before the first forward pass
        plan_windows(len(array), n, mode, stride)
    records = _evaluate_plan(model, array, [(mode, n, stride) for n in lengths], word_count=word_count,
                             max_batch_tokens=max_batch_tokens, progress=progress, on_batch=on_batch)
    return {"mode": mode, "stride": stride if mode == "sliding" else None, "split_tokens": len(array),
            "words": word_count, "records": records}


def default_lengths(train_len: int) -> list[int]:
    """L, 2L, 4L, 8L, 16L: the paper's extrapolation range for a model trained on L tokens."""
    return [train_len * k for k in (1, 2, 4, 8, 16)]


def evaluate_model(
    model: TransformerLM,
    tokens: Sequence[int] | np.ndarray | Tensor,
    *,
    train_len: int,
    lengths: Sequence[int] | None = None,
    modes: Sequence[str] = ("nonoverlapping",),
    stride: int = 1,
    word_count: int | None = None,
    label: str | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Evaluate every mode at every length and return the results document that `alibi-lm evaluate -o`
    writes and `alibi-lm plot` reads: {"format", "format_version", "label", "position", "train_len",
    "model", "parameters", "split_tokens", "words", "evaluations": [records], "date", "device", **extra}.
    In sliding mode, lengths below the stride use stride = length (a stride cannot exceed the window)."""
    lengths = list(lengths) if lengths else default_lengths(train_len)
    device = next(model.parameters()).device
    array = _as_array(tokens)
    plan = [(mode, n, min(stride, n) if mode == "sliding" else 1) for mode in modes for n in lengths]
    for mode, n, step in plan:
        if mode not in MODES:
            raise UserError(f"unknown evaluation mode {mode!r}; valid: {', '.join(MODES)}")
        plan_windows(len(array), n, mode, step)
    if model.position.max_positions is not None and max(lengths) > model.position.max_positions:
        raise UserError(f"this model's {model.cfg.position} positions stop at {model.position.max_positions} "
                        f"tokens; drop the lengths above it")
    evaluations = _evaluate_plan(model, array, plan, word_count=word_count if word_count else None,
                                 max_batch_tokens=max_batch_tokens, progress=progress)
    return {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "label": label or f"{model.cfg.position} L={train_len}",
        "position": model.cfg.position,
        "attn_tolerance": model.cfg.attn_tolerance,
        "train_len": train_len,
        "model": model.cfg.to_dict(),
        "parameters": model.num_parameters(),
        "split_tokens": len(array),
        "words": word_count,
        "device": str(device) if device.type != "cuda" else f"{device} {torch.cuda.get_device_name(device)}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
        "evaluations": evaluations,
    }


# ---------------------------------------------------------------------------------------------
# what a checkpoint is evaluated on (the `alibi-lm evaluate` command's decisions)


def fit_lengths(asked: Sequence[int] | None, train_len: int, n_tokens: int, max_positions: int | None
                ) -> tuple[list[int], list[int]]:
    """(lengths to evaluate, lengths skipped): those asked for (default L..16L) that the split can fill.
    A window longer than the split scores the same tokens as one of exactly its length, so it is
    skipped; the default range stops where a model with absolute positions (`learned`) stops."""
    lengths = list(asked) if asked is not None else default_lengths(train_len)
    if asked is None and max_positions is not None:
        lengths = [n for n in lengths if n <= max_positions]
    predictions = n_tokens - 1
    too_long = [n for n in lengths if n > predictions]
    kept = [n for n in lengths if n <= predictions]
    if too_long and not kept:
        raise UserError(f"every evaluation length ({', '.join(map(str, too_long))}) is longer than the "
                        f"{predictions:,} predictions of the evaluated tokens; "
                        + (f"use --lengths up to {predictions}" if predictions > 0
                           else "evaluate at least 2 tokens (--max-tokens)"))
    return kept, too_long


def find_data_dir(checkpoint: Checkpoint) -> Path | None:
    """The prepared directory a checkpoint was trained on: from its metadata, or the run's config.json."""
    meta, path = checkpoint.meta, checkpoint.path
    candidates = [meta.get("data_path"), (meta.get("train_config") or {}).get("data", {}).get("path")]
    for config_file in (path / "config.json", path.parent / "config.json", path.parent.parent / "config.json"):
        config = read_json_or_none(config_file) if config_file.is_file() else None
        if isinstance(config, dict) and isinstance(config.get("data"), dict):
            candidates.append(config["data"].get("path"))
    for candidate in candidates:
        if candidate and (Path(candidate) / "meta.json").is_file():
            return Path(candidate)
    return None


def check_same_tokenizer(checkpoint: Checkpoint, data_dir: Path) -> dict:
    """The data's meta.json, once it is clear that the data was tokenized as the model reads text: the
    same tokenizer where the data has its tokenizer.json (what they do, not only their names), else the
    same kind and vocabulary size as its meta.json says; and no id past the model's vocabulary."""
    data_meta = read_meta(data_dir)
    tok = checkpoint.tokenizer
    if tok is not None:
        if (data_dir / "tokenizer.json").is_file():
            data_tok = load_tokenizer(data_dir)
            data_kind, data_size, same = data_tok.kind, data_tok.vocab_size, tok.encodes_like(data_tok)
        else:
            data_kind, data_size = data_meta.get("tokenizer"), data_meta["vocab_size"]
            same = (tok.kind, tok.vocab_size) == (data_kind, data_size)
        if not same:
            raise UserError(f"{data_dir} was prepared with another tokenizer ({data_kind}, {data_size} tokens) than "
                            f"the one {checkpoint.path} uses ({tok.kind}, {tok.vocab_size}); evaluate on data "
                            "prepared with the model's tokenizer")
    if data_meta["vocab_size"] > checkpoint.config.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {data_meta['vocab_size']} but the model only "
                        f"{checkpoint.config.vocab_size}: it was prepared with another tokenizer")
    return data_meta

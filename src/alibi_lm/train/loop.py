"""The training run in three steps: `setup` (data, run folder, model, optimizer, resume) → `fit` (the
loop: steps, logging, divergence, validation, best model, early stopping, checkpoints) → `finish`
(the final checkpoint, pruning, the TrainResult).

`Training` holds what setup built; fit changes only its `state` (the counters a checkpoint saves)
and what its run folder records. Not here: the step itself (step.py), what a checkpoint holds
(state.py), the run folder's rules (run_folder.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alibi_lm import distributed as D
from alibi_lm.checkpoint import step_directory, unwrap_model
from alibi_lm.config import DataConfig, TrainConfig
from alibi_lm.data import load_tokens, prepare, read_meta, window_starts
from alibi_lm.errors import UserError
from alibi_lm.model import TransformerLM, perplexity
from alibi_lm.model_config import ModelConfig
from alibi_lm.progress import progress_bar
from alibi_lm.tokenizer import Tokenizer, load_tokenizer
from alibi_lm.train.run_folder import MetricsLog, RunFolder
from alibi_lm.train.state import (
    TrainState,
    init_weights_from,
    load_weights,
    restore_training_state,
    weights_are_finite,
    write_model_checkpoint,
    write_training_checkpoint,
)
from alibi_lm.train.step import (
    autocast_context,
    build_optimizer,
    captures_cuda_graphs,
    compile_for_training,
    flops_per_token,
    lr_at,
    peak_flops,
    step_batches,
    train_step,
)
from alibi_lm.train.validate import validate

__all__ = ["FitOutcome", "TrainResult", "Training", "finish", "fit", "setup"]


@dataclass
class TrainResult:
    run_dir: Path
    #: the final step checkpoint
    checkpoint: Path
    final_valid_loss: float | None
    #: training throughput (all ranks), after the first logging interval (compilation, warm-up)
    tokens_per_second: float
    peak_memory_bytes: int
    steps: int
    final_train_loss: float | None = None
    best_valid_loss: float | None = None
    #: model checkpoint with the best validation loss (run.keep_best)
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    mfu: float | None = None


@dataclass
class TrainData:
    """The token splits a run reads, and what validation reports need to know about them."""

    train_tokens: np.ndarray
    valid_tokens: np.ndarray
    #: tokenizer of the prepared data (saved into every checkpoint), None where it has no tokenizer.json
    tokenizer: Tokenizer | None
    #: bytes | bpe | word
    tokenizer_kind: str
    #: the validation split's token count and word count (None where the data has no word counts)
    valid_split_tokens: int
    valid_split_words: int | None


@dataclass
class Training:
    """What setup built for fit and finish."""

    cfg: TrainConfig
    info: D.DistInfo
    folder: RunFolder
    data: TrainData
    #: the model as wrapped for the ranks (DDP, FSDP), the plain module inside, and what train_step calls
    model: nn.Module
    inner: TransformerLM
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object
    cuda_graphs: bool
    state: TrainState
    metrics: MetricsLog
    #: training FLOPs per token and the accelerator's peak FLOP/s (None: unknown), for MFU
    flops_per_token: float
    peak_flops: float | None
    #: the checkpoint a resume started from
    resumed_from: Path | None = None


@dataclass
class FitOutcome:
    last_loss: float | None = None
    final_valid_loss: float | None = None
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    tokens_per_second: float = 0.0


# ---------------------------------------------------------------------------------------------
# setup


def setup(cfg: TrainConfig, info: D.DistInfo, *, resume: bool, held: contextlib.ExitStack) -> Training:
    """Everything the loop needs, checked before the first step; the run folder's lock goes on `held`."""
    if captures_cuda_graphs(cfg.run) and info.world_size > 1:
        raise UserError(f"run.compile_mode={cfg.run.compile_mode} captures CUDA graphs, which alibi-lm supports "
                        "for one process only; use compile_mode=default under torchrun")
    data_meta = _prepare_data(cfg.data, info)
    # the run's config.json and checkpoints record the tokenizer the data was made with
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=data_meta["tokenizer"]))
    data = _load_data(cfg.data, cfg.model, data_meta, valid_len=cfg.valid_len)

    folder = RunFolder(cfg.run.out_dir, info)
    folder.claim(resume=resume, held=held)
    resumed_from, resume_meta = None, None
    if resume:
        resumed_from, resume_meta = folder.checkpoint_to_resume(cfg.model, cfg.to_dict(), cfg.run.steps)
    else:
        folder.check_new_run()

    model, optimizer, state = _build_model(cfg, info, resumed_from, resume_meta)
    folder.write_config({**cfg.to_dict(), "world_size": info.world_size})
    metrics = folder.open_metrics(state.step if resume else None, tensorboard=cfg.run.tensorboard)
    held.callback(metrics.close)
    return Training(cfg=cfg, info=info, folder=folder, data=data, model=model, inner=unwrap_model(model),
                    step_model=compile_for_training(model, cfg.run), optimizer=optimizer,
                    autocast=autocast_context(info.device, cfg.run.precision),
                    cuda_graphs=captures_cuda_graphs(cfg.run), state=state, metrics=metrics,
                    flops_per_token=flops_per_token(unwrap_model(model), cfg.data.train_len),
                    peak_flops=peak_flops(info.device, cfg.run.peak_flops), resumed_from=resumed_from)


def _prepare_data(data: DataConfig, info: D.DistInfo) -> dict:
    """The prepared data's meta.json, preparing `data.path` from `data.source` first where it is new."""
    path = Path(data.path)
    if not data.path:
        raise UserError("data.path is not set; prepare data with `alibi-lm prepare` and pass --set data.path=DIR")
    if path.is_file():
        read_meta(path)  # a file where a prepared folder belongs: the error says how to prepare it
    if not (path / "meta.json").is_file() and data.source:
        if info.is_main:
            # said out loud: a mistyped data.path would otherwise quietly become a new corpus
            print(f"alibi-lm train: {path} holds no prepared data; preparing it from data.source="
                  f"{data.source!r} with the {data.tokenizer} tokenizer", file=sys.stderr, flush=True)
            prepare(data.source, path, tokenizer=data.tokenizer, vocab_size=data.vocab_size, progress=True)
        D.barrier()
    meta = read_meta(path)
    # data.tokenizer only says how an automatic prepare tokenizes; prepared data is used as it is
    if data.source and meta["tokenizer"] != data.tokenizer and info.is_main:
        print(f"alibi-lm train: note: data.tokenizer={data.tokenizer} does not apply: {path} is already "
              f"prepared with the {meta['tokenizer']} tokenizer, and the run uses it as it is (set data.path to a "
              f"new folder to prepare {data.source!r} with {data.tokenizer})", file=sys.stderr, flush=True)
    return meta


def _load_data(data: DataConfig, model: ModelConfig, meta: dict, *, valid_len: int) -> TrainData:
    """The splits as memory maps, checked against the model and the window lengths."""
    if meta["vocab_size"] > model.vocab_size:
        raise UserError(f"the data's vocabulary ({meta['vocab_size']}) is larger than model.vocab_size "
                        f"({model.vocab_size}); set model.vocab_size >= {meta['vocab_size']}")
    train_tokens = load_tokens(data.path, "train")
    valid_tokens = load_tokens(data.path, data.valid_split)
    window_starts(len(train_tokens), data.train_len, 1, seed=0, step=0)  # raises if the corpus is shorter than a window
    if len(valid_tokens) < valid_len + 1:
        raise UserError(f"the {data.valid_split} split has {len(valid_tokens)} tokens, fewer than one "
                        f"validation window of {valid_len} + 1; set a shorter data.valid_len")
    if model.position == "learned" and max(data.train_len, valid_len) > model.max_len:
        raise UserError(f"learned positions need model.max_len >= {max(data.train_len, valid_len)}")
    split = meta["splits"][data.valid_split]
    tokenizer = load_tokenizer(data.path) if (Path(data.path) / "tokenizer.json").is_file() else None
    return TrainData(train_tokens=train_tokens, valid_tokens=valid_tokens, tokenizer=tokenizer,
                     tokenizer_kind=meta["tokenizer"], valid_split_tokens=split["tokens"],
                     valid_split_words=split.get("words"))


def _build_model(cfg: TrainConfig, info: D.DistInfo, resume_from: Path | None, resume_meta: dict | None
                 ) -> tuple[nn.Module, torch.optim.Optimizer, TrainState]:
    """The model (wrapped for the ranks) and its optimizer: new, or as the resumed checkpoint left them."""
    device = info.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = TransformerLM(cfg.model)
    if resume_from is not None:
        load_weights(model, resume_from)
    elif cfg.run.init_from:
        init_weights_from(model, cfg.run.init_from, info)
    model.to(device)
    model = D.wrap_model(model, info, cfg.run.parallel)
    optimizer = build_optimizer(model, cfg.optim, device)
    if resume_from is not None:
        state = restore_training_state(resume_from, resume_meta, model=model, optimizer=optimizer, info=info,
                                       parallel=cfg.run.parallel)
    else:
        state = TrainState()
        torch.manual_seed(cfg.run.seed + 1 + info.rank)  # dropout differs per rank
    return model, optimizer, state


# ---------------------------------------------------------------------------------------------
# fit


class _Throughput:
    """Tokens per second of each logging interval; the run's figure leaves out the first interval
    (compilation, warm-up) unless there is no other."""

    def __init__(self):
        self.timed_tokens, self.timed_seconds = 0, 0.0
        self.first_rate: float | None = None
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def interval_rate(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed
        if self.first_rate is None:
            self.first_rate = rate
        else:
            self.timed_tokens += self.tokens
            self.timed_seconds += elapsed
        return rate

    def mean(self) -> float:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else (self.first_rate or 0.0)


def fit(t: Training, *, progress: bool) -> FitOutcome:
    """Train from `t.state.step` to `run.steps` (or until validation stops improving)."""
    cfg, info, state = t.cfg, t.info, t.state
    run = cfg.run
    tokens_per_step = info.world_size * cfg.data.batch_size * cfg.data.grad_accum * cfg.data.train_len
    best = t.folder.best_dir if (run.keep_best and t.folder.best_dir.is_dir()) else None
    outcome = FitOutcome(best_checkpoint=best)
    throughput = _Throughput()
    # a bar on a terminal, a line a minute in a log file (issue 16: tqdm filled logs with redraws)
    bar = progress_bar(total=run.steps, initial=state.step, disable=not (progress and info.is_main), unit="step",
                       desc="train")
    pending: list[torch.Tensor] = []
    t.model.train()
    while state.step < run.steps:
        lr = lr_at(state.step, cfg.optim, cfg.schedule, run.steps)
        batches = step_batches(t.data.train_tokens, cfg.data, state.step, info, seed=run.seed)
        pending.append(train_step(t.step_model, t.optimizer, batches, autocast=t.autocast,
                                  grad_clip=cfg.optim.grad_clip, lr=lr, cuda_graphs=t.cuda_graphs))
        state.step += 1
        state.tokens_seen += tokens_per_step
        throughput.tokens += tokens_per_step
        final = state.step == run.steps
        do_eval = (run.eval_every and state.step % run.eval_every == 0) or final
        do_ckpt = (run.checkpoint_every and state.step % run.checkpoint_every == 0) or final
        if state.step % run.log_every == 0 or do_eval or do_ckpt:
            record = _log_record(t, pending, lr, throughput, bar)
            pending = []
            outcome.last_loss = record["loss"]
            if do_eval:
                _validate(t, record, outcome, bar, progress)
                do_ckpt = do_ckpt or outcome.stopped_early
            t.metrics.write(record)
            if do_ckpt:
                save_checkpoint(t, outcome.final_valid_loss if do_eval else None)
            throughput.restart()
            if outcome.stopped_early:
                break
        bar.update(1)
    bar.close()
    outcome.tokens_per_second = throughput.mean()
    return outcome


def _log_record(t: Training, pending: list[torch.Tensor], lr: float, throughput: _Throughput, bar) -> dict:
    """The metrics record of a logging interval, from the steps' losses averaged over ranks (the one
    synchronisation with the device); a non-finite loss stops the run."""
    info, state = t.info, t.state
    losses = torch.stack(pending).double()
    sums = D.all_reduce_sum([float(x) for x in losses.tolist()], info.device)
    losses_avg = [s / info.world_size for s in sums]
    tok_s = throughput.interval_rate(info.device)
    if not all(math.isfinite(x) for x in losses_avg):
        first_bad = state.step - len(losses_avg) + 1 + [math.isfinite(x) for x in losses_avg].index(False)
        raise t.folder.diverged(f"the loss is {losses_avg[-1]} at step {state.step}", first_bad)
    mfu = tok_s * t.flops_per_token / (t.peak_flops * info.world_size) if t.peak_flops else None
    loss = losses_avg[-1]
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
    return {"step": state.step, "loss": loss, "loss_avg": sum(losses_avg) / len(losses_avg), "lr": lr,
            "tokens": state.tokens_seen, "tokens_per_second": tok_s, "mfu": mfu}


def _validate(t: Training, record: dict, outcome: FitOutcome, bar, progress: bool) -> None:
    """Validate, add the result to `record`, keep the best model and decide on early stopping."""
    cfg, info, state, data = t.cfg, t.info, t.state, t.data
    fsdp = cfg.run.parallel == "fsdp"
    valid_loss, n_pred = validate(t.model if fsdp else t.inner, data.valid_tokens, cfg.valid_len,
                                  cfg.data.batch_size, info, max_tokens=cfg.data.valid_tokens, autocast=t.autocast,
                                  lockstep=fsdp and info.world_size > 1)
    outcome.final_valid_loss = valid_loss
    record.update(valid_loss=valid_loss, valid_ppl=perplexity(valid_loss), valid_tokens=n_pred)
    if data.valid_split_words:
        # NLL of the whole split ~ mean NLL * its token count; divided by its words.
        word_nll = valid_loss * data.valid_split_tokens / data.valid_split_words
        record["valid_word_ppl"] = perplexity(word_nll)
    if valid_loss < state.best_valid_loss - cfg.run.min_delta:
        state.best_valid_loss, state.bad_evals = valid_loss, 0
        if cfg.run.keep_best:
            outcome.best_checkpoint = write_model_checkpoint(
                t.folder.best_dir, model=t.model, info=info, parallel=cfg.run.parallel, train_len=cfg.data.train_len,
                tokenizer=data.tokenizer, extra_meta={"step": state.step, "valid_loss": valid_loss})
    else:
        state.bad_evals += 1
    if cfg.run.patience and state.bad_evals >= cfg.run.patience:
        outcome.stopped_early = True
        record["stopped_early"] = True
    if info.is_main and progress:
        bar.write(validation_line(state.step, record, data.tokenizer_kind))


def validation_line(step: int, record: dict, tokenizer: str) -> str:
    """The progress line of a validation. A word tokenizer's token perplexity is the word-level one; for
    bytes and BPE the word-level number is exp(NLL per whitespace word of the split), comparable across
    tokenizers but astronomically large while a model is young (1e8 at step 50 of a byte model), so it
    is named for what it is (metrics.jsonl keeps it as valid_word_ppl)."""
    line = f"step {step}: valid loss {record['valid_loss']:.4f} per token, ppl {record['valid_ppl']:.2f}"
    if tokenizer == "word":
        return line + " (word-level: one token per word)"
    if "valid_word_ppl" in record:
        line += f"; per whitespace word: ppl {record['valid_word_ppl']:.4g}"
    return line


def save_checkpoint(t: Training, valid_loss: float | None) -> Path:
    """A training checkpoint of the current step, written by rank 0 with every rank taking part."""
    step = t.state.step
    if not weights_are_finite(t.model):
        # every loss up to this step was finite, so the newest checkpoint's weights are good
        raise t.folder.diverged(f"the weights are not finite at step {step}", step + 1)
    path = write_training_checkpoint(step_directory(t.folder.path, step), model=t.model, optimizer=t.optimizer,
                                     info=t.info, parallel=t.cfg.run.parallel, state=t.state,
                                     train_len=t.cfg.data.train_len, tokenizer=t.data.tokenizer,
                                     train_config=t.cfg.to_dict(), valid_loss=valid_loss)
    t.folder.checkpoint_written(path, t.cfg.run.keep_last)
    D.barrier()
    return path


# ---------------------------------------------------------------------------------------------
# finish


def finish(t: Training, outcome: FitOutcome) -> TrainResult:
    """The final checkpoint (where the loop's last one is older, e.g. resumed at the final step),
    pruning to run.keep_last, and the run's figures."""
    folder, state, info = t.folder, t.state, t.info
    if folder.last_checkpoint is None or step_directory(folder.path, state.step) != folder.last_checkpoint:
        save_checkpoint(t, outcome.final_valid_loss)
    if outcome.final_valid_loss is None or math.isfinite(outcome.final_valid_loss):
        folder.finished(t.cfg.run.keep_last)  # the final weights were validated above
    tok_s, peak = outcome.tokens_per_second, t.peak_flops
    best = None if math.isinf(state.best_valid_loss) else state.best_valid_loss
    return TrainResult(run_dir=folder.path, checkpoint=folder.last_checkpoint,
                       final_valid_loss=outcome.final_valid_loss, tokens_per_second=tok_s,
                       peak_memory_bytes=_peak_memory(info.device), steps=state.step,
                       final_train_loss=outcome.last_loss, best_valid_loss=best,
                       best_checkpoint=outcome.best_checkpoint, stopped_early=outcome.stopped_early,
                       mfu=tok_s * t.flops_per_token / (peak * info.world_size) if peak else None)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux

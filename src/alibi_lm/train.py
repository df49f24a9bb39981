"""`train(config)`: the training loop, with validation, metrics, checkpoints, exact resume and DDP.

One optimizer step reads `world * batch_size * grad_accum` windows of `train_len + 1` tokens whose
starts are a pure function of (seed, step) (data.window_starts), split among ranks and micro-batches
the same way for any world size. Everything a later step depends on — weights, AdamW moments, the
step, RNG states (dropout), early-stopping state — is in the checkpoint, so a resumed run repeats
the unbroken run's losses bit for bit on the CPU. The learning rate is a pure function of the step.

Not here: the model (model.py), data preparation (data.py), extrapolation evaluation (evaluate.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alibi_lm import distributed as D
from alibi_lm.checkpoint import (
    TRAINING_FILES,
    clear_partial_writes,
    latest_checkpoint,
    load_model_state,
    load_tensors,
    lock_run_dir,
    model_state,
    prune_checkpoints,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_model_checkpoint,
    step_checkpoints,
    step_directory,
    unwrap_model,
    write_checkpoint,
)
from alibi_lm.config import CUDA_GRAPH_MODES, TrainConfig
from alibi_lm.data import batch_rows, gather_windows, load_tokens, prepare, read_meta, window_starts
from alibi_lm.errors import Interrupted, UserError
from alibi_lm.model import TransformerLM, perplexity, token_nll
from alibi_lm.model_config import ModelConfig
from alibi_lm.tokenizer import load_tokenizer

__all__ = ["TrainResult", "build_optimizer", "flops_per_token", "lr_at", "step_batches", "train", "train_step"]


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


# ---------------------------------------------------------------------------------------------
# pieces shared with benchmarks/train.py


def flops_per_token(model: TransformerLM, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights' matmuls forward and backward (N counts the
    output layer, not a learned position table, which is a lookup), plus 12 * layers * L * d for
    the attention scores and weighted sum (the PaLM-appendix count, no causal discount)."""
    n = model.num_parameters() - model.position.lookup_parameters()
    if not model.cfg.tie_embeddings:
        n -= model.embed.weight.numel()  # the input embedding is a lookup; the untied head is a matmul
    return 6.0 * n + 12.0 * model.cfg.n_layers * seq_len * model.cfg.d_model


def peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """Dense bf16 peak of the accelerator (for MFU), or None when unknown (CPU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12),
                       ("A10", 125e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) optimizer step `step`: linear warmup, then cosine/linear/constant."""
    base, warmup, total = cfg.optim.lr, cfg.schedule.warmup_steps, cfg.run.steps
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule.kind == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.schedule.min_lr_ratio
    if cfg.schedule.kind == "linear":
        return base * (1.0 - (1.0 - floor) * progress)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not biases, norms, slopes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.optim.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             fused=fused or None, foreach=None if fused else True)


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as the training step calls it: itself, or compiled in `run.compile_mode`."""
    if not cfg.run.compile:
        return model
    return torch.compile(model, mode=None if cfg.run.compile_mode == "default" else cfg.run.compile_mode)


def captures_cuda_graphs(cfg: TrainConfig) -> bool:
    return cfg.run.compile and cfg.run.compile_mode in CUDA_GRAPH_MODES


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, *, autocast, grad_clip: float,
               lr: float, cuda_graphs: bool = False) -> torch.Tensor:
    """One optimizer step over the micro-batches (gradient accumulation; DDP syncs only on the last);
    returns the mean loss as a 0-d tensor, without synchronising with the device. With `cuda_graphs`
    (a model compiled to CUDA graphs) every micro-batch starts a new graph step, and the loss is copied
    out of the graph's memory, which the next replay overwrites."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    total = None
    for i, (x, y) in enumerate(micro_batches):
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and i < n - 1 \
            else contextlib.nullcontext()
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / n).backward()
        loss = loss.detach().clone() if cuda_graphs else loss.detach()
        total = loss if total is None else total + loss
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n


# ---------------------------------------------------------------------------------------------
# validation


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


# ---------------------------------------------------------------------------------------------
# state for exact resume


def _optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module, parallel: str) -> tuple[dict, list]:
    """AdamW state as flat tensors ("<param>|<name>") and the JSON-able param groups."""
    if parallel == "fsdp" and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = optimizer.state_dict()
    # With full_state_dict + cpu_offload only rank 0 gets the state; the others get {} (they do not write).
    flat = {f"{key}|{name}": value for key, state in sd.get("state", {}).items() for name, value in state.items()
            if isinstance(value, torch.Tensor)}
    return flat, sd.get("param_groups", [])


def _load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, parallel: str, flat: dict, groups: list,
                    device: torch.device) -> None:
    state: dict = {}
    for key, value in flat.items():
        param, name = key.rsplit("|", 1)
        param_key = int(param) if param.isdigit() else param
        state.setdefault(param_key, {})[name] = value if name == "step" else value.to(device)
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    sd = {"state": state, "param_groups": groups}
    if parallel == "fsdp" and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


def _rng_tensors(info: D.DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's CPU (and CUDA) RNG state, gathered to all ranks (dropout draws differ per rank)."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    everyone = [mine]
    if torch.distributed.is_initialized():
        everyone = [None] * info.world_size
        torch.distributed.all_gather_object(everyone, mine)
    return {f"rng_{name}_rank{rank}": state for rank, states in enumerate(everyone) for name, state in states.items()}


def _restore_rng(tensors: dict[str, torch.Tensor], info: D.DistInfo) -> None:
    cpu = tensors.get(f"rng_cpu_rank{info.rank}")
    if cpu is None:
        raise UserError(f"the checkpoint has no RNG state for rank {info.rank}: resume with the same number of ranks")
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rng_cuda_rank{info.rank}")
    if cuda is not None and info.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, info.device)


def _full_model_state(model: nn.Module, parallel: str) -> dict[str, torch.Tensor]:
    if parallel == "fsdp" and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if unwrap_model(model).cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in state.items()}
    return model_state(model)


# What a run writes into its directory (hidden names are its lock and temporary folders, and a
# user's tool files); anything else there belongs to someone else.
_RUN_FILES = {"config.json", "metrics.jsonl", "checkpoints", "best", "tensorboard"}


def _check_foreign_files(run_dir: Path) -> None:
    """A new run (no --resume) writes config.json and metrics.jsonl and replaces best/: refuse a directory
    holding someone else's files. The metrics of a run that died before its first checkpoint are
    replaced, as re-running the same command after a crash should work; a log file beside them is kept.
    An earlier run's checkpoints and best model are refused in `_train`, once the lock is held."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in _RUN_FILES and not p.name.startswith(".") and p.suffix != ".log")
    config = run_dir / "config.json"
    if not foreign and config.is_file():
        try:
            values = json.loads(config.read_text())
            ours = isinstance(values, dict) and {"model", "data", "run"} <= values.keys()
        except (json.JSONDecodeError, UnicodeDecodeError):
            ours = False
        if not ours:
            foreign = ["config.json"]
    if foreign:
        raise UserError(f"run.out_dir {run_dir} holds files that are not a training run's ({', '.join(foreign[:3])}); "
                        "choose a new or empty directory")


def _intact_hint(run_dir: Path, broken: Path) -> str:
    """Where a resume could start instead of a damaged newest checkpoint (nothing is deleted for the user)."""
    for older in reversed(step_checkpoints(run_dir)):
        if older == broken:
            continue
        try:
            read_checkpoint_meta(older)
        except UserError:
            continue
        return f"; {older.name} is intact: move {broken.name} out of {broken.parent} to resume from it"
    return ""


# settings that change the losses of the steps after a resume (the rest only change what is logged or kept)
_CONTINUATION_SETTINGS = ("data", "optim", "schedule", "run.steps", "run.seed", "run.precision")


def _changed_training_settings(saved: dict, cfg: TrainConfig) -> str:
    """'section.key old -> new' for each setting in _CONTINUATION_SETTINGS that differs from the checkpoint's."""
    now = cfg.to_dict()
    changes = []
    for name in _CONTINUATION_SETTINGS:
        section, _, key = name.partition(".")
        old, new = saved.get(section, {}), now.get(section, {})
        for k in ([key] if key else sorted(old)):
            if k in old and old[k] != new.get(k):
                changes.append(f"{section}.{k} {old[k]!r} -> {new.get(k)!r}")
    return ", ".join(changes)


# the model fields that decide which parameters exist and their shapes: init_from needs them equal; the
# rest (dropouts, backend, tolerance, slope rule and bias limit, whose fixed slopes come with the weights)
# may change between the runs
_SHAPE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "position", "norm",
                 "activation", "tie_embeddings", "bias", "embed_norm", "t5_num_buckets")


def _init_weights_from(model: TransformerLM, source: str, info: D.DistInfo) -> None:
    """Copy the weights of the checkpoint `source` (or a run directory's newest) into the new model: a
    new run that starts from them, with its own optimizer and schedule (run.init_from)."""
    path = resolve_checkpoint(source)
    meta = read_checkpoint_meta(path, skip=TRAINING_FILES)
    saved = meta["model"]
    now = model.cfg.to_dict()
    fields = [*_SHAPE_FIELDS, *(("max_len",) if model.cfg.position == "learned" else ())]
    differ = [f"model.{k}: {saved.get(k)!r} there, {now[k]!r} here" for k in fields if saved.get(k) != now[k]]
    if differ:
        raise UserError(f"run.init_from {path}: its model has other shapes ({'; '.join(differ)}); set [model] "
                        "to match, or start without run.init_from")
    load_model_state(model, load_tensors(path, "model"), path)
    if info.is_main:
        print(f"alibi-lm train: starting from the weights of {path} (step {meta.get('step', 0)}, trained at "
              f"L={meta.get('train_len')}); new optimizer and schedule", file=sys.stderr, flush=True)


def _check_same_model(saved: dict, current: ModelConfig, path: Path) -> None:
    now = current.to_dict()
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}" for k in diff[:3])
        run_config = path.parent.parent / "config.json"
        raise UserError(f"cannot resume {path}: the model config differs ({shown}); resume with "
                        f"--config {run_config} or train into a new run.out_dir")


# ---------------------------------------------------------------------------------------------
# the loop


def step_batches(tokens: np.ndarray, cfg: TrainConfig, step: int, info: D.DistInfo) -> list:
    """The (inputs, targets) micro-batches this rank trains on at `step`, on its device."""
    length, batch, accum, world = cfg.data.train_len, cfg.data.batch_size, cfg.data.grad_accum, info.world_size
    starts = window_starts(len(tokens), length, world * batch * accum, seed=cfg.run.seed, step=step,
                           mode=cfg.data.windows)
    out = []
    for micro in range(accum):
        x, y = gather_windows(tokens, batch_rows(starts, micro=micro, rank=info.rank, world=world, batch=batch), length)
        if info.device.type == "cuda":  # pinned, so that the copy does not stall the host
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)))
    return out


def _prepare_data(cfg: TrainConfig, info: D.DistInfo) -> dict:
    path = Path(cfg.data.path)
    if not cfg.data.path:
        raise UserError("data.path is not set; prepare data with `alibi-lm prepare` and pass --set data.path=DIR")
    if path.is_file():
        read_meta(path)  # a file where a prepared folder belongs: the error says how to prepare it
    if not (path / "meta.json").is_file() and cfg.data.source:
        if info.is_main:
            # said out loud: a mistyped data.path would otherwise quietly become a new corpus
            print(f"alibi-lm train: {path} holds no prepared data; preparing it from data.source="
                  f"{cfg.data.source!r} with the {cfg.data.tokenizer} tokenizer", file=sys.stderr, flush=True)
            prepare(cfg.data.source, path, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                    progress=True)
        D.barrier()
    meta = read_meta(path)
    # data.tokenizer only says how an automatic prepare tokenizes; prepared data is used as it is
    if cfg.data.source and meta["tokenizer"] != cfg.data.tokenizer and info.is_main:
        print(f"alibi-lm train: note: data.tokenizer={cfg.data.tokenizer} does not apply: {path} is already "
              f"prepared with the {meta['tokenizer']} tokenizer, and the run uses it as it is (set data.path to a "
              f"new folder to prepare {cfg.data.source!r} with {cfg.data.tokenizer})", file=sys.stderr, flush=True)
    return meta


def _validation_line(step: int, record: dict, tokenizer: str) -> str:
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


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def _metrics_record(line: str) -> dict | None:
    """One line of metrics.jsonl, or None for a line a kill or a full disk left torn."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class _Metrics:
    """metrics.jsonl, appended by rank 0, flushed per line so a killed run keeps what it logged; with
    `tensorboard`, the same numbers as TensorBoard scalars in <run>/tensorboard (step = optimizer step)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            # Lines past the checkpoint we resume from will be written again.
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _metrics_record(line)) is not None and record.get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif enabled and path.exists():
            path.unlink()
        self.board = None
        if enabled and tensorboard:
            self.board = _summary_writer(path.parent / "tensorboard", purge_step=resume_step)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _summary_writer(directory: Path, purge_step: int | None):
    """torch's TensorBoard writer; `purge_step` drops the events of steps a resume writes again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("run.tensorboard needs the tensorboard package: pip install 'alibi-lm[tensorboard]' "
                        "(or set run.tensorboard=false)") from None
    return SummaryWriter(log_dir=str(directory), purge_step=None if purge_step is None else purge_step + 1)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train `config.model` on `config.data` and return where the checkpoints are and how fast it ran.
    With `resume`, continue the newest checkpoint of `config.run.out_dir` exactly."""
    config.validate()
    info = D.init_distributed(config.run.device)
    try:
        # the stack holds the run directory's lock, so it is released on failure as well as on success
        with contextlib.ExitStack() as held:
            return _train(config, info, resume=resume, progress=progress, held=held)
    except KeyboardInterrupt:
        raise Interrupted(_where_to_resume(Path(config.run.out_dir), config.run.steps)) from None
    finally:
        D.shutdown()


def _where_to_resume(run_dir: Path, total_steps: int) -> str:
    """What Ctrl-C tells the user: the newest checkpoint and the command that continues from it."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return f"interrupted before the first checkpoint of {run_dir}; nothing to resume, start the run again"
    step = int(newest.name.removeprefix("step_"))
    return (f"interrupted; the newest checkpoint is {newest} (step {step} of {total_steps}); continue with: "
            f"alibi-lm train --config {run_dir / 'config.json'} --resume")


def _train(cfg: TrainConfig, info: D.DistInfo, *, resume: bool, progress: bool,
           held: contextlib.ExitStack) -> TrainResult:
    from tqdm import tqdm

    run_dir = Path(cfg.run.out_dir)
    if captures_cuda_graphs(cfg) and info.world_size > 1:
        raise UserError(f"run.compile_mode={cfg.run.compile_mode} captures CUDA graphs, which alibi-lm supports "
                        "for one process only; use compile_mode=default under torchrun")
    data_meta = _prepare_data(cfg, info)
    # the run's config.json and checkpoints record the tokenizer the data was made with
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=data_meta["tokenizer"]))
    if data_meta["vocab_size"] > cfg.model.vocab_size:
        raise UserError(f"the data's vocabulary ({data_meta['vocab_size']}) is larger than model.vocab_size "
                        f"({cfg.model.vocab_size}); set model.vocab_size >= {data_meta['vocab_size']}")
    train_tokens = load_tokens(cfg.data.path, "train")
    valid_tokens = load_tokens(cfg.data.path, cfg.data.valid_split)
    length, valid_len = cfg.data.train_len, cfg.valid_len
    window_starts(len(train_tokens), length, 1, seed=0, step=0)  # raises if the corpus is shorter than a window
    if len(valid_tokens) < valid_len + 1:
        raise UserError(f"the {cfg.data.valid_split} split has {len(valid_tokens)} tokens, fewer than one "
                        f"validation window of {valid_len} + 1; set a shorter data.valid_len")
    if cfg.model.position == "learned" and max(length, valid_len) > cfg.model.max_len:
        raise UserError(f"learned positions need model.max_len >= {max(length, valid_len)}")
    split_words = data_meta["splits"][cfg.data.valid_split].get("words")
    split_tokens = data_meta["splits"][cfg.data.valid_split]["tokens"]
    tokenizer = load_tokenizer(cfg.data.path) if (Path(cfg.data.path) / "tokenizer.json").is_file() else None

    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.out_dir {run_dir} is a file, not a directory")
    if not resume:
        _check_foreign_files(run_dir)  # before a lock file is put into someone else's folder
    if info.is_main and (run_dir.is_dir() or not resume):
        # first of all: a run that another process is writing tells the user so, whatever else is there
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lock = lock_run_dir(run_dir)
        if run_lock is not None:
            held.enter_context(run_lock)
            # with the lock held, unfinished checkpoint folders are a killed writer's (best/ and step_*)
            clear_partial_writes(run_dir)
            clear_partial_writes(run_dir / "checkpoints")
    existing = latest_checkpoint(run_dir)
    ckpt_meta = None
    if resume:
        if existing is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
        try:
            ckpt_meta = read_checkpoint_meta(existing)  # verifies every file's checksum
        except UserError as error:
            raise UserError(f"{error}{_intact_hint(run_dir, existing)}") from None
        if "optimizer_param_groups" not in ckpt_meta or "step" not in ckpt_meta:
            raise UserError(f"cannot resume from {existing}: it holds model weights only, no optimizer and data "
                            "state; start a new run.out_dir (or evaluate it as it is)")
        _check_same_model(ckpt_meta["model"], cfg.model, existing)
        if info.is_main and (changed := _changed_training_settings(ckpt_meta.get("train_config", {}), cfg)):
            print(f"alibi-lm train: note: resuming {existing.name} with other settings than it was trained with "
                  f"({changed}); the losses from here on differ from those of an unbroken run", file=sys.stderr)
        if int(ckpt_meta["step"]) >= cfg.run.steps:
            raise UserError(f"nothing to resume: {existing} is at step {ckpt_meta['step']} and run.steps is "
                            f"{cfg.run.steps}; raise run.steps (--set run.steps=N) to train further")
        if ckpt_meta.get("world_size", 1) != info.world_size:
            raise UserError(f"cannot resume {existing}: it was written by {ckpt_meta.get('world_size')} ranks, "
                            f"this run has {info.world_size}")
        if info.is_main:
            print(f"alibi-lm train: resuming {existing} at step {ckpt_meta['step']} of {cfg.run.steps}",
                  file=sys.stderr, flush=True)
    elif existing is not None:
        raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue it or choose another "
                        "run.out_dir")
    elif (run_dir / "best").exists():  # an earlier run whose checkpoints were deleted
        raise UserError(f"{run_dir} holds an earlier run's best model (best/) but no checkpoint to resume; "
                        "choose another run.out_dir, or delete it to start over")

    device = info.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = TransformerLM(cfg.model)
    start_step, best_loss, bad_evals, tokens_seen = 0, math.inf, 0, 0
    if ckpt_meta is not None:
        load_model_state(model, load_tensors(existing, "model"), existing)
        start_step = int(ckpt_meta["step"])
        state = ckpt_meta.get("train_state", {})
        best_loss = state.get("best_valid_loss") or math.inf
        bad_evals = state.get("bad_evals", 0)
        tokens_seen = state.get("tokens_seen", 0)
    elif cfg.run.init_from:
        _init_weights_from(model, cfg.run.init_from, info)
    model.to(device)
    model = D.wrap_model(model, info, cfg.run.parallel)
    optimizer = build_optimizer(model, cfg, device)
    if ckpt_meta is not None:
        _load_optimizer(optimizer, model, cfg.run.parallel, load_tensors(existing, "optimizer"),
                        ckpt_meta["optimizer_param_groups"], device)
        _restore_rng(load_tensors(existing, "train_state"), info)
    else:
        torch.manual_seed(cfg.run.seed + 1 + info.rank)  # dropout differs per rank
    inner = unwrap_model(model)
    step_model = compile_for_training(model, cfg)
    cuda_graphs = captures_cuda_graphs(cfg)
    autocast = autocast_context(device, cfg.run.precision)

    if info.is_main:
        resolved = {**cfg.to_dict(), "world_size": info.world_size}
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
    metrics = _Metrics(run_dir / "metrics.jsonl", info.is_main, start_step if resume else None,
                       tensorboard=cfg.run.tensorboard)
    held.callback(metrics.close)

    world, batch, accum = info.world_size, cfg.data.batch_size, cfg.data.grad_accum
    rows = world * batch * accum
    tokens_per_step = rows * length
    fpt = flops_per_token(inner, length)
    peak = peak_flops(device, cfg.run.peak_flops)
    total_steps = cfg.run.steps

    def batches_for(step: int) -> list:
        return step_batches(train_tokens, cfg, step, info)

    def save(step: int, valid_loss: float | None) -> Path:
        # All ranks take part (RNG gather, FSDP state gather); rank 0 writes.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # every loss up to this step was finite, so the newest checkpoint's weights are good
            raise diverged(f"the weights are not finite at step {step}", step + 1)
        rng = _rng_tensors(info)
        opt_flat, opt_groups = _optimizer_tensors(optimizer, model, cfg.run.parallel)
        state = _full_model_state(model, cfg.run.parallel)
        path = step_directory(run_dir, step)
        if info.is_main:
            extra = {"step": step, "world_size": world, "optimizer_param_groups": opt_groups,
                     "train_config": cfg.to_dict(), "valid_loss": valid_loss,
                     "train_state": {"best_valid_loss": None if math.isinf(best_loss) else best_loss,
                                     "bad_evals": bad_evals, "tokens_seen": tokens_seen, "data_cursor": step}}
            write_checkpoint(path, state=state, config=inner.cfg, train_len=length, tokenizer=tokenizer,
                             extra_meta=extra, tensors={"optimizer": opt_flat, "train_state": rng})
            # the new checkpoint's weights have not produced a loss yet: the one before stays until they do
            prune_checkpoints(run_dir, cfg.run.keep_last + 1 if cfg.run.keep_last else 0)
        D.barrier()
        return path

    def diverged(what: str, first_bad_step: int) -> UserError:
        """The error that stops a diverged run. A checkpoint's weights are known good once the step after
        it gave a finite loss; if that step was the first bad one, the newest checkpoint is moved aside
        (kept, renamed) so that --resume and evaluate do not pick it up."""
        good = last_ckpt
        if last_ckpt is not None and last_ckpt == step_directory(run_dir, first_bad_step - 1):
            if info.is_main:
                last_ckpt.rename(last_ckpt.with_name(f"diverged-{last_ckpt.name}"))
            older = [p for p in step_checkpoints(run_dir) if p != last_ckpt]
            good = older[-1] if older else None
        where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was written"
        return UserError(f"training diverged: {what}{where} (lower optim.lr or raise schedule.warmup_steps)")

    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and info.is_main), unit="step",
               dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    last_loss = None
    final_valid = None
    best_path = run_dir / "best" if (cfg.run.keep_best and (run_dir / "best").is_dir()) else None
    stopped_early = False
    last_ckpt = existing if resume else None
    interval_start, interval_tokens = time.perf_counter(), 0
    timed_tokens, timed_seconds, first_interval, first_tok_s = 0, 0.0, True, 0.0
    step = start_step
    model.train()
    while step < total_steps:
        lr = lr_at(step, cfg)
        pending.append(train_step(step_model, optimizer, batches_for(step), autocast=autocast,
                                  grad_clip=cfg.optim.grad_clip, lr=lr, cuda_graphs=cuda_graphs))
        step += 1
        tokens_seen += tokens_per_step
        interval_tokens += tokens_per_step
        final = step == total_steps
        do_eval = (cfg.run.eval_every and step % cfg.run.eval_every == 0) or final
        do_ckpt = (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or final
        if step % cfg.run.log_every == 0 or do_eval or do_ckpt:
            losses = torch.stack(pending).double()
            sums = D.all_reduce_sum([float(x) for x in losses.tolist()], device)
            pending = []
            losses_avg = [s / world for s in sums]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - interval_start
            tok_s = interval_tokens / elapsed
            if not first_interval:
                timed_tokens += interval_tokens
                timed_seconds += elapsed
            else:
                first_tok_s = tok_s
            first_interval = False
            if not all(math.isfinite(x) for x in losses_avg):
                first_bad = step - len(losses_avg) + 1 + [math.isfinite(x) for x in losses_avg].index(False)
                raise diverged(f"the loss is {losses_avg[-1]} at step {step}", first_bad)
            last_loss = losses_avg[-1]
            mfu = tok_s * fpt / (peak * world) if peak else None
            record = {"step": step, "loss": last_loss, "loss_avg": sum(losses_avg) / len(losses_avg), "lr": lr,
                      "tokens": tokens_seen, "tokens_per_second": tok_s, "mfu": mfu}
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            if do_eval:
                valid_loss, n_pred = validate(inner if cfg.run.parallel != "fsdp" else model, valid_tokens, valid_len,
                                              batch, info, max_tokens=cfg.data.valid_tokens, autocast=autocast,
                                              lockstep=cfg.run.parallel == "fsdp" and world > 1)
                final_valid = valid_loss
                record.update(valid_loss=valid_loss, valid_ppl=perplexity(valid_loss), valid_tokens=n_pred)
                if split_words:
                    # NLL of the whole split ~ mean NLL * its token count; divided by its words.
                    word_nll = valid_loss * split_tokens / split_words
                    record["valid_word_ppl"] = perplexity(word_nll)
                if valid_loss < best_loss - cfg.run.min_delta:
                    best_loss, bad_evals = valid_loss, 0
                    if cfg.run.keep_best:
                        best_path = run_dir / "best"
                        if cfg.run.parallel == "fsdp" and world > 1:
                            state = _full_model_state(model, cfg.run.parallel)
                            if info.is_main:
                                write_checkpoint(best_path, state=state, config=inner.cfg, train_len=length,
                                                 tokenizer=tokenizer,
                                                 extra_meta={"step": step, "valid_loss": valid_loss})
                        elif info.is_main:
                            save_model_checkpoint(best_path, inner, train_len=length, tokenizer=tokenizer,
                                                  extra_meta={"step": step, "valid_loss": valid_loss})
                else:
                    bad_evals += 1
                if cfg.run.patience and bad_evals >= cfg.run.patience:
                    stopped_early, do_ckpt = True, True
                    record["stopped_early"] = True
                if info.is_main and progress:
                    bar.write(_validation_line(step, record, data_meta["tokenizer"]))
            metrics.write(record)
            if do_ckpt:
                last_ckpt = save(step, final_valid if do_eval else None)
            interval_start, interval_tokens = time.perf_counter(), 0
            if stopped_early:
                break
        bar.update(1)
    bar.close()
    if last_ckpt is None or step_directory(run_dir, step) != last_ckpt:
        last_ckpt = save(step, final_valid)  # e.g. resumed at the final step
    if info.is_main and (final_valid is None or math.isfinite(final_valid)):
        prune_checkpoints(run_dir, cfg.run.keep_last)  # the final weights were validated above
    tokens_per_second = timed_tokens / timed_seconds if timed_seconds else first_tok_s
    return TrainResult(run_dir=run_dir, checkpoint=last_ckpt, final_valid_loss=final_valid,
                       tokens_per_second=tokens_per_second, peak_memory_bytes=_peak_memory(device), steps=step,
                       final_train_loss=last_loss, best_valid_loss=None if math.isinf(best_loss) else best_loss,
                       best_checkpoint=best_path, stopped_early=stopped_early,
                       mfu=tokens_per_second * fpt / (peak * world) if peak else None)

"""Training state: everything a later step depends on, gathered into a training checkpoint and
restored from one, so that a resumed run repeats the unbroken run's losses bit for bit on the CPU.

That is the weights, the AdamW moments and param groups, every rank's RNG states (dropout draws
differ per rank) and the loop's counters (`TrainState`: step, tokens seen, early-stopping state).
Under FSDP the model and optimizer state are gathered to full tensors on rank 0, which alone writes;
restoring hands each rank its shard. The step is the data cursor: batch starts are a pure function
of (seed, step).

Not here: where checkpoints go and which are kept (run_folder.py, checkpoint.py), the file format
(checkpoint.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alibi_lm import distributed as D
from alibi_lm.checkpoint import (
    TRAINING_FILES,
    load_model_state,
    load_tensors,
    model_state,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_model_checkpoint,
    unwrap_model,
    write_checkpoint,
)
from alibi_lm.errors import UserError
from alibi_lm.model import TransformerLM
from alibi_lm.tokenizer import Tokenizer

__all__ = ["TrainState", "gather_model_state", "load_weights", "restore_training_state", "weights_are_finite",
           "write_model_checkpoint", "write_training_checkpoint"]


@dataclass
class TrainState:
    """The training loop's counters, saved in the checkpoint's meta.json ("step", "train_state")."""

    #: optimizer steps done
    step: int = 0
    tokens_seen: int = 0
    #: best validation loss so far (early stopping and best/), inf before the first validation
    best_valid_loss: float = math.inf
    #: validations since the last new best (run.patience)
    bad_evals: int = 0

    def to_meta(self) -> dict:
        best = None if math.isinf(self.best_valid_loss) else self.best_valid_loss
        return {"best_valid_loss": best, "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen,
                "data_cursor": self.step}

    @classmethod
    def from_checkpoint_meta(cls, meta: dict) -> TrainState:
        saved = meta.get("train_state", {})
        return cls(step=int(meta["step"]), tokens_seen=saved.get("tokens_seen", 0),
                   best_valid_loss=saved.get("best_valid_loss") or math.inf, bad_evals=saved.get("bad_evals", 0))


def _fsdp(parallel: str) -> bool:
    return parallel == "fsdp" and torch.distributed.is_initialized()


def gather_model_state(model: nn.Module, parallel: str) -> dict[str, torch.Tensor]:
    """The full state dict of the (unwrapped) model; under FSDP gathered to rank 0's CPU (others get {})."""
    if _fsdp(parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if unwrap_model(model).cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in state.items()}
    return model_state(model)


def _gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, parallel: str) -> tuple[dict, list]:
    """AdamW state as flat tensors ("<param>|<name>") and the JSON-able param groups."""
    if _fsdp(parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = optimizer.state_dict()
    # With full_state_dict + cpu_offload only rank 0 gets the state; the others get {} (they do not write).
    flat = {f"{key}|{name}": value for key, state in sd.get("state", {}).items() for name, value in state.items()
            if isinstance(value, torch.Tensor)}
    return flat, sd.get("param_groups", [])


def _restore_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, parallel: str, flat: dict,
                             groups: list, device: torch.device) -> None:
    state: dict = {}
    for key, value in flat.items():
        param, name = key.rsplit("|", 1)
        param_key = int(param) if param.isdigit() else param
        state.setdefault(param_key, {})[name] = value if name == "step" else value.to(device)
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    sd = {"state": state, "param_groups": groups}
    if _fsdp(parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


def _gather_rng_states(info: D.DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's CPU (and CUDA) RNG state, gathered to all ranks (dropout draws differ per rank)."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    everyone = [mine]
    if torch.distributed.is_initialized():
        everyone = [None] * info.world_size
        torch.distributed.all_gather_object(everyone, mine)
    return {f"rng_{name}_rank{rank}": state for rank, states in enumerate(everyone) for name, state in states.items()}


def _restore_rng_states(tensors: dict[str, torch.Tensor], info: D.DistInfo) -> None:
    cpu = tensors.get(f"rng_cpu_rank{info.rank}")
    if cpu is None:
        raise UserError(f"the checkpoint has no RNG state for rank {info.rank}: resume with the same number of ranks")
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rng_cuda_rank{info.rank}")
    if cuda is not None and info.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, info.device)


def weights_are_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def write_training_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, info: D.DistInfo,
                              parallel: str, state: TrainState, train_len: int, tokenizer: Tokenizer | None,
                              train_config: dict, valid_loss: float | None) -> Path:
    """Write a checkpoint that a resume continues exactly. Every rank takes part (the RNG gather, FSDP's
    state gather); rank 0 writes."""
    rng = _gather_rng_states(info)
    opt_flat, opt_groups = _gather_optimizer_state(optimizer, model, parallel)
    weights = gather_model_state(model, parallel)
    if info.is_main:
        extra = {"step": state.step, "world_size": info.world_size, "optimizer_param_groups": opt_groups,
                 "train_config": train_config, "valid_loss": valid_loss, "train_state": state.to_meta()}
        write_checkpoint(path, state=weights, config=unwrap_model(model).cfg, train_len=train_len,
                         tokenizer=tokenizer, extra_meta=extra, tensors={"optimizer": opt_flat, "train_state": rng})
    return path


def write_model_checkpoint(path: Path, *, model: nn.Module, info: D.DistInfo, parallel: str, train_len: int,
                           tokenizer: Tokenizer | None, extra_meta: dict) -> Path:
    """A weights-only checkpoint (best/). Under FSDP every rank takes part in the gather; rank 0 writes."""
    if parallel == "fsdp" and info.world_size > 1:
        weights = gather_model_state(model, parallel)
        if info.is_main:
            write_checkpoint(path, state=weights, config=unwrap_model(model).cfg, train_len=train_len,
                             tokenizer=tokenizer, extra_meta=extra_meta)
    elif info.is_main:
        save_model_checkpoint(path, unwrap_model(model), train_len=train_len, tokenizer=tokenizer,
                              extra_meta=extra_meta)
    return path


# the model fields that decide which parameters exist and their shapes: init_from needs them equal; the
# rest (dropouts, backend, tolerance, slope rule and bias limit, whose fixed slopes come with the weights)
# may change between the runs
_SHAPE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "position", "norm",
                 "activation", "tie_embeddings", "bias", "embed_norm", "t5_num_buckets")


def init_weights_from(model: TransformerLM, source: str, info: D.DistInfo) -> None:
    """Copy the weights of the checkpoint `source` (or a run directory's newest, or an imported BLOOM or
    MPT) into the new model: a new run that starts from them with its own optimizer and schedule
    (run.init_from), e.g. a fine-tune at a longer train_len."""
    path = resolve_checkpoint(source)
    meta = read_checkpoint_meta(path, skip=TRAINING_FILES)
    saved, now = meta["model"], model.cfg.to_dict()
    fields = [*_SHAPE_FIELDS, *(("max_len",) if model.cfg.position == "learned" else ())]
    differ = [f"model.{k}: {saved.get(k)!r} there, {now[k]!r} here" for k in fields if saved.get(k) != now[k]]
    if differ:
        raise UserError(f"run.init_from {path}: its model has other shapes ({'; '.join(differ)}); set [model] "
                        "to match, or start without run.init_from")
    load_weights(model, path)
    if info.is_main:
        print(f"alibi-lm train: starting from the weights of {path} (step {meta.get('step', 0)}, trained at "
              f"L={meta.get('train_len')}); new optimizer and schedule", file=sys.stderr, flush=True)


def load_weights(model: TransformerLM, checkpoint: Path) -> None:
    """The checkpoint's weights into the unwrapped model, before it is moved, wrapped or sharded."""
    load_model_state(model, load_tensors(checkpoint, "model"), checkpoint)


def restore_training_state(checkpoint: Path, meta: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                           info: D.DistInfo, parallel: str) -> TrainState:
    """The optimizer and this rank's RNG states from a training checkpoint (after the model was wrapped,
    so that FSDP can hand each rank its shard), and the loop's counters."""
    _restore_optimizer_state(optimizer, model, parallel, load_tensors(checkpoint, "optimizer"),
                             meta["optimizer_param_groups"], info.device)
    _restore_rng_states(load_tensors(checkpoint, "train_state"), info)
    return TrainState.from_checkpoint_meta(meta)

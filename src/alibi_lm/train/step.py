"""One optimizer step and what it is made of: the learning-rate schedule, AdamW with its parameter
groups, autocast, torch.compile, the micro-batches of a step, and the FLOP count behind MFU.

Each function takes the config section it reads (optim, schedule, data, run), not the whole
TrainConfig, so that what a piece depends on is in its signature (torchtitan's JobConfig lesson).
Not here: the loop that calls them (loop.py), what a checkpoint holds (state.py).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from alibi_lm import distributed as D
from alibi_lm.config import CUDA_GRAPH_MODES, DataConfig, OptimConfig, RunConfig, ScheduleConfig
from alibi_lm.data import batch_rows, gather_windows, window_starts
from alibi_lm.model import TransformerLM

__all__ = ["autocast_context", "build_optimizer", "captures_cuda_graphs", "compile_for_training", "flops_per_token",
           "lr_at", "peak_flops", "step_batches", "train_step"]


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


def lr_at(step: int, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of (0-based) optimizer step `step` of `total_steps`: linear warmup, then
    cosine/linear/constant down to `schedule.min_lr_ratio * optim.lr`."""
    base, warmup = optim.lr, schedule.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule.kind == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = schedule.min_lr_ratio
    if schedule.kind == "linear":
        return base * (1.0 - (1.0 - floor) * progress)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not biases, norms, slopes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = optim.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=fused or None, foreach=None if fused else True)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for `run.precision` bf16 (or auto on CUDA); otherwise nothing (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_for_training(model: nn.Module, run: RunConfig) -> nn.Module:
    """The model as the training step calls it: itself, or compiled in `run.compile_mode`."""
    if not run.compile:
        return model
    return torch.compile(model, mode=None if run.compile_mode == "default" else run.compile_mode)


def captures_cuda_graphs(run: RunConfig) -> bool:
    """Whether the compiled model replays CUDA graphs (train_step must then copy each loss out)."""
    return run.compile and run.compile_mode in CUDA_GRAPH_MODES


def step_batches(tokens: np.ndarray, data: DataConfig, step: int, info: D.DistInfo, *, seed: int) -> list:
    """The (inputs, targets) micro-batches this rank trains on at `step`, on its device: the step's
    window starts are a pure function of (seed, step), split among ranks and micro-batches the same
    way for any world size."""
    length, batch, accum, world = data.train_len, data.batch_size, data.grad_accum, info.world_size
    starts = window_starts(len(tokens), length, world * batch * accum, seed=seed, step=step, mode=data.windows)
    out = []
    for micro in range(accum):
        x, y = gather_windows(tokens, batch_rows(starts, micro=micro, rank=info.rank, world=world, batch=batch), length)
        if info.device.type == "cuda":  # pinned, so that the copy does not stall the host
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)))
    return out


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

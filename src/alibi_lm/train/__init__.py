"""`train(config)`: the training loop, with validation, metrics, checkpoints, exact resume and DDP/FSDP.

One optimizer step reads `world * batch_size * grad_accum` windows of `train_len + 1` tokens whose
starts are a pure function of (seed, step) (data.window_starts), split among ranks and micro-batches
the same way for any world size. Everything a later step depends on — weights, AdamW moments, the
step, RNG states (dropout), early-stopping state — is in the checkpoint, so a resumed run repeats
the unbroken run's losses bit for bit on the CPU. The learning rate is a pure function of the step.

The package, in the order a run uses it:
  loop.py        setup (data, run folder, model, optimizer, resume) → fit (the loop) → finish
  step.py        one optimizer step: schedule, AdamW, autocast, compile, batches, FLOPs per token
  validate.py    validation loss during training
  state.py       what a checkpoint holds for an exact resume, gathered and restored (FSDP-aware)
  run_folder.py  run.out_dir: lock, foreign files, resume checks, metrics.jsonl, divergence

Not here: the model (model.py), data preparation (data.py), extrapolation evaluation (evaluate.py).
"""

from __future__ import annotations

import contextlib

from alibi_lm import distributed as D
from alibi_lm.config import TrainConfig
from alibi_lm.errors import Interrupted
from alibi_lm.train.loop import TrainResult, finish, fit, setup
from alibi_lm.train.run_folder import RunFolder
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

__all__ = ["TrainResult", "autocast_context", "build_optimizer", "captures_cuda_graphs", "compile_for_training",
           "flops_per_token", "lr_at", "peak_flops", "step_batches", "train", "train_step"]


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train `config.model` on `config.data` and return where the checkpoints are and how fast it ran.
    With `resume`, continue the newest checkpoint of `config.run.out_dir` exactly."""
    config.validate()
    info = D.init_distributed(config.run.device)
    try:
        return _train(config, info, resume=resume, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C: say where the run can go on from (the CLI prints it, exit 130)
        raise Interrupted(RunFolder(config.run.out_dir, info).where_to_resume(config.run.steps)) from None
    finally:
        D.shutdown()


def _train(config: TrainConfig, info: D.DistInfo, *, resume: bool, progress: bool) -> TrainResult:
    # Its own frame: the model and optimizer it holds are gone when it returns or raises, before
    # D.shutdown stops the process group that FSDP's device meshes keep alive.
    # The stack holds the run directory's lock, so it is released on failure as well as on success.
    with contextlib.ExitStack() as held:
        training = setup(config, info, resume=resume, held=held)
        return finish(training, fit(training, progress=progress))

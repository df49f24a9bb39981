"""The run folder (`run.out_dir`): who may write into it, what may already be in it, whether its newest
checkpoint can be resumed, its metrics.jsonl, and what a diverged run leaves behind.

A run folder holds config.json (the resolved config), metrics.jsonl, checkpoints/step_XXXXXXXX/ and
best/; hidden names are its lock and temporary folders. `RunFolder` owns the newest step checkpoint of
the run (`last_checkpoint`): the one a resume starts from, then each one the loop writes.

Not here: what a checkpoint holds (state.py) and how it is written (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from alibi_lm import distributed as D
from alibi_lm.checkpoint import (
    clear_partial_writes,
    latest_checkpoint,
    lock_run_dir,
    prune_checkpoints,
    read_checkpoint_meta,
    step_checkpoints,
    step_directory,
)
from alibi_lm.errors import UserError
from alibi_lm.files import read_json_or_none, write_json
from alibi_lm.model_config import ModelConfig

__all__ = ["MetricsLog", "RunFolder"]

# What a run writes into its directory (hidden names are its lock and temporary folders, and a
# user's tool files); anything else there belongs to someone else.
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoints", "best", "tensorboard"}

# settings that change the losses of the steps after a resume (the rest only change what is logged or kept)
_CONTINUATION_SETTINGS = ("data", "optim", "schedule", "run.steps", "run.seed", "run.precision")


class RunFolder:
    """One training run's folder, as seen by every rank (only rank 0 writes)."""

    def __init__(self, path: str | Path, info: D.DistInfo):
        self.path = Path(path)
        self.info = info
        #: the newest step checkpoint of this run: the one resumed from, then the last one written
        self.last_checkpoint: Path | None = None

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    def claim(self, *, resume: bool, held: contextlib.ExitStack) -> None:
        """Make sure the folder can be this run's, and hold its lock (on `held`) until the run ends."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run.out_dir {self.path} is a file, not a directory")
        if not resume:
            self._check_foreign_files()  # before a lock file is put into someone else's folder
        if self.info.is_main and (self.path.is_dir() or not resume):
            # first of all: a run that another process is writing tells the user so, whatever else is there
            self.path.mkdir(parents=True, exist_ok=True)
            run_lock = lock_run_dir(self.path)
            if run_lock is not None:
                held.enter_context(run_lock)
                # with the lock held, unfinished checkpoint folders are a killed writer's (best/ and step_*)
                clear_partial_writes(self.path)
                clear_partial_writes(self.path / "checkpoints")

    def _check_foreign_files(self) -> None:
        """A new run (no --resume) writes config.json and metrics.jsonl and replaces best/: refuse a directory
        holding someone else's files. The metrics of a run that died before its first checkpoint are
        replaced, as re-running the same command after a crash should work; a log file beside them is kept.
        An earlier run's checkpoints and best model are refused in `check_new_run`, once the lock is held."""
        if not self.path.is_dir():
            return
        foreign = sorted(p.name for p in self.path.iterdir()
                         if p.name not in RUN_FILES and not p.name.startswith(".") and p.suffix != ".log")
        if not foreign and self.config_file.is_file():
            values = read_json_or_none(self.config_file)
            if not (isinstance(values, dict) and {"model", "data", "run"} <= values.keys()):
                foreign = ["config.json"]  # e.g. a Hugging Face export's
        if foreign:
            raise UserError(f"run.out_dir {self.path} holds files that are not a training run's "
                            f"({', '.join(foreign[:3])}); choose a new or empty directory")

    def check_new_run(self) -> None:
        """A new run must not mix its checkpoints and best model with an earlier run's."""
        if latest_checkpoint(self.path) is not None:
            raise UserError(f"{self.path} already has checkpoints; pass --resume to continue it or choose another "
                            "run.out_dir")
        if self.best_dir.exists():  # an earlier run whose checkpoints were deleted
            raise UserError(f"{self.path} holds an earlier run's best model (best/) but no checkpoint to resume; "
                            "choose another run.out_dir, or delete it to start over")

    def checkpoint_to_resume(self, model: ModelConfig, train_config: dict, total_steps: int) -> tuple[Path, dict]:
        """The newest checkpoint and its meta.json, checked to be one this run can continue: intact, with
        optimizer and data state, the same model, steps left, the same number of ranks. Settings that
        change the losses from here on are named in a note (`train_config` is the new config's dict)."""
        existing = latest_checkpoint(self.path)
        if existing is None:
            raise UserError(f"--resume: no checkpoint in {self.path / 'checkpoints'}; start without --resume")
        try:
            meta = read_checkpoint_meta(existing)  # verifies every file's checksum
        except UserError as error:
            raise UserError(f"{error}{_intact_hint(self.path, existing)}") from None
        if "optimizer_param_groups" not in meta or "step" not in meta:
            raise UserError(f"cannot resume from {existing}: it holds model weights only, no optimizer and data "
                            "state; start a new run.out_dir (or evaluate it as it is)")
        _check_same_model(meta["model"], model, existing)
        if self.info.is_main and (changed := _changed_training_settings(meta.get("train_config", {}), train_config)):
            print(f"alibi-lm train: note: resuming {existing.name} with other settings than it was trained with "
                  f"({changed}); the losses from here on differ from those of an unbroken run", file=sys.stderr)
        if int(meta["step"]) >= total_steps:
            raise UserError(f"nothing to resume: {existing} is at step {meta['step']} and run.steps is "
                            f"{total_steps}; raise run.steps (--set run.steps=N) to train further")
        if meta.get("world_size", 1) != self.info.world_size:
            raise UserError(f"cannot resume {existing}: it was written by {meta.get('world_size')} ranks, "
                            f"this run has {self.info.world_size}")
        if self.info.is_main:
            print(f"alibi-lm train: resuming {existing} at step {meta['step']} of {total_steps}", file=sys.stderr,
                  flush=True)
        self.last_checkpoint = existing
        return existing, meta

    def write_config(self, resolved: dict) -> None:
        """config.json: the resolved config, a valid `--config` for a resume (written whole or not at all)."""
        if self.info.is_main:
            write_json(self.config_file, resolved)

    def open_metrics(self, resume_step: int | None, *, tensorboard: bool = False) -> MetricsLog:
        return MetricsLog(self.path / "metrics.jsonl", self.info.is_main, resume_step, tensorboard=tensorboard)

    def where_to_resume(self, total_steps: int) -> str:
        """What Ctrl-C tells the user: the newest checkpoint and the command that continues from it."""
        newest = latest_checkpoint(self.path)
        if newest is None:
            return f"interrupted before the first checkpoint of {self.path}; nothing to resume, start the run again"
        step = int(newest.name.removeprefix("step_"))
        return (f"interrupted; the newest checkpoint is {newest} (step {step} of {total_steps}); continue with: "
                f"alibi-lm train --config {self.config_file} --resume")

    def checkpoint_written(self, path: Path, keep_last: int) -> None:
        """Record the newest checkpoint and prune the older ones. Its weights have not produced a loss
        yet, so one checkpoint more than `keep_last` stays until they do (see `diverged`)."""
        self.last_checkpoint = path
        if self.info.is_main:
            prune_checkpoints(self.path, keep_last + 1 if keep_last else 0)

    def finished(self, keep_last: int) -> None:
        """The final weights were validated: keep only the newest `keep_last` checkpoints."""
        if self.info.is_main:
            prune_checkpoints(self.path, keep_last)

    def diverged(self, what: str, first_bad_step: int) -> UserError:
        """The error that stops a diverged run. A checkpoint's weights are known good once the step after
        it gave a finite loss; if that step was the first bad one, the newest checkpoint is moved aside
        (kept, renamed) so that --resume and evaluate do not pick it up."""
        good = self.last_checkpoint
        if good is not None and good == step_directory(self.path, first_bad_step - 1):
            if self.info.is_main:
                good.rename(good.with_name(f"diverged-{good.name}"))
            older = [p for p in step_checkpoints(self.path) if p != good]
            good = older[-1] if older else None
            self.last_checkpoint = good
        where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was written"
        return UserError(f"training diverged: {what}{where} (lower optim.lr or raise schedule.warmup_steps)")


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


def _changed_training_settings(saved: dict, now: dict) -> str:
    """'section.key old -> new' for each setting in _CONTINUATION_SETTINGS that differs from the checkpoint's."""
    changes = []
    for name in _CONTINUATION_SETTINGS:
        section, _, key = name.partition(".")
        old, new = saved.get(section, {}), now.get(section, {})
        for k in ([key] if key else sorted(old)):
            if k in old and old[k] != new.get(k):
                changes.append(f"{section}.{k} {old[k]!r} -> {new.get(k)!r}")
    return ", ".join(changes)


def _check_same_model(saved: dict, current: ModelConfig, path: Path) -> None:
    now = current.to_dict()
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}" for k in diff[:3])
        run_config = path.parent.parent / "config.json"
        raise UserError(f"cannot resume {path}: the model config differs ({shown}); resume with "
                        f"--config {run_config} or train into a new run.out_dir")


def _metrics_record(line: str) -> dict | None:
    """One line of metrics.jsonl, or None for a line a kill or a full disk left torn."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """metrics.jsonl, appended by rank 0, flushed per line so a killed run keeps what it logged; with
    `tensorboard`, the same numbers as TensorBoard scalars in <run>/tensorboard (step = optimizer step)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, *, tensorboard: bool = False):
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

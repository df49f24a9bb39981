"""Checkpoints: safetensors + JSON, written atomically, verified on load, never unpickled.

A checkpoint directory holds `model.safetensors` (the state dict of the unwrapped TransformerLM; a
tied output layer is stored once, as `embed.weight`), `meta.json` ({"format_version": 1, "model":
ModelConfig.to_dict(), "train_len", "step", "files": {name: sha256}, ...}), the tokenizer when one
is known, and for training checkpoints `optimizer.safetensors` + `train_state.safetensors` (AdamW
moments, RNG states). A run directory holds `checkpoints/step_XXXXXXXX/`, newest last.

Writes go to a temporary sibling directory (files fsynced, meta.json last) that is renamed into
place, so a crash at any moment leaves either the old checkpoint or the new one, never half of one.
Older step checkpoints are pruned only after a new one is in place. The sha256 of every file is in
meta.json, so a truncated or corrupted file is reported instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alibi_lm.errors import UserError
from alibi_lm.files import FOLDER_KINDS, folder_kind, read_json, shareable
from alibi_lm.model import TransformerLM
from alibi_lm.model_config import ModelConfig
from alibi_lm.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Checkpoint", "clear_partial_writes", "latest_checkpoint", "load_checkpoint", "prune_checkpoints",
           "read_checkpoint_meta", "replace_dir", "save_model_checkpoint", "unwrap_model"]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
# what train's checkpoints add for --resume (train.py writes them as the "optimizer" and "train_state" stems)
TRAINING_FILES = frozenset({"optimizer.safetensors", "train_state.safetensors"})
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass
class Checkpoint:
    path: Path
    model: TransformerLM
    config: ModelConfig
    train_len: int
    tokenizer: Tokenizer | None
    meta: dict


def unwrap_model(model: nn.Module) -> TransformerLM:
    """The TransformerLM inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict of the unwrapped model; the tied output weight is dropped (it is embed.weight)."""
    inner = unwrap_model(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    if inner.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` where `target` is. An existing `target` is moved aside, not deleted,
    until the new one is in place (and moved back if that fails), so a failure in between (a full disk,
    a kill) never leaves the user with neither."""
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# a checkpoint being written, in the folder that will hold it; renamed into place once complete
_PARTIAL_PREFIX = ".tmp-"


def clear_partial_writes(directory: str | Path) -> None:
    """Remove the unfinished checkpoint folders of writers that were killed. Only for a directory no
    other process is writing to (a locked run), since a live writer's folder looks the same."""
    for partial in Path(directory).glob(f"{_PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def write_checkpoint(directory: str | Path, *, state: dict[str, torch.Tensor], config: ModelConfig, train_len: int,
                     tokenizer: Tokenizer | None = None, extra_meta: dict | None = None,
                     tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint atomically. `tensors` maps extra file stems (e.g. "optimizer") to flat
    dicts of tensors saved as safetensors. An existing `directory` is replaced only once the new
    one is complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f"{_PARTIAL_PREFIX}{directory.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {MODEL_FILE: state}
        for stem, flat in (tensors or {}).items():
            files[f"{stem}.safetensors"] = {k: v.detach().to("cpu").contiguous() for k, v in flat.items()}
        hashes = {}
        for name, flat in files.items():
            save_file(flat, str(tmp / name))
            _fsync_file(tmp / name)
            hashes[name] = _sha256(tmp / name)
        if tokenizer is not None:
            tokenizer.save(tmp)
            for name in ("tokenizer.json", "tokenizer_meta.json"):
                _fsync_file(tmp / name)
                hashes[name] = _sha256(tmp / name)
        meta = {"format_version": FORMAT_VERSION, "model": config.to_dict(), "train_len": int(train_len), "step": 0,
                **(extra_meta or {}), "files": hashes,
                "tokenizer": tokenizer.kind if tokenizer is not None else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _fsync_file(tmp / "meta.json")
        shareable(tmp)  # save_file writes 0600: others on the machine could not read the weights
        _fsync_dir(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_model_checkpoint(directory: str | Path, model: nn.Module, *, train_len: int,
                          tokenizer: Tokenizer | None = None, extra_meta: dict | None = None) -> Path:
    """A model-only checkpoint (weights, config, tokenizer), written atomically."""
    inner = unwrap_model(model)
    return write_checkpoint(directory, state=model_state(inner), config=inner.cfg, train_len=train_len,
                            tokenizer=tokenizer, extra_meta=extra_meta)


def lock_run_dir(run_dir: str | Path):
    """Take the run directory's lock for as long as the returned file stays open, so that a second
    training process (a stray background job, a resume started twice) cannot write checkpoints into
    the same run at the same time. Returns None where file locks are not available (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(Path(run_dir) / ".lock", "w")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another training process is writing to {run_dir}; wait for it to finish or stop it "
                        "first") from None
    return handle


def step_directory(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (called after a successful save)."""
    for path in step_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "meta.json").is_file() and not (path / "checkpoints").is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path} is neither a checkpoint (no meta.json) nor a run directory with checkpoints/")
    return latest


def read_checkpoint_meta(path: str | Path, *, verify: bool = True, skip: Collection[str] = ()) -> dict:
    """meta.json of a checkpoint directory; with `verify`, the sha256 of every listed file but those in
    `skip` is checked."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{path} is not a checkpoint: meta.json is missing")
    try:
        meta = read_json(meta_path, "its")
    except UserError as error:
        raise UserError(f"corrupt checkpoint {path}: {error}") from None
    if not isinstance(meta, dict) or "model" not in meta:
        kind = folder_kind(path)
        kind = f" ({FOLDER_KINDS[kind]})" if kind in FOLDER_KINDS else ""
        raise UserError(f"{path} is not a checkpoint{kind}: its meta.json has no model config; give a checkpoint "
                        "or a run directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported checkpoint format {meta.get('format_version')!r} "
                        f"(this alibi-lm reads version {FORMAT_VERSION})")
    if verify:
        for name, expected in meta.get("files", {}).items():
            if name in skip:
                continue
            file = path / name
            if not file.is_file():
                raise UserError(f"corrupt checkpoint {path}: {name} is missing")
            if _sha256(file) != expected:
                raise UserError(f"corrupt checkpoint {path}: {name} is truncated or damaged (checksum mismatch)")
    return meta


def load_tensors(path: str | Path, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / (stem if stem.endswith(".safetensors") else f"{stem}.safetensors")
    if not file.is_file():
        raise UserError(f"checkpoint {path} has no {file.name}")
    try:
        return load_file(str(file), device=str(device))
    except Exception as error:  # safetensors raises its own error type for bad headers
        raise UserError(f"corrupt checkpoint {path}: cannot read {file.name} ({str(error).splitlines()[0]})") from None


def load_model_state(model: TransformerLM, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy a stored state dict into `model`; a shape or key mismatch is a UserError."""
    expected = set(model.state_dict())
    if model.cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match its model config: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not match its model config: {str(error).splitlines()[-1].strip()}") \
            from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory (or a run directory's newest checkpoint) for inference: the model
    in eval mode on `device`, its config, training length, tokenizer and metadata."""
    path = resolve_checkpoint(path)
    # inference never reads the optimizer and data state: damage there must not stop an evaluation
    meta = read_checkpoint_meta(path, skip=TRAINING_FILES)
    try:
        config = ModelConfig.from_dict(meta["model"])
        config.validate()
    except (TypeError, ValueError) as error:
        raise UserError(f"checkpoint {path} has an invalid model config: {error}") from None
    model = TransformerLM(config)
    load_model_state(model, load_tensors(path, MODEL_FILE), path)
    model.to(device).eval()
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return Checkpoint(path=path, model=model, config=config, train_len=int(meta.get("train_len", 0)),
                      tokenizer=tokenizer, meta=meta)

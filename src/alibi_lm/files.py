"""The file and folder chores every command shares: JSON read into a user-facing error, JSON written
atomically, what kind of alibi-lm folder a path is, and an output file checked before the work.

Standard library only (the config layer, STYLE.md), so any layer may use it. What the folders hold is
defined where they are written (`data.prepare`, `checkpoint.write_checkpoint`, `train`, `hf`); this
module only tells them apart by the files that mark each one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alibi_lm.errors import UserError

__all__ = ["RESULTS_FORMAT", "check_output_file", "folder_kind", "read_json", "read_json_or_none", "shareable",
           "write_json", "writable_parent"]

#: the "format" field of an evaluation results document (`alibi-lm evaluate -o`, read by `alibi-lm plot`)
RESULTS_FORMAT = "alibi-lm-eval"

#: what `folder_kind` returns, and the kinds a message can name
FOLDER_KINDS = {
    "prepared": "a prepared data directory",
    "checkpoint": "a model checkpoint",
    "run": "a training run directory",
    "hf": "a Hugging Face model folder",
}


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON in `path`, or a UserError naming `what` it should have been and why it is not."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what} {path} is not valid JSON ({error})") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({error.strerror or error})") from None


def read_json_or_none(path: str | Path) -> Any:
    """The JSON in `path`, or None when it is missing, unreadable or not JSON (for "is this ours?")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a sibling temp file, so that a reader never
    sees half a file (evaluation results, the demo summary, a run's config)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except OSError as error:  # report the user's path, not the temporary one
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None


def _umask() -> int:
    # the process's umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: str | Path) -> Path:
    """Give `path` the permissions an ordinary `open()` or `mkdir()` would have given it under the user's
    umask (0644 / 0755 under the usual 022). safetensors' `save_file` writes 0600 and `tempfile.mkdtemp`
    makes 0700 folders, which locked the weights away from the other users of a shared machine.
    A folder is done with everything in it. Returns `path`."""
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    return path


def folder_kind(path: str | Path) -> str | None:
    """Which alibi-lm folder `path` is ("prepared", "checkpoint", "run", "hf"), or None (a new, empty or
    other folder, or not a folder). Decided by the files each writer leaves, never by the name."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "checkpoints").is_dir():
        return "run"
    meta = read_json_or_none(path / "meta.json") if (path / "meta.json").is_file() else None
    if isinstance(meta, dict):
        if "model" in meta:
            return "checkpoint"
        if "splits" in meta:
            return "prepared"
    config = read_json_or_none(path / "config.json") if (path / "config.json").is_file() else None
    if isinstance(config, dict):
        if {"model", "data", "run"} <= config.keys():
            return "run"
        if "model_type" in config or "architectures" in config:
            return "hf"
    return None


def writable_parent(out: str | Path, option: str = "") -> Path:
    """Fail before any work if `out` cannot be created where it is named: its nearest existing ancestor
    must be a folder this process can create entries in (probed with a temporary directory, so that
    nothing is left behind; `os.access` says yes under /proc, where nothing can be created). `option`
    (e.g. "-o") prefixes the messages. Returns that ancestor."""
    out = Path(out)
    prefix = f"{option} {out}" if option else f"cannot create {out}"
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{prefix}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=ancestor))
    except OSError as error:
        raise UserError(f"{prefix}: cannot write in {ancestor} ({error.strerror or error})") from None
    return ancestor


def check_output_file(out: str | Path, *, option: str, kind: str, ours: Callable[[Path], bool],
                      example: str) -> Path:
    """Check an output file before a long job writes it: not a folder, creatable, and either new or a
    file of `kind` that this program wrote before (`ours(out)`), which is then replaced. Any other file
    is refused, never overwritten (a corpus renamed keep.png, a checkpoint's meta.json). The folders
    up to it are created. Returns `out` as a Path."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{option} {out} is a directory; give a file name such as {out / example}")
    writable_parent(out, option)
    if out.exists() and not ours(out):
        raise UserError(f"{option} {out} exists and is not an alibi-lm {kind}; choose another name "
                        f"(earlier {kind}s are replaced, other files never)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{option} {out}: cannot create its folder ({error.strerror or error})") from None
    return out


def is_results_file(path: str | Path) -> bool:
    """Whether `path` holds an evaluation results document (what `alibi-lm evaluate -o` writes)."""
    data = read_json_or_none(path)
    return isinstance(data, dict) and data.get("format") == RESULTS_FORMAT

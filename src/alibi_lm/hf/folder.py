"""The files of a Hugging Face model folder, shared by the model families: config.json and its typed
fields, the weights (model.safetensors, sharded safetensors, pytorch_model.bin), the tokenizer files
both ways, and an export folder: checked before the work, written atomically.

What each family's config.json and tensors mean is bloom.py's and mpt.py's business; this module
knows only file names and JSON types."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from alibi_lm.checkpoint import replace_dir
from alibi_lm.config import convert_value
from alibi_lm.errors import UserError
from alibi_lm.files import folder_kind, read_json, read_json_or_none, shareable, writable_parent
from alibi_lm.tokenizer import Tokenizer, load_tokenizer

__all__ = ["REQUIRED", "Weights", "check_export_dir", "config_value", "import_tokenizer", "load_hf_weights", "naming",
           "read_config", "section", "write_export", "write_json_file", "write_tokenizer"]

#: how messages name alibi-lm's own folders (files.folder_kind's kinds), which are never a Hugging Face folder
OUR_FOLDERS = {"checkpoint": "checkpoint", "run": "run directory", "prepared": "prepared data directory"}


# ---------------------------------------------------------------------------------------------
# Export: the folder checked, then written


def check_export_dir(out_dir: Path, overwrite: bool, model_type: str) -> None:
    """Fail before any work if `out_dir` is no place for an export of `model_type`: a file, an alibi-lm
    folder, or a non-empty folder (which --overwrite replaces only if an earlier export wrote it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a directory to export into")
    kind = folder_kind(out_dir)
    if kind in OUR_FOLDERS:
        raise UserError(f"{out_dir} is an alibi-lm {OUR_FOLDERS[kind]}; export into a new directory "
                        "(it is never replaced)")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} already exists and is not empty; choose a new directory or pass --overwrite")
        # --overwrite deletes the folder: only ever one that an earlier export wrote, never a user's files
        problem = _not_an_export(out_dir, model_type)
        if problem:
            raise UserError(f"{out_dir} is not an earlier export ({problem}); --overwrite replaces only a folder "
                            "written by `alibi-lm export`: choose a new directory")
    # the export is assembled in a hidden sibling, whose name would otherwise be the one in the error
    writable_parent(out_dir)


def _not_an_export(directory: Path, model_type: str) -> str | None:
    """Why `directory` does not look like what an export writes (a config.json of `model_type` and
    model.safetensors, maybe tokenizer files), or None if it does. Files beside them are tolerated (an
    older alibi-lm may have written others); folders are not, as an export never writes one."""
    folders = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if folders:
        return f"it holds folders, e.g. {folders[0]!r}, and an export writes none"
    if not (directory / "model.safetensors").is_file():
        return "it has no model.safetensors"
    if not (directory / "config.json").is_file():
        return "it has no config.json"
    config = read_json_or_none(directory / "config.json")
    if config is None:
        return "its config.json is not valid JSON"
    if not isinstance(config, dict) or config.get("model_type") != model_type:
        return f"its config.json is not a {model_type.upper()} config"
    return None


def naming(error: OSError, out: Path) -> OSError:
    """`error` with the user's destination as its file name instead of an internal temporary path; the
    CLI prints an OSError as one line, its reason and file name. It stays an OSError for API callers."""
    return OSError(error.errno, error.strerror or str(error), str(out))


def write_export(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Assemble the export with `fill(folder)` in a hidden temporary sibling of `out_dir`, then rename it
    into place (an existing `out_dir` is kept until the new one is there), so that a failed export
    leaves nothing half-written. An OSError names `out_dir`, never the temporary folder."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as error:
        raise naming(error, out_dir) from None
    try:
        fill(tmp)
        # mkdtemp makes the folder 0700 and safetensors writes 0600: others on a shared machine could
        # not read the export; it gets what the user's umask gives an ordinary folder and file
        shareable(tmp)
        replace_dir(tmp, out_dir)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(error, out_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_json_file(path: Path, data: Any) -> None:
    """`data` as indented JSON; inside a folder that `write_export` renames into place when complete."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tokenizer(tokenizer: Tokenizer, directory: Path, model_max_length: int | None) -> dict:
    """Our tokenizer as a transformers fast tokenizer: tokenizer.json plus tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer.save(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"the tokenizer did not write {path}; re-save the checkpoint with a current alibi-lm")
    special: dict[str, str] = {}
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is not None:
        token = HFTokenizer.from_file(str(path)).id_to_token(eos_id)
        if token is not None:
            special["eos_token"] = token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    write_json_file(directory / "tokenizer_config.json", config)
    write_json_file(directory / "special_tokens_map.json", special)
    return special


# ---------------------------------------------------------------------------------------------
# Import: config.json, the weights, the tokenizer


def read_config(hf_dir: Path) -> dict:
    """config.json of the Hugging Face folder `hf_dir`, refusing alibi-lm's own folders by name: a
    checkpoint has no config.json and a run's is a training config, so either would be reported as a
    broken Hugging Face folder, which misleads: they need no import at all."""
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; give a local Hugging Face model folder (config.json + weights)")
    kind = folder_kind(hf_dir)
    if kind == "prepared":
        raise UserError(f"{hf_dir} is an alibi-lm prepared data directory, not a model; give a local Hugging Face "
                        "model folder (config.json + weights)")
    if kind in OUR_FOLDERS:
        raise UserError(f"{hf_dir} is already an alibi-lm {OUR_FOLDERS[kind]} and needs no import; use it as it "
                        f"is (e.g. alibi-lm evaluate {hf_dir})")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {hf_dir}: not a Hugging Face model folder")
    config = read_json(path, "Hugging Face config")
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config


def _weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of `hf_dir`, in the order transformers prefers them: model.safetensors, a
    sharded checkpoint's shards (safetensors or .bin, from its index), pytorch_model.bin."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    bin_single, bin_index = hf_dir / "pytorch_model.bin", hf_dir / "pytorch_model.bin.index.json"
    if single.is_file():
        return [single]
    if index.is_file() or bin_index.is_file():
        path = index if index.is_file() else bin_index
        data = read_json(path, "weight index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if weight_map is None:
            raise UserError(f"{path} is not a valid weight index (no weight_map)")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{path} is not a valid weight index (weight_map must map tensor names to file names)")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{hf_dir} is missing weight shards named in {path.name}: {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}; download them again")
        return files
    if bin_single.is_file():
        return [bin_single]
    raise UserError(f"no weights in {hf_dir}: expected model.safetensors, sharded safetensors with "
                    "model.safetensors.index.json, or pytorch_model.bin")


def _read_weight_file(file: Path) -> dict[str, Tensor]:
    """The tensors of one weight file; a .bin is read with weights_only, never unpickling code."""
    try:
        if file.suffix == ".safetensors":
            tensors = safetensors.torch.load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {file} (truncated or corrupt?): {first}") from None
    except (pickle.UnpicklingError, KeyError, AttributeError, IndexError, TypeError, UnicodeDecodeError):
        # torch's weights-only unpickler fails on junk with whatever error the bytes lead to, and its
        # text is about torch internals: say no more
        raise UserError(f"cannot read {file} (truncated or corrupt?)") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise UserError(f"cannot read {file}: it does not hold a state dict (tensors by name)")
    return tensors


def load_hf_weights(hf_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, sharded safetensors (with their
    index), or pytorch_model.bin (read with weights_only, never unpickling code)."""
    state: dict[str, Tensor] = {}
    for file in _weight_files(Path(hf_dir)):
        state.update(_read_weight_file(file))
    return state


class Weights:
    """Source tensors by name, with a clear error for a missing one and a record of what was used."""

    def __init__(self, state: dict[str, Tensor], hf_dir: Path, prefix: str):
        # some BLOOM uploads save the bare model (word_embeddings...), others the LM (transformer.word_...)
        self.state = {(k if k.startswith(prefix) or k.startswith("lm_head.") else prefix + k): v
                      for k, v in state.items()}
        self.hf_dir = hf_dir
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.state

    def take(self, name: str) -> Tensor:
        if name not in self.state:
            raise UserError(f"the weights in {self.hf_dir} have no tensor {name!r}; the download is incomplete or "
                            "config.json does not match the weights")
        self.used.add(name)
        return self.state[name].to(torch.float32)

    def unused(self) -> list[str]:
        return sorted(set(self.state) - self.used)


#: `config_value`'s default for a field that must be there
REQUIRED: Any = object()


def config_value(section: dict, names: str | tuple[str, ...], kind: type, default: Any = REQUIRED, *,
                 where: str = "") -> Any:
    """The first of `names` (a field and its aliases) that is set in a config.json `section`, as `kind`
    (int, float or bool, through the config layer's `convert_value`), or `default` when none is set
    (absent or null); with no default, a missing field is an error. A number must be positive and
    finite: every number alibi-lm reads from a Hugging Face config is a size, a length or a scale.
    A value of the wrong type is an error naming it, not skipped, which would report it as missing."""
    names = (names,) if isinstance(names, str) else names
    for name in names:
        value = section.get(name)
        if value is None:
            continue
        label = f"config.json: {where}{name}"
        # JSON values are typed: "2048" or "false" is a mistake in the file, not text to parse
        value = convert_value(value, kind, label, parse_strings=False)
        if kind is not bool and not 0 < value < math.inf:
            raise UserError(f"{label} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
        return value
    if default is REQUIRED:
        raise UserError(f"config.json has no {' or '.join(where + name for name in names)}")
    return default


def section(config: dict, name: str) -> dict:
    """The nested object `config[name]` (MPT's attn_config, ffn_config), {} when unset."""
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"config.json: {name} must be a JSON object, got {value!r}")
    return value


def import_tokenizer(hf_dir: Path, eos_id: Any) -> tuple[Tokenizer | None, str | None]:
    """(the folder's tokenizer.json as our Tokenizer, None), or (None, a note saying why there is none):
    a model without a tokenizer still imports, for token ids."""
    if not (hf_dir / "tokenizer.json").is_file():
        return None, f"no tokenizer.json in {hf_dir}; the checkpoint has no tokenizer (token ids only)"
    try:
        tokenizer = load_tokenizer(hf_dir)
    except (UserError, ValueError, OSError, KeyError) as error:
        return None, f"tokenizer not imported: {error}"
    if tokenizer.eos_id is None and isinstance(eos_id, int):
        # a foreign tokenizer.json names no alibi-lm end token; the model config knows BLOOM's "</s>"
        tokenizer.eos_id = eos_id
    return tokenizer, None

"""The files of a Hugging Face model folder, shared by the model families: config.json and its typed
fields, the weights (model.safetensors, sharded safetensors, pytorch_model.bin), the tokenizer files
both ways, and the checks on an export folder before it is written."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alibi_lm.errors import UserError

__all__ = ["Weights", "alibi_lm_kind", "bool_field", "check_can_create", "check_export_dir", "float_field",
           "import_tokenizer", "int_field", "load_hf_weights", "naming", "optional_float", "optional_int",
           "read_config", "section", "write_tokenizer"]


def check_export_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a directory to export into")
    kind = alibi_lm_kind(out_dir)
    if kind:
        raise UserError(f"{out_dir} is an alibi-lm {kind}; export into a new directory (it is never replaced)")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} already exists and is not empty; choose a new directory or pass --overwrite")
        # --overwrite deletes the folder: only ever one that an earlier export wrote, never a user's files
        problem = _not_an_export(out_dir)
        if problem:
            raise UserError(f"{out_dir} is not an earlier export ({problem}); --overwrite replaces only a folder "
                            "written by `alibi-lm export`: choose a new directory")
    check_can_create(out_dir)


def _not_an_export(directory: Path) -> str | None:
    """Why `directory` does not look like what `export_bloom` writes (a BLOOM config.json and
    model.safetensors, maybe tokenizer files), or None if it does. Files beside them are tolerated (an
    older alibi-lm may have written others); folders are not, as an export never writes one."""
    folders = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if folders:
        return f"it holds folders, e.g. {folders[0]!r}, and an export writes none"
    if not (directory / "model.safetensors").is_file():
        return "it has no model.safetensors"
    try:
        config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        return "it has no config.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "its config.json is not valid JSON"
    if not isinstance(config, dict) or config.get("model_type") != "bloom":
        return "its config.json is not a BLOOM config"
    return None


def check_can_create(out: Path) -> None:
    """Fail before any work if `out` cannot be created where it is named. The writers work in a hidden
    temporary sibling of `out`, whose name would otherwise be the one in the error (`/proc/.out.x1y2`).
    Probes the nearest existing folder with a temporary directory, so nothing is left behind."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {out}: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=ancestor))
    except OSError as error:
        raise UserError(f"cannot create {out}: cannot write in {ancestor} ({error.strerror or error})") from None


def naming(error: OSError, out: Path) -> OSError:
    """`error` with the user's destination as its file name instead of an internal temporary path; the
    CLI prints an OSError as one line, its reason and file name. It stays an OSError for API callers."""
    return OSError(error.errno, error.strerror or str(error), str(out))


def write_tokenizer(tokenizer: Any, directory: Path, model_max_length: int | None) -> dict:
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
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return special


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where there is none (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def alibi_lm_kind(directory: Path) -> str | None:
    """"checkpoint" or "run directory" where `directory` is alibi-lm's own, else None. A checkpoint has
    no config.json and a run's config.json is a training config, so both would be reported as foreign
    Hugging Face folders, which misleads: they need no import at all."""
    meta = _json_object(directory / "meta.json")
    # a prepared data directory has a meta.json too, without a model config
    if meta is not None and "model" in meta and "format_version" in meta:
        return "checkpoint"
    config = _json_object(directory / "config.json") or {}
    if "model_type" in config or "architectures" in config:
        return None  # a Hugging Face config, whatever else lies beside it
    run_config = isinstance(config.get("model"), dict) and "run" in config
    if run_config or (directory / "checkpoints").is_dir() or (directory / "metrics.jsonl").is_file():
        return "run directory"
    return None


def read_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; give a local Hugging Face model folder (config.json + weights)")
    kind = alibi_lm_kind(hf_dir)
    if kind:
        raise UserError(f"{hf_dir} is already an alibi-lm {kind} and needs no import; use it as it is "
                        f"(e.g. alibi-lm evaluate {hf_dir})")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {hf_dir}: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config


def load_hf_weights(hf_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, sharded safetensors (with their
    index), or pytorch_model.bin (read with weights_only, never unpickling code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    bin_single, bin_index = hf_dir / "pytorch_model.bin", hf_dir / "pytorch_model.bin.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file() or bin_index.is_file():
        path = index if index.is_file() else bin_index
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(f"{path} is not a valid weight index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{path} is not a valid weight index (weight_map must map tensor names to file names)")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{hf_dir} is missing weight shards named in {path.name}: {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}; download them again")
    elif bin_single.is_file():
        files = [bin_single]
    else:
        raise UserError(f"no weights in {hf_dir}: expected model.safetensors, sharded safetensors with "
                        "model.safetensors.index.json, or pytorch_model.bin")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                tensors = load_file(str(file))
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
        state.update(tensors)
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


def optional_int(config: dict, *names: str) -> int | None:
    """The first of `names` in config.json that is set, as a positive integer, or None if none is; a
    value of another type is an error naming it (not skipped, which would report the field as missing)."""
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"config.json: {name} must be a positive integer, got {value!r}")
        return value
    return None


def int_field(config: dict, *names: str, default: int | None = None) -> int:
    """`optional_int`, falling back to `default`; with no default, a missing field is an error."""
    value = optional_int(config, *names)
    if value is not None:
        return value
    if default is not None:
        return default
    raise UserError(f"config.json has no {' or '.join(names)}")


def optional_float(section: dict, name: str, where: str = "") -> float | None:
    """`section[name]` as a positive finite number, None when unset (absent or null)."""
    value = section.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"config.json: {where}{name} must be a positive number, got {value!r}")
    return float(value)


def float_field(section: dict, name: str, default: float, where: str = "") -> float:
    value = optional_float(section, name, where)
    return default if value is None else value


def bool_field(section: dict, name: str, default: bool, where: str = "") -> bool:
    """`section[name]` as a JSON boolean, `default` when unset; bool("false") would read as true."""
    value = section.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"config.json: {where}{name} must be true or false, got {value!r}")
    return value


def section(config: dict, name: str) -> dict:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"config.json: {name} must be a JSON object, got {value!r}")
    return value


def import_tokenizer(hf_dir: Path, eos_id: Any) -> tuple[Any, str | None]:
    if not (hf_dir / "tokenizer.json").is_file():
        return None, f"no tokenizer.json in {hf_dir}; the checkpoint has no tokenizer (token ids only)"
    try:
        from alibi_lm.tokenizer import load_tokenizer
    except ImportError:
        return None, "alibi_lm.tokenizer is not available; tokenizer not imported"
    try:
        tokenizer = load_tokenizer(hf_dir)
    except (UserError, ValueError, OSError, KeyError) as error:
        return None, f"tokenizer not imported: {error}"
    if tokenizer.eos_id is None and isinstance(eos_id, int):
        # a foreign tokenizer.json names no alibi-lm end token; the model config knows BLOOM's "</s>"
        tokenizer.eos_id = eos_id
    return tokenizer, None

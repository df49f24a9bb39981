"""Hugging Face interop: export to transformers' BLOOM, import BLOOM and MPT checkpoints.

Both directions are a config map plus a state-dict adapter (torchtitan's `state_dict_adapter`);
neither needs `transformers` at run time: a BLOOM folder is `config.json` + `model.safetensors`
+ tokenizer files, written and read here directly. The tests load the result with transformers.

Why the logits match:
- BLOOM adds `slope_h * j` (key position from the cumulative attention mask) to every score row;
  ours adds `-slope_h * (i - j)`. Per row they differ by the constant `slope_h * i`, and softmax
  ignores a constant per row, so causal attention is the same (PAPER.md, "the method").
- MPT adds `slope_h * (j - (n_keys - 1))`, the same trick; its slopes differ from the paper's for
  head counts that are not powers of two (our `slope_rule="mpt"`), its 8 is `alibi_bias_max`.
- Neither scales the bias: it is added after the 1/sqrt(d) scaling, as ours.
- BLOOM fuses q, k, v per head, `[h0: q k v, h1: q k v, ...]`; ours (and MPT's `Wqkv`) is
  `[all q, all k, all v]`; the adapter permutes the rows.

Known limits: BLOOM export needs a model that BLOOM's architecture can express (see
`bloom_mismatches`); MPT import covers the ALiBi multi-head variant (no QK layer norm, no prefix
LM, no logit scale, no grouped-query attention). Imported models are float32.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alibi_lm.checkpoint import replace_dir
from alibi_lm.errors import UserError
from alibi_lm.model import TransformerLM
from alibi_lm.model_config import ModelConfig
from alibi_lm.positions import alibi_slopes, mpt_alibi_slopes

__all__ = [
    "bloom_mismatches",
    "bloom_model_config",
    "export_bloom",
    "import_checkpoint",
    "import_hf",
    "load_hf_weights",
]

#: the training length BLOOM's models used; assumed when an imported BLOOM config.json names none
BLOOM_DEFAULT_TRAIN_LEN = 2048


# ---------------------------------------------------------------------------------------------
# BLOOM: config map


def bloom_model_config(vocab_size: int, n_layers: int, d_model: int, n_heads: int, *,
                       norm_eps: float = 1e-5, tie_embeddings: bool = True, **overrides: Any) -> ModelConfig:
    """A ModelConfig that BLOOM can express exactly: ALiBi with the paper's slopes, a layer norm
    after the embeddings, pre-LayerNorm blocks with biases, tanh-GELU MLP of width 4 * d_model."""
    values: dict[str, Any] = dict(
        vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=None, d_ff=None,
        position="alibi", norm="layernorm", activation="gelu_tanh", bias=True, embed_norm=True, norm_eps=norm_eps,
        slope_rule="paper", alibi_max_bias=8.0, tie_embeddings=tie_embeddings, trainable_slopes=False,
    )
    values.update(overrides)
    return ModelConfig(**values)


def bloom_mismatches(model: TransformerLM) -> list[str]:
    """Every field of the model's config that BLOOM cannot express, as 'field=value (BLOOM: x)'."""
    cfg = model.cfg
    wanted: list[tuple[str, Any, Any]] = [
        ("position", cfg.position, "alibi"),
        ("norm", cfg.norm, "layernorm"),
        ("activation", cfg.activation, "gelu_tanh"),
        ("embed_norm", cfg.embed_norm, True),
        ("bias", cfg.bias, True),
        ("n_kv_heads", cfg.kv_heads, cfg.n_heads),
        ("d_ff", cfg.ff_width, 4 * cfg.d_model),
        ("alibi_max_bias", cfg.alibi_max_bias, 8.0),
        ("qkv_clip", cfg.qkv_clip, None),
        ("attn_scale", cfg.attn_scale, None),
    ]
    bad = [f"{name}={value!r} (BLOOM: {expected!r})" for name, value, expected in wanted if value != expected]
    if cfg.position == "alibi":
        expected_slopes = alibi_slopes(cfg.n_heads)
        rule_slopes = mpt_alibi_slopes(cfg.n_heads) if cfg.slope_rule == "mpt" else expected_slopes
        if not torch.equal(rule_slopes, expected_slopes):
            bad.append(f"slope_rule={cfg.slope_rule!r} (BLOOM: 'paper' for {cfg.n_heads} heads)")
        elif cfg.alibi_max_bias == 8.0:
            slopes = model.position.slopes.detach().float().cpu()
            if not torch.allclose(slopes, expected_slopes, rtol=1e-6, atol=0.0):
                bad.append("trainable_slopes=True and the slopes moved (BLOOM's slopes are fixed)")
    return bad


def _bloom_config_json(cfg: ModelConfig, train_len: int | None, eos_id: int | None, dtype: torch.dtype) -> dict:
    config = {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "apply_residual_connection_post_layernorm": False,
        # an inference export: dropout is a training choice and BLOOM places it differently
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if train_len is not None:
        # Megatron-DeepSpeed's name for the training length; BloomConfig keeps unknown keys
        config["seq_length"] = train_len
    return config


def _bloom_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our state-dict name, BLOOM's name) for every tensor but the slopes and the tied head."""
    names = [("embed.weight", "transformer.word_embeddings.weight")]
    params = ("weight", "bias")
    names += [(f"embed_norm.{p}", f"transformer.word_embeddings_layernorm.{p}") for p in params]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm_attn", "input_layernorm"), ("attn.qkv", "self_attention.query_key_value"),
                     ("attn.proj", "self_attention.dense"), ("norm_mlp", "post_attention_layernorm"),
                     ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")):
            names += [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for p in params]
    names += [(f"norm.{p}", f"transformer.ln_f.{p}") for p in params]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    return names


def _qkv_to_bloom(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    rest = t.shape[1:]
    # (3, H, D, ...) -> (H, 3, D, ...): BLOOM reads its fused output as (heads, q/k/v, head_dim)
    return t.reshape(3, n_heads, head_dim, *rest).transpose(0, 1).reshape(3 * n_heads * head_dim, *rest)


def _qkv_from_bloom(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    rest = t.shape[1:]
    return t.reshape(n_heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * n_heads * head_dim, *rest)


def bloom_state_dict(model: TransformerLM) -> dict[str, Tensor]:
    """The model's weights under BLOOM's names and layout (contiguous CPU copies)."""
    cfg = model.cfg
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for mine, theirs in _bloom_names(cfg):
        t = ours[mine].detach().cpu()
        if mine.endswith("attn.qkv.weight") or mine.endswith("attn.qkv.bias"):
            t = _qkv_to_bloom(t, cfg.n_heads, cfg.head_dim)
        out[theirs] = t.contiguous().clone()
    return out


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a directory to export into")
    kind = _alibi_lm_kind(out_dir)
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
    _check_can_create(out_dir)


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


def _check_can_create(out: Path) -> None:
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


def _naming(error: OSError, out: Path) -> OSError:
    """`error` with the user's destination as its file name instead of an internal temporary path; the
    CLI prints an OSError as one line, its reason and file name. It stays an OSError for API callers."""
    return OSError(error.errno, error.strerror or str(error), str(out))


def _write_tokenizer(tokenizer: Any, directory: Path, model_max_length: int | None) -> dict:
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


def export_bloom(model: TransformerLM, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                 train_len: int | None = None, overwrite: bool = False) -> Path:
    """Write `out_dir` so that `BloomForCausalLM.from_pretrained(out_dir)` (and, with a tokenizer,
    `AutoTokenizer.from_pretrained(out_dir)`) load it offline and give the same logits.

    Raises UserError naming every config field BLOOM cannot express. The folder is assembled in a
    temporary sibling and renamed into place, so a failed export leaves nothing half-written."""
    from safetensors.torch import save_file

    bad = bloom_mismatches(model)
    if bad:
        raise UserError(f"BLOOM cannot express this model: {'; '.join(bad)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as error:
        raise _naming(error, out_dir) from None
    try:
        eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        config = _bloom_config_json(model.cfg, train_len, eos_id, model.embed.weight.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # transformers checks the "format" metadata before trusting a safetensors file
        save_file(bloom_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, train_len)
        replace_dir(tmp, out_dir)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(error, out_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# Import: reading a Hugging Face folder


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where there is none (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _alibi_lm_kind(directory: Path) -> str | None:
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


def _read_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; give a local Hugging Face model folder (config.json + weights)")
    kind = _alibi_lm_kind(hf_dir)
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


def _model_type(config: dict, hf_dir: Path) -> str:
    kind = str(config.get("model_type", "")).lower()
    architectures = config.get("architectures") or []
    architectures = [str(a) for a in architectures] if isinstance(architectures, list) else [str(architectures)]
    if kind in ("bloom", "mpt"):
        return kind
    if any(a.startswith("Bloom") for a in architectures):
        return "bloom"
    if any(a.startswith("Mpt") or a.startswith("MPT") for a in architectures):
        return "mpt"
    found = kind or ", ".join(architectures) or "unknown"
    raise UserError(f"{hf_dir} holds a {found!r} model; import handles BLOOM and MPT (ALiBi) checkpoints only")


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


class _Weights:
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


def _optional_int(config: dict, *names: str) -> int | None:
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


def _int(config: dict, *names: str, default: int | None = None) -> int:
    """`_optional_int`, falling back to `default`; with no default, a missing field is an error."""
    value = _optional_int(config, *names)
    if value is not None:
        return value
    if default is not None:
        return default
    raise UserError(f"config.json has no {' or '.join(names)}")


def _optional_float(section: dict, name: str, where: str = "") -> float | None:
    """`section[name]` as a positive finite number, None when unset (absent or null)."""
    value = section.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"config.json: {where}{name} must be a positive number, got {value!r}")
    return float(value)


def _float(section: dict, name: str, default: float, where: str = "") -> float:
    value = _optional_float(section, name, where)
    return default if value is None else value


def _bool(section: dict, name: str, default: bool, where: str = "") -> bool:
    """`section[name]` as a JSON boolean, `default` when unset; bool("false") would read as true."""
    value = section.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"config.json: {where}{name} must be true or false, got {value!r}")
    return value


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"config.json: {name} must be a JSON object, got {value!r}")
    return value


def _bloom_import(config: dict, weights: _Weights) -> tuple[ModelConfig, dict[str, Tensor], int, list[str]]:
    if _bool(config, "apply_residual_connection_post_layernorm", False):
        raise UserError("this BLOOM model sets apply_residual_connection_post_layernorm=true, which alibi-lm's "
                        "pre-LayerNorm blocks cannot express")
    d_model = _int(config, "hidden_size", "n_embed")
    n_heads = _int(config, "n_head", "num_attention_heads")
    n_layers = _int(config, "n_layer", "num_hidden_layers")
    norm_eps = _float(config, "layer_norm_epsilon", 1e-5)
    tied = _bool(config, "tie_word_embeddings", True)
    train_len = _optional_int(config, "seq_length")
    embed = weights.take("transformer.word_embeddings.weight")
    cfg = bloom_model_config(embed.shape[0], n_layers, d_model, n_heads, norm_eps=norm_eps, tie_embeddings=tied)
    cfg.validate()
    state: dict[str, Tensor] = {}
    for mine, theirs in _bloom_names(cfg):
        t = weights.take(theirs)
        if mine.endswith("attn.qkv.weight") or mine.endswith("attn.qkv.bias"):
            t = _qkv_from_bloom(t, cfg.n_heads, cfg.head_dim)
        state[mine] = t
    if tied and weights.has("lm_head.weight"):
        weights.take("lm_head.weight")  # a saved copy of the tied embedding; transformers ignores it too
    if train_len is not None:
        return cfg, state, train_len, []
    notes = [f"config.json names no training length; assuming {BLOOM_DEFAULT_TRAIN_LEN} (BLOOM's)"]
    return cfg, state, BLOOM_DEFAULT_TRAIN_LEN, notes


def _mpt_import(config: dict, weights: _Weights) -> tuple[ModelConfig, dict[str, Tensor], int, list[str]]:
    attn = _section(config, "attn_config")
    ffn = _section(config, "ffn_config")
    unsupported = []
    if not _bool(attn, "alibi", True, "attn_config."):
        unsupported.append("attn_config.alibi=false (learned positions, not ALiBi)")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
        unsupported.append(f"attn_config.attn_type={attn['attn_type']!r}")
    for flag in ("prefix_lm", "qk_ln", "qk_gn", "rope"):
        if attn.get(flag):
            unsupported.append(f"attn_config.{flag}=true")
    if ffn.get("ffn_type", "mptmlp") != "mptmlp":
        unsupported.append(f"ffn_config.ffn_type={ffn['ffn_type']!r}")
    if config.get("logit_scale") not in (None, 1, 1.0):
        unsupported.append(f"logit_scale={config['logit_scale']!r}")
    if "rms" in str(config.get("norm_type", "")):
        unsupported.append(f"norm_type={config['norm_type']!r}")
    if weights.has("transformer.wpe.weight"):
        unsupported.append("learned position embeddings (transformer.wpe)")
    if unsupported:
        raise UserError(f"alibi-lm cannot express this MPT model: {'; '.join(unsupported)}")
    d_model = _int(config, "d_model", "hidden_size")
    n_heads = _int(config, "n_heads", "num_attention_heads")
    n_layers = _int(config, "n_layers", "num_hidden_layers")
    train_len = _int(config, "max_seq_len", default=2048)
    bias = not _bool(config, "no_bias", True)
    tied = _bool(config, "tie_word_embeddings", True)
    norm_eps = _float(config, "layer_norm_epsilon", 1e-5)
    max_bias = _float(attn, "alibi_bias_max", 8.0, "attn_config.")
    # MPT's clip_qkv of 0 means "no clipping", as null does
    qkv_clip = None if attn.get("clip_qkv") == 0 else _optional_float(attn, "clip_qkv", "attn_config.")
    attn_scale = _optional_float(attn, "softmax_scale", "attn_config.")
    embed = weights.take("transformer.wte.weight")
    up = weights.take("transformer.blocks.0.ffn.up_proj.weight")
    cfg = ModelConfig(
        vocab_size=embed.shape[0], n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=up.shape[0],
        position="alibi", norm="layernorm", activation="gelu", bias=bias, embed_norm=False,
        norm_eps=norm_eps, tie_embeddings=tied, slope_rule="mpt",
        alibi_max_bias=max_bias, qkv_clip=qkv_clip, attn_scale=attn_scale,
    )
    cfg.validate()
    params = ("weight", "bias") if bias else ("weight",)
    pairs = [("embed.weight", "transformer.wte.weight")]
    for i in range(n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.blocks.{i}."
        for a, b in (("norm_attn", "norm_1"), ("attn.qkv", "attn.Wqkv"), ("attn.proj", "attn.out_proj"),
                     ("norm_mlp", "norm_2"), ("mlp.up", "ffn.up_proj"), ("mlp.down", "ffn.down_proj")):
            pairs += [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for p in params]
    pairs += [(f"norm.{p}", f"transformer.norm_f.{p}") for p in params]
    if not tied:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    state = {mine: weights.take(theirs) for mine, theirs in pairs}
    if tied and weights.has("lm_head.weight"):
        weights.take("lm_head.weight")
    notes = []
    if max_bias != 8:
        notes.append(f"alibi_bias_max={max_bias:g} is kept as MosaicML's code uses it; transformers' "
                     "MptForCausalLM ignores it (always 8), so its logits differ from ours for this model")
    if bias:
        notes.append("no_bias=false: biases are kept; transformers' MptForCausalLM drops them")
    return cfg, state, train_len, notes


def import_hf(hf_dir: str | os.PathLike) -> tuple[TransformerLM, Any, dict]:
    """A local BloomForCausalLM or MptForCausalLM folder as (model, tokenizer or None, info).

    info: {"architecture": "bloom"|"mpt", "train_len": int, "source": str, "notes": [str]}. The
    model is float32 and in eval mode; its logits equal transformers' for the same weights."""
    hf_dir = Path(hf_dir)
    config = _read_config(hf_dir)
    kind = _model_type(config, hf_dir)
    weights = _Weights(load_hf_weights(hf_dir), hf_dir, "transformer.")
    convert = _bloom_import if kind == "bloom" else _mpt_import
    cfg, state, train_len, notes = convert(config, weights)
    leftover = weights.unused()
    if leftover:
        raise UserError(f"{hf_dir} has {len(leftover)} tensors that a {kind.upper()} model of this config does not "
                        f"use (e.g. {leftover[0]!r}); config.json does not match the weights")
    model = TransformerLM(cfg)
    state["position.slopes"] = model.position.slopes.detach().clone()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        line = next((s.strip() for s in str(error).splitlines() if "size mismatch" in s), str(error).splitlines()[0])
        raise UserError(f"the weights in {hf_dir} do not fit its config.json: {line}") from None
    model.eval()
    tokenizer, tok_note = _import_tokenizer(hf_dir, config.get("eos_token_id"))
    if tok_note:
        notes.append(tok_note)
    info = {"architecture": kind, "train_len": train_len, "source": str(hf_dir.resolve()), "notes": notes}
    return model, tokenizer, info


def _import_tokenizer(hf_dir: Path, eos_id: Any) -> tuple[Any, str | None]:
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


def import_checkpoint(hf_dir: str | os.PathLike, out_checkpoint: str | os.PathLike) -> tuple[Path, dict]:
    """`import_hf`, saved as an alibi-lm checkpoint (model, meta.json, tokenizer when readable)."""
    out = Path(out_checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new checkpoint directory")
    _check_can_create(out)  # before the (long) conversion, not after it
    model, tokenizer, info = import_hf(hf_dir)
    from alibi_lm.checkpoint import save_model_checkpoint

    extra = {"imported_from": {"architecture": info["architecture"], "source": info["source"],
                               "notes": info["notes"]}}
    try:
        path = save_model_checkpoint(out, model, train_len=info["train_len"], tokenizer=tokenizer, extra_meta=extra)
    except OSError as error:
        raise _naming(error, out) from None
    return Path(path), info


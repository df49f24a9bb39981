"""Training configuration: TOML -> typed dataclasses, with `--set section.key=value` overrides.

A TOML file states only what differs from the defaults below; sections are [model] (the
`ModelConfig` of model_config.py), [data], [optim], [schedule] and [run]. An unknown section or key is a
UserError that names the closest valid one; a value of the wrong type names the field and its type.
Presets ship as package data in `alibi_lm/configs/` (`--config tiny` works from any directory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alibi_lm.errors import UserError, closest_match_hint
from alibi_lm.model_config import ModelConfig

if typing.TYPE_CHECKING:
    from collections.abc import Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["DataConfig", "OptimConfig", "RunConfig", "ScheduleConfig", "TrainConfig", "convert_value", "load_config",
           "presets"]


@dataclass
class DataConfig:
    #: prepared directory (`alibi-lm prepare ... -o PATH`); relative paths are from the working directory
    path: str = ""
    #: when `path` has no meta.json yet, prepare it from this source first (e.g. "embedded", "wikitext-2")
    source: str = ""
    #: tokenizer for that automatic prepare: bytes | bpe | word
    tokenizer: str = "bytes"
    #: bpe vocabulary size for that automatic prepare
    vocab_size: int = 8192
    #: training window length L (tokens per sequence)
    train_len: int = 256
    #: sequences per micro-batch on each rank
    batch_size: int = 8
    #: micro-batches per optimizer step (tokens per step = world * batch_size * grad_accum * train_len)
    grad_accum: int = 1
    #: random (uniform window starts, seeded by step) | sequential (consecutive windows)
    windows: str = "random"
    #: validation window length; 0 means train_len
    valid_len: int = 0
    #: split used for validation
    valid_split: str = "valid"
    #: cap on validation tokens per evaluation (0: the whole split)
    valid_tokens: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    #: decoupled weight decay (AdamW), applied to matrices and embeddings, not to biases and norms
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    #: clip the global gradient norm to this (0: no clipping)
    grad_clip: float = 1.0
    #: fused AdamW kernel (CUDA only; ignored on the CPU)
    fused: bool = True


@dataclass
class ScheduleConfig:
    #: cosine | linear | constant, after the warmup
    kind: str = "cosine"
    #: linear warmup from 0 over this many steps
    warmup_steps: int = 100
    #: the learning rate at the last step, as a fraction of optim.lr
    min_lr_ratio: float = 0.1


@dataclass
class RunConfig:
    #: run directory: config.json, metrics.jsonl, checkpoints/step_XXXXXXXX/
    out_dir: str = "runs/run"
    #: optimizer steps
    steps: int = 1000
    #: validate every N steps (0: only at the end)
    eval_every: int = 200
    #: checkpoint every N steps (0: only at the end)
    checkpoint_every: int = 500
    #: keep the newest K step checkpoints (while training one more, until the newest has given a finite loss)
    keep_last: int = 3
    #: stop after this many validations without a new best loss (0: never; "until it stops improving")
    patience: int = 0
    #: smallest drop in validation loss that counts as an improvement
    min_delta: float = 0.0
    #: write a model checkpoint of the best validation loss to <out_dir>/best
    keep_best: bool = True
    seed: int = 0
    #: auto (CUDA if present) | cpu | cuda | cuda:N
    device: str = "auto"
    #: auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    precision: str = "auto"
    #: torch.compile the model
    compile: bool = False
    #: torch.compile mode: default | reduce-overhead (CUDA graphs: a step stops waiting on Python's
    #: kernel launches, which bind small models; one process only) | max-autotune |
    #: max-autotune-no-cudagraphs
    compile_mode: str = "default"
    #: ddp | fsdp (FSDP2 fully_shard per block; GPU-oriented, for models that do not fit one GPU)
    parallel: str = "ddp"
    #: write a metrics line every N steps
    log_every: int = 10
    #: accelerator peak FLOP/s for MFU; 0 = guess from the device name (H100/H200 bf16 dense: 989e12)
    peak_flops: float = 0.0
    #: start a new run from the weights of this checkpoint (or run directory, or `alibi-lm import`ed
    #: BLOOM/MPT): a new optimizer and this run's own schedule, e.g. to fine-tune at a longer data.train_len
    init_from: str = ""
    #: also write the metrics as TensorBoard scalars into <out_dir>/tensorboard (pip install "alibi-lm[tensorboard]")
    tensorboard: bool = False


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes under which torch.compile captures CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        cfg = cls()
        for section, entries in values.items():
            if section not in SECTIONS:
                raise UserError(f"unknown config section [{section}]{closest_match_hint(section, SECTIONS)}; "
                                f"valid: {', '.join(SECTIONS)}")
            if not isinstance(entries, dict):
                raise UserError(f"config section [{section}] must be a table of keys")
            target = getattr(cfg, section)
            for key, value in entries.items():
                _set_field(target, section, key, value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.model.validate()
        positive = {"data.train_len": self.data.train_len, "data.batch_size": self.data.batch_size,
                    "data.grad_accum": self.data.grad_accum, "run.steps": self.run.steps,
                    "run.keep_last": self.run.keep_last, "run.log_every": self.run.log_every}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        for name, value in {"data.valid_len": self.data.valid_len, "data.valid_tokens": self.data.valid_tokens,
                            "run.eval_every": self.run.eval_every, "run.checkpoint_every": self.run.checkpoint_every,
                            "run.patience": self.run.patience, "schedule.warmup_steps": self.schedule.warmup_steps,
                            "run.seed": self.run.seed}.items():
            if value < 0:
                raise UserError(f"{name} must be zero or positive, got {value}")
        choices = {"data.windows": (self.data.windows, ("random", "sequential")),
                   "data.tokenizer": (self.data.tokenizer, ("bytes", "bpe", "word")),
                   "schedule.kind": (self.schedule.kind, ("cosine", "linear", "constant")),
                   "run.precision": (self.run.precision, ("auto", "bf16", "fp32")),
                   "run.parallel": (self.run.parallel, ("ddp", "fsdp")),
                   "run.compile_mode": (self.run.compile_mode, COMPILE_MODES)}
        for name, (value, valid) in choices.items():
            if value not in valid:
                raise UserError(f"unknown {name} {value!r}{closest_match_hint(value, valid)}; "
                                f"valid: {', '.join(valid)}")
        if not 0 < self.optim.lr < math.inf:
            raise UserError(f"optim.lr must be a positive finite number, got {self.optim.lr}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise UserError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}")
        for name, value in {"optim.grad_clip": self.optim.grad_clip, "optim.weight_decay": self.optim.weight_decay,
                            "run.min_delta": self.run.min_delta}.items():
            if not 0 <= value < math.inf:
                raise UserError(f"{name} must be zero or a positive finite number, got {value}")
        for name, value in {"optim.beta1": self.optim.beta1, "optim.beta2": self.optim.beta2}.items():
            if not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1), got {value}")
        if not 0 < self.optim.eps < math.inf:
            raise UserError(f"optim.eps must be a positive finite number, got {self.optim.eps}")
        if self.run.seed >= 2**63:
            raise UserError(f"run.seed must be below 2**63, got {self.run.seed}")
        if not self.run.out_dir.strip():
            raise UserError("run.out_dir is empty; give the run a directory of its own (e.g. runs/my-run)")

    @property
    def valid_len(self) -> int:
        return self.data.valid_len or self.data.train_len


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_value(value: Any, annotation: Any, name: str, *, parse_strings: bool = True) -> Any:
    """`value` as the type `annotation` names (bool, int, float, str, or one of them | None), or a
    UserError "`name` must be <type>, got <value>". A string is parsed as a number, a bool or None
    (TOML values and `--set` text); with `parse_strings=False`, for JSON, whose values are typed, a
    string where a number or bool belongs is refused, as "false" for a bool is a mistake there."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        is_none_text = parse_strings and isinstance(value, str) and value.lower() in ("none", "null")
        if value is None or is_none_text:
            return None
        return convert_value(value, options[0], name, parse_strings=parse_strings)
    text = value if parse_strings and isinstance(value, str) else None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text.lower() in ("true", "1", "yes", "on")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value
    kind = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"{name} must be {kind}, got {value!r}")


#: what other training code (nanoGPT, litgpt, transformers, fairseq) calls some of our keys, for the
#: "did you mean" of an unknown key
KEY_ALIASES = {
    "model": {"n_layer": "n_layers", "num_layers": "n_layers", "n_head": "n_heads", "num_heads": "n_heads",
              "num_attention_heads": "n_heads", "n_embd": "d_model", "hidden_size": "d_model",
              "intermediate_size": "d_ff", "ffn_dim": "d_ff", "num_key_value_heads": "n_kv_heads",
              "positional_encoding": "position", "pos_emb": "position"},
    "data": {"block_size": "train_len", "seq_len": "train_len", "context_length": "train_len",
             "tokens_per_sample": "train_len", "gradient_accumulation_steps": "grad_accum", "dataset": "path"},
    "optim": {"learning_rate": "lr", "max_lr": "lr", "wd": "weight_decay", "clip_grad": "grad_clip",
              "max_grad_norm": "grad_clip", "clip_norm": "grad_clip", "adam_eps": "eps"},
    "schedule": {"warmup_iters": "warmup_steps", "warmup_updates": "warmup_steps", "lr_scheduler": "kind",
                 "min_lr": "min_lr_ratio"},
    "run": {"max_iters": "steps", "max_steps": "steps", "max_update": "steps", "output_dir": "out_dir",
            "eval_interval": "eval_every", "save_interval": "checkpoint_every", "log_interval": "log_every",
            "dtype": "precision"},
}


def _set_field(target: Any, section: str, key: str, value: Any) -> None:
    types_ = _field_types(type(target))
    if key not in types_:
        hint = closest_match_hint(key, types_, KEY_ALIASES.get(section))
        if not hint:  # nothing close: the section is short enough to list
            hint = f"; [{section}] has {', '.join(types_)}"
        raise UserError(f"unknown config key {section}.{key}{hint}")
    setattr(target, key, convert_value(value, types_[key], f"{section}.{key}"))


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("alibi_lm").joinpath("configs").iterdir()
                  if p.name.endswith(".toml"))


def _read_toml(path_or_preset: str) -> tuple[dict, str]:
    path = Path(path_or_preset)
    if path.is_file():
        text, origin = path.read_bytes(), str(path)
    else:
        name = path.name[:-5] if path.name.endswith(".toml") else path.name
        if name not in presets() or (path.parent != Path(".") and not str(path.parent).endswith("configs")):
            if path.is_dir():
                raise UserError(f"{path} is a directory; --config takes a TOML file, a run's config.json or a "
                                f"preset: {', '.join(presets())}")
            raise UserError(f"config not found: {path_or_preset}{closest_match_hint(name, presets())}; "
                            f"give a TOML file or a preset: {', '.join(presets())}")
        text = resources.files("alibi_lm").joinpath("configs", f"{name}.toml").read_bytes()
        origin = f"preset {name}"
    if path.suffix == ".json":
        # a run's config.json (what train writes into its run directory, and what a resume must match)
        try:
            values = json.loads(text.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{origin} is not valid JSON: {error}") from None
        if not isinstance(values, dict) or not {"model", "data"} <= values.keys():
            raise UserError(f"{origin} is not a run's config.json (no model and data sections)")
        values.pop("world_size", None)
        return values, origin
    try:
        return tomllib.loads(text.decode("utf-8")), origin
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{origin} is not valid TOML: {error}") from None


def parse_override(override: str) -> tuple[str, str, str]:
    if "=" not in override:
        raise UserError(f"--set needs section.key=value, got {override!r}")
    key, value = override.split("=", 1)
    if "." not in key:
        raise UserError(f"--set needs section.key=value (e.g. model.position=alibi), got {override!r}")
    section, name = key.strip().split(".", 1)
    if section not in SECTIONS:
        raise UserError(f"unknown config section {section!r} in --set{closest_match_hint(section, SECTIONS)}; "
                        f"valid: {', '.join(SECTIONS)}")
    return section, name.strip(), value.strip()


def load_config(path_or_preset: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML file (or a preset by name: tiny, small, wt103-paper, cc100-1.3b), apply
    `section.key=value` overrides (typed by the field) and validate."""
    values, _ = _read_toml(path_or_preset)
    for override in overrides:
        section, key, value = parse_override(override)
        values.setdefault(section, {})[key] = value
    return TrainConfig.from_dict(values)


def to_toml(config: TrainConfig) -> str:
    """The config as a TOML file that load_config reads back to the same config; unset (None) fields,
    which TOML cannot write, are listed as comments."""
    lines: list[str] = []
    for section, entries in config.to_dict().items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in entries.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f"{key} = {json.dumps(value)}")
            else:
                lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"

"""BLOOM both ways: the config map (a ModelConfig BLOOM can express, and what it cannot), the
state-dict adapter (BLOOM's names and its per-head fused query_key_value), `export_bloom`, and the
conversion of a BLOOM config.json + weights that `import_hf` runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from alibi_lm.errors import UserError
from alibi_lm.hf.folder import (
    Weights,
    check_export_dir,
    config_value,
    write_export,
    write_json_file,
    write_tokenizer,
)
from alibi_lm.model import TransformerLM
from alibi_lm.model_config import ModelConfig
from alibi_lm.positions import alibi_slopes, mpt_alibi_slopes

__all__ = ["BLOOM_DEFAULT_TRAIN_LEN", "bloom_mismatches", "bloom_model_config", "bloom_state_dict", "export_bloom",
           "from_bloom"]

#: the training length BLOOM's models used; assumed when an imported BLOOM config.json names none
BLOOM_DEFAULT_TRAIN_LEN = 2048


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


def export_bloom(model: TransformerLM, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                 train_len: int | None = None, overwrite: bool = False) -> Path:
    """Write `out_dir` so that `BloomForCausalLM.from_pretrained(out_dir)` (and, with a tokenizer,
    `AutoTokenizer.from_pretrained(out_dir)`) load it offline and give the same logits.

    Raises UserError naming every config field BLOOM cannot express. The folder is assembled in a
    temporary sibling and renamed into place, so a failed export leaves nothing half-written."""
    bad = bloom_mismatches(model)
    if bad:
        raise UserError(f"BLOOM cannot express this model: {'; '.join(bad)}")
    out_dir = Path(out_dir)
    check_export_dir(out_dir, overwrite, "bloom")
    config = _bloom_config_json(model.cfg, train_len, getattr(tokenizer, "eos_id", None), model.embed.weight.dtype)

    def fill(folder: Path) -> None:
        write_json_file(folder / "config.json", config)
        # transformers checks the "format" metadata before trusting a safetensors file
        safetensors.torch.save_file(bloom_state_dict(model), str(folder / "model.safetensors"),
                                    metadata={"format": "pt"})
        if tokenizer is not None:
            write_tokenizer(tokenizer, folder, train_len)

    return write_export(out_dir, fill)


def from_bloom(config: dict, weights: Weights) -> tuple[ModelConfig, dict[str, Tensor], int, list[str]]:
    """A BLOOM config.json and its weights as (our config, our state dict, training length, notes)."""
    if config_value(config, "apply_residual_connection_post_layernorm", bool, False):
        raise UserError("this BLOOM model sets apply_residual_connection_post_layernorm=true, which alibi-lm's "
                        "pre-LayerNorm blocks cannot express")
    d_model = config_value(config, ("hidden_size", "n_embed"), int)
    n_heads = config_value(config, ("n_head", "num_attention_heads"), int)
    n_layers = config_value(config, ("n_layer", "num_hidden_layers"), int)
    norm_eps = config_value(config, "layer_norm_epsilon", float, 1e-5)
    tied = config_value(config, "tie_word_embeddings", bool, True)
    train_len = config_value(config, "seq_length", int, None)
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

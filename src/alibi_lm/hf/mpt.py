"""MPT import: the conversion of an MPT (ALiBi, multi-head) config.json + weights that `import_hf`
runs. MPT's Wqkv is already `[all q, all k, all v]`, as ours; its slope construction is our
`slope_rule="mpt"` and its `alibi_bias_max` our `alibi_max_bias`. What alibi-lm cannot express
(QK layer norm, prefix LM, logit scale, grouped-query attention, learned positions) is refused."""

from __future__ import annotations

from torch import Tensor

from alibi_lm.errors import UserError
from alibi_lm.hf.folder import Weights, config_value, section
from alibi_lm.model_config import ModelConfig

__all__ = ["from_mpt"]

#: (our module, MPT's) in every block; MPT's Wqkv has our [all q, all k, all v] layout already
_BLOCK_NAMES = (("norm_attn", "norm_1"), ("attn.qkv", "attn.Wqkv"), ("attn.proj", "attn.out_proj"),
                ("norm_mlp", "norm_2"), ("mlp.up", "ffn.up_proj"), ("mlp.down", "ffn.down_proj"))


def from_mpt(config: dict, weights: Weights) -> tuple[ModelConfig, dict[str, Tensor], int, list[str]]:
    """An MPT config.json and its weights as (our config, our state dict, training length, notes)."""
    attn = section(config, "attn_config")
    unsupported = _unsupported(config, attn, section(config, "ffn_config"), weights)
    if unsupported:
        raise UserError(f"alibi-lm cannot express this MPT model: {'; '.join(unsupported)}")
    train_len = config_value(config, "max_seq_len", int, 2048)
    cfg = _mpt_model_config(config, attn, weights)
    state = {mine: weights.take(theirs) for mine, theirs in _mpt_names(cfg)}
    if cfg.tie_embeddings and weights.has("lm_head.weight"):
        weights.take("lm_head.weight")  # a saved copy of the tied embedding; transformers ignores it too
    notes = []
    if cfg.alibi_max_bias != 8:
        notes.append(f"alibi_bias_max={cfg.alibi_max_bias:g} is kept as MosaicML's code uses it; transformers' "
                     "MptForCausalLM ignores it (always 8), so its logits differ from ours for this model")
    if cfg.bias:
        notes.append("no_bias=false: biases are kept; transformers' MptForCausalLM drops them")
    return cfg, state, train_len, notes


def _unsupported(config: dict, attn: dict, ffn: dict, weights: Weights) -> list[str]:
    """Every MPT option set in `config` that alibi-lm cannot express, as 'field=value'."""
    unsupported = []
    if not config_value(attn, "alibi", bool, True, where="attn_config."):
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
    return unsupported


def _mpt_model_config(config: dict, attn: dict, weights: Weights) -> ModelConfig:
    """Our ModelConfig for an MPT config.json; the vocabulary and MLP width come from the tensors."""
    where = "attn_config."
    d_model = config_value(config, ("d_model", "hidden_size"), int)
    n_heads = config_value(config, ("n_heads", "num_attention_heads"), int)
    n_layers = config_value(config, ("n_layers", "num_hidden_layers"), int)
    bias = not config_value(config, "no_bias", bool, True)
    tied = config_value(config, "tie_word_embeddings", bool, True)
    norm_eps = config_value(config, "layer_norm_epsilon", float, 1e-5)
    max_bias = config_value(attn, "alibi_bias_max", float, 8.0, where=where)
    # MPT's clip_qkv of 0 means "no clipping", as null does
    qkv_clip = None if attn.get("clip_qkv") == 0 else config_value(attn, "clip_qkv", float, None, where=where)
    attn_scale = config_value(attn, "softmax_scale", float, None, where=where)
    vocab_size = weights.take("transformer.wte.weight").shape[0]
    d_ff = weights.take("transformer.blocks.0.ffn.up_proj.weight").shape[0]
    cfg = ModelConfig(
        vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=d_ff,
        position="alibi", norm="layernorm", activation="gelu", bias=bias, embed_norm=False,
        norm_eps=norm_eps, tie_embeddings=tied, slope_rule="mpt",
        alibi_max_bias=max_bias, qkv_clip=qkv_clip, attn_scale=attn_scale,
    )
    cfg.validate()
    return cfg


def _mpt_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our state-dict name, MPT's name) for every tensor but the slopes and the tied head."""
    params = ("weight", "bias") if cfg.bias else ("weight",)
    names = [("embed.weight", "transformer.wte.weight")]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.blocks.{i}."
        for a, b in _BLOCK_NAMES:
            names += [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for p in params]
    names += [(f"norm.{p}", f"transformer.norm_f.{p}") for p in params]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    return names

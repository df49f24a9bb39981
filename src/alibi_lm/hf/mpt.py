"""MPT import: the conversion of an MPT (ALiBi, multi-head) config.json + weights that `import_hf`
runs. MPT's Wqkv is already `[all q, all k, all v]`, as ours; its slope construction is our
`slope_rule="mpt"` and its `alibi_bias_max` our `alibi_max_bias`. What alibi-lm cannot express
(QK layer norm, prefix LM, logit scale, grouped-query attention, learned positions) is refused."""

from __future__ import annotations

from torch import Tensor

from alibi_lm.errors import UserError
from alibi_lm.hf.folder import Weights, bool_field, float_field, int_field, optional_float, section
from alibi_lm.model_config import ModelConfig

__all__ = ["from_mpt"]


def from_mpt(config: dict, weights: Weights) -> tuple[ModelConfig, dict[str, Tensor], int, list[str]]:
    attn = section(config, "attn_config")
    ffn = section(config, "ffn_config")
    unsupported = []
    if not bool_field(attn, "alibi", True, "attn_config."):
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
    d_model = int_field(config, "d_model", "hidden_size")
    n_heads = int_field(config, "n_heads", "num_attention_heads")
    n_layers = int_field(config, "n_layers", "num_hidden_layers")
    train_len = int_field(config, "max_seq_len", default=2048)
    bias = not bool_field(config, "no_bias", True)
    tied = bool_field(config, "tie_word_embeddings", True)
    norm_eps = float_field(config, "layer_norm_epsilon", 1e-5)
    max_bias = float_field(attn, "alibi_bias_max", 8.0, "attn_config.")
    # MPT's clip_qkv of 0 means "no clipping", as null does
    qkv_clip = None if attn.get("clip_qkv") == 0 else optional_float(attn, "clip_qkv", "attn_config.")
    attn_scale = optional_float(attn, "softmax_scale", "attn_config.")
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

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
LM, no logit scale, no grouped-query attention). Imported models are float32. What transformers'
own MptForCausalLM does differently (it ignores `alibi_bias_max` and MPT's biases) comes back as a
note in `import_hf`'s info, which `alibi-lm import` prints on stderr.

Modules: `bloom` (config map, state-dict adapter, `export_bloom`, the BLOOM side of import), `mpt`
(the MPT side of import), `folder` (the files: config.json and its typed fields, the weights, the
tokenizer files, the export folder written atomically), `importer` (`import_hf`, `import_checkpoint`).
"""

from alibi_lm.hf.bloom import (
    BLOOM_DEFAULT_TRAIN_LEN,
    bloom_mismatches,
    bloom_model_config,
    bloom_state_dict,
    export_bloom,
)
from alibi_lm.hf.folder import load_hf_weights
from alibi_lm.hf.importer import import_checkpoint, import_hf

__all__ = [
    "BLOOM_DEFAULT_TRAIN_LEN",
    "bloom_mismatches",
    "bloom_model_config",
    "bloom_state_dict",
    "export_bloom",
    "import_checkpoint",
    "import_hf",
    "load_hf_weights",
]

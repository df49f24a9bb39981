"""`import_hf` and `import_checkpoint`: a local Hugging Face folder, whichever supported family it
holds, read (folder.py), converted (bloom.py or mpt.py) and loaded into a TransformerLM, then
optionally saved as an alibi-lm checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alibi_lm.checkpoint import save_model_checkpoint
from alibi_lm.errors import UserError
from alibi_lm.files import writable_parent
from alibi_lm.hf.bloom import from_bloom
from alibi_lm.hf.folder import Weights, import_tokenizer, load_hf_weights, naming, read_config
from alibi_lm.hf.mpt import from_mpt
from alibi_lm.model import TransformerLM

__all__ = ["import_checkpoint", "import_hf"]

#: each family's converter: (config.json, its weights) -> (our config, our state dict, training length, notes)
CONVERTERS = {"bloom": from_bloom, "mpt": from_mpt}


def _model_type(config: dict, hf_dir: Path) -> str:
    """"bloom" or "mpt", from config.json's model_type or, where an old upload lacks it, its architectures."""
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


def import_hf(hf_dir: str | os.PathLike) -> tuple[TransformerLM, Any, dict]:
    """A local BloomForCausalLM or MptForCausalLM folder as (model, tokenizer or None, info).

    info: {"architecture": "bloom"|"mpt", "train_len": int, "source": str, "notes": [str]}. The
    model is float32 and in eval mode; its logits equal transformers' for the same weights."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    kind = _model_type(config, hf_dir)
    weights = Weights(load_hf_weights(hf_dir), hf_dir, "transformer.")
    cfg, state, train_len, notes = CONVERTERS[kind](config, weights)
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
    tokenizer, tok_note = import_tokenizer(hf_dir, config.get("eos_token_id"))
    if tok_note:
        notes.append(tok_note)
    info = {"architecture": kind, "train_len": train_len, "source": str(hf_dir.resolve()), "notes": notes}
    return model, tokenizer, info


def import_checkpoint(hf_dir: str | os.PathLike, out_checkpoint: str | os.PathLike) -> tuple[Path, dict]:
    """`import_hf`, saved as an alibi-lm checkpoint (model, meta.json, tokenizer when readable)."""
    out = Path(out_checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new checkpoint directory")
    # before the (long) conversion, and naming `out`, not the temporary folder the checkpoint is written in
    writable_parent(out)
    model, tokenizer, info = import_hf(hf_dir)
    extra = {"imported_from": {"architecture": info["architecture"], "source": info["source"],
                               "notes": info["notes"]}}
    try:
        path = save_model_checkpoint(out, model, train_len=info["train_len"], tokenizer=tokenizer, extra_meta=extra)
    except OSError as error:
        raise naming(error, out) from None
    return Path(path), info

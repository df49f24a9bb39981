"""`alibi-lm export`: a checkpoint as a Hugging Face BLOOM folder that transformers loads offline."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a checkpoint as a Hugging Face BLOOM model folder (config, safetensors, tokenizer)"
ORDER = 70
DESCRIPTION = """\
Write CHECKPOINT (a checkpoint directory, or a run directory for its latest checkpoint) as OUT_DIR,
a folder that transformers loads offline with the same logits:

  alibi-lm export runs/bloomish out/bloomish --format bloom
  python -c "from transformers import AutoTokenizer, BloomForCausalLM; \\
             BloomForCausalLM.from_pretrained('out/bloomish'); AutoTokenizer.from_pretrained('out/bloomish')"

OUT_DIR gets config.json, model.safetensors (BLOOM's names and fused per-head query_key_value
layout) and, when the checkpoint has a tokenizer, tokenizer.json + tokenizer_config.json.
The model must be one BLOOM can express: ALiBi with the paper's slopes, layernorm with biases, a
layer norm after the embeddings (model.embed_norm=true), gelu_tanh, d_ff = 4 * d_model, no GQA.
Anything else is refused with one line that lists every mismatching model field.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
    parser.add_argument("--format", choices=["bloom"], default="bloom",
                        help="target architecture in transformers (default: bloom)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.errors import UserError
    from alibi_lm.hf import export_bloom

    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.path.resolve().is_relative_to(Path(args.out_dir).resolve()):
        raise UserError(f"{args.out_dir} holds the checkpoint being exported; export into a new directory "
                        "(it is never replaced)")
    out = export_bloom(checkpoint.model, args.out_dir, tokenizer=checkpoint.tokenizer,
                       train_len=checkpoint.train_len, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in checkpoint.model.parameters())
    tokenizer = "with tokenizer" if checkpoint.tokenizer is not None else "no tokenizer in the checkpoint"
    print(f"wrote {out} (BLOOM, {n_params / 1e6:.2f}M parameters, {tokenizer}); "
          f"load it with transformers.BloomForCausalLM.from_pretrained({str(out)!r})")
    return 0

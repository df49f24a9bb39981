"""`alibi-lm import`: a local Hugging Face BLOOM or MPT folder as an alibi-lm checkpoint."""

from __future__ import annotations

import argparse
import sys

NAME = "import"
HELP = "turn a local Hugging Face BLOOM or MPT folder into an alibi-lm checkpoint"
ORDER = 80
DESCRIPTION = """\
Read HF_DIR (config.json + model.safetensors, sharded safetensors or pytorch_model.bin, and
tokenizer.json when present) of a BloomForCausalLM or MptForCausalLM and write OUT_CHECKPOINT,
an alibi-lm checkpoint whose logits equal transformers' for the same input. Then evaluate it for
extrapolation or generate with it:

  huggingface-cli download bigscience/bloom-560m --local-dir hf/bloom-560m   # once, online
  alibi-lm import hf/bloom-560m ckpt/bloom-560m
  alibi-lm evaluate ckpt/bloom-560m --data DATA_DIR --lengths 1024,2048,4096

DATA_DIR is a corpus prepared with the model's own tokenizer. MPT's alibi_bias_max and its slope
construction are kept in the model config (model.alibi_max_bias, model.slope_rule = "mpt"; the
construction gives the paper's slopes for every head count), so imported MPT models are exact too.
Nothing is downloaded: HF_DIR must be a local folder.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model folder (BLOOM or MPT)")
    parser.add_argument("out_checkpoint", metavar="OUT_CHECKPOINT", help="checkpoint directory to create")


def run(args: argparse.Namespace) -> int:
    from alibi_lm.hf import import_checkpoint

    path, info = import_checkpoint(args.hf_dir, args.out_checkpoint)
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)  # stdout holds the result line alone
    print(f"wrote {path} ({info['architecture'].upper()}, training length {info['train_len']}); "
          f"try: alibi-lm evaluate {path} --data DATA_DIR (a corpus prepared with its tokenizer)")
    return 0

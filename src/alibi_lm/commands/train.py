"""`alibi-lm train`: train a model from a TOML config, on one device or under torchrun."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train a model from a TOML config (one device, or DDP/FSDP under torchrun)"
ORDER = 30
DESCRIPTION = """\
Train a language model. --config is a TOML file or a preset (tiny, small, wt103-paper, cc100-1.3b,
demo, bloom-tiny, bloom-560m);
--set section.key=value overrides one field (sections: model, data, optim, schedule, run);
--print-config lists every key with its value.

The run directory (run.out_dir) gets config.json (the resolved config), metrics.jsonl (loss, lr,
tokens/s, MFU, validation loss and perplexity, word-level perplexity where the data has word counts)
and checkpoints/step_XXXXXXXX/ (the newest run.keep_last kept), plus best/ with the best validation
loss. --resume continues the newest checkpoint exactly (same losses as an unbroken run).

Examples:
  alibi-lm train --config tiny
  alibi-lm train --config small --set model.position=sinusoidal --set run.out_dir=runs/small-sin
  alibi-lm train --config small --set run.out_dir=runs/small-sin --resume
  torchrun --nproc_per_node=8 -m alibi_lm train --config cc100-1.3b --set data.path=data/cc100
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="TOML file or preset name (tiny, small, wt103-paper, cc100-1.3b, demo, bloom-tiny, "
                             "bloom-560m)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field, e.g. --set model.position=sinusoidal (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the newest checkpoint in run.out_dir")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, with --set applied) as TOML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from alibi_lm.config import load_config, to_toml
    from alibi_lm.train import train

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        valid = f", valid loss {result.final_valid_loss:.4f}" if result.final_valid_loss is not None else ""
        early = " (stopped early: validation stopped improving)" if result.stopped_early else ""
        print(f"trained {result.steps} steps{early}{valid}; {result.tokens_per_second:,.0f} tokens/s; "
              f"checkpoint {result.checkpoint}")
    return 0

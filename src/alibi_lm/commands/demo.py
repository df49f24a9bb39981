"""`alibi-lm demo`: train ALiBi and sinusoidal on the embedded corpus and show extrapolation."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "train tiny ALiBi and sinusoidal models on the embedded corpus and show extrapolation (no download)"
ORDER = 10
DESCRIPTION = """\
The paper's main result in about a minute on a 2-core CPU, with no download: trains the `demo` preset (a
2-layer byte-level model) on Python's own help texts twice, once with ALiBi and once with
sinusoidal position embeddings, at a training length of 64 bytes; evaluates both on the test
split at 64, 128, 256 and 512 bytes; prints the table, and writes the plot (extrapolation.png),
the results (eval-*.json, demo.json) and both checkpoints to the output folder.

Expected: ALiBi's perplexity at 8x stays at (or below) its 1x value; sinusoidal's climbs far
above its own. The demo says plainly whether that happened.

Examples:
  alibi-lm demo                    # into ./alibi-demo
  alibi-lm demo -o /tmp/demo --quick
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", default="alibi-demo", help="output folder (default: ./alibi-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="300 training steps instead of 800 (about half the time; weaker models)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from alibi_lm.demo import run_demo

    run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed, device=args.device,
             progress=not args.no_progress)
    return 0

"""`alibi-lm plot`: evaluation results -> perplexity-versus-length and loss-by-position figure."""

from __future__ import annotations

import argparse

NAME = "plot"
HELP = "plot perplexity vs evaluation length and loss by position from evaluation results"
ORDER = 50
DESCRIPTION = """\
Draw the paper's Figure 1 from one or more results files written by `alibi-lm evaluate -o`:
perplexity against evaluation length (log-2 axis, one line per run, sliding-window results
dashed, the training length dotted), and next to it the mean loss at each position of the longest
nonoverlapping window (the early token curse). Also prints the table. No display is needed.

Example:
  alibi-lm plot eval-alibi.json eval-sinusoidal.json -o extrapolation.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="results JSON files from `alibi-lm evaluate -o`")
    parser.add_argument("-o", "--out", required=True, help="image file to write (.png, .pdf, .svg)")
    parser.add_argument("--metric", default="ppl", choices=("ppl", "word_ppl"),
                        help="token-level (ppl, default) or word-level (word_ppl) perplexity")
    parser.add_argument("--title", default=None, help="title of the perplexity panel")
    parser.add_argument("--labels", default=None, help="comma-separated names for the runs, in order")


def run(args: argparse.Namespace) -> int:
    from alibi_lm.errors import UserError
    from alibi_lm.plots import check_image_path, load_results, plot_results, results_table

    check_image_path(args.out)
    results = load_results(args.results)
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(results):
            raise UserError(f"--labels names {len(labels)} runs but {len(results)} results files were given")
        for result, label in zip(results, labels):
            result["label"] = label
    print(results_table(results, metric=args.metric), end="")
    plot_results(results, args.out, metric=args.metric, title=args.title)
    print(f"wrote {args.out}")
    return 0

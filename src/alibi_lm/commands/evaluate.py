"""`alibi-lm evaluate`: perplexity of a checkpoint at several evaluation lengths."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "evaluate"
HELP = "perplexity at several evaluation lengths (nonoverlapping and sliding window)"
ORDER = 40
DESCRIPTION = """\
Perplexity of a checkpoint on a split of its prepared data at several evaluation lengths
(default: L, 2L, 4L, 8L, 16L of the training length L), as in the paper:

  nonoverlapping  the split is cut into consecutive windows of the evaluation length; each token
                  sees only the tokens before it in its window (the paper's main results)
  sliding         the model always reads a full window and scores its last --stride tokens;
                  stride 1 (the default) is exact and slow: every token gets the whole window as
                  context; a larger stride is an approximation that is stride times cheaper

Every length scores the same tokens (all but the first of the split, a trailing partial window
included), so the numbers are comparable. Word-level perplexity = exp(total NLL / words of the
split, one per line included), the paper's WikiText convention; with a word tokenizer it is the
token perplexity. The results (with the mean loss at each window position) go to -o as JSON for
`alibi-lm plot`.

Examples:
  alibi-lm evaluate runs/small                               # test split, L..16L, nonoverlapping
  alibi-lm evaluate runs/small --lengths 512,2048 --mode both --stride 64 -o eval.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--data", default=None,
                        help="prepared data directory (default: the one the model was trained on, from its run config)")
    parser.add_argument("--split", default="test", help="train | valid | test (default: test)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated evaluation lengths (default: L,2L,4L,8L,16L of the training length)")
    parser.add_argument("--mode", default="nonoverlapping", choices=("nonoverlapping", "sliding", "both"),
                        help="evaluation mode (default: nonoverlapping)")
    parser.add_argument("--stride", type=int, default=1,
                        help="sliding window: tokens scored per forward pass (default: 1, exact)")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="evaluate only the first N tokens of the split (default: all)")
    parser.add_argument("--batch-tokens", type=int, default=16384,
                        help="input tokens per forward pass; lower it if memory runs out (default: 16384)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="bounded-error attention: the share of each row's softmax mass that may be left "
                             "out, e.g. 1e-4 (Triton backend on CUDA; default: the model's attn_tolerance, 0)")
    parser.add_argument("--label", default=None, help="name of this run in tables and plots")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("-o", "--out", default=None, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_lengths(text: str) -> list[int]:
    from alibi_lm.errors import UserError

    lengths = []
    try:
        for item in (x.strip().lower() for x in text.split(",") if x.strip()):
            # "2k" is 2048, as in the paper's figures
            lengths.append(round(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    except (ValueError, OverflowError):  # OverflowError: "infk"
        raise UserError(f"--lengths must be comma-separated integers like 512,1024,2k, got {text!r}") from None
    if not lengths or any(n < 1 for n in lengths):
        raise UserError(f"--lengths must be positive integers, got {text!r}")
    return lengths


def run(args: argparse.Namespace) -> int:
    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.data import SPLITS, load_tokens
    from alibi_lm.distributed import pick_device
    from alibi_lm.errors import UserError
    from alibi_lm.evaluate import check_same_tokenizer, evaluate_model, find_data_dir, fit_lengths, forward_tokens
    from alibi_lm.files import check_output_file, is_results_file, write_json
    from alibi_lm.model import set_attention_tolerance
    from alibi_lm.plots import results_table

    for name in ("stride", "batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens must be a positive integer (or 0 for all), got {args.max_tokens}")
    asked = parse_lengths(args.lengths) if args.lengths is not None else None
    out = None
    if args.out:  # check the destination before the (long) evaluation, not after it
        out = check_output_file(args.out, option="-o", kind="results file", ours=is_results_file,
                                example="eval.json")
    ckpt = load_checkpoint(args.checkpoint, device=pick_device(args.device))
    if args.tolerance is not None:
        set_attention_tolerance(ckpt.model, args.tolerance)
    data_dir = Path(args.data) if args.data else find_data_dir(ckpt)
    if data_dir is None:
        raise UserError(f"cannot tell which data {ckpt.path} was trained on; pass --data PREPARED_DIR")
    data_meta = check_same_tokenizer(ckpt, data_dir)
    if args.split not in data_meta["splits"]:
        raise UserError(f"unknown --split {args.split!r}; {data_dir} has {', '.join(data_meta['splits'])}"
                        if set(data_meta["splits"]) != set(SPLITS) else
                        f"unknown --split {args.split!r}; valid: {', '.join(SPLITS)}")
    tokens = load_tokens(data_dir, args.split)
    words = data_meta["splits"][args.split].get("words")
    if args.max_tokens:
        if words:  # scale the word count with the share of the split that is read
            words = round(words * min(1.0, args.max_tokens / len(tokens)))
        tokens = tokens[: args.max_tokens]
    lengths, skipped = fit_lengths(asked, ckpt.train_len, len(tokens), ckpt.model.position.max_positions)
    if skipped:
        print(f"note: skipping lengths {', '.join(map(str, skipped))}: longer than the {len(tokens) - 1:,} "
              "predictions of the evaluated tokens", file=sys.stderr)
    modes = ("nonoverlapping", "sliding") if args.mode == "both" else (args.mode,)
    if "sliding" in modes and (short := [n for n in lengths if n < args.stride]):
        print(f"note: --stride {args.stride} is longer than length {', '.join(map(str, short))}; the sliding "
              "window there advances by its whole length (nonoverlapping)", file=sys.stderr)
    _say_cost(len(tokens), lengths, modes, args.stride, forward_tokens)
    results = evaluate_model(
        ckpt.model, tokens, train_len=ckpt.train_len, lengths=lengths, modes=modes, stride=args.stride,
        word_count=words, label=args.label, max_batch_tokens=args.batch_tokens, progress=not args.no_progress,
        extra={"checkpoint": str(ckpt.path), "data": str(data_dir), "split": args.split,
               "tokenizer": data_meta.get("tokenizer"), "split_words": words, "step": ckpt.meta.get("step")})
    word_level = data_meta.get("tokenizer") == "word"
    unit = "word-level (word tokenizer)" if word_level else "token-level"
    print(f"{ckpt.path}: {ckpt.config.position}, trained at L={ckpt.train_len}; {args.split} split of {data_dir}, "
          f"{len(tokens):,} tokens; {unit} perplexity")
    print(results_table([results]), end="")
    if not word_level and words:
        print("word-level perplexity, exp(total NLL / whitespace words of the split; comparable across "
              "tokenizers):")
        print(results_table([results], metric="word_ppl"), end="")
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return 0


def _say_cost(n_tokens: int, lengths: list[int], modes: tuple[str, ...], stride: int, forward_tokens) -> None:
    """Before a long evaluation, what it costs: the tokens the model reads, against the nonoverlapping
    evaluation of the same lengths (which reads each token once per length)."""
    if "sliding" not in modes:
        return
    sliding = sum(forward_tokens(n_tokens, n, "sliding", min(stride, n)) for n in lengths)
    once = sum(forward_tokens(n_tokens, n, "nonoverlapping") for n in lengths)
    if sliding <= 2 * once:
        return
    hint = ""
    if (cheaper := max(1, min(lengths) // 8)) > stride:
        other = sum(forward_tokens(n_tokens, n, "sliding", min(cheaper, n)) for n in lengths)
        hint = (f"; --stride {cheaper} reads {other:,} (an approximation: each scored token then sees at least "
                f"{min(lengths) - cheaper + 1} tokens)")
    print(f"note: the sliding window with stride {stride} reads {sliding:,} tokens ({sliding / once:,.0f}x the "
          f"nonoverlapping evaluation of the same lengths){hint}", file=sys.stderr)

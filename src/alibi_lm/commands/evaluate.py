"""`alibi-lm evaluate`: perplexity of a checkpoint at several evaluation lengths."""

from __future__ import annotations

import argparse
import json
import os
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


def fit_lengths(asked: list[int] | None, train_len: int, n_tokens: int, max_positions: int | None) -> list[int]:
    """The lengths to evaluate: those asked for (default L..16L) that the split can fill. A window longer
    than the split scores the same tokens as one of exactly its length, so it is dropped with a note;
    the default range stops where a model with absolute positions (`learned`) stops."""
    from alibi_lm.errors import UserError
    from alibi_lm.evaluate import default_lengths

    lengths = asked
    if asked is None:
        lengths = default_lengths(train_len)
        if max_positions is not None:
            lengths = [n for n in lengths if n <= max_positions]
    predictions = n_tokens - 1
    too_long = [n for n in lengths if n > predictions]
    kept = [n for n in lengths if n <= predictions]
    if too_long:
        if not kept:
            raise UserError(f"every evaluation length ({', '.join(map(str, too_long))}) is longer than the "
                            f"{predictions:,} predictions of the evaluated tokens; "
                            + (f"use --lengths up to {predictions}" if predictions > 0
                               else "evaluate at least 2 tokens (--max-tokens)"))
        print(f"note: skipping lengths {', '.join(map(str, too_long))}: longer than the {predictions:,} predictions "
              "of the evaluated tokens", file=sys.stderr)
    return kept


def check_results_path(out: Path) -> None:
    """Fail before a long evaluation, not after it: -o must be a writable file name that is new or an
    earlier results file (those are replaced; any other file, a checkpoint's meta.json say, never is)."""
    from alibi_lm.errors import UserError
    from alibi_lm.evaluate import RESULTS_FORMAT

    if out.is_dir():
        raise UserError(f"-o {out} is a directory; give a file name such as {out / 'eval.json'}")
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"-o {out}: {parent} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"-o {out}: cannot create its folder ({error.strerror or error})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"-o {out}: cannot write to {out.parent}")
    if out.exists():
        try:
            ours = json.loads(out.read_text()).get("format") == RESULTS_FORMAT
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"-o {out} exists and is not an alibi-lm results file; choose another name (earlier "
                            "results files are replaced, other files never)")


def find_data_dir(checkpoint_path: Path, meta: dict) -> Path | None:
    """The prepared directory a checkpoint was trained on: from its metadata, or the run's config.json."""
    candidates = [meta.get("data_path"), (meta.get("train_config") or {}).get("data", {}).get("path")]
    for config_file in (checkpoint_path / "config.json", checkpoint_path.parent / "config.json",
                        checkpoint_path.parent.parent / "config.json"):
        if config_file.is_file():
            try:
                candidates.append(json.loads(config_file.read_text()).get("data", {}).get("path"))
            except (json.JSONDecodeError, AttributeError):
                pass
    for candidate in candidates:
        if candidate and (Path(candidate) / "meta.json").is_file():
            return Path(candidate)
    return None


def run(args: argparse.Namespace) -> int:
    from alibi_lm.checkpoint import load_checkpoint, write_json
    from alibi_lm.data import load_tokens, read_meta
    from alibi_lm.distributed import pick_device
    from alibi_lm.errors import UserError
    from alibi_lm.evaluate import evaluate_model
    from alibi_lm.plots import results_table
    from alibi_lm.tokenizer import load_tokenizer

    for name in ("stride", "batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens must be a positive integer (or 0 for all), got {args.max_tokens}")
    if args.lengths is not None:
        parse_lengths(args.lengths)
    out = Path(args.out) if args.out else None
    if out is not None:  # check the destination before the (long) evaluation, not after it
        check_results_path(out)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    data_dir = Path(args.data) if args.data else find_data_dir(ckpt.path, ckpt.meta)
    if data_dir is None:
        raise UserError(f"cannot tell which data {ckpt.path} was trained on; pass --data PREPARED_DIR")
    data_meta = read_meta(data_dir)
    tok = ckpt.tokenizer
    if tok is not None:
        # compare what the tokenizers do where the data has its tokenizer.json, else what meta.json says
        if (data_dir / "tokenizer.json").is_file():
            data_tok = load_tokenizer(data_dir)
            data_kind, data_size, same = data_tok.kind, data_tok.vocab_size, tok.encodes_like(data_tok)
        else:
            data_kind, data_size = data_meta.get("tokenizer"), data_meta["vocab_size"]
            same = (tok.kind, tok.vocab_size) == (data_kind, data_size)
        if not same:
            raise UserError(f"{data_dir} was prepared with another tokenizer ({data_kind}, {data_size} tokens) than "
                            f"the one {ckpt.path} uses ({tok.kind}, {tok.vocab_size}); evaluate on data prepared "
                            "with the model's tokenizer")
    if data_meta["vocab_size"] > ckpt.config.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {data_meta['vocab_size']} but the model only "
                        f"{ckpt.config.vocab_size}: it was prepared with another tokenizer")
    tokens = load_tokens(data_dir, args.split)
    words = data_meta["splits"][args.split].get("words")
    if args.max_tokens:
        if words:  # scale the word count with the share of the split that is read
            words = round(words * min(1.0, args.max_tokens / len(tokens)))
        tokens = tokens[: args.max_tokens]
    train_len = ckpt.train_len
    lengths = fit_lengths(parse_lengths(args.lengths) if args.lengths is not None else None, train_len,
                          len(tokens), ckpt.model.position.max_positions)
    modes = ("nonoverlapping", "sliding") if args.mode == "both" else (args.mode,)
    if "sliding" in modes and (short := [n for n in lengths if n < args.stride]):
        print(f"note: --stride {args.stride} is longer than length {', '.join(map(str, short))}; the sliding "
              "window there advances by its whole length (nonoverlapping)", file=sys.stderr)
    results = evaluate_model(
        ckpt.model, tokens, train_len=train_len, lengths=lengths, modes=modes, stride=args.stride,
        word_count=words, label=args.label,
        max_batch_tokens=args.batch_tokens, progress=not args.no_progress,
        extra={"checkpoint": str(ckpt.path), "data": str(data_dir), "split": args.split,
               "tokenizer": data_meta.get("tokenizer"), "split_words": words, "step": ckpt.meta.get("step")})
    word_level = data_meta.get("tokenizer") == "word"
    unit = "word-level (word tokenizer)" if word_level else "token-level"
    print(f"{ckpt.path}: {ckpt.config.position}, trained at L={train_len}; {args.split} split of {data_dir}, "
          f"{len(tokens):,} tokens; {unit} perplexity")
    print(results_table([results]), end="")
    if not word_level and words:
        print("word-level perplexity (total NLL / words):")
        print(results_table([results], metric="word_ppl"), end="")
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return 0

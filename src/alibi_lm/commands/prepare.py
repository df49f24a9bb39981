"""`alibi-lm prepare`: text -> tokenizer + memory-mapped token files + meta.json."""

from __future__ import annotations

import argparse

NAME = "prepare"
HELP = "tokenize a corpus (text files, a directory, wikitext-2/103 or embedded) into token files"
ORDER = 20
DESCRIPTION = """\
Tokenize a corpus into a prepared directory: train.bin, valid.bin, test.bin (uint16 or uint32 token
ids), tokenizer.json (loadable by Hugging Face tokenizers) and meta.json (token and word counts,
source checksums). `alibi-lm train` reads it through data.path.

SOURCE is a text file (.txt, .xz, .gz, .bz2), a directory of them (the last 5% of lines held out
as valid, then 5% as test), or a named corpus:
  wikitext-2, wikitext-103   the tokenized WikiText files from --data-dir (their own splits)
  embedded                   Python's own help texts (pydoc_data), no download needed

Tokenizers: bytes (256 ids, no training), bpe (byte-level BPE of --vocab-size ids trained on the
train split), word (whitespace words + one <eos> per line, the paper's WikiText-103 setting).

Examples:
  alibi-lm prepare embedded -o data/embedded --tokenizer bytes
  alibi-lm prepare wikitext-2 -o data/wt2 --tokenizer word
  alibi-lm prepare corpus.txt.xz -o data/mine --tokenizer bpe --vocab-size 16384
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="text file, directory, or wikitext-2 | wikitext-103 | embedded")
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default="bpe", help="bytes | bpe | word (default: bpe)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="bpe vocabulary size (default: 8192)")
    parser.add_argument("--min-freq", type=int, default=1,
                        help="word tokenizer: words seen fewer times become <unk> (default: 1)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding wikitext-2/ and wikitext-103/ (default: ../shared/data if it exists)")
    parser.add_argument("--valid-fraction", type=float, default=None,
                        help="held-out share of lines for valid, in (0, 0.5); text files and embedded only "
                             "(default: 0.05)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="held-out share of lines for test, in (0, 0.5); text files and embedded only "
                             "(default: 0.05)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in the output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from alibi_lm.data import prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   data_dir=args.data_dir, min_freq=args.min_freq, valid_fraction=args.valid_fraction,
                   test_fraction=args.test_fraction, progress=not args.no_progress,
                   overwrite=args.overwrite)
    print(f"{args.out}: {meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']:,}, {meta['dtype']}")
    for split, info in meta["splits"].items():
        print(f"  {split:<5} {info['tokens']:>12,} tokens {info['words']:>12,} words (incl. one per line)")
    for note in meta["notes"]:
        print(f"  note: {note}")
    if meta["tokenizer"] == "bpe" and meta["vocab_size"] < args.vocab_size:
        print(f"  note: the train split supports only {meta['vocab_size']:,} BPE tokens, not the "
              f"{args.vocab_size:,} asked for (the trainer ran out of pairs to merge)")
    return 0

"""Corpus -> tokenizer -> token files (`alibi-lm prepare`), and the seeded training batches.

A prepared directory holds `train.bin`, `valid.bin`, `test.bin` (raw little-endian uint16 when the
vocabulary fits, else uint32), the tokenizer (`tokenizer.json` + `tokenizer_meta.json`) and
`meta.json` (see `prepare`). Sources: plain-text files (.txt, .xz, .gz, .bz2), a directory of them,
or a named corpus: `wikitext-2` / `wikitext-103` from the shared data directory (their own splits),
and `embedded`, the help texts that ship with Python (`pydoc_data.topics`), so that a demo runs on a
fresh machine with no download. Plain files are split deterministically: the last lines are held out.

Word counts follow the WikiText convention (../shared/data/README.md): `words` = whitespace words +
one end-of-line per line ("words+eos"), the count behind the published WikiText-2/103 figures. With
the word tokenizer every word and every end-of-line is exactly one token, so token-level perplexity
*is* word-level perplexity; with bytes or BPE, word-level perplexity = exp(total NLL / words).

Batches are a pure function of (seed, step, row): a run resumed at step s reads what an unbroken run
reads, and the rows of one optimizer step are cut among ranks and micro-batches the same way for any
world size, so 2 ranks with batch b see exactly the data of 1 rank with batch 2b.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alibi_lm.errors import UserError, closest_match_hint
from alibi_lm.files import folder_kind, read_json
from alibi_lm.progress import progress_bar
from alibi_lm.tokenizer import KINDS, Tokenizer, train_tokenizer

__all__ = ["CORPORA", "SPLITS", "batch_rows", "load_tokens", "prepare", "read_meta", "window_starts"]

SPLITS = ("train", "valid", "test")
# what `prepare` writes into its output directory
_OUTPUT_NAMES = ("meta.json", *(f"{split}.bin" for split in SPLITS), "tokenizer.json", "tokenizer_meta.json")
CORPORA = ("wikitext-2", "wikitext-103", "embedded")
TEXT_SUFFIXES = (".txt", ".tokens", ".xz", ".gz", ".bz2")
FORMAT_VERSION = 1
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


@dataclass
class Corpus:
    """The text of each split, and where it came from."""

    splits: dict[str, str]
    sources: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading sources


def _read_text(path: Path) -> tuple[str, dict]:
    """Decoded UTF-8 text of one (possibly compressed) file, and its source record."""
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a regular file: {path}")
    raw = path.read_bytes()
    opener = _OPENERS.get(path.suffix)
    if opener is not None:
        try:
            with opener(path, "rb") as f:
                data = f.read()
        except (OSError, EOFError, lzma.LZMAError) as error:
            raise UserError(f"cannot decompress {path}: {error}") from None
    else:
        data = raw
    if not data.strip():
        raise UserError(f"{path} is empty; give a file with text in it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (invalid byte 0x{data[error.start]:02x} at offset "
                        f"{error.start}); convert it, e.g. with iconv -t UTF-8") from None
    record = {"path": str(path), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return text, record


#: names the folder that holds wikitext-2/ and wikitext-103/ when --data-dir is not given
DATA_DIR_VARIABLE = "ALIBI_LM_DATA"


def default_data_dir() -> Path | None:
    """Where the named corpora are looked for without --data-dir: $ALIBI_LM_DATA, else ../shared/data
    from the working directory, else ../shared/data beside the source checkout, the first that exists."""
    repository = Path(__file__).resolve().parents[2]  # src/alibi_lm/data.py in a source checkout
    candidates = [Path.cwd() / ".." / "shared" / "data", repository / ".." / "shared" / "data"]
    if os.environ.get(DATA_DIR_VARIABLE):
        candidates.insert(0, Path(os.environ[DATA_DIR_VARIABLE]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _find(directory: Path, names: list[str]) -> Path | None:
    for name in names:
        for suffix in ("", ".xz", ".gz", ".bz2"):
            if (directory / (name + suffix)).is_file():
                return directory / (name + suffix)
    return None


def _wikitext(name: str, data_dir: Path | None) -> Corpus:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    # train's automatic prepare has no --data-dir of its own: the hint names the command that has one
    hint = (f"prepare it with `alibi-lm prepare {name} --data-dir DIR -o OUT` (DIR: the folder that holds "
            f"{name}/) and set data.path=OUT")
    if data_dir is None:
        raise UserError(f"{name} needs the folder that holds {name}/ (not given by --data-dir or "
                        f"${DATA_DIR_VARIABLE}, and no ../shared/data); {hint}")
    directory = data_dir / name
    if not directory.is_dir():
        raise UserError(f"{directory} not found; {hint}")
    corpus = Corpus(splits={})
    for split in SPLITS:
        names = [f"wiki.{split}.tokens"]
        if split == "train" and name == "wikitext-103":
            names.append("wiki.train.prefix.tokens")
        path = _find(directory, names)
        if path is None:
            raise UserError(f"no wiki.{split}.tokens[.xz] in {directory}")
        if "prefix" in path.name:
            corpus.notes.append(f"{name} train is only the prefix {path.name}, not the full train split")
        corpus.splits[split], record = _read_text(path)
        corpus.sources.append({"split": split, **record})
    return corpus


def _embedded(valid_fraction: float, test_fraction: float) -> Corpus:
    from pydoc_data.topics import topics

    # Sorted by topic name: the text is the same for every run of one Python version.
    text = "".join(topics[key].rstrip() + "\n\n" for key in sorted(topics))
    corpus = _held_out_tail(text, valid_fraction, test_fraction)
    corpus.sources = [{"path": "python:pydoc_data.topics", "python": sys.version.split()[0],
                       "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "bytes": len(text.encode())}]
    return corpus


def _held_out_tail(text: str, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Corpus:
    """Train = the head, then valid, then test = the tail; cut at line ends when there are enough lines."""
    lines = text.splitlines(keepends=True)
    if len(lines) >= 20:
        n = len(lines)
        n_test = max(1, round(n * test_fraction))
        n_valid = max(1, round(n * valid_fraction))
        cut1, cut2 = n - n_valid - n_test, n - n_test
        parts = ["".join(lines[:cut1]), "".join(lines[cut1:cut2]), "".join(lines[cut2:])]
    else:  # one long line or a few: cut by characters
        n = len(text)
        cut1 = n - max(1, round(n * (valid_fraction + test_fraction)))
        cut2 = n - max(1, round(n * test_fraction))
        parts = [text[:cut1], text[cut1:cut2], text[cut2:]]
    return Corpus(splits=dict(zip(SPLITS, parts)))


def _text_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in {directory}")
    return files


#: the share of lines held out for valid and for test, each, where a corpus has no splits of its own
DEFAULT_HELD_OUT = 0.05


def _check_fractions(source: str, valid_fraction: float | None, test_fraction: float | None) -> tuple[float, float]:
    """The held-out shares to use; None is the default. A named corpus with its own splits takes none
    (a share given for it would silently be ignored), and a share outside (0, 0.5) is refused."""
    if source in ("wikitext-2", "wikitext-103"):
        given = [name for name, value in (("valid", valid_fraction), ("test", test_fraction)) if value is not None]
        if given:
            raise UserError(f"{source} comes with its own train/valid/test splits; leave out "
                            f"{' and '.join(f'--{name}-fraction' for name in given)}")
    shares = []
    for name, value in (("valid", valid_fraction), ("test", test_fraction)):
        value = DEFAULT_HELD_OUT if value is None else value
        if not 0 < value < 0.5:
            raise UserError(f"--{name}-fraction must be a share of the lines between 0 and 0.5 (e.g. 0.05), "
                            f"got {value}")
        shares.append(value)
    return shares[0], shares[1]


def read_corpus(source: str, *, data_dir: str | Path | None = None, valid_fraction: float | None = None,
                test_fraction: float | None = None) -> Corpus:
    """The text of each split of `source`: a named corpus, a text file, or a directory of them. Plain
    text and `embedded` hold out their last lines: `valid_fraction` for valid, then `test_fraction` for
    test (default 0.05 each); WikiText has its own splits and takes neither."""
    valid_fraction, test_fraction = _check_fractions(source, valid_fraction, test_fraction)
    if source in ("wikitext-2", "wikitext-103"):
        return _wikitext(source, Path(data_dir) if data_dir else None)
    if source == "embedded":
        return _embedded(valid_fraction, test_fraction)
    path = Path(source)
    if not path.exists():
        hint = closest_match_hint(source, CORPORA)
        raise UserError(f"no such file or corpus: {source}{hint}; give a text file, a directory or one of "
                        f"{', '.join(CORPORA)}")
    files = _text_files(path) if path.is_dir() else [path]
    texts, sources = [], []
    for file in files:
        text, record = _read_text(file)
        texts.append(text if text.endswith("\n") else text + "\n")
        sources.append(record)
    corpus = _held_out_tail("".join(texts), valid_fraction, test_fraction)
    corpus.sources = sources
    return corpus


# ---------------------------------------------------------------------------------------------
# tokenizing and writing


def _encode_to_file(tokenizer: Tokenizer, text: str, path: Path, dtype: np.dtype, progress: bool,
                    desc: str) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n_tokens = 0
    with open(tmp, "wb") as f:
        if tokenizer.kind == "bytes":
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
            f.write(ids.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            n_tokens = len(ids)
        else:
            lines = text.splitlines(keepends=True)
            chunk = 20_000
            bar = progress_bar(total=len(text), unit="B", unit_scale=True, desc=desc, disable=not progress,
                               leave=False)
            for i in range(0, len(lines), chunk):
                batch = lines[i:i + chunk]
                encoded = tokenizer.encode_batch(batch)
                flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)
                f.write(flat.astype(dtype.newbyteorder("<")).tobytes())
                n_tokens += len(flat)
                bar.update(sum(len(s) for s in batch))
            bar.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n_tokens


def prepare(source: str, out_dir: str | Path, *, tokenizer: str = "bpe", vocab_size: int = 8192,
            data_dir: str | Path | None = None, min_freq: int = 1, valid_fraction: float | None = None,
            test_fraction: float | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize `source` into `out_dir`; return the metadata written to `out_dir/meta.json`:
    {"format_version": 1, "tokenizer": kind, "vocab_size", "dtype": "uint16" | "uint32",
     "splits": {split: {"file", "tokens", "words", "whitespace_words", "lines"}}, "sources": [...]}.
    The tokenizer is trained on the train split only (bpe: `vocab_size` ids; word: words seen at
    least `min_freq` times). A directory that already holds prepared data (models may have been
    trained on it) is replaced only with `overwrite`; files are written to a temporary folder inside
    `out_dir` and moved into place with meta.json last, so an interruption never leaves token files
    that disagree with meta.json."""
    if tokenizer not in KINDS:
        raise UserError(f"unknown tokenizer {tokenizer!r}{closest_match_hint(tokenizer, KINDS)}; "
                        f"valid: {', '.join(KINDS)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise UserError(f"vocab size must be a positive integer, got {vocab_size!r}")
    if min_freq < 1:
        raise UserError(f"min_freq must be at least 1, got {min_freq}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output directory")
    if _holds_a_model(out):
        raise UserError(f"{out} holds a model checkpoint or a training run, which prepare never writes into "
                        "(not even with --overwrite); choose another output directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUT_NAMES and not p.name.startswith(".")
                    ) if out.is_dir() else []
    if others:
        # its own files among someone else's could not be told apart, nor cleanly replaced
        raise UserError(f"{out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                        "prepare writes into a new or empty folder, or one it prepared before")
    existing = [name for name in _OUTPUT_NAMES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds prepared data ({', '.join(existing)}); pass --overwrite to replace "
                        "it, or choose another output directory")
    corpus = read_corpus(source, data_dir=data_dir, valid_fraction=valid_fraction, test_fraction=test_fraction)
    for split in SPLITS:
        if not corpus.splits[split].strip():
            raise UserError(f"the {split} split of {source} is empty; give a longer corpus")
    train_lines = corpus.splits["train"].splitlines(keepends=True)
    tok = train_tokenizer(tokenizer, train_lines, vocab_size=vocab_size, min_freq=min_freq, show_progress=progress)
    dtype = np.dtype(np.uint16) if tok.vocab_size <= 2**16 else np.dtype(np.uint32)

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        meta = _write_prepared(staging, tok, corpus, source, dtype, progress)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "meta.json"):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _holds_a_model(directory: Path) -> bool:
    # a checkpoint's weights, or a run folder's checkpoints: --overwrite of prepared data must not reach them
    return (directory / "model.safetensors").exists() or folder_kind(directory) in ("checkpoint", "run")


def _write_prepared(out: Path, tok: Tokenizer, corpus: Corpus, source: str, dtype: np.dtype, progress: bool) -> dict:
    splits = {}
    for split in SPLITS:
        text = corpus.splits[split]
        n = _encode_to_file(tok, text, out / f"{split}.bin", dtype, progress, desc=f"tokenizing {split}")
        words, lines = len(text.split()), text.count("\n")
        splits[split] = {"file": f"{split}.bin", "tokens": n, "words": words + lines, "whitespace_words": words,
                         "lines": lines, "chars": len(text)}
    tok.save(out)
    meta = {"format_version": FORMAT_VERSION, "source": source, "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.name, "splits": splits, "sources": corpus.sources,
            "notes": corpus.notes,
            "word_count_convention": "words = whitespace words + one end-of-line per line (WikiText words+eos)"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# reading prepared data


def read_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if Path(prepared_dir).is_file():
        # a text file named where a prepared folder belongs: prepare that file into a folder of its own
        stem = Path(prepared_dir)
        raise UserError(f"{prepared_dir} is a file; the data path names a folder made by `alibi-lm prepare`: "
                        f"alibi-lm prepare {prepared_dir} -o {stem.with_name(stem.stem + '-prepared')}, then use that "
                        "folder")
    if not path.is_file():
        raise UserError(f"{prepared_dir} is not a prepared data directory (no meta.json); "
                        f"run `alibi-lm prepare SOURCE -o {prepared_dir}` first")
    meta = read_json(path, "prepared data's metadata")
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not the metadata of prepared data; run `alibi-lm prepare` for it")
    if "model" in meta and "splits" not in meta:  # checkpoints have a meta.json too
        raise UserError(f"{prepared_dir} is a model checkpoint, not a prepared data directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')!r}; this alibi-lm reads "
                        f"{FORMAT_VERSION}: prepare the data again")
    splits = meta.get("splits")
    if (not isinstance(splits, dict) or not isinstance(meta.get("vocab_size"), int) or "dtype" not in meta
            or not all(isinstance(v, dict) and isinstance(v.get("file"), str) and isinstance(v.get("tokens"), int)
                       for v in splits.values())):
        raise UserError(f"{path} is incomplete or damaged (splits, vocab_size, dtype); prepare the data again")
    return meta


def load_tokens(prepared_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split as a read-only 1-D memory map."""
    meta = read_meta(prepared_dir)
    if split not in meta["splits"]:
        raise UserError(f"unknown split {split!r}{closest_match_hint(split, meta['splits'])}")
    info = meta["splits"][split]
    path = Path(prepared_dir) / info["file"]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise UserError(f"{path} is missing or has the wrong size; prepare the data again")
    if info["tokens"] == 0:
        raise UserError(f"the {split} split of {prepared_dir} is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


# ---------------------------------------------------------------------------------------------
# batches


def window_starts(n_tokens: int, length: int, rows: int, *, seed: int, step: int, mode: str = "random") -> np.ndarray:
    """Start offsets of the `rows` windows of one optimizer step (all ranks, all micro-batches).

    A window needs length + 1 tokens (inputs and the next-token targets). random: uniform starts
    from a generator seeded by (seed, step), so no state is carried between steps. sequential:
    consecutive non-overlapping windows, wrapping around at the end of the split."""
    if n_tokens < length + 1:
        raise UserError(f"the split has {n_tokens} tokens, fewer than one training window of {length} + 1; "
                        "use a shorter data.train_len or a longer corpus")
    if mode == "random":
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        return rng.integers(0, n_tokens - length, size=rows, dtype=np.int64)
    if mode == "sequential":
        n_windows = (n_tokens - 1) // length
        return ((step * rows + np.arange(rows, dtype=np.int64)) % n_windows) * length
    raise UserError(f"unknown window mode {mode!r}; valid: random, sequential")


def batch_rows(starts: np.ndarray, *, micro: int, rank: int, world: int, batch: int) -> np.ndarray:
    """The starts one rank reads in one micro-batch: rows are laid out [micro][rank][batch]."""
    first = (micro * world + rank) * batch
    return starts[first:first + batch]


def gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int):
    """(inputs, targets), each a (len(starts), length) int64 CPU tensor."""
    import torch

    index = starts[:, None] + np.arange(length + 1, dtype=np.int64)[None, :]
    block = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))  # (B, length + 1)
    return block[:, :-1], block[:, 1:]

"""Tokenizers: raw bytes, byte-level BPE, and whitespace words (the paper's WikiText-103 setting).

All three are Hugging Face `tokenizers` objects underneath, so `save` writes a `tokenizer.json` that
`tokenizers.Tokenizer.from_file` loads and that encodes exactly as `Tokenizer.encode` does (the HF
export needs that). A small `tokenizer_meta.json` beside it records the kind and the end-of-line id.

- bytes: id = the UTF-8 byte value (vocabulary 256, no training). In HF form it is a byte-level BPE
  with no merges whose 256 symbols are numbered by their byte value.
- bpe: GPT-2-style byte-level BPE trained on the train split; `<|endoftext|>` separates documents.
- word: WikiText/fairseq word level: tokens are whitespace-separated words, one `<eos>` per line,
  words rarer than `min_freq` become `<unk>`. In HF form a normalizer turns each newline into
  " <eos> " and a WordLevel model with a WhitespaceSplit pre-tokenizer does the rest.

Not here: normalisation (NFC, lower-casing) — text is tokenized as it is.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from alibi_lm.errors import UserError

__all__ = ["EOS_WORD", "KINDS", "UNK_WORD", "Tokenizer", "load_tokenizer", "train_bpe_tokenizer", "train_tokenizer",
           "train_word_tokenizer"]

KINDS = ("bytes", "bpe", "word")
EOS_WORD = "<eos>"
UNK_WORD = "<unk>"
BPE_EOS = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"


def _byte_symbols() -> list[str]:
    """The printable stand-in character of each byte value, in byte order (GPT-2's byte-level
    alphabet: printable Latin-1 bytes stand for themselves, the rest are shifted above U+0100)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, shift = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def _bytes_hf():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: every byte, spaces and newlines included, becomes its own token.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


# words, punctuation, digits, a heading line and non-ASCII letters: where tokenizers tend to differ
_PROBE_TEXT = " = Heading = \n The quick brown fox , 1,234 @-@ 5 naïve café — <unk> \n"


def _pipeline(hf) -> tuple:
    """What decides a `tokenizers` tokenizer's ids: its model (vocabulary, BPE merges), normalizer and
    pre-tokenizer, as saved in tokenizer.json."""
    saved = json.loads(hf.to_str())
    return tuple(json.dumps(saved.get(part), sort_keys=True) for part in ("model", "normalizer", "pre_tokenizer"))


class Tokenizer:
    """Text <-> token ids. `kind` is bytes | bpe | word; `eos_id` is the end-of-line (word) or
    end-of-document (bpe) token, None for bytes."""

    def __init__(self, kind: str, hf, eos_id: int | None):
        if kind not in KINDS:
            raise UserError(f"unknown tokenizer {kind!r}; valid: {', '.join(KINDS)}")
        self.kind = kind
        self.hf = hf
        self.eos_id = eos_id
        self.vocab_size = 256 if kind == "bytes" else hf.get_vocab_size(with_added_tokens=True)
        self._id_to_word: list[str] | None = None

    @classmethod
    def bytes(cls) -> Tokenizer:
        return cls("bytes", _bytes_hf(), None)

    def encode(self, text: str) -> list[int]:
        try:
            if self.kind == "bytes":
                return list(text.encode("utf-8"))
            return self.hf.encode(text).ids
        except (UnicodeEncodeError, TypeError):
            _check_utf8([text])
            raise

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; bpe and word use every core (the `tokenizers` batch API)."""
        try:
            if self.kind == "bytes":
                return [list(t.encode("utf-8")) for t in texts]
            return [e.ids for e in self.hf.encode_batch(texts)]
        except (UnicodeEncodeError, TypeError):
            _check_utf8(texts)
            raise

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "bytes":
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        if self.kind == "word":
            if self._id_to_word is None:
                vocab = self.hf.get_vocab()
                self._id_to_word = [""] * len(vocab)
                for word, i in vocab.items():
                    self._id_to_word[i] = word
            out: list[str] = []
            for i in ids:
                word = self._id_to_word[i] if 0 <= i < len(self._id_to_word) else UNK_WORD
                out.append("\n" if word == EOS_WORD else word)
            # WikiText lines start with a space and words are space-separated; join the same way.
            return " ".join(out).replace(" \n ", " \n").replace(" \n", "\n")
        return self.hf.decode(ids, skip_special_tokens=False)

    def encodes_like(self, other: Tokenizer) -> bool:
        """Whether both give the same ids: the same vocabulary, and the same ids for a probe text. The
        kinds may differ in name only: a byte-level tokenizer.json that lost its meta file reads as bpe."""
        if self.vocab_size != other.vocab_size or _pipeline(self.hf) != _pipeline(other.hf):
            return False
        return self.encode(_PROBE_TEXT) == other.encode(_PROBE_TEXT)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "bytes":
            return None
        return self.hf.token_to_id(token)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _check_utf8(texts: Sequence[str]) -> None:
    """A UserError if a text holds a character UTF-8 cannot encode. Python turns bytes that are not
    UTF-8 (a Latin-1 argument, a file read with errors="surrogateescape") into lone surrogates, which
    `str.encode` and `tokenizers` reject with errors that name neither the text nor the cure.
    Called only after an encoding failed, so valid text pays nothing for the check."""
    for text in texts:
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(text[error.start])
            # U+DC80..U+DCFF is how Python's surrogateescape keeps an undecodable byte 0x80..0xFF
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
            raise UserError(f"the text is not valid UTF-8 ({what} at character {error.start}): re-encode it as "
                            "UTF-8, e.g. with iconv, or set a UTF-8 locale") from None


def _read_meta(meta_path: Path) -> dict:
    """tokenizer_meta.json as {"kind", "eos_id"}; a hand-edited or damaged file is a UserError naming it."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"corrupt {meta_path}: {str(error).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt {meta_path}: it must hold a JSON object")
    if meta.get("kind") not in KINDS:
        found = f"an unknown kind {meta['kind']!r}" if "kind" in meta else "no \"kind\""
        raise UserError(f"corrupt {meta_path}: it has {found}; valid kinds: {', '.join(KINDS)}")
    eos_id = meta.get("eos_id")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0):
        raise UserError(f"corrupt {meta_path}: eos_id must be a token id (an integer >= 0) or null, got {eos_id!r}")
    return meta


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what `Tokenizer.save` wrote. A bare `tokenizer.json` (no meta file) is read as bpe."""
    from tokenizers import Tokenizer as HFTokenizer

    directory = Path(directory)
    path = directory / "tokenizer.json" if directory.is_dir() else directory
    if not path.is_file():
        raise UserError(f"no tokenizer.json in {directory}")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a plain Exception for unreadable JSON
        raise UserError(f"cannot read tokenizer {path}: {str(error).splitlines()[0]}") from None
    meta_path = path.parent / META_FILE
    if meta_path.is_file():
        meta = _read_meta(meta_path)
        return Tokenizer(meta["kind"], hf, meta.get("eos_id"))
    model_type = json.loads(path.read_text()).get("model", {}).get("type")
    if model_type == "WordLevel":
        return Tokenizer("word", hf, hf.token_to_id(EOS_WORD))
    return Tokenizer("bpe", hf, hf.token_to_id(BPE_EOS))


def _word_hf(vocab: dict[str, int]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_WORD))
    hf.normalizer = normalizers.Replace("\n", f" {EOS_WORD} ")
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return hf


def train_word_tokenizer(lines: Iterable[str], *, min_freq: int = 1, max_vocab: int | None = None) -> Tokenizer:
    """Word vocabulary of `lines`: `<eos>` = 0, `<unk>` = 1, then words by falling count (ties by
    the word itself, so the ids do not depend on the order of the text). On WikiText-2 train with
    min_freq=1 this gives the published 33,278 types (its text already holds `<unk>`)."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
    counts.pop(EOS_WORD, None)
    counts.pop(UNK_WORD, None)
    words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    if max_vocab is not None:
        words = words[: max(0, max_vocab - 2)]
    vocab = {EOS_WORD: 0, UNK_WORD: 1}
    for word in words:
        vocab[word] = len(vocab)
    return Tokenizer("word", _word_hf(vocab), 0)


def train_bpe_tokenizer(texts: Iterator[str] | Iterable[str], *, vocab_size: int, show_progress: bool = True,
                        length: int | None = None) -> Tokenizer:
    """Byte-level BPE of `vocab_size` ids (the 256 bytes, `<|endoftext|>`, then merges)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"a bpe vocabulary needs at least 257 ids (256 bytes + end of text), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer("bpe", hf, hf.token_to_id(BPE_EOS))


def train_tokenizer(kind: str, lines: Sequence[str], *, vocab_size: int = 8192, min_freq: int = 1,
                    show_progress: bool = True) -> Tokenizer:
    """Build a tokenizer of `kind` from the training text, given as lines (newlines kept)."""
    if kind == "bytes":
        return Tokenizer.bytes()
    if kind == "word":
        return train_word_tokenizer(lines, min_freq=min_freq)
    if kind == "bpe":
        chunk = 1000
        batches = ("".join(lines[i:i + chunk]) for i in range(0, len(lines), chunk))
        return train_bpe_tokenizer(batches, vocab_size=vocab_size, show_progress=show_progress,
                                   length=(len(lines) + chunk - 1) // chunk)
    raise UserError(f"unknown tokenizer {kind!r}{_hint(kind)}; valid: {', '.join(KINDS)}")


def _hint(kind: str) -> str:
    from alibi_lm.errors import closest_match_hint

    return closest_match_hint(kind, KINDS)

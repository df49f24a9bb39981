"""Tokenizers: round trips, and the saved tokenizer.json encodes exactly as we do in HF `tokenizers`."""

import pytest
import tokenizers

from alibi_lm.errors import UserError
from alibi_lm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer, train_word_tokenizer

TEXT = " = Title = \n\n héllo  wörld , 日本 <unk> tab\there .\n the end\n"


def _kinds():
    lines = (TEXT * 50).splitlines(keepends=True)
    return {
        "bytes": Tokenizer.bytes(),
        "bpe": train_tokenizer("bpe", lines, vocab_size=300, show_progress=False),
        "word": train_tokenizer("word", lines),
    }


@pytest.mark.parametrize("kind", ["bytes", "bpe", "word"])
def test_saved_tokenizer_json_encodes_identically_in_hf(kind, tmp_path):
    tok = _kinds()[kind]
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in (TEXT, "unseen words here\n", "x"):
        assert hf.encode(text).ids == tok.encode(text)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_bytes_are_utf8_bytes_and_round_trip():
    tok = Tokenizer.bytes()
    assert tok.vocab_size == 256 and tok.eos_id is None
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_bpe_round_trips():
    tok = _kinds()["bpe"]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size <= 300 and tok.eos_id is not None


def test_word_level_eos_per_line_unk_and_cutoff():
    tok = train_word_tokenizer([" a a b\n", " a c\n"], min_freq=2)
    # <eos> = 0, <unk> = 1, then "a" (the only word seen twice)
    assert tok.vocab_size == 3
    assert tok.encode(" a b\n a\n") == [2, 1, 0, 2, 0]
    assert tok.decode([2, 1, 0, 2, 0]) == "a <unk>\na\n"


def test_unknown_kind_is_user_error():
    with pytest.raises(UserError, match="did you mean"):
        train_tokenizer("wrod", ["a\n"])


def test_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)

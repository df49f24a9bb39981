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


@pytest.mark.parametrize("kind", ["bytes", "bpe", "word"])
def test_text_that_is_not_utf8_is_a_user_error(kind):
    # what Python makes of `--prompt "$(printf 'caf\xe9')"`: the Latin-1 byte kept as a lone surrogate
    text = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    tok = _kinds()[kind] if kind != "bytes" else Tokenizer.bytes()
    for encode in (lambda: tok.encode(text), lambda: tok.encode_batch(["fine", text])):
        with pytest.raises(UserError, match=r"the text is not valid UTF-8 \(byte 0xe9 at character 3\)"):
            encode()
    assert tok.decode(tok.encode("héllo")) == "héllo"  # valid text still encodes


@pytest.mark.parametrize(("content", "message"), [
    (b'{"vocab_size": 256, "eos_id": null}', 'no "kind"'),
    (b'{"kind": "bites"}', "unknown kind 'bites'"),
    (b"caf\xe9", "can't decode byte 0xe9"),
    (b"[]", "must hold a JSON object"),
    (b'{"kind": "bytes", "eos_id": "0"}', "eos_id must be a token id"),
])
def test_damaged_tokenizer_meta_is_a_user_error_naming_it(tmp_path, content, message):
    Tokenizer.bytes().save(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_tokenizer(tmp_path)
    assert str(error.value).startswith(f"corrupt {tmp_path / 'tokenizer_meta.json'}: ")
    assert "\n" not in str(error.value)


def test_encodes_like_compares_what_the_tokenizers_do_not_their_names(tmp_path):
    from alibi_lm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

    Tokenizer.bytes().save(tmp_path / "bytes")
    (tmp_path / "bytes" / "tokenizer_meta.json").unlink()  # what a trip through save_pretrained leaves
    renamed = load_tokenizer(tmp_path / "bytes")
    assert renamed.kind == "bpe" and renamed.encodes_like(Tokenizer.bytes())
    a = train_tokenizer("word", ["the cat sat on the mat", "a dog sat on a log"])
    b = train_tokenizer("word", ["the cat sat on the hat", "a dog sat on a log"])
    assert a.vocab_size == b.vocab_size and not a.encodes_like(b)
    assert a.encodes_like(train_tokenizer("word", ["the cat sat on the mat", "a dog sat on a log"]))
    assert not a.encodes_like(Tokenizer.bytes())

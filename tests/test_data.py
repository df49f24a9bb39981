"""Prepared data: splits, counts, dtypes, checksums, WikiText's published statistics, batches."""

import json
import lzma
import re

import numpy as np
import pytest

from alibi_lm.data import (
    batch_rows,
    default_data_dir,
    gather_windows,
    load_tokens,
    prepare,
    read_corpus,
    read_meta,
    window_starts,
)
from alibi_lm.errors import UserError
from alibi_lm.tokenizer import load_tokenizer

SHARED = default_data_dir()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_prepare_plain_file_held_out_tail(tmp_path):
    lines = [f" line {i} with some words\n" for i in range(100)]
    src = _write(tmp_path / "c.txt", "".join(lines))
    meta = prepare(str(src), tmp_path / "out", tokenizer="bytes", progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 and meta["format_version"] == 1
    assert [meta["splits"][s]["lines"] for s in ("train", "valid", "test")] == [90, 5, 5]
    test = load_tokens(tmp_path / "out", "test")
    assert bytes(np.asarray(test, dtype=np.uint8)).decode() == "".join(lines[95:])
    assert meta["splits"]["train"]["words"] == 90 * 5 + 90  # whitespace words + one end-of-line per line
    assert len(meta["sources"][0]["sha256"]) == 64
    assert read_meta(tmp_path / "out") == json.loads((tmp_path / "out" / "meta.json").read_text())


def test_prepare_directory_of_compressed_files(tmp_path):
    (tmp_path / "d").mkdir()
    with lzma.open(tmp_path / "d" / "a.txt.xz", "wt", encoding="utf-8") as f:
        f.write(" alpha beta\n" * 30)
    _write(tmp_path / "d" / "b.txt", " gamma delta\n" * 30)
    meta = prepare(str(tmp_path / "d"), tmp_path / "out", tokenizer="word", progress=False)
    assert len(meta["sources"]) == 2
    tok = load_tokenizer(tmp_path / "out")
    train = load_tokens(tmp_path / "out", "train")
    assert tok.decode(train[:3]) == "alpha beta\n"
    assert meta["splits"]["train"]["tokens"] == meta["splits"]["train"]["words"]


def test_prepare_embedded_is_deterministic(tmp_path):
    a = prepare("embedded", tmp_path / "a", tokenizer="bytes", progress=False)
    b = prepare("embedded", tmp_path / "b", tokenizer="bytes", progress=False)
    assert a["splits"] == b["splits"] and a["splits"]["train"]["tokens"] > 100_000
    assert np.array_equal(load_tokens(tmp_path / "a", "valid"), load_tokens(tmp_path / "b", "valid"))


def test_bpe_uses_uint16_and_uint32_when_needed(tmp_path):
    src = _write(tmp_path / "c.txt", "".join(f" w{i} w{i % 7}\n" for i in range(80_000)))
    meta = prepare(str(src), tmp_path / "w", tokenizer="word", progress=False)
    assert meta["vocab_size"] > 65536 and meta["dtype"] == "uint32"
    assert load_tokens(tmp_path / "w", "train").dtype == np.dtype("<u4")


@pytest.mark.skipif(SHARED is None or not (SHARED / "wikitext-2").is_dir(), reason="../shared/data not present")
def test_wikitext2_word_level_matches_published_statistics(tmp_path):
    meta = prepare("wikitext-2", tmp_path / "wt2", tokenizer="word", progress=False)
    assert meta["vocab_size"] == 33_278
    assert {s: meta["splits"][s]["tokens"] for s in ("train", "valid", "test")} == {
        "train": 2_088_628, "valid": 217_646, "test": 245_569}
    for split in ("train", "valid", "test"):  # word-level tokens are the words+eos count
        assert meta["splits"][split]["tokens"] == meta["splits"][split]["words"]
    tok = load_tokenizer(tmp_path / "wt2")
    assert tok.decode(load_tokens(tmp_path / "wt2", "valid")[:5]) == "\n = Homarus gammarus ="


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "empty"), (b"  \n\n", "empty"), (b"caf\xe9 au lait\n", "not UTF-8")])
def test_bad_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare(str(path), tmp_path / "out", tokenizer="bytes", progress=False)


def test_window_starts_are_pure_and_split_across_ranks():
    a = window_starts(1000, 16, 8, seed=1, step=5)
    assert np.array_equal(a, window_starts(1000, 16, 8, seed=1, step=5))
    assert not np.array_equal(a, window_starts(1000, 16, 8, seed=1, step=6))
    assert a.min() >= 0 and a.max() <= 1000 - 17
    # 2 ranks x batch 2 x 2 micro-batches read exactly the rows of one rank with batch 8
    rows = [batch_rows(a, micro=m, rank=r, world=2, batch=2) for m in range(2) for r in range(2)]
    assert np.array_equal(np.concatenate(rows), a)
    seq = window_starts(100, 10, 4, seed=0, step=2, mode="sequential")
    assert seq.tolist() == [80, 0, 10, 20]  # 9 windows, wrapping
    with pytest.raises(UserError, match="fewer than one training window"):
        window_starts(10, 10, 1, seed=0, step=0)


def test_gather_windows_targets_are_shifted_inputs():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = gather_windows(tokens, np.array([3, 50]), 4)
    assert x.tolist() == [[3, 4, 5, 6], [50, 51, 52, 53]] and y.tolist() == [[4, 5, 6, 7], [51, 52, 53, 54]]


def test_prepare_never_replaces_prepared_data_unless_asked(tmp_path):
    first = _write(tmp_path / "a.txt", "".join(f" alpha {i}\n" for i in range(60)))
    second = _write(tmp_path / "b.txt", "".join(f" beta gamma {i}\n" for i in range(60)))
    out = tmp_path / "out"
    prepare(str(first), out, tokenizer="bytes", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already holds prepared data .*--overwrite"):
        prepare(str(second), out, tokenizer="word", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    meta = prepare(str(second), out, tokenizer="word", progress=False, overwrite=True)
    assert read_meta(out)["tokenizer"] == meta["tokenizer"] == "word"
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder left behind


@pytest.mark.parametrize("model_file", ["model.safetensors", "checkpoints/step_00000010/model.safetensors"])
def test_prepare_never_writes_into_a_checkpoint_or_run_even_with_overwrite(tmp_path, model_file):
    source = _write(tmp_path / "a.txt", "".join(f" alpha {i}\n" for i in range(60)))
    out = tmp_path / "run"
    (out / model_file).parent.mkdir(parents=True, exist_ok=True)
    (out / model_file).write_bytes(b"weights")
    (out / "meta.json").write_text('{"model": {}}')
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds a model checkpoint or a training run"):
            prepare(str(source), out, tokenizer="bytes", progress=False, overwrite=overwrite)
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before


def test_default_data_dir_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: the repository's own neighbour is used
    found = default_data_dir()
    if SHARED is None:
        pytest.skip("no ../shared/data beside this checkout")
    assert found == SHARED


def test_cli_prepare_refuses_existing_output(tmp_path, capsys):
    from alibi_lm.cli import main

    src = _write(tmp_path / "a.txt", "".join(f" alpha {i}\n" for i in range(60)))
    assert main(["prepare", str(src), "-o", str(tmp_path / "out"), "--tokenizer", "bytes", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(src), "-o", str(tmp_path / "out"), "--tokenizer", "bytes", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main(["prepare", str(src), "-o", str(tmp_path / "out"), "--tokenizer", "bytes", "--no-progress",
                 "--overwrite"]) == 0


def test_missing_wikitext_names_the_command_that_takes_its_folder(tmp_path):
    with pytest.raises(UserError, match=r"alibi-lm prepare wikitext-2 --data-dir DIR -o OUT"):
        read_corpus("wikitext-2", data_dir=tmp_path)


def test_prepare_never_writes_among_other_files(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "notes.txt").write_text("my own text\n" * 50)
    with pytest.raises(UserError, match=r"holds other files \(notes.txt\)"):
        prepare(str(out / "notes.txt"), out, tokenizer="bytes", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # an empty folder, or one left with only hidden files, is fine
    (tmp_path / "empty" / ".cache").mkdir(parents=True)
    assert prepare(str(out / "notes.txt"), tmp_path / "empty", tokenizer="bytes", progress=False)["vocab_size"] > 0


@pytest.mark.parametrize(("source", "args", "message"), [
    ("embedded", {"valid_fraction": 1.5}, "--valid-fraction must be a share of the lines between 0 and 0.5"),
    ("embedded", {"test_fraction": 0.0}, "--test-fraction must be a share"),
    ("wikitext-2", {"test_fraction": 0.1}, "own train/valid/test splits; leave out --test-fraction"),
])
def test_held_out_shares_are_checked_for_every_source(tmp_path, source, args, message):
    """`prepare embedded --valid-fraction 1.5` exited 0 with the default split (issue 16)."""
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(source, tmp_path / "out", tokenizer="bytes", progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_embedded_takes_the_held_out_shares(tmp_path):
    small = prepare("embedded", tmp_path / "a", tokenizer="bytes", progress=False, valid_fraction=0.01)
    default = prepare("embedded", tmp_path / "b", tokenizer="bytes", progress=False)
    assert small["splits"]["valid"]["lines"] < default["splits"]["valid"]["lines"] / 3
    assert small["splits"]["test"]["lines"] == default["splits"]["test"]["lines"]


def test_the_data_folder_variable_comes_first(tmp_path, monkeypatch):
    (tmp_path / "mine" / "wikitext-2").mkdir(parents=True)
    monkeypatch.setenv("ALIBI_LM_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == (tmp_path / "mine").resolve()
    with pytest.raises(UserError, match="no wiki.train.tokens"):
        prepare("wikitext-2", tmp_path / "out", tokenizer="word", progress=False)
    monkeypatch.setenv("ALIBI_LM_DATA", str(tmp_path / "absent"))  # a missing folder falls through
    assert default_data_dir() != (tmp_path / "absent").resolve()

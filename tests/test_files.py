"""files.py: JSON in and out, folder kinds, output files checked before the work, permissions."""

import json
import os
import stat

import pytest

from alibi_lm.errors import UserError
from alibi_lm.files import (
    check_output_file,
    folder_kind,
    is_results_file,
    read_json,
    read_json_or_none,
    shareable,
    write_json,
)


def test_read_json_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="results file .*missing.json does not exist"):
        read_json(tmp_path / "missing.json", "results file")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="is a directory"):
        read_json(tmp_path)
    (tmp_path / "latin.json").write_bytes(b"\xff\xfe")
    assert read_json_or_none(tmp_path / "latin.json") is None
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]} and not (tmp_path / "ok.json.tmp").exists()


def test_folder_kind_reads_the_marker_files(tmp_path):
    kinds = {"prepared": {"meta.json": {"splits": {}}}, "checkpoint": {"meta.json": {"model": {}}},
             "run": {"config.json": {"model": {}, "data": {}, "run": {}}}, "hf": {"config.json": {"model_type": "x"}}}
    for kind, files in kinds.items():
        (tmp_path / kind).mkdir()
        for name, content in files.items():
            (tmp_path / kind / name).write_text(json.dumps(content))
        assert folder_kind(tmp_path / kind) == kind
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    assert folder_kind(tmp_path / "run2") == "run"
    (tmp_path / "empty").mkdir()
    assert folder_kind(tmp_path / "empty") is None and folder_kind(tmp_path / "nowhere") is None


def test_check_output_file_replaces_only_its_own_files(tmp_path):
    ours = tmp_path / "eval.json"
    write_json(ours, {"format": "alibi-lm-eval", "evaluations": []})
    assert is_results_file(ours)
    check = dict(option="-o", kind="results file", ours=is_results_file, example="eval.json")
    assert check_output_file(ours, **check) == ours
    corpus = tmp_path / "corpus.json"
    corpus.write_text('{"text": "precious"}')
    with pytest.raises(UserError, match="is not an alibi-lm results file"):
        check_output_file(corpus, **check)
    assert corpus.read_text() == '{"text": "precious"}'
    with pytest.raises(UserError, match="is a directory; give a file name such as"):
        check_output_file(tmp_path, **check)
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(corpus / "x.json", **check)
    assert check_output_file(tmp_path / "new" / "deep" / "e.json", **check).parent.is_dir()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_shareable_follows_the_umask(tmp_path, mask):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.safetensors").write_bytes(b"x")
    os.chmod(folder / "sub" / "w.safetensors", 0o600)
    os.chmod(folder, 0o700)
    old = os.umask(mask)
    try:
        shareable(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((folder / "sub" / "w.safetensors").stat().st_mode) == 0o666 & ~mask

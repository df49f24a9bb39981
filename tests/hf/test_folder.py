"""The files of a Hugging Face folder: weight layouts, config.json field types, the export folder's
checks and atomic replacement, errors that name the user's paths."""

import json
import os
import stat

import pytest
import torch
from _hf_models import TOL, VOCAB, bloom_checkpoint, cli_errors, hf_logits, our_logits, saved_bloom, sharpen, tokens
from transformers import BloomForCausalLM

from alibi_lm.cli import main
from alibi_lm.errors import UserError
from alibi_lm.hf import bloom_model_config, export_bloom, import_checkpoint, import_hf
from alibi_lm.model import TransformerLM
from alibi_lm.tokenizer import Tokenizer


def test_import_reads_sharded_bin_and_bare_layouts(tmp_path):
    """Hub folders come sharded, as pytorch_model.bin, or (early BLOOM uploads) with the bare model's
    tensor names and `n_embed` for the width; all import to the same model."""
    from safetensors.torch import load_file, save_file

    theirs = saved_bloom(tmp_path / "single", 6)
    expected = our_logits(import_hf(tmp_path / "single")[0], tokens(1, 20))
    state = load_file(str(tmp_path / "single" / "model.safetensors"))
    config = json.loads((tmp_path / "single" / "config.json").read_text())

    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))

    (tmp_path / "bare").mkdir()
    bare_state = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(bare_state, str(tmp_path / "bare" / "model.safetensors"))
    bare = {("n_embed" if k == "hidden_size" else k): v for k, v in config.items()}
    (tmp_path / "bare" / "config.json").write_text(json.dumps(bare))

    for layout in ("sharded", "bin", "bare"):
        assert torch.equal(our_logits(import_hf(tmp_path / layout)[0], tokens(1, 20)), expected), layout


def test_export_overwrite_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    model = TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)).eval()
    sharpen(model, 3)
    out = tmp_path / "hf"
    export_bloom(model, out, train_len=16)
    first = (out / "model.safetensors").read_bytes()
    (out / "stale.txt").write_text("from an older export")

    # a failure while the new folder is renamed in leaves the old export whole, and no stray folders
    real_rename = type(out).rename

    def failing_rename(self, target):
        if self.name.startswith(".hf.") and not self.name.startswith(".hf.old."):
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", failing_rename)
    sharpen(model, 4)
    with pytest.raises(OSError, match="disk full"):
        export_bloom(model, out, train_len=16, overwrite=True)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == first and (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    export_bloom(model, out, train_len=16, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    hf = BloomForCausalLM.from_pretrained(out).eval()
    x = tokens(2, 12, seed=5)
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), atol=TOL, rtol=0)


def test_cli_import_reports_unreadable_weight_files_in_one_line(tmp_path, capsys):
    folder = tmp_path / "bloom"
    saved_bloom(folder, 4)
    (folder / "model.safetensors").unlink()
    for name, content in (("pytorch_model.bin", b"junk\n"), ("pytorch_model.bin", b"\x80\x02}q\x00.garbage"),
                          ("model.safetensors", b"junk\n")):
        (folder / name).write_bytes(content)
        code, err = cli_errors(["import", str(folder), str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and f"cannot read {folder / name} (truncated or corrupt?)" in err[0], err
        (folder / name).unlink()
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")  # a readable file, but no state dict
    code, err = cli_errors(["import", str(folder), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "does not hold a state dict" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "change", "message"), [
    ("bloom", {"n_head": "four"}, "n_head must be int, got 'four'"),
    ("bloom", {"hidden_size": 0}, "hidden_size must be a positive integer"),
    ("bloom", {"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be float, got '1e-5'"),
    ("bloom", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be bool, got 'false'"),
    ("bloom", {"seq_length": "2048"}, "seq_length must be int, got '2048'"),
    ("mpt", {"n_layers": 2.5}, "n_layers must be int, got 2.5"),
    ("mpt", {"max_seq_len": "64"}, "max_seq_len must be int, got '64'"),
    ("mpt", {"attn_config": ["alibi"]}, "attn_config must be a JSON object"),
    ("mpt", {"attn_config": {"alibi_bias_max": "8"}}, "attn_config.alibi_bias_max must be float, got '8'"),
    ("mpt", {"attn_config": {"clip_qkv": True}}, "attn_config.clip_qkv must be float, got True"),
    ("mpt", {"attn_config": {"softmax_scale": -0.5}}, "attn_config.softmax_scale must be a positive number"),
])
def test_import_names_a_config_field_of_the_wrong_type(tmp_path, arch, change, message):
    from safetensors.torch import save_file

    base = ({"model_type": "bloom", "hidden_size": 32, "n_head": 4, "n_layer": 1} if arch == "bloom" else
            {"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 1, "max_seq_len": 64})
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    # the fields are checked before any tensor is looked up, so one stand-in tensor is enough
    save_file({"transformer.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=message) as error:
        import_hf(tmp_path)
    assert str(error.value).startswith("config.json: ")


def test_export_and_import_name_the_users_destination_not_a_temporary_one(tmp_path, capsys, monkeypatch):
    import errno
    import sys
    from pathlib import Path

    import safetensors.torch

    ckpt = bloom_checkpoint(tmp_path / "ck")
    hf = tmp_path / "hf"
    export_bloom(TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)), hf)
    (tmp_path / "file").write_text("x")
    destinations = [(tmp_path / "file" / "out", "is a file, not a folder")]
    if sys.platform == "linux":  # /proc takes no new folders, even from root
        destinations.append((Path("/proc/alibi-lm-out"), "cannot write in /proc"))
    for out, message in destinations:
        for argv in (["export", str(ckpt), str(out)], ["import", str(hf), str(out)]):
            code, err = cli_errors(argv, capsys)
            assert code == 2 and len(err) == 1 and f"cannot create {out}: " in err[0] and message in err[0], err

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, out in ((["export", str(ckpt), str(tmp_path / "new-hf")], tmp_path / "new-hf"),
                      (["import", str(hf), str(tmp_path / "new-ck")], tmp_path / "new-ck")):
        code, err = cli_errors(argv, capsys)
        assert code == 2 and err == [f"alibi-lm {argv[0]}: error: No space left on device: {out}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folders left behind


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    ckpt = bloom_checkpoint(tmp_path / "ck")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    code, err = cli_errors(["export", str(ckpt), str(notes), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not an earlier export" in err[0], err
    assert (notes / "notes.txt").read_text() == "my notes"

    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), str(hf)]) == 0
    (hf / "data").mkdir()  # an export writes no folders: this one is the user's
    code, err = cli_errors(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not an earlier export" in err[0] and "'data'" in err[0], err
    (hf / "data").rmdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = cli_errors(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not a BLOOM config" in err[0], err
    (hf / "config.json").unlink()
    code, err = cli_errors(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "no config.json" in err[0], err
    assert (hf / "model.safetensors").is_file()
    # an earlier export, with a tokenizer or not, is replaced
    assert main(["export", str(ckpt), str(tmp_path / "hf2")]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "hf2"), "--overwrite"]) == 0


def test_export_and_import_follow_the_umask(tmp_path):
    """safetensors writes 0600 and the export's temporary folder is 0700; both the exported folder and
    an imported checkpoint must be as readable as the user's umask allows (issue 16)."""
    old = os.umask(0o022)
    try:
        exported = export_bloom(TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)), tmp_path / "hf",
                                tokenizer=Tokenizer.bytes())
        imported, _ = import_checkpoint(exported, tmp_path / "ck")
    finally:
        os.umask(old)
    for folder in (exported, imported):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}
        assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes

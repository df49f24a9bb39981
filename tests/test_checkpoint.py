"""Checkpoints: round trip, tied weights, atomic replace, keep-last-K, corruption is a clear error."""

import json

import pytest
import torch

from alibi_lm.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    save_model_checkpoint,
    step_checkpoints,
    step_directory,
)
from alibi_lm.errors import UserError
from alibi_lm.model import ModelConfig, TransformerLM
from alibi_lm.tokenizer import Tokenizer


def _model(**kw):
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, **kw))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = _model(tie_embeddings=tie, position="rotary")
    path = save_model_checkpoint(tmp_path / "ck", model, train_len=64, tokenizer=Tokenizer.bytes(),
                                 extra_meta={"note": "x"})
    ckpt = load_checkpoint(path)
    x = torch.randint(0, 256, (2, 20))
    assert torch.equal(model.eval()(x)[0], ckpt.model(x)[0])
    assert ckpt.config == model.cfg and ckpt.train_len == 64 and ckpt.meta["note"] == "x"
    assert ckpt.tokenizer.kind == "bytes" and not ckpt.model.training
    if tie:
        assert ckpt.model.lm_head.weight is ckpt.model.embed.weight
    from safetensors.torch import load_file

    assert ("lm_head.weight" in load_file(str(path / "model.safetensors"))) == (not tie)


def test_checkpoint_files_follow_the_umask(tmp_path):
    """safetensors writes 0600; a checkpoint on a shared machine must be readable as the umask allows."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_model_checkpoint(tmp_path / "ck", _model(), train_len=8, tokenizer=Tokenizer.bytes())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_run_directory_resolves_to_newest_and_prune_keeps_last(tmp_path):
    model = _model()
    for step in (1, 2, 10):
        save_model_checkpoint(step_directory(tmp_path, step), model, train_len=8, extra_meta={"step": step})
    (tmp_path / "checkpoints" / ".tmp-step_00000011-1-x").mkdir()  # an interrupted write is ignored
    assert load_checkpoint(tmp_path).meta["step"] == 10
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]


def test_replacing_an_existing_checkpoint_is_atomic_and_failure_keeps_the_old(tmp_path):
    class Broken(Tokenizer):
        def save(self, directory):
            raise OSError("disk full")

    path = save_model_checkpoint(tmp_path / "ck", _model(), train_len=8)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        save_model_checkpoint(tmp_path / "ck", _model(n_kv_heads=2), train_len=8,
                              tokenizer=Broken("bytes", Tokenizer.bytes().hf, None))
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind
    save_model_checkpoint(tmp_path / "ck", _model(n_kv_heads=2), train_len=8)
    assert load_checkpoint(path).config.n_kv_heads == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad_json", "no_meta", "missing_weights"])
def test_corrupt_checkpoint_is_a_user_error_and_is_not_deleted(tmp_path, damage):
    path = save_model_checkpoint(tmp_path / "ck", _model(), train_len=8)
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "bad_json":
        (path / "meta.json").write_text("{not json")
    elif damage == "no_meta":
        (path / "meta.json").unlink()
    else:
        weights.unlink()
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
    assert path.is_dir()


def test_missing_checkpoint_and_wrong_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_model_checkpoint(tmp_path / "ck", _model(), train_len=8)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError, match="format"):
        load_checkpoint(path)


def test_prepared_data_or_foreign_meta_json_is_not_called_a_checkpoint_format(tmp_path):
    from alibi_lm.data import prepare

    (tmp_path / "corpus.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer="bytes", progress=False)
    with pytest.raises(UserError, match="is not a checkpoint \\(a prepared data directory\\)"):
        load_checkpoint(tmp_path / "data")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "other")


def test_damaged_training_state_does_not_stop_inference_but_stops_a_resume(tmp_path):
    from alibi_lm.checkpoint import model_state, read_checkpoint_meta, write_checkpoint

    model = _model()
    path = tmp_path / "step_00000005"
    write_checkpoint(path, state=model_state(model), config=model.cfg, train_len=8,
                     tensors={"optimizer": {"exp_avg.0": torch.randn(7)}, "train_state": {"rng": torch.randn(3)}})
    (path / "optimizer.safetensors").write_bytes(b"damaged")
    loaded = load_checkpoint(path)  # evaluation and generation read only the weights
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="optimizer.safetensors is truncated or damaged"):
        read_checkpoint_meta(path)  # what a resume checks

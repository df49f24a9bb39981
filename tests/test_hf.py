"""BLOOM / MPT interop against transformers itself: tiny random models built here (no download),
float32, seeded. Weights are re-drawn with a larger spread than the init so that attention is sharp
and a wrong slope, layout or scale shows in the logits (the negative controls check that)."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

from alibi_lm.cli import main
from alibi_lm.errors import UserError
from alibi_lm.generate import generate
from alibi_lm.hf import bloom_mismatches, bloom_model_config, export_bloom, import_checkpoint, import_hf
from alibi_lm.model import ModelConfig, TransformerLM
from alibi_lm.tokenizer import train_tokenizer

TOL = 1e-4
VOCAB = 61


def sharpen(module: torch.nn.Module, seed: int, spread: float = 0.15) -> None:
    """Seeded weights with `spread` around each tensor's init (norm gains stay near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * spread)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def our_logits(model: TransformerLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def saved_bloom(tmp_path, n_heads: int, tie: bool = True) -> BloomForCausalLM:
    torch.manual_seed(n_heads)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=8 * n_heads, n_layer=2, n_head=n_heads,
                                         tie_word_embeddings=tie)).eval()
    sharpen(model, n_heads)
    model.save_pretrained(tmp_path)
    return model


def our_bloom(n_heads: int = 6, seed: int = 0, tie: bool = True, spread: float = 0.15) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(bloom_model_config(VOCAB, 2, 8 * n_heads, n_heads, tie_embeddings=tie)).eval()
    sharpen(model, seed, spread)
    return model


@pytest.mark.parametrize(("n_heads", "tie"), [(4, True), (6, False), (12, True)])
def test_import_bloom_logits_equal_transformers(tmp_path, n_heads, tie):
    theirs = saved_bloom(tmp_path, n_heads, tie)
    ours, tokenizer, info = import_hf(tmp_path)
    assert info["architecture"] == "bloom" and tokenizer is None
    assert ours.cfg.tie_embeddings == tie and ours.cfg.slope_rule == "paper"
    x = tokens(2, 37)
    expected = hf_logits(theirs, x)
    assert expected.std() > 0.5  # the logits are not near zero, so 1e-4 is a real bound
    assert (our_logits(ours, x) - expected).abs().max() <= TOL


@pytest.mark.parametrize(("n_heads", "clip_qkv", "softmax_scale"), [(4, None, None), (6, 0.6, None), (12, None, 0.2)])
def test_import_mpt_logits_equal_transformers(tmp_path, n_heads, clip_qkv, softmax_scale):
    torch.manual_seed(n_heads)
    attn = {"clip_qkv": clip_qkv, "softmax_scale": softmax_scale}
    theirs = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=8 * n_heads, n_heads=n_heads, n_layers=2,
                                      max_seq_len=64, attn_config=attn)).eval()
    sharpen(theirs, n_heads)
    theirs.save_pretrained(tmp_path)
    ours, _, info = import_hf(tmp_path)
    assert info["architecture"] == "mpt"
    assert (ours.cfg.slope_rule, ours.cfg.bias, ours.cfg.qkv_clip, ours.cfg.attn_scale) == (
        "mpt", False, clip_qkv, softmax_scale)
    x = tokens(2, 40)
    expected = hf_logits(theirs, x)
    got = our_logits(ours, x)
    assert (got - expected).abs().max() <= TOL
    # negative controls: the slopes and each MPT-specific option are needed for the match
    for change in [("alibi_max_bias", 4.0)] + ([("qkv_clip", None)] if clip_qkv else []) + \
                  ([("attn_scale", None)] if softmax_scale else []):
        wrong = TransformerLM(ModelConfig(**{**ours.cfg.to_dict(), change[0]: change[1]})).eval()
        wrong.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "position.slopes"}, strict=False)
        assert (our_logits(wrong, x) - expected).abs().max() > 1e-3, change


def test_import_mpt_keeps_alibi_bias_max(tmp_path):
    model = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=1, max_seq_len=32,
                                     attn_config={"alibi_bias_max": 16}))
    model.save_pretrained(tmp_path)
    ours, _, info = import_hf(tmp_path)
    # MosaicML's code uses alibi_bias_max; transformers' port always uses 8, and the note says so
    assert ours.cfg.alibi_max_bias == 16 and info["train_len"] == 32
    assert any("alibi_bias_max" in note for note in info["notes"])


def test_export_loads_in_transformers_with_same_logits_and_tokenizer(tmp_path):
    lines = ["the cat sat on the mat", "a dog sat on the log", "the cat saw a dog"]
    tok = train_tokenizer("word", lines)
    model = TransformerLM(bloom_model_config(tok.vocab_size, 2, 48, 6)).eval()
    sharpen(model, 1)
    out = export_bloom(model, tmp_path / "bloom", tokenizer=tok, train_len=16)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    theirs = BloomForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    assert (our_logits(model, x) - hf_logits(theirs, x)).abs().max() <= TOL
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "the dog sat on the cat\na mat"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id is not None
    assert json.loads((out / "config.json").read_text())["seq_length"] == 16


def test_export_bytes_tokenizer_encodes_identically(tmp_path):
    from alibi_lm.tokenizer import Tokenizer

    tok = Tokenizer.bytes()
    out = export_bloom(our_bloom(4), tmp_path / "b", tokenizer=tok)
    text = "héllo, wörld\n  two  spaces"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok.encode(text)


def test_greedy_generation_matches_transformers_beyond_training_length(tmp_path):
    # a random model soon repeats itself; this seed and spread keep three tokens in play
    model = our_bloom(6, seed=2, spread=0.3)
    out = export_bloom(model, tmp_path / "bloom", train_len=16)
    theirs = BloomForCausalLM.from_pretrained(out).eval()
    prompt = tokens(1, 10, seed=4)[0].tolist()
    new = 40  # 50 tokens in all: three times the training length
    ours = generate(model, [prompt], max_new_tokens=new, temperature=0)[0]
    with torch.no_grad():
        hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    assert ours == hf.sequences[0, len(prompt):].tolist()
    assert len(set(ours)) >= 3
    # and the distribution behind every greedy step, out to position 49, not only its argmax
    full = torch.tensor([prompt + ours[:-1]])
    steps = our_logits(model, full)[0, len(prompt) - 1:]
    assert (steps - torch.cat(hf.scores)).abs().max() <= TOL


def test_round_trip_is_bit_identical(tmp_path):
    for tie in (True, False):
        model = our_bloom(12, seed=5, tie=tie)
        export_bloom(model, tmp_path / f"bloom{tie}", train_len=32)
        back, _, info = import_hf(tmp_path / f"bloom{tie}")
        assert info["train_len"] == 32 and back.cfg == model.cfg
        mine, theirs = model.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_left_padded_batch_generation_equals_single_sequences(tmp_path):
    model = our_bloom(6, seed=7)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 13, 9)]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0)
    single = [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert batched == single
    # BLOOM, given the same left-padded batch and its attention mask, agrees
    theirs = BloomForCausalLM.from_pretrained(export_bloom(model, tmp_path / "bloom")).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, width:].tolist()
    assert hf == batched


def test_export_refuses_what_bloom_cannot_express(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=48, n_heads=6, n_kv_heads=2, norm="rmsnorm",
                      activation="swiglu", alibi_max_bias=4.0, bias=False, d_ff=100)
    with pytest.raises(UserError) as error:
        export_bloom(TransformerLM(cfg), tmp_path / "x")
    message = str(error.value)
    assert "\n" not in message
    for field in ("norm=", "activation=", "embed_norm=", "bias=", "n_kv_heads=", "alibi_max_bias=", "d_ff="):
        assert field in message, field
    assert not (tmp_path / "x").exists()
    rotary = TransformerLM(bloom_model_config(VOCAB, 1, 32, 4, position="rotary"))
    assert [m.split("=")[0] for m in bloom_mismatches(rotary)] == ["position"]
    moved = TransformerLM(bloom_model_config(VOCAB, 1, 32, 4, trainable_slopes=True))
    with torch.no_grad():
        moved.position.slopes.mul_(1.1)
    assert any("slopes moved" in m for m in bloom_mismatches(moved))
    assert bloom_mismatches(our_bloom(12)) == []


def _cli(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_import_rejects_bad_folders(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, err = _cli(["import", str(gpt2), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "BLOOM and MPT" in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(["import", str(empty), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "no config.json" in err[0]

    no_weights = tmp_path / "bloom"
    saved_bloom(no_weights, 4)
    (no_weights / "model.safetensors").unlink()
    code, err = _cli(["import", str(no_weights), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "no weights" in err[0]

    truncated = tmp_path / "truncated"
    saved_bloom(truncated, 4)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _cli(["import", str(truncated), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "truncated or corrupt" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_export_then_import_round_trip(tmp_path, capsys):
    from alibi_lm.checkpoint import load_checkpoint, save_model_checkpoint

    tok = train_tokenizer("word", ["the cat sat on the mat", "a dog sat on the log"])
    model = TransformerLM(bloom_model_config(tok.vocab_size, 1, 24, 6)).eval()
    sharpen(model, 9)
    save_model_checkpoint(tmp_path / "ck", model, train_len=24, tokenizer=tok)
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "hf"), "--format", "bloom"]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.train_len == 24 and back.meta["imported_from"]["architecture"] == "bloom"
    assert back.tokenizer is not None and back.tokenizer.encode("the dog sat") == tok.encode("the dog sat")
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in model.state_dict().items())

    # exporting over existing files, or a model BLOOM cannot express, is one line and exit code 2
    code, err = _cli(["export", str(tmp_path / "ck"), str(tmp_path / "hf")], capsys)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    code, err = _cli(["export", str(tmp_path / "ck"), str(tmp_path / "ck"), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "never replaced" in err[0]
    assert load_checkpoint(tmp_path / "ck").train_len == 24
    # --overwrite never deletes a run directory, nor a folder that holds the checkpoint being exported
    run = tmp_path / "runs" / "r"
    save_model_checkpoint(run / "checkpoints" / "step_00000001", model, train_len=24, tokenizer=tok)
    for out in (run, tmp_path / "runs"):
        code, err = _cli(["export", str(run), str(out), "--overwrite"], capsys)
        assert code == 2 and len(err) == 1 and "never replaced" in err[0]
    code, err = _cli(["export", str(tmp_path / "ck"), str(run), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "run directory" in err[0]
    assert load_checkpoint(run).train_len == 24
    save_model_checkpoint(tmp_path / "rope", TransformerLM(ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=24,
                                                                       n_heads=6, position="rotary")), train_len=8)
    code, err = _cli(["export", str(tmp_path / "rope"), str(tmp_path / "hf2")], capsys)
    assert code == 2 and len(err) == 1
    assert all(f in err[0] for f in ("position=", "activation=", "embed_norm="))
    assert not (tmp_path / "hf2").exists()
    code, err = _cli(["import", str(tmp_path / "hf"), str(tmp_path / "back")], capsys)
    assert code == 2 and len(err) == 1 and "already exists" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["bloom", "mpt"])
def test_imported_models_run_on_the_triton_kernel(tmp_path, kind):
    """An imported model in bf16 on the fused kernel is as close to transformers' float32 logits as
    transformers' own bf16 run is (within 2x), over a length that spans many kernel blocks."""
    torch.manual_seed(0)
    if kind == "bloom":
        theirs = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=384, n_layer=2, n_head=12))
    else:
        theirs = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=192, n_heads=6, n_layers=2, max_seq_len=512,
                                          attn_config={"clip_qkv": 0.6, "softmax_scale": 0.1}))
    sharpen(theirs, 1, spread=0.05)
    theirs.eval().save_pretrained(tmp_path)
    ours, _, _ = import_hf(tmp_path)
    ours.cfg.attention_backend = "triton"
    x = tokens(2, 400).cuda()
    with torch.no_grad():
        exact = theirs.cuda()(x).logits.float()
        their_bf16 = theirs.to(torch.bfloat16)(x).logits.float()
        our_bf16 = ours.cuda().to(torch.bfloat16)(x)[0].float()
    their_error = (their_bf16 - exact).abs().max().item()
    assert (our_bf16 - exact).abs().max().item() <= 2 * their_error + 1e-3


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


def _bloom_checkpoint(path):
    from alibi_lm.checkpoint import save_model_checkpoint

    save_model_checkpoint(path, TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)), train_len=16)
    return path


def test_cli_import_reports_unreadable_weight_files_in_one_line(tmp_path, capsys):
    folder = tmp_path / "bloom"
    saved_bloom(folder, 4)
    (folder / "model.safetensors").unlink()
    for name, content in (("pytorch_model.bin", b"junk\n"), ("pytorch_model.bin", b"\x80\x02}q\x00.garbage"),
                          ("model.safetensors", b"junk\n")):
        (folder / name).write_bytes(content)
        code, err = _cli(["import", str(folder), str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and f"cannot read {folder / name} (truncated or corrupt?)" in err[0], err
        (folder / name).unlink()
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")  # a readable file, but no state dict
    code, err = _cli(["import", str(folder), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "does not hold a state dict" in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_import_says_an_alibi_lm_checkpoint_or_run_needs_no_import(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint

    ckpt = _bloom_checkpoint(tmp_path / "ck")
    run = tmp_path / "run"
    save_model_checkpoint(run / "checkpoints" / "step_00000001", TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)),
                          train_len=16)
    (run / "config.json").write_text(json.dumps({"model": {"position": "alibi"}, "run": {}, "data": {}}))
    for path, kind in ((ckpt, "checkpoint"), (run, "run directory")):
        code, err = _cli(["import", str(path), str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and f"already an alibi-lm {kind} and needs no import" in err[0], err


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

    ckpt = _bloom_checkpoint(tmp_path / "ck")
    hf = tmp_path / "hf"
    export_bloom(TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)), hf)
    (tmp_path / "file").write_text("x")
    destinations = [(tmp_path / "file" / "out", "is a file, not a folder")]
    if sys.platform == "linux":  # /proc takes no new folders, even from root
        destinations.append((Path("/proc/alibi-lm-out"), "cannot write in /proc"))
    for out, message in destinations:
        for argv in (["export", str(ckpt), str(out)], ["import", str(hf), str(out)]):
            code, err = _cli(argv, capsys)
            assert code == 2 and len(err) == 1 and f"cannot create {out}: " in err[0] and message in err[0], err

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, out in ((["export", str(ckpt), str(tmp_path / "new-hf")], tmp_path / "new-hf"),
                      (["import", str(hf), str(tmp_path / "new-ck")], tmp_path / "new-ck")):
        code, err = _cli(argv, capsys)
        assert code == 2 and err == [f"alibi-lm {argv[0]}: error: No space left on device: {out}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folders left behind


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    ckpt = _bloom_checkpoint(tmp_path / "ck")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    code, err = _cli(["export", str(ckpt), str(notes), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not an earlier export" in err[0], err
    assert (notes / "notes.txt").read_text() == "my notes"

    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), str(hf)]) == 0
    (hf / "data").mkdir()  # an export writes no folders: this one is the user's
    code, err = _cli(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not an earlier export" in err[0] and "'data'" in err[0], err
    (hf / "data").rmdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = _cli(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "not a BLOOM config" in err[0], err
    (hf / "config.json").unlink()
    code, err = _cli(["export", str(ckpt), str(hf), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "no config.json" in err[0], err
    assert (hf / "model.safetensors").is_file()
    # an earlier export, with a tokenizer or not, is replaced
    assert main(["export", str(ckpt), str(tmp_path / "hf2")]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "hf2"), "--overwrite"]) == 0


def test_import_notes_go_to_stderr_and_the_result_line_to_stdout(tmp_path, capsys):
    from alibi_lm.cli import main

    model = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=1, max_seq_len=32,
                                     attn_config={"alibi_bias_max": 16}))
    model.save_pretrained(tmp_path / "mpt")
    assert main(["import", str(tmp_path / "mpt"), str(tmp_path / "ck")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote ") and captured.out.count("\n") == 1, captured.out
    assert "note:" in captured.err and "alibi_bias_max" in captured.err


def test_export_and_import_follow_the_umask(tmp_path):
    """safetensors writes 0600 and mkdtemp 0700: exports and imports were unreadable to others (issue 16)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        export_bloom(our_bloom(6), tmp_path / "bloom", train_len=32)
        import_checkpoint(tmp_path / "bloom", tmp_path / "ck")
    finally:
        os.umask(old)
    for folder in (tmp_path / "bloom", tmp_path / "ck"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o644}, modes

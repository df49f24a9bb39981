"""BLOOM both ways against transformers' BloomForCausalLM: export, import, round trips, generation."""

import json

import pytest
import torch
from _hf_models import TOL, VOCAB, cli_errors, hf_logits, our_bloom, our_logits, saved_bloom, sharpen, tokens
from transformers import AutoTokenizer, BloomForCausalLM

from alibi_lm.cli import main
from alibi_lm.errors import UserError
from alibi_lm.generate import generate
from alibi_lm.hf import bloom_mismatches, bloom_model_config, export_bloom, import_hf
from alibi_lm.model import ModelConfig, TransformerLM
from alibi_lm.tokenizer import train_tokenizer


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
    code, err = cli_errors(["export", str(tmp_path / "ck"), str(tmp_path / "hf")], capsys)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    code, err = cli_errors(["export", str(tmp_path / "ck"), str(tmp_path / "ck"), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "never replaced" in err[0]
    assert load_checkpoint(tmp_path / "ck").train_len == 24
    # --overwrite never deletes a run directory, nor a folder that holds the checkpoint being exported
    run = tmp_path / "runs" / "r"
    save_model_checkpoint(run / "checkpoints" / "step_00000001", model, train_len=24, tokenizer=tok)
    for out in (run, tmp_path / "runs"):
        code, err = cli_errors(["export", str(run), str(out), "--overwrite"], capsys)
        assert code == 2 and len(err) == 1 and "never replaced" in err[0]
    code, err = cli_errors(["export", str(tmp_path / "ck"), str(run), "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "run directory" in err[0]
    assert load_checkpoint(run).train_len == 24
    save_model_checkpoint(tmp_path / "rope", TransformerLM(ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=24,
                                                                       n_heads=6, position="rotary")), train_len=8)
    code, err = cli_errors(["export", str(tmp_path / "rope"), str(tmp_path / "hf2")], capsys)
    assert code == 2 and len(err) == 1
    assert all(f in err[0] for f in ("position=", "activation=", "embed_norm="))
    assert not (tmp_path / "hf2").exists()
    code, err = cli_errors(["import", str(tmp_path / "hf"), str(tmp_path / "back")], capsys)
    assert code == 2 and len(err) == 1 and "already exists" in err[0]

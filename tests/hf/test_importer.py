"""import_hf and `alibi-lm import` over both families: which folders they take, and the Triton kernel on the result."""

import json

import pytest
import torch
from _hf_models import VOCAB, bloom_checkpoint, cli_errors, saved_bloom, sharpen, tokens
from transformers import BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

from alibi_lm.hf import bloom_model_config, import_hf
from alibi_lm.model import TransformerLM


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


def test_cli_import_rejects_bad_folders(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, err = cli_errors(["import", str(gpt2), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "BLOOM and MPT" in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli_errors(["import", str(empty), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "no config.json" in err[0]

    no_weights = tmp_path / "bloom"
    saved_bloom(no_weights, 4)
    (no_weights / "model.safetensors").unlink()
    code, err = cli_errors(["import", str(no_weights), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "no weights" in err[0]

    truncated = tmp_path / "truncated"
    saved_bloom(truncated, 4)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = cli_errors(["import", str(truncated), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "truncated or corrupt" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_import_says_an_alibi_lm_checkpoint_or_run_needs_no_import(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint

    ckpt = bloom_checkpoint(tmp_path / "ck")
    run = tmp_path / "run"
    save_model_checkpoint(run / "checkpoints" / "step_00000001", TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)),
                          train_len=16)
    (run / "config.json").write_text(json.dumps({"model": {"position": "alibi"}, "run": {}, "data": {}}))
    for path, kind in ((ckpt, "checkpoint"), (run, "run directory")):
        code, err = cli_errors(["import", str(path), str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and f"already an alibi-lm {kind} and needs no import" in err[0], err

"""MPT import against transformers' MptForCausalLM, and what transformers' port does not do."""

import pytest
import torch
from _hf_models import TOL, VOCAB, hf_logits, our_logits, saved_mpt, sharpen, tokens
from transformers import MptConfig, MptForCausalLM

from alibi_lm.cli import main
from alibi_lm.hf import import_hf
from alibi_lm.model import ModelConfig, TransformerLM


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
    saved_mpt(tmp_path, alibi_bias_max=16)
    ours, _, info = import_hf(tmp_path)
    # MosaicML's code uses alibi_bias_max; transformers' port always uses 8, and the note says so
    assert ours.cfg.alibi_max_bias == 16 and info["train_len"] == 32
    assert any("alibi_bias_max" in note for note in info["notes"])


def test_import_notes_go_to_stderr_and_the_result_line_to_stdout(tmp_path, capsys):
    saved_mpt(tmp_path / "mpt", alibi_bias_max=16)
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    assert main(["import", str(tmp_path / "mpt"), str(tmp_path / "ck")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'ck'} (MPT, "), out
    assert any(line.startswith("note: alibi_bias_max=16 ") for line in err.splitlines()), err

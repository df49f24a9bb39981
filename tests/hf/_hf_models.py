"""What the tests of alibi_lm.hf share: tiny random BLOOM and MPT models built here (no download),
float32, seeded. Weights are re-drawn with a larger spread than the init so that attention is sharp
and a wrong slope, layout or scale shows in the logits (the negative controls check that)."""

from __future__ import annotations

import torch
from transformers import BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

from alibi_lm.checkpoint import save_model_checkpoint
from alibi_lm.cli import main
from alibi_lm.hf import bloom_model_config
from alibi_lm.model import TransformerLM

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


def saved_mpt(path, **attn_config) -> MptForCausalLM:
    """A one-layer, six-head MPT saved in `path`, with `attn_config` (e.g. alibi_bias_max=16)."""
    model = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=1, max_seq_len=32,
                                     attn_config=attn_config))
    model.save_pretrained(path)
    return model


def our_bloom(n_heads: int = 6, seed: int = 0, tie: bool = True, spread: float = 0.15) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(bloom_model_config(VOCAB, 2, 8 * n_heads, n_heads, tie_embeddings=tie)).eval()
    sharpen(model, seed, spread)
    return model


def bloom_checkpoint(path):
    """A one-layer BLOOM-shaped alibi-lm checkpoint at `path`, returned."""
    save_model_checkpoint(path, TransformerLM(bloom_model_config(VOCAB, 1, 24, 6)), train_len=16)
    return path


def cli_errors(argv, capsys) -> tuple[int, list[str]]:
    """Run the CLI: (its exit code, the lines it wrote on stderr)."""
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()

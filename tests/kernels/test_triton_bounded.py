"""Bounded-error ALiBi attention against float64: the error never exceeds what the bound promises
(tolerance x the range of v, plus the dense kernel's own rounding), on random and adversarial inputs,
and it skips tiles where the bias allows it and none where it does not."""

from __future__ import annotations

import pytest
import torch
from _attention_check import max_err

from alibi_lm.kernels import attention, tile_stats
from alibi_lm.kernels.reference import attention_reference
from alibi_lm.kernels.triton_bounded import bounded_attention, key_norm_prefix_max
from alibi_lm.positions import alibi_slopes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
bf16 = torch.bfloat16


def _inputs(B, H, Hkv, Lq, Lk, D=32, scale=1.0, seed=0, dtype=bf16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * scale
    k = torch.randn(B, Hkv, Lk, D, generator=g) * scale
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _check(q, k, v, slopes, *, causal=True, q_offset=0, tolerance=1e-3) -> dict:
    """Assert the promise; return the tile counts."""
    stats: dict = {}
    out = bounded_attention(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, tolerance=tolerance,
                            stats=stats)
    sl64 = None if slopes is None else slopes.double()
    oracle = attention_reference(q.double(), k.double(), v.double(), slopes=sl64, causal=causal, q_offset=q_offset)
    dense = attention(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, backend="triton")
    # the truncated softmax moves each component by at most tolerance x (max_j v - min_j v)
    spread = (v.double().amax(dim=2) - v.double().amin(dim=2)).max().item()
    floor = 4 * 2.0**-8 * oracle.abs().max().item()
    assert max_err(out, oracle) <= tolerance * spread + 2 * max_err(dense, oracle) + floor, stats
    return stats


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 4, 70, 70, 0), (2, 6, 2, 20, 90, 70), (1, 4, 1, 1, 130, 129)],
                         ids=["square", "gqa-prefill", "decode"])
def test_random_inputs_stay_within_the_promise(causal, shape):
    B, H, Hkv, Lq, Lk, offset = shape
    if not causal and offset:
        pytest.skip("non-causal attention over a cache is not a case of ours")
    q, k, v = _inputs(B, H, Hkv, Lq, Lk)
    for tolerance in (0.3, 1e-2, 1e-6):
        _check(q, k, v, alibi_slopes(H).to(DEVICE), causal=causal, q_offset=offset, tolerance=tolerance)


def test_small_norms_and_steep_slopes_skip_most_tiles():
    q, k, v = _inputs(1, 2, 2, 256, 256, scale=0.3)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    loose = _check(q, k, v, slopes, tolerance=1e-3)
    strict = _check(q, k, v, slopes, tolerance=1e-12)
    assert loose["tiles_visited"] < 0.5 * loose["tiles_dense"]  # dense: 272, the diagonal alone: 32
    assert loose["tiles_visited"] <= strict["tiles_visited"] <= strict["tiles_dense"]


def test_where_the_bound_cannot_skip_it_does_not():
    """No slope (or a zero one), or keys of huge norm: every tile is read."""
    q, k, v = _inputs(1, 2, 2, 64, 64)
    for slopes in (None, torch.zeros(2, device=DEVICE)):
        stats = _check(q, k, v, slopes, tolerance=0.5)
        assert stats["tiles_visited"] == stats["tiles_dense"]


def test_a_far_key_of_huge_norm_is_found():
    """Key 0 aligned with every query and 200x longer than the others dominates every row however far:
    the norm bound keeps the kernel reading until it reaches it."""
    q, k, v = _inputs(1, 2, 2, 96, 96, scale=0.2)
    direction = q[0, 0].float().mean(0)
    k[0, :, 0] = (direction / direction.norm() * 40).to(k.dtype)
    stats = _check(q, k, v, torch.tensor([0.5, 0.25], device=DEVICE), tolerance=1e-3)
    assert stats["tiles_visited"] > 0


def test_negative_and_tiny_trained_slopes_and_equal_scores():
    q, k, v = _inputs(1, 3, 3, 64, 64)
    _check(q, k, v, torch.tensor([-0.05, 1e-7, 0.5], device=DEVICE), tolerance=1e-2)
    _check(q, k, v, torch.tensor([-0.05, 1e-7, 0.5], device=DEVICE), causal=False, tolerance=1e-2)
    zeros = torch.zeros_like(q)  # all-equal scores: the bias alone decides
    stats = _check(zeros, k, v, torch.tensor([0.5, 0.5, 0.5], device=DEVICE), tolerance=1e-3)
    assert stats["tiles_visited"] < stats["tiles_dense"]


def test_tolerance_zero_is_the_dense_kernel_and_stats_are_collected():
    q, k, v = _inputs(1, 4, 4, 40, 40)
    slopes = alibi_slopes(4).to(DEVICE)
    with torch.no_grad(), tile_stats() as stats:
        dense = attention(q, k, v, slopes=slopes, backend="triton")
        assert torch.equal(attention(q, k, v, slopes=slopes, backend="triton", tolerance=0.0), dense)
        assert stats == {"tiles_visited": 0, "tiles_dense": 0}
        bounded = attention(q, k, v, slopes=slopes, backend="triton", tolerance=1e-3)
    assert 0 < stats["tiles_visited"] <= stats["tiles_dense"] and bounded.shape == dense.shape
    with pytest.raises(ValueError, match="tolerance must be in"):
        attention(q, k, v, slopes=slopes, tolerance=1.0)


def test_key_norm_prefix_and_suffix_maxima():
    k = torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 6.0], [0.0, 1.0]]]])
    prefix, suffix = key_norm_prefix_max(k)
    assert prefix.tolist() == [[[5.0, 5.0, 6.0, 6.0]]] and suffix.tolist() == [[[6.0, 6.0, 6.0, 1.0]]]


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_where_the_bound_is_tight_the_error_is_what_was_left_out(tolerance):
    """Every query and key the same unit vector: Cauchy-Schwarz holds with equality, so the bound is the
    left-out mass itself. v is 1 on the far half of the keys and 0 on the near half, so the last row's
    error is the far half's share that was skipped: it must not pass the tolerance (a bound 64x too
    loose skips all of it, 1.7e-3 here, and fails at 1e-3)."""
    L, D = 256, 32
    u = torch.zeros(D)
    u[0] = 1.0
    q = u.expand(1, 1, L, D).to(DEVICE, bf16).contiguous()
    k = q.clone()
    v = torch.zeros(1, 1, L, D)
    v[:, :, : L // 2] = 1.0
    v = v.to(DEVICE, bf16)
    slopes = torch.tensor([0.05], device=DEVICE)
    out = bounded_attention(q, k, v, slopes=slopes, tolerance=tolerance, scale=1.0)
    oracle = attention_reference(q.double(), k.double(), v.double(), slopes=slopes.double(), scale=1.0)
    far_share = oracle[0, 0, -1, 0].item()
    assert 1e-3 < far_share < 1e-2  # the case is one where skipping the far half would break 1e-3
    assert (out[0, 0, -1].double() - oracle[0, 0, -1]).abs().max().item() <= tolerance + 2**-8 * far_share


def test_a_model_with_attn_tolerance_reads_fewer_tiles_and_gives_the_same_logits():
    from alibi_lm.model import ModelConfig, TransformerLM, set_attention_tolerance

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, attention_backend="triton")
    model = TransformerLM(cfg).to(DEVICE, bf16).eval()
    tokens = torch.randint(0, 64, (1, 96), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad(), tile_stats() as dense_stats:
        dense = model(tokens)[0].float()
    set_attention_tolerance(model, 1e-4)
    assert all(block.attn.cfg.attn_tolerance == 1e-4 for block in model.blocks)
    with torch.no_grad(), tile_stats() as stats:
        bounded = model(tokens)[0].float()
    assert dense_stats["tiles_dense"] == 0 and 0 < stats["tiles_visited"] < stats["tiles_dense"]
    assert (bounded - dense).abs().max().item() < 0.05 * dense.abs().max().item()
    with pytest.raises(ValueError, match="attn_tolerance must be in"):
        set_attention_tolerance(model, 1.5)


def test_the_cache_keeps_the_running_key_norm_maximum_and_decoding_stays_close():
    """A cache made for a model with attn_tolerance extends the norms' running maximum per append (the
    bound reads it every step instead of the whole cache), and decoding token by token gives the logits
    of one forward pass over the whole sequence."""
    from alibi_lm.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, attention_backend="triton",
                      attn_tolerance=1e-4)
    model = TransformerLM(cfg).to(DEVICE, bf16).eval()
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cache = model.new_cache(2, 8)  # grows twice on the way
    with torch.no_grad(), tile_stats() as stats:
        model(tokens[:, :30], cache=cache)
        steps = [model(tokens[:, i : i + 1], cache=cache)[0] for i in range(30, 40)]
        whole = model(tokens)[0]
    for layer in range(cfg.n_layers):
        keys = cache.keys[layer][:, :, : cache.length]
        torch.testing.assert_close(cache.key_norm_max(layer), key_norm_prefix_max(keys)[0])
    stepped = torch.cat(steps, dim=1).float()
    assert (stepped - whole[:, 30:].float()).abs().max().item() < 0.05 * whole.float().abs().max().item()
    assert 0 < stats["tiles_visited"] <= stats["tiles_dense"]  # 40 keys of a random model: little to skip

"""Attention dropout on every path that takes it: the share kept, no bias in expectation, the mask a
function of torch's generator state, and gradients consistent with the mask the forward drew."""

from __future__ import annotations

import pytest
import torch

from alibi_lm.kernels import attention
from alibi_lm.kernels.reference import attention_reference
from alibi_lm.positions import alibi_slopes

BACKENDS = ["reference", "sdpa"]


def _inputs(dtype=torch.float64, heads=4, length=24, dim=16):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, length, dim, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, alibi_slopes(heads).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_and_zero_is_no_dropout(backend):
    q, k, v, slopes = _inputs()
    torch.manual_seed(11)
    a = attention(q, k, v, slopes=slopes, backend=backend, dropout_p=0.3)
    torch.manual_seed(11)
    b = attention(q, k, v, slopes=slopes, backend=backend, dropout_p=0.3)
    c = attention(q, k, v, slopes=slopes, backend=backend, dropout_p=0.3)  # the generator moved on
    assert torch.equal(a, b) and not torch.allclose(a, c)
    state = torch.get_rng_state()
    plain = attention(q, k, v, slopes=slopes, backend=backend)
    assert torch.equal(plain, attention(q, k, v, slopes=slopes, backend=backend, dropout_p=0.0))
    assert torch.equal(torch.get_rng_state(), state)  # no dropout draws nothing


def test_reference_keeps_the_share_asked_for():
    """With v = one-hot columns the output is the kept, rescaled probabilities themselves (the reference
    takes a v wider than k; the public door asks for equal shapes)."""
    heads, length = 4, 64
    q, k, _, slopes = _inputs(heads=heads, length=length)
    v = torch.eye(length, dtype=torch.float64).expand(2, heads, length, length)
    torch.manual_seed(0)
    probs = attention_reference(q, k, v, slopes=slopes, causal=False, dropout_p=0.25)
    kept = (probs != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.01  # 32k Bernoulli draws: 3 standard deviations are 0.007
    plain = attention_reference(q, k, v, slopes=slopes, causal=False)
    nonzero = probs != 0
    torch.testing.assert_close(probs[nonzero], plain[nonzero] / 0.75)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_mean_over_seeds_is_the_output_without_dropout(backend):
    q, k, v, slopes = _inputs()
    plain = attention(q, k, v, slopes=slopes, backend=backend)
    n = 400
    total = torch.zeros_like(plain)
    for seed in range(n):
        torch.manual_seed(seed)
        total += attention(q, k, v, slopes=slopes, backend=backend, dropout_p=0.2)
    spread = (plain.abs().max() * (0.2 / 0.8) ** 0.5 / n**0.5).item()  # a bound on the standard error
    assert (total / n - plain).abs().max().item() < 6 * spread
    assert (total / n - plain).abs().max().item() > 0  # it did drop something


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_belong_to_the_mask_the_forward_drew(backend):
    """With the seed fixed, the output is linear in v: <dv, d> equals <g, out(v + d) - out(v)>; for q
    and k a central finite difference in float64 gives the same directional derivative."""
    q, k, v, slopes = _inputs()
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d = [torch.randn(q.shape, generator=torch.Generator().manual_seed(6 + i), dtype=torch.float64) for i in range(3)]

    def out(qq, kk, vv):
        torch.manual_seed(42)
        return attention(qq, kk, vv, slopes=slopes, backend=backend, dropout_p=0.3)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    (out(*leaves) * g).sum().backward()
    grads = [t.grad for t in leaves]
    assert ((out(q, k, v + d[2]) - out(q, k, v)) * g).sum().item() == pytest.approx(
        (grads[2] * d[2]).sum().item(), rel=1e-9)
    eps = 1e-5
    for i in range(2):
        plus = [t + eps * d[i] if j == i else t for j, t in enumerate((q, k, v))]
        minus = [t - eps * d[i] if j == i else t for j, t in enumerate((q, k, v))]
        numeric = ((out(*plus) - out(*minus)) * g).sum().item() / (2 * eps)
        assert numeric == pytest.approx((grads[i] * d[i]).sum().item(), rel=1e-6, abs=1e-9)


def test_dropout_p_is_checked():
    q, k, v, slopes = _inputs()
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            attention(q, k, v, slopes=slopes, dropout_p=bad)


# ---------------------------------------------------------------------------------------------- Triton

def _triton_inputs(causal=True, q_len=64, heads=2, kv_heads=1, seed=0):
    """D = Lk = 64, so that v = the identity turns the output into the kept probabilities themselves."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, 64, generator=g).to(DEVICE, torch.bfloat16)
    k = torch.randn(1, kv_heads, 64, 64, generator=g).to(DEVICE, torch.bfloat16)
    v = torch.randn(1, kv_heads, 64, 64, generator=g).to(DEVICE, torch.bfloat16)
    return q, k, v, alibi_slopes(heads).to(DEVICE)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_mask(q, k, slopes, p, seed, causal, q_offset):
    """The mask the kernel draws for this seed: with v = I its output is P o M / (1 - p)."""
    eye = torch.eye(64, device=DEVICE).expand(1, k.shape[1], 64, 64).to(torch.bfloat16)
    torch.manual_seed(seed)
    with torch.no_grad():
        probs = attention(q, k, eye, slopes=slopes, causal=causal, q_offset=q_offset, backend="triton", dropout_p=p)
    return probs != 0


@pytest.mark.parametrize("causal, q_len", [(True, 64), (True, 40), (False, 64)])
def test_triton_dropout_keeps_the_share_and_its_gradients_use_the_forward_mask(causal, q_len):
    """The kernels' mask, read off the output with v = I, keeps 1 - p of the visible probabilities; with
    that mask a float64 reference gives the output and every gradient the forward and backward kernels
    give (as close as the reference in the same low precision), so the backward regenerated the
    forward's mask from the seed."""
    p, seed = 0.3, 1234
    q_offset = 64 - q_len
    q, k, v, slopes = _triton_inputs(causal, q_len)
    mask = _triton_mask(q, k, slopes, p, seed, causal, q_offset)
    visible = torch.ones(q_len, 64, dtype=torch.bool, device=DEVICE)
    if causal:
        visible = torch.arange(64, device=DEVICE)[None, :] <= torch.arange(q_offset, 64, device=DEVICE)[:, None]
    kept = mask[:, :, visible].double().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept  # ~4k draws per case: 3 standard deviations are 0.02
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)

    def with_mask(qq, kk, vv, sl, dtype):
        group = qq.shape[1] // kk.shape[1]
        qq, kk, vv = (t.to(dtype) for t in (qq, kk, vv))
        kk, vv = (t.repeat_interleave(group, dim=1) for t in (kk, vv))
        scores = torch.einsum("bhid,bhjd->bhij", qq, kk) * 64**-0.5
        pos = torch.arange(q_offset, 64, device=DEVICE, dtype=dtype)
        dist = (pos[:, None] - torch.arange(64, device=DEVICE, dtype=dtype)[None, :])
        scores = scores - sl.to(dtype)[:, None, None] * (dist if causal else dist.abs())
        if causal:
            scores = scores.masked_fill(dist < 0, float("-inf"))
        probs = torch.softmax(scores, -1) * mask / (1 - p)
        return torch.einsum("bhij,bhjd->bhid", probs, vv)

    names = ("dq", "dk", "dv", "dslopes")  # trained slopes: their gradient goes through the mask too
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, slopes)]
    torch.manual_seed(seed)
    out = attention(*leaves[:3], slopes=leaves[3], causal=causal, q_offset=q_offset, backend="triton", dropout_p=p)
    out.backward(do.to(out.dtype))
    results = {"out": out.detach(), **{n: t.grad for n, t in zip(names, leaves)}}
    refs = {}
    for dtype in (torch.float64, torch.float32):
        ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, slopes)]
        ref_out = with_mask(*ref_leaves, dtype)
        ref_out.backward(do.to(dtype))
        refs[dtype] = {"out": ref_out.detach(), **{n: t.grad for n, t in zip(names, ref_leaves)}}
    for name, want in refs[torch.float64].items():
        err = (results[name].double() - want).abs().max().item()
        ref_err = (refs[torch.float32][name].to(results[name].dtype).double() - want).abs().max().item()
        floor = (16 if name == "dslopes" else 4) * 2.0**-8 * want.abs().max().item()  # as _attention_check
        assert err <= 2 * ref_err + floor, (name, err, ref_err, floor)


def test_triton_dropout_follows_the_generator_and_zero_is_the_plain_kernel():
    q, k, v, slopes = _triton_inputs()
    q.requires_grad_(True)  # the flash kernels, not decoding
    torch.manual_seed(5)
    a = attention(q, k, v, slopes=slopes, backend="triton", dropout_p=0.2)
    torch.manual_seed(5)
    b = attention(q, k, v, slopes=slopes, backend="triton", dropout_p=0.2)
    c = attention(q, k, v, slopes=slopes, backend="triton", dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    assert torch.equal(attention(q, k, v, slopes=slopes, backend="triton", dropout_p=0.0),
                       attention(q, k, v, slopes=slopes, backend="triton"))
    assert torch.equal(torch.get_rng_state(), state)

"""The SDPA backend's query chunking (a bounded mask at long lengths) gives the unchunked result,
forward and gradients, for every mask it builds: ALiBi causal and symmetric, offsets, GQA, and the
extra bias tensors of T5 (per head) and of padded batches (per sequence, broadcast over heads)."""

import pytest
import torch

from alibi_lm import alibi_slopes
from alibi_lm.kernels import sdpa
from alibi_lm.kernels.sdpa import attention_sdpa

CASES = [
    # B, H, Hkv, Lq, Lk, q_offset, causal, slopes, bias shape (None: no extra bias)
    (2, 4, 4, 37, 37, 0, True, True, None),
    (1, 6, 2, 19, 40, 21, True, True, None),  # chunked prefill over a cache, GQA
    (1, 3, 3, 29, 29, 0, False, True, None),  # symmetric |i - j|
    (2, 4, 4, 23, 23, 0, True, False, (1, 4, 23, 23)),  # T5: a learned bias per head
    (2, 4, 2, 17, 30, 13, True, True, (2, 1, 17, 30)),  # left padding: per sequence
    (1, 2, 2, 25, 25, 0, True, False, (1, 1, 1, 25)),  # a key mask broadcast over queries
]


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,q_offset,causal,with_slopes,bias_shape", CASES)
def test_query_chunks_equal_one_mask(monkeypatch, rows, B, H, Hkv, Lq, Lk, q_offset, causal, with_slopes, bias_shape):
    gen = torch.Generator().manual_seed(Lq * 7 + Lk + rows)
    q = torch.randn(B, H, Lq, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    slopes = alibi_slopes(H).double() if with_slopes else None
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, Lq, 16, generator=gen, dtype=torch.float64)
    kwargs = dict(slopes=slopes, causal=causal, q_offset=q_offset, bias=bias)

    whole = attention_sdpa(q, k, v, **kwargs)
    whole_grads = torch.autograd.grad(whole, (q, k, v), do)
    monkeypatch.setattr(sdpa, "MAX_MASK_ELEMENTS", rows * Lk)  # at most `rows` queries per chunk
    chunked = attention_sdpa(q, k, v, **kwargs)
    chunked_grads = torch.autograd.grad(chunked, (q, k, v), do)

    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_long_alibi_attention_builds_bounded_masks(monkeypatch):
    """At 4096 queries x 4096 keys x 8 heads the whole mask would hold 134M elements; every mask built
    stays within the bound."""
    sizes = []
    real = sdpa.materialized_bias

    def recording(slopes, n_queries, n_keys, **kwargs):
        sizes.append(len(slopes) * n_queries * n_keys)
        return real(slopes, n_queries, n_keys, **kwargs)

    monkeypatch.setattr(sdpa, "materialized_bias", recording)
    q, k, v = torch.randn(3, 1, 8, 4096, 8).unbind(0)
    out = attention_sdpa(q, k, v, slopes=alibi_slopes(8))
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    assert len(sizes) > 1 and max(sizes) <= sdpa.MAX_MASK_ELEMENTS


def test_a_per_sequence_bias_counts_in_the_mask_bound(monkeypatch):
    """A left-padding bias (B, 1, Lq, Lk) broadcast over H heads makes a B x H mask per chunk."""
    shapes = []
    real = sdpa.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(sdpa, "MAX_MASK_ELEMENTS", 4 * 4 * 10 * 40)  # B x H x 10 rows x Lk
    q, k, v = torch.randn(3, 4, 4, 40, 8).unbind(0)
    attention_sdpa(q, k, v, slopes=alibi_slopes(4), bias=torch.zeros(4, 1, 40, 40))
    assert len(shapes) == 4 and all(s[0] * s[1] * s[2] * s[3] <= sdpa.MAX_MASK_ELEMENTS for s in shapes)


def test_a_key_bias_without_query_dims_is_broadcast_in_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    key_bias = torch.randn(12, generator=gen, dtype=torch.float64)  # (Lk,): one value per key
    whole = attention_sdpa(q, k, v, slopes=alibi_slopes(2).double(), bias=key_bias)
    monkeypatch.setattr(sdpa, "MAX_MASK_ELEMENTS", 2 * 3 * 12)
    chunked = attention_sdpa(q, k, v, slopes=alibi_slopes(2).double(), bias=key_bias)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)

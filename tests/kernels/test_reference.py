"""The reference and SDPA backends against an independent float64 computation, plus the properties
that define ALiBi attention (causality, translation invariance, GQA as repeated heads)."""

import math

import pytest
import torch

from alibi_lm import alibi_slopes, attention
from alibi_lm.kernels import available_backends


def naive_attention(q, k, v, slopes, causal, q_offset, scale=None):
    """Loops over batch, head and query in float64: the definition, with nothing shared."""
    B, H, Lq, D = q.shape
    group = H // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group].double(), v[b, h // group].double()
            for i in range(Lq):
                pos = q_offset + i
                scores = kh @ q[b, h, i].double() * scale
                keys = torch.arange(kh.shape[0], dtype=torch.float64)
                if slopes is not None:
                    scores = scores - float(slopes[h]) * (pos - keys).abs()
                if causal:
                    scores = torch.where(keys <= pos, scores, torch.tensor(-math.inf, dtype=torch.float64))
                out[b, h, i] = torch.softmax(scores, 0) @ vh
    return out


CASES = [
    # B, H, Hkv, Lq, Lk, D, q_offset, causal, with_slopes
    (2, 4, 4, 17, 17, 16, 0, True, True),
    (1, 6, 2, 5, 23, 8, 18, True, True),  # Lq != Lk with an offset (chunked prefill), GQA
    (2, 3, 1, 1, 31, 16, 30, True, True),  # one decoding step, MQA, odd head count
    (1, 12, 4, 13, 13, 8, 0, False, True),  # non-causal, symmetric |i - j|
    (2, 4, 2, 9, 9, 16, 0, True, False),  # plain attention
    (1, 2, 2, 7, 20, 8, 5, False, False),
]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,q_offset,causal,with_slopes", CASES)
def test_backend_matches_float64_definition(backend, B, H, Hkv, Lq, Lk, D, q_offset, causal, with_slopes):
    gen = torch.Generator().manual_seed(Lq * 31 + Lk)
    q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, Hkv, Lk, D, generator=gen)
    v = torch.randn(B, Hkv, Lk, D, generator=gen)
    slopes = alibi_slopes(H) if with_slopes else None
    expected = naive_attention(q, k, v, slopes, causal, q_offset)
    got = attention(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got64 = attention(q.double(), k.double(), v.double(), slopes=slopes, causal=causal, q_offset=q_offset,
                      backend=backend)
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-10)


def test_explicit_scale_is_used():
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    expected = naive_attention(q, k, v, alibi_slopes(2), True, 0, scale=0.3)
    got = attention(q, k, v, slopes=alibi_slopes(2), scale=0.3, backend="reference")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_causality_future_keys_do_not_change_earlier_outputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 16, generator=gen) for _ in range(3))
    out = attention(q, k, v, slopes=alibi_slopes(4), backend="reference")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:] = torch.randn(1, 4, 4, 16, generator=gen)
    v2[:, :, 8:] = torch.randn(1, 4, 4, 16, generator=gen)
    out2 = attention(q, k2, v2, slopes=alibi_slopes(4), backend="reference")
    torch.testing.assert_close(out[:, :, :8], out2[:, :, :8], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, 8:], out2[:, :, 8:])


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_is_translation_invariant(causal):
    """Moving queries and keys to positions 100 later changes nothing: only i - j enters the bias."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 16, generator=gen)
    k = torch.randn(1, 4, 6, 16, generator=gen)
    v = torch.randn(1, 4, 6, 16, generator=gen)
    base = attention(q, k, v, slopes=alibi_slopes(4), causal=causal, backend="reference")
    # Same keys placed at positions 100..105 behind 100 keys that no query can see: with a causal
    # mask they are in the past, so give them -inf through the extra bias; positions shift by 100.
    pad = torch.randn(1, 4, 100, 16, generator=gen)
    hide = torch.zeros(106)
    hide[:100] = -math.inf
    shifted = attention(q, torch.cat([pad, k], 2), torch.cat([pad, v], 2), slopes=alibi_slopes(4), causal=causal,
                        q_offset=100, backend="reference", bias=hide)
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-6)


def test_gqa_equals_attention_with_repeated_heads():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 12, 9, 8, generator=gen)
    k = torch.randn(2, 4, 9, 8, generator=gen)
    v = torch.randn(2, 4, 9, 8, generator=gen)
    grouped = attention(q, k, v, slopes=alibi_slopes(12), backend="reference")
    repeated = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), slopes=alibi_slopes(12),
                         backend="reference")
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)


def test_sdpa_equals_reference_with_gradients():
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 6, 11, 16, generator=gen, requires_grad=True) for _ in range(3)]
    grads = []
    for backend in ("reference", "sdpa"):
        out = attention(*inputs, slopes=alibi_slopes(6), backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_gives_slope_gradients():
    slopes = alibi_slopes(2).requires_grad_(True)
    q, k, v = torch.randn(3, 1, 2, 6, 8, dtype=torch.float64).unbind(0)
    out = attention(q, k, v, slopes=slopes.double(), backend="reference")
    (grad,) = torch.autograd.grad(out.sum(), slopes)
    assert grad.shape == (2,) and bool(grad.abs().gt(0).all())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(q=torch.randn(2, 4, 8)), "q must be a 4-D tensor"),
        (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of k's 3 key/value heads"),
        (dict(v=torch.randn(1, 4, 9, 16)), "v has shape"),
        (dict(k=torch.randn(1, 4, 8, 16, dtype=torch.float64)), "k has dtype"),
        (dict(k=torch.randn(1, 4, 8, 32), v=torch.randn(1, 4, 8, 32)), "head_dim"),
        (dict(slopes=torch.ones(3)), "slopes must have shape"),
        (dict(q_offset=-1), "q_offset"),
        (dict(backend="flash"), "unknown attention backend"),
        (dict(scale=0.0), "scale"),
    ],
)
def test_bad_arguments_name_the_offender(kwargs, message):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 4, 8, 16), v=torch.randn(1, 4, 8, 16))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **args)


def test_cpu_backends_do_not_include_triton():
    assert available_backends("cpu") == ["reference", "sdpa"]


@pytest.mark.parametrize("q_offset, dtype", [
    (0, torch.float32), (4093, torch.float32), (4093, torch.bfloat16), (4093, torch.float16),
    (2**24 - 40, torch.float32),  # the last distances float32 holds exactly
    (2**24 + 5, torch.bfloat16),  # past them: computed in float64
])
def test_materialized_bias_is_the_float64_bias_rounded_once(q_offset, dtype):
    from alibi_lm.kernels import materialized_bias

    gen = torch.Generator().manual_seed(q_offset % 1000)
    slopes = torch.rand(3, generator=gen) * torch.tensor([1.0, 1e-3, 2**-8])
    n_queries, n_keys = 2, q_offset + 2  # few rows: past 2^24 keys the bias is 100M+ elements already
    got = materialized_bias(slopes, n_queries, n_keys, q_offset=q_offset, dtype=dtype)
    keys = torch.arange(max(0, n_keys - 300), n_keys, dtype=torch.float64)  # the recent keys, and key 0
    keys = torch.cat([torch.zeros(1, dtype=torch.float64), keys])
    pos = torch.arange(q_offset, q_offset + n_queries, dtype=torch.float64)
    distance = pos[:, None] - keys[None, :]
    want = (-slopes.double()[:, None, None] * distance.abs()[None]).masked_fill(distance[None] < 0, -math.inf)
    if dtype == torch.float32:
        torch.testing.assert_close(got[:, :, keys.long()], want.to(dtype), rtol=0, atol=0)
    else:  # float32 then the half type: at most one unit in the last place of the half type away
        torch.testing.assert_close(got[:, :, keys.long()].double(), want.to(dtype).double(),
                                   rtol=2 * torch.finfo(dtype).eps, atol=0)

"""The split-K decoding kernel against float64 (forward only: decoding never needs gradients).

The interpreter run pretends to have 4 multiprocessors, so caches of a few hundred keys already cut
into several splits and exercise the merge kernel; batches of many heads take the one-split path.
"""

from __future__ import annotations

import pytest
import torch
from _attention_check import Case, check, make_inputs

from alibi_lm.kernels.triton_attention import triton_attention
from alibi_lm.kernels.triton_decode import _split_plan, decode_plan, triton_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
bf16, fp16 = torch.bfloat16, torch.float16


CASES = [
    Case(1, 1, 1, 1, 1, 16, q_offset=0),  # first token
    Case(1, 2, 2, 1, 300, 64, q_offset=299),  # one new token, several splits
    Case(2, 12, 4, 1, 130, 32, q_offset=129, slopes=None),  # GQA 12/4: one program reads K/V for 3 heads
    Case(1, 6, 1, 3, 300, 64, q_offset=297, dtype=fp16),  # MQA, a few speculative tokens
    Case(1, 3, 3, 16, 200, 16, q_offset=100),  # keys past the last query are masked
    Case(1, 2, 1, 5, 260, 80, causal=False, q_offset=40, slopes="trainable"),  # symmetric, padded head dim
    Case(3, 4, 4, 1, 100, 96, q_offset=99, dtype=fp16),  # 12 (batch, kv head) programs: no merge
    Case(1, 2, 2, 1, 70, 32, q_offset=65_500),  # 64k positions beyond a short cache
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case: Case) -> None:
    check(case, triton_decode, grad=False, device=DEVICE)


def test_split_plan_covers_every_key() -> None:
    for batch_heads, n_keys in [(1, 1), (1, 300), (16, 32_768), (512, 1024), (3, 65)]:
        for host_bound in (False, True):
            per_split, n_split = _split_plan(batch_heads, n_keys, torch.device(DEVICE), host_bound)
            assert per_split % 64 == 0 and (n_split - 1) * per_split < n_keys <= n_split * per_split


def test_host_bound_calls_take_one_pass_over_short_caches_only() -> None:
    device = torch.device(DEVICE)
    assert _split_plan(1, 4096, device, host_bound=True) == (4096, 1)
    assert _split_plan(1, 4096, device, host_bound=False)[1] > 1
    # a long cache, or many key rows over the batch: GPU-bound, so the usual plan
    for batch_heads, n_keys in [(1, 8192), (512, 2048)]:
        plan = _split_plan(batch_heads, n_keys, device, host_bound=False)
        assert _split_plan(batch_heads, n_keys, device, host_bound=True) == plan
    assert _split_plan(1, 8192, device)[1] > 1
    # the key-row bound is inclusive: 128 x 4096 = 2^19 rows take one pass, one more batch row does not
    assert _split_plan(128, 4096, device, host_bound=True) == (4096, 1)
    assert _split_plan(129, 4096, device, host_bound=True) == _split_plan(129, 4096, device, host_bound=False)


def test_triton_attention_routes_small_queries_here() -> None:
    case = Case(1, 4, 2, 2, 150, 32, q_offset=148)
    q, k, v, slopes = make_inputs(case, DEVICE)
    with torch.no_grad():
        routed = triton_attention(q, k, v, slopes=slopes, q_offset=148)
    assert torch.equal(routed, triton_decode(q, k, v, slopes=slopes, q_offset=148))


GPU_CASES = [Case(b, 16, hkv, lq, n, d, q_offset=n - lq, dtype=dt)
             for b, hkv, lq, n, d, dt in [(1, 16, 1, 32_768, 128, bf16), (8, 4, 1, 8192, 128, fp16),
                                          (4, 2, 4, 4097, 64, bf16), (2, 16, 1, 1000, 256, bf16),
                                          (1, 16, 1, 70_000, 64, bf16)]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graph_capture_splits_and_matches_the_eager_pass() -> None:
    """Eager, a short cache is read in one pass; captured in a CUDA graph, it is split and merged."""
    case = Case(1, 16, 16, 1, 2048, 128, q_offset=2047, dtype=bf16)
    q, k, v, slopes = make_inputs(case, DEVICE)
    plans = [decode_plan(q, k)[1]]  # the plan triton_decode takes for the call that follows
    eager = triton_decode(q, k, v, slopes=slopes, q_offset=2047)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # warm-up outside the capture (the one-pass kernel); the split and merge kernels are first
        # compiled and loaded inside the capture, as under torch.compile's CUDA graphs
        triton_decode(q, k, v, slopes=slopes, q_offset=2047)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plans.append(decode_plan(q, k)[1])
        captured = triton_decode(q, k, v, slopes=slopes, q_offset=2047)
    graph.replay()
    torch.cuda.synchronize()
    # both against float64, and the two roundings of the same sums close to each other
    check(case, lambda *a, **kw: captured, grad=False, device=DEVICE)
    check(case, lambda *a, **kw: eager, grad=False, device=DEVICE)
    assert plans[0] == 1 and plans[-1] > 1  # eager: one pass; captured: split
    torch.testing.assert_close(eager, captured, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64(case: Case) -> None:
    check(case, triton_decode, grad=False, device="cuda")

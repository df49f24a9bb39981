"""The fused Triton attention kernel against float64, forward and all gradients (slopes included).

On a CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small
shapes; the `gpu` tests compile the kernels for real on larger ones.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os

import pytest
import torch
from _attention_check import Case, check, lse_oracle, make_inputs, max_err
from hypothesis import given, settings
from hypothesis import strategies as st

from alibi_lm.kernels import attention, triton_flash
from alibi_lm.kernels.reference import attention_reference
from alibi_lm.kernels.triton_attention import KernelOptions, flash_forward, supports, triton_attention
from alibi_lm.kernels.triton_flash import flash_backward, flash_forward_with_lse, tma_capable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

bf16, fp16 = torch.bfloat16, torch.float16
CASES = [
    Case(1, 1, 1, 1, 1, 16),  # a single token
    Case(2, 3, 3, 17, 17, 32, slopes="trainable"),
    Case(1, 12, 4, 17, 130, 32, q_offset=113, slopes="trainable"),  # chunked prefill, GQA 12/4
    Case(1, 6, 1, 130, 130, 64),  # MQA, ragged tail past two blocks
    Case(1, 3, 3, 130, 130, 16, causal=False, slopes="trainable"),
    Case(1, 12, 12, 17, 17, 16, causal=False, slopes=None),
    Case(1, 2, 2, 130, 130, 64, slopes=None, dtype=fp16),
    Case(1, 3, 3, 17, 40, 64, causal=False, q_offset=7, slopes="trainable", dtype=fp16),
    Case(1, 2, 1, 5, 20, 32, q_offset=30, slopes="trainable"),  # queries past the last key
    Case(1, 2, 1, 17, 33, 80, q_offset=16),  # head dims padded to 128 inside the kernel
    Case(1, 2, 2, 20, 20, 96, causal=False, dtype=fp16),
]


# The forward kernel loads its tiles through tensor descriptors where it can (sm_90+, and the
# interpreter) and through pointers elsewhere (older GPUs, KernelOptions(tma=False)): both are checked.
LOADS = pytest.mark.parametrize("descriptor_loads", [True, False], ids=["descriptor", "pointer"])


def _options(tma: bool) -> KernelOptions:
    # autotune as the environment says: GPU test runs set ALIBI_TRITON_AUTOTUNE=0 to keep compile time down
    return dataclasses.replace(KernelOptions.from_env(), tma=tma)


@LOADS
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case: Case, descriptor_loads: bool) -> None:
    check(case, functools.partial(triton_attention, options=_options(descriptor_loads)), device=DEVICE)


@LOADS
@pytest.mark.parametrize("causal", [True, False])
def test_long_offset_bias_is_exact(causal: bool, descriptor_loads: bool) -> None:
    """Queries ~64k tokens in: the fp32 in-tile distance keeps neighbouring keys apart."""
    check(Case(1, 2, 2, 17, 70, 32, causal=causal, q_offset=65_500, slopes="trainable"),
          functools.partial(triton_attention, options=_options(descriptor_loads)), device=DEVICE)



TMA_CASES = [
    Case(2, 4, 2, 37, 37, 64, slopes="trainable"),  # ragged tile, GQA
    Case(1, 3, 1, 20, 53, 32, q_offset=33),  # chunked prefill over a cache
    Case(1, 2, 2, 17, 17, 80, causal=False, dtype=fp16),  # head dim padded to the tile by the copy engine
]


@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_tensor_descriptor_forward_matches_pointer_forward(case: Case) -> None:
    """The forward kernel's tensor-descriptor loads (the copy engine's zero fill at ragged edges, its
    clipped store of O) compute what its pointer loads compute: output and log-sum-exp, and the
    gradients the backward derives from them, each as close to float64 as the pointer path's.

    Never bitwise: under the interpreter both paths multiply through numpy's BLAS, whose kernels may
    sum in another order for the two memory layouts (OpenBLAS's AVX-512 kernels do: issue 16)."""
    q, k, v, slopes = (None if t is None else t.detach() for t in make_inputs(case, DEVICE))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # the model's (B, L, H, D) memory layout
    sl = None if slopes is None else slopes.float()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q)
    scale = case.head_dim ** -0.5
    args = (q, k, v, sl, case.causal, case.q_offset, scale)
    if not tma_capable(q, k, v, do):
        assert DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9
        pytest.skip("this GPU has no tensor memory accelerator (sm_90+)")
    got = {}
    for tma in (True, False):
        out, lse = flash_forward_with_lse(*args, options=_options(tma))
        grads = flash_backward(do, q, k, v, out, lse, sl, *args[4:], sl is not None, options=_options(tma))
        got[tma] = (out, lse, *grads)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    sl64 = None if sl is None else sl.double().requires_grad_(True)
    oracle = attention_reference(*leaves, slopes=sl64, causal=case.causal, q_offset=case.q_offset)
    oracle.backward(do.double())
    lse64 = lse_oracle(q, k, sl, case, scale)
    want = [oracle.detach(), lse64, *(t.grad for t in leaves), None if sl64 is None else sl64.grad]
    for name, tma_t, ptr_t, w in zip(("out", "lse", "dq", "dk", "dv", "dslopes"), got[True], got[False], want):
        if ptr_t is None:
            assert tma_t is None, name
            continue
        if name == "lse":
            # fp32 scores of bf16/fp16 inputs: a few float32 rounding steps of the scores' magnitude per
            # term of the dot product, whatever order the products are summed in
            bound = 8 * case.head_dim * 2.0**-24 * max(1.0, w.abs().max().item())
            assert max_err(tma_t, w) <= bound and max_err(ptr_t, w) <= bound, name
            continue
        slack = 2**-8 * max(1.0, w.abs().max().item())
        assert max_err(tma_t, w) <= 2 * max_err(ptr_t, w) + slack, name


def test_expanded_keys_take_the_pointer_loads() -> None:
    """Keys shared across the batch by expand() have a zero stride, which a tensor descriptor cannot
    express: the forward falls back to pointer loads and still computes the same attention."""
    case = Case(2, 2, 2, 20, 20, 32)
    q, k, v, slopes = (t.detach() for t in make_inputs(case, DEVICE))
    k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    assert not tma_capable(q, k, v)
    out = triton_attention(q, k, v, slopes=slopes)
    oracle = attention_reference(q.double(), k.double(), v.double(), slopes=slopes.double())
    same_dtype = attention_reference(q, k, v, slopes=slopes)
    # the bound of _attention_check.check: twice the reference's own error plus a few ulps of the output
    floor = 4 * 2.0**-8 * oracle.abs().max().item()
    assert max_err(out, oracle) <= 2 * max_err(same_dtype, oracle) + floor


@pytest.mark.parametrize("descriptor_loads", [True, False], ids=["descriptor", "pointer"])
def test_empty_batch(descriptor_loads: bool) -> None:
    """A batch of zero sequences gives an empty output (a tensor descriptor cannot describe it)."""
    q = torch.randn(0, 2, 5, 32, device=DEVICE).to(bf16)
    out = flash_forward(q, q, q, slopes=torch.ones(2, device=DEVICE), options=_options(descriptor_loads))
    assert out.shape == q.shape


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    q_len=st.integers(1, 48),
    extra_keys=st.integers(0, 40),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([16, 32, 64]),
    causal=st.booleans(),
    slopes=st.sampled_from([None, "alibi", "trainable"]),
    dtype=st.sampled_from([bf16, fp16]),
)
def test_random_shapes(q_len: int, extra_keys: int, kv_heads: int, group: int, head_dim: int, causal: bool,
                       slopes: str | None, dtype: torch.dtype) -> None:
    # keys before the queries are a cache: q_offset = extra_keys, as in chunked prefill
    case = Case(1, kv_heads * group, kv_heads, q_len, q_len + extra_keys, head_dim, causal=causal,
                q_offset=extra_keys, slopes=slopes, dtype=dtype)
    check(case, triton_attention, device=DEVICE)


@pytest.mark.parametrize("name", ["_fwd_kernel", "_dkdv_kernel", "_dq_kernel"])
def test_head_dim_is_a_compile_time_constant(name: str) -> None:
    """A run-time D turned the choice between plain and masked tile loads into a branch inside the loops,
    which Triton does not software-pipeline: on the H100 the backward's main loops loaded every tile
    synchronously and ran 1.2-1.6x slower (benchmarks/NOTES-kernel.md)."""
    source = getattr(triton_flash, name).fn  # the Python function, compiled or interpreted
    annotations = {n: str(p.annotation) for n, p in inspect.signature(source).parameters.items()}
    assert "constexpr" in annotations["D"] and "constexpr" in annotations["BLOCK_D"]


def test_dispatcher_routes_to_kernel() -> None:
    case = Case(1, 3, 1, 20, 20, 32)
    q, k, v, slopes = make_inputs(case, DEVICE)
    ours = attention(q, k, v, slopes=slopes, backend="triton")
    assert torch.equal(ours, flash_forward(q, k, v, slopes=slopes))
    assert supports(q) == (q.dtype in (bf16, fp16))


def test_decoding_route_matches_flash_forward() -> None:
    """Without gradients, a few queries take the split-K path; it agrees with the flash kernel."""
    case = Case(1, 4, 2, 3, 90, 64, q_offset=87)
    q, k, v, slopes = make_inputs(case, DEVICE)
    with torch.no_grad():
        fast = triton_attention(q, k, v, slopes=slopes, q_offset=87)
    flash = flash_forward(q, k, v, slopes=slopes, q_offset=87)
    oracle = attention_reference(q.double(), k.double(), v.double(), slopes=slopes.double(), q_offset=87)
    assert max_err(fast, oracle) <= 2 * max_err(flash, oracle) + 2**-8


@pytest.mark.parametrize(("dtype", "head_dim", "match"), [(torch.float32, 32, "float16 or bfloat16"),
                                                          (bf16, 48, "head dims")])
def test_rejects_unsupported(dtype: torch.dtype, head_dim: int, match: str) -> None:
    q = torch.randn(1, 1, 4, head_dim, dtype=dtype)
    assert not supports(q)
    with pytest.raises(ValueError, match=match):
        triton_attention(q, q, q)


# ---------------------------------------------------------------------------------------------- GPU

GPU_CASES = (
    [Case(2, 6, 2, 1000, 1000, d, slopes="trainable", dtype=dt) for dt in (bf16, fp16)
     for d in (16, 32, 64, 80, 96, 128, 256)]
    + [Case(1, 4, 4, 2048, 2048, 128, causal=False, slopes="trainable", dtype=dt) for dt in (bf16, fp16)]
    + [Case(2, 8, 1, 4097, 4097, 64, slopes=None, dtype=bf16),
       Case(1, 12, 4, 1500, 6000, 128, q_offset=4500, dtype=bf16),
       Case(1, 2, 1, 16384, 16384, 128, slopes="trainable", dtype=bf16),
       Case(1, 2, 1, 16384, 16384, 64, dtype=fp16)]
)


def _report(case: Case, errors: dict) -> None:
    """Append this case's errors (max abs, and max abs over the oracle's max) for the closing note."""
    path = os.environ.get("ALIBI_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": str(case), "errors": errors}) + "\n")


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64(case: Case) -> None:
    errors: dict = {}
    try:
        check(case, triton_attention, device="cuda", report=errors)
    finally:
        _report(case, errors)


@gpu
@needs_cuda
def test_gpu_long_offset_64k() -> None:
    """A real prefill chunk at positions 65536..65663 over all 65664 keys, against float64."""
    errors: dict = {}
    case = Case(1, 4, 2, 128, 65_664, 64, q_offset=65_536, slopes="trainable")
    try:
        check(case, triton_attention, device="cuda", report=errors)
    finally:
        _report(case, errors)

"""Pieces shared by the Triton kernels (`triton_flash`, `triton_decode`): the switches, constants,
in-kernel helpers and host-side block-size helpers. It imports no other kernel module.

Scores are kept in the log2 domain (scale and slopes premultiplied by log2(e), `LOG2E`) so the softmax
uses exp2. The in-kernel helpers are `triton.jit` functions, which Triton inlines into each kernel: a
helper's constexpr branches are resolved at compile time, so a load inside one is, in the compiled loop,
an unconditional load that Triton can software-pipeline.
"""

from __future__ import annotations

import dataclasses
import os

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRET", "LOG2E", "KernelOptions", "bias_distance", "bias_positions", "block_d", "bucket", "configs",
           "dot", "key_mask", "last_dim_contiguous", "load_tile", "online_softmax_step", "strides"]

# Triton reads TRITON_INTERPRET itself when it decorates a kernel, so this one switch stays at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# log2(e), once: a constexpr global so kernels can use it; the host reads LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the kernels are launched; the public entry points take one and pass it down to the launchers.

    tma: on sm_90+ the forward kernel loads its Q/K/V tiles through the tensor memory accelerator (host
    tensor descriptors) instead of pointer arithmetic: on the H100 forward +21-47%, fwd+bwd +4-8%
    (BENCHMARKS.md). False keeps the pointer loads, which older GPUs, head dims past 128 and tensors the
    copy engine cannot address take anyway. The backward kernels always use pointer loads: with
    descriptors they measured 2-4% slower.
    autotune: False launches each kernel's first config without benchmarking the others: GPU test runs
    compile dozens of (dtype, head dim, flag) variants, and autotuning each would multiply the compile time.
    """

    tma: bool = True
    autotune: bool = True

    @classmethod
    def from_env(cls) -> KernelOptions:
        """The options the environment asks for: ALIBI_TRITON_TMA=0 and ALIBI_TRITON_AUTOTUNE=0 turn
        them off. Read when a public entry point is called without options, not at import."""
        return cls(tma=os.environ.get("ALIBI_TRITON_TMA", "1") != "0",
                   autotune=os.environ.get("ALIBI_TRITON_AUTOTUNE", "1") != "0")


# ----------------------------------------------------------------------------------------------------
# host side


def configs(hopper: list[tuple[int, int, int, int]], interpret: tuple[int, int], pre_hook=None) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples; the first is the one a
    launch with autotune=False takes."""
    # The interpreter pays per block, not per element, and autotuning there would only multiply the
    # test time: one small config with BLOCK_M != BLOCK_N so the diagonal bookkeeping is exercised.
    if INTERPRET:
        hopper = [(interpret[0], interpret[1], 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for m, n, w, s in hopper]


def bucket(n: int) -> int:
    # autotune once per power-of-two length band, not once per prefill length
    return 1 << max(n - 1, 0).bit_length()


def block_d(head_dim: int) -> int:
    """The head dim's tile width: a power of two (tl.arange needs one), at least 16 (tl.dot needs that)."""
    return max(16, triton.next_power_of_2(head_dim))


def strides(t: Tensor) -> tuple[int, ...]:
    # one stride() call, not three: the launchers pass 13 tensors' strides per backward, on the host path
    return t.stride()[:3]


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------
# in-kernel

# Triton 3.9's interpreter multiplies bf16 tiles as raw integers in tl.dot; there the operands
# (already rounded to bf16) are widened to fp32 first, which gives the same products.
_WIDEN_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b):
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def bias_positions(pos_q, Lk):
    """Query positions as the bias sees them: clamped to the last key.

    Past the last key every distance only grows by the same row constant, which softmax ignores
    (and so do the gradients); clamping keeps scores small, so fp32 rounding of a 64k-token offset
    cannot perturb the softmax of queries that sit far beyond a short cache."""
    return tl.minimum(pos_q, Lk - 1).to(tl.float32)


@triton.jit
def bias_distance(pos_b, pos_k, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The distance pos_b - pos_k that the bias multiplies by the slope, fp32: a (queries, keys) tile, or
    (keys, queries) when TRANSPOSED; its absolute value without the causal mask (the symmetric bias)."""
    if TRANSPOSED:
        dist = pos_b[None, :] - pos_k[:, None]
    else:
        dist = pos_b[:, None] - pos_k[None, :]
    if not CAUSAL:
        dist = tl.abs(dist)
    return dist


@triton.jit
def load_tile(base, rows, stride, offs_d, d_ok, n_rows, MASKED: tl.constexpr, FULL_D: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """Rows `rows` of a row-major (rows, head dim) matrix at `base` (row stride `stride`), as a
    (rows, BLOCK_D) tile, or (BLOCK_D, rows) when TRANSPOSED (K^T for the scores). MASKED reads only rows
    below n_rows; FULL_D (BLOCK_D == D) drops the head-dim mask, which d_ok (offs_d < D) is otherwise.
    Masked-out elements read as zeros."""
    if TRANSPOSED:
        ptrs = base + rows[None, :] * stride + offs_d[:, None]
        if MASKED:
            tile = tl.load(ptrs, mask=d_ok[:, None] & (rows < n_rows)[None, :], other=0.0)
        elif FULL_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    else:
        ptrs = base + rows[:, None] * stride + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & d_ok[None, :], other=0.0)
        elif FULL_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def key_mask(x, offs_k, n_keys, pos_k, pos_q, fill, CAUSAL: tl.constexpr):
    """x, a (queries, keys) tile, with `fill` where the key is past n_keys or (CAUSAL) after the query."""
    ok = (offs_k < n_keys)[None, :]
    if CAUSAL:
        ok = ok & (pos_k[None, :] <= pos_q[:, None])
    return tl.where(ok, x, fill)


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v):
    """Fold one tile of scores s (rows, keys; log2 domain, -inf where masked) and its values v into the
    online softmax's (acc, row sum, row max), for rows that may have seen no key yet (a causal row before
    the tile, a decoding split before the query): exp2 never meets -inf - -inf. The flash forward, whose
    first tile always holds key 0, keeps a leaner copy of its own inside its pipelined loop."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return acc, l_i, m_new

"""Bounded-error ALiBi attention in Triton: skip the key tiles the bias has provably already killed.

Forward only (evaluation, generation): each query-row block visits key tiles nearest first, keeps the
online softmax's running maximum and sum, and stops once a bound proves that all the keys it has not
visited together hold at most `tolerance` of every row's softmax mass. Layout and semantics are those
of `alibi_lm.kernels.attention`; tolerance 0 is not served here (the dense kernels are exact).

## The bound (log2 domain: c = scale * log2(e), m = slope * log2(e))

The kernel's score of query i and key j is s_ij = c * q_i . k_j - m * d_ij, with d_ij = p_i - j causal
and |p_i - j| otherwise (p_i the query's bias position). By Cauchy-Schwarz, q_i . k_j <= |q_i| |k_j|.
For a set R of keys not yet visited, with K_R the largest key norm in R and d_R the smallest distance
from p_i to a key of R (the largest, D_R, when m < 0, as trained slopes may become):

    sum_{j in R} 2^s_ij <= |R| * 2^(c |q_i| K_R - m d_R)        (m >= 0; -m D_R for m < 0)

Causal rows visit tiles from the diagonal towards key 0, so R = keys [0, a) for the next tile's end a:
K_R is a prefix maximum of the key norms (computed once per call, `key_norm_prefix_max`), d_R = p_i -
(a - 1), D_R = p_i. Non-causal rows grow a window [a, b) around their diagonal, on the side whose next
key is nearer, and R is [0, a) plus [b, Lk) (prefix and suffix maxima). With M_i and L_i the running
maximum and sum of 2^(s - M_i) over the visited keys V, a row may stop when

    bound_R * 2^(-M_i) <= tolerance * L_i,

since then the left-out share is R / (V + R) <= R / V <= tolerance. A row block stops when all its
rows may. What the result misses: with share delta <= tolerance left out, every output component o'
(normalised over V) differs from the exact o by delta * |mean of v over R - o'| <= tolerance *
(max_j v_jd - min_j v_jd) <= 2 * tolerance * max |v|, plus the dtype's rounding.

It holds for any input: norms are computed in float32 and widened by 2^-14 (the float32 rounding of a
sum of up to 256 squares, with room), the bound never uses the data it has not read, and where the
inequality does not hold (a zero slope, keys with huge norms far away, all-equal scores) the loop
simply goes on to key 0: it cannot skip, so it does not. Rows that have seen no key yet (causal rows
of a block whose diagonal lies in a later tile) have L_i = 0 and cannot stop.

Each block counts the tiles it visited (`visited`): the share of tiles read is what the benchmarks
show beside the speed-up.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from alibi_lm.kernels.triton_common import (
    INTERPRET,
    LOG2E,
    bias_distance,
    bias_positions,
    block_d,
    dot,
    key_mask,
    last_dim_contiguous,
    load_tile,
    online_softmax_step,
)

__all__ = ["bounded_attention", "dense_tiles", "key_norm_prefix_max"]

#: widening of the norm product, above the float32 rounding of |q| and |k| (sums of <= 256 squares)
NORM_MARGIN = 2.0**-14
#: query rows per program, key rows per tile: the interpreter pays per block, the GPU per element
_BLOCKS = (16, 16) if INTERPRET else (64, 64)


@triton.jit
def _rest_bound(qnorm, kmax, slope_l2, d_near, d_far, n_keys):
    """Per row: log2 of the bound on the sum of 2^score over `n_keys` unvisited keys whose norms are at
    most kmax and whose distances lie in [d_near, d_far] (-inf when there are none)."""
    bias = tl.where(slope_l2 >= 0, -slope_l2 * d_near, -slope_l2 * d_far)
    bound = qnorm * kmax + bias + tl.math.log2(tl.maximum(n_keys, 1).to(tl.float32))
    return tl.where(n_keys > 0, bound, float("-inf"))


@triton.jit
def _visit(acc, l_i, m_i, q, K, V, start_n, offs_n, offs_d, skn, svn, pos_q, pos_b, Lk, D: tl.constexpr,
           qk_scale, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr):
    """Fold one key tile into the online softmax (masked: tiles are visited in any order)."""
    offs_k = start_n + offs_n
    d_ok = offs_d < D
    kT = load_tile(K, offs_k, skn, offs_d, d_ok, Lk, True, False, True)
    v = load_tile(V, offs_k, svn, offs_d, d_ok, Lk, True, False, False)
    pos_k = offs_k.to(tl.float32)
    s = dot(q, kT) * qk_scale
    if HAS_SLOPES:
        s = s - slope_l2 * bias_distance(pos_b, pos_k, CAUSAL, False)
    s = key_mask(s, offs_k, Lk, pos_k, pos_q, float("-inf"), CAUSAL)
    return online_softmax_step(acc, l_i, m_i, s, v)


@triton.jit
def _bounded_fwd_kernel(Q, K, V, Slopes, O, KPre, KSuf, Visited,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                        H, GROUP, Lq, Lk, q_offset, qk_scale, log2_tol, norm_scale,
                        D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    qf = q.to(tl.float32)
    qnorm = tl.sqrt(tl.sum(qf * qf, 1)) * norm_scale  # c * |q_i| * (1 + margin), per row
    slope_l2 = 0.0
    if HAS_SLOPES:
        slope_l2 = tl.load(Slopes + h) * LOG2E
    pos_q = (q_offset + offs_m).to(tl.float32)
    pos_b = bias_positions(q_offset + offs_m, Lk)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh
    KPre += (b * (H // GROUP) + hkv) * Lk
    KSuf += (b * (H // GROUP) + hkv) * Lk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the visited keys are the window [lo, hi), grown one tile at a time from the block's diagonal tile
    first_row = tl.minimum(q_offset + start_m, Lk - 1)
    last_row = tl.minimum(tl.minimum(q_offset + start_m + BLOCK_M, q_offset + Lq) - 1, Lk - 1)
    lo = (last_row // BLOCK_N) * BLOCK_N
    hi = lo
    n_visited = 0
    go = Lk > 0
    while go:
        opening = hi == lo
        down = tl.where(opening, lo, lo - BLOCK_N)
        if CAUSAL:
            up = lo < 0  # never: causal rows read only keys at or before their own position
        else:
            # (non-causal) the tile above the window when its nearest key is nearer than the one below it
            gap_down = first_row - (lo - 1)
            gap_up = hi - last_row
            up = (~opening) & (hi < Lk) & ((lo <= 0) | (gap_up < gap_down))
        start_n = tl.where(up, hi, down)
        lo = tl.where(up, lo, down)
        hi = tl.minimum(tl.where(up | opening, start_n + BLOCK_N, hi), Lk)
        acc, l_i, m_i = _visit(acc, l_i, m_i, q, K, V, start_n, offs_n, offs_d, skn, svn, pos_q, pos_b, Lk, D,
                               qk_scale, slope_l2, CAUSAL, HAS_SLOPES)
        n_visited += 1
        # log2 of the bound on what is left: keys [0, lo), and (non-causal) [hi, Lk)
        kmax_lo = tl.load(KPre + tl.maximum(lo - 1, 0))
        rest = _rest_bound(qnorm, kmax_lo, slope_l2, tl.maximum(pos_b - (lo - 1), 0.0), pos_b, lo + 0 * offs_m)
        more = lo > 0
        if not CAUSAL:
            kmax_hi = tl.load(KSuf + tl.minimum(hi, Lk - 1))
            above = _rest_bound(qnorm, kmax_hi, slope_l2, tl.maximum(hi - pos_b, 0.0),
                                tl.maximum((Lk - 1) - pos_b, 0.0), (Lk - hi) + 0 * offs_m)
            top = tl.maximum(rest, above)
            top_safe = tl.where(top == float("-inf"), 0.0, top)  # no -inf - -inf
            both = tl.math.exp2(rest - top_safe) + tl.math.exp2(above - top_safe)
            summed = top + tl.math.log2(tl.where(top == float("-inf"), 1.0, both))
            rest = tl.where(top == float("-inf"), top, summed)
            more = more | (hi < Lk)
        # a row may stop when 2^(rest - M_i) <= tolerance * L_i; rows past Lq never hold the block back
        seen = l_i > 0
        m_seen = tl.where(seen, m_i, 0.0)
        may_stop = seen & (rest <= m_seen + log2_tol + tl.math.log2(tl.where(seen, l_i, 1.0)))
        done = tl.min(tl.where(m_ok, may_stop, True).to(tl.int32), 0) == 1
        go = more & (~done)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d < D)[None, :])
    tl.store(Visited + bh * tl.num_programs(0) + tl.program_id(0), n_visited)


def key_norm_prefix_max(k: Tensor, *, suffix: bool = True) -> tuple[Tensor, Tensor | None]:
    """(prefix, suffix) maxima of the key norms along the keys, float32 (B, Hkv, Lk): prefix[..., j] is
    the largest |k| among keys 0..j, suffix[..., j] among keys j..Lk-1 (only non-causal calls need it).
    Computed once per call, or kept by a KV cache per append (`model.KVCache`); its cost is part of what
    the benchmarks time."""
    norms = torch.linalg.vector_norm(k.float(), dim=-1)
    prefix = torch.cummax(norms, dim=-1).values.contiguous()
    if not suffix:
        return prefix, None
    return prefix, torch.cummax(norms.flip(-1), dim=-1).values.flip(-1).contiguous()


def dense_tiles(n_queries: int, n_keys: int, q_offset: int, causal: bool, batch_heads: int) -> int:
    """The key tiles a dense causal (or full) pass reads for the same blocks: the denominator of the
    share of tiles visited."""
    block_m, block_n = _BLOCKS
    total = 0
    for start in range(0, n_queries, block_m):
        last = min(q_offset + start + block_m, q_offset + n_queries)
        keys = min(n_keys, last) if causal else n_keys
        total += triton.cdiv(keys, block_n)
    return total * batch_heads


def bounded_attention(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None, causal: bool = True,
                      q_offset: int = 0, scale: float | None = None, tolerance: float,
                      stats: dict | None = None, key_norm_max: Tensor | None = None) -> Tensor:
    """Attention that leaves out at most `tolerance` (0 < tolerance < 1) of every query row's softmax
    mass (module docstring). Inputs as validated by `triton_attention` (fp16/bf16, a supported head dim);
    no autograd. `stats`, when given, gains "tiles_visited" and "tiles_dense" (added to what it holds).
    `key_norm_max`: the prefix maxima of the key norms, when the caller keeps them (causal calls only)."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1) here, got {tolerance!r}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    o = torch.empty_like(q)
    if Lq == 0 or B == 0:
        return o
    if key_norm_max is not None and causal:
        prefix, suffix = key_norm_max.float().contiguous(), None
    else:
        prefix, suffix = key_norm_prefix_max(k, suffix=not causal)
    suffix = prefix if suffix is None else suffix  # never read by causal kernels
    block_m, block_n = _BLOCKS
    grid = (triton.cdiv(Lq, block_m), B * H)
    visited = torch.empty((B * H * grid[0],), device=q.device, dtype=torch.int32)
    has_slopes = slopes is not None
    sl = slopes.detach().to(torch.float32).contiguous() if has_slopes else prefix
    qk_scale = scale * LOG2E.value
    _bounded_fwd_kernel[grid](
        q, k, v, sl, o, prefix, suffix, visited, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H // Hkv, Lq, Lk, q_offset, qk_scale, math.log2(tolerance), qk_scale * (1 + NORM_MARGIN),
        D=D, CAUSAL=causal, HAS_SLOPES=has_slopes, BLOCK_D=block_d(D),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    if stats is not None:
        stats["tiles_visited"] = stats.get("tiles_visited", 0) + int(visited.sum())
        stats["tiles_dense"] = stats.get("tiles_dense", 0) + dense_tiles(Lq, Lk, q_offset, causal, B * H)
    return o

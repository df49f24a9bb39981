"""Fused ALiBi attention in Triton for training and prefill: the flash forward and backward kernels,
the bias computed inside the tile, and their launchers.

Tensor layout and semantics are those of `alibi_lm.kernels.attention`; `reference.attention_reference`
is the ground truth these kernels are tested against. The bias -slope_h * (pos_q - j) (or |pos_q - j|
without the causal mask) is formed per tile in fp32 from integer positions, so no (Lq, Lk) tensor is
ever stored and the distance is exact up to 2^24 tokens. Scores are in the log2 domain (see
`triton_common`); the saved log-sum-exp is in the same domain.

Layout of the file: configs -> score helpers -> forward kernel -> backward kernels (delta, dK/dV, dQ with
dslopes) -> launchers (through `launch.TunedKernel`). The launchers take inputs as the custom ops of
`triton_attention` hand them over (validated, unit stride along the head dim, float32 slopes) and are the
public seam of the benchmarks: `flash_forward_with_lse`, `flash_backward`, `forward_launch` (the forward's
launch arguments, to time its pieces), `flash_kernels` (the autotuned kernels, to pin a config or read the
autotuner's choice), `tensor_descriptor`, `tma_capable`.

The head dim D is a compile-time constant of every kernel (one binary per head dim, as BLOCK_D already
forced). As a run-time argument, the `BLOCK_D == D` choice between plain and masked loads became a
branch inside the key/query loops, and Triton does not software-pipeline loads under a branch: on the
H100 the main loops of both backward kernels then loaded every tile synchronously (their TTGIR showed
no async copies there, only in the masked diagonal loops). For the same reason every choice inside the
loops (masked or not, descriptors or pointers) is a constexpr.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from alibi_lm.kernels.launch import Grid, TunedKernel
from alibi_lm.kernels.triton_common import (
    INTERPRET,
    LOG2E,
    KernelOptions,
    bias_distance,
    bias_positions,
    block_d,
    bucket,
    configs,
    dot,
    key_mask,
    last_dim_contiguous,
    load_tile,
    strides,
)

__all__ = ["Dropout", "FlashKernels", "backward_delta", "draw_dropout", "flash_backward", "forward_config",
           "forward_configs", "flash_forward_with_lse", "flash_kernels",
           "forward_launch", "tensor_descriptor", "tma_capable"]


def _tma_block_shapes(nargs: dict) -> None:
    """Give the forward kernel's tensor descriptors (when it gets them) the tile shapes of the config the
    autotuner is about to launch: a descriptor's block shape is fixed at launch, the config is not.
    Query-side tensors are tiled by BLOCK_M rows, key-side ones by BLOCK_N."""
    for name, rows in (("Qd", "BLOCK_M"), ("Od", "BLOCK_M"), ("Kd", "BLOCK_N"), ("Vd", "BLOCK_N")):
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from FlashAttention-2 Triton practice on sm_90.
_FWD_CONFIGS = configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
                       (32, 16), pre_hook=_tma_block_shapes)
# The dK/dV kernel keeps a key tile resident and streams queries; the dQ kernel the reverse.
# Measured per config with benchmarks/backward_study.py (H100, L = 8192, 2026-11-25): the first entries were
# the fastest or within 3% of it at D = 64 and 128; 4-warp tiles of 128 keys spill at D = 128 (4-5x slower).
_DKDV_CONFIGS = configs([(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)], (16, 32))
_DQ_CONFIGS = configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 4, 3)], (32, 16))
# D = 256: the tiles above overflow the 227 KiB of shared memory (and the fp32 accumulators the
# registers), so wide heads get their own short lists with narrow tiles and shallow pipelines.
_FWD_WIDE = configs([(64, 32, 4, 2), (64, 64, 8, 2)], (32, 16), pre_hook=_tma_block_shapes)
_DKDV_WIDE = configs([(32, 32, 8, 1), (32, 64, 8, 1)], (16, 32))
_DQ_WIDE = configs([(64, 32, 8, 1), (32, 32, 4, 2)], (32, 16))


@triton.jit
def _row_term(pos_b, anchor, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr):
    """The per-query part of the causal bias that `_scores` leaves out, slope * (pos_b - anchor).

    The causal bias -slope * (pos_b - pos_k) is a key term slope * (pos_k - anchor) minus this query
    term, for any per-program anchor. A per-row constant changes no softmax, so the kernels add only the
    key term to each score (a single fma with the scale) and account for the query term once per row:
    the forward subtracts it from the log-sum-exp it stores, the dQ kernel adds it to the log-sum-exp
    it subtracts (on the H100: forward 3-10% and dQ 0-6% faster). Anchored at the program's first query,
    both terms are small numbers wherever a probability is not negligible, so they stay as exact as the
    distance itself."""
    if CAUSAL and HAS_SLOPES:
        return slope_l2 * (pos_b - anchor)
    return tl.zeros_like(pos_b)


@triton.jit
def _scores(q, kT, pos_b, pos_k, anchor, qk_scale, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr):
    """Scaled scores plus bias of one tile, log2 domain: rows are queries, columns keys. Causal scores
    lack the query term `_row_term(pos_b, anchor, ...)`, which the caller accounts for per row."""
    qk = dot(q, kT)
    if HAS_SLOPES:
        if CAUSAL:
            return qk * qk_scale + (slope_l2 * (pos_k - anchor))[None, :]
        return qk * qk_scale - slope_l2 * bias_distance(pos_b, pos_k, CAUSAL, False)
    return qk * qk_scale


@triton.jit
def _kept(Seed, bh, rows, cols, Lk, dropout_p, TRANSPOSED: tl.constexpr):
    """The dropout mask of one tile: True where the probability of (query row, key col) is kept. A
    counter-based draw (Philox, keyed by the call's seed and the (batch, head), counted by row * Lk + col),
    so the forward and both backward kernels regenerate the same mask from (seed, position) and no
    L x L mask exists in memory. TRANSPOSED: a (keys, queries) tile, as the dK/dV kernel holds it."""
    seed = tl.load(Seed) + bh
    if TRANSPOSED:
        counter = rows.to(tl.int64)[None, :] * Lk + cols[:, None]
    else:
        counter = rows.to(tl.int64)[:, None] * Lk + cols[None, :]
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _key_blocks(start_m, q_offset, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi) for the query tile at start_m: key blocks before full_end are wholly visible to every
    row of the tile and need neither the causal nor the length mask; those in [full_end, hi) need them;
    the tile sees no key from hi on."""
    full_end = (Lk // BLOCK_N) * BLOCK_N
    hi = Lk
    if CAUSAL:
        full_end = tl.minimum(full_end, ((q_offset + start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Lk, q_offset + start_m + BLOCK_M)
    return full_end, hi


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, stride_kn, stride_vn, lo, hi, pos_q, pos_b, anchor, offs_n,
               offs_d, Lk, D: tl.constexpr, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p, keep_scale,
               CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        pos_k = offs_k.to(tl.float32)
        if USE_TMA:
            # rows past Lk (and columns past D) arrive as zeros; the scores' mask below still applies
            kT = tl.trans(Kd.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
            v = Vd.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            kT = load_tile(K, offs_k, stride_kn, offs_d, d_ok, Lk, MASKED, BLOCK_D == D, True)
            v = load_tile(V, offs_k, stride_vn, offs_d, d_ok, Lk, MASKED, BLOCK_D == D, False)
        s = _scores(q, kT, pos_b, pos_k, anchor, qk_scale, slope_l2, CAUSAL, HAS_SLOPES)
        if MASKED:
            s = key_mask(s, offs_k, Lk, pos_k, pos_q, float("-inf"), CAUSAL)
        # Key 0 is visible to every query and sits in the first block visited, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's own sum: dropout acts after the normalisation
        if DROPOUT:
            p = tl.where(_kept(Seed, bh, offs_m, offs_k, Lk, dropout_p, False), p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Qd, Kd, Vd, Od, Slopes, O, LSE, Seed,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                H, GROUP, Lq, Lk, q_offset, qk_scale, dropout_p, keep_scale, D: tl.constexpr, LQ_BUCKET, LK_BUCKET,
                CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With USE_TMA the tiles move through Qd, Kd, Vd, Od, tensor descriptors of the (B, H, L, D) tensors
    Q, K, V, O (which then only give the autotuner their dtypes); without, through pointers."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    if USE_TMA:
        q = Qd.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        K += b * skb + hkv * skh
        V += b * svb + hkv * svh
    slope_l2 = 0.0
    if HAS_SLOPES:
        slope_l2 = tl.load(Slopes + h) * LOG2E
    pos_q = (q_offset + offs_m).to(tl.float32)
    pos_b = bias_positions(q_offset + offs_m, Lk)
    anchor = bias_positions(q_offset + start_m, Lk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_blocks(start_m, q_offset, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, skn, svn, 0, full_end, pos_q, pos_b, anchor,
                               offs_n, offs_d, Lk, D, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p, keep_scale,
                               CAUSAL, HAS_SLOPES, False, USE_TMA, DROPOUT, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, skn, svn, full_end, hi, pos_q, pos_b, anchor,
                               offs_n, offs_d, Lk, D, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p, keep_scale,
                               CAUSAL, HAS_SLOPES, True, USE_TMA, DROPOUT, BLOCK_N, BLOCK_D)
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i) - _row_term(pos_b, anchor, slope_l2, CAUSAL, HAS_SLOPES)
    tl.store(LSE + bh * Lq + offs_m, lse, mask=m_ok)
    if USE_TMA:
        # the copy engine drops the rows past Lq (and columns past D) of the tile
        Od.store([b, h, start_m, 0], acc.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


_KEY = ["LQ_BUCKET", "LK_BUCKET", "D", "CAUSAL", "HAS_SLOPES", "DROPOUT"]
_fwd = triton.autotune(_FWD_CONFIGS, key=[*_KEY, "USE_TMA"])(_fwd_kernel)
_fwd_wide = triton.autotune(_FWD_WIDE, key=[*_KEY, "USE_TMA"])(_fwd_kernel)


# ----------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _delta_kernel(O, dO, Delta, sob, soh, som, sdob, sdoh, sdom, H, Lq, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax gradient."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=mask, other=0.0)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, dO, LSE, Delta, sqm, sdom, lo, hi, pos_k, offs_m, offs_d, Lq, Lk, q_offset,
                D: tl.constexpr, qk_scale, slope_l2, Seed, bh, offs_n, dropout_p, keep_scale, CAUSAL: tl.constexpr,
                HAS_SLOPES: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Accumulate one query head's contribution to a resident key tile, queries in [lo, hi)."""
    d_ok = offs_d < D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        pos_q = (q_offset + rows).to(tl.float32)
        pos_b = bias_positions(q_offset + rows, Lk)
        qT = load_tile(Q, rows, sqm, offs_d, d_ok, Lq, MASKED, BLOCK_D == D, True)
        do = load_tile(dO, rows, sdom, offs_d, d_ok, Lq, MASKED, BLOCK_D == D, False)
        if MASKED:
            r_ok = rows < Lq
            # +inf drives the probabilities of absent rows to zero
            lse = tl.load(LSE + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(Delta + rows, mask=r_ok, other=0.0)
        else:
            lse = tl.load(LSE + rows)
            delta = tl.load(Delta + rows)
        # transposed tile: keys are rows here, so the bias distance is pos_q - pos_k along columns
        # (the key/query split of _row_term measured 0-4% slower here than the distance itself, H100)
        sT = dot(k, qT) * qk_scale
        if HAS_SLOPES:
            sT = sT - slope_l2 * bias_distance(pos_b, pos_k, CAUSAL, True)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED and CAUSAL:
            pT = tl.where(pos_k[:, None] <= pos_q[None, :], pT, 0.0)
        dpT = dot(v, tl.trans(do))
        if DROPOUT:
            # the forward's mask again: dV sees the kept, rescaled probabilities, and the gradient of a
            # dropped probability is zero (dS = P o (Z o dP / (1 - p) - delta), FlashAttention-2's form)
            kept = _kept(Seed, bh, rows, offs_n, Lk, dropout_p, True)
            dv += dot(tl.where(kept, pT * keep_scale, 0.0).to(do.dtype), do)
            dpT = tl.where(kept, dpT * keep_scale, 0.0)
        else:
            dv += dot(pT.to(do.dtype), do)
        dsT = pT * (dpT - delta[None, :])
        dk += dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dO, LSE, Delta, Slopes, dK, dV, Seed,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                 H, Hkv, GROUP, Lq, Lk, q_offset, qk_scale, sm_scale, dropout_p, keep_scale, D: tl.constexpr,
                 LQ_BUCKET, LK_BUCKET, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, DROPOUT: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhkv = tl.program_id(1)
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    pos_k = offs_n.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query blocks that see only part of this key tile (the diagonal) or run past Lq are masked;
    # causal blocks wholly before the tile are skipped, never loaded.
    lq_full = (Lq // BLOCK_M) * BLOCK_M
    diag_lo = 0
    diag_hi = 0
    if CAUSAL:
        diag_lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
        diag_hi = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.maximum(diag_hi, diag_lo), tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
    mid_hi = tl.maximum(lq_full, diag_hi)
    # each query head of the group adds into the same dK/dV tile: the GQA sum, without atomics
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        bh = b * H + h
        slope_l2 = 0.0
        if HAS_SLOPES:
            slope_l2 = tl.load(Slopes + h) * LOG2E
        Qh = Q + b * sqb + h * sqh
        dOh = dO + b * sdob + h * sdoh
        LSEh = LSE + bh * Lq
        Dh = Delta + bh * Lq
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, diag_lo, diag_hi, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, Seed, bh, offs_n, dropout_p, keep_scale,
                             CAUSAL, HAS_SLOPES, True, DROPOUT, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, diag_hi, lq_full, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, Seed, bh, offs_n, dropout_p, keep_scale,
                             CAUSAL, HAS_SLOPES, False, DROPOUT, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, mid_hi, Lq, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, Seed, bh, offs_n, dropout_p, keep_scale,
                             CAUSAL, HAS_SLOPES, True, DROPOUT, BLOCK_M, BLOCK_D)
    tl.store(dK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, lo, hi, pos_q, pos_b, anchor, offs_n, offs_d, Lk,
              D: tl.constexpr, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p, keep_scale, CAUSAL: tl.constexpr,
              HAS_SLOPES: tl.constexpr, NEED_DSLOPES: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        pos_k = offs_k.to(tl.float32)
        kT = load_tile(K, offs_k, skn, offs_d, d_ok, Lk, MASKED, BLOCK_D == D, True)
        vT = load_tile(V, offs_k, svn, offs_d, d_ok, Lk, MASKED, BLOCK_D == D, True)
        s = _scores(q, kT, pos_b, pos_k, anchor, qk_scale, slope_l2, CAUSAL, HAS_SLOPES)
        p = tl.math.exp2(s - lse[:, None])  # lse carries the query term _scores leaves out
        if MASKED:
            p = key_mask(p, offs_k, Lk, pos_k, pos_q, 0.0, CAUSAL)
        dp = dot(do, vT)
        if DROPOUT:  # as in _dkdv_inner: the gradient reaches only the kept probabilities, rescaled
            dp = tl.where(_kept(Seed, bh, offs_m, offs_k, Lk, dropout_p, False), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(kT.dtype), tl.trans(kT))
        if NEED_DSLOPES:
            # d(score)/d(slope) = -distance. Summing ds * distance directly would multiply the rounding
            # of delta (it comes from the stored low-precision O) by distances up to 64k; instead keep
            # the three row sums whose combination X - Z * Y uses the exact delta Z = sum p * dp.
            dist = bias_distance(pos_b, pos_k, CAUSAL, False)
            pdp = p * dp
            sx += tl.sum(pdp * dist, 1)
            sy += tl.sum(p * dist, 1)
            sz += tl.sum(pdp, 1)
    return dq, sx, sy, sz


@triton.jit
def _dq_kernel(Q, K, V, dO, LSE, Delta, Slopes, dQ, dSl, Seed,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
               H, GROUP, Lq, Lk, q_offset, qk_scale, sm_scale, dropout_p, keep_scale, D: tl.constexpr, LQ_BUCKET,
               LK_BUCKET, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, NEED_DSLOPES: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh
    slope_l2 = 0.0
    if HAS_SLOPES:
        slope_l2 = tl.load(Slopes + h) * LOG2E
    pos_q = (q_offset + offs_m).to(tl.float32)
    pos_b = bias_positions(q_offset + offs_m, Lk)
    anchor = bias_positions(q_offset + start_m, Lk)
    lse += _row_term(pos_b, anchor, slope_l2, CAUSAL, HAS_SLOPES)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sx = tl.zeros([BLOCK_M], tl.float32)
    sy = tl.zeros([BLOCK_M], tl.float32)
    sz = tl.zeros([BLOCK_M], tl.float32)
    full_end, hi = _key_blocks(start_m, q_offset, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    dq, sx, sy, sz = _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, 0, full_end, pos_q, pos_b,
                               anchor, offs_n, offs_d, Lk, D, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p,
                               keep_scale, CAUSAL, HAS_SLOPES, NEED_DSLOPES, False, DROPOUT, BLOCK_N, BLOCK_D)
    dq, sx, sy, sz = _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, full_end, hi, pos_q, pos_b,
                               anchor, offs_n, offs_d, Lk, D, qk_scale, slope_l2, Seed, bh, offs_m, dropout_p,
                               keep_scale, CAUSAL, HAS_SLOPES, NEED_DSLOPES, True, DROPOUT, BLOCK_N, BLOCK_D)
    tl.store(dQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=mask)
    if NEED_DSLOPES:
        # one partial per query row; the launcher sums rows and batch (a tiny (B, H, Lq) reduction)
        tl.store(dSl + bh * Lq + offs_m, sz * sy - sx, mask=m_ok)


_dkdv = triton.autotune(_DKDV_CONFIGS, key=_KEY)(_dkdv_kernel)
_dkdv_wide = triton.autotune(_DKDV_WIDE, key=_KEY)(_dkdv_kernel)
_dq = triton.autotune(_DQ_CONFIGS, key=[*_KEY, "NEED_DSLOPES"])(_dq_kernel)
_dq_wide = triton.autotune(_DQ_WIDE, key=[*_KEY, "NEED_DSLOPES"])(_dq_kernel)


# ----------------------------------------------------------------------------------------------------
# launchers


class Dropout(NamedTuple):
    """Attention dropout of one call: the probability `p` of dropping, and `seed`, an int64 tensor of one
    element drawn from torch's generator of the device at the call (`draw_dropout`): the kernels read it
    on the device, so a call never waits for the host and a CUDA graph can replay it."""

    p: float
    seed: Tensor


def draw_dropout(p: float, device: torch.device) -> Dropout | None:
    """The dropout of a call with probability p (None for p = 0, which draws nothing): the seed comes from
    torch's default generator of `device`, so `torch.manual_seed(s)` before two calls repeats the mask,
    and a run resumed with its saved RNG state repeats it too."""
    if p <= 0:
        return None
    return Dropout(float(p), torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64))


def _dropout_args(dropout: Dropout | None, any_tensor: Tensor) -> tuple[Tensor, float, float]:
    """(seed pointer, p, 1 / (1 - p)) for the kernels; a placeholder pointer and no scaling without."""
    if dropout is None:
        return any_tensor, 0.0, 1.0
    return dropout.seed, dropout.p, 1.0 / (1.0 - dropout.p)


class FlashKernels(NamedTuple):
    """The autotuned kernels of one head-dim class, each wrapped in a `TunedKernel`. Benchmarks reach
    them through `flash_kernels` to read the autotuner's choice (`.autotuner.best_config`) or to launch
    one config of their own (`TunedKernel.pinned`)."""

    forward: TunedKernel
    dkdv: TunedKernel
    dq: TunedKernel


# by "wide" (BLOCK_D > 128), which has its own config lists
_KERNELS = {False: FlashKernels(TunedKernel(_fwd), TunedKernel(_dkdv), TunedKernel(_dq)),
            True: FlashKernels(TunedKernel(_fwd_wide), TunedKernel(_dkdv_wide), TunedKernel(_dq_wide))}


def flash_kernels(head_dim: int) -> FlashKernels:
    """The kernels the launchers use for this head dim."""
    return _KERNELS[block_d(head_dim) > 128]


@functools.cache
def _compute_capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def tma_capable(*tensors: Tensor) -> bool:
    """Whether the copy engine can address these (B, H, L, D) tensors: sm_90+ (or the interpreter), a
    16-byte-aligned base, and every stride but the last a positive multiple of 16 bytes (an expanded,
    stride-0 dimension is left to the pointer loads)."""
    if not (INTERPRET or (tensors[0].is_cuda and _compute_capability(tensors[0].device.index)[0] >= 9)):
        return False
    if any(t.numel() == 0 for t in tensors):  # a descriptor needs every dimension positive (an empty batch)
        return False
    return all(t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in tensors)


def tensor_descriptor(t: Tensor) -> TensorDescriptor:
    """A host tensor descriptor of a (B, H, L, D) tensor for the forward kernel's copy-engine loads."""
    # the block shape is a placeholder: _tma_block_shapes sets the launched config's tile
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d(t.shape[-1])])


def forward_launch(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Tensor | None, causal: bool,
                   q_offset: int, scale: float, tma: bool, dropout: Dropout | None = None
                   ) -> tuple[TunedKernel, Grid, tuple, tuple[Any, ...], dict[str, Any]]:
    """The forward kernel's launch into o and lse as `flash_forward_with_lse` makes it: (kernel, grid, key,
    args, kwargs) for `kernel.launch(grid, key, args, kwargs)`; kwargs are the constexpr flags, and args
    carry tensor descriptors in place of q, k, v, o where tma is asked for and possible. Separate so that
    benchmarks/launch_overhead.py can time the pieces of one launch on exactly these arguments."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    has_slopes = slopes is not None
    sl = slopes if has_slopes else lse  # any pointer; never read without HAS_SLOPES
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    tile_d = block_d(D)
    use_tma = tma and tile_d <= 128 and tma_capable(q, k, v, o)
    descriptors = [tensor_descriptor(t) for t in (q, k, v, o)] if use_tma else [q, k, v, o]
    buckets = (bucket(Lq), bucket(Lk))
    seed, dropout_p, keep_scale = _dropout_args(dropout, lse)
    args = (q, k, v, *descriptors, sl, o, lse, seed, *strides(q), *strides(k), *strides(v), *strides(o),
            H, H // Hkv, Lq, Lk, q_offset, scale * LOG2E.value, dropout_p, keep_scale, D, *buckets)
    key = (q.dtype, D, *buckets, causal, has_slopes, use_tma, dropout is not None)
    flags = dict(CAUSAL=causal, HAS_SLOPES=has_slopes, USE_TMA=use_tma, DROPOUT=dropout is not None, BLOCK_D=tile_d)
    return _KERNELS[tile_d > 128].forward, grid, key, args, flags


def flash_forward_with_lse(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                           scale: float, *, options: KernelOptions, dropout: Dropout | None = None
                           ) -> tuple[Tensor, Tensor]:
    """(out like q, lse float32 (B, H, Lq) in the log2 domain): the forward launcher. Inputs as the custom
    ops hand them over: validated, unit stride along the head dim, slopes float32 and dense, or None.
    lse is that of the softmax before dropout (what the backward recomputes the probabilities from)."""
    B, H, Lq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    kernel, grid, key, args, flags = forward_launch(q, k, v, o, lse, slopes, causal, q_offset, scale, options.tma,
                                                    dropout)
    kernel.launch(grid, key, args, flags, autotune=options.autotune)
    return o, lse


def backward_delta(o: Tensor, do: Tensor) -> Tensor:
    """delta = rowsum(dO o O), float32 (B, H, Lq): the backward's first kernel (benchmarks time it alone)."""
    B, H, Lq, D = o.shape
    delta = torch.empty((B, H, Lq), device=o.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *strides(o), *strides(do), H, Lq, D,
                                                BLOCK_M=64, BLOCK_D=block_d(D))
    return delta


def forward_configs(head_dim: int) -> list[tuple[int, int, int, int]]:
    """The forward's autotune list for this head dim as (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    configs = _FWD_WIDE if block_d(head_dim) > 128 else _FWD_CONFIGS
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def forward_config(block_m: int, block_n: int, num_warps: int, num_stages: int, **constexprs: Any) -> triton.Config:
    """One forward config, with the hook that gives tensor descriptors its tile shape: what
    `flash_kernels(D).forward.pinned(...)` takes (constexprs: an experiment's extra kernel flags)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **constexprs}, num_warps=num_warps,
                         num_stages=num_stages, pre_hook=_tma_block_shapes)


def flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Tensor | None,
                   causal: bool, q_offset: int, scale: float, need_dslopes: bool, *, options: KernelOptions,
                   dropout: Dropout | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and dslopes (float32 (H,), or None without need_dslopes) by two kernels: dK/dV over key
    tiles, dQ over query tiles, each recomputing the probabilities (and, with `dropout`, the forward's
    mask from the same seed). o and lse are the forward's."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    tile_d = block_d(D)
    do = last_dim_contiguous(do)
    delta = backward_delta(o, do)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    has_slopes = slopes is not None
    sl = slopes if has_slopes else lse
    dsl = torch.empty_like(lse) if need_dslopes else lse
    qk_scale = scale * LOG2E.value
    buckets = (bucket(Lq), bucket(Lk))
    kernels = _KERNELS[tile_d > 128]
    seed, dropout_p, keep_scale = _dropout_args(dropout, lse)
    flags = dict(CAUSAL=causal, HAS_SLOPES=has_slopes, DROPOUT=dropout is not None, BLOCK_D=tile_d)
    key = (q.dtype, D, *buckets, causal, has_slopes, dropout is not None)
    grid_kv = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)
    kernels.dkdv.launch(grid_kv, key, (
        q, k, v, do, lse, delta, sl, dk, dv, seed, *strides(q), *strides(k), *strides(v), *strides(do),
        *strides(dk), *strides(dv), H, Hkv, H // Hkv, Lq, Lk, q_offset, qk_scale, scale, dropout_p, keep_scale, D,
        *buckets), flags,
        autotune=options.autotune)
    grid_q = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    kernels.dq.launch(grid_q, (*key, need_dslopes), (
        q, k, v, do, lse, delta, sl, dq, dsl, seed, *strides(q), *strides(k), *strides(v), *strides(do),
        *strides(dq), H, H // Hkv, Lq, Lk, q_offset, qk_scale, scale, dropout_p, keep_scale, D, *buckets),
        dict(flags, NEED_DSLOPES=need_dslopes), autotune=options.autotune)
    dslopes = dsl.view(B, H, Lq).sum(dim=(0, 2)) if need_dslopes else None
    return dq, dk, dv, dslopes

"""Fused ALiBi attention in Triton: forward and backward, the bias computed inside the tile.

Tensor layout and semantics are those of `alibi_lm.kernels.attention`; `reference.attention_reference`
is the ground truth these kernels are tested against. The bias -slope_h * (pos_q - j) (or |pos_q - j|
without the causal mask) is formed per tile in fp32 from integer positions, so no (Lq, Lk) tensor is
ever stored and the distance is exact up to 2^24 tokens.

Layout of the file: block-range helpers -> forward kernel -> backward kernels (delta, dK/dV, dQ with
dslopes) -> launchers (through `launch.TunedKernel`) -> custom ops (forward with autograd, backward, decoding;
what torch.compile sees) and the eager autograd.Function -> `triton_attention` / `supports`.

Scores are kept in the log2 domain (scale and slopes premultiplied by log2(e)) so the softmax uses
exp2; the saved log-sum-exp is in the same domain.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from alibi_lm.kernels.launch import TunedKernel

__all__ = ["HEAD_DIMS", "supports", "triton_attention"]

# Head dims the kernels are built and tested for; others are padded the same way but untested.
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ALIBI_TRITON_AUTOTUNE=0 pins each kernel to its first config: GPU test runs compile dozens of
# (dtype, head dim, flag) variants, and autotuning each would multiply the compile time.
_AUTOTUNE = os.environ.get("ALIBI_TRITON_AUTOTUNE", "1") != "0"
# On sm_90+ the forward kernel loads its Q/K/V tiles through the tensor memory accelerator (host tensor
# descriptors) instead of pointer arithmetic: on the H100 forward +21-47%, fwd+bwd +4-8% (BENCHMARKS.md).
# ALIBI_TRITON_TMA=0 keeps the pointer loads (they also serve older GPUs and tensors the copy engine
# cannot address). The backward kernels keep pointer loads: with descriptors they measured 2-4% slower.
USE_TMA = os.environ.get("ALIBI_TRITON_TMA", "1") != "0"
# The head dim D is a compile-time constant of every kernel (one binary per head dim, as BLOCK_D already
# forced). As a run-time argument, the `BLOCK_D == D` choice between plain and masked loads became a
# branch inside the key/query loops, and Triton does not software-pipeline loads under a branch: on the
# H100 the main loops of both backward kernels then loaded every tile synchronously (their TTGIR showed
# no async copies there, only in the masked diagonal loops).
# Queries at most this many (and no gradient wanted) take the split-K decoding kernel.
DECODE_MAX_QUERIES = 16


def _configs(hopper: list[tuple[int, int, int, int]], interpret: tuple[int, int], pre_hook=None
             ) -> list[triton.Config]:
    # The interpreter pays per block, not per element, and autotuning there would only multiply the
    # test time: one small config with BLOCK_M != BLOCK_N so the diagonal bookkeeping is exercised.
    if _INTERPRET:
        hopper = [(interpret[0], interpret[1], 4, 1)]
    elif not _AUTOTUNE:
        hopper = hopper[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for m, n, w, s in hopper]


def _tma_block_shapes(nargs: dict) -> None:
    """Give the forward kernel's tensor descriptors (when it gets them) the tile shapes of the config the
    autotuner is about to launch: a descriptor's block shape is fixed at launch, the config is not.
    Query-side tensors are tiled by BLOCK_M rows, key-side ones by BLOCK_N."""
    for name, rows in (("Qd", "BLOCK_M"), ("Od", "BLOCK_M"), ("Kd", "BLOCK_N"), ("Vd", "BLOCK_N")):
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from FlashAttention-2 Triton practice on sm_90.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
                        (32, 16), pre_hook=_tma_block_shapes)
# The dK/dV kernel keeps a key tile resident and streams queries; the dQ kernel the reverse.
# Measured per config with benchmarks/backward_study.py (H100, L = 8192, 2026-11-25): the first entries were
# the fastest or within 3% of it at D = 64 and 128; 4-warp tiles of 128 keys spill at D = 128 (4-5x slower).
_DKDV_CONFIGS = _configs([(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)], (16, 32))
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 4, 3)], (32, 16))
# D = 256: the tiles above overflow the 227 KiB of shared memory (and the fp32 accumulators the
# registers), so wide heads get their own short lists with narrow tiles and shallow pipelines.
_FWD_WIDE = _configs([(64, 32, 4, 2), (64, 64, 8, 2)], (32, 16), pre_hook=_tma_block_shapes)
_DKDV_WIDE = _configs([(32, 32, 8, 1), (32, 64, 8, 1)], (16, 32))
_DQ_WIDE = _configs([(64, 32, 8, 1), (32, 32, 4, 2)], (32, 16))


# Triton 3.9's interpreter multiplies bf16 tiles as raw integers in tl.dot; there the operands
# (already rounded to bf16) are widened to fp32 first, which gives the same products.
_WIDEN_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b):
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _bias_positions(pos_q, Lk):
    """Query positions as the bias sees them: clamped to the last key.

    Past the last key every distance only grows by the same row constant, which softmax ignores
    (and so do the gradients); clamping keeps scores small, so fp32 rounding of a 64k-token offset
    cannot perturb the softmax of queries that sit far beyond a short cache."""
    return tl.minimum(pos_q, Lk - 1).to(tl.float32)


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
    qk = _dot(q, kT)
    if HAS_SLOPES:
        if CAUSAL:
            return qk * qk_scale + (slope_l2 * (pos_k - anchor))[None, :]
        dist = tl.abs(pos_b[:, None] - pos_k[None, :])
        return qk * qk_scale - slope_l2 * dist
    return qk * qk_scale


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, stride_kn, stride_vn, lo, hi, pos_q, pos_b, anchor, offs_n,
               offs_d, Lk, D: tl.constexpr, qk_scale, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        pos_k = offs_k.to(tl.float32)
        kT_ptrs = K + offs_k[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = V + offs_k[:, None] * stride_vn + offs_d[None, :]
        if USE_TMA:
            # rows past Lk (and columns past D) arrive as zeros; the scores' mask below still applies
            kT = tl.trans(Kd.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
            v = Vd.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif MASKED:
            k_ok = offs_k < Lk
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == D:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = _scores(q, kT, pos_b, pos_k, anchor, qk_scale, slope_l2, CAUSAL, HAS_SLOPES)
        if MASKED:
            ok = (offs_k < Lk)[None, :]
            if CAUSAL:
                ok = ok & (pos_k[None, :] <= pos_q[:, None])
            s = tl.where(ok, s, float("-inf"))
        # Key 0 is visible to every query and sits in the first block visited, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Qd, Kd, Vd, Od, Slopes, O, LSE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                H, GROUP, Lq, Lk, q_offset, qk_scale, D: tl.constexpr, LQ_BUCKET, LK_BUCKET,
                CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        slope_l2 = tl.load(Slopes + h) * 1.4426950408889634
    pos_q = (q_offset + offs_m).to(tl.float32)
    pos_b = _bias_positions(q_offset + offs_m, Lk)
    anchor = _bias_positions(q_offset + start_m, Lk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Blocks wholly visible to every row of this tile need neither the causal nor the length mask.
    full_end = (Lk // BLOCK_N) * BLOCK_N
    hi = Lk
    if CAUSAL:
        full_end = tl.minimum(full_end, ((q_offset + start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Lk, q_offset + start_m + BLOCK_M)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, skn, svn, 0, full_end, pos_q, pos_b, anchor,
                               offs_n, offs_d, Lk, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, False, USE_TMA, BLOCK_N,
                               BLOCK_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Kd, Vd, b, hkv, skn, svn, full_end, hi, pos_q, pos_b, anchor,
                               offs_n, offs_d, Lk, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, True, USE_TMA, BLOCK_N,
                               BLOCK_D)
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i) - _row_term(pos_b, anchor, slope_l2, CAUSAL, HAS_SLOPES)
    tl.store(LSE + bh * Lq + offs_m, lse, mask=m_ok)
    if USE_TMA:
        # the copy engine drops the rows past Lq (and columns past D) of the tile
        Od.store([b, h, start_m, 0], acc.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


_KEY = ["LQ_BUCKET", "LK_BUCKET", "D", "CAUSAL", "HAS_SLOPES"]
_fwd = triton.autotune(_FWD_CONFIGS, key=[*_KEY, "USE_TMA"])(_fwd_kernel)
_fwd_wide = triton.autotune(_FWD_WIDE, key=[*_KEY, "USE_TMA"])(_fwd_kernel)
_FWD_LAUNCH = {False: TunedKernel(_fwd), True: TunedKernel(_fwd_wide)}  # by "wide" (BLOCK_D > 128)


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
                D: tl.constexpr, qk_scale, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulate one query head's contribution to a resident key tile, queries in [lo, hi)."""
    d_ok = offs_d < D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        pos_q = (q_offset + rows).to(tl.float32)
        pos_b = _bias_positions(q_offset + rows, Lk)
        qT_ptrs = Q + rows[None, :] * sqm + offs_d[:, None]
        do_ptrs = dO + rows[:, None] * sdom + offs_d[None, :]
        if MASKED:
            r_ok = rows < Lq
            qT = tl.load(qT_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            # +inf drives the probabilities of absent rows to zero
            lse = tl.load(LSE + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(Delta + rows, mask=r_ok, other=0.0)
        else:
            if BLOCK_D == D:
                qT = tl.load(qT_ptrs)
                do = tl.load(do_ptrs)
            else:
                qT = tl.load(qT_ptrs, mask=d_ok[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(LSE + rows)
            delta = tl.load(Delta + rows)
        # transposed tile: keys are rows here, so the bias distance is pos_q - pos_k along columns
        # (the key/query split of _row_term measured 0-4% slower here than the distance itself, H100)
        sT = _dot(k, qT) * qk_scale
        if HAS_SLOPES:
            dist = pos_b[None, :] - pos_k[:, None]
            if not CAUSAL:
                dist = tl.abs(dist)
            sT = sT - slope_l2 * dist
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED and CAUSAL:
            pT = tl.where(pos_k[:, None] <= pos_q[None, :], pT, 0.0)
        dv += _dot(pT.to(do.dtype), do)
        dpT = _dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dO, LSE, Delta, Slopes, dK, dV,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                 H, Hkv, GROUP, Lq, Lk, q_offset, qk_scale, sm_scale, D: tl.constexpr, LQ_BUCKET, LK_BUCKET,
                 CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
            slope_l2 = tl.load(Slopes + h) * 1.4426950408889634
        Qh = Q + b * sqb + h * sqh
        dOh = dO + b * sdob + h * sdoh
        LSEh = LSE + bh * Lq
        Dh = Delta + bh * Lq
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, diag_lo, diag_hi, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, True, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, diag_hi, lq_full, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, False, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, dOh, LSEh, Dh, sqm, sdom, mid_hi, Lq, pos_k, offs_m, offs_d,
                             Lq, Lk, q_offset, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, True, BLOCK_M, BLOCK_D)
    tl.store(dK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, lo, hi, pos_q, pos_b, anchor, offs_n, offs_d, Lk,
              D: tl.constexpr, qk_scale, slope_l2, CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr,
              NEED_DSLOPES: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        pos_k = offs_k.to(tl.float32)
        kT_ptrs = K + offs_k[None, :] * skn + offs_d[:, None]
        vT_ptrs = V + offs_k[None, :] * svn + offs_d[:, None]
        if MASKED:
            k_ok = offs_k < Lk
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        elif BLOCK_D == D:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
        s = _scores(q, kT, pos_b, pos_k, anchor, qk_scale, slope_l2, CAUSAL, HAS_SLOPES)
        p = tl.math.exp2(s - lse[:, None])  # lse carries the query term _scores leaves out
        if MASKED:
            ok = (offs_k < Lk)[None, :]
            if CAUSAL:
                ok = ok & (pos_k[None, :] <= pos_q[:, None])
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT))
        if NEED_DSLOPES:
            # d(score)/d(slope) = -distance. Summing ds * distance directly would multiply the rounding
            # of delta (it comes from the stored low-precision O) by distances up to 64k; instead keep
            # the three row sums whose combination X - Z * Y uses the exact delta Z = sum p * dp.
            dist = pos_b[:, None] - pos_k[None, :]
            if not CAUSAL:
                dist = tl.abs(dist)
            pdp = p * dp
            sx += tl.sum(pdp * dist, 1)
            sy += tl.sum(p * dist, 1)
            sz += tl.sum(pdp, 1)
    return dq, sx, sy, sz


@triton.jit
def _dq_kernel(Q, K, V, dO, LSE, Delta, Slopes, dQ, dSl,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
               H, GROUP, Lq, Lk, q_offset, qk_scale, sm_scale, D: tl.constexpr, LQ_BUCKET, LK_BUCKET,
               CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, NEED_DSLOPES: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        slope_l2 = tl.load(Slopes + h) * 1.4426950408889634
    pos_q = (q_offset + offs_m).to(tl.float32)
    pos_b = _bias_positions(q_offset + offs_m, Lk)
    anchor = _bias_positions(q_offset + start_m, Lk)
    lse += _row_term(pos_b, anchor, slope_l2, CAUSAL, HAS_SLOPES)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sx = tl.zeros([BLOCK_M], tl.float32)
    sy = tl.zeros([BLOCK_M], tl.float32)
    sz = tl.zeros([BLOCK_M], tl.float32)
    full_end = (Lk // BLOCK_N) * BLOCK_N
    hi = Lk
    if CAUSAL:
        full_end = tl.minimum(full_end, ((q_offset + start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Lk, q_offset + start_m + BLOCK_M)
    dq, sx, sy, sz = _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, 0, full_end, pos_q, pos_b,
                               anchor, offs_n, offs_d, Lk, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, NEED_DSLOPES,
                               False, BLOCK_N, BLOCK_D)
    dq, sx, sy, sz = _dq_inner(dq, sx, sy, sz, q, do, lse, delta, K, V, skn, svn, full_end, hi, pos_q, pos_b,
                               anchor, offs_n, offs_d, Lk, D, qk_scale, slope_l2, CAUSAL, HAS_SLOPES, NEED_DSLOPES,
                               True, BLOCK_N, BLOCK_D)
    tl.store(dQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=mask)
    if NEED_DSLOPES:
        # one partial per query row; the launcher sums rows and batch (a tiny (B, H, Lq) reduction)
        tl.store(dSl + bh * Lq + offs_m, sz * sy - sx, mask=m_ok)


_dkdv = triton.autotune(_DKDV_CONFIGS, key=_KEY)(_dkdv_kernel)
_dkdv_wide = triton.autotune(_DKDV_WIDE, key=_KEY)(_dkdv_kernel)
_dq = triton.autotune(_DQ_CONFIGS, key=[*_KEY, "NEED_DSLOPES"])(_dq_kernel)
_dq_wide = triton.autotune(_DQ_WIDE, key=[*_KEY, "NEED_DSLOPES"])(_dq_kernel)
_DKDV_LAUNCH = {False: TunedKernel(_dkdv), True: TunedKernel(_dkdv_wide)}
_DQ_LAUNCH = {False: TunedKernel(_dq), True: TunedKernel(_dq_wide)}


# ----------------------------------------------------------------------------------------------------
# launchers


def _bucket(n: int) -> int:
    # autotune once per power-of-two length band, not once per prefill length
    return 1 << max(n - 1, 0).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _strides(t: Tensor) -> tuple[int, ...]:
    # one stride() call, not three: the launchers pass 13 tensors' strides per backward, on the host path
    return t.stride()[:3]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _compute_capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _tma_capable(*tensors: Tensor) -> bool:
    """Whether the copy engine can address these (B, H, L, D) tensors: sm_90+ (or the interpreter), a
    16-byte-aligned base, and every stride but the last a positive multiple of 16 bytes (an expanded,
    stride-0 dimension is left to the pointer loads)."""
    if not (_INTERPRET or (tensors[0].is_cuda and _compute_capability(tensors[0].device.index)[0] >= 9)):
        return False
    if any(t.numel() == 0 for t in tensors):  # a descriptor needs every dimension positive (an empty batch)
        return False
    return all(t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in tensors)


def _descriptor(t: Tensor) -> TensorDescriptor:
    # the block shape is a placeholder: _tma_block_shapes sets the launched config's tile
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, _block_d(t.shape[-1])])


def _forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
             scale: float, tma: bool | None = None) -> tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    has_slopes = slopes is not None
    sl = slopes if has_slopes else lse  # any pointer; never read without HAS_SLOPES
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    block_d = _block_d(D)
    use_tma = (USE_TMA if tma is None else tma) and block_d <= 128 and _tma_capable(q, k, v, o)
    descriptors = [_descriptor(t) for t in (q, k, v, o)] if use_tma else [q, k, v, o]
    buckets = (_bucket(Lq), _bucket(Lk))
    args = (q, k, v, *descriptors, sl, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, H // Hkv, Lq, Lk, q_offset, scale * _LOG2E, D, *buckets)
    _FWD_LAUNCH[block_d > 128].launch(grid, (q.dtype, D, *buckets, causal, has_slopes, use_tma), args,
                                      dict(CAUSAL=causal, HAS_SLOPES=has_slopes, USE_TMA=use_tma, BLOCK_D=block_d))
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Tensor | None,
              causal: bool, q_offset: int, scale: float, need_dslopes: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and dslopes by two kernels: dK/dV over key tiles, dQ over query tiles, each
    recomputing the probabilities."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = _block_d(D)
    do = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *_strides(o), *_strides(do), H, Lq, D,
                                                BLOCK_M=64, BLOCK_D=block_d)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    has_slopes = slopes is not None
    sl = slopes if has_slopes else lse
    dsl = torch.empty_like(lse) if need_dslopes else lse
    qk_scale = scale * _LOG2E
    buckets = (_bucket(Lq), _bucket(Lk))
    grid_kv = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)
    wide = block_d > 128
    flags = dict(CAUSAL=causal, HAS_SLOPES=has_slopes, BLOCK_D=block_d)
    key = (q.dtype, D, *buckets, causal, has_slopes)
    _DKDV_LAUNCH[wide].launch(grid_kv, key, (
        q, k, v, do, lse, delta, sl, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, Hkv, H // Hkv, Lq, Lk, q_offset, qk_scale, scale, D, *buckets), flags)
    grid_q = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _DQ_LAUNCH[wide].launch(grid_q, (*key, need_dslopes), (
        q, k, v, do, lse, delta, sl, dq, dsl, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), H, H // Hkv, Lq, Lk, q_offset, qk_scale, scale, D, *buckets),
        dict(flags, NEED_DSLOPES=need_dslopes))
    dslopes = dsl.view(B, H, Lq).sum(dim=(0, 2)) if need_dslopes else None
    return dq, dk, dv, dslopes


# ----------------------------------------------------------------------------------------------------
# custom ops
#
# torch.compile must not trace into the launchers: Inductor re-compiles user Triton kernels from their
# source and failed on these (torch 2.11 / Triton 3.6 on the H100, a CompilationError inside _fwd_kernel).
# Registered as torch.library custom ops, the launchers are opaque to Dynamo and Inductor (called as
# they are, never re-compiled) while the graph around them stays whole; the fake implementations give
# the output shapes the compilers need. Inputs arrive validated; slopes, when given, are float32 (the
# wrapper casts them, so autograd casts their gradient back to the slopes' dtype). The ops' schemas are
# inferred from their type hints, written Optional[Tensor] as torch.library documents it.


def _kernel_layout(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """What the kernels index: unit stride along the head dim, dense slopes. The wrapper already
    hands such tensors over; under torch.compile the compiler chooses the layouts of the op's inputs,
    so the real implementations make sure again (a no-op when they already are), and the fake ones
    allocate their outputs from the same normalised layout."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return q, k, v, (None if slopes is None else slopes.contiguous())


@torch.library.custom_op("alibi_lm::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], causal: bool, q_offset: int,  # noqa: UP045
                  scale: float) -> tuple[Tensor, Tensor]:
    """(out like q, lse float32 (B, H, Lq) in the log2 domain)."""
    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    return _forward(q, k, v, slopes, causal, q_offset, scale)


@_flash_fwd_op.register_fake
def _flash_fwd_fake(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                    scale: float) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return torch.empty_like(_last_dim_contiguous(q)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("alibi_lm::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Optional[Tensor],  # noqa: UP045
                  causal: bool, q_offset: int, scale: float, need_dslopes: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dslopes): dk and dv shaped like k and v (GQA), dslopes float32 (H,) when
    need_dslopes, else an empty tensor (a custom op cannot return None)."""
    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    o, lse = _last_dim_contiguous(o), lse.contiguous()
    dq, dk, dv, dsl = _backward(do, q, k, v, o, lse, slopes, causal, q_offset, scale, need_dslopes)
    if dsl is None:
        dsl = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dsl


@_flash_bwd_op.register_fake
def _flash_bwd_fake(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Tensor | None,
                    causal: bool, q_offset: int, scale: float, need_dslopes: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_sl = q.shape[1] if need_dslopes else 0
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((n_sl,), dtype=torch.float32))


def _flash_setup_context(ctx, inputs, output) -> None:
    q, k, v, slopes, causal, q_offset, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, slopes)
    ctx.args = (causal, q_offset, scale)


def _flash_backward(ctx, do: Tensor, _dlse: Tensor | None):
    # lse is an internal output (the public function returns only out), so its gradient is ignored
    q, k, v, o, lse, slopes = ctx.saved_tensors
    causal, q_offset, scale = ctx.args
    need_dslopes = slopes is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dsl = _flash_bwd_op(do, q, k, v, o, lse, slopes, causal, q_offset, scale, need_dslopes)
    return dq, dk, dv, (dsl if need_dslopes else None), None, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


class _EagerFlashAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: outside torch.compile nothing
    needs the ops' opacity, and their dispatch (schema checks, the generated autograd wrapper, a second
    op for the backward) cost more host time than the kernels' launches of a small shape."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                scale: float) -> tuple[Tensor, Tensor]:
        return _forward(q, k, v, slopes, causal, q_offset, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _flash_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for lse's gradient, which is never used

    @staticmethod
    def backward(ctx, do: Tensor, _dlse: Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients have no gradient of their own
            raise RuntimeError("the Triton attention kernel has no double backward (create_graph=True); "
                               "use backend='sdpa' or 'reference' for higher-order gradients")
        q, k, v, o, lse, slopes = ctx.saved_tensors
        need_dslopes = slopes is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dsl = _backward(do, q, k, v, o, lse, slopes, *ctx.args, need_dslopes)
        return dq, dk, dv, dsl, None, None, None


@torch.library.custom_op("alibi_lm::decode_attention", mutates_args=())
def _decode_op(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], causal: bool, q_offset: int,  # noqa: UP045
               scale: float) -> Tensor:
    """The split-K decoding kernel (triton_decode.py), forward only: the wrapper takes it only when no
    gradient is wanted."""
    from alibi_lm.kernels.triton_decode import triton_decode

    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    return triton_decode(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, scale=scale)


@_decode_op.register_fake
def _decode_fake(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                 scale: float) -> Tensor:
    return torch.empty_like(_last_dim_contiguous(q))


def supports(q: Tensor) -> bool:
    """Whether the fused kernel handles q's device, dtype and head dim (the "auto" backend asks this)."""
    return (q.is_cuda or _INTERPRET) and q.dtype in _DTYPES and q.shape[-1] in HEAD_DIMS


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise ValueError(f"the triton attention kernel takes float16 or bfloat16 inputs, got {q.dtype}; "
                         "use backend='sdpa' or 'reference' for other dtypes")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the triton attention kernel supports head dims {HEAD_DIMS}, got {q.shape[-1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys is undefined")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError(f"the triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None = None, causal: bool = True,
                     q_offset: int = 0, scale: float | None = None) -> Tensor:
    """Fused attention with an in-kernel ALiBi bias; arguments and layout as `alibi_lm.attention`.

    Few queries over a cache (Lq <= DECODE_MAX_QUERIES) with no gradient wanted take the split-K
    decoding kernel; everything else the flash kernel, differentiable in q, k, v and slopes."""
    _validate(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0:
        return torch.empty_like(q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    wants_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (slopes is not None and slopes.requires_grad))
    # Traced calls (torch.compile, export; fake tensors, which are a Tensor subclass) keep the custom
    # ops, whose fake implementations the tracers need; plain tensors take the leaner eager path.
    traced = torch.compiler.is_compiling() or type(q) is not Tensor
    if not wants_grad and q.shape[2] <= DECODE_MAX_QUERIES:
        if traced:
            return _decode_op(q, k, v, slopes, causal, q_offset, scale)
        from alibi_lm.kernels.triton_decode import triton_decode

        return triton_decode(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, scale=scale)
    # the cast is differentiable: autograd brings dslopes back to the slopes' own dtype
    sl32 = None if slopes is None else slopes.to(torch.float32).contiguous()
    if traced:
        return _flash_fwd_op(q, k, v, sl32, causal, q_offset, scale)[0]
    return _EagerFlashAttention.apply(q, k, v, sl32, causal, q_offset, scale)[0]


def flash_forward(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None = None, causal: bool = True,
                  q_offset: int = 0, scale: float | None = None) -> Tensor:
    """The flash forward kernel alone, whatever Lq (tests and benchmarks compare it with decoding)."""
    _validate(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sl32 = None if slopes is None else slopes.detach().to(torch.float32).contiguous()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _forward(q, k, v, sl32, causal, q_offset, scale)[0]


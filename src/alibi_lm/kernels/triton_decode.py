"""Split-K ALiBi attention for a few queries over a long key/value cache (decoding), forward only.

One new token has too few query rows to fill the GPU with query tiles, so the keys are cut into
splits, each program reading one split of one key/value head for every query head of its GQA group
and every query row at once (K and V are read from memory once per group, not once per head). A
second kernel merges the splits' partial softmax states. With one split, the first kernel writes
the normalised output itself and the merge is skipped. Semantics as `alibi_lm.kernels.attention`;
`triton_attention` routes calls here (a few queries, no gradient wanted) and validates their inputs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from alibi_lm.kernels.triton_common import (
    LOG2E,
    bias_distance,
    bias_positions,
    block_d,
    dot,
    key_mask,
    load_tile,
    online_softmax_step,
    strides,
)

__all__ = ["PLANS", "decode_plan", "triton_decode"]

_BLOCK_N = 64
# Aim for this many programs per multiprocessor so each has loads in flight while others compute.
_PROGRAMS_PER_SM = 4
# Outside a CUDA graph a short cache is host-bound: the split kernel plus the merge cost ~80 µs of host
# time per call on an H200 host, one pass (one program per batch and kv head streaming all its keys)
# ~45 µs, and that pass finishes on the GPU in 21-64 µs up to 4k keys (B = 1, H = 16, D = 128;
# 8 x 4k and 32 x 1k break even; results/bench/2026-11-26-early/host-h200/decode_probe.json). So eager
# calls over at most this many keys, and this many key rows over all batches and kv heads, take one
# pass; captured calls, where only GPU time counts, always split.
_ONE_PASS_MAX_KEYS = 4096
_ONE_PASS_MAX_KEY_ROWS = 1 << 19


# Lengths and offsets change by one every generated token: specialised (Triton compiles a variant for
# integers divisible by 16 and for 1), each new variant would stall generation for a compile mid-way.
@triton.jit(do_not_specialize=["Lq", "Lk", "q_offset", "keys_per_split", "n_split"])
def _split_kernel(Q, K, V, Slopes, O, Opart, Mpart, Lpart,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                  H, Hkv, GROUP, Lq, Lk, q_offset, qk_scale, keys_per_split, n_split, D,
                  CAUSAL: tl.constexpr, HAS_SLOPES: tl.constexpr, DIRECT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    bhkv = tl.program_id(1)
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    # row r packs (head g of the group, query i): the group shares every K/V tile loaded
    offs_r = tl.arange(0, BLOCK_R)
    g = offs_r // Lq
    i = offs_r % Lq
    r_ok = offs_r < GROUP * Lq
    h = hkv * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    slope_l2 = tl.zeros([BLOCK_R], tl.float32)
    if HAS_SLOPES:
        slope_l2 = tl.load(Slopes + h, mask=r_ok, other=0.0) * LOG2E
    pos_q = (q_offset + i).to(tl.float32)
    pos_b = bias_positions(q_offset + i, Lk)  # see triton_common.bias_positions
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Lk)
    if CAUSAL:
        hi = tl.minimum(hi, q_offset + Lq)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        # every load is masked: D is a run-time argument of this kernel, and the split may end mid-block
        kT = load_tile(K, offs_k, skn, offs_d, d_ok, hi, True, False, True)
        v = load_tile(V, offs_k, svn, offs_d, d_ok, hi, True, False, False)
        pos_k = offs_k.to(tl.float32)
        s = dot(q, kT) * qk_scale
        if HAS_SLOPES:
            s = s - slope_l2[:, None] * bias_distance(pos_b, pos_k, CAUSAL, False)
        s = key_mask(s, offs_k, hi, pos_k, pos_q, float("-inf"), CAUSAL)
        # a row may have seen nothing yet in this split (causal, early split)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v)
    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h[:, None] * soh + i[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])
    else:
        # partial state of row (b, h, i) for this split; rows are laid out (B, H, Lq)
        row = (b * H + h) * Lq + i
        tl.store(Opart + (row[:, None] * n_split + split) * BLOCK_D + offs_d[None, :], acc,
                 mask=r_ok[:, None])
        tl.store(Mpart + row * n_split + split, m_i, mask=r_ok)
        tl.store(Lpart + row * n_split + split, l_i, mask=r_ok)


@triton.jit(do_not_specialize=["Lq", "n_split"])
def _merge_kernel(O, Opart, Mpart, Lpart, sob, soh, som, H, Lq, n_split, D,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    bh = row // Lq
    i = row % Lq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_split
    m = tl.load(Mpart + row * n_split + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(Lpart + row * n_split + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(Opart + (row * n_split + offs_s[:, None]) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    # split 0 always holds key 0, visible to every query, so m_max is finite
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(O + b * sob + h * soh + i * som + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 4  # the interpreter: a few splits, to exercise the merge
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_plan(batch_kv_heads: int, n_keys: int, device: torch.device, host_bound: bool = False
                ) -> tuple[int, int]:
    """(keys per split, number of splits): enough programs to cover every multiprocessor, or a single
    pass when the call is host-bound and the cache short (see _ONE_PASS_MAX_KEYS)."""
    if host_bound and n_keys <= _ONE_PASS_MAX_KEYS and batch_kv_heads * n_keys <= _ONE_PASS_MAX_KEY_ROWS:
        return triton.cdiv(n_keys, _BLOCK_N) * _BLOCK_N, 1
    target = _PROGRAMS_PER_SM * _multiprocessors(device.index if device.type == "cuda" else None)
    n_blocks = triton.cdiv(n_keys, _BLOCK_N)
    n_split = max(1, min(n_blocks, triton.cdiv(target, batch_kv_heads)))
    keys_per_split = triton.cdiv(n_blocks, n_split) * _BLOCK_N
    return keys_per_split, triton.cdiv(n_keys, keys_per_split)


#: how `triton_decode` cuts the keys: "auto" (below), or, for benchmarks, always "split" or always "one" pass
PLANS = ("auto", "split", "one")


def decode_plan(q: Tensor, k: Tensor, plan: str = "auto") -> tuple[int, int]:
    """(keys per split, number of splits) that `triton_decode` takes for q over k when called now: a
    single pass for eager calls on a GPU over a short cache (host-bound, see _ONE_PASS_MAX_KEYS), else
    splits enough to cover the GPU (also while a CUDA graph is being captured, where only GPU time counts).
    plan="split" or "one" forces either (benchmarks/decode_split.py compares them)."""
    if plan not in PLANS:
        raise ValueError(f"unknown decoding plan {plan!r}; valid: {', '.join(PLANS)}")
    if plan == "one":
        return triton.cdiv(k.shape[2], _BLOCK_N) * _BLOCK_N, 1
    host_bound = plan == "auto" and q.is_cuda and not torch.cuda.is_current_stream_capturing()
    return _split_plan(q.shape[0] * k.shape[1], k.shape[2], q.device, host_bound)


def triton_decode(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None = None, causal: bool = True,
                  q_offset: int = 0, scale: float | None = None, plan: str = "auto") -> Tensor:
    """Attention of a few queries over many keys, no autograd; layout and semantics as `attention`.

    Inputs are assumed validated by `triton_attention` (half precision, supported head dim)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale
    tile_d = block_d(D)
    block_r = max(16, triton.next_power_of_2(group * Lq))
    keys_per_split, n_split = decode_plan(q, k, plan)
    o = torch.empty_like(q)
    has_slopes = slopes is not None
    sl = slopes.detach().to(torch.float32).contiguous() if has_slopes else o
    direct = n_split == 1
    if direct:
        opart = mpart = lpart = o  # unused pointers
    else:
        opart = torch.empty((B * H * Lq, n_split, tile_d), device=q.device, dtype=torch.float32)
        mpart = torch.empty((B * H * Lq, n_split), device=q.device, dtype=torch.float32)
        lpart = torch.empty_like(mpart)
    _split_kernel[(n_split, B * Hkv)](
        q, k, v, sl, o, opart, mpart, lpart, *strides(q), *strides(k), *strides(v), *strides(o),
        H, Hkv, group, Lq, Lk, q_offset, scale * LOG2E.value, keys_per_split, n_split, D,
        CAUSAL=causal, HAS_SLOPES=has_slopes, DIRECT=direct, BLOCK_R=block_r, BLOCK_N=_BLOCK_N,
        BLOCK_D=tile_d, num_warps=4, num_stages=3)
    if not direct:
        _merge_kernel[(B * H * Lq,)](o, opart, mpart, lpart, *strides(o), H, Lq,
                                     n_split, D, BLOCK_S=triton.next_power_of_2(n_split), BLOCK_D=tile_d,
                                     num_warps=4)
    return o

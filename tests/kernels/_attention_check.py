"""Shared checking code of the Triton kernel tests: random inputs, a float64 oracle, the error rule.

The rule (as flash-attention's tests): the kernel's largest error against float64 is at most twice
that of `attention_reference` run on the same low-precision inputs, plus a floor of a few units of
the dtype's rounding at the quantity's scale (the reference keeps its softmax in fp32, so for some
quantities its own error is nothing but the final rounding).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from alibi_lm.kernels.reference import attention_reference
from alibi_lm.positions import alibi_slopes

_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool = True
    q_offset: int = 0
    slopes: str | None = "alibi"  # "alibi" (the paper's), "trainable" (random, with grad) or None
    dtype: torch.dtype = torch.bfloat16

    def seed(self) -> int:
        # crc32, not hash(): str hashing is salted per process, which gave every run other inputs
        fields = (self.batch, self.heads, self.kv_heads, self.q_len, self.k_len, self.head_dim, self.causal,
                  self.q_offset, self.slopes, str(self.dtype))
        return zlib.crc32(repr(fields).encode()) % (2**31)


def make_inputs(case: Case, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v in the case's dtype (never zeros, scaled so softmax is neither flat nor one-hot)."""
    g = torch.Generator().manual_seed(case.seed())
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = rand(case.batch, case.heads, case.q_len, case.head_dim)
    k = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    v = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    q, k, v = (t.to(device=device, dtype=case.dtype) for t in (q, k, v))
    if case.slopes is None:
        slopes = None
    elif case.slopes == "alibi":
        slopes = alibi_slopes(case.heads).to(device=device, dtype=torch.float32)
    else:
        slopes = (torch.rand(case.heads, generator=g, dtype=torch.float64) * 0.5 + 0.01).to(device, torch.float32)
    return q, k, v, slopes


def max_err(x: Tensor, ref64: Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values in the kernel's result"
    return (x.double() - ref64).abs().max().item()


def lse_oracle(q: Tensor, k: Tensor, slopes: Tensor | None, case: Case, scale: float) -> Tensor:
    """The forward kernel's saved row statistic in float64: log2 of the sum over visible keys of
    2^(log2(e) * biased score), (B, H, Lq). The kernels clamp the query position of the bias to the last
    key (a row constant past the cache, which no softmax sees), so the oracle does too."""
    q64, k64 = q.double(), k.double().repeat_interleave(case.heads // case.kv_heads, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    pos_q = torch.arange(case.q_offset, case.q_offset + case.q_len, dtype=torch.float64, device=q.device)
    pos_k = torch.arange(case.k_len, dtype=torch.float64, device=q.device)
    if slopes is not None:
        dist = (pos_q.clamp(max=case.k_len - 1)[:, None] - pos_k[None, :]).abs()
        scores = scores - slopes.double()[:, None, None] * dist
    if case.causal:
        scores = scores.masked_fill(pos_k[None, :] > pos_q[:, None], -math.inf)
    return torch.logsumexp(scores, dim=-1) / math.log(2.0)


def run_and_grads(fn, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, case: Case, do: Tensor,
                  grad: bool) -> dict[str, Tensor]:
    """Output and (if grad) dq, dk, dv and dslopes of fn on fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    sl = None
    if slopes is not None:
        sl = slopes.detach().clone().requires_grad_(grad and case.slopes == "trainable")
    out = fn(*leaves, slopes=sl, causal=case.causal, q_offset=case.q_offset)
    res = {"out": out.detach()}
    if grad:
        out.backward(do.to(out.dtype))
        res.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        if sl is not None and sl.requires_grad:
            res["dslopes"] = sl.grad
    return res


def check(case: Case, fn, *, grad: bool = True, device: str = "cpu", report: dict | None = None) -> None:
    """Assert fn matches the float64 oracle as well as the low-precision reference does (see module doc)."""
    q, k, v, slopes = make_inputs(case, device)
    g = torch.Generator().manual_seed(case.seed() + 1)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device)
    ours = run_and_grads(fn, q, k, v, slopes, case, do, grad)
    ref_low = run_and_grads(attention_reference, q, k, v, slopes, case, do, grad)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    sl64 = None if slopes is None else slopes.double()
    oracle = run_and_grads(attention_reference, q64, k64, v64, sl64, case, do, grad)
    assert set(ours) == set(oracle), f"kernel returned {sorted(ours)}, oracle {sorted(oracle)}"
    eps = _EPS[case.dtype]
    for name, want in oracle.items():
        scale = want.abs().max().item()
        err = max_err(ours[name], want)
        ref_err = max_err(ref_low[name].to(want.dtype), want)
        # dslopes sums O(Lq * Lk) terms whose row term (delta) comes from the rounded output
        floor = (16 if name == "dslopes" else 4) * eps * max(scale, 1e-3)
        if report is not None:
            report[name] = (err, ref_err, err / max(scale, 1e-30))
        assert err <= 2 * ref_err + floor, (
            f"{name}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e} + {floor:.1e} "
            f"(scale {scale:.3e}) for {case}")

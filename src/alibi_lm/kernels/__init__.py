"""`attention`: the one door to every attention backend.

Layout (used everywhere in the package): q is (B, H, Lq, D); k and v are (B, Hkv, Lk, D) with H a
multiple of Hkv, query head h reading key/value head h // (H / Hkv) (GQA/MQA, as SDPA's enable_gqa
and FlashAttention). Query i sits at absolute position q_offset + i and key j at position j; the
bias added to the scaled score is -slope_h * (pos_q - j), causal attention masks j > pos_q, and
non-causal attention uses the symmetric -slope_h * |pos_q - j|.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from alibi_lm.kernels.reference import attention_reference, materialized_bias
from alibi_lm.kernels.sdpa import attention_sdpa

__all__ = ["BACKENDS", "attention", "attention_reference", "available_backends", "choose_backend", "materialized_bias",
           "tile_stats"]

BACKENDS = ("auto", "reference", "sdpa", "triton")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# Looked up once: `attention` runs inside compiled models, and torch.compile cannot trace importlib
# (a lookup per call broke the graph of every layer and sent the whole model forward back to eager).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


#: whether the fused kernels take dropout_p (the in-kernel Philox mask of triton_flash)
_TRITON_DROPOUT = True


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ["reference", "sdpa"]
    if torch.device(device).type == "cuda" and triton_installed():
        names.append("triton")
    return names


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, q_offset: int,
                  bias: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, length, head_dim), got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        bad = "k" if k.dtype != q.dtype else "v"
        raise ValueError(f"{bad} has dtype {(k if bad == 'k' else v).dtype} but q has {q.dtype}")
    if k.device != q.device or v.device != q.device:
        bad = "k" if k.device != q.device else "v"
        raise ValueError(f"{bad} is on {(k if bad == 'k' else v).device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head_dim {k.shape[-1]} but q has {q.shape[-1]}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]} key/value heads")
    if slopes is not None:
        if not isinstance(slopes, Tensor) or slopes.shape != (q.shape[1],):
            shape = tuple(slopes.shape) if isinstance(slopes, Tensor) else type(slopes).__name__
            raise ValueError(f"slopes must have shape ({q.shape[1]},), one per query head, got {shape}")
        if not slopes.is_floating_point():
            raise ValueError(f"slopes must be floating point, got {slopes.dtype}")
        if slopes.device != q.device:
            raise ValueError(f"slopes is on {slopes.device} but q is on {q.device}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative int, got {q_offset!r}")
    if bias is not None and bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")


def choose_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int, *, alibi: bool,
                   bias: bool = False, dropout_p: float = 0.0) -> tuple[str, str]:
    """(backend, why) that backend="auto" takes for such a call, the reason in words (`alibi-lm info`)."""
    device = torch.device(device)
    if not alibi:
        # Without a bias, torch's SDPA (FlashAttention/cuDNN) is faster than our Triton kernel on the
        # H100 (BENCHMARKS.md), so the fused kernel is used where it wins: whenever there are slopes.
        return "sdpa", "no ALiBi slopes: SDPA's own fused kernels are faster without a bias"
    if bias:
        return "sdpa", "an extra additive bias (T5, padding): the fused kernel computes only ALiBi's"
    if dropout_p > 0 and not _TRITON_DROPOUT:
        return "sdpa", "attention dropout: the fused Triton kernels do not take it yet"
    if device.type != "cuda":
        return "sdpa", f"no CUDA device ({device.type}): the Triton kernels need one"
    if not triton_installed():
        return "sdpa", "triton is not installed"
    from alibi_lm.kernels.triton_attention import HEAD_DIMS

    if dtype not in _HALF_DTYPES:
        return "sdpa", f"{str(dtype).removeprefix('torch.')}: the Triton kernels take float16 or bfloat16"
    if head_dim not in HEAD_DIMS:
        return "sdpa", f"head dim {head_dim}: the Triton kernels are built for {', '.join(map(str, HEAD_DIMS))}"
    return "triton", "ALiBi in fp16/bf16 on CUDA: the fused kernel computes the bias in-kernel"


def _auto_backend(q: Tensor, slopes: Tensor | None, bias: Tensor | None, dropout_p: float) -> str:
    return choose_backend(q.device, q.dtype, q.shape[-1], alibi=slopes is not None, bias=bias is not None,
                          dropout_p=dropout_p)[0]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    slopes: Tensor | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str = "auto",
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    tolerance: float = 0.0,
    key_norm_max: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention with an ALiBi bias (slopes) or none (slopes=None).

    backend: "reference" (plain PyTorch, the ground truth), "sdpa" (torch SDPA with a materialised
    bias), "triton" (fused kernel, bias computed in-kernel), or "auto" (Triton for ALiBi in
    fp16/bf16 on CUDA; SDPA otherwise, including plain attention, where it is the faster kernel).
    `bias` is an optional extra additive tensor broadcastable to (B, H, Lq, Lk), for methods whose
    bias is not a function of the positions (T5); the fused kernel does not take one.
    `dropout_p` drops attention probabilities (kept ones scaled by 1 / (1 - p)); the mask is drawn from
    torch's generator of q's device at the call, so `torch.manual_seed(s)` before two calls gives the
    same mask. Pass 0 outside training.
    `tolerance` (inference) is the largest share of each query row's softmax mass that may be left out:
    the Triton backend then skips the key tiles that the ALiBi bias provably pushes below it
    (`triton_bounded`; every output component within 2 * tolerance * max|v| of the dense result, plus
    rounding); 0 is the dense result. Other backends, and calls that want gradients, compute the dense
    result, which leaves nothing out. `key_norm_max` (B, Hkv, Lk): the running maximum of the key norms
    along the keys, for a caller that keeps it (a KV cache does); else the bound computes it per call.
    Returns (B, H, Lq, D) in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    _check_inputs(q, k, v, slopes, q_offset, bias)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    if backend == "auto":
        backend = _auto_backend(q, slopes, bias, dropout_p)
    args = dict(slopes=slopes, causal=causal, q_offset=q_offset, scale=scale)
    if dropout_p > 0:
        args["dropout_p"] = float(dropout_p)
    if backend == "reference":
        return attention_reference(q, k, v, bias=bias, **args)
    if backend == "sdpa":
        return attention_sdpa(q, k, v, bias=bias, **args)
    if bias is not None:
        raise ValueError("the triton backend computes its bias in-kernel and takes no bias tensor; "
                         "use backend='sdpa' or 'reference' with bias")
    if not triton_installed():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if tolerance > 0 and dropout_p == 0 and not _wants_grad(q, k, v, slopes):
        from alibi_lm.kernels.triton_attention import _validate
        from alibi_lm.kernels.triton_bounded import bounded_attention

        _validate(q, k, v)
        return bounded_attention(q, k, v, tolerance=float(tolerance), stats=_TILE_STATS.get(),
                                 key_norm_max=key_norm_max, **args)
    from alibi_lm.kernels.triton_attention import triton_attention

    return triton_attention(q, k, v, **args)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: where bounded-error calls add the key tiles they read (see `tile_stats`)
_TILE_STATS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("alibi_lm_tile_stats", default=None)


@contextlib.contextmanager
def tile_stats() -> Iterator[dict]:
    """Count the key tiles that bounded-error attention (tolerance > 0 on the Triton backend) reads
    inside the block: {"tiles_visited", "tiles_dense"}, the second what dense kernels would have read
    for the same query blocks. Both stay 0 when no bounded call ran (the CPU, other backends)."""
    counts = {"tiles_visited": 0, "tiles_dense": 0}
    token = _TILE_STATS.set(counts)
    try:
        yield counts
    finally:
        _TILE_STATS.reset(token)

"""The torch-facing side of the Triton attention kernels: `triton_attention` (and `flash_forward`,
`supports`, `HEAD_DIMS`), which validates inputs and chooses between the flash kernels of `triton_flash`
and the split-K decoding kernel of `triton_decode`, through torch.library custom ops (what torch.compile
sees) or, in eager mode, an autograd.Function.

How the kernels are launched (`KernelOptions`: tensor descriptors, autotuning) is an argument of the
public functions; left out, it comes from the environment (`KernelOptions.from_env`) at each call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alibi_lm.kernels.triton_common import INTERPRET, KernelOptions, last_dim_contiguous
from alibi_lm.kernels.triton_decode import triton_decode
from alibi_lm.kernels.triton_flash import Dropout, draw_dropout, flash_backward, flash_forward_with_lse

__all__ = ["DECODE_MAX_QUERIES", "HEAD_DIMS", "KernelOptions", "flash_forward", "supports", "triton_attention"]

# Head dims the kernels are built and tested for; others are padded the same way but untested.
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)
# Queries at most this many (and no gradient wanted) take the split-K decoding kernel.
DECODE_MAX_QUERIES = 16


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
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return q, k, v, (None if slopes is None else slopes.contiguous())


def _dropout(dropout_p: float, seed: Tensor | None) -> Dropout | None:
    return None if seed is None else Dropout(dropout_p, seed)


# The ops take the launch options as two plain bools (tma, autotune), and dropout as its probability and
# seed tensor (None: no dropout): a schema holds no dataclass.
@torch.library.custom_op("alibi_lm::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], causal: bool, q_offset: int,  # noqa: UP045
                  scale: float, dropout_p: float, seed: Optional[Tensor], tma: bool, autotune: bool  # noqa: UP045
                  ) -> tuple[Tensor, Tensor]:
    """(out like q, lse float32 (B, H, Lq) in the log2 domain)."""
    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    return flash_forward_with_lse(q, k, v, slopes, causal, q_offset, scale, options=KernelOptions(tma, autotune),
                                  dropout=_dropout(dropout_p, seed))


@_flash_fwd_op.register_fake
def _flash_fwd_fake(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                    scale: float, dropout_p: float, seed: Tensor | None, tma: bool, autotune: bool
                    ) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return torch.empty_like(last_dim_contiguous(q)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("alibi_lm::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Optional[Tensor],  # noqa: UP045
                  causal: bool, q_offset: int, scale: float, dropout_p: float, seed: Optional[Tensor],  # noqa: UP045
                  need_dslopes: bool, autotune: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dslopes): dk and dv shaped like k and v (GQA), dslopes float32 (H,) when
    need_dslopes, else an empty tensor (a custom op cannot return None). The backward kernels have
    no descriptor loads, so autotune is their only option."""
    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    o, lse = last_dim_contiguous(o), lse.contiguous()
    dq, dk, dv, dsl = flash_backward(do, q, k, v, o, lse, slopes, causal, q_offset, scale, need_dslopes,
                                     options=KernelOptions(autotune=autotune), dropout=_dropout(dropout_p, seed))
    if dsl is None:
        dsl = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dsl


@_flash_bwd_op.register_fake
def _flash_bwd_fake(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, slopes: Tensor | None,
                    causal: bool, q_offset: int, scale: float, dropout_p: float, seed: Tensor | None,
                    need_dslopes: bool, autotune: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_sl = q.shape[1] if need_dslopes else 0
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((n_sl,), dtype=torch.float32))


def _save_for_backward(ctx, inputs: tuple, output: tuple[Tensor, Tensor], options: KernelOptions) -> None:
    q, k, v, slopes, causal, q_offset, scale, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, slopes, seed)
    ctx.args = (causal, q_offset, scale)
    ctx.dropout_p = dropout_p
    ctx.options = options


def _flash_setup_context(ctx, inputs, output) -> None:
    *attention_inputs, tma, autotune = inputs
    _save_for_backward(ctx, tuple(attention_inputs), output, KernelOptions(tma, autotune))


def _flash_backward(ctx, do: Tensor, _dlse: Tensor | None):
    # lse is an internal output (the public function returns only out), so its gradient is ignored
    q, k, v, o, lse, slopes, seed = ctx.saved_tensors
    causal, q_offset, scale = ctx.args
    need_dslopes = slopes is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dsl = _flash_bwd_op(do, q, k, v, o, lse, slopes, causal, q_offset, scale, ctx.dropout_p, seed,
                                    need_dslopes, ctx.options.autotune)
    return dq, dk, dv, (dsl if need_dslopes else None), None, None, None, None, None, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


class _EagerFlashAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: outside torch.compile nothing
    needs the ops' opacity, and their dispatch (schema checks, the generated autograd wrapper, a second
    op for the backward) cost more host time than the kernels' launches of a small shape."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                scale: float, dropout_p: float, seed: Tensor | None, options: KernelOptions) -> tuple[Tensor, Tensor]:
        return flash_forward_with_lse(q, k, v, slopes, causal, q_offset, scale, options=options,
                                      dropout=_dropout(dropout_p, seed))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save_for_backward(ctx, inputs[:9], output, inputs[9])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for lse's gradient, which is never used

    @staticmethod
    def backward(ctx, do: Tensor, _dlse: Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients have no gradient of their own
            raise RuntimeError("the Triton attention kernel has no double backward (create_graph=True); "
                               "use backend='sdpa' or 'reference' for higher-order gradients")
        q, k, v, o, lse, slopes, seed = ctx.saved_tensors
        need_dslopes = slopes is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dsl = flash_backward(do, q, k, v, o, lse, slopes, *ctx.args, need_dslopes, options=ctx.options,
                                         dropout=_dropout(ctx.dropout_p, seed))
        return dq, dk, dv, dsl, None, None, None, None, None, None


@torch.library.custom_op("alibi_lm::decode_attention", mutates_args=())
def _decode_op(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], causal: bool, q_offset: int,  # noqa: UP045
               scale: float) -> Tensor:
    """The split-K decoding kernel (triton_decode.py), forward only: the wrapper takes it only when no
    gradient is wanted. It has a fixed config and pointer loads, so no launch options."""
    q, k, v, slopes = _kernel_layout(q, k, v, slopes)
    return triton_decode(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, scale=scale)


@_decode_op.register_fake
def _decode_fake(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, causal: bool, q_offset: int,
                 scale: float) -> Tensor:
    return torch.empty_like(last_dim_contiguous(q))


def supports(q: Tensor) -> bool:
    """Whether the fused kernel handles q's device, dtype and head dim (the "auto" backend asks this)."""
    return (q.is_cuda or INTERPRET) and q.dtype in _DTYPES and q.shape[-1] in HEAD_DIMS


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
    if not (q.is_cuda or INTERPRET):
        raise ValueError(f"the triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None = None, causal: bool = True,
                     q_offset: int = 0, scale: float | None = None, dropout_p: float = 0.0,
                     options: KernelOptions | None = None) -> Tensor:
    """Fused attention with an in-kernel ALiBi bias; arguments and layout as `alibi_lm.attention`.

    Few queries over a cache (Lq <= DECODE_MAX_QUERIES) with no gradient wanted and no dropout take the
    split-K decoding kernel; everything else the flash kernel, differentiable in q, k, v and slopes. With
    dropout_p > 0 the flash kernels drop probabilities by an in-kernel Philox mask whose seed is drawn
    here from torch's generator of q's device (`triton_flash.draw_dropout`). options (None:
    `KernelOptions.from_env()`) say how the flash kernels are launched, forward and backward."""
    _validate(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0:
        return torch.empty_like(q)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    wants_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (slopes is not None and slopes.requires_grad))
    # Traced calls (torch.compile, export; fake tensors, which are a Tensor subclass) keep the custom
    # ops, whose fake implementations the tracers need; plain tensors take the leaner eager path.
    traced = torch.compiler.is_compiling() or type(q) is not Tensor
    if not wants_grad and q.shape[2] <= DECODE_MAX_QUERIES and dropout_p == 0:
        if traced:
            return _decode_op(q, k, v, slopes, causal, q_offset, scale)
        return triton_decode(q, k, v, slopes=slopes, causal=causal, q_offset=q_offset, scale=scale)
    options = KernelOptions.from_env() if options is None else options
    # the cast is differentiable: autograd brings dslopes back to the slopes' own dtype
    sl32 = None if slopes is None else slopes.to(torch.float32).contiguous()
    dropout = draw_dropout(dropout_p, q.device)
    p, seed = (0.0, None) if dropout is None else dropout
    if traced:
        return _flash_fwd_op(q, k, v, sl32, causal, q_offset, scale, p, seed, options.tma, options.autotune)[0]
    return _EagerFlashAttention.apply(q, k, v, sl32, causal, q_offset, scale, p, seed, options)[0]


def flash_forward(q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | None = None, causal: bool = True,
                  q_offset: int = 0, scale: float | None = None, options: KernelOptions | None = None) -> Tensor:
    """The flash forward kernel alone, whatever Lq (tests and benchmarks compare it with decoding);
    options as `triton_attention`'s."""
    _validate(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sl32 = None if slopes is None else slopes.detach().to(torch.float32).contiguous()
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    options = KernelOptions.from_env() if options is None else options
    return flash_forward_with_lse(q, k, v, sl32, causal, q_offset, scale, options=options)[0]

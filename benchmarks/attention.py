"""Benchmark of the fused ALiBi attention kernel against its peers (issue 5), on one CUDA GPU.

Training shapes: L = 1k..16k, D = 64 and 128, H = 2048 / D, B = 16k tokens / L, causal, bf16.
TFLOP/s counts causal forward FLOPs as 2*B*H*L^2*D and the backward as 2.5x the forward; peak memory
is the allocator's peak over one forward+backward, inputs excluded. Peers: SDPA without any bias
(the speed of light for an unbiased kernel), SDPA with a materialised ALiBi mask (built once, outside
the timed region), FlexAttention with an ALiBi score_mod (torch.compile'd, causal block mask), and
eager BLOOM-style attention (baddbmm with a bf16 bias, fp32 softmax).

Decoding: one new token (Lq = 1), H = 16, D = 128, over caches of 1k..32k for batch 1..32; microseconds
per call and K/V bytes read per second, eager and replayed from a CUDA graph; peers SDPA without bias,
SDPA with an ALiBi bias row and Flex.

Times are medians of triton.testing.do_bench on random inputs. Usage:
    python benchmarks/attention.py OUT_DIR [--part train|decode|all] [--quick]
writes OUT_DIR/attention-<part>.json and .md and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from alibi_lm.kernels.reference import materialized_bias
from alibi_lm.kernels.triton_attention import triton_attention
from alibi_lm.positions import alibi_slopes

DTYPE = torch.bfloat16
TOKENS = 16_384
HIDDEN = 2048


def _median_ms(fn: Callable[[], object], grad_to_none: list | None = None) -> float:
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------- peers


def _flex_alibi(slopes: torch.Tensor, q_offset: int = 0):
    from torch.nn.attention.flex_attention import flex_attention

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx + q_offset - kv_idx)

    compiled = torch.compile(flex_attention, dynamic=False)
    return compiled, alibi


def _bloom_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor,
                 causal_mask: torch.Tensor) -> torch.Tensor:
    # BLOOM's recipe: baddbmm(alibi, q, k^T) with the bias in the input dtype, masked, fp32 softmax
    B, H, L, D = q.shape
    scores = torch.baddbmm(alibi.expand(B, H, L, L).reshape(B * H, L, L), q.reshape(B * H, L, D),
                           k.reshape(B * H, L, D).transpose(1, 2), beta=1.0, alpha=D**-0.5)
    scores = scores.view(B, H, L, L).masked_fill(causal_mask, torch.finfo(q.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def _train_methods(q, k, v, slopes) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    """name -> factory of the timed callable; peers' L^2 buffers are built only when their turn comes."""
    L = q.shape[2]

    def sdpa_mask():
        mask = materialized_bias(slopes, L, L, causal=True, dtype=q.dtype, device=q.device)  # (H, L, L)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask

        fn, score_mod = _flex_alibi(slopes)
        block_mask = create_block_mask(lambda b, h, qi, kj: qi >= kj, None, None, L, L, device=q.device)
        return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask)

    def bloom():
        pos = torch.arange(L, device=q.device)
        # (H, L, L) in bf16, as BLOOM builds it: -slope * (i - j) below the diagonal
        alibi = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).clamp(min=0)[None]).to(q.dtype)
        causal_mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        return lambda: _bloom_eager(q, k, v, alibi, causal_mask)

    return {
        "ours": lambda: lambda: triton_attention(q, k, v, slopes=slopes, causal=True),
        # the same kernel without the bias: how much of the gap to SDPA is the bias, how much the kernel
        "ours_no_slopes": lambda: lambda: triton_attention(q, k, v, slopes=None, causal=True),
        "sdpa_no_bias": lambda: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_alibi_mask": sdpa_mask,
        "flex_alibi": flex,
        "bloom_eager": bloom,
    }


def bench_train(lengths: list[int], dims: list[int], save: Callable[[list[dict]], None]) -> list[dict]:
    rows = []
    for D in dims:
        for L in lengths:
            H, B = HIDDEN // D, max(1, TOKENS // L)
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            slopes = alibi_slopes(H).to("cuda", torch.float32)
            flops_fwd = 2 * B * H * L * L * D
            # sanity: our kernel with no slopes must equal SDPA's causal attention
            with torch.no_grad():
                diff = (triton_attention(q, k, v, slopes=None) - F.scaled_dot_product_attention(
                    q, k, v, is_causal=True)).abs().max().item()
            methods = _train_methods(q, k, v, slopes)
            for name, factory in methods.items():
                row = {"D": D, "L": L, "H": H, "B": B, "method": name}
                fn = None
                try:
                    fn = factory()
                    with torch.no_grad():
                        fwd = _median_ms(fn)

                    def step(fn=fn, do=do):
                        fn().backward(do)

                    step()  # compile / autotune the backward outside the timing
                    both = _median_ms(step, grad_to_none=[q, k, v])
                    peak = _peak_mib(step)
                    row.update(fwd_ms=fwd, fwdbwd_ms=both, fwd_tflops=flops_fwd / fwd / 1e9,
                               fwdbwd_tflops=3.5 * flops_fwd / both / 1e9, peak_mib=peak)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as exc:  # a peer that cannot run a shape is reported, not fatal
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                if name == "ours":
                    row["max_abs_diff_vs_sdpa_no_slopes"] = diff
                q.grad = k.grad = v.grad = None
                del fn
                torch.cuda.empty_cache()
                if name.startswith("ours"):
                    row["configs"] = _best_configs(D)
                rows.append(row)
                save(rows)
                print(json.dumps(row), flush=True)
            del methods
            torch.cuda.empty_cache()
    return rows


def _best_configs(head_dim: int) -> dict[str, str]:
    """The configs the autotuner settled on for the last shape (for the tuning notes)."""
    from alibi_lm.kernels.triton_flash import flash_kernels

    return {name: str(getattr(kernel.autotuner, "best_config", None))
            for name, kernel in zip(("_fwd", "_dkdv", "_dq"), flash_kernels(head_dim), strict=True)}


# ---------------------------------------------------------------------------------------------- decode


def _graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _decode_methods(q, k, v, slopes) -> dict[str, Callable[[], torch.Tensor]]:
    n = k.shape[2]
    bias_row = materialized_bias(slopes, 1, n, q_offset=n - 1, causal=True, dtype=q.dtype, device=q.device)
    flex, score_mod = _flex_alibi(slopes, q_offset=n - 1)
    return {
        "ours": lambda: triton_attention(q, k, v, slopes=slopes, q_offset=n - 1),
        "sdpa_no_bias": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa_alibi_row": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias_row),
        "flex_alibi": lambda: flex(q, k, v, score_mod=score_mod),
    }


def bench_decode(batches: list[int], caches: list[int], save: Callable[[list[dict]], None]) -> list[dict]:
    H, D = 16, 128
    slopes = alibi_slopes(H).to("cuda", torch.float32)
    rows = []
    for B in batches:
        for n in caches:
            torch.manual_seed(0)
            q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
            k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE) for _ in range(2))
            kv_bytes = 2 * B * H * n * D * q.element_size()
            methods = _decode_methods(q, k, v, slopes)
            ref = methods["sdpa_alibi_row"]()
            for name, fn in methods.items():
                row = {"batch": B, "cache": n, "method": name}
                try:
                    with torch.no_grad():
                        row["max_abs_diff_vs_sdpa_row"] = (fn() - ref).abs().max().item()
                        us = _median_ms(fn) * 1e3
                        row.update(us=us, tb_s=kv_bytes / us / 1e6, tokens_s=B / us * 1e6)
                        if name != "flex_alibi":
                            row["graph_us"] = _median_ms(_graphed(fn)) * 1e3
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                rows.append(row)
                save(rows)
                print(json.dumps(row), flush=True)
            del methods, ref
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report


def _fmt(row: dict | None, *keys: str, digits: int = 0) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "OOM" if "memory" in row["error"] else "error"
    return " / ".join(f"{row[k]:.{digits}f}" for k in keys)


def train_table(rows: list[dict]) -> str:
    names = ["ours", "ours_no_slopes", "sdpa_no_bias", "sdpa_alibi_mask", "flex_alibi", "bloom_eager"]
    out = ["TFLOP/s fwd / fwd+bwd (peak MiB of fwd+bwd); ratios are ours over the peer, fwd+bwd",
           "", "| D | L | " + " | ".join(names) + " | vs SDPA no bias | vs Flex |",
           "|---|---|" + "---|" * (len(names) + 2)]
    for D, L in sorted({(r["D"], r["L"]) for r in rows}):
        by = {r["method"]: r for r in rows if r["D"] == D and r["L"] == L}
        cells = [f"{_fmt(by.get(n), 'fwd_tflops', 'fwdbwd_tflops')} ({_fmt(by.get(n), 'peak_mib')})" for n in names]
        ratios = []
        for peer in ("sdpa_no_bias", "flex_alibi"):
            a, b = by.get("ours", {}), by.get(peer, {})
            ok = "fwdbwd_tflops" in a and "fwdbwd_tflops" in b
            ratios.append(f"{a['fwdbwd_tflops'] / b['fwdbwd_tflops']:.2f}x" if ok else "-")
        out.append(f"| {D} | {L} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(out)


def decode_table(rows: list[dict]) -> str:
    names = ["ours", "sdpa_no_bias", "sdpa_alibi_row", "flex_alibi"]
    out = ["Decoding one token, H=16, D=128: µs per call (in a CUDA graph), and K/V TB/s read",
           "", "| batch | cache | " + " | ".join(names) + " | ours vs SDPA+row |", "|---|---|" + "---|" * 5]
    for B, n in sorted({(r["batch"], r["cache"]) for r in rows}):
        by = {r["method"]: r for r in rows if r["batch"] == B and r["cache"] == n}
        cells = []
        for name in names:
            r = by.get(name)
            if r is None or "error" in r:
                cells.append(_fmt(r))
                continue
            graph = f" ({r['graph_us']:.1f})" if "graph_us" in r else ""
            cells.append(f"{r['us']:.1f}{graph}, {r['tb_s']:.2f} TB/s")
        a, b = by.get("ours", {}), by.get("sdpa_alibi_row", {})
        ratio = f"{b['us'] / a['us']:.2f}x" if "us" in a and "us" in b else "-"
        out.append(f"| {B} | {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the JSON and markdown results")
    parser.add_argument("--part", choices=["train", "decode", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="two training shapes and three decoding ones")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    torch._dynamo.config.cache_size_limit = 256  # one Flex compile per shape; never fall back to eager
    t0 = time.time()
    parts = ["train", "decode"] if args.part == "all" else [args.part]
    for part in parts:
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        tabulate = train_table if part == "train" else decode_table

        def save(rows: list[dict], part: str = part, tabulate=tabulate, header: str = header) -> None:
            # rewritten after every row, so a run cut short by a time limit still leaves its numbers
            (args.out / f"attention-{part}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (args.out / f"attention-{part}.md").write_text(f"{header}\n\n{tabulate(rows)}\n")

        if part == "train":
            lengths = [2048, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384]
            rows = bench_train(lengths, [64, 128], save)
        else:
            shapes = ([1, 8], [8192]) if args.quick else ([1, 8, 32], [1024, 8192, 32768])
            rows = bench_decode(*shapes, save)
        print(f"\n{header}\n\n{tabulate(rows)}\n", flush=True)
    print(f"benchmark took {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

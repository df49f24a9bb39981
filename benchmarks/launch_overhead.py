"""Host time per attention call (issues 5 and 6): where the Python/launch path of the fused kernel spends.

On the H100 (2026-11-25 evening) a forward with autograd cost 223 µs of host time per call and a
forward+backward 1322 µs, against 197 µs for SDPA's forward+backward: the backward's three launches
take ~1.1 ms, several times the forward's one. That host time is longer than the GPU work of a
D = 128, L = 1024 forward+backward, and it is why decoding a token outside a CUDA graph is slower
than SDPA at small caches. This times tiny shapes (B=1, H=2, L=128, D=64, so GPU work is a few
microseconds) from the host's side, layer by layer of the call path, each as the mean over many
calls with one synchronisation at the end:

  pieces             two allocations; four tensor descriptors; the autotuner's lookup + the JIT
                     launch; the JIT launch alone with the autotuner's chosen config
  launcher           kernels.triton_flash.flash_forward_with_lse (autotuner lookup + one Triton launch)
  launcher (tma)     the same with tensor descriptors (sm_90+; elsewhere it falls back to pointers)
  custom op          torch.ops.alibi_lm.flash_attention_fwd (dispatcher + the launcher)
  fwd (grad)         triton_attention with q.requires_grad: the autograd-registered op
  backward launcher  kernels.triton_flash.flash_backward (three Triton launches, the allocations)
  bwd custom op      torch.ops.alibi_lm.flash_attention_bwd (dispatcher + the backward launcher)
  fwd+bwd            forward and backward through autograd
  compiled           the same fwd+bwd inside torch.compile (what a compiled model does per layer)
  sdpa               SDPA fwd+bwd, the reference for a lean launch path
  decode             one token over a 1k cache (B=1, H=16, D=128) through triton_attention; SDPA without bias

Then Python's own profiler (cProfile) over the forward launcher, the backward launcher and the eager
forward+backward: the functions that take the host's time, by their own time per call, which names
the hot spot inside the launch path (Triton's autotuner, its argument binder, the launch itself, or
ours).

    PYTHONPATH=src python benchmarks/launch_overhead.py --out OUT
    PYTHONPATH=src python benchmarks/launch_overhead.py --out OUT --cpu-smoke   # interpreter, tiny; checks the script

With --cpu-smoke the kernels run in Triton's interpreter (so the times say nothing about a GPU) and
the compiled row is left out (a compile takes longer than the rest of the run). Every row autotunes as
the environment says (ALIBI_TRITON_AUTOTUNE); the launcher rows and the pieces use pointer loads but for
"launcher (tma)", the rows through the ops and `triton_attention` the environment's choice (ALIBI_TRITON_TMA).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
from collections.abc import Callable
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed row (default 300)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter")
    return parser.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import triton_attention as ta  # noqa: E402
from alibi_lm.kernels import triton_flash as tf  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import host_us  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def python_profile(fn: Callable[[], object], calls: int, top: int = 15) -> tuple[list[dict], str]:
    """The functions with the most own time over `calls` calls of fn, per call, and pstats' table."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    sync()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]  # by own time
    table = [{"function": f"{Path(file).name}:{line}({name})", "calls_per_call": round(n_calls / calls, 2),
              "own_us_per_call": round(own / calls * 1e6, 1), "cumulative_us_per_call": round(cum / calls * 1e6, 1)}
             for (file, line, name), (_, n_calls, own, cum, _) in rows]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return table, text.getvalue()


def main() -> None:
    ARGS.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    B, H, L, D = (1, 2, 32, 16) if ARGS.cpu_smoke else (1, 2, 128, 64)
    warmup = 1 if ARGS.cpu_smoke else 5
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    sl = alibi_slopes(H).to(DEV)
    scale = D**-0.5
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd(attn):
        def step():
            attn(qg, kg, vg).backward(do)
        return step

    ours = lambda a, b, c: ta.triton_attention(a, b, c, slopes=sl)  # noqa: E731
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    # the pieces of one launcher call, to see which one to cut: the allocations, the descriptors, the
    # autotuner's lookup around the JIT launch, and the JIT launch alone with the chosen config
    env = ta.KernelOptions.from_env()
    pointer, descriptor = (ta.KernelOptions(tma=tma, autotune=env.autotune) for tma in (False, True))
    o, lse = tf.flash_forward_with_lse(q, k, v, sl, True, 0, scale, options=pointer)
    kernel, grid, _, launch_args, flags = tf.forward_launch(q, k, v, o, lse, sl, True, 0, scale, tma=False)
    best = kernel.autotuner.best_config
    fixed = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    forward_launcher = lambda: tf.flash_forward_with_lse(q, k, v, sl, True, 0, scale, options=pointer)  # noqa: E731
    backward_launcher = lambda: tf.flash_backward(do, q, k, v, o, lse, sl, True, 0, scale, False,  # noqa: E731
                                                  options=pointer)
    # one new token over a 1k cache (H = 16, D = 128): a few microseconds of GPU work, so host time
    Hd, Dd, cache = (2, 16, 40) if ARGS.cpu_smoke else (16, 128, 1024)
    qd = torch.randn(1, Hd, 1, Dd, device=DEV, dtype=torch.bfloat16)
    kd, vd = (torch.randn(1, Hd, cache, Dd, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    sld = alibi_slopes(Hd).to(DEV)
    rows: dict[str, Callable[[], object]] = {
        "two allocations": lambda: (torch.empty_like(q), torch.empty((B, H, L), device=DEV)),
        "four descriptors": lambda: [tf.tensor_descriptor(t) for t in (q, k, v, o)],
        "autotuner + launch": lambda: kernel.autotuner[grid](*launch_args, **flags),
        "JIT launch, config fixed": lambda: kernel.autotuner.fn[grid](*launch_args, **flags, **fixed),
        "launcher": forward_launcher,
        "launcher (tma)": lambda: tf.flash_forward_with_lse(q, k, v, sl, True, 0, scale, options=descriptor),
        "custom op": lambda: torch.ops.alibi_lm.flash_attention_fwd(q, k, v, sl, True, 0, scale, 0.0, None, env.tma,
                                                                    env.autotune),
        "fwd (grad)": lambda: ours(qg, kg, vg),
        "backward launcher": backward_launcher,
        "bwd custom op": lambda: torch.ops.alibi_lm.flash_attention_bwd(do, q, k, v, o, lse, sl, True, 0, scale, 0.0,
                                                                        None, False, env.autotune),
        "fwd+bwd": fwd_bwd(ours),
        "sdpa fwd+bwd": fwd_bwd(sdpa),
        "decode, 1 token over 1k": lambda: ta.triton_attention(qd, kd, vd, slopes=sld, q_offset=cache - 1),
        "sdpa decode, no bias": lambda: F.scaled_dot_product_attention(qd, kd, vd),
    }
    if not ARGS.cpu_smoke:
        rows["compiled fwd+bwd"] = fwd_bwd(torch.compile(lambda a, b, c: ours(a, b, c) * 1.0))
    result = {"shape": dict(B=B, H=H, L=L, D=D), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "us_per_call": {}, "python_profile": {}}
    for name, fn in rows.items():
        try:
            result["us_per_call"][name] = round(host_us(fn, ARGS.calls, warmup), 1)
        except Exception as exc:  # noqa: BLE001 - one failing layer must not hide the others
            result["us_per_call"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"{name:>24}: {result['us_per_call'][name]} us per call", flush=True)
    texts = []
    for name in ("launcher", "backward launcher", "fwd+bwd"):
        table, text = python_profile(rows[name], ARGS.calls)
        result["python_profile"][name] = table
        texts.append(f"==== {name}: {ARGS.calls} calls\n{text}")
        print(f"\n{name}, own time per call (cProfile):")
        for row in table[:8]:
            print(f"  {row['own_us_per_call']:8.1f} us  x{row['calls_per_call']:<5} {row['function']}")
    (ARGS.out / "launch_overhead.json").write_text(json.dumps(result, indent=1))
    (ARGS.out / "launch_overhead_python_profile.txt").write_text("\n".join(texts))
    if not ARGS.cpu_smoke:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                rows["compiled fwd+bwd"]()
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
        print(table)
        (ARGS.out / "launch_overhead_profile.txt").write_text(table)


if __name__ == "__main__":
    main()

"""Host time per attention call (issue 6): where the Python/launch path of the fused kernel spends.

A training step of GPT-2 small with ALiBi kept the H100 busy only ~41% of its wall time (profile of
benchmarks/train.py, 2026-11-25), while `none` kept it 94% busy: the step waits on the host. This
times tiny shapes (B=1, H=2, L=128, D=64, so GPU work is a few microseconds) from the host's side,
layer by layer of the call path, each as the mean over many calls with one synchronisation at the end:

  pieces          two allocations; four tensor descriptors; the autotuner's lookup + the JIT launch;
                  the JIT launch alone with the autotuner's chosen config
  launcher        kernels.triton_attention._forward (autotuner lookup + one Triton launch)
  launcher (tma)  the same with tensor descriptors (sm_90+; elsewhere it falls back to pointers)
  custom op       torch.ops.alibi_lm.flash_attention_fwd (dispatcher + the launcher)
  fwd (grad)      triton_attention with q.requires_grad: the autograd-registered op
  fwd+bwd         forward and backward through autograd
  compiled        the same fwd+bwd inside torch.compile (what a compiled model does per layer)
  sdpa            SDPA fwd+bwd, the reference for a lean launch path

    PYTHONPATH=src python benchmarks/launch_overhead.py --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from alibi_lm.kernels import triton_attention as ta
from alibi_lm.positions import alibi_slopes


def host_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    B, H, L, D = 1, 2, 128, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sl = alibi_slopes(H).cuda()
    scale = D**-0.5
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd(attn):
        def step():
            attn(qg, kg, vg).backward(do)
        return step

    ours = lambda a, b, c: ta.triton_attention(a, b, c, slopes=sl)  # noqa: E731
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    compiled = torch.compile(lambda a, b, c: ours(a, b, c) * 1.0)
    # the pieces of one launcher call, to see which one to cut: the allocations, the descriptors, the
    # autotuner's lookup around the JIT launch, and the JIT launch alone with the chosen config
    o, lse = ta._forward(q, k, v, sl, True, 0, scale, tma=False)
    grid = (triton.cdiv(L, 16), B * H)  # any grid covers the timing of the host path
    launch_args = (q, k, v, q, k, v, o, sl, o, lse, *ta._strides(q), *ta._strides(k), *ta._strides(v), *ta._strides(o),
                   H, 1, L, L, 0, scale * ta._LOG2E, D, ta._bucket(L), ta._bucket(L))
    flags = dict(CAUSAL=True, HAS_SLOPES=True, USE_TMA=False, BLOCK_D=ta._block_d(D))
    best = ta._fwd.best_config
    fixed = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    rows = {
        "two allocations": lambda: (torch.empty_like(q), torch.empty((B, H, L), device="cuda")),
        "four descriptors": lambda: [ta._descriptor(t) for t in (q, k, v, o)],
        "autotuner + launch": lambda: ta._fwd[grid](*launch_args, **flags),
        "JIT launch, config fixed": lambda: ta._fwd.fn[grid](*launch_args, **flags, **fixed),
        "launcher": lambda: ta._forward(q, k, v, sl, True, 0, scale, tma=False),
        "launcher (tma)": lambda: ta._forward(q, k, v, sl, True, 0, scale, tma=True),
        "custom op": lambda: torch.ops.alibi_lm.flash_attention_fwd(q, k, v, sl, True, 0, scale),
        "fwd (grad)": lambda: ours(qg, kg, vg),
        "fwd+bwd": fwd_bwd(ours),
        "compiled fwd+bwd": fwd_bwd(compiled),
        "sdpa fwd+bwd": fwd_bwd(sdpa),
    }
    result = {"shape": dict(B=B, H=H, L=L, D=D), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "us_per_call": {}}
    for name, fn in rows.items():
        try:
            result["us_per_call"][name] = round(host_us(fn, args.calls), 1)
        except Exception as exc:  # noqa: BLE001 - one failing layer must not hide the others
            result["us_per_call"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"{name:>18}: {result['us_per_call'][name]} us per call", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            rows["compiled fwd+bwd"]()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    (args.out / "launch_overhead.json").write_text(json.dumps(result, indent=1))
    (args.out / "launch_overhead_profile.txt").write_text(table)


if __name__ == "__main__":
    main()

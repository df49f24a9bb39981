"""Where the time of a repeated GPU workload goes: torch.profiler's kernel times, per call, grouped.

Shared by benchmarks/train.py (--profile), benchmarks/attention_quick.py (--profile) and
benchmarks/backward_study.py, with `median_ms`, the timer of the kernel scripts, and `host_us`, the
host-time loop of the launch and decoding scripts. The groups
answer the questions the throughput targets raise: how much of a training step is attention (ours or
SDPA's), matmuls, fused elementwise kernels, the optimizer; and how much of the wall time the GPU
sits idle (launch-bound work shows as a low busy fraction). On a machine without CUDA the CPU self
times of the aten / custom ops are used instead, so the code path can be tried anywhere.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# Ours are the Triton kernels of alibi_lm.kernels, matched by their whole names (PyTorch's own flash
# kernels contain "_fwd_kernel" and "_dq_kernel" too), and on the CPU our custom ops.
OURS = re.compile(r"_(fwd|dkdv|dq|delta|split|merge)_kernel|alibi_lm::\w+")
# Lower-case name fragments for everything else, first match wins. SDPA's flash / cuDNN / efficient
# kernels carry "flash", "fmha" or "attention" in their names.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("attention (other)", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::matmul", "aten::linear")),
    ("loss (log-softmax, NLL)", ("log_softmax", "logsoftmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused (inductor)", ("triton_",)),
    ("copies", ("memcpy", "memset", "copy_", "aten::to", "aten::_to_copy")),
]


def host_us(fn: Callable[[], object], calls: int, warmup: int) -> float:
    """Mean wall microseconds per call of fn over `calls` calls, after `warmup` untimed ones, the device
    synchronised before and after: the host path of a call (launches, Python, the dispatcher), which
    device-event timers do not see. The timer of launch_overhead, autograd_overhead and decode_split."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def median_ms(fn: Callable[[], object], *, smoke: bool, grad_to_none: list | None = None) -> float:
    """Median milliseconds per call from triton.testing.do_bench (device events); in a script's CPU smoke
    mode (the Triton interpreter) one call's wall time, which only shows that the path runs."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def group_of(name: str) -> str:
    if OURS.fullmatch(name):
        return "attention (ours)"
    low = name.lower()
    for group, fragments in GROUPS:
        if any(f in low for f in fragments):
            return group
    return "other"


def breakdown(fn: Callable[[], object], calls: int, *, top: int = 12) -> dict:
    """Run `fn` `calls` times under the profiler (after one unprofiled call) and return milliseconds per
    call by group, the busiest kernels, the wall time per call and the GPU's busy fraction."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = prof.key_averages()  # aggregated once: it walks every recorded event
    rows = []
    for event in events:
        if cuda:
            us = event.self_device_time_total if event.device_type != torch.autograd.DeviceType.CPU else 0
        else:
            us = event.self_cpu_time_total if event.key.startswith(("aten::", "alibi_lm::")) else 0
        if us > 0:
            rows.append((event.key, us / 1e3 / calls, event.count / calls))
    rows.sort(key=lambda r: -r[1])
    # the host side: where the CPU spends a call (a low busy fraction is explained here)
    host = sorted(((e.key, e.self_cpu_time_total / 1e3 / calls, e.count / calls) for e in events
                   if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0),
                  key=lambda r: -r[1])
    groups: dict[str, float] = {}
    for name, ms, _ in rows:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    busy_ms = sum(groups.values())
    return {
        "calls": calls,
        "timer": "gpu kernels" if cuda else "cpu self time of aten ops",
        "wall_ms_per_call": wall_ms,
        "busy_ms_per_call": busy_ms,
        "busy_fraction": busy_ms / wall_ms if wall_ms > 0 else None,
        "groups_ms_per_call": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": name[:120], "ms_per_call": ms, "launches_per_call": n} for name, ms, n in rows[:top]],
        "top_host_ops": [{"name": name[:120], "ms_per_call": ms, "calls_per_call": n} for name, ms, n in host[:8]],
    }


def markdown(title: str, result: dict) -> str:
    """A short section: the groups with their share of the busy time, then the busiest kernels."""
    busy = result["busy_ms_per_call"] or 1e-12
    lines = [f"#### {title}", "",
             f"wall {result['wall_ms_per_call']:.2f} ms per call, {result['timer']} "
             f"{result['busy_ms_per_call']:.2f} ms (busy {result['busy_fraction']:.0%}), "
             f"{result['calls']} calls profiled", "",
             "| group | ms per call | share |", "|---|---:|---:|"]
    lines += [f"| {g} | {ms:.3f} | {ms / busy:.0%} |" for g, ms in result["groups_ms_per_call"].items()]
    lines += ["", "| kernel | ms per call | launches per call |", "|---|---:|---:|"]
    lines += [f"| `{k['name']}` | {k['ms_per_call']:.3f} | {k['launches_per_call']:g} |" for k in result["top_kernels"]]
    if result.get("top_host_ops"):
        lines += ["", "| host op (self CPU time) | ms per call | calls per call |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['ms_per_call']:.3f} | {k['calls_per_call']:g} |"
                  for k in result["top_host_ops"]]
    return "\n".join(lines) + "\n"

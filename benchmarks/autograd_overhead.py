"""Host time of an eager forward+backward, taken apart (issue 5): the autograd engine's round trip.

On the H200 host (2026-11-26) our eager forward with autograd cost ~122 µs and the backward launcher
~116 µs, yet a forward+backward through autograd took ~1 ms. This times, from the host's side, the
pieces between those numbers on a shape whose GPU work is negligible (B=1, H=2, L=128, D=64, bf16),
each as the mean over many calls with one synchronisation at the end:

  trivial Function fwd+bwd            a torch.autograd.Function whose forward and backward only allocate
  Function, bwd = delta launch        the same, its backward launching our delta kernel
  Function, bwd = _backward           the same, its backward our backward launcher (three kernels + delta)
  FullTimed fwd+bwd                   the same, timing the launcher inside the backward ...
    inside its backward               ... which is this row
  _backward on main thread            the backward launcher called directly
  _backward on another Python thread  the same from a second thread (autograd runs a CUDA backward there)
  ours fwd+bwd                        triton_attention(...).backward(do), as a model does it
  ours fwd+bwd, autograd.grad         the same through torch.autograd.grad
  ours fwd+bwd, switchinterval 10us   the same with sys.setswitchinterval(1e-5)

Its first run (then a probe kept beside the results) is in
results/bench/2026-11-26-early/host-h200/bwd_probe.json, and BENCHMARKS.md ("Host path of an eager
call") reads it: the trivial Function alone costs 146 µs with CUDA tensors (27 µs on a CPU build).

    PYTHONPATH=src python benchmarks/autograd_overhead.py --out OUT
    PYTHONPATH=src python benchmarks/autograd_overhead.py --out OUT --cpu-smoke   # interpreter, tiny; checks the script

With --cpu-smoke the kernels run in Triton's interpreter, so the times say nothing about a GPU.
Writes OUT/autograd-overhead.json and prints the rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON result")
    p.add_argument("--calls", type=int, default=300, help="calls per timed row (default 300)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    return p.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import triton_attention as ta  # noqa: E402
from alibi_lm.kernels import triton_flash as tf  # noqa: E402
from alibi_lm.kernels.triton_common import KernelOptions  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import host_us  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    B, H, L, D = (1, 2, 32, 16) if ARGS.cpu_smoke else (1, 2, 128, 64)
    calls, warmup = ARGS.calls, (1 if ARGS.cpu_smoke else 10)
    q, k, v, do = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    sl = alibi_slopes(H).to(DEV)
    scale = D**-0.5
    options = KernelOptions()
    o, lse = tf.flash_forward_with_lse(q, k, v, sl, True, 0, scale, options=options)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def backward_launcher() -> tuple[torch.Tensor, ...]:
        return tf.flash_backward(do, q, k, v, o, lse, sl, True, 0, scale, False, options=options)[:3]

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            return torch.empty_like(a)

        @staticmethod
        def backward(ctx, g):
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    class DeltaOnly(Trivial):
        @staticmethod
        def backward(ctx, g):
            tf.backward_delta(o, g)
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    class Full(Trivial):
        @staticmethod
        def backward(ctx, g):
            return backward_launcher()

    inner: list[float] = []

    class FullTimed(Trivial):
        @staticmethod
        def backward(ctx, g):
            start = time.perf_counter()
            grads = backward_launcher()
            inner.append(time.perf_counter() - start)
            return grads

    def ours():
        return ta.triton_attention(qg, kg, vg, slopes=sl)

    rows: dict[str, float] = {}
    rows["trivial Function fwd+bwd"] = host_us(lambda: Trivial.apply(qg, kg, vg).backward(do), calls, warmup)
    rows["Function, bwd = delta launch"] = host_us(lambda: DeltaOnly.apply(qg, kg, vg).backward(do), calls, warmup)
    rows["Function, bwd = _backward"] = host_us(lambda: Full.apply(qg, kg, vg).backward(do), calls, warmup)
    rows["FullTimed fwd+bwd"] = host_us(lambda: FullTimed.apply(qg, kg, vg).backward(do), calls, warmup)
    rows["  inside its backward"] = round(sum(inner[-calls:]) / calls * 1e6, 1)
    rows["_backward on main thread"] = host_us(backward_launcher, calls, warmup)
    other: dict[str, float] = {}
    worker = threading.Thread(target=lambda: other.setdefault("us", host_us(backward_launcher, calls, warmup)))
    worker.start()
    worker.join()
    rows["_backward on another Python thread"] = other["us"]
    rows["ours fwd+bwd"] = host_us(lambda: ours().backward(do), calls, warmup)
    rows["ours fwd+bwd, autograd.grad"] = host_us(lambda: torch.autograd.grad(ours(), (qg, kg, vg), do), calls, warmup)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        rows["ours fwd+bwd, switchinterval 10us"] = host_us(lambda: ours().backward(do), calls, warmup)
    finally:
        sys.setswitchinterval(interval)

    rows = {name: round(us, 1) for name, us in rows.items()}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    result = {"meta": meta, "shape": dict(B=B, H=H, L=L, D=D), "calls": calls, "us_per_call": rows}
    (ARGS.out / "autograd-overhead.json").write_text(json.dumps(result, indent=1))
    for name, us in rows.items():
        print(f"{name:>40}: {us} us")


if __name__ == "__main__":
    main()

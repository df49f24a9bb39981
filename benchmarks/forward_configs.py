"""Forward kernel one pinned config at a time (issue 5), optionally with an experiment's on/off flag.

The autotuner reports only the config it chose; this times every (BLOCK_M, BLOCK_N, warps, stages)
of a list on its own, so a kernel change can be judged per config and a config that no longer
compiles (out of shared memory, a compiler pass failing) shows up as an error instead of being
skipped. Causal bf16 with the paper's slopes, H = 2048/D, B = 16384/L, the library's default loads
(tensor descriptors on sm_90+); per shape and config: do_bench's mean milliseconds, TFLOP/s
(2 B H L^2 D causal FLOPs) and the largest difference from the first config's output.

With --flag NAME each config also runs with NAME=True: NAME is a boolean `tl.constexpr` that an
experimental patch of `_fwd_kernel` adds (with a default of False), which the script passes through
the config. The two experiments of 2026-11-26 were run this way (then as a probe), each with its
patch applied; neither patch was kept, benchmarks/NOTES-kernel.md describes both:

  WS     the unmasked key loop as `tl.range(..., warp_specialize=WS)`:
         results/bench/2026-11-26-early/probes/warp_specialize-h200.json (H200)
  AHEAD  the next key tile's QK^T issued before the current tile's softmax:
         results/bench/2026-11-26-early/probes/lookahead-h100.json (H100)

    PYTHONPATH=src python benchmarks/forward_configs.py --out OUT
    PYTHONPATH=src python benchmarks/forward_configs.py --out OUT --configs 128x64w4s3,128x128w8s3 --flag WS
    PYTHONPATH=src python benchmarks/forward_configs.py --out OUT --cpu-smoke   # interpreter; checks the script

Configs are written MxNwWsS (BLOCK_M x BLOCK_N, warps, stages); the default is the forward's own
autotune list. With --cpu-smoke the kernels run in Triton's interpreter on one tiny shape with two
small configs, timed by one call's wall time. Writes OUT/forward-configs.json (keyed as the first
runs were, "D128 L8192 128x64 w4 s3" plus " ws=True" with --flag WS) and prints one line per run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import re
import shlex
import sys
from pathlib import Path

TOKENS = 16_384


def _pairs(text: str) -> list[tuple[int, int]]:
    return [(int(d), int(n)) for d, n in (item.split("x") for item in text.split(","))]


def _configs(text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", item.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"config {item!r} is not MxNwWsS, e.g. 128x64w4s3")
        out.append(tuple(int(g) for g in match.groups()))
    return out


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON result")
    p.add_argument("--shapes", type=_pairs, default=[(128, 2048), (128, 8192), (64, 8192)],
                   help="head dim x length pairs (default 128x2048,128x8192,64x8192)")
    p.add_argument("--configs", type=_configs, default=None,
                   help="MxNwWsS configs, comma-separated (default: the forward kernel's autotune list)")
    p.add_argument("--flag", default=None,
                   help="a boolean constexpr of a patched _fwd_kernel: each config runs with it False and True")
    p.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on the CPU through the Triton interpreter")
    return p.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import triton_flash as tf  # noqa: E402
from alibi_lm.kernels.triton_common import KernelOptions  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import median_ms  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"


def _ms(fn) -> float:
    return median_ms(fn, smoke=True) if ARGS.cpu_smoke else triton.testing.do_bench(fn)  # the first runs' timer


def _check_flag(flag: str) -> None:
    # the kernel's Python function, JIT or interpreted
    params = inspect.signature(tf.flash_kernels(64).forward.autotuner.fn.fn).parameters
    if flag not in params or "constexpr" not in str(params[flag].annotation):
        sys.exit(f"_fwd_kernel has no constexpr {flag!r}: apply the experiment's patch first "
                 "(benchmarks/NOTES-kernel.md describes them)")


def measure(D: int, L: int, configs: list[tuple[int, int, int, int]], flag: str | None) -> dict:
    B, H = (1, 2) if ARGS.cpu_smoke else (max(1, TOKENS // L), 2048 // D)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    sl = alibi_slopes(H).to(DEV)
    flops = 2 * B * H * L * L * D
    forward = functools.partial(tf.flash_forward_with_lse, q, k, v, sl, True, 0, D**-0.5, options=KernelOptions())
    kernel = tf.flash_kernels(D).forward
    out: dict = {}
    ref = None
    for m, n, w, s in configs:
        for value in (False, True) if flag else (None,):
            name = f"D{D} L{L} {m}x{n} w{w} s{s}" + (f" {flag.lower()}={value}" if flag else "")
            config = tf.forward_config(m, n, w, s, **({flag: value} if flag else {}))
            try:
                with kernel.pinned(config):  # this config alone, whatever the autotuner chose before
                    o = forward()[0]
                    ref = o if ref is None else ref
                    ms = _ms(forward)
                out[name] = dict(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                                 diff=(o.float() - ref.float()).abs().max().item())
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a result
                out[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            print(name, out[name], flush=True)
    return out


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    if ARGS.flag:
        _check_flag(ARGS.flag)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    shapes = [(16, 64)] if ARGS.cpu_smoke else ARGS.shapes
    if ARGS.configs:
        configs = ARGS.configs
    elif ARGS.cpu_smoke:
        configs = [(32, 16, 4, 1), (16, 16, 4, 1)]
    else:
        configs = tf.forward_configs(64)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    result: dict = {"meta": meta, "runs": {}}
    for D, L in shapes:
        result["runs"].update(measure(D, L, configs, ARGS.flag))
        (ARGS.out / "forward-configs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

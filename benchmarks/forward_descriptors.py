"""Forward kernel, tensor descriptors against pointer loads (issue 5), each through its own autotuning.

On sm_90+ the forward kernel loads its Q/K/V tiles through host tensor descriptors (the tensor memory
accelerator); `ALIBI_TRITON_TMA=0` keeps pointer loads. Once the head dim became a compile-time
constant, the pointer forward's main loop was software-pipelined too and most of the descriptors'
earlier +34-48% went (benchmarks/NOTES-kernel.md), so this times the forward launcher alone, both
ways, causal bf16 with the paper's slopes, H = 2048/D and B = 16384/L: D = 64 and 128 at
L = 1024, 2048, 4096 and 8192. Per shape and way: do_bench's mean milliseconds (rep 200), TFLOP/s
(2 B H L^2 D causal FLOPs, as benchmarks/attention.py counts them), the config the autotuner chose,
and the largest difference between the two outputs.

Its first run (then a probe kept beside the results) is
results/bench/2026-11-26-early/probes/descriptors_vs_pointers-h100.json; BENCHMARKS.md ("Tensor
descriptors against pointer loads") reads it: descriptors 0-21% faster at every shape on the H100.

    PYTHONPATH=src python benchmarks/forward_descriptors.py --out OUT
    PYTHONPATH=src python benchmarks/forward_descriptors.py --out OUT --cpu-smoke   # interpreter; checks the script

With --cpu-smoke the kernels run in Triton's interpreter on one tiny shape, timed by one call's wall
time (the numbers say nothing about a GPU). Writes OUT/forward-descriptors.json and prints one line
per shape.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
from pathlib import Path

TOKENS = 16_384


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON result")
    p.add_argument("--dims", type=_ints, default=[64, 128], help="head dims (default 64,128)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192],
                   help="sequence lengths (default 1024,2048,4096,8192)")
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
    if ARGS.cpu_smoke:
        return median_ms(fn, smoke=True)
    return triton.testing.do_bench(fn, rep=200)  # the first run's timer: the mean over ~200 ms


def measure(D: int, L: int) -> dict:
    B, H = (1, 2) if ARGS.cpu_smoke else (max(1, TOKENS // L), 2048 // D)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    sl = alibi_slopes(H).to(DEV)
    flops = 2 * B * H * L * L * D
    row: dict = {"D": D, "L": L, "B": B, "H": H}
    outs = {}
    for tma in (True, False):
        fn = functools.partial(tf.flash_forward_with_lse, q, k, v, sl, True, 0, D**-0.5,
                               options=KernelOptions(tma=tma))
        outs[tma] = fn()[0]
        ms = _ms(fn)
        # the autotuner's choice for this way (its key includes USE_TMA)
        config = str(tf.flash_kernels(D).forward.autotuner.best_config)
        row[f"tma={tma}"] = dict(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), config=config)
    row["diff"] = (outs[True].float() - outs[False].float()).abs().max().item()
    return row


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    shapes = [(16, 64)] if ARGS.cpu_smoke else [(D, L) for D in ARGS.dims for L in ARGS.lengths]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    result: dict = {"meta": meta, "rows": []}
    for D, L in shapes:
        result["rows"].append(measure(D, L))
        print(json.dumps(result["rows"][-1]), flush=True)
        (ARGS.out / "forward-descriptors.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

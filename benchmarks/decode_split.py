"""Decoding one token over a cache (issue 5): the split-K plan against one pass, per shape.

`kernels.triton_decode` either splits the keys over enough programs to fill the GPU and merges the
parts (a second launch), or reads the whole cache in one program per (batch, kv head) without the
merge. One pass saves a launch of host time and loses parallelism, so which is faster depends on the
shape and on whether the host or the GPU is the limit. For H=16, D=128 (bf16, the paper's slopes)
and each batch x cache length, this times both ways and SDPA without a bias, three ways each:

  host_loop_us  mean over a loop of calls, host-timed with one synchronisation (an eager decoding loop)
  do_bench_us   triton.testing.do_bench (mean; the GPU's time of a call with launches overlapped)
  graph_us      do_bench over the call replayed in a CUDA graph (no host time at all)

and the largest difference of each way's output from the library's own choice (`err`). "split" is
what `_split_plan` gives without its one-pass shortcut for host-bound calls (the plan a CUDA graph
capture gets; the first run called it "plan"), "one" a single pass over every key.

Its first run (then a probe kept beside the results) is
results/bench/2026-11-26-early/host-h200/decode_probe.json, from which `_ONE_PASS_MAX_KEYS` in
src/alibi_lm/kernels/triton_decode.py and BENCHMARKS.md ("The decoding split") were set.

    PYTHONPATH=src python benchmarks/decode_split.py --out OUT
    PYTHONPATH=src python benchmarks/decode_split.py --out OUT --cpu-smoke   # interpreter, tiny; checks the script

With --cpu-smoke the kernels run in Triton's interpreter on tiny shapes and only the host loop is
timed (do_bench and CUDA graphs need a GPU). Writes OUT/decode-split.json and prints one line per row.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON result")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    p.add_argument("--caches", type=_ints, default=[1024, 2048, 4096, 8192],
                   help="cache lengths in keys (default 1024,2048,4096,8192)")
    p.add_argument("--calls", type=int, default=300, help="calls per host-timed loop (default 300)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    return p.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels.triton_decode import triton_decode  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import host_us  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"
#: the two ways triton_decode can cut the keys, forced (its "auto" chooses between them by host cost)
PLANS = ("split", "one")


def graph_us(fn: Callable[[], object]) -> float:
    """do_bench over fn replayed in a CUDA graph, captured after a few calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay) * 1e3


def timings(fn: Callable[[], object], graph: bool = True) -> dict:
    calls, warmup = (2, 1) if ARGS.cpu_smoke else (ARGS.calls, 20)
    row = {"host_loop_us": host_us(fn, calls, warmup)}
    if not ARGS.cpu_smoke:
        row["do_bench_us"] = triton.testing.do_bench(fn) * 1e3
        if graph:
            row["graph_us"] = graph_us(fn)
    return row


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    H, D = (2, 16) if ARGS.cpu_smoke else (16, 128)
    batches, caches = ([1, 2], [40, 130]) if ARGS.cpu_smoke else (ARGS.batches, ARGS.caches)
    slopes = alibi_slopes(H).to(DEV)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "H": H, "D": D}
    result: dict = {"meta": meta, "rows": []}
    torch.manual_seed(0)
    for B in batches:
        for n in caches:
            q = torch.randn(B, H, 1, D, device=DEV, dtype=torch.bfloat16)
            k, v = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))

            def ours(q=q, k=k, v=v, n=n, plan="auto"):
                return triton_decode(q, k, v, slopes=slopes, q_offset=n - 1, plan=plan)

            ref = ours().float()
            for mode in PLANS:
                run = functools.partial(ours, plan=mode)
                row = {"B": B, "cache": n, "mode": mode, "err": (run().float() - ref).abs().max().item()}
                row.update(timings(run))
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            row = {"B": B, "cache": n, "mode": "sdpa_no_bias"}
            row.update(timings(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), graph=False))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            (ARGS.out / "decode-split.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

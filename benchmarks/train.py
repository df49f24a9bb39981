"""Training throughput: tokens/s, MFU (attention FLOPs counted) and peak memory per configuration.

Runs the real training step of alibi_lm.train (bf16 autocast, fused AdamW, clipping, the memmap-style
batch gather with pinned copies, optional torch.compile) on random tokens, so the numbers are the
ones `alibi-lm train` gets, minus validation and checkpoints. Cases (duplicates are run once):

  gpt2   small.toml-shaped GPT-2-small (12 x 768, 12 heads, vocab 50304), L = 1024, batch 16,
         compiled, for each of --positions (default alibi, none, sinusoidal, rotary)
  short  the paper's claim at 16,384 tokens per step: alibi at L = 512 (batch 32) vs sinusoidal at
         L = 1024 (batch 16)
  1.3b   cc100-1.3b.toml (24 x 2048, 16 heads, vocab 50304), eager: alibi at L = 1024 (batch 16) vs
         sinusoidal at L = 2048 (batch 8)
  smoke  the `tiny` preset at L = 64 for each of --positions: a check of the script itself that runs on
         a CPU in seconds (not a measurement)

Writes <out>/train_bench.json and <out>/train_bench.md. Example (one H100, about 6 minutes):
  python benchmarks/train.py --out bench/ --suite gpt2,short,1.3b
With --profile N, N more steps of each case run under torch.profiler, and the markdown gains where
the step's GPU time goes (attention, matmuls, fused kernels, optimizer) and how busy the GPU is.
MFU = tokens/s x (6N + 12 x layers x L x d) / (989e12 x GPUs); N counts the output layer.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from alibi_lm.config import load_config
from alibi_lm.distributed import DistInfo
from alibi_lm.model import TransformerLM
from alibi_lm.train import (
    autocast_context,
    build_optimizer,
    captures_cuda_graphs,
    compile_for_training,
    flops_per_token,
    lr_at,
    peak_flops,
    step_batches,
    train_step,
)
from kernel_profile import breakdown
from kernel_profile import markdown as profile_markdown

SUITES = ("gpt2", "short", "1.3b", "smoke")
GPT2 = ["model.vocab_size=50304", "model.dropout=0.0", "data.train_len=1024", "data.batch_size=16",
        "data.grad_accum=1"]


def cases(suites: list[str], positions: list[str], compile_gpt2: bool, compile_big: bool) -> list[dict]:
    out = []
    if "gpt2" in suites:
        for position in positions:
            out.append(dict(suite="gpt2", preset="small", position=position, length=1024, batch=16,
                            compile=compile_gpt2, sets=GPT2))
    if "short" in suites:
        out.append(dict(suite="short", preset="small", position="alibi", length=512, batch=32, compile=compile_gpt2,
                        sets=GPT2))
        out.append(dict(suite="short", preset="small", position="sinusoidal", length=1024, batch=16,
                        compile=compile_gpt2, sets=GPT2))
    if "1.3b" in suites:
        big = ["model.dropout=0.0", "data.grad_accum=1"]
        out.append(dict(suite="1.3b", preset="cc100-1.3b", position="alibi", length=1024, batch=16,
                        compile=compile_big, sets=big))
        out.append(dict(suite="1.3b", preset="cc100-1.3b", position="sinusoidal", length=2048, batch=8,
                        compile=compile_big, sets=big))
    if "smoke" in suites:  # the `tiny` preset at L = 64: the script's own check, on a CPU in seconds
        for position in positions:
            out.append(dict(suite="smoke", preset="tiny", position=position, length=64, batch=4,
                            compile=compile_gpt2, sets=["model.dropout=0.0", "data.grad_accum=1"]))
    seen, unique = set(), []
    for case in out:
        key = (case["preset"], case["position"], case["length"], case["batch"], case["compile"])
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def measure(case: dict, *, steps: int, warmup: int, extra_sets: list[str], backend: str, profile_steps: int = 0
            ) -> dict:
    overrides = [*case["sets"], f"model.position={case['position']}", f"data.train_len={case['length']}",
                 f"data.batch_size={case['batch']}", f"run.compile={str(case['compile']).lower()}",
                 f"model.attention_backend={backend}", f"model.max_len={max(case['length'], 1024)}",
                 "schedule.warmup_steps=0", *extra_sets]
    cfg = load_config(case["preset"], overrides)
    # Each case compiles from scratch: after a shape change Dynamo would otherwise recompile the
    # previous case's graph with dynamic shapes, which is slower and not what a fresh run gets.
    torch._dynamo.reset()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)
    model = TransformerLM(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    step_model = compile_for_training(model, cfg.run)
    cuda_graphs = captures_cuda_graphs(cfg.run)
    autocast = autocast_context(device, cfg.run.precision)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=8_000_000, dtype=np.uint16)
    tokens_per_step = cfg.data.batch_size * cfg.data.grad_accum * cfg.data.train_len

    def run(first: int, n: int, step_model=step_model, optimizer=optimizer) -> torch.Tensor:
        loss = None
        for step in range(first, first + n):
            batches = step_batches(tokens, cfg.data, step, info, seed=cfg.run.seed)
            loss = train_step(step_model, optimizer, batches, autocast=autocast, grad_clip=cfg.optim.grad_clip,
                              lr=lr_at(step, cfg.optim, cfg.schedule, cfg.run.steps), cuda_graphs=cuda_graphs)
        return loss

    t0 = time.perf_counter()
    run(0, warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = run(warmup, steps)
    final_loss = float(loss)  # synchronises
    elapsed = time.perf_counter() - t0
    tok_s = steps * tokens_per_step / elapsed
    fpt = flops_per_token(model, cfg.data.train_len)
    peak = peak_flops(device)
    result = {"suite": case["suite"], "preset": case["preset"], "position": cfg.model.position,
              "length": cfg.data.train_len, "batch": cfg.data.batch_size,
              "compile": cfg.run.compile_mode if cfg.run.compile else False,
              "backend": backend, "tokens_per_step": tokens_per_step, "parameters": model.num_parameters(),
              "steps": steps, "warmup_steps": warmup, "warmup_seconds": warmup_s, "seconds": elapsed,
              "tokens_per_second": tok_s, "flops_per_token": fpt, "mfu": tok_s * fpt / peak if peak else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "final_loss": final_loss}
    if profile_steps > 0:
        step_counter = [warmup + steps]

        def one_step(run=run) -> None:
            run(step_counter[0], 1)
            step_counter[0] += 1

        result["profile"] = breakdown(one_step, profile_steps)
    del model, optimizer, step_model, run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def _find(results: list[dict], **match) -> dict | None:
    for r in results:
        if all(r[k] == v for k, v in match.items()):
            return r
    return None


def comparisons(results: list[dict]) -> list[dict]:
    """The issue's targets, where both sides were measured in this run."""
    out = []

    def ratio(name, target, a, b):
        if a and b:
            value = a["tokens_per_second"] / b["tokens_per_second"]
            out.append({"comparison": name, "ratio": value, "target": target, "met": value >= target})

    ratio("gpt2: alibi / none at L=1024", 0.98, _find(results, preset="small", position="alibi", length=1024),
          _find(results, preset="small", position="none", length=1024))
    ratio("short: alibi L=512 / sinusoidal L=1024 (16,384 tokens/step)", 1.03,
          _find(results, preset="small", position="alibi", length=512),
          _find(results, preset="small", position="sinusoidal", length=1024))
    ratio("1.3b: alibi L=1024 / sinusoidal L=2048", 1.03,
          _find(results, preset="cc100-1.3b", position="alibi", length=1024),
          _find(results, preset="cc100-1.3b", position="sinusoidal", length=2048))
    alibi = _find(results, preset="small", position="alibi", length=1024)
    if alibi and alibi["mfu"] is not None:
        out.append({"comparison": "gpt2: alibi MFU at L=1024", "ratio": alibi["mfu"], "target": 0.45,
                    "met": alibi["mfu"] >= 0.45})
    return out


def markdown(results: list[dict], compared: list[dict], header: str) -> str:
    lines = [header, "", "| suite | config | position | L | batch | compile | backend | tokens/s | MFU | peak GiB |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['suite']} | {r['preset']} | {r['position']} | {r['length']} | {r['batch']} | "
                     f"{r['compile']} | {r['backend']} | {r['tokens_per_second']:,.0f} | {mfu} | {mem} |")
    if compared:
        lines += ["", "| comparison | value | target | met |", "|---|---:|---:|---|"]
        lines += [f"| {c['comparison']} | {c['ratio']:.3f} | {c['target']} | {'yes' if c['met'] else 'NO'} |"
                  for c in compared]
    for r in results:
        if "profile" in r:
            title = f"profile: {r['preset']} {r['position']} L={r['length']} batch={r['batch']}, per training step"
            lines += ["", profile_markdown(title, r["profile"]).rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for train_bench.json / .md")
    parser.add_argument("--suite", default="gpt2,short,1.3b", help=f"comma-separated subset of {','.join(SUITES)}")
    parser.add_argument("--positions", default="alibi,none,sinusoidal,rotary", help="positions for the gpt2 suite")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (gpt2, short)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps-1p3b", type=int, default=24, help="timed steps per 1.3b case")
    parser.add_argument("--backend", default="auto", help="model.attention_backend: auto | triton | sdpa")
    parser.add_argument("--no-compile", action="store_true", help="eager for the gpt2/short suites")
    parser.add_argument("--compile-1p3b", action="store_true", help="torch.compile the 1.3b cases too")
    parser.add_argument("--compile-mode", default="default",
                        help="run.compile_mode for the compiled cases: default | reduce-overhead (CUDA graphs) | ...")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more steps per case: GPU time by kernel group, busy fraction")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config override (repeatable)")
    args = parser.parse_args()
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; valid: {', '.join(SUITES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = cases(suites, [p.strip() for p in args.positions.split(",")], not args.no_compile, args.compile_1p3b)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        # "-dirty" marks a working tree that differs from HEAD (the device machine gets a copy of the
        # working tree whose HEAD may be older than the code it runs)
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    meta = {"device": device, "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit, "cuda": torch.version.cuda}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    results = []
    for case in todo:
        steps = args.steps_1p3b if case["suite"] == "1.3b" else args.steps
        warmup = max(3, args.warmup // 2) if case["suite"] == "1.3b" else args.warmup
        print(f"{case['preset']} {case['position']} L={case['length']} batch={case['batch']} "
              f"compile={case['compile']} ...", flush=True)
        try:
            sets = [f"run.compile_mode={args.compile_mode}", *args.sets]
            r = measure(case, steps=steps, warmup=warmup, extra_sets=sets, backend=args.backend,
                        profile_steps=args.profile)
        except torch.cuda.OutOfMemoryError as error:
            r = {**case, "error": f"out of memory: {str(error).splitlines()[0]}"}
            print(r["error"], flush=True)
            torch.cuda.empty_cache()
            continue
        except Exception as error:  # one broken case (a compiler error, say) must not lose the others
            print(f"  failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", flush=True)
            continue
        results.append(r)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"  {r['tokens_per_second']:,.0f} tokens/s, MFU {mfu}, peak {r['peak_memory_gib'] or 0:.1f} GiB, "
              f"warm-up {r['warmup_seconds']:.0f} s", flush=True)
        # Write after every case, so a run cut short still leaves its numbers.
        compared = comparisons(results)
        (out / "train_bench.json").write_text(json.dumps({"meta": meta, "results": results,
                                                          "comparisons": compared}, indent=1) + "\n")
        header = f"Training throughput, {device}, torch {meta['torch']}, {meta['date']}, commit {commit}"
        (out / "train_bench.md").write_text(markdown(results, compared, header))
    print((out / "train_bench.md").read_text() if (out / "train_bench.md").exists() else "no results")


if __name__ == "__main__":
    main()

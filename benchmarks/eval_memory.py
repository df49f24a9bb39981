"""Long-length evaluation memory (issue 7): peak GPU memory and speed of `alibi_lm.evaluate` at
evaluation lengths up to 16k tokens and beyond, for the `small` preset (GPT-2-small shape, 12 x 768,
vocabulary 33,280) with ALiBi (the fused kernel) and sinusoidal (SDPA) positions.

The weights are random: memory and time do not depend on what the model learned, so no training run
is needed. The tokens are random ids of the vocabulary. For each length the evaluation runs on
`--tokens` tokens in nonoverlapping windows (one window per forward pass when the length is at least
--batch-tokens), exactly as `alibi-lm evaluate` does, and the peak allocated memory is recorded.

    PYTHONPATH=src python3 benchmarks/eval_memory.py --out OUT_DIR              # one H100, ~1 minute
    PYTHONPATH=src python3 benchmarks/eval_memory.py --out /tmp/em --cpu-smoke  # tiny shapes, CPU

writes OUT_DIR/eval-memory.json and .md (rewritten after every length) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alibi_lm.config import load_config
from alibi_lm.evaluate import evaluate_lengths
from alibi_lm.model import TransformerLM


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    p.add_argument("--lengths", default="1024,4096,16384,32768,65536", help="evaluation lengths, comma-separated")
    p.add_argument("--positions", default="alibi,sinusoidal", help="position methods, comma-separated")
    p.add_argument("--tokens", type=int, default=131072, help="tokens evaluated per length (default: 128k)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="as `alibi-lm evaluate --batch-tokens`")
    p.add_argument("--cpu-smoke", action="store_true", help="a 2-layer, 64-wide model on the CPU, short lengths")
    return p.parse_args()


def random_small_model(overrides: list[str], cpu_smoke: bool, device: torch.device) -> TransformerLM:
    """The `small` preset (or, for a CPU smoke run, a 2-layer, 64-wide version of it) with random weights,
    seeded, in eval mode: speed and memory do not depend on what a model learned (generate.py uses it too)."""
    overrides = [*overrides, "model.dropout=0.0"]
    if cpu_smoke:
        overrides += ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=512"]
    cfg = load_config("small", overrides).model
    torch.manual_seed(0)
    return TransformerLM(cfg).to(device).eval()


def measure(position: str, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    model = random_small_model([f"model.position={position}"], args.cpu_smoke, device)
    cfg = model.cfg
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=max(args.tokens, length + 1), dtype=np.int64)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device)
    row: dict = {"position": position, "length": length, "tokens": int(len(tokens))}
    try:
        # compile and autotune the kernels for this length outside the timing (one window)
        evaluate_lengths(model, tokens[: length + 1], [length], max_batch_tokens=args.batch_tokens, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        record = evaluate_lengths(model, tokens, [length], max_batch_tokens=args.batch_tokens,
                                  progress=False)["records"][0]
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0][:120]}"
        return row
    seconds = time.perf_counter() - started
    row.update(seconds=seconds, tokens_per_second=record["tokens"] / seconds, loss=record["loss"])
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["weights_gib"] = weights / 2**30
    del model
    return row


def table(rows: list[dict]) -> str:
    out = ["| position | length | peak GiB (weights) | tokens/s | mean loss |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['position']} | {r['length']} | {r['error']} | - | - |")
            continue
        mem = f"{r['peak_gib']:.2f} ({r['weights_gib']:.2f})" if "peak_gib" in r else "-"
        out.append(f"| {r['position']} | {r['length']} | {mem} | {r['tokens_per_second']:,.0f} | {r['loss']:.3f} |")
    return "\n".join(out)


def main() -> None:
    args = _parse()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.cpu_smoke:
        lengths, args.tokens = [n for n in lengths if n <= 1024][:2] or [64], 2048
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    rows: list[dict] = []
    for position in [p.strip() for p in args.positions.split(",") if p.strip()]:
        for length in lengths:
            rows.append(measure(position, length, args, device))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
            (args.out / "eval-memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (args.out / "eval-memory.md").write_text(f"{header}\n\n{table(rows)}\n")
    print((args.out / "eval-memory.md").read_text())


if __name__ == "__main__":
    main()

"""Generation speed with the KV cache (issue 5's decoding path, end to end): new tokens per second of
`alibi_lm.generate` for the `small` preset (GPT-2-small shape, 12 x 768, vocabulary 33,280), ALiBi
through the fused kernel against ALiBi through SDPA with a materialised bias row, and against a model
with no position bias at all (SDPA, the floor for any bias).

The weights are random: speed does not depend on what the model learned. Each case continues a prompt
of random token ids greedily (temperature 0) by `--new` tokens, eager as `alibi-lm generate` runs,
bf16 autocast; a first, untimed call of the same length compiles and autotunes the kernels. tokens/s counts new
tokens over all sequences of the batch.

    PYTHONPATH=src python3 benchmarks/generate.py --out OUT_DIR              # one H100, ~1 minute
    PYTHONPATH=src python3 benchmarks/generate.py --out /tmp/gb --cpu-smoke  # tiny shapes, CPU

writes OUT_DIR/generate.json and .md (rewritten after every case) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from alibi_lm.generate import generate
from eval_memory import random_small_model  # benchmarks/ is on sys.path when a script runs

# (name, position, attention backend)
METHODS = [("alibi_triton", "alibi", "auto"), ("alibi_sdpa_bias_row", "alibi", "sdpa"), ("none_sdpa", "none", "sdpa")]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    p.add_argument("--prompts", default="512,4096", help="prompt lengths, comma-separated")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--new", type=int, default=128, help="new tokens per sequence (default 128)")
    p.add_argument("--cpu-smoke", action="store_true", help="a 2-layer, 64-wide model on the CPU, short prompts")
    return p.parse_args()


def measure(method: tuple[str, str, str], prompt_len: int, batch: int, args: argparse.Namespace,
            device: torch.device) -> dict:
    name, position, backend = method
    model = random_small_model([f"model.position={position}", f"model.attention_backend={backend}"],
                               args.cpu_smoke, device)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=generator).tolist()
    row: dict = {"method": name, "prompt": prompt_len, "batch": batch, "new": args.new}
    try:
        # untimed: compile and autotune every kernel variant the timed run meets (one-pass and split decoding)
        generate(model, prompts, max_new_tokens=args.new, temperature=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=args.new, temperature=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        new_tokens = sum(len(o) for o in out)
        row.update(seconds=seconds, new_tokens=new_tokens, tokens_per_s=new_tokens / seconds,
                   ms_per_step=seconds / args.new * 1e3, first_tokens=out[0][:8])
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    names = [m[0] for m in METHODS]
    out = ["new tokens/s over the batch (ms per decoding step), greedy, bf16 autocast",
           "", "| prompt | batch | " + " | ".join(names) + " | alibi_triton vs SDPA bias row |",
           "|---|---|" + "---|" * (len(names) + 1)]
    for prompt, batch in sorted({(r["prompt"], r["batch"]) for r in rows}):
        by = {r["method"]: r for r in rows if r["prompt"] == prompt and r["batch"] == batch}
        cells = []
        for name in names:
            r = by.get(name)
            cells.append("-" if r is None else r.get("error", f"{r['tokens_per_s']:,.0f} ({r['ms_per_step']:.2f})"))
        a, b = by.get("alibi_triton", {}), by.get("alibi_sdpa_bias_row", {})
        ratio = f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if "tokens_per_s" in a and "tokens_per_s" in b else "-"
        out.append(f"| {prompt} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def main() -> None:
    args = _parse()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --cpu-smoke)")
    if args.cpu_smoke:
        args.prompts, args.batches, args.new = "24", "2", 4
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    rows: list[dict] = []
    for prompt_len in (int(n) for n in args.prompts.split(",")):
        for batch in (int(n) for n in args.batches.split(",")):
            for method in METHODS:
                rows.append(measure(method, prompt_len, batch, args, device))
                print(json.dumps(rows[-1]), flush=True)
                (args.out / "generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
                (args.out / "generate.md").write_text(f"{header}\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

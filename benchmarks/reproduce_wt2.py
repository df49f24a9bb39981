"""Reproduce the paper's extrapolation experiments on WikiText-2 (word level) on one GPU.

The paper trains on WikiText-103; its training split is not available here, so this runs the
paper's "lower-resource" regime: WikiText-2 train (2.09M words), whose valid and test splits are the
same articles as WikiText-103's. Runs (same model size, same token budget per step, same seed):

  alibi, sinusoidal, rotary, t5, none   trained at L = 512
  alibi-256                             ALiBi trained at L = 256 (the abstract's claim: versus
                                        sinusoidal at 512, same tokens per step)

Each model: 6 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.3, tied embeddings (~36M parameters
with the 33,278-word vocabulary); AdamW lr 1e-3, cosine over at most --steps steps of 16,384 tokens,
validation on the whole valid split every 100 steps, early stopping after 5 validations without a
new best, and the best-validation model is evaluated. A per-model wall-clock limit (--max-minutes)
stops training early; the best checkpoint so far is then used and the JSON says so.

Evaluation on the test split (245,569 words incl. one <eos> per line; word-level perplexity, which
for the word tokenizer is the token perplexity):
  nonoverlapping at 512, 1k, 2k, 4k, 8k, 16k (--lengths);
  sliding window at 512 with stride 16 and at 2048 with stride 64 (--sliding). The paper's stride 1
  costs L forward tokens per scored token (125M tokens at 512, 500M at 2048 per model), too much for
  the time we have; with stride S each scored token sees between L - S + 1 and L tokens of context
  (at least 96.9% of the window here), which is what the early-token-curse analysis needs.

Results: <out>/<run>.json (written as soon as that run is evaluated, so a timeout loses nothing
finished) and <out>/<run>.metrics.jsonl (the training curve). With --report: <out>/RESULTS_wt2.md
(markdown tables) and PNG plots. Checkpoints stay in --work-dir (not in --out: they are large).

On the H100 (data carried in .data/wt2-word, prepared with
`alibi-lm prepare wikitext-2 -o .data/wt2-word --tokenizer word`):
  python benchmarks/reproduce_wt2.py --data .data/wt2-word --out $OUT --positions alibi,sinusoidal,rotary \
      --total-minutes 8.5
  python benchmarks/reproduce_wt2.py --data .data/wt2-word --out $OUT --positions t5,none,alibi-256 \
      --total-minutes 8.5
then, on any machine, with every <run>.json in one folder:
  python benchmarks/reproduce_wt2.py --out results/ --report-only
CPU smoke test of the whole path (tiny model, seconds): add --smoke.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

RUNS = {"alibi": ("alibi", 512), "sinusoidal": ("sinusoidal", 512), "rotary": ("rotary", 512), "t5": ("t5", 512),
        "none": ("none", 512), "alibi-256": ("alibi", 256)}
TOKENS_PER_STEP = 16384
MODEL = ["model.n_layers=6", "model.d_model=512", "model.n_heads=8", "model.d_ff=2048", "model.dropout=0.3",
         "model.tie_embeddings=true", "model.attention_backend=auto"]
OPTIM = ["optim.lr=1e-3", "optim.weight_decay=0.1", "optim.beta2=0.95", "optim.grad_clip=1.0",
         "schedule.kind=cosine", "schedule.warmup_steps=100", "schedule.min_lr_ratio=0.1"]
SMOKE_MODEL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.dropout=0.1"]


class TimeUp(Exception):
    """Raised by the alarm when a model's training time limit is reached."""


def _on_alarm(signum, frame):  # noqa: ARG001
    raise TimeUp


def overrides_for(name: str, args: argparse.Namespace, vocab: int, run_dir: Path) -> list[str]:
    position, length = RUNS[name]
    if args.smoke:
        length = length // 16
    batch = (args.tokens_per_step // length) if not args.smoke else 8
    sets = (SMOKE_MODEL if args.smoke else MODEL) + OPTIM + [
        f"model.vocab_size={math.ceil(vocab / 64) * 64}",  # a multiple of 64 for the tensor cores
        f"model.position={position}",
        f"data.path={args.data}", f"data.train_len={length}", f"data.batch_size={batch}", "data.grad_accum=1",
        f"data.valid_tokens={args.valid_tokens}",
        f"run.out_dir={run_dir}", f"run.steps={args.steps}", f"run.eval_every={args.eval_every}",
        "run.checkpoint_every=0", "run.keep_last=1", "run.keep_best=true", f"run.patience={args.patience}",
        f"run.seed={args.seed}", f"run.device={args.device}", f"run.log_every={2 if args.smoke else 50}",
        f"run.compile={str(args.compile).lower()}",
    ]
    return sets


def median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def train_one(name: str, args: argparse.Namespace, vocab: int) -> dict:
    """Train one run under the time limit; return what the results JSON records about training."""
    import torch

    from alibi_lm.config import load_config
    from alibi_lm.train import train

    run_dir = Path(args.work_dir) / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt (its results JSON does not exist)
    sets = overrides_for(name, args, vocab, run_dir)
    cfg = load_config("small", sets)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    stopped_by_time, result = False, None
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.max_minutes * 60)
    try:
        result = train(cfg, progress=not args.no_progress)
    except TimeUp:
        stopped_by_time = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - started
    gc.collect()
    metrics = []
    if (run_dir / "metrics.jsonl").is_file():
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        shutil.copy(run_dir / "metrics.jsonl", Path(args.out) / f"{name}.metrics.jsonl")
    valid = [m for m in metrics if "valid_loss" in m]
    best = min(valid, key=lambda m: m["valid_loss"]) if valid else None
    peak = (result.peak_memory_bytes if result is not None
            else (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None))
    checkpoint = run_dir / "best" if (run_dir / "best" / "meta.json").is_file() else (result and result.checkpoint)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "run": name,
        "overrides": sets,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "steps": metrics[-1]["step"] if metrics else 0,
        "tokens_trained": metrics[-1]["tokens"] if metrics else 0,
        "stopped_early": bool(result and result.stopped_early),
        "stopped_by_time_limit": stopped_by_time,
        "train_seconds": round(seconds, 1),
        # the first logging interval holds start-up and warm-up; the median of the rest is the speed
        "tokens_per_second": median([m["tokens_per_second"] for m in metrics[1:]]) or
        (metrics[0]["tokens_per_second"] if metrics else None),
        "peak_memory_bytes": peak,
        "best_valid_step": best["step"] if best else None,
        "best_valid_ppl": best.get("valid_ppl") if best else None,
    }


def evaluate_one(name: str, trained: dict, args: argparse.Namespace, data_meta: dict) -> dict:
    import torch

    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.data import load_tokens
    from alibi_lm.evaluate import evaluate_lengths, evaluate_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(trained["checkpoint"], device=device)
    test = load_tokens(args.data, "test")
    words = data_meta["splits"]["test"]["words"]
    if args.max_eval_tokens:
        words = round(words * min(1.0, args.max_eval_tokens / len(test)))
        test = test[: args.max_eval_tokens]
    lengths = [int(x) for x in args.lengths.split(",")]
    started = time.perf_counter()
    result = evaluate_model(ckpt.model, test, train_len=ckpt.train_len, lengths=lengths, word_count=words,
                            label=name, max_batch_tokens=args.batch_tokens, progress=not args.no_progress,
                            extra={"run": name, "split": "test", "data": str(args.data), "tokenizer": "word",
                                   "checkpoint": trained["checkpoint"], "train": trained})
    for item in filter(None, args.sliding.split(",")):
        length, stride = (int(x) for x in item.split(":"))
        out = evaluate_lengths(ckpt.model, test, [length], mode="sliding", stride=stride, word_count=words,
                               max_batch_tokens=args.batch_tokens, progress=not args.no_progress)
        result["evaluations"] += out["records"]
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    del ckpt
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------
# report (no torch needed)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def write_report(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from alibi_lm.plots import plot_results

    results = {}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == "alibi-lm-eval" and data.get("run") in RUNS:
            results[data["run"]] = data
    if not results:
        raise SystemExit(f"no run results (<run>.json) in {out}")
    order = [name for name in RUNS if name in results]
    lines = ["# WikiText-2 (word level): extrapolation of position methods", ""]
    first = results[order[0]]
    lines += [f"Device: {first.get('device')}, torch {first.get('torch')}. Test split: {first.get('split_tokens'):,} "
              f"tokens (= words incl. one <eos> per line). Word-level perplexity of the best-validation model.", ""]

    def table(mode: str, names: list[str]) -> list[str]:
        lengths = sorted({e["length"] for n in names for e in results[n]["evaluations"] if e["mode"] == mode})
        strides = {e["length"]: e["stride"] for n in names for e in results[n]["evaluations"] if e["mode"] == mode}
        head = [f"{_fmt_len(n)}" + (f" (S={strides[n]})" if mode == "sliding" else "") for n in lengths]
        rows = ["| run | train L | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(lengths)]
        for n in names:
            values = {e["length"]: e.get("word_ppl") or e["ppl"]
                      for e in results[n]["evaluations"] if e["mode"] == mode}
            cells = []
            best = min(values.values()) if values else None
            for length in lengths:
                v = values.get(length)
                cells.append("-" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}"))
            rows.append(f"| {n} | {results[n]['train_len']} | " + " | ".join(cells) + " |")
        return rows

    lines += ["## Nonoverlapping evaluation (the paper's main metric)", "", *table("nonoverlapping", order), "",
              "Bold: each run's best length.", ""]
    if any(e["mode"] == "sliding" for n in order for e in results[n]["evaluations"]):
        lines += ["## Sliding-window evaluation (early-token-curse analysis)", "",
                  "S is the stride: each forward pass reads L tokens and scores its last S, so every scored token "
                  "sees between L - S + 1 and L tokens of context (S = 1 is the paper's exact, slow setting).", "",
                  *table("sliding", order), ""]
    lines += ["## Training", "", "| run | train L | steps | tokens | stopped | best valid ppl (step) | train tokens/s "
              "| peak memory | train time |", "|---|---|---|---|---|---|---|---|---|"]
    for n in order:
        t = results[n]["train"]
        stop = "time limit" if t["stopped_by_time_limit"] else ("early stop" if t["stopped_early"] else "budget")
        mem = f"{t['peak_memory_bytes'] / 2**30:.2f} GiB" if t.get("peak_memory_bytes") else "-"
        tps = f"{t['tokens_per_second']:,.0f}" if t.get("tokens_per_second") else "-"
        bvp = f"{t['best_valid_ppl']:.2f} ({t['best_valid_step']})" if t.get("best_valid_ppl") else "-"
        lines.append(f"| {n} | {results[n]['train_len']} | {t['steps']} | {t['tokens_trained']:,} | {stop} | {bvp} "
                     f"| {tps} | {mem} | {t['train_seconds']:.0f} s |")
    lines.append("")
    if "alibi-256" in results and "sinusoidal" in results:
        a, s = results["alibi-256"], results["sinusoidal"]

        def at(r: dict, length: int) -> str:
            v = [e.get("word_ppl") or e["ppl"] for e in r["evaluations"]
                 if e["mode"] == "nonoverlapping" and e["length"] == length]
            return f"{v[0]:.2f}" if v else "-"

        lines += ["## ALiBi trained at 256 vs sinusoidal trained at 512 (the abstract's claim at our scale)", "",
                  f"| run | test ppl at {s['train_len']} | train tokens/s | peak memory |", "|---|---|---|---|"]
        for name, r in ((f"alibi, L={a['train_len']}", a), (f"sinusoidal, L={s['train_len']}", s)):
            t = r["train"]
            tps = f"{t['tokens_per_second']:,.0f}" if t.get("tokens_per_second") else "-"
            mem = f"{t['peak_memory_bytes'] / 2**30:.2f} GiB" if t.get("peak_memory_bytes") else "-"
            lines.append(f"| {name} | {at(r, s['train_len'])} | {tps} | {mem} |")
        lines.append("")
    main = [results[n] for n in order if n != "alibi-256"]
    if main:
        plot_results(main, out / "wt2_extrapolation.png", metric="word_ppl", dpi=90,
                     title="WikiText-2 test, trained at L = 512")
        lines += ["![perplexity vs evaluation length](wt2_extrapolation.png)", ""]
    if "alibi-256" in results:
        short = [results[n] for n in ("alibi-256", "alibi", "sinusoidal") if n in results]
        plot_results(short, out / "wt2_alibi256.png", metric="word_ppl", dpi=90,
                     title="ALiBi at L = 256 vs L = 512 and sinusoidal at 512")
        lines += ["![alibi 256 vs 512](wt2_alibi256.png)", ""]
    lines += ["Setup (overrides of the `small` preset), first run:", "", "```",
              " ".join(f"--set {s}" for s in first["train"]["overrides"]), "```", ""]
    report = out / "RESULTS_wt2.md"
    report.write_text("\n".join(lines))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".data/wt2-word", help="prepared WikiText-2 word-level directory")
    parser.add_argument("--out", default="wt2-results", help="results folder (JSON, metrics, report)")
    parser.add_argument("--work-dir", default="/tmp/wt2-runs", help="run directories with checkpoints")
    parser.add_argument("--positions", default=",".join(RUNS), help=f"runs, comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="token budget: at most this many steps (default 3000; --smoke: 8)")
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5, help="validations without improvement before stopping")
    parser.add_argument("--valid-tokens", type=int, default=0, help="cap on validation tokens (0: whole split)")
    parser.add_argument("--max-minutes", type=float, default=2.5, help="training time limit per model")
    parser.add_argument("--total-minutes", type=float, default=0,
                        help="do not start a run that could end after this many minutes (0: no limit)")
    parser.add_argument("--eval-minutes", type=float, default=1.0,
                        help="time kept for evaluating a model when checking --total-minutes")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="nonoverlapping lengths")
    parser.add_argument("--sliding", default="512:16,2048:64", help="sliding windows as LENGTH:STRIDE,...")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="input tokens per evaluation forward pass")
    parser.add_argument("--max-eval-tokens", type=int, default=0, help="evaluate on the first N test tokens only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (slower start)")
    parser.add_argument("--skip-existing", action="store_true", help="skip runs whose <run>.json exists")
    parser.add_argument("--report", action="store_true", help="write RESULTS_wt2.md and PNG plots at the end")
    parser.add_argument("--report-only", action="store_true", help="only write the report from <out>/*.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, short lengths: a CPU check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        print(f"wrote {write_report(out)}")
        return 0
    if args.smoke:
        args.steps, args.eval_every, args.patience = args.steps or 8, 4, 0
        args.lengths, args.sliding, args.batch_tokens = "32,64,128", "32:8", 1024
        args.max_eval_tokens, args.valid_tokens = args.max_eval_tokens or 3000, 2000

    args.steps = args.steps or 3000
    import torch

    from alibi_lm.data import read_meta

    names = [n.strip() for n in args.positions.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r}; valid: {', '.join(RUNS)}")
    data_meta = read_meta(args.data)
    if data_meta["tokenizer"] != "word":
        print(f"warning: {args.data} uses the {data_meta['tokenizer']} tokenizer; the paper's setting is word level")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}; "
          f"runs: {', '.join(names)}; at most {args.max_minutes} min of training each", flush=True)
    started = time.perf_counter()
    for name in names:
        path = out / f"{name}.json"
        if args.skip_existing and path.is_file():
            print(f"{name}: {path} exists, skipped")
            continue
        elapsed = (time.perf_counter() - started) / 60
        if args.total_minutes and elapsed + args.max_minutes + args.eval_minutes > args.total_minutes:
            print(f"{name}: not started, {elapsed:.1f} of {args.total_minutes} minutes used "
                  f"(run it in the next call)", flush=True)
            continue
        print(f"== {name}: training", flush=True)
        trained = train_one(name, args, data_meta["vocab_size"])
        if not trained["checkpoint"]:
            print(f"{name}: no checkpoint was written before the time limit; nothing to evaluate", flush=True)
            continue
        print(f"== {name}: {trained['steps']} steps in {trained['train_seconds']:.0f} s "
              f"({trained['tokens_per_second'] or 0:,.0f} tokens/s), best valid ppl {trained['best_valid_ppl']}; "
              "evaluating", flush=True)
        result = evaluate_one(name, trained, args, data_meta)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        row = ", ".join(f"{e['mode'][:3]} {e['length']}: {e['ppl']:.2f}" for e in result["evaluations"])
        print(f"== {name}: {row} (eval {result['eval_seconds']:.0f} s) -> {path}", flush=True)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if args.report:
        print(f"wrote {write_report(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

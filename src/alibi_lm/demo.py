"""`alibi-lm demo`: the paper's main effect in a few minutes on a laptop CPU, with no download.

Prepares the `embedded` corpus (Python's own help texts) at the byte level, trains the `demo`
preset twice through the project's `train()` — once with ALiBi, once with sinusoidal position
embeddings, same size, data, seed and steps — then evaluates both on the test split at 1x, 2x,
4x and 8x the training length (nonoverlapping, as in the paper's Figure 1), prints the table and
writes the plot and the JSON results to the output folder.

What it shows: ALiBi's perplexity at 8x stays within 5% of (in practice below) its value at 1x,
while sinusoidal's climbs far above its own. The check is printed plainly, pass or fail.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from alibi_lm.errors import UserError

__all__ = ["DEMO_POSITIONS", "FACTORS", "QUICK_STEPS", "run_demo"]

DEMO_POSITIONS = ("alibi", "sinusoidal")
#: evaluation lengths as multiples of the training length
FACTORS = (1, 2, 4, 8)
#: steps of `--quick` (the test's budget); the preset's own count is the full demo
QUICK_STEPS = 300
#: a file that marks a folder as written by the demo, so that a second demo may replace it
_MARKER = ".alibi-lm-demo"
#: ALiBi passes when its 8x perplexity is at most this multiple of its 1x perplexity
ALIBI_TOLERANCE = 1.05


def _claim_folder(out: Path) -> None:
    """Use `out` only if it is new, empty or an earlier demo's; never overwrite someone's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output folder with -o")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise UserError(f"{out} already holds files that the demo did not write; choose another folder with -o")
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by `alibi-lm demo`; a new demo run may replace this folder's contents\n")


def run_demo(out_dir: str | Path = "alibi-demo", *, steps: int | None = None, quick: bool = False, seed: int = 0,
             device: str = "auto", progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run the demo into `out_dir` and return its summary (also written to `out_dir/demo.json`):
    {"train_len", "steps", "ppl": {position: {length: ppl}}, "ratio_8x": {position: ppl(8L) / ppl(L)},
     "alibi_flat": bool, "sinusoidal_rises": bool, "seconds": ...}."""
    from alibi_lm.data import prepare
    from alibi_lm.distributed import pick_device
    from alibi_lm.files import write_json
    from alibi_lm.plots import plot_results

    started = time.perf_counter()
    # every argument is checked before the folder is claimed and the data prepared
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be a positive integer, got {steps}")
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {seed}")
    eval_device = pick_device(device)
    out = Path(out_dir)
    _claim_folder(out)
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        echo("preparing the embedded corpus (Python's help texts, byte-level) ...")
        prepare("embedded", data_dir, tokenizer="bytes", progress=False)
    if steps is None and quick:
        steps = QUICK_STEPS
    runs = [_train_and_evaluate(position, out, data_dir, steps=steps, seed=seed, device=device,
                                eval_device=eval_device, progress=progress, echo=echo) for position in DEMO_POSITIONS]
    results = [result for result, _ in runs]
    summary = _summary(results, {r["label"]: t for r, t in runs}, seed, time.perf_counter() - started)
    train_len = summary["train_len"]
    plot_results(results, out / "extrapolation.png",
                 title=f"Trained on {train_len} bytes, evaluated up to {train_len * FACTORS[-1]} (test split)")
    write_json(out / "demo.json", summary)
    _report(results, summary, out, echo)
    return summary


def _train_and_evaluate(position: str, out: Path, data_dir: Path, *, steps: int | None, seed: int, device: str,
                        eval_device, progress: bool, echo: Callable[[str], None]) -> tuple[dict, dict]:
    """Train the demo preset with one position method and evaluate it at 1x..8x: (results, timings)."""
    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.config import load_config
    from alibi_lm.data import load_tokens, read_meta
    from alibi_lm.evaluate import evaluate_model
    from alibi_lm.files import write_json
    from alibi_lm.train import train

    run_dir = out / "runs" / position
    overrides = [f"model.position={position}", f"data.path={data_dir}", f"run.out_dir={run_dir}",
                 f"run.seed={seed}", f"run.device={device}", *([f"run.steps={steps}"] if steps is not None else [])]
    cfg = load_config("demo", overrides)
    train_len = cfg.data.train_len
    if run_dir.exists():
        echo(f"replacing the earlier demo's {position} run in {run_dir}")
        shutil.rmtree(run_dir)  # an earlier demo's run (the folder is ours, see _claim_folder)
    echo(f"training {position}: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, "
         f"{cfg.run.steps} steps of {cfg.data.batch_size} x {train_len} bytes ...")
    t0 = time.perf_counter()
    trained = train(cfg, progress=progress)
    train_seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(trained.checkpoint, device=eval_device)
    lengths = [train_len * k for k in FACTORS]
    echo(f"evaluating {position} on the test split at {', '.join(map(str, lengths))} tokens ...")
    t0 = time.perf_counter()
    words = read_meta(data_dir)["splits"]["test"].get("words")
    result = evaluate_model(ckpt.model, load_tokens(data_dir, "test"), train_len=train_len, lengths=lengths,
                            word_count=words, label=position, progress=progress,
                            extra={"checkpoint": str(trained.checkpoint), "data": str(data_dir), "split": "test",
                                   "tokenizer": "bytes", "split_words": words, "steps": trained.steps,
                                   "train_seconds": round(train_seconds, 2),
                                   "train_tokens_per_second": round(trained.tokens_per_second, 1)})
    write_json(out / f"eval-{position}.json", result)
    return result, {"train": round(train_seconds, 1), "evaluate": round(time.perf_counter() - t0, 1)}


def _summary(results: list[dict], timings: dict, seed: int, seconds: float) -> dict:
    """demo.json: perplexity by length, the 8x ratios and the verdicts."""
    train_len = results[0]["train_len"]
    ppl = {r["label"]: {e["length"]: e["ppl"] for e in r["evaluations"]} for r in results}
    ratio = {name: values[train_len * FACTORS[-1]] / values[train_len] for name, values in ppl.items()}
    return {
        "train_len": train_len,
        "steps": results[0].get("steps"),
        "seed": seed,
        "ppl": {name: {str(k): round(v, 4) for k, v in values.items()} for name, values in ppl.items()},
        "ratio_8x": {name: round(v, 4) for name, v in ratio.items()},
        "alibi_flat": ratio["alibi"] <= ALIBI_TOLERANCE,
        "sinusoidal_rises": ratio["sinusoidal"] >= 1.5,
        "timings_seconds": timings,
        "seconds": round(seconds, 1),
    }


def _report(results: list[dict], summary: dict, out: Path, echo: Callable[[str], None]) -> None:
    from alibi_lm.plots import results_table

    ratio = summary["ratio_8x"]
    echo("")
    echo(f"test-split perplexity per byte, models trained on windows of L = {summary['train_len']} bytes:")
    echo(results_table(results).rstrip())
    echo("")
    verdict = "stays flat" if summary["alibi_flat"] else "does NOT stay within 5%"
    echo(f"ALiBi:      perplexity at {FACTORS[-1]}x / at 1x = {ratio['alibi']:.3f}  ({verdict})")
    rises = "rises" if summary["sinusoidal_rises"] else "does NOT rise much"
    echo(f"sinusoidal: perplexity at {FACTORS[-1]}x / at 1x = {ratio['sinusoidal']:.3f}  ({rises})")
    echo(f"wrote {out / 'extrapolation.png'}, {out / 'demo.json'}, eval-*.json and the checkpoints in "
         f"{out / 'runs'} ({summary['seconds']:.0f} s)")
    echo(f"next: alibi-lm generate {out / 'runs' / 'alibi'} --prompt \"The \" --max-new-tokens 300")

"""Evaluation results (JSON written by `alibi-lm evaluate`) -> figures and tables. Never imports torch.

A results file is one run evaluated on one split:
    {"format": "alibi-lm-eval", "format_version": 1, "label": str, "position": str, "train_len": int,
     "checkpoint": str, "split": str, "model": {...}, "evaluations": [record, ...], ...}
where each record comes from `evaluate.evaluate_lengths` (mode, length, stride, ppl, word_ppl,
loss_by_position, ...).

The figure follows the paper's Figure 1: perplexity against evaluation length on a log-2 axis, one
line per run (nonoverlapping solid, sliding window dashed), the training length marked; and next to
it the mean loss at each position of the longest nonoverlapping window (the early token curse:
the first positions have little context, so their loss is high whatever the method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from alibi_lm.errors import UserError

__all__ = ["FORMAT", "check_image_path", "load_results", "plot_results", "results_table", "series"]

FORMAT = "alibi-lm-eval"


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """Read results files; a missing or foreign file is a UserError naming it."""
    results = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"results file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read {path} as JSON ({error}); pass files written by `alibi-lm evaluate -o`") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("evaluations"), list):
            raise UserError(f"{path} is not an alibi-lm evaluation results file (written by `alibi-lm evaluate -o`)")
        data.setdefault("label", path.stem)
        results.append(data)
    return results


def check_image_path(out_path: str | Path) -> Path:
    """`out_path` if matplotlib can write an image there by its suffix, else a UserError."""
    from matplotlib.backend_bases import FigureCanvasBase

    out_path = Path(out_path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; give an image file name such as {out_path / 'ppl.png'}")
    if out_path.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"cannot tell the image format of {out_path}: end the name with .png, .pdf or .svg "
                        f"(or one of {', '.join('.' + f for f in sorted(formats))})")
    return out_path


def _metric(record: dict, metric: str) -> float | None:
    if metric == "word_ppl" and record.get("word_ppl") is not None:
        return record["word_ppl"]
    return record.get("ppl")


def series(result: dict, mode: str, metric: str = "ppl") -> tuple[list[int], list[float]]:
    """(lengths, perplexities) of one run in one mode, sorted by length."""
    points = sorted((r["length"], _metric(r, metric)) for r in result["evaluations"] if r["mode"] == mode)
    return [p[0] for p in points], [p[1] for p in points]


def _binned(values: list[float | None], bins_per_octave: int = 4) -> tuple[list[float], list[float]]:
    """Mean of loss_by_position over log-spaced position bins (positions counted from 1), so that a
    16k-long curve stays readable and the PNG small."""
    xs, ys = [], []
    start = 0
    n = len(values)
    while start < n:
        end = max(start + 1, min(n, int(round(2 ** (math.log2(start + 1) + 1 / bins_per_octave)))))
        chunk = [v for v in values[start:end] if v is not None]
        if chunk:
            xs.append(math.sqrt((start + 1) * end))  # geometric centre of positions start+1 .. end
            ys.append(sum(chunk) / len(chunk))
        start = end
    return xs, ys


def plot_results(results: Sequence[dict], out_path: str | Path, *, metric: str = "ppl", title: str | None = None,
                 dpi: int = 110) -> dict:
    """Write the figure to `out_path` (PNG, or any format matplotlib knows by the suffix).

    metric: "ppl" (per token) or "word_ppl" (falls back to ppl where a record has none).
    Returns what was drawn: {"ppl": {line label: (lengths, values)}, "loss_by_position": {label: (x, y)},
    "train_lens": [...]}, which tests and callers can check.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not results:
        raise UserError("nothing to plot: no results given")
    out_path = check_image_path(out_path)
    drawn: dict = {"ppl": {}, "loss_by_position": {}, "train_lens": []}
    with_positions = [r for r in results if any(e.get("loss_by_position") for e in r["evaluations"])]
    fig = Figure(figsize=(11 if with_positions else 6.5, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_positions else 1, squeeze=False)[0]
    ax = axes[0]
    colors = [f"C{i % 10}" for i in range(len(results))]
    length_ticks: set[int] = set()
    for result, color in zip(results, colors):
        label = str(result.get("label"))
        for mode, style in (("nonoverlapping", "-"), ("sliding", "--")):
            xs, ys = series(result, mode, metric)
            if not xs:
                continue
            name = label if mode == "nonoverlapping" else f"{label} (sliding)"
            ax.plot(xs, ys, style, marker="o", markersize=4, color=color, label=name)
            drawn["ppl"][name] = (xs, ys)
            length_ticks.update(xs)
        train_len = result.get("train_len")
        if train_len and train_len not in drawn["train_lens"]:
            drawn["train_lens"].append(train_len)
    for i, train_len in enumerate(sorted(drawn["train_lens"])):
        ax.axvline(train_len, color="0.5", linestyle=":", linewidth=1.2,
                   label="training length" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ticks = sorted(length_ticks)
    if ticks:
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    values = [y for line in drawn["ppl"].values() for y in line[1]]
    if values and max(values) / min(values) > 8:
        ax.set_yscale("log")  # an exploding sinusoidal curve would flatten every other line
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("word-level perplexity" if metric == "word_ppl" else "perplexity")
    ax.set_title(title or "Perplexity vs evaluation length")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)

    if with_positions:
        ax2 = axes[1]
        for result, color in zip(results, colors):
            records = [e for e in result["evaluations"] if e["mode"] == "nonoverlapping" and e.get("loss_by_position")]
            if not records:
                continue
            longest = max(records, key=lambda e: e["length"])
            xs, ys = _binned(longest["loss_by_position"])
            name = f"{result.get('label')} (L={longest['length']})"
            ax2.plot(xs, ys, color=color, label=name)
            drawn["loss_by_position"][name] = (xs, ys)
        for train_len in drawn["train_lens"]:
            ax2.axvline(train_len, color="0.5", linestyle=":", linewidth=1.2)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("position in the window")
        ax2.set_ylabel("mean loss (nats)")
        ax2.set_title("Loss by position (nonoverlapping)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    return drawn


def results_table(results: Sequence[dict], *, metric: str = "ppl", markdown: bool = False) -> str:
    """Perplexity per run (rows) and evaluation length (columns), one block per mode."""
    lines: list[str] = []
    for mode in ("nonoverlapping", "sliding"):
        rows = [(r, dict(zip(*series(r, mode, metric)))) for r in results]
        rows = [(r, values) for r, values in rows if values]
        if not rows:
            continue
        lengths = sorted({n for _, values in rows for n in values})
        strides = sorted({e.get("stride") for r, _ in rows for e in r["evaluations"] if e["mode"] == mode})
        heading = mode if mode == "nonoverlapping" else f"sliding window (stride {', '.join(map(str, strides))})"
        header = [f"{heading}", "train L"] + [str(n) for n in lengths]
        body = [[str(r.get("label")), str(r.get("train_len", "?"))]
                + [f"{values[n]:.2f}" if n in values and values[n] is not None else "-" for n in lengths]
                for r, values in rows]
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in body]
        else:
            widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
            for row in [header, *body]:
                cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
                lines.append("  ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

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

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from alibi_lm.errors import UserError
from alibi_lm.files import RESULTS_FORMAT, check_output_file, read_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PLOT_MARK", "check_image_path", "is_plot_file", "load_results", "plot_results", "results_table", "series"]



def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """Read results files; a missing or foreign file, or one whose records are malformed (a hand-edited
    or truncated-then-fixed file), is a UserError naming it, so plotting and the table need no guards."""
    results = []
    for path in paths:
        path = Path(path)
        data = read_json(path, "results file")
        if (not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT
                or not isinstance(data.get("evaluations"), list)):
            raise UserError(f"{path} is not an alibi-lm evaluation results file (written by `alibi-lm evaluate -o`)")
        if not data["evaluations"]:
            raise UserError(f"{path} holds no evaluations: nothing to plot")
        problem = _result_problem(data)
        if problem:
            raise UserError(f"{path}: {problem}; pass files written by `alibi-lm evaluate -o`")
        data.setdefault("label", path.stem)
        results.append(data)
    return results


def _show(value: object) -> str:
    """repr of a value for an error message, cut short: a misplaced list may hold thousands of items."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    # JSON true/false load as bool, a subclass of int: a flag is never a perplexity or a length
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _perplexity_problem(value: object, name: str) -> str | None:
    """Why `value` is no perplexity. exp(loss) is positive; an overflowing loss gives infinity (written as
    JSON `Infinity`) and a diverged model's NaN loss gives NaN: both are real results and are kept."""
    if not _is_number(value):
        return f"{name} must be a number, got {_show(value)}"
    if value <= 0:
        return f"{name} must be positive (a perplexity is exp(loss) > 0), got {value!r}"
    return None


def _record_problem(record: object) -> str | None:
    """What is wrong with one record of "evaluations" (see `evaluate.evaluate_lengths`), or None."""
    if not isinstance(record, dict):
        return f"must be a JSON object, got {_show(record)}"
    if record.get("mode") not in ("nonoverlapping", "sliding"):
        return f"mode must be nonoverlapping or sliding, got {_show(record.get('mode'))}"
    # the table's sliding heading names the strides, so a sliding record needs one
    required = ("length", "stride") if record["mode"] == "sliding" else ("length",)
    for name in ("length", "stride"):
        if (name in required or record.get(name) is not None) and not _is_positive_int(record.get(name)):
            return f"{name} must be a positive integer, got {_show(record.get(name))}"
    problem = _perplexity_problem(record.get("ppl"), "ppl")
    if problem is None and record.get("word_ppl") is not None:
        problem = _perplexity_problem(record["word_ppl"], "word_ppl")
    if problem:
        return problem
    by_position = record.get("loss_by_position")
    if by_position is not None and (not isinstance(by_position, list)
                                    or not all(v is None or _is_number(v) for v in by_position)):
        return "loss_by_position must be a list of numbers (null where a position was never scored)"
    return None


def _result_problem(data: dict) -> str | None:
    """What is wrong with a results document, or None; checked on load, so that plotting and the table
    can index every record without guarding."""
    train_len = data.get("train_len")
    if train_len is not None and not _is_positive_int(train_len):
        return f"train_len must be a positive integer, got {_show(train_len)}"
    for i, record in enumerate(data["evaluations"]):
        problem = _record_problem(record)
        if problem:
            return f"evaluation record {i + 1}: {problem}"
    return None


#: written into the metadata of every figure `plot_results` saves, so that `alibi-lm plot -o` can tell
#: its own earlier figures (replaced) from any other file (never overwritten)
PLOT_MARK = "alibi-lm plot"
#: the metadata key each format keeps the mark under (matplotlib's savefig(metadata=...)); formats
#: without one (raw, rgba, gif, tiff, webp...) carry no mark, so an existing file of theirs is refused
_MARK_KEYS = {"png": "Software", "pdf": "Creator", "svg": "Creator", "ps": "Creator", "eps": "Creator"}
#: figures are small; a larger file is certainly not one
_MAX_FIGURE_BYTES = 64 << 20


def is_plot_file(path: str | Path) -> bool:
    """Whether `path` is a figure that `plot_results` wrote (it carries PLOT_MARK in its metadata)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_FIGURE_BYTES:
            return False
        return PLOT_MARK.encode() in path.read_bytes()
    except OSError:
        return False


def check_image_path(out_path: str | Path) -> Path:
    """`out_path` if matplotlib can write an image there by its suffix and it is new or an earlier
    figure of ours (any other file, a corpus named keep.png say, is never overwritten), else a
    UserError. Folders up to it are created."""
    from matplotlib.backend_bases import FigureCanvasBase

    out_path = Path(out_path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if not out_path.is_dir() and out_path.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"cannot tell the image format of {out_path}: end the name with .png, .pdf or .svg "
                        f"(or one of {', '.join('.' + f for f in sorted(formats))})")
    return check_output_file(out_path, option="-o", kind="figure", ours=is_plot_file, example="ppl.png")


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
    "train_lens": [...], "not_finite": {line label: [lengths whose value is inf or NaN, marked at the top]}},
    which tests and callers can check.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not results:
        raise UserError("nothing to plot: no results given")
    if not any(r.get("evaluations") for r in results):
        raise UserError("nothing to plot: the results hold no evaluations")
    out_path = check_image_path(out_path)
    drawn: dict = {"ppl": {}, "loss_by_position": {}, "train_lens": []}
    with_positions = [r for r in results if any(e.get("loss_by_position") for e in r["evaluations"])]
    fig = Figure(figsize=(11 if with_positions else 6.5, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_positions else 1, squeeze=False)[0]
    ax = axes[0]
    colors = [f"C{i % 10}" for i in range(len(results))]
    length_ticks: set[int] = set()
    line_colors: dict[str, str] = {}
    for result, color in zip(results, colors):
        label = str(result.get("label"))
        for mode, style in (("nonoverlapping", "-"), ("sliding", "--")):
            xs, ys = series(result, mode, metric)
            if not xs:
                continue
            name = label if mode == "nonoverlapping" else f"{label} (sliding)"
            ax.plot(xs, ys, style, marker="o", markersize=4, color=color, label=name)
            drawn["ppl"][name] = (xs, ys)
            line_colors[name] = color
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
    values = [y for line in drawn["ppl"].values() for y in line[1] if math.isfinite(y)]
    if values and max(values) / min(values) > 8:
        ax.set_yscale("log")  # an exploding sinusoidal curve would flatten every other line
    drawn["not_finite"] = _mark_not_finite(ax, drawn["ppl"], line_colors, ceiling=2 * max(values) if values else 1.0)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("word-level perplexity" if metric == "word_ppl" else "perplexity")
    ax.set_title(title or "Perplexity vs evaluation length")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)

    if with_positions:
        _draw_loss_by_position(axes[1], results, colors, drawn)
    fig.tight_layout()
    _save_marked(fig, out_path, dpi)
    return drawn


def _draw_loss_by_position(ax2: Axes, results: Sequence[dict], colors: list[str], drawn: dict) -> None:
    """The second panel: mean loss at each position of each run's longest nonoverlapping window."""
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


def _save_marked(fig, out_path: Path, dpi: int) -> None:
    """Save with PLOT_MARK in the file's metadata (where the format has some), so `plot -o` knows it later."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = out_path.suffix.lower().lstrip(".")
    marked: dict = {"metadata": {_MARK_KEYS[suffix]: PLOT_MARK}} if suffix in _MARK_KEYS else {}
    if suffix in ("jpg", "jpeg"):  # Pillow writes JPEG metadata as a comment
        marked = {"pil_kwargs": {"comment": PLOT_MARK}}
    fig.savefig(out_path, dpi=dpi, **marked)


def _mark_not_finite(ax: Axes, lines: dict[str, tuple[list[int], list[float]]], colors: dict[str, str],
                     ceiling: float) -> dict[str, list[int]]:
    """Draw infinite or NaN perplexities (a diverged model) as triangles at `ceiling`, above every finite
    point: matplotlib would silently leave them out, hiding the very result that matters."""
    marked: dict[str, list[int]] = {}
    for name, (xs, ys) in lines.items():
        at = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
        if at:
            ax.plot(at, [ceiling] * len(at), linestyle="none", marker="^", markersize=8, color=colors[name],
                    label=None if marked else "not finite (diverged), drawn at the top")
            marked[name] = at
    return marked


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

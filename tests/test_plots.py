import json
import math

import numpy as np
import pytest

from alibi_lm.errors import UserError
from alibi_lm.files import RESULTS_FORMAT as FORMAT
from alibi_lm.plots import load_results, plot_results, results_table


def fake_result(label: str, ppls: dict[int, float], train_len: int = 64, sliding: dict[int, float] | None = None):
    evaluations = [{"mode": "nonoverlapping", "length": n, "stride": n, "ppl": p, "word_ppl": p * 1.5,
                    "loss_by_position": [3.0 / (1 + i) ** 0.3 for i in range(n)]} for n, p in ppls.items()]
    evaluations += [{"mode": "sliding", "length": n, "stride": 4, "ppl": p, "word_ppl": None, "loss_by_position": None}
                    for n, p in (sliding or {}).items()]
    return {"format": FORMAT, "format_version": 1, "label": label, "train_len": train_len, "evaluations": evaluations}


def read_png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def has_color(image: np.ndarray, hex_color: str, tol: float = 0.02) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(image[..., :3] - rgb).max(-1) < tol).any())


def test_plot_writes_png_with_one_line_per_run(tmp_path):
    alibi = fake_result("alibi", {64: 30.0, 128: 28.0, 256: 27.5, 512: 27.4}, sliding={64: 29.0, 256: 28.9})
    sinus = fake_result("sinusoidal", {64: 31.0, 128: 90.0, 256: 400.0, 512: 900.0})
    out = tmp_path / "sub" / "ppl.png"
    drawn = plot_results([alibi, sinus], out)
    image = read_png(out)
    assert image.shape[0] > 300 and image.shape[1] > 800  # two panels side by side
    assert has_color(image, "#1f77b4") and has_color(image, "#ff7f0e")  # matplotlib's C0 and C1 lines
    assert drawn["ppl"]["alibi"] == ([64, 128, 256, 512], [30.0, 28.0, 27.5, 27.4])
    assert drawn["ppl"]["alibi (sliding)"] == ([64, 256], [29.0, 28.9])
    assert drawn["ppl"]["sinusoidal"][1][-1] == 900.0
    assert drawn["train_lens"] == [64]
    xs, ys = drawn["loss_by_position"]["alibi (L=512)"]
    assert xs[0] == pytest.approx(1.0) and xs[-1] < 512 and ys[0] == pytest.approx(3.0)
    assert all(a < b for a, b in zip(xs, xs[1:])) and all(a > b for a, b in zip(ys, ys[1:]))


def test_word_metric_and_single_panel(tmp_path):
    run = fake_result("r", {16: 10.0, 32: 9.0})
    for e in run["evaluations"]:
        e["loss_by_position"] = None
    drawn = plot_results([run], tmp_path / "w.png", metric="word_ppl")
    assert drawn["ppl"]["r"] == ([16, 32], [15.0, 13.5])
    assert drawn["loss_by_position"] == {}
    image = read_png(tmp_path / "w.png")
    assert image.shape[1] < 800


def test_table_and_loading(tmp_path):
    alibi = fake_result("alibi", {64: 30.0, 128: 28.0}, sliding={64: 29.0})
    path = tmp_path / "a.json"
    path.write_text(json.dumps(alibi))
    (loaded,) = load_results([path])
    table = results_table([loaded])
    assert "alibi" in table and "30.00" in table and "28.00" in table and "stride 4" in table
    md = results_table([loaded], markdown=True)
    assert md.splitlines()[0] == "| nonoverlapping | train L | 64 | 128 |"
    assert "| alibi | 64 | 30.00 | 28.00 |" in md
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not an alibi-lm"):
        load_results([tmp_path / "bad.json"])
    with pytest.raises(UserError, match="does not exist"):
        load_results([tmp_path / "missing.json"])


def test_plots_module_does_not_import_torch():
    # the package's __init__ imports torch, so check plots.py's own imports (all of them, also inside functions)
    import ast

    import alibi_lm.plots

    tree = ast.parse(open(alibi_lm.plots.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "matplotlib.figure" in names
    heavy = ("alibi_lm.model", "alibi_lm.evaluate")
    assert not [n for n in names if n.split(".")[0] in ("torch", "numpy") or n in heavy]


def test_output_without_an_image_suffix_or_a_directory_is_a_user_error(tmp_path, capsys):
    from alibi_lm.cli import main

    path = tmp_path / "a.json"
    path.write_text(json.dumps(fake_result("alibi", {64: 30.0, 128: 28.0})))
    for out, message in ((tmp_path / "x.foo", "cannot tell the image format"), (tmp_path / "noext", "image format"),
                         (tmp_path, "is a directory")):
        assert main(["plot", str(path), "-o", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert main(["plot", str(path), "-o", str(tmp_path / "ok.SVG")]) == 0


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg", "jpg"])
def test_plot_never_overwrites_a_file_it_did_not_write(tmp_path, capsys, suffix):
    """`cp corpus.txt keep.png; alibi-lm plot ev.json -o keep.png` lost the text (issue 16): any file that
    is not an earlier figure of ours is refused, one line, exit 2; our own figure is replaced."""
    from alibi_lm.cli import main

    path = tmp_path / "a.json"
    path.write_text(json.dumps(fake_result("alibi", {64: 30.0, 128: 28.0})))
    keep = tmp_path / f"keep.{suffix}"
    keep.write_text("a corpus that must survive\n")
    assert main(["plot", str(path), "-o", str(keep)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "is not an alibi-lm figure" in captured.err, captured.err
    assert keep.read_text() == "a corpus that must survive\n"
    mine = tmp_path / f"mine.{suffix}"
    assert main(["plot", str(path), "-o", str(mine)]) == 0
    first = mine.stat().st_mtime_ns
    assert main(["plot", str(path), "-o", str(mine)]) == 0  # an earlier figure of ours is replaced
    assert mine.stat().st_mtime_ns >= first and mine.stat().st_size > 1000


@pytest.mark.parametrize(("evaluations", "message"), [
    ([{}], "record 1: mode must be"),
    ([{"mode": "nonoverlapping", "length": "64", "ppl": 3.0}], "length must be a positive integer, got '64'"),
    ([{"mode": "nonoverlapping", "length": 64, "ppl": None}], "ppl must be a number, got None"),
    ([{"mode": "nonoverlapping", "length": 64, "ppl": 5.0}, {"mode": "nonoverlapping", "length": 128, "ppl": 0}],
     "record 2: ppl must be positive"),
    ([{"mode": "sliding", "length": 64, "ppl": 5.0}], "stride must be a positive integer"),
    ([{"mode": "nonoverlapping", "length": 64, "ppl": 5.0, "loss_by_position": [1.0, "x"]}], "loss_by_position"),
    ([[1, 2]], "must be a JSON object"),
    ([], "holds no evaluations: nothing to plot"),
])
def test_malformed_records_are_one_line_naming_the_file(tmp_path, capsys, evaluations, message):
    from alibi_lm.cli import main

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": FORMAT, "format_version": 1, "evaluations": evaluations}))
    with pytest.raises(UserError, match=message):
        load_results([path])
    assert main(["plot", str(path), "-o", str(tmp_path / "r.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(path) in captured.err and message.split(":")[-1] in captured.err
    assert not (tmp_path / "r.png").exists()


def test_infinite_perplexity_is_plotted_at_the_top(tmp_path, capsys):
    from alibi_lm.cli import main

    # a diverged model's loss overflows exp(): evaluate writes Infinity (or NaN), a real result to show
    run = fake_result("sinusoidal", {64: 30.0, 128: 400.0, 256: math.inf, 512: math.nan})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run))
    (loaded,) = load_results([path])
    drawn = plot_results([loaded], tmp_path / "r.png")
    assert drawn["ppl"]["sinusoidal"][0] == [64, 128, 256, 512]
    assert drawn["not_finite"] == {"sinusoidal": [256, 512]}
    assert has_color(read_png(tmp_path / "r.png"), "#1f77b4")
    assert "inf" in results_table([loaded])
    assert main(["plot", str(path), "-o", str(tmp_path / "cli.png")]) == 0 and capsys.readouterr().err == ""

"""progress.py: tqdm on a terminal, a plain line per interval in a log (issue 16: ~1,500 bar lines)."""

import io

from alibi_lm.progress import LineProgress, progress_bar


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_one_line_per_interval_with_the_time_left():
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(total=1200, desc="sliding L=64", unit="tok", file=out, interval=60, clock=clock)
    for _ in range(1200):
        clock.now += 0.25  # 300 s in all: five intervals (a step that binary floats hold exactly)
        bar.update(1)
    bar.close()  # the last update printed the last line already
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[0].startswith("sliding L=64: 240/1,200 (20%), 4.0 tok/s, ETA 4:00"), lines[0]
    assert lines[-1].endswith("done in 5:00"), lines[-1]


def test_postfix_and_an_unknown_total():
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(total=None, unit="step", file=out, interval=10, clock=clock)
    bar.set_postfix(loss="3.210")
    clock.now = 20
    bar.update(50)
    bar.close()
    assert out.getvalue() == "50, 2.5 step/s, loss=3.210\n"


def test_disabled_writes_nothing_and_a_pipe_gets_lines_not_a_bar():
    out = io.StringIO()
    bar = progress_bar(total=10, desc="x", disable=True, file=out)
    bar.update(10)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == ""
    bar = progress_bar(total=10, desc="x", file=out)
    assert isinstance(bar, LineProgress)  # StringIO is no terminal
    bar.update(10)
    bar.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("x: 10/10 (100%), ") and line.endswith("done in 0:00"), line

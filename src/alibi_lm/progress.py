"""Progress of long work (tokenizing, training, evaluation): a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns ten times a second; written to a file (`alibi-lm train > log
2>&1`, a batch job) every redraw stays in it, about 1,500 bar lines for one evaluation. When the stream
is not a terminal, `progress_bar` gives a `LineProgress` instead: one ordinary line per interval
(default a minute) and a last one when the work ends, each with the rate and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["LineProgress", "progress_bar"]

#: seconds between two lines of a LineProgress
LOG_INTERVAL = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """The part of tqdm's interface that alibi-lm uses (update, set_postfix, set_description, write,
    close), printing `desc: n/total (p%), rate unit/s, ETA m:ss, postfix` lines at most every `interval`
    seconds."""

    def __init__(self, *, total: float | None, desc: str = "", unit: str = "it", initial: float = 0,
                 file: IO[str] | None = None, interval: float = LOG_INTERVAL, disable: bool = False,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file or sys.stderr
        self.interval, self.disable, self.clock = interval, disable, clock
        self.postfix = ""
        self._start_n = self._printed_n = initial
        self._start = self._last = clock()
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self._last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        if not self.disable:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        # the last line, unless the last update printed it already
        if not self.disable and not self._closed and self.n > self._printed_n:
            self._line()
        self._closed = True

    def _line(self) -> None:
        now = self.clock()
        self._last, self._printed_n = now, self.n
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n:,.0f}/{self.total:,.0f} ({self.n / self.total:.0%})" if self.total else f"{self.n:,.0f}"]
        parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        elif self.n >= (self.total or float("inf")):
            parts.append(f"done in {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc + ': ' if self.desc else ''}{', '.join(parts)}", file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(*, total: float | None, desc: str = "", unit: str = "it", disable: bool = False,
                 initial: float = 0, leave: bool = True, unit_scale: bool = False, file: IO[str] | None = None):
    """A tqdm bar on a terminal, a LineProgress elsewhere (see the module doc); both on stderr by
    default, so that a command's results on stdout stay clean."""
    file = file or sys.stderr
    isatty = getattr(file, "isatty", None)
    if not (isatty and isatty()):
        return LineProgress(total=total, desc=desc, unit=unit, initial=initial, file=file, disable=disable)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc or None, unit=unit, disable=disable, initial=initial, leave=leave,
                unit_scale=unit_scale, file=file, dynamic_ncols=True)

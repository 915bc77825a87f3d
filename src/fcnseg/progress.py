"""Progress that suits where the output goes: tqdm's bar on a terminal, plain lines everywhere else.

A redrawn bar is right for a person at a terminal and wrong for a log file: tqdm piped to a file
writes every redraw after a carriage return, so a 200-step run becomes one 22 KB line. `progress_bar`
looks at the stream first. On a terminal (or in a notebook) it returns tqdm's bar, with its rate and
ETA; otherwise a `PlainProgress` that writes a whole line at most every ``interval`` seconds (10 by
default) and one at the end: count, rate, elapsed, ETA and the caller's postfix (loss, lr, ...).
Both answer the same small tqdm subset: iterate, `update`, `set_postfix`, `write`, `close`, ``with``.
``disable=True`` silences both.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

PLAIN_INTERVAL = 10.0
"""Seconds between two plain progress lines: a line per step would flood a log, none would hide a stall."""


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    initial: float = 0,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    unit_divisor: int = 1000,
    disable: bool = False,
    file: TextIO | None = None,
    interval: float = PLAIN_INTERVAL,
) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal or a notebook, else a `PlainProgress`.

    Args:
        iterable: what to wrap (iterating the result yields its items and counts them), or None
            for a bar driven by `update`.
        total: the count at the end (default: ``len(iterable)`` when it has one).
        initial: the count already done (a resumed epoch, a resumed download).
        desc, unit, unit_scale, unit_divisor: as tqdm's (bytes: ``unit="B", unit_scale=True,
            unit_divisor=1024``).
        disable: no output at all, in either form.
        file: the stream written to.
        interval: seconds between plain lines (ignored by tqdm, which redraws as it sees fit).
    """
    stream = file if file is not None else sys.stderr
    if not disable and (_is_terminal(stream) or "ipykernel" in sys.modules):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    unit_divisor=unit_divisor, file=stream, dynamic_ncols=True)
    return PlainProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                         unit_divisor=unit_divisor, disable=disable, file=stream, interval=interval)


def _is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an interactive terminal (False for files, pipes and captured output)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """Progress as whole lines, never redrawn: one at most every ``interval`` seconds, one at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0,
                 desc: str = "", unit: str = "it", unit_scale: bool = False, unit_divisor: int = 1000,
                 disable: bool = False, file: TextIO | None = None, interval: float = PLAIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Arguments as `progress_bar`'s; ``clock`` returns seconds (a fake one in tests)."""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.initial = iterable, total, initial, initial
        self.desc, self.unit, self.unit_scale, self.unit_divisor = desc, unit, unit_scale, unit_divisor
        self.disable, self.file, self.interval, self.clock = disable, file, interval, clock
        self.postfix = ""
        self.closed = False
        self.started = self.last_line = clock()
        self.written_n: float | None = None  # the count of the last line written

    def __iter__(self) -> Iterator[Any]:
        """Yields the wrapped iterable's items, counting each once the caller is done with it."""
        if self.iterable is None:
            raise TypeError("PlainProgress made without an iterable is driven by update(), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Adds ``n`` to the count; writes a line if ``interval`` seconds passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Sets the ``key=value`` pairs shown after the counts (as tqdm's; numbers to 4 significant digits)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Sets the text shown after the counts."""
        self.postfix = text

    @staticmethod
    def write(text: str, file: TextIO | None = None, end: str = "\n") -> None:
        """Writes a message line (tqdm's ``write``: stdout unless ``file`` says otherwise)."""
        stream = file if file is not None else sys.stdout
        stream.write(text + end)
        stream.flush()

    def close(self) -> None:
        """Writes the closing line (if anything was counted since the last line); later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial and self.n != self.written_n:
            self._emit(self.clock())

    def line(self, now: float) -> str:
        """The progress line at time ``now``: count of total, rate, elapsed, ETA, then the postfix."""
        elapsed = max(now - self.started, 0.0)
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        sep = "" if self.unit_scale else " "  # 3MiB, 1.5MiB/s; 100/1000 step, 10 step/s
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{self._amount(self.n)}/{self._amount(self.total)}{sep}{self.unit} "
                         f"({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self._amount(self.n)}{sep}{self.unit}")
        timing = [f"{self._amount(rate) if rate is not None else '?'}{sep}{self.unit}/s",
                  f"elapsed {format_duration(elapsed)}"]
        if self.total:
            remaining = max(self.total - self.n, 0)
            eta = remaining / rate if rate else None
            timing.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        parts.append(" | " + ", ".join(timing))
        if self.postfix:
            parts.append(" | " + self.postfix)
        return "".join(parts)

    def _emit(self, now: float) -> None:
        if self.disable or self.file is None:
            return
        self.file.write(self.line(now) + "\n")
        self.file.flush()
        self.written_n = self.n

    def _amount(self, value: float) -> str:
        """A count as text: whole numbers as such, rates to 3 significant digits, scaled with k/M/G when asked."""
        prefix = ""
        if self.unit_scale:
            prefixes = ("", "Ki", "Mi", "Gi", "Ti") if self.unit_divisor == 1024 else ("", "k", "M", "G", "T")
            for prefix in prefixes:
                if abs(value) < 999.5 or prefix == prefixes[-1]:
                    break
                value /= self.unit_divisor
        if prefix:
            return f"{value:.3g}{prefix}"
        return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """Seconds as ``M:SS`` or ``H:MM:SS`` (as tqdm shows them)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


__all__ = ["PLAIN_INTERVAL", "PlainProgress", "format_duration", "progress_bar"]

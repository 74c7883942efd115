"""Progress of long work: one helper for every command (train, encode, generate, prepare, sweep).

On a terminal it is a rich progress bar (description, bar, done/total, the caller's fields such as
``loss`` or ``cells/s``, elapsed time and ETA). When the stream is not a terminal (a SLURM log, a
pipe, CI) it prints plain lines instead, so a log shows progress while the work runs, not only at
its end::

    vae: 300/600 (50%) loss 1.2345 cells/s 512 elapsed 1m02s eta 1m02s

A line is printed at most every ``min_interval_s`` seconds (0: at every update), and always at the
end. ``enabled=False`` makes every method a no-op.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _format_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class Progress:
    """Progress of ``total`` units of work (``completed`` of them done at start)."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, stream: IO[str] | None = None,
                 min_interval_s: float = 10.0, completed: int = 0, fields: tuple[str, ...] = ()) -> None:
        self.total = int(total)
        self.description = description
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = float(min_interval_s)
        self.completed = int(completed)
        self._start_completed = self.completed
        self._fields: dict[str, Any] = {name: "-" for name in fields}
        self._t0 = time.perf_counter()
        self._last_line = -float("inf")
        self._printed = -1  # `completed` shown by the last plain line
        self._bar = None
        if not self.enabled:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in self._fields]
            columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
            self._bar = RichProgress(*columns, console=Console(file=self.stream), transient=False,
                                     refresh_per_second=2)
            self._task = self._bar.add_task(description, total=self.total, completed=self.completed,
                                            **{k: str(v) for k, v in self._fields.items()})
            self._bar.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1, description: str | None = None, **fields: Any) -> None:
        self.update(self.completed + int(n), description, **fields)

    def print(self, line: str) -> None:
        """A message line, above the bar on a terminal (the bar stays at the bottom)."""
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, completed: int | None = None, description: str | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        if completed is not None:
            self.completed = int(completed)
        if description is not None:
            self.description = description
        self._fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, description=self.description,
                             **{k: _format_field(v) for k, v in fields.items()})
            return
        now = time.perf_counter()
        if now - self._last_line >= self.min_interval_s or self.completed >= self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last_line, self._printed = now, self.completed
        elapsed = now - self._t0
        pct = f" ({100.0 * self.completed / self.total:.0f}%)" if self.total > 0 else ""
        parts = [f"{self.description}: {self.completed}/{self.total}{pct}"]
        parts += [f"{k} {_format_field(v)}" for k, v in self._fields.items()]
        parts.append(f"elapsed {_duration(elapsed)}")
        done = self.completed - self._start_completed
        if 0 < done and self.completed < self.total:
            parts.append(f"eta {_duration(elapsed / done * (self.total - self.completed))}")
        print(" ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._printed != self.completed:  # the final state, unless the last line showed it
            self._line(time.perf_counter())
        self.enabled = False

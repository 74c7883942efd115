"""Console output of ``prepare``: a progress bar (rich, on stderr, transient) plus info lines
(hidden when quiet) and warnings."""

from __future__ import annotations

import sys


class Reporter:
    """Progress bar plus info lines (shown only with ``progress``) and warnings (always)."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar = None
        self.console = None

    def start(self) -> None:
        if not self.progress:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=sys.stderr, highlight=False)
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.bar.start()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total) if self.bar is not None else None

    def advance(self, task, n: int = 1, description: str | None = None) -> None:
        if self.bar is not None and task is not None:
            self.bar.update(task, advance=n, **({"description": description} if description else {}))

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        if self.progress:
            self._print(line)

    def warn(self, line: str) -> None:
        self._print(f"warning: {line}")

"""Console output of ``prepare``: one progress bar at a time (:class:`scldm_scale.progress.Progress`:
a bar on a terminal, plain lines in a log), info lines (hidden when quiet) and warnings (always)."""

from __future__ import annotations

import sys

from scldm_scale.progress import Progress


class Reporter:
    """Progress of the current step plus info lines (shown only with ``progress``) and warnings."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.current: Progress | None = None

    def start(self) -> None:
        """Nothing to set up: every :meth:`task` starts its own bar."""

    def stop(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def task(self, description: str, total: int) -> Progress | None:
        """A new step (the previous one's bar ends); None when quiet."""
        self.stop()
        if self.progress:
            self.current = Progress(total, description, stream=sys.stderr)
        return self.current

    def advance(self, task: Progress | None, n: int = 1, description: str | None = None) -> None:
        if task is not None:
            task.advance(n, description)

    def _print(self, line: str) -> None:
        if self.current is not None:
            self.current.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        if self.progress:
            self._print(line)

    def warn(self, line: str) -> None:
        self._print(f"warning: {line}")

"""Progress and cancellation for long commands: a tqdm bar for people, JSON lines for programs.

``--json-progress`` prints one JSON object per line on stdout: ``{"step", "fraction", "message"}``;
the last line is ``{"step": "done", ...}`` or ``{"step": "error", "message": ...}``. The Slicer
module reads exactly this. SIGTERM stops a run like Ctrl-C: the error unwinds through the atomic
writers, so nothing half-written is left.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from .errors import CancelledError


class ProgressPrinter:
    def __init__(self, json_lines: bool, description: str = "maml"):
        self.json_lines = json_lines
        self.bar = None
        self.description = description
        self._last = (None, -1.0)

    def __call__(self, step: str, fraction: float, message: str = "") -> None:
        if self.json_lines:
            # One line per step change or per percent: enough for a progress bar, not a flood.
            if step != self._last[0] or fraction - self._last[1] >= 0.01:
                self.emit({"step": step, "fraction": round(fraction, 4), "message": message})
                self._last = (step, fraction)
            return
        if self.bar is None:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs stay readable)
            self.bar = tqdm(total=100, desc=self.description, file=sys.stderr, disable=None,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        self.bar.n = int(round(100 * fraction))
        self.bar.set_postfix_str(message[:60])
        self.bar.refresh()

    def emit(self, record: dict) -> None:
        print(json.dumps(record), flush=True)

    def finish(self, record: dict) -> None:
        self.close()
        if self.json_lines:
            self.emit(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def sigterm_cancels() -> Iterator[None]:
    """Turns SIGTERM into a CancelledError in the main thread for the duration of the block."""
    def handler(signum, frame):
        raise CancelledError("stopped by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def reported_run(printer: ProgressPrinter) -> Iterator[None]:
    """Ends the JSON stream with an error line when the block fails, then lets the error go on."""
    try:
        with sigterm_cancels():
            yield
    except CancelledError as error:
        printer.finish({"step": "error", "cancelled": True, "message": str(error)})
        raise
    except KeyboardInterrupt:
        printer.finish({"step": "error", "cancelled": True, "message": "cancelled (Ctrl-C)"})
        raise
    except Exception as error:
        printer.finish({"step": "error", "message": str(error).splitlines()[0] if str(error) else
                        type(error).__name__})
        raise

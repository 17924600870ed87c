"""Running the engine's command line as a background process, read through ``--json-progress``.

``EngineProcess`` starts the command in its own process group (a new session on POSIX, a new
process group on Windows), reads its standard output on a thread into a queue and hands the
progress to whoever calls ``poll()`` (the GUI from a QTimer, the console from ``wait()``).
``cancel()`` stops the whole process tree. Non-JSON lines (warnings, tracebacks) go to a capped
log. How the process is started is injectable (``popen``), so tests run a real Python script
that speaks the same protocol.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .errors import CancelledError, MAMLSegmentationError

LOG_LINES = 2000
# Seconds the engine gets to stop cleanly after SIGTERM (it unwinds through its atomic writers and
# exits with EXIT_CANCELLED) before the whole process group is killed.
CANCEL_GRACE_SECONDS = 5.0
# The engine's exit codes (maml.cli): 0 done, 1 error (one line "maml <command>: error: ..." on
# stderr), 130 cancelled (SIGTERM or Ctrl-C).
EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_CANCELLED = 0, 1, 3, 130


@dataclass
class ProgressEvent:
    """One ``--json-progress`` line: step (load, register, inference, statistics, write, done, error)."""

    step: str
    fraction: float | None
    message: str
    data: dict = field(default_factory=dict)   # the whole record (``out``, ``tumor_count``, ``cancelled``)

    @property
    def isFinal(self) -> bool:
        return self.step in ("done", "error")

    @property
    def cancelled(self) -> bool:
        return self.step == "error" and bool(self.data.get("cancelled"))


def parseProgressLine(line: str) -> ProgressEvent | None:
    """A ``--json-progress`` line -> event; None for anything else (a plain log line)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "step" not in data:
        return None
    fraction = data.get("fraction")
    try:
        fraction = None if fraction is None else min(1.0, max(0.0, float(fraction)))
    except (TypeError, ValueError):
        fraction = None
    return ProgressEvent(str(data["step"]), fraction, str(data.get("message", "")), data)


class EngineProcess:
    """One run of an engine command. States: running -> done | failed | cancelled."""

    def __init__(self, command: list, env: dict | None = None, cwd=None, popen=subprocess.Popen,
                 logLines: int = LOG_LINES, onFinished=None):
        self.command = [str(c) for c in command]
        self.log = collections.deque(maxlen=logLines)
        self.state = "created"
        self.returnCode = None
        self.lastEvent: ProgressEvent | None = None
        self.errorMessage = ""
        self._queue: queue.Queue = queue.Queue()
        self._onFinished = onFinished
        self._finishedCalled = False
        self._cancelRequested = False
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.log.append("$ " + subprocess.list2cmdline(self.command))
        try:
            self._process = popen(self.command, **kwargs)
        except OSError as error:
            self.state = "failed"
            self.errorMessage = f"Cannot start the segmentation engine ({self.command[0]}): {error}"
            raise MAMLSegmentationError(self.errorMessage) from error
        self.state = "running"
        self._reader = threading.Thread(target=self._read, name="MAMLSegmentation engine output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read(self) -> None:
        stream = self._process.stdout
        for line in iter(stream.readline, ""):
            self._queue.put(line.rstrip("\r\n"))
        stream.close()
        self._queue.put(None)  # end of output

    def poll(self) -> list:
        """Progress events since the last call (non-blocking); updates ``state`` at the end."""
        events = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._finish()
                break
            event = parseProgressLine(line)
            if event is None:
                if line.strip():
                    self.log.append(line)
                continue
            self.lastEvent = event
            self.log.append(f"[{event.step}] {event.message}".rstrip())
            if event.step == "error":
                self.errorMessage = event.message
            events.append(event)
        return events

    def _finish(self) -> None:
        self.returnCode = self._process.wait()
        last = self.lastEvent
        if self._cancelRequested or self.returnCode == EXIT_CANCELLED or (last is not None and last.cancelled):
            self.state = "cancelled"  # by us, or the engine was stopped from outside (SIGTERM, Ctrl-C)
        elif last is not None and last.step == "done" and self.returnCode in (EXIT_OK, EXIT_ERROR):
            # segment-batch ends with "done" and exit code 1 when some cases failed (see its summary)
            self.state = "done"
        else:
            self.state = "failed"
            tail = [line for line in self.log if not line.startswith(("[", "$ "))]
            errors = [line for line in tail if line.startswith("maml ")
                      and (": error: " in line or ": refused: " in line)]
            if errors:  # the engine's own one line ("maml segment: error: ..." / "...: refused: ...")
                self.errorMessage = errors[-1].split(": error: " if ": error: " in errors[-1]
                                                    else ": refused: ", 1)[1]
            elif not self.errorMessage:
                if self.returnCode == EXIT_OK:
                    self.errorMessage = "the engine ended without reporting its result"
                else:
                    self.errorMessage = (tail[-1] if tail else f"the engine exited with code {self.returnCode}")
        if self._onFinished and not self._finishedCalled:
            self._finishedCalled = True
            self._onFinished(self)

    @property
    def isRunning(self) -> bool:
        return self.state == "running"

    def cancel(self, graceSeconds: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the process and everything it started (SIGTERM to the group, then SIGKILL)."""
        if self.state != "running":
            return
        self._cancelRequested = True
        self.log.append("Cancel requested: stopping the engine.")
        if self._process.poll() is None:
            self._signalTree(terminate=True)
            deadline = time.monotonic() + graceSeconds
            while self._process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        # Children may outlive the leader: always kill what is left of the group.
        self._signalTree(terminate=False)
        self._process.wait()
        self._reader.join(timeout=5)
        self.poll()
        if self.state == "running":  # reader still blocked by an orphaned pipe writer
            self._finish()

    def _signalTree(self, terminate: bool) -> None:
        pid = self._process.pid
        try:
            if sys.platform == "win32":
                if terminate:
                    self._process.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
            else:
                os.killpg(pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def wait(self, timeout: float | None = None, callback=None, interval: float = 0.1) -> str:
        """Block until the process ends (console use); ``callback(event)`` gets each event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.state == "running":
                for event in self.poll():
                    if callback:
                        callback(event)
                if self.state != "running":
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise MAMLSegmentationError(f"The engine did not finish within {timeout} s; it was stopped.")
                time.sleep(interval)
        except KeyboardInterrupt:
            self.cancel()
            raise CancelledError("Segmentation cancelled.") from None
        return self.state

    def logText(self) -> str:
        return "\n".join(self.log)


class EngineRun:
    """An engine command running in the background, polled (a QTimer) until it ends; a subclass
    says in ``_finish`` what its end means (import results, a refusal, an installed model...)."""

    process: EngineProcess
    state: str = "running"

    @property
    def isRunning(self) -> bool:
        return self.state == "running"

    def poll(self) -> list:
        if self.state != "running":
            return []
        events = self.process.poll()
        if self.process.state != "running":
            self._finish()
        return events

    def cancel(self) -> None:
        if self.state == "running":
            self.process.cancel()
            self.poll()
            if self.state == "running":
                self._finish()

    def wait(self, progressCallback=None, timeout: float | None = None):
        """Block until finished; return the outcome (``_outcome``) or raise the error."""
        try:
            self.process.wait(timeout=timeout, callback=progressCallback)
        finally:
            if self.state == "running":
                self.poll()
                if self.state == "running":
                    self._finish()
        if self.error is not None:
            raise self.error
        return self._outcome()

    def _finish(self) -> None:
        raise NotImplementedError

    def _outcome(self):
        raise NotImplementedError

"""Run the engine's command line in a child process and follow its JSON progress lines (no Qt, no Slicer).

The Slicer widgets call `ProcessRunner.poll()` from a QTimer; tests and batch scripts call `wait()`.
Cancelling stops the whole process tree (the PythonSlicer launcher and the Python it starts) and
removes the run's temporary folder.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from synomaly.contract import ERROR_PREFIX, EXIT_FAILED, EXIT_MESSAGES  # standard library only, no torch



class RunState(str, Enum):
    """Where a run stands."""

    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True once the run has ended, whatever the outcome."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


@dataclass
class Progress:
    """One progress line of the engine: {"stage", "done", "total", "message", ...extra}."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> Optional[float]:
        """done / total in [0, 1], or None when the total is unknown."""
        if self.total <= 0:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    @classmethod
    def from_line(cls, line: str) -> Optional["Progress"]:
        """Parse one stdout line; None when it is not a progress record."""
        text = line.strip()
        if not text.startswith("{"):
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
            return None
        extra = {k: v for k, v in record.items() if k not in ("stage", "done", "total", "message")}
        try:
            done, total = int(record.get("done", 0)), int(record.get("total", 0))
        except (TypeError, ValueError):
            done, total = 0, 0
        return cls(record["stage"], done, total, str(record.get("message", "")), extra)

    def describe(self) -> str:
        """A short status text: 'stage done/total message'."""
        counts = f" {self.done}/{self.total}" if self.total > 0 else ""
        message = f": {self.message}" if self.message else ""
        return f"{self.stage}{counts}{message}"


class ProcessRunner:
    """One child process whose stdout carries JSON progress lines and whose stderr carries messages.

    Output is read by two daemon threads into a queue, so `poll()` never blocks. `temp_dir`, if
    given, belongs to the run: it is removed when the run fails or is cancelled, and by `cleanup()`
    (call it once the results have been read) after a success.
    """

    PIPE_GRACE_S = 5.0

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str | os.PathLike] = None,
        temp_dir: Optional[str | os.PathLike] = None,
        stop_grace_s: float = 5.0,
        stderr_lines: int = 200,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.temp_dir = Path(temp_dir) if temp_dir is not None else None
        self.stop_grace_s = stop_grace_s
        self.state = RunState.NOT_STARTED
        self.returncode: Optional[int] = None
        self.last_progress: Optional[Progress] = None
        self.records: list[dict[str, Any]] = []  # JSON lines on stdout that are not progress (summaries)
        self.stdout_other: deque[str] = deque(maxlen=stderr_lines)
        self.stderr_tail: deque[str] = deque(maxlen=stderr_lines)
        self.error_lines: list[str] = []
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._proc: Optional[subprocess.Popen] = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._open_streams = 0
        self._exited_at: Optional[float] = None

    # ------------------------------------------------------------------ running

    def start(self) -> "ProcessRunner":
        """Start the child process in its own process group (session on POSIX)."""
        if self.state is not RunState.NOT_STARTED:
            raise RuntimeError(f"this run has already been started ({self.state.value})")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0
            kwargs["startupinfo"] = info
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            self._proc = subprocess.Popen(
                self.command, env=env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        except OSError as exc:
            self.state = RunState.FAILED
            self.error_lines = [f"cannot start {self.command[0]}: {exc.strerror or exc}"]
            self._remove_temp_dir()
            return self
        self.started_at = time.monotonic()
        self.state = RunState.RUNNING
        self._open_streams = 2
        for name, stream in (("out", self._proc.stdout), ("err", self._proc.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                      name=f"synomaly-{name}-{self._proc.pid}")
            thread.start()
            self._readers.append(thread)
        return self

    def _read(self, name: str, stream) -> None:
        """Reader thread: every line of one stream into the queue, then an end marker."""
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):  # stream closed under us during cancel
            pass
        finally:
            self._queue.put((name, None))

    def poll(self) -> list[Progress]:
        """Progress records that arrived since the last call; updates `state` when the process has ended."""
        events: list[Progress] = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            if name == "out":
                progress = Progress.from_line(line)
                if progress is not None:
                    events.append(progress)
                    self.last_progress = progress
                else:
                    self._keep_stdout(line)
            else:
                self.stderr_tail.append(line)
                if line.startswith(ERROR_PREFIX):
                    self.error_lines.append(line[len(ERROR_PREFIX):].strip())
        if self.state is RunState.RUNNING and self._proc is not None:
            code = self._proc.poll()
            if code is not None:
                # Normally both pipes close with the process; a stray grandchild may hold them open,
                # so an exited process counts as finished after a short grace period regardless.
                if self._exited_at is None:
                    self._exited_at = time.monotonic()
                if self._open_streams <= 0 or time.monotonic() - self._exited_at > self.PIPE_GRACE_S:
                    self._finish(code)
        return events

    def _keep_stdout(self, line: str) -> None:
        """A stdout line that is not progress: a JSON summary record or plain text."""
        text = line.strip()
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                self.records.append(record)
                return
        if text:
            self.stdout_other.append(text)

    def _finish(self, code: int) -> None:
        self.returncode = code
        self.ended_at = time.monotonic()
        for thread in self._readers:
            thread.join(timeout=1.0 if self._open_streams <= 0 else 0.1)
        if code == 0:
            self.state = RunState.SUCCEEDED
        else:
            self.state = RunState.FAILED
            self._remove_temp_dir()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> RunState:
        """Block until the run ends (or `timeout` seconds pass), polling; returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state is RunState.RUNNING:
            self.poll()
            if self.state is not RunState.RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.state

    # ------------------------------------------------------------------ stopping

    @property
    def pid(self) -> Optional[int]:
        """Process id of the direct child, once started."""
        return self._proc.pid if self._proc is not None else None

    def cancel(self, grace_s: Optional[float] = None) -> None:
        """Stop the process tree (politely first, so the engine writes nothing), then remove the temp folder."""
        if self.state is RunState.NOT_STARTED:
            self.state = RunState.CANCELLED
            self._remove_temp_dir()
            return
        if self.state is not RunState.RUNNING or self._proc is None:
            return
        self.state = RunState.CANCELLED
        grace = self.stop_grace_s if grace_s is None else grace_s
        descendants = _descendant_pids(self._proc.pid)
        _signal_tree(self._proc, descendants, polite=True)
        try:
            self._proc.wait(timeout=max(0.0, grace))
        except subprocess.TimeoutExpired:
            pass
        _signal_tree(self._proc, descendants, polite=False)  # whatever is left, including grandchildren
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass
        self.returncode = self._proc.returncode
        self.ended_at = time.monotonic()
        for stream in (self._proc.stdout, self._proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        for thread in self._readers:
            thread.join(timeout=2.0)
        self._remove_temp_dir()

    def cleanup(self) -> None:
        """Remove the temporary folder (idempotent); stops the process first if it still runs."""
        if self.state is RunState.RUNNING:
            self.cancel()
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self.temp_dir is not None and self.temp_dir.exists():
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "ProcessRunner":
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ reporting

    @property
    def elapsed_s(self) -> float:
        """Seconds since the start (until the end, once ended)."""
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    @property
    def error_message(self) -> str:
        """What went wrong, in the engine's words where it gave any; empty unless the run failed."""
        if self.state is not RunState.FAILED:
            return ""
        if self.error_lines:
            return "\n".join(self.error_lines)
        meaningful = [line for line in self.stderr_tail if line.strip()]
        code = self.returncode
        if code is not None and code < 0:
            what = f"the engine was stopped by signal {-code}"
        else:
            what = EXIT_MESSAGES.get(code or EXIT_FAILED, EXIT_MESSAGES[EXIT_FAILED]) + f" (exit code {code})"
        if meaningful:
            return what + ":\n" + "\n".join(meaningful[-15:])
        return what


def _descendant_pids(pid: int) -> list[int]:
    """All descendants of `pid` (best effort: psutil if available, else /proc on Linux)."""
    try:
        import psutil  # optional

        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_tree(proc: subprocess.Popen, descendants: list[int], polite: bool) -> None:
    """SIGTERM (polite) or SIGKILL the child's process group and every known descendant."""
    if os.name == "nt":
        if polite:
            proc.terminate()
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return
    sig = signal.SIGTERM if polite else signal.SIGKILL
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session, so its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass
    for pid in descendants:  # descendants that left the group (setsid) too
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def python_command() -> list[str]:
    """The Python to run the engine with: this interpreter, or PythonSlicer inside the Slicer application
    (where sys.executable is Slicer itself; the same rule as slicer.util.executePythonModule)."""
    exe = Path(sys.executable)
    if "python" in exe.name.lower():
        return [sys.executable]
    launcher = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(exe.parent))
    if not launcher:
        raise RuntimeError("the PythonSlicer executable was not found next to Slicer or on PATH")
    return [launcher]

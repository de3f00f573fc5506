"""Detection and training runs from scene to scene (slicer-core MRML classes, real child processes).

Most tests use the stand-in engine (SynomalyDetect/Testing/Python/synomaly_fake_engine.py), which
speaks the engine's contract without torch; one runs the real engine with a random-weight model.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_support import app_scene, fake_python, quiet_env

from SynomalyDetectLib import bridge, engine, jobs, runner
from SynomalyDetectLib.runner import RunState


@pytest.fixture(autouse=True)
def no_job_folder_is_left(tmp_path_factory, monkeypatch):
    """Each test gets its own temporary root (the jobs' default place); no job folder may remain in it."""
    root = tmp_path_factory.mktemp("temp-root")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield
    left = sorted(p.name for p in root.glob("synomaly-*"))
    assert not left, f"temporary job folders left behind: {left}"


def scan(scene, name="scan", oblique=False, lesion=True):
    """A small head-like volume with a bright lesion, as a volume node."""
    k, j, i = np.mgrid[:10, :40, :40].astype(np.float32)
    body = ((i - 20) ** 2 + (j - 20) ** 2) < 15 ** 2
    array = np.where(body, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, body.shape)
    if lesion:
        array[((i - 25) ** 2 + (j - 15) ** 2 + ((k - 5) * 3) ** 2) < 12] = 400.0
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((0.9, 0.9, 3.0))
    image.SetOrigin((5.0, -7.0, 11.0))
    if oblique:
        c, s = math.cos(0.4), math.sin(0.4)
        image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return bridge.add_volume_from_sitk(scene, image, name)


def detection(scene, volume, outputs=None, options=None, **env):
    job = jobs.DetectionJob(scene, volume, options or jobs.DetectionOptions(), outputs, python=fake_python(),
                            env=quiet_env(**env))
    return job.start()


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_detection_loads_every_output_on_the_input_geometry():
    scene = app_scene()
    volume = scan(scene, oblique=True)
    job = detection(scene, volume)
    assert job.wait(60) is RunState.SUCCEEDED, job.error_message
    result = job.load_results()
    assert {n.GetName() for n in result.created} == {"scan counterfactual", "scan anomaly map", "scan anomalies",
                                                     "scan lesions"}
    for node in (result.counterfactual, result.anomaly_map):
        np.testing.assert_allclose(bridge.ijk_to_ras(node), bridge.ijk_to_ras(volume), atol=1e-6)
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    seg = result.segmentation
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    [(segment_id, name, color)] = bridge.segment_names_and_colors(seg)
    assert name == "Anomaly" and color != (0.5, 0.5, 0.5)
    mask = bridge.segment_array(scene, seg, segment_id, volume)
    assert mask.sum() == result.table.GetTable().GetValueByName(0, "voxels").ToInt() > 0
    assert len(result.lesions) == 1 and result.threshold == pytest.approx(0.5)
    assert not job.temp_dir.exists()


def test_progress_reaches_the_caller():
    scene = app_scene()
    job = detection(scene, scan(scene))
    events = []
    deadline = time.monotonic() + 60
    try:
        while job.state is RunState.RUNNING and time.monotonic() < deadline:
            events += job.poll()
            time.sleep(0.02)
    finally:
        job.cleanup()  # the results are not loaded here, which would remove the job's folder
    stages = [e.stage for e in events]
    assert stages[0] == "prepare" and stages[-1] == "done" and "detect" in stages
    assert all(0 <= e.done <= e.total for e in events)


def test_chosen_nodes_are_reused_and_no_other_node_is_replaced():
    scene = app_scene()
    volume = scan(scene)
    chosen_map = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my map")
    chosen_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    bystander = scan(scene, "other scan", lesion=False)
    bystander_array = bridge.array_from_volume(bystander)
    before = node_ids(scene)
    job = detection(scene, volume, jobs.DetectionOutputs(anomaly_map=chosen_map, table=chosen_table))
    assert job.wait(60) is RunState.SUCCEEDED
    result = job.load_results()
    assert result.anomaly_map is chosen_map and result.table is chosen_table
    assert chosen_map.GetName() == "my map"
    assert len(result.created) == 2
    assert before <= node_ids(scene)  # nothing removed
    np.testing.assert_array_equal(bridge.array_from_volume(bystander), bystander_array)
    np.testing.assert_array_equal(bridge.array_from_volume(volume), bridge.array_from_volume(scan(app_scene())))


def test_input_or_duplicate_outputs_are_refused():
    scene = app_scene()
    volume = scan(scene)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "x")
    with pytest.raises(jobs.JobError, match="must not be the input"):
        detection(scene, volume, jobs.DetectionOutputs(counterfactual=volume))
    with pytest.raises(jobs.JobError, match="different node"):
        detection(scene, volume, jobs.DetectionOutputs(counterfactual=other, anomaly_map=other))
    with pytest.raises(jobs.JobError, match="odd"):
        detection(scene, volume, options=jobs.DetectionOptions(blur=4))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(jobs.JobError, match="holds no image"):
        detection(scene, empty)


def test_cancel_leaves_the_scene_as_it_was_and_removes_temp_files():
    scene = app_scene()
    volume = scan(scene)
    before = node_ids(scene)
    job = detection(scene, volume, FAKE_SYNOMALY_DELAY="0.3")
    deadline = time.monotonic() + 30
    while job.runner.last_progress is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.state is RunState.RUNNING and job.temp_dir.exists()
    job.cancel()
    assert job.state is RunState.CANCELLED
    assert not job.temp_dir.exists()
    assert node_ids(scene) == before
    with pytest.raises(jobs.JobError):
        job.load_results()


def test_engine_failure_leaves_the_scene_unchanged_with_the_engines_message():
    scene = app_scene()
    volume = scan(scene)
    before = node_ids(scene)
    job = detection(scene, volume, FAKE_SYNOMALY_FAIL="5")
    assert job.wait(60) is RunState.FAILED
    assert job.error_message == "fake failure requested"
    assert node_ids(scene) == before and not job.temp_dir.exists()


def test_unreadable_results_create_no_nodes(monkeypatch):
    scene = app_scene()
    volume = scan(scene)
    before = node_ids(scene)
    job = detection(scene, volume)
    assert job.wait(60) is RunState.SUCCEEDED
    (job.temp_dir / "results" / "lesions.csv").write_text("garbage\n")
    with pytest.raises(bridge.BridgeError):
        job.load_results()
    assert node_ids(scene) == before and not job.temp_dir.exists()


def test_detection_options_become_engine_arguments():
    args = jobs.DetectionOptions(model="brain", fpr=1e-3, t=150, stages=3, blur=7, min_size_mm3=20.0, seed=4,
                                 device="cpu").cli_args()
    assert args == ["--model", "brain", "--fpr", "0.001", "--t", "150", "--stages", "3", "--blur", "7",
                    "--min-size", "20.0", "--seed", "4", "--device", "cpu"]
    explicit = jobs.DetectionOptions(threshold=0.3).cli_args()
    assert "--threshold" in explicit and "--fpr" not in explicit and "--t" not in explicit
    assert "--region" not in explicit  # the model card's region unless one is asked for
    assert jobs.DetectionOptions(region="foreground").cli_args()[2:4] == ["--region", "foreground"]


def test_the_result_says_where_it_scored_and_what_went_wrong():
    """The panel's status line ends with these notes: the region (brain or not) and the engine's warnings."""
    brain = jobs.DetectionResult(None, None, None, None, report={"region": "brain", "warnings": []})
    assert brain.notes == ["Only the brain was scored (a registered atlas)."]
    refused = jobs.DetectionResult(None, None, None, None, report={
        "region": "foreground", "warnings": ["brain region not used: only 40 % of it lies inside; scoring the whole "
                                             "foreground", "sizes are in pixels."]})
    assert refused.notes == ["Warning: brain region not used: only 40 % of it lies inside; scoring the whole "
                             "foreground.", "Warning: sizes are in pixels."]
    assert jobs.DetectionResult(None, None, None, None).notes == []


def test_real_engine_results_are_loaded_into_the_scene(tiny_model_file):
    """The real `synomaly detect` (random-weight model, CPU) through the runner into MRML nodes."""
    scene = app_scene()
    volume = scan(scene, oblique=True)
    options = jobs.DetectionOptions(model=str(tiny_model_file), fpr=None, threshold=0.05, stages=1, device="cpu")
    job = jobs.DetectionJob(scene, volume, options, python=[sys.executable],
                            env=engine.engine_environment(quiet_env()))
    job.start()
    assert job.wait(300) is RunState.SUCCEEDED, job.error_message
    result = job.load_results()
    for node in (result.counterfactual, result.anomaly_map):
        np.testing.assert_allclose(bridge.ijk_to_ras(node), bridge.ijk_to_ras(volume), atol=1e-4)
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert result.segmentation.GetSegmentation().GetNumberOfSegments() >= 1
    assert result.table.GetTable().GetNumberOfColumns() >= len(bridge.LESION_COLUMNS)
    assert result.threshold == pytest.approx(0.05)
    assert not job.temp_dir.exists()


# ---------------------------------------------------------------- training


def training(scene, options, volumes, tmp_path, resume=False, **env):
    models = tmp_path / "models"
    job = jobs.TrainingJob(scene, options, volumes, python=fake_python(),
                           env=quiet_env(SYNOMALY_MODELS_DIR=str(models), **env),
                           checkpoint=engine.checkpoint_path(options.name, models), resume=resume)
    return job.start()


def test_training_installs_the_model_and_draws_the_loss(tmp_path):
    scene = app_scene()
    job = training(scene, jobs.TrainingOptions("site-a", iterations=10), [scan(scene, lesion=False)], tmp_path)
    assert job.wait(60) is RunState.SUCCEEDED, job.error_message
    assert (tmp_path / "models" / "site-a.safetensors").exists()
    table = job.loss_table.GetTable()
    assert table.GetNumberOfRows() == 10
    assert table.GetValue(9, 1).ToDouble() == pytest.approx(0.1)
    assert table.GetValue(4, 2).ToDouble() == pytest.approx(1.2 / 5)
    assert not job.checkpoint.exists() and not job.temp_dir.exists()
    assert job.summary.get("iterations") == 10


def test_training_cancel_keeps_a_checkpoint_and_resume_continues(tmp_path):
    scene = app_scene()
    volume = scan(scene, lesion=False)
    before = node_ids(scene)
    options = jobs.TrainingOptions("site-b", iterations=40)
    job = training(scene, options, [volume], tmp_path, FAKE_SYNOMALY_DELAY="0.1")
    deadline = time.monotonic() + 60
    while job.loss_table.GetTable().GetNumberOfRows() < 3 and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    job.cancel()
    assert job.state is RunState.CANCELLED
    assert node_ids(scene) == before  # loss table (and chart) of the cancelled run removed
    assert job.can_resume and not job.temp_dir.exists()
    resumed = training(scene, options, [volume], tmp_path, resume=True)
    assert resumed.wait(60) is RunState.SUCCEEDED, resumed.error_message
    rows = resumed.loss_table.GetTable().GetNumberOfRows()
    assert 0 < rows < 40  # continued from the checkpoint, not from the start
    assert (tmp_path / "models" / "site-b.safetensors").exists()


def test_training_refuses_bad_requests(tmp_path):
    scene = app_scene()
    with pytest.raises(jobs.JobError, match="not a usable model name"):
        training(scene, jobs.TrainingOptions("../evil"), [scan(scene)], tmp_path)
    with pytest.raises(jobs.JobError, match="choose healthy scans"):
        training(scene, jobs.TrainingOptions("ok"), [], tmp_path)
    with pytest.raises(jobs.JobError, match="no checkpoint"):
        training(scene, jobs.TrainingOptions("never-trained"), [scan(scene)], tmp_path, resume=True)


def test_training_failure_is_reported(tmp_path):
    scene = app_scene()
    job = training(scene, jobs.TrainingOptions("site-c"), [scan(scene)], tmp_path, FAKE_SYNOMALY_FAIL="2")
    assert job.wait(60) is RunState.FAILED
    assert job.error_message == "fake training failure requested"
    assert not (tmp_path / "models" / "site-c.safetensors").exists()


def test_training_options_become_engine_arguments():
    args = jobs.TrainingOptions("m", base="brain-mri-axial", iterations=500, batch_size=8, lr=1e-5).cli_args()
    assert args == ["--name", "m", "--iterations", "500", "--batch-size", "8", "--lr", "1e-05", "--device", "auto",
                    "--seed", "0", "--base", "brain-mri-axial"]


def test_tuning_installs_the_tuned_model_without_touching_a_training_checkpoint(tmp_path):
    scene = app_scene()
    models = tmp_path / "models"
    checkpoint = engine.checkpoint_path("site-t", models)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text('{"iteration": 3}')  # an interrupted training run of the same name
    volumes = [scan(scene, "healthy-1", lesion=False), scan(scene, "healthy-2", lesion=False)]
    before = node_ids(scene)
    job = jobs.TuningJob(scene, jobs.TrainingOptions("site-t", base="brain-mri-axial"), volumes,
                         python=fake_python(), env=quiet_env(SYNOMALY_MODELS_DIR=str(models)), checkpoint=checkpoint)
    events = []
    job.start()
    deadline = time.monotonic() + 60
    while job.state is RunState.RUNNING and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    assert job.state is RunState.SUCCEEDED, job.error_message
    assert (models / "site-t.safetensors").read_bytes() == b"fake tuned model brain-mri-axial 2"
    assert any(e.stage == "tune" for e in events) and events[-1].stage == "done"
    assert checkpoint.exists(), "tuning must not delete another run's checkpoint"
    assert job.loss_table is None and not job.can_resume and not job.temp_dir.exists()
    assert node_ids(scene) == before  # no chart or table for tuning


def test_tuning_needs_a_model_to_tune(tmp_path):
    scene = app_scene()
    with pytest.raises(jobs.JobError, match="choose the model to tune"):
        jobs.TuningJob(scene, jobs.TrainingOptions("site-u"), [scan(scene, lesion=False)], python=fake_python())


# ---------------------------------------------------------------- engine commands without scene work


def test_demo_data_is_written_in_the_background_with_progress(tmp_path):
    job = jobs.demo_data_job(tmp_path / "demo", fake_python(), quiet_env(FAKE_SYNOMALY_DELAY="0.2")).start()
    assert job.state is RunState.RUNNING  # start() returns at once: the GUI thread is not held
    events = []
    deadline = time.monotonic() + 60
    while job.state is RunState.RUNNING and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    assert job.state is RunState.SUCCEEDED, job.error_message
    assert [(e.stage, e.done, e.total) for e in events] == [("demo", 1, 2), ("demo", 2, 2)]
    assert job.result() == tmp_path / "demo" / "demo_lesion.nrrd" and job.result().is_file()


def test_demo_data_can_be_cancelled_and_then_has_no_result(tmp_path):
    job = jobs.demo_data_job(tmp_path / "demo", fake_python(), quiet_env(FAKE_SYNOMALY_DELAY="30")).start()
    time.sleep(0.5)
    job.cancel()
    assert job.state is RunState.CANCELLED
    assert not (tmp_path / "demo" / "demo_lesion.nrrd").exists()
    with pytest.raises(jobs.JobError, match="cancelled"):
        job.result()


def test_a_failing_engine_command_raises_the_engines_message(tmp_path):
    job = jobs.demo_data_job(tmp_path / "demo", fake_python(), quiet_env(FAKE_SYNOMALY_FAIL="3"))
    with pytest.raises(jobs.JobError, match="fake demo failure requested"):
        jobs.run_to_end(job, 60)


def test_adding_a_model_runs_through_the_same_runner(tmp_path):
    source = tmp_path / "site-model.safetensors"
    source.write_bytes(b"model")
    started = []

    def factory(command, **kwargs):
        started.append(command)
        return runner.ProcessRunner(command, **kwargs)

    job = jobs.add_model_job(source, fake_python(), quiet_env(SYNOMALY_MODELS_DIR=str(tmp_path / "models")),
                             runner_factory=factory)
    assert jobs.run_to_end(job, 60) == "site-model"
    assert started and started[0][-4:] == ["install-model", str(source), "--name", "site-model"]
    assert (tmp_path / "models" / "site-model.safetensors").read_bytes() == b"model"
    with pytest.raises(RuntimeError, match="not a model file"):
        jobs.add_model_job(tmp_path / "notes.txt", fake_python())

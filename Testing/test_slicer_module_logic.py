"""Smoke tests of the module files' Logic classes outside the Slicer application.

slicer-core provides MRML but not the application layer (Qt, ScriptedLoadableModule, the parameter
node wrapper), so those are replaced here by minimal stand-ins; the MRML scene, the library and the
engine processes are real. The widgets themselves can only be exercised inside Slicer (self-tests).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import types
import typing
import unittest

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_support import ROOT, app_scene, fake_python, slicer

from SynomalyDetectLib import bridge, jobs


def _stub_parameter_node_wrapper():
    module = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, low, high):
            self.low, self.high = low, high

    def parameterNodeWrapper(cls):
        annotations = typing.get_type_hints(cls, include_extras=True)

        class Wrapped:
            def __init__(self, node):
                self.parameterNode = node
                for name, annotation in annotations.items():
                    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
                    if hasattr(cls, name):
                        value = copy.copy(getattr(cls, name))
                    elif typing.get_origin(base) is list:
                        value = []
                    else:
                        value = None
                    setattr(self, name, value)

        Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
        Wrapped.fields = tuple(annotations)
        Wrapped.annotations = annotations
        return Wrapped

    module.Choice, module.WithinRange, module.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper
    return module


def _stub_scripted_loadable_module():
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


@pytest.fixture
def slicer_app(monkeypatch, tmp_path):
    """The application layer of Slicer replaced by stand-ins; a real MRML scene as slicer.mrmlScene."""
    scene = app_scene()
    app = types.SimpleNamespace(temporaryPath=str(tmp_path / "tmp"), cachePath=str(tmp_path / "cache"),
                                connect=lambda *args: None)
    os.makedirs(app.temporaryPath)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in (("qt", types.ModuleType("qt")), ("ctk", types.ModuleType("ctk")), ("slicer.i18n", i18n),
                         ("slicer.ScriptedLoadableModule", _stub_scripted_loadable_module()),
                         ("slicer.parameterNodeWrapper", _stub_parameter_node_wrapper())):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "resetSliceViews", lambda: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # engine processes inherit Slicer's environment
    for name in ("SynomalyDetect", "SynomalyTraining", "SynomalyDetectLib.panel"):  # re-imported with these stand-ins
        monkeypatch.delitem(sys.modules, name, raising=False)
    return scene


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / name / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def demo_volume(scene):
    k, j, i = np.mgrid[:8, :32, :32].astype(np.float32)
    array = np.where((i - 16) ** 2 + (j - 16) ** 2 < 144, 100.0, 0.0)
    array[(i - 20) ** 2 + (j - 12) ** 2 + ((k - 4) * 3) ** 2 < 9] = 400.0
    return bridge.add_volume_from_sitk(scene, sitk.GetImageFromArray(array.astype(np.float32)), "demo")


def test_detect_module_parameter_node_defaults_and_options(slicer_app):
    module = load_module("SynomalyDetect")
    params = module.SynomalyDetectLogic(python=fake_python()).getParameterNode()
    assert params.sensitivityMode == module.FPR_MODE and params.falsePositiveRate == 0.001
    assert params.outputSegmentation is None and params.showResults is True
    options = module.SynomalyDetectLogic.optionsFromParameters(params)
    assert options.fpr == 0.001 and options.threshold is None and options.device == "auto"
    params.sensitivityMode, params.threshold = module.THRESHOLD_MODE, 0.4
    options = module.SynomalyDetectLogic.optionsFromParameters(params)
    assert options.fpr is None and options.threshold == 0.4


def test_the_panel_offers_every_region_the_engine_scores_and_defaults_to_the_models(slicer_app):
    """The region choice maps onto contract.REGIONS; its default sends none, so the model card decides."""
    from synomaly.contract import REGIONS

    module = load_module("SynomalyDetect")
    params = module.SynomalyDetectLogic(python=fake_python()).getParameterNode()
    assert params.region == module.REGION_DEFAULT
    assert module.SynomalyDetectLogic.optionsFromParameters(params).region == ""
    assert sorted(v for v in module.REGION_CHOICES.values() if v) == sorted(REGIONS)
    for label, region in module.REGION_CHOICES.items():
        params.region = label
        options = module.SynomalyDetectLogic.optionsFromParameters(params)
        assert options.region == region and not options.problems()


def test_detect_panel_ranges_are_the_engines(slicer_app):
    """The panel's number fields accept what `synomaly detect` accepts (0: the model's default) and no more
    where the engine has a bound: the ranges come from contract.DETECTION_SETTINGS."""
    from synomaly.contract import DETECTION_SETTING

    module = load_module("SynomalyDetect")
    fields = {"noiseLevel": "t", "stages": "max_stages", "blurKernel": "blur_kernel", "threshold": "threshold",
              "minLesionSize": "min_lesion_mm3", "seed": "seed"}
    for field, name in fields.items():
        annotation = module.SynomalyDetectParameterNode.annotations[field]
        limits = typing.get_args(annotation)[1]
        setting = DETECTION_SETTING[name]
        assert setting.problem(limits.high if not setting.odd else limits.high - (limits.high % 2 == 0)) is None, field
        if setting.high is not None:
            assert limits.high == setting.high and setting.problem(limits.high + 1) is not None, field
        if setting.low is not None and limits.low != 0:
            assert limits.low == setting.low, field


def test_detect_module_logic_runs_a_detection_and_reviews_it(slicer_app):
    module = load_module("SynomalyDetect")
    logic = module.SynomalyDetectLogic(python=fake_python())
    params = logic.getParameterNode()
    params.inputVolume = demo_volume(slicer_app)
    job = logic.startDetection(params)
    assert job.wait(60).value == "succeeded", job.error_message
    result = logic.finishDetection(job, showResults=True)
    assert len(result.created) == 4 and len(result.lesions) == 1
    assert slicer_app.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement() == \
        slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    lesion = logic.jumpToLesion(result.lesions[0], result.segmentation)
    red = next(slicer_app.GetNthNodeByClass(i, "vtkMRMLSliceNode") for i in range(3)
               if slicer_app.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName() == "Red")
    assert red.GetSliceOffset() == pytest.approx(lesion.centroid_ras[2])


def test_detect_module_logic_process_reports_engine_errors(slicer_app):
    module = load_module("SynomalyDetect")
    logic = module.SynomalyDetectLogic(python=fake_python(), extraEnvironment={"FAKE_SYNOMALY_FAIL": "2"})
    with pytest.raises(RuntimeError, match="fake failure requested"):
        logic.process(demo_volume(slicer_app), jobs.DetectionOptions(), timeout=60)


def test_detect_module_lists_models_from_the_engine_registry(slicer_app, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNOMALY_MODELS_DIR", str(tmp_path / "models"))
    module = load_module("SynomalyDetect")
    models = module.SynomalyDetectLogic.listModels()
    assert isinstance(models, list)
    assert all({"name", "path", "source"} <= set(m) for m in models)


def training_logic(models):
    """The Training module's logic with the stand-in engine and `models` as the user model folder."""
    load_module("SynomalyDetect")
    module = load_module("SynomalyTraining")
    return module.SynomalyTrainingLogic(python=fake_python(), extraEnvironment={"SYNOMALY_MODELS_DIR": str(models)})


def test_training_defaults_are_the_engines_in_the_panel_the_jobs_and_the_command_line(slicer_app):
    from synomaly.cli import build_parser
    from synomaly.settings import TrainingSettings

    engine = TrainingSettings()
    cli = build_parser().parse_args(["train", "--data", "scan.nii.gz", "-o", "model.safetensors"])
    options = jobs.TrainingOptions(name="model")
    params = load_module("SynomalyTraining").SynomalyTrainingLogic().getParameterNode()
    assert (cli.iterations, cli.batch_size, cli.lr) == (engine.iterations, engine.batch_size, engine.lr)
    assert (options.iterations, options.batch_size, options.lr, options.seed) == \
        (engine.iterations, engine.batch_size, engine.lr, engine.seed)
    assert (params.iterations, params.batchSize, params.learningRate) == (engine.iterations, engine.batch_size, engine.lr)


def test_training_refreshes_the_detect_panel_only_if_it_exists(slicer_app, monkeypatch):
    training = load_module("SynomalyTraining")

    created, refreshed = [], []

    class DetectModule:
        def widgetRepresentation(self):  # Slicer creates the panel here when it does not exist yet
            created.append(True)
            return types.SimpleNamespace(self=lambda: types.SimpleNamespace(refreshModels=lambda: None))

    modules = types.SimpleNamespace(synomalydetect=DetectModule())
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    training._refreshDetectModule()  # panel never opened: nothing happens
    assert not created, "the Detect panel was created"
    modules.SynomalyDetectWidget = types.SimpleNamespace(refreshModels=lambda: refreshed.append(True))
    training._refreshDetectModule()
    assert refreshed == [True]


def test_training_module_logic_trains_installs_and_removes(slicer_app, tmp_path):
    logic = training_logic(tmp_path / "models")
    params = logic.getParameterNode()
    assert params.trainingVolumes == [] and params.baseModel == ""
    params.trainingVolumes = [demo_volume(slicer_app)]
    params.modelName, params.iterations = "smoke", 10
    job = logic.startTraining(params)
    assert job.wait(60).value == "succeeded", job.error_message
    assert logic.modelExists("smoke") and not logic.checkpointExists("smoke")
    charts = slicer_app.GetNumberOfNodesByClass("vtkMRMLPlotChartNode")
    assert charts == 1
    logic.removeModel("smoke")
    assert not logic.modelExists("smoke")


def test_training_module_logic_tunes_the_base_model_and_installs_it(slicer_app, tmp_path):
    models = tmp_path / "models"
    logic = training_logic(models)
    params = logic.getParameterNode()
    params.trainingVolumes = [demo_volume(slicer_app)]
    params.modelName, params.baseModel = "site-tuned", "brain-mri-axial"
    job = logic.startTuning(params)
    assert job.wait(60).value == "succeeded", job.error_message
    assert logic.modelExists("site-tuned")
    assert (models / "site-tuned.safetensors").read_bytes().startswith(b"fake tuned model brain-mri-axial")


def test_the_detect_panel_starts_at_the_models_own_false_positive_rate():
    from SynomalyDetectLib import engine

    assert engine.default_fpr({"name": "m", "card": {"detection": {"fpr": 1e-4}}}) == 1e-4
    assert engine.default_fpr({"name": "m", "card": {"detection": {}}}) == 1e-3  # cards before tuning
    assert engine.default_fpr({"name": "m", "error": "unreadable"}) is None


def test_add_model_from_file_converts_the_authors_checkpoint_and_installs_ours(slicer_app, tmp_path, tiny_model_file):
    """'Add model from file...': the real engine converts a .pt in the authors' format, copies our .safetensors,
    refuses code in a pickle and files that are no models, and an uncalibrated model gets its card's threshold."""
    from test_upstream import SMALL_ARGS, write_authors_checkpoint

    from SynomalyDetectLib import engine

    module = load_module("SynomalyDetect")
    models = tmp_path / "models"
    logic = module.SynomalyDetectLogic(python=[sys.executable], extraEnvironment={"SYNOMALY_MODELS_DIR": str(models),
                                                                                  "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "best_model.pt"
    write_authors_checkpoint(ckpt, dict(SMALL_ARGS, dataset="brats23"))
    assert logic.addModelFromFile(str(ckpt)) == "best_model"
    with pytest.raises(RuntimeError, match="--overwrite"):
        logic.addModelFromFile(str(ckpt))
    assert logic.addModelFromFile(str(ckpt), overwrite=True) == "best_model"
    assert logic.addModelFromFile(str(tiny_model_file)) == "tiny"

    os.environ["SYNOMALY_MODELS_DIR"] = str(models)
    try:
        entries = {m["name"]: m for m in module.SynomalyDetectLogic.listModels()}
    finally:
        del os.environ["SYNOMALY_MODELS_DIR"]
    imported = entries["best_model"]
    assert imported["source"] == "user" and imported["card"]["network"]["architecture"] == "guided-diffusion.UNetModel"
    assert engine.uncalibrated_threshold(imported) == 0.25
    assert engine.uncalibrated_threshold(entries["brain-mri-axial"]) is None  # calibrated: FPR mode stays

    marker = tmp_path / "code-was-run"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode()
                     + b"\x85R.")
    with pytest.raises(RuntimeError):
        logic.addModelFromFile(str(evil))
    assert not marker.exists(), "adding a model executed code"
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(RuntimeError, match="not a model file"):
        logic.addModelFromFile(str(tmp_path / "notes.txt"))
    assert sorted(p.name for p in models.glob("*.safetensors")) == ["best_model.safetensors", "tiny.safetensors"]


class _Widget(types.SimpleNamespace):
    """A Qt widget stand-in: attributes only (enabled, text, value, ...); show/hide set `visible`."""

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class _Timer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class _ScriptedJob:
    """A job that reports the given progress records, then ends in `final` on the next poll."""

    def __init__(self, events, final):
        self.events, self.final = list(events), final
        self.state = jobs.RunState.RUNNING
        self.error_message = "the engine said no" if final is jobs.RunState.FAILED else ""
        self.cancelled = False

    def poll(self):
        if self.events:
            return [self.events.pop(0)]
        self.state = self.final
        return []

    def cancel(self):
        self.cancelled = True
        self.state = jobs.RunState.CANCELLED


def job_panel(slicer_app, monkeypatch):
    """A JobPanel subclass with stand-in widgets (the Qt layer is not in slicer-core), recording what it is told."""
    from SynomalyDetectLib import panel

    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)

    class Panel(panel.JobPanel):
        LOCKED_SECTIONS = ("settings",)

        def __init__(self):
            super().__init__()
            self.ui = types.SimpleNamespace(progressBar=_Widget(value=0, maximum=0, format="", visible=False),
                                            statusLabel=_Widget(text=""), settings=_Widget(enabled=True))
            self._timer = _Timer()
            self.succeeded, self.updates = [], 0

        def updateButtons(self, caller=None, event=None):
            self.updates += 1
            self.lockWhileRunning()

        def onJobSucceeded(self, job):
            self.succeeded.append(job)

    return Panel(), errors


def test_the_job_panel_follows_a_job_to_success(slicer_app, monkeypatch):
    p, errors = job_panel(slicer_app, monkeypatch)
    job = _ScriptedJob([jobs.Progress("detect", 3, 10, "slice 3 of 10")], jobs.RunState.SUCCEEDED)
    p.followJob(job, "starting")
    p.updateButtons()
    assert p.ui.progressBar.visible and p._timer.active and p.ui.statusLabel.text == "starting"
    assert p.ui.settings.enabled is False  # locked while the job runs
    p.onPoll()
    assert (p.ui.progressBar.value, p.ui.progressBar.maximum, p.ui.progressBar.format) == (3, 10, "detect %p%")
    assert "slice 3 of 10" in p.ui.statusLabel.text and not p.succeeded
    p.onPoll()
    assert p.succeeded == [job] and not errors
    assert not p._timer.active and not p.ui.progressBar.visible and p._job is None
    assert p.ui.settings.enabled is True


def test_the_job_panel_reports_a_failure_and_cancels(slicer_app, monkeypatch):
    p, errors = job_panel(slicer_app, monkeypatch)
    p.followJob(_ScriptedJob([], jobs.RunState.FAILED), "starting")
    p.onPoll()
    assert p.ui.statusLabel.text == "Failed." and len(errors) == 1 and "the engine said no" in errors[0]
    assert not p.succeeded and p.ui.settings.enabled is True
    running = _ScriptedJob([], jobs.RunState.SUCCEEDED)
    p.followJob(running, "starting")
    p._cancelJob()
    assert running.cancelled and p._job is None and not p._timer.active and not p.ui.progressBar.visible
    p.onPoll()  # a poll after the cancel does nothing
    assert not p.succeeded and len(errors) == 1

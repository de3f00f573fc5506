import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    Choice,
    WithinRange,
    parameterNodeWrapper,
)

from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from SynomalyDetectLib import bridge, engine, jobs, review, runner

FPR_MODE = "Calibrated false-positive rate"
THRESHOLD_MODE = "Explicit threshold"
DEVICES = ["auto", "cpu", "cuda", "mps"]
SAMPLE_NAME = "SynomalyDemoLesion"

#: Parameter-node fields that the widget sets itself (no SlicerParameterName widget): the model
#: combo box lists the registry, which changes at run time, so it cannot use a static Choice.
CODE_MANAGED_PARAMETERS = ("modelName",)


#
# SynomalyDetect
#


class SynomalyDetect(ScriptedLoadableModule):
    """Find what does not belong in a scan: a diffusion model trained on healthy scans heals it, the difference is the anomaly."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synomaly Detect")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SynomalyExtension maintainers (Synomaly project)"]
        self.parent.helpText = _("""
Unsupervised anomaly detection: a diffusion model that has only seen healthy scans "heals" the input
(Synomaly noise and multi-stage diffusion, Bi et al., Medical Image Analysis 2025). Where the healed
(counterfactual) image differs from the input, there is an anomaly. Outputs: a segmentation of the
anomalies, the counterfactual volume, the anomaly map and a table of lesions.
See the <a href="https://github.com/synomaly/SlicerSynomaly#readme">documentation</a>.
<b>Research use only; not for diagnosis.</b>
""")
        self.parent.acknowledgementText = _("""
Method: C. Bi et al., "Synomaly noise and multi-stage diffusion: a novel approach for unsupervised
anomaly detection in medical images", Medical Image Analysis 2025 (arXiv 2411.04004). Networks from MONAI.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData():
    """Add the demo case (a healthy template with an implanted lesion, written by the engine) to Sample Data."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataCategory("Synomaly", title=_("Synomaly"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Synomaly",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, f"{SAMPLE_NAME}.png"),
        uris=[],  # nothing is downloaded: the engine writes the case locally
        fileNames=[],
        nodeNames=[],
        customDownloader=lambda source: loadDemoSample(),
    )


def loadDemoSample():
    """Write the demo case with the engine (once, into Slicer's cache; in the background, cancellable) and load it."""
    with slicer.util.tryWithErrorDisplay(_("Could not create the Synomaly demo case.")):
        return SynomalyDetectLogic().loadDemoVolume(
            wait=lambda job: followWithProgressDialog(job, _("Writing the Synomaly demo case...")))


def followWithProgressDialog(job, label: str):
    """Follow a started engine job in a progress dialog with Cancel while Slicer stays responsive
    (the engine runs in its own process, as a detection does); the job's result, or an error."""
    import time

    dialog = qt.QProgressDialog(label, _("Cancel"), 0, 0, slicer.util.mainWindow())
    dialog.setWindowModality(qt.Qt.WindowModal)
    dialog.minimumDuration = 0
    dialog.show()
    try:
        while True:
            for event in job.poll():
                if event.total > 0:
                    dialog.maximum, dialog.value = event.total, event.done
                dialog.labelText = f"{label}\n{event.describe()}"
            if job.state is not runner.RunState.RUNNING:
                break
            if dialog.wasCanceled:
                job.cancel()
                raise jobs.JobError(_("Cancelled."))
            slicer.app.processEvents()
            time.sleep(0.05)
    finally:
        dialog.close()
    return job.result()


#
# SynomalyDetectParameterNode
#


FPR_CHOICES = [0.01, 0.001, 0.0001]  # per-voxel false-positive rates the panel offers


@parameterNodeWrapper
class SynomalyDetectParameterNode:
    """
    inputVolume - the scan to analyse.
    modelName - registry name of the model (empty: the engine's default model).
    sensitivityMode - a calibrated false-positive rate or an explicit anomaly-map threshold.
    falsePositiveRate - target fraction of healthy voxels flagged (from the model's calibration).
    threshold - explicit anomaly-map threshold.
    noiseLevel, stages, blurKernel - diffusion noise step t, number of stages, blur kernel (0: model default).
    minLesionSize - smallest lesion kept, mm^3 (0: engine default).
    seed - random seed (same seed, same result).
    device - auto, cpu, cuda or mps.
    showResults - show the results side by side when done.
    outputSegmentation, outputCounterfactual, outputAnomalyMap, outputTable - chosen output nodes (empty: create new).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    sensitivityMode: Annotated[str, Choice([FPR_MODE, THRESHOLD_MODE])] = FPR_MODE
    falsePositiveRate: Annotated[float, Choice(FPR_CHOICES)] = 0.001
    threshold: Annotated[float, WithinRange(0.0, 100.0)] = 0.25
    noiseLevel: Annotated[int, WithinRange(0, 999)] = 0
    stages: Annotated[int, WithinRange(0, 10)] = 0
    blurKernel: Annotated[int, WithinRange(0, 63)] = 0
    minLesionSize: Annotated[float, WithinRange(0.0, 1000000.0)] = 0.0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(DEVICES)] = "auto"
    showResults: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    outputCounterfactual: vtkMRMLScalarVolumeNode
    outputAnomalyMap: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode


#
# SynomalyDetectWidget
#


class SynomalyDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: reads the GUI, starts and polls the logic's job, shows results."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._result = None
        self._lesionIndex = -1
        self._models = []
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SynomalyDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SynomalyDetectLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.nextLesionButton.connect("clicked(bool)", lambda: self.onJumpLesion(+1))
        self.ui.previousLesionButton.connect("clicked(bool)", lambda: self.onJumpLesion(-1))
        self.ui.progressBar.hide()

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        """Called when the application closes: stop a running engine and its temporary files."""
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self._result = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SynomalyDetectParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModelInComboBox(self._parameterNode.modelName)
            self._checkCanApply()

    # -------------------------------------------------------------- models

    def refreshModels(self) -> None:
        """List the registry's models (user models first) in the model combo box."""
        self._models = self.logic.listModels()
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in self._models:
            label = entry["name"] + ("" if entry.get("source") != "user" else _(" (user)"))
            combo.addItem(label, entry["name"])
        combo.blockSignals(wasBlocked)
        self._selectModelInComboBox(self._parameterNode.modelName if self._parameterNode else "")

    def onAddModel(self) -> None:
        """Ask for a model file (ours, or the authors' .pt checkpoint), add it to the user models, select it."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Add a Synomaly model"), "",
            _("Model files (*.safetensors *.pt *.pth);;All files (*)"))
        if not path:
            return
        name = engine.model_name_for_file(path)
        overwrite = False
        if any(m["name"] == name and m.get("source") == "user" for m in self._models):
            if not slicer.util.confirmYesNoDisplay(_("A user model named '{name}' exists. Replace it?").format(name=name)):
                return
            overwrite = True
        with slicer.util.tryWithErrorDisplay(_("The model could not be added.")):
            if engine.missing_packages():
                self.logic.ensureDependencies()
            job = self.logic.startAddModel(path, overwrite=overwrite)
            added = followWithProgressDialog(job, _("Adding model {name}...").format(name=name))
            self.refreshModels()
            self._selectModelInComboBox(added)
            slicer.util.showStatusMessage(_("Model {name} added").format(name=added), 3000)

    def _selectModelInComboBox(self, name: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(name or engine.default_model_name())
        if index < 0 and combo.count > 0:
            index = 0
        combo.currentIndex = index
        self.onModelChanged(index)

    def _currentModelEntry(self):
        index = self.ui.modelComboBox.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    def onModelChanged(self, index: int) -> None:
        entry = self._currentModelEntry()
        if entry:
            self.ui.modelCardLabel.text = engine.model_summary(entry)
        else:
            self.ui.modelCardLabel.text = _("No model found. Train one in Synomaly Training or install a model file "
                                            "(synomaly install-model).")
        if self._parameterNode and entry and self._parameterNode.modelName != entry["name"]:
            self._parameterNode.modelName = entry["name"]
            # a newly chosen model starts at its own (tuned) operating point when the panel offers it
            default = engine.default_fpr(entry)
            if default in FPR_CHOICES:
                self._parameterNode.falsePositiveRate = default
            fallback = engine.uncalibrated_threshold(entry)
            if fallback is not None:  # e.g. an imported model: use its card's threshold rather than refuse to run
                self._parameterNode.sensitivityMode = THRESHOLD_MODE
                self._parameterNode.threshold = fallback
        self._checkCanApply()

    # -------------------------------------------------------------- apply / cancel

    def _isRunning(self) -> bool:
        return self._job is not None and self._job.state is runner.RunState.RUNNING

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self._isRunning()
        for section in (self.ui.inputsCollapsibleButton, self.ui.sensitivityCollapsibleButton,
                        self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            section.enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the detection; nothing is added to the scene")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        problem = self._applyProblem()
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Run the anomaly detection")
        params = self._parameterNode
        if params:
            fprMode = params.sensitivityMode == FPR_MODE
            self.ui.falsePositiveRateComboBox.enabled = fprMode
            self.ui.thresholdSpinBox.enabled = not fprMode

    def _applyProblem(self) -> Optional[str]:
        params = self._parameterNode
        if not params or not params.inputVolume:
            return _("Select an input volume")
        entry = self._currentModelEntry()
        if entry is not None and "error" in entry:
            return _("The selected model cannot be used: {error}").format(error=entry["error"])
        if params.blurKernel and params.blurKernel % 2 == 0:
            return _("The blur kernel must be odd (or 0 for the model's default)")
        if params.sensitivityMode == FPR_MODE and entry is not None and "calibration" in entry.get("card", {}):
            if params.falsePositiveRate not in engine.calibrated_fprs(entry):
                return _("The model is not calibrated for this false-positive rate; choose another one "
                         "or an explicit threshold")
        return None

    def onApplyButton(self) -> None:
        if self._isRunning():
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the detection."), waitCursor=True):
            if engine.missing_packages():
                self.logic.ensureDependencies()
                self.refreshModels()  # the registry can now read the model cards
            self._job = self.logic.startDetection(self._parameterNode)
            self._result = None
            self._lesionIndex = -1
            self.ui.progressBar.value = 0
            self.ui.progressBar.maximum = 0  # busy until the first progress line
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting the engine...")
            self._timer.start()
        self._checkCanApply()

    def _cancelJob(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self.ui.progressBar.hide()
        self._checkCanApply()

    def onPoll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            if event.total > 0:
                self.ui.progressBar.maximum = event.total
                self.ui.progressBar.value = event.done
                self.ui.progressBar.format = f"{event.stage} %p%"
            self.ui.statusLabel.text = event.describe()
        if job.state is runner.RunState.RUNNING:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.hide()
        if job.state is runner.RunState.SUCCEEDED:
            with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
                self._result = self.logic.finishDetection(job, showResults=self._parameterNode.showResults)
                count = len(self._result.lesions)
                self.ui.statusLabel.text = _("Done in {seconds:.0f} s: {count} lesion(s) found.").format(
                    seconds=job.runner.elapsed_s, count=count)
                self._lesionIndex = -1
                if count and self._parameterNode.showResults:
                    self.onJumpLesion(+1)
        elif job.state is runner.RunState.FAILED:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("The detection failed:\n\n{message}").format(message=job.error_message))
        self._checkCanApply()

    # -------------------------------------------------------------- review

    def onJumpLesion(self, step: int) -> None:
        table = self._result.table if self._result else self._parameterNode.outputTable
        lesions = bridge.lesions_from_table(table)
        if not lesions:
            self.ui.lesionLabel.text = _("No lesions to show.")
            return
        self._lesionIndex = (self._lesionIndex + step) % len(lesions)
        reference = self._result.segmentation if self._result else None
        lesion = self.logic.jumpToLesion(lesions[self._lesionIndex], reference)
        self.ui.lesionLabel.text = f"{self._lesionIndex + 1}/{len(lesions)}: {lesion.describe()}"


#
# SynomalyDetectLogic
#


class SynomalyDetectLogic(ScriptedLoadableModuleLogic):
    """Detection without the GUI: start a job from parameters, load its results, review helpers.

    `runnerFactory` lets tests (and other modules) run the engine through something else than a
    plain child process.
    """

    def __init__(self, runnerFactory=None, python=None, extraEnvironment=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or runner.ProcessRunner
        self.python = list(python) if python else runner.python_command()
        self.extraEnvironment = dict(extraEnvironment or {})

    def getParameterNode(self):
        return SynomalyDetectParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies() -> None:
        """Install torch (PyTorch extension) and the engine's packages on first use, with consent."""
        from SynomalyDetectLib import dependencies

        dependencies.ensure_dependencies("SynomalyDetect")

    def environment(self) -> dict:
        """The environment of engine processes: Slicer's own (as slicer.util.executePythonModule uses it)
        with the engine's folder on PYTHONPATH, plus `extraEnvironment`."""
        env = engine.engine_environment()
        env.update(self.extraEnvironment)
        return env

    def startAddModel(self, path: str, overwrite: bool = False) -> jobs.EngineJob:
        """Start adding our model file, or converting the authors' checkpoint, into the user model folder
        (a background engine process; the job's result is the model's name)."""
        return jobs.add_model_job(path, self.python, self.environment(), overwrite=overwrite,
                                  runner_factory=self.runnerFactory).start()

    def addModelFromFile(self, path: str, overwrite: bool = False, timeout: Optional[float] = 1800) -> str:
        """Add a model file and wait for it (blocking; for scripts and tests); its name."""
        return jobs.run_to_end(self.startAddModel(path, overwrite=overwrite), timeout)

    @staticmethod
    def listModels() -> list:
        """Registry entries; model files by name only if the engine cannot be loaded yet."""
        try:
            return engine.list_models()
        except engine.EngineUnavailable as exc:
            logging.info(f"Synomaly model registry unavailable: {exc}")
            shipped = engine.ENGINE_PARENT / "Resources" / "Models"
            return [{"name": p.name[: -len(".safetensors")], "path": str(p), "source": "shipped",
                     "card": {"name": p.stem, "description": _("details appear once the dependencies are installed")}}
                    for p in sorted(shipped.glob("*.safetensors"))]

    @staticmethod
    def optionsFromParameters(params: SynomalyDetectParameterNode) -> jobs.DetectionOptions:
        fprMode = params.sensitivityMode == FPR_MODE
        return jobs.DetectionOptions(
            model=params.modelName,
            fpr=params.falsePositiveRate if fprMode else None,
            threshold=None if fprMode else params.threshold,
            t=params.noiseLevel, stages=params.stages, blur=params.blurKernel,
            min_size_mm3=params.minLesionSize, seed=params.seed, device=params.device,
        )

    def startDetection(self, params: SynomalyDetectParameterNode) -> jobs.DetectionJob:
        """Start the engine on the parameter node's input; poll the returned job until it ends."""
        outputs = jobs.DetectionOutputs(params.outputSegmentation, params.outputCounterfactual,
                                        params.outputAnomalyMap, params.outputTable)
        return self.start(params.inputVolume, self.optionsFromParameters(params), outputs)

    def start(self, inputVolume, options: jobs.DetectionOptions, outputs=None, scene=None) -> jobs.DetectionJob:
        """Start a detection job on `inputVolume` in `scene` (default: the application's scene)."""
        job = jobs.DetectionJob(scene or slicer.mrmlScene, inputVolume, options, outputs, python=self.python,
                                env=self.environment(), temp_root=slicer.app.temporaryPath,
                                runner_factory=self.runnerFactory)
        return job.start()

    def finishDetection(self, job: jobs.DetectionJob, showResults: bool = True) -> jobs.DetectionResult:
        """Load a finished job's results into the scene and, if asked, show them for review."""
        result = job.load_results()
        if showResults:
            scene = job.scene
            inputVolume = scene.GetNodeByID(job.input_id)
            review.show_side_by_side(scene, inputVolume, result.counterfactual, result.anomaly_map,
                                     result.segmentation, threshold=result.threshold)
            slicer.util.resetSliceViews()
        return result

    def process(self, inputVolume, options: jobs.DetectionOptions, outputs=None, showResults: bool = False,
                timeout: Optional[float] = None) -> jobs.DetectionResult:
        """Run a detection to the end (blocking; for scripts and tests)."""
        job = self.start(inputVolume, options, outputs)
        state = job.wait(timeout)
        if state is runner.RunState.RUNNING:
            job.cancel()
            raise TimeoutError("the detection did not finish in time")
        if state is not runner.RunState.SUCCEEDED:
            raise RuntimeError(job.error_message or f"the detection {state.value}")
        return self.finishDetection(job, showResults)

    @staticmethod
    def jumpToLesion(lesion: bridge.Lesion, reference=None, scene=None) -> bridge.Lesion:
        """Centre every slice view on the lesion (its centroid mapped through the results' transforms)."""
        review.jump_to(scene or slicer.mrmlScene, bridge.to_world(reference, lesion.centroid_ras))
        return lesion

    def loadDemoVolume(self, wait=None):
        """The demo case (written by `synomaly demo-data` into Slicer's cache) as a volume node;
        the implanted lesion's true mask, when the engine wrote one, as a segmentation beside it.

        The engine runs in the background; `wait(job)` follows it and returns its result (default:
        block until it ends, for scripts and tests)."""
        from SynomalyDetectLib import dependencies

        folder = Path(slicer.app.cachePath) / "Synomaly"
        path = folder / engine.DEMO_FILE
        if not path.exists():
            dependencies.ensure_demo_data_package("SynomalyDetect")
            job = jobs.demo_data_job(folder, self.python, self.environment(), runner_factory=self.runnerFactory).start()
            path = (wait or jobs.run_to_end)(job)
        node = slicer.util.loadVolume(str(path))
        node.SetName(SAMPLE_NAME)
        truth = path.with_name(engine.DEMO_TRUTH_FILE)
        if truth.exists():
            segmentation = slicer.util.loadSegmentation(str(truth))
            segmentation.SetName(f"{SAMPLE_NAME} truth")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
        return node


#
# SynomalyDetectTest
#


class SynomalyDetectTest(ScriptedLoadableModuleTest):
    """Runs the self-tests in Testing/Python (bridge, runner, logic with a stand-in engine; the real
    engine on the demo case when its dependencies and a model are installed). No GPU needed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import importlib.util
        import unittest

        self.setUp()
        path = os.path.join(os.path.dirname(__file__), "Testing", "Python", "SynomalyDetectSelfTest.py")
        spec = importlib.util.spec_from_file_location("SynomalyDetectSelfTest", path)
        selfTests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(selfTests)
        suite = unittest.defaultTestLoader.loadTestsFromModule(selfTests)
        outcome = unittest.TextTestRunner(verbosity=2).run(suite)
        self.assertTrue(outcome.wasSuccessful(), "Synomaly self-tests failed; see the Python console")
        self.delayDisplay("Test passed")

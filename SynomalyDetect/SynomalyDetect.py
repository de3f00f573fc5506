import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import qt

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest
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
from SynomalyDetectLib.panel import EngineLogic, JobPanel, runSelfTests
from synomaly.contract import DETECTION_SETTING  # standard library only: the engine's option ranges

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


FPR_CHOICES = [0.01, 0.001, 0.0001, 0.00001]  # per-voxel false-positive rates the panel offers (1e-5: tuned volumes)
#: Where a volume's map is scored, as the panel words it, and the engine's region (contract.REGIONS) for each;
#: "" lets the model card decide (the shipped brain model scores the brain).
REGION_DEFAULT = "model's choice"
REGION_CHOICES = {REGION_DEFAULT: "", "brain only": "brain", "whole scan": "foreground",
                  "brain cut out first (experimental)": "brain-stripped"}


def settingRange(name: str, high: float, modelDefault: bool = True) -> WithinRange:
    """The panel's range of a detection setting: the engine's own bounds (contract.DETECTION_SETTINGS), with 0
    meaning "the model's default" where `modelDefault`, and `high` where the engine sets no upper bound."""
    setting = DETECTION_SETTING[name]
    low = 0 if modelDefault or setting.low is None else setting.low
    return WithinRange(low, setting.high if setting.high is not None else high)


@parameterNodeWrapper
class SynomalyDetectParameterNode:
    """
    inputVolume - the scan to analyse.
    modelName - registry name of the model (empty: the engine's default model).
    region - where a volume is scored: the model's choice, the brain only (a registered atlas), the whole scan, or
        the brain cut out before healing (experimental: worse on the held-out volumes, README).
    sensitivityMode - a calibrated false-positive rate or an explicit anomaly-map threshold.
    falsePositiveRate - target fraction of healthy voxels flagged (from the model's calibration).
    threshold - explicit anomaly-map threshold.
    noiseLevel, stages, blurKernel - diffusion noise step t, number of stages, blur kernel (0: model default).
    minLesionSize - smallest lesion kept, mm^3 (0: engine default).
    seed - random seed (same seed, same result).
    device - auto, cpu, cuda or mps.
    singleModel - volumes: the model alone, without the partner model its card averages its map with.
    showResults - show the results side by side when done.
    outputSegmentation, outputCounterfactual, outputAnomalyMap, outputTable - chosen output nodes (empty: create new).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    region: Annotated[str, Choice(list(REGION_CHOICES))] = REGION_DEFAULT
    sensitivityMode: Annotated[str, Choice([FPR_MODE, THRESHOLD_MODE])] = FPR_MODE
    falsePositiveRate: Annotated[float, Choice(FPR_CHOICES)] = 0.001
    threshold: Annotated[float, settingRange("threshold", 100.0, modelDefault=False)] = 0.25
    noiseLevel: Annotated[int, settingRange("t", 999)] = 0
    stages: Annotated[int, settingRange("max_stages", 50)] = 0
    blurKernel: Annotated[int, settingRange("blur_kernel", 63)] = 0
    minLesionSize: Annotated[float, settingRange("min_lesion_mm3", 1000000.0)] = 0.0
    seed: Annotated[int, settingRange("seed", 2147483647)] = 0
    device: Annotated[str, Choice(DEVICES)] = "auto"
    singleModel: bool = False
    showResults: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    outputCounterfactual: vtkMRMLScalarVolumeNode
    outputAnomalyMap: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode


#
# SynomalyDetectWidget
#


class SynomalyDetectWidget(JobPanel):
    """The panel: reads the GUI, starts and polls the logic's job (JobPanel), shows results."""

    LOCKED_SECTIONS = ("inputsCollapsibleButton", "sensitivityCollapsibleButton", "advancedCollapsibleButton",
                       "outputsCollapsibleButton")

    def __init__(self, parent=None) -> None:
        JobPanel.__init__(self, parent)
        self._result = None
        self._lesionIndex = -1
        self._models = []

    def setup(self) -> None:
        JobPanel.setup(self)
        self.logic = SynomalyDetectLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.nextLesionButton.connect("clicked(bool)", lambda: self.onJumpLesion(+1))
        self.ui.previousLesionButton.connect("clicked(bool)", lambda: self.onJumpLesion(-1))
        self.initializeParameterNode()
        self.refreshModels()

    def onSceneStartClose(self, caller, event) -> None:
        JobPanel.onSceneStartClose(self, caller, event)
        self._result = None

    def initializeParameterNode(self) -> None:
        JobPanel.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def showCodeManagedParameters(self) -> None:
        self._selectModelInComboBox(self._parameterNode.modelName)

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
            elif default is not None:  # a card tuned at a rate between the offered ones (synomaly tune --fprs)
                warning = _("{name} was tuned at FPR {tuned:g}, which this panel does not offer: it will run at FPR "
                            "{used:g}. For the tuned rate, use synomaly detect from the command line.").format(
                    name=entry["name"], tuned=default, used=self._parameterNode.falsePositiveRate)
                logging.warning(warning)
                self.ui.statusLabel.text = warning
            fallback = engine.uncalibrated_threshold(entry)
            if fallback is not None:  # e.g. an imported model: use its card's threshold rather than refuse to run
                self._parameterNode.sensitivityMode = THRESHOLD_MODE
                self._parameterNode.threshold = fallback
        self.updateButtons()

    # -------------------------------------------------------------- apply / cancel

    def updateButtons(self, caller=None, event=None) -> None:
        if self.lockWhileRunning():
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
            job = self.logic.startDetection(self._parameterNode)
            self._result = None
            self._lesionIndex = -1
            self.followJob(job, _("Starting the engine..."))
        self.updateButtons()

    def onJobSucceeded(self, job) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
            self._result = self.logic.finishDetection(job, showResults=self._parameterNode.showResults)
            count = len(self._result.lesions)
            self.ui.statusLabel.text = " ".join([_("Done in {seconds:.0f} s: {count} lesion(s) found.").format(
                seconds=job.runner.elapsed_s, count=count), *self._result.notes])
            self._lesionIndex = -1
            if count and self._parameterNode.showResults:
                self.onJumpLesion(+1)

    def failureMessage(self, message: str) -> str:
        return _("The detection failed:\n\n{message}").format(message=message)

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


class SynomalyDetectLogic(EngineLogic):
    """Detection without the GUI: start a job from parameters, load its results, review helpers. The engine
    processes, their environment, the dependencies and the model registry come from EngineLogic."""

    def getParameterNode(self):
        return SynomalyDetectParameterNode(super().getParameterNode())

    def startAddModel(self, path: str, overwrite: bool = False) -> jobs.EngineJob:
        """Start adding our model file, or converting the authors' checkpoint, into the user model folder
        (a background engine process; the job's result is the model's name)."""
        return jobs.add_model_job(path, self.python, self.environment(), overwrite=overwrite,
                                  runner_factory=self.runnerFactory).start()

    def addModelFromFile(self, path: str, overwrite: bool = False, timeout: Optional[float] = 1800) -> str:
        """Add a model file and wait for it (blocking; for scripts and tests); its name."""
        return jobs.run_to_end(self.startAddModel(path, overwrite=overwrite), timeout)

    @staticmethod
    def optionsFromParameters(params: SynomalyDetectParameterNode) -> jobs.DetectionOptions:
        fprMode = params.sensitivityMode == FPR_MODE
        return jobs.DetectionOptions(
            model=params.modelName,
            fpr=params.falsePositiveRate if fprMode else None,
            threshold=None if fprMode else params.threshold,
            t=params.noiseLevel, stages=params.stages, blur=params.blurKernel, region=REGION_CHOICES.get(params.region, ""),
            min_size_mm3=params.minLesionSize, seed=params.seed, device=params.device, single_model=params.singleModel,
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
        job = self.waitFor(self.start(inputVolume, options, outputs), timeout, "the detection")
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
        self.setUp()
        runSelfTests(self, __file__, "Synomaly self-tests failed; see the Python console")
        self.delayDisplay("Test passed")

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

from slicer import vtkMRMLScalarVolumeNode

from SynomalyDetectLib import engine, jobs, review
from SynomalyDetectLib.panel import EngineLogic, JobPanel, runSelfTests

DEVICES = ["auto", "cpu", "cuda", "mps"]
FROM_SCRATCH = ""

#: Parameter-node fields that the widget sets itself: the checkable volume list and the base-model
#: combo box (the registry changes at run time, so it cannot be a static Choice).
CODE_MANAGED_PARAMETERS = ("trainingVolumes", "baseModel")


#
# SynomalyTraining
#


class SynomalyTraining(ScriptedLoadableModule):
    """Train or fine-tune a Synomaly model on local healthy scans; SynomalyDetect lists it at once."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synomaly Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["SynomalyDetect"]
        self.parent.contributors = ["SynomalyExtension maintainers (Synomaly project)"]
        self.parent.helpText = _("""
Train a Synomaly anomaly-detection model from scratch, or fine-tune an installed one, on healthy scans
only (volumes in the scene and/or a folder). Training runs in the background with a live loss curve;
it can be cancelled and resumed. When done, the model is calibrated on held-out healthy scans and
installed into your user model folder, where Synomaly Detect finds it.
"Tune on these healthy scans" adapts an installed model to your site without training: it implants
synthetic lesions into your healthy volumes, chooses the detection settings that find them best,
calibrates the thresholds on the untouched volumes, and installs the result under the model name.
See the <a href="https://github.com/synomaly/SlicerSynomaly#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Method: C. Bi et al., Medical Image Analysis 2025 (arXiv 2411.04004). Networks from MONAI.
""")


#
# SynomalyTrainingParameterNode
#


@parameterNodeWrapper
class SynomalyTrainingParameterNode:
    """
    trainingVolumes - healthy scans in the scene.
    dataFolder - a folder of healthy scans (optional).
    validationFolder - held-out healthy scans for validation and calibration (optional; default: a split).
    baseModel - model to fine-tune (empty: train from scratch).
    iterations, batchSize, learningRate, device - training settings.
    modelName - name of the new model in the user model folder.
    """

    trainingVolumes: list[vtkMRMLScalarVolumeNode]
    dataFolder: str = ""
    validationFolder: str = ""
    baseModel: str = FROM_SCRATCH
    iterations: Annotated[int, WithinRange(10, 1000000)] = jobs.TrainingOptions.iterations  # the engine's defaults
    batchSize: Annotated[int, WithinRange(1, 512)] = jobs.TrainingOptions.batch_size
    learningRate: Annotated[float, WithinRange(0.0000001, 0.1)] = jobs.TrainingOptions.lr
    device: Annotated[str, Choice(DEVICES)] = "auto"
    modelName: str = "my-healthy-model"


#
# SynomalyTrainingWidget
#


class SynomalyTrainingWidget(JobPanel):
    """The panel: data, settings, Train/Cancel, Resume, Tune, loss curve, user models (the job itself: JobPanel)."""

    POLL_INTERVAL_MS = 500
    LOCKED_SECTIONS = ("dataCollapsibleButton", "settingsCollapsibleButton", "modelsCollapsibleButton")

    def __init__(self, parent=None) -> None:
        JobPanel.__init__(self, parent)
        self._updatingGui = False

    def setup(self) -> None:
        JobPanel.setup(self)
        self.logic = SynomalyTrainingLogic()
        self.ui.trainingVolumesComboBox.connect("checkedNodesChanged()", self.onTrainingVolumesChanged)
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.onBaseModelChanged)
        self.ui.browseDataFolderButton.connect("clicked(bool)", lambda: self._browseFolder("dataFolder"))
        self.ui.browseValidationFolderButton.connect("clicked(bool)", lambda: self._browseFolder("validationFolder"))
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.tuneButton.connect("clicked(bool)", self.onTuneButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.initializeParameterNode()
        self.refreshModels()

    # -------------------------------------------------------------- code-managed parameters

    def showCodeManagedParameters(self) -> None:
        self._updatingGui = True
        try:
            checked = {node.GetID() for node in self._parameterNode.trainingVolumes if node}
            combo = self.ui.trainingVolumesComboBox
            for index in range(combo.nodeCount()):
                node = combo.nodeFromIndex(index)
                combo.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
            index = self.ui.baseModelComboBox.findData(self._parameterNode.baseModel)
            self.ui.baseModelComboBox.currentIndex = max(index, 0)
        finally:
            self._updatingGui = False

    def onTrainingVolumesChanged(self) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.trainingVolumes = list(self.ui.trainingVolumesComboBox.checkedNodes())

    def onBaseModelChanged(self, index: int) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.baseModel = self.ui.baseModelComboBox.itemData(index) or FROM_SCRATCH

    def _browseFolder(self, field: str) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder of healthy scans"),
                                                     getattr(self._parameterNode, field) or "")
        if folder:
            setattr(self._parameterNode, field, folder)

    # -------------------------------------------------------------- user models

    def refreshModels(self) -> None:
        """Fill the base-model and user-model lists from the registry."""
        models = self.logic.listModels()
        self._updatingGui = True
        try:
            base = self.ui.baseModelComboBox
            base.clear()
            base.addItem(_("(none: train from scratch)"), FROM_SCRATCH)
            for entry in models:
                if "card" in entry:
                    base.addItem(f"{entry['name']} ({entry.get('source', '')})", entry["name"])
            user = self.ui.userModelsComboBox
            user.clear()
            for entry in models:
                if entry.get("source") == "user":
                    user.addItem(entry["name"], entry["name"])
        finally:
            self._updatingGui = False
        if self._parameterNode:
            self.showCodeManagedParameters()
        self.updateButtons()

    def onRemoveModel(self) -> None:
        name = self.ui.userModelsComboBox.currentData
        if not name:
            return
        if not slicer.util.confirmYesNoDisplay(_("Delete the model '{name}' from your user model folder?").format(name=name)):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not remove the model."), waitCursor=True):
            self.logic.removeModel(name)
        self.refreshModels()
        _refreshDetectModule()

    def onOpenModelsFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The model folder is not available yet."), waitCursor=True):
            folder = self.logic.modelsFolder()
            folder.mkdir(parents=True, exist_ok=True)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # -------------------------------------------------------------- train / cancel / resume

    def updateButtons(self, caller=None, event=None) -> None:
        if self.lockWhileRunning():
            self.ui.trainButton.text = _("Cancel")
            self.ui.trainButton.toolTip = _("Stop training; a checkpoint is kept so that you can resume")
            self.ui.trainButton.enabled = True
            self.ui.resumeButton.enabled = False
            self.ui.tuneButton.enabled = False
            return
        self.ui.trainButton.text = _("Train")
        params = self._parameterNode
        problem = None
        if not params:
            problem = _("No parameter node")
        elif not params.trainingVolumes and not params.dataFolder:
            problem = _("Choose healthy scans: volumes in the scene and/or a folder")
        elif not jobs.valid_model_name(params.modelName):
            problem = _("Give the model a name (letters, digits, '-', '_' and '.')")
        self.ui.trainButton.enabled = problem is None
        self.ui.trainButton.toolTip = problem or _("Train in the background")
        canResume = problem is None and self.logic.checkpointExists(params.modelName)
        self.ui.resumeButton.enabled = canResume
        self.ui.resumeButton.toolTip = (_("Continue the interrupted training of this model") if canResume
                                        else _("No interrupted training of this model to resume"))
        canTune = problem is None and bool(params.baseModel)
        self.ui.tuneButton.enabled = canTune
        self.ui.tuneButton.toolTip = (
            _("Choose the base model's detection settings on synthetic lesions in these healthy volumes (not used "
              "in its training), calibrate, and install the result as the model name") if canTune
            else problem or _("Choose the model to tune as the base model"))
        self.ui.removeModelButton.enabled = self.ui.userModelsComboBox.count > 0

    def onTrainButton(self) -> None:
        if self._isRunning():
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled. Resume continues from the last checkpoint.")
            return
        self._start(resume=False)

    def onResumeButton(self) -> None:
        self._start(resume=True)

    def onTuneButton(self) -> None:
        self._start(resume=False, tune=True)

    def _start(self, resume: bool, tune: bool = False) -> None:
        params = self._parameterNode
        if not resume and self.logic.modelExists(params.modelName):
            if not slicer.util.confirmYesNoDisplay(
                    _("A user model named '{name}' exists. Replace it when the run finishes?").format(name=params.modelName)):
                return
        with slicer.util.tryWithErrorDisplay(_("Failed to start."), waitCursor=True):
            if engine.missing_packages():
                self.logic.ensureDependencies()
                self.refreshModels()
            job = self.logic.startTuning(params) if tune else self.logic.startTraining(params, resume=resume)
            self.followJob(job, _("Preparing the training data..."))
        self.updateButtons()

    def describeProgress(self, event) -> str:
        text = event.describe()
        if "loss" in event.extra:
            text += f"  loss {float(event.extra['loss']):.4g}"
        if "it_per_s" in event.extra:
            text += f"  ({float(event.extra['it_per_s']):.1f} it/s)"
        return text

    def onJobSucceeded(self, job) -> None:
        done = _("tuned") if isinstance(job, jobs.TuningJob) else _("trained")
        self.ui.statusLabel.text = _("Model '{name}' is {done}, calibrated and installed.").format(
            name=job.options.name, done=done)
        self.refreshModels()
        _refreshDetectModule()


def _refreshDetectModule() -> None:
    """Make Synomaly Detect list the current models if its panel has been opened; never create the panel
    (widgetRepresentation() would). Slicer sets slicer.modules.SynomalyDetectWidget when it creates it."""
    widget = getattr(getattr(slicer, "modules", None), "SynomalyDetectWidget", None)
    if hasattr(widget, "refreshModels"):
        widget.refreshModels()


#
# SynomalyTrainingLogic
#


class SynomalyTrainingLogic(EngineLogic):
    """Training without the GUI: a TrainingJob from parameters, the loss chart, the user model folder. The
    engine processes, their environment, the dependencies and the model registry come from EngineLogic."""

    DEPENDENCY_MODULE = "SynomalyTraining"

    def getParameterNode(self):
        return SynomalyTrainingParameterNode(super().getParameterNode())

    def modelsFolder(self):
        """The user model folder (the engine's SYNOMALY_MODELS_DIR or per-user default)."""
        override = self.extraEnvironment.get("SYNOMALY_MODELS_DIR")
        return Path(override) if override else engine.user_models_dir()

    def modelExists(self, name: str) -> bool:
        try:
            return (self.modelsFolder() / f"{name}.safetensors").exists()
        except engine.EngineUnavailable:
            return False

    def checkpointPath(self, name: str):
        return engine.checkpoint_path(name, self.modelsFolder())

    def checkpointExists(self, name: str) -> bool:
        try:
            return jobs.valid_model_name(name) and self.checkpointPath(name).exists()
        except engine.EngineUnavailable:
            return False

    def removeModel(self, name: str) -> None:
        """Delete a user model from this logic's model folder (the engine's remove_model)."""
        engine.remove_model(name, self.modelsFolder())

    @staticmethod
    def optionsFromParameters(params: SynomalyTrainingParameterNode) -> jobs.TrainingOptions:
        return jobs.TrainingOptions(name=params.modelName.strip(), base=params.baseModel, iterations=params.iterations,
                                    batch_size=params.batchSize, lr=params.learningRate, device=params.device)

    def startTraining(self, params: SynomalyTrainingParameterNode, resume: bool = False, scene=None,
                      showChart: bool = True) -> jobs.TrainingJob:
        """Start training from the parameter node's data and settings; poll the returned job."""
        options = self.optionsFromParameters(params)
        return self.start(options, list(params.trainingVolumes), [params.dataFolder] if params.dataFolder else [],
                          [params.validationFolder] if params.validationFolder else [], resume=resume,
                          scene=scene, showChart=showChart)

    def startTuning(self, params: SynomalyTrainingParameterNode, scene=None) -> jobs.TuningJob:
        """Tune the base model on the parameter node's healthy volumes and install it as the model name."""
        options = self.optionsFromParameters(params)
        job = jobs.TuningJob(scene or slicer.mrmlScene, options, list(params.trainingVolumes),
                             [params.dataFolder] if params.dataFolder else [], python=self.python,
                             env=self.environment(), temp_root=slicer.app.temporaryPath,
                             checkpoint=self.checkpointPath(options.name), runner_factory=self.runnerFactory)
        return job.start()

    def start(self, options: jobs.TrainingOptions, volumes=(), folders=(), validationFolders=(), resume=False,
              scene=None, showChart: bool = True) -> jobs.TrainingJob:
        scene = scene or slicer.mrmlScene
        job = jobs.TrainingJob(scene, options, volumes, folders, validationFolders, python=self.python,
                               env=self.environment(), temp_root=slicer.app.temporaryPath,
                               checkpoint=self.checkpointPath(options.name), resume=resume,
                               runner_factory=self.runnerFactory)
        job.start()
        if showChart:
            chart = review.show_loss_chart(scene, job.loss_table, f"{options.name} training loss")
            job.adopt(*review.chart_nodes(scene, chart))
        return job

    def train(self, options: jobs.TrainingOptions, volumes=(), folders=(), validationFolders=(), resume=False,
              timeout: Optional[float] = None) -> jobs.TrainingJob:
        """Train to the end (blocking; for scripts and tests)."""
        return self.waitFor(self.start(options, volumes, folders, validationFolders, resume=resume, showChart=False),
                            timeout, "training")


#
# SynomalyTrainingTest
#


class SynomalyTrainingTest(ScriptedLoadableModuleTest):
    """Runs Testing/Python/SynomalyTrainingSelfTest.py (a stand-in engine; no torch or GPU needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        runSelfTests(self, __file__, "Synomaly training self-tests failed; see the Python console")
        self.delayDisplay("Test passed")

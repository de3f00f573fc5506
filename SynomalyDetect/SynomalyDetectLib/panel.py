"""What both module panels share, written once: the engine-logic base and the job panel.

A Synomaly panel edits a parameter node, starts one engine job at a time in a child process, polls it on
a timer (progress bar and status line), lets the user cancel it, and locks its settings while it runs.
`JobPanel` does all of that; a module's widget adds its own buttons and says what a finished job means.
`EngineLogic` holds what every module logic needs to start engine processes: the Python command, the
environment, the dependency check, the model registry and blocking waits for scripts and tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from SynomalyDetectLib import engine, runner


class EngineLogic(ScriptedLoadableModuleLogic):
    """A module logic that runs the engine in child processes.

    `runnerFactory` lets tests (and other modules) run the engine through something else than a plain
    child process; `python` is the command that starts the engine's interpreter; `extraEnvironment` is
    added to the engine processes' environment (e.g. SYNOMALY_MODELS_DIR).
    """

    #: The module named in the dependency prompt (the one whose button asked for the packages).
    DEPENDENCY_MODULE = "SynomalyDetect"

    def __init__(self, runnerFactory=None, python=None, extraEnvironment=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or runner.ProcessRunner
        self.python = list(python) if python else runner.python_command()
        self.extraEnvironment = dict(extraEnvironment or {})

    @classmethod
    def ensureDependencies(cls) -> None:
        """Install torch (PyTorch extension) and the engine's packages on first use, with consent."""
        from SynomalyDetectLib import dependencies

        dependencies.ensure_dependencies(cls.DEPENDENCY_MODULE)

    def environment(self) -> dict:
        """The environment of engine processes: Slicer's own (as slicer.util.executePythonModule uses it)
        with the engine's folder on PYTHONPATH, plus `extraEnvironment`."""
        env = engine.engine_environment()
        env.update(self.extraEnvironment)
        return env

    @staticmethod
    def listModels() -> list:
        """Registry entries; the shipped model files by name only while the engine cannot be loaded yet
        (before the dependencies are installed)."""
        try:
            return engine.list_models()
        except engine.EngineUnavailable as exc:
            logging.info(f"Synomaly model registry unavailable: {exc}")
            shipped = engine.ENGINE_PARENT / "Resources" / "Models"
            return [{"name": p.name[: -len(".safetensors")], "path": str(p), "source": "shipped",
                     "card": {"name": p.stem, "description": _("details appear once the dependencies are installed")}}
                    for p in sorted(shipped.glob("*.safetensors"))]

    @staticmethod
    def waitFor(job, timeout: Optional[float], what: str):
        """Block until `job` ends (scripts and tests): the job when it succeeded; TimeoutError (the job is
        cancelled) or RuntimeError with the engine's message otherwise. `what` names the run in messages."""
        state = job.wait(timeout)
        if state is runner.RunState.RUNNING:
            job.cancel()
            raise TimeoutError(f"{what} did not finish in time")
        if state is not runner.RunState.SUCCEEDED:
            raise RuntimeError(job.error_message or f"{what} {state.value}")
        return job


class JobPanel(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A module panel that runs one engine job at a time.

    The module's widget calls `JobPanel.setup` first (it loads Resources/UI/<module>.ui into `self.ui`,
    which must hold `progressBar` and `statusLabel`), then connects its own buttons, and provides:
    `updateButtons()` (called whenever the parameter node or the job's state changes), `LOCKED_SECTIONS`
    (the ui names disabled while a job runs), `onJobSucceeded(job)`, and `failureMessage(message)`.
    It may override `describeProgress(event)` and `showCodeManagedParameters()` (fields that have no
    widget bound by name, shown when a parameter node is connected).
    """

    POLL_INTERVAL_MS = 200
    LOCKED_SECTIONS: tuple[str, ...] = ()

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.progressBar.hide()

    # -------------------------------------------------------------- what a module provides

    def updateButtons(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def onJobSucceeded(self, job) -> None:
        raise NotImplementedError

    def failureMessage(self, message: str) -> str:
        return _("The run failed:\n\n{message}").format(message=message)

    def describeProgress(self, event) -> str:
        return event.describe()

    def showCodeManagedParameters(self) -> None:
        pass

    # -------------------------------------------------------------- module life cycle

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.showCodeManagedParameters()
            self.updateButtons()

    # -------------------------------------------------------------- the job

    def _isRunning(self) -> bool:
        return self._job is not None and self._job.state is runner.RunState.RUNNING

    def lockWhileRunning(self) -> bool:
        """Disable the settings while a job runs; whether one runs."""
        running = self._isRunning()
        for name in self.LOCKED_SECTIONS:
            getattr(self.ui, name).enabled = not running
        return running

    def followJob(self, job, status: str) -> None:
        """Show a started job's progress until it ends."""
        self._job = job
        self.ui.progressBar.value = 0
        self.ui.progressBar.maximum = 0  # busy until the first progress line
        self.ui.progressBar.show()
        self.ui.statusLabel.text = status
        self._timer.start()

    def _cancelJob(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self.ui.progressBar.hide()
        self.updateButtons()

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
            self.ui.statusLabel.text = self.describeProgress(event)
        if job.state is runner.RunState.RUNNING:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.hide()
        if job.state is runner.RunState.SUCCEEDED:
            self.onJobSucceeded(job)
        elif job.state is runner.RunState.FAILED:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(self.failureMessage(job.error_message))
        self.updateButtons()


def runSelfTests(testCase, moduleFile: str, failure: str) -> None:
    """Run the unittest cases of Testing/Python/<module>SelfTest.py beside `moduleFile` (a module's
    ScriptedLoadableModuleTest.runTest); `testCase` fails with `failure` if any of them fails."""
    import unittest

    name = os.path.splitext(os.path.basename(moduleFile))[0] + "SelfTest"
    path = os.path.join(os.path.dirname(moduleFile), "Testing", "Python", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    selfTests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfTests)
    suite = unittest.defaultTestLoader.loadTestsFromModule(selfTests)
    outcome = unittest.TextTestRunner(verbosity=2).run(suite)
    testCase.assertTrue(outcome.wasSuccessful(), failure)

"""Detection and training runs: scene in, engine in a child process, scene out (no Qt).

A job writes its inputs into a temporary folder, starts the engine through a `ProcessRunner`
(or anything made by `runner_factory` with the same interface, so tests can substitute one),
is polled until it ends, and then loads the results into the nodes the user chose or into new
nodes. A cancelled or failed job leaves the scene as it was and removes its temporary folder.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from synomaly.contract import DETECTION_SETTING, RESULT_FILES  # standard library only, no torch
from synomaly.settings import TrainingSettings  # plain data, no torch: the engine's training defaults

from . import bridge
from .engine import DEMO_FILE, add_model_args, checkpoint_path, engine_command, model_name_for_file, read_report
from .runner import ProcessRunner, Progress, RunState

RunnerFactory = Callable[..., Any]

class JobError(RuntimeError):
    """A run cannot start with these inputs, or its results cannot be loaded."""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "volume"


def _node_id(node) -> Optional[str]:
    return node.GetID() if node is not None else None


# ---------------------------------------------------------------- detection


@dataclass
class DetectionOptions:
    """What the user set in the panel; zero means 'the model's default' for the advanced numbers."""

    model: str = ""
    fpr: Optional[float] = 1e-3
    threshold: Optional[float] = None
    t: int = 0
    stages: int = 0
    blur: int = 0
    region: str = ""  # contract.REGIONS; "": the model card's
    min_size_mm3: float = 0.0
    seed: int = 0
    batch_size: int = 0
    device: str = "auto"
    single_model: bool = False  # volumes: the model alone, without the partner its card pairs it with

    def cli_args(self) -> list[str]:
        """The `synomaly detect` options for these settings (flags from contract.DETECTION_SETTINGS)."""
        flag = {name: DETECTION_SETTING[name].flag for name in DETECTION_SETTING}
        args: list[str] = []
        if self.model:
            args += ["--model", self.model]
        if self.threshold is not None:
            args += [flag["threshold"], repr(float(self.threshold))]
        elif self.fpr is not None:
            args += [flag["fpr"], f"{float(self.fpr):g}"]
        for name, value in (("t", self.t), ("max_stages", self.stages), ("blur_kernel", self.blur),
                            ("batch_size", self.batch_size)):
            if value and int(value) > 0:
                args += [flag[name], str(int(value))]
        if self.region:
            args += [flag["region"], self.region]
        if self.min_size_mm3 and self.min_size_mm3 > 0:
            args += [flag["min_lesion_mm3"], repr(float(self.min_size_mm3))]
        args += [flag["seed"], str(int(self.seed)), flag["device"], self.device or "auto"]
        if self.single_model:
            args.append(flag["single_model"])
        return args

    def problems(self) -> list[str]:
        """What the engine would refuse in these settings, in its own words (checked before a job starts)."""
        values = {"t": self.t or None, "max_stages": self.stages or None, "blur_kernel": self.blur or None,
                  "batch_size": self.batch_size or None, "threshold": self.threshold, "fpr": self.fpr,
                  "min_lesion_mm3": self.min_size_mm3, "seed": self.seed, "region": self.region or None}
        return [p for name, v in values.items() if (p := DETECTION_SETTING[name].problem(v))]


@dataclass
class DetectionOutputs:
    """Output nodes the user chose; None means 'create a new node'."""

    segmentation: Any = None
    counterfactual: Any = None
    anomaly_map: Any = None
    table: Any = None


@dataclass
class DetectionResult:
    """The nodes that hold the results, what the engine reported, and which nodes are new."""

    segmentation: Any
    counterfactual: Any
    anomaly_map: Any
    table: Any
    report: dict[str, Any] = field(default_factory=dict)
    lesions: list[bridge.Lesion] = field(default_factory=list)
    created: list[Any] = field(default_factory=list)

    @property
    def threshold(self) -> Optional[float]:
        """The anomaly-map threshold the engine applied, if it reported one."""
        value = self.report.get("threshold")
        if value is None:
            value = (self.report.get("settings") or {}).get("threshold")
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def notes(self) -> list[str]:
        """What the user should know about how the result was made, in the engine's words: where the map was
        scored, and every warning of the run (a brain that could not be found, a modality mismatch, sizes in
        pixels)."""
        region_note = {"brain": "Only the brain was scored (a registered atlas).",
                       "brain-stripped": "The brain was cut out before healing and only it was scored (a registered "
                                         "atlas)."}.get(self.report.get("region"))
        notes = [region_note] if region_note else []
        return notes + [f"Warning: {str(w).rstrip('.')}." for w in self.report.get("warnings") or []]


class RunnerJob:
    """What every job that runs one engine process (`self.runner`, None before start) reports."""

    runner: Any = None

    def poll(self) -> list[Progress]:
        """New progress records; `state` tells when the engine has finished."""
        return self.runner.poll() if self.runner is not None else []

    @property
    def state(self) -> RunState:
        """The run's state (NOT_STARTED before start())."""
        return self.runner.state if self.runner is not None else RunState.NOT_STARTED

    @property
    def error_message(self) -> str:
        """The engine's explanation when the run failed."""
        return self.runner.error_message if self.runner is not None else ""

    def wait(self, timeout: Optional[float] = None) -> RunState:
        """Block until the engine finishes (scripts and tests)."""
        return self.runner.wait(timeout) if self.runner is not None else self.state


class DetectionJob(RunnerJob):
    """One detection run on one volume."""

    def __init__(self, scene, input_volume, options: DetectionOptions, outputs: Optional[DetectionOutputs] = None,
                 *, python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                 temp_root: Optional[str | Path] = None, runner_factory: RunnerFactory = ProcessRunner) -> None:
        self.scene = scene
        self.options = options
        self.python = list(python)
        self.env = env
        self.temp_root = temp_root
        self.runner_factory = runner_factory
        self.runner = None
        self.temp_dir: Optional[Path] = None
        self.result: Optional[DetectionResult] = None
        self._check_input(input_volume)
        problems = options.problems()  # the engine's own rules, so a bad value fails here, not in the engine
        if problems:
            raise JobError(problems[0])
        self.input_id = input_volume.GetID()
        self.input_name = input_volume.GetName()
        outputs = outputs or DetectionOutputs()
        self._check_outputs(input_volume, outputs)
        self.output_ids = {key: _node_id(getattr(outputs, key)) for key in ("segmentation", "counterfactual",
                                                                               "anomaly_map", "table")}

    def _check_input(self, volume) -> None:
        if volume is None:
            raise JobError("choose an input volume")
        if volume.GetScene() is not self.scene:
            raise JobError(f"{volume.GetName()} is not in this scene")
        image = volume.GetImageData()
        if image is None:
            raise JobError(f"{volume.GetName()} holds no image")
        if image.GetNumberOfScalarComponents() != 1:
            raise JobError(f"{volume.GetName()} has {image.GetNumberOfScalarComponents()} components per voxel; "
                           "choose a grey-scale volume")
        dims = image.GetDimensions()
        if min(dims) < 1 or sorted(dims)[1] < 8:
            raise JobError(f"{volume.GetName()} is {dims[0]} x {dims[1]} x {dims[2]} voxels: too small to analyse")

    @staticmethod
    def _check_outputs(input_volume, outputs: DetectionOutputs) -> None:
        chosen = [(key, node) for key, node in vars(outputs).items() if node is not None]
        for key, node in chosen:
            if node is input_volume or node.GetID() == input_volume.GetID():
                raise JobError(f"the {key.replace('_', ' ')} output must not be the input volume")
        ids = [node.GetID() for _, node in chosen]
        if len(ids) != len(set(ids)):
            raise JobError("choose a different node for each output")

    # -------------------------------------------------------------- running

    def start(self) -> "DetectionJob":
        """Write the input to a temporary folder and start the engine."""
        input_volume = self.scene.GetNodeByID(self.input_id)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="synomaly-detect-", dir=self.temp_root))
        try:
            input_file = bridge.write_volume(input_volume, self.temp_dir / f"{_safe_name(self.input_name)}.nrrd")
            command = engine_command(self.python, "detect", input_file, "-o", self.temp_dir / "results",
                                     *self.options.cli_args(), "--progress", "json")
            self.runner = self.runner_factory(command, env=self.env, temp_dir=self.temp_dir)
            self.runner.start()
        except Exception:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        return self

    def cancel(self) -> None:
        """Stop the engine and remove the temporary folder; the scene is not touched."""
        if self.runner is not None:
            self.runner.cancel()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder (always safe to call)."""
        if self.runner is not None:
            self.runner.cleanup()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -------------------------------------------------------------- results

    def load_results(self) -> DetectionResult:
        """Read every result file, then fill the chosen (or new) nodes; all or nothing."""
        if self.state is not RunState.SUCCEEDED:
            raise JobError(f"there are no results to load: the run {self.state.value}")
        created: list[Any] = []
        try:
            folder = self.temp_dir / "results"
            # Read everything first: a file Slicer cannot read must not leave half-filled nodes.
            counterfactual = bridge.read_volume(folder / RESULT_FILES["counterfactual"])
            anomaly_map = bridge.read_volume(folder / RESULT_FILES["anomaly_map"])
            segmentation = bridge.read_segmentation(folder / RESULT_FILES["segmentation"])
            rows = bridge.read_lesions_csv(folder / RESULT_FILES["lesions"])
            report = read_report(folder / RESULT_FILES["report"])
            input_volume = self.scene.GetNodeByID(self.input_id)
            if input_volume is None:
                raise JobError("the input volume was removed from the scene during the run")

            def target(key: str):
                node = self.scene.GetNodeByID(self.output_ids[key]) if self.output_ids[key] else None
                return node  # a chosen node that was deleted meanwhile is replaced by a new one

            def remember(node, existing):
                if existing is None:
                    created.append(node)
                return node

            name = self.input_name
            t = target("counterfactual")
            cf_node = remember(bridge.assign_volume(self.scene, counterfactual, t, f"{name} counterfactual",
                                                    input_volume), t)
            t = target("anomaly_map")
            map_node = remember(bridge.assign_volume(self.scene, anomaly_map, t, f"{name} anomaly map",
                                                     input_volume), t)
            t = target("segmentation")
            seg_node = remember(bridge.assign_segmentation(self.scene, segmentation, t, f"{name} anomalies",
                                                           input_volume), t)
            t = target("table")
            table_node = remember(bridge.assign_table(self.scene, rows, t, f"{name} lesions"), t)
            for node in (cf_node, map_node, seg_node, table_node):
                node.SetAttribute("Synomaly.InputVolumeID", self.input_id)
            self.result = DetectionResult(seg_node, cf_node, map_node, table_node, report,
                                          bridge.lesions_from_table(table_node), created)
            return self.result
        except Exception:
            for node in created:
                if node.GetScene() is self.scene:
                    self.scene.RemoveNode(node)
            raise
        finally:
            self.cleanup()


# ---------------------------------------------------------------- training


@dataclass
class TrainingOptions:
    """Training settings from the panel."""

    name: str
    base: str = ""
    iterations: int = TrainingSettings.iterations
    batch_size: int = TrainingSettings.batch_size
    lr: float = TrainingSettings.lr
    device: str = "auto"
    seed: int = TrainingSettings.seed

    def cli_args(self) -> list[str]:
        """The `synomaly train` options for these settings (without data and output)."""
        args = ["--name", self.name, "--iterations", str(int(self.iterations)),
                "--batch-size", str(int(self.batch_size)), "--lr", f"{float(self.lr):g}",
                "--device", self.device or "auto", "--seed", str(int(self.seed))]
        if self.base:
            args += ["--base", self.base]
        return args


def valid_model_name(name: str) -> bool:
    """A model name usable as a file name on every platform."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or "")) and not name.endswith(".")


class TrainingJob:
    """Train (or fine-tune) a model on healthy scans, then install it into the user model folder.

    Two engine runs in sequence: `synomaly train` (which also calibrates on held-out scans) and
    `synomaly install-model`. The training checkpoint is kept in a user folder so that a
    cancelled run can be resumed; it is removed once the model is installed.
    """

    def __init__(self, scene, options: TrainingOptions, volumes: Sequence[Any] = (), folders: Sequence[str] = (),
                 validation_folders: Sequence[str] = (), *, python: Sequence[str],
                 env: Optional[Mapping[str, str]] = None, temp_root: Optional[str | Path] = None,
                 checkpoint: Optional[str | Path] = None, resume: bool = False,
                 runner_factory: RunnerFactory = ProcessRunner, loss_table=None) -> None:
        if not valid_model_name(options.name):
            raise JobError(f"{options.name!r} is not a usable model name: use letters, digits, '-', '_' and '.'")
        volumes = [v for v in volumes if v is not None]
        folders = [str(f) for f in folders if f]
        if not volumes and not folders:
            raise JobError("choose healthy scans: volumes in the scene and/or a folder")
        for folder in folders + [str(f) for f in validation_folders if f]:
            if not Path(folder).is_dir():
                raise JobError(f"the folder {folder} does not exist")
        for volume in volumes:
            if volume.GetImageData() is None:
                raise JobError(f"{volume.GetName()} holds no image")
        self.scene = scene
        self.options = options
        self.volume_ids = [v.GetID() for v in volumes]
        self.folders = folders
        self.validation_folders = [str(f) for f in validation_folders if f]
        self.python = list(python)
        self.env = env
        self.temp_root = temp_root
        self.checkpoint = Path(checkpoint) if checkpoint else checkpoint_path(options.name)
        self.resume = resume
        if resume and not self.checkpoint.exists():
            raise JobError(f"there is no checkpoint to resume from ({self.checkpoint})")
        self.runner_factory = runner_factory
        self.runner = None
        self.phase = "not started"
        self.temp_dir: Optional[Path] = None
        self.loss_table = loss_table
        self.created: list[Any] = []
        self.summary: dict[str, Any] = {}
        self.installed_path: Optional[Path] = None
        self._state = RunState.NOT_STARTED
        self._error = ""

    trains = True  # a training run: a loss curve and a resumable checkpoint

    def _engine_args(self, data: list[str]) -> list[Any]:
        """The engine command of the first phase, for these data files and folders."""
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        args = ["train", "--data", *data, "-o", self.model_file, "--checkpoint", self.checkpoint,
                *self.options.cli_args(), "--progress", "json"]
        if self.validation_folders:
            args += ["--val-data", *self.validation_folders]
        if self.resume:
            args += ["--resume", self.checkpoint]
        return args

    @property
    def model_file(self) -> Path:
        """The model file the training run writes (inside the temporary folder)."""
        return self.temp_dir / f"{self.options.name}.safetensors"

    def start(self) -> "TrainingJob":
        """Write scene volumes to a temporary folder, create the loss table, start training."""
        self.temp_dir = Path(tempfile.mkdtemp(prefix="synomaly-train-", dir=self.temp_root))
        try:
            data: list[str] = []
            for index, volume_id in enumerate(self.volume_ids):
                volume = self.scene.GetNodeByID(volume_id)
                path = self.temp_dir / "data" / f"{index:03d}_{_safe_name(volume.GetName())}.nrrd"
                data.append(str(bridge.write_volume(volume, path)))
            data += self.folders
            command = engine_command(self.python, *self._engine_args(data))
            if self.trains and self.loss_table is None:
                self.loss_table = bridge.new_loss_table(self.scene, f"{self.options.name} training loss")
                self.created.append(self.loss_table)
            self.runner = self.runner_factory(command, env=self.env)
            self.phase = "train"
            self._state = RunState.RUNNING
            self.runner.start()
        except Exception:
            self._remove_created()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        return self

    def adopt(self, *nodes) -> None:
        """Nodes made for this run (e.g. the loss chart) that go away if it is cancelled."""
        self.created.extend(n for n in nodes if n is not None)

    def poll(self) -> list[Progress]:
        """New progress records (loss points go into the loss table); advances through the phases."""
        if self.runner is None or self._state is not RunState.RUNNING:
            return []
        events = self.runner.poll()
        for event in events:
            if event.stage == "train" and "loss" in event.extra and self.loss_table is not None:
                try:
                    bridge.append_loss(self.loss_table, event.done, float(event.extra["loss"]),
                                       event.extra.get("val_loss"))
                except (TypeError, ValueError):
                    pass
        if self.runner.state is RunState.FAILED:
            self._fail(self.runner.error_message)
        elif self.runner.state is RunState.SUCCEEDED:
            if self.phase == "train":
                for record in self.runner.records:
                    self.summary.update(record)
                if not self.model_file.exists():
                    self._fail("the training run ended without writing a model file")
                else:
                    command = engine_command(self.python, "install-model", self.model_file, "--name", self.options.name)
                    self.phase = "install"
                    self.runner = self.runner_factory(command, env=self.env)
                    self.runner.start()
                    events.append(Progress("install", 0, 1, f"installing {self.options.name}"))
            elif self.phase == "install":
                self.phase = "done"
                self._state = RunState.SUCCEEDED
                if self.trains:
                    self.checkpoint.unlink(missing_ok=True)
                self._cleanup_temp()
                events.append(Progress("done", 1, 1, f"{self.options.name} is installed"))
        return events

    def _fail(self, message: str) -> None:
        self._state = RunState.FAILED
        self._error = message or "training failed"
        self._cleanup_temp()

    @property
    def state(self) -> RunState:
        """NOT_STARTED, RUNNING (training or installing), SUCCEEDED, FAILED or CANCELLED."""
        return self._state

    @property
    def error_message(self) -> str:
        """Why the run failed."""
        return self._error if self._state is RunState.FAILED else ""

    @property
    def can_resume(self) -> bool:
        """True when a checkpoint for this model name exists."""
        return self.checkpoint.exists()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> RunState:
        """Block until both phases end (batch use and tests)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state is RunState.RUNNING and (deadline is None or time.monotonic() < deadline):
            self.poll()
            time.sleep(interval)
        return self._state

    def cancel(self) -> None:
        """Stop the engine (it saves a checkpoint for resuming), remove this run's nodes and temp folder."""
        if self._state not in (RunState.RUNNING, RunState.NOT_STARTED):
            return  # finished runs keep their results
        if self.runner is not None:
            self.runner.cancel()
        self._state = RunState.CANCELLED
        self._remove_created()
        self._cleanup_temp()

    def _remove_created(self) -> None:
        for node in reversed(self.created):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.created = []
        self.loss_table = None

    def _cleanup_temp(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class TuningJob(TrainingJob):
    """Tune an installed model on healthy volumes (`synomaly tune`: synthetic lesions, a sweep of detection
    settings, calibration; no labels) and install the result under `options.name`. The same phases, progress
    and cancel as training; no checkpoint and no loss curve."""

    trains = False

    def __init__(self, scene, options: TrainingOptions, volumes: Sequence[Any] = (), folders: Sequence[str] = (),
                 **kwargs: Any) -> None:
        if not options.base:
            raise JobError("choose the model to tune (the base model)")
        super().__init__(scene, options, volumes, folders, **kwargs)

    def _engine_args(self, data: list[str]) -> list[Any]:
        return ["tune", self.options.base, "--data", *data, "-o", self.model_file, "--device",
                self.options.device or "auto", "--progress", "json"]

    @property
    def can_resume(self) -> bool:
        return False


# ---------------------------------------------------------------- engine commands that touch no scene


class EngineJob(RunnerJob):
    """One engine command that touches no scene (add a model file, write the demo case) in a child
    process: started, polled, waited for and cancelled as a detection is; `result()` once it succeeded."""

    def __init__(self, args: Sequence[Any], python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                 result: Callable[[], Any] = lambda: None, runner_factory: RunnerFactory = ProcessRunner) -> None:
        self.command = engine_command(python, *args)
        self.env = dict(env) if env is not None else None
        self.runner_factory = runner_factory
        self.runner: Any = None
        self._result = result

    def start(self) -> "EngineJob":
        """Start the engine process."""
        self.runner = self.runner_factory(self.command, env=self.env)
        self.runner.start()
        return self

    def cancel(self) -> None:
        """Stop the engine (it writes nothing it has not finished)."""
        if self.runner is not None:
            self.runner.cancel()

    def result(self) -> Any:
        """What the command made (a model name, a file path); JobError unless the run succeeded."""
        if self.state is not RunState.SUCCEEDED:
            raise JobError(self.error_message or f"the engine run {self.state.value}")
        return self._result()


def add_model_job(path: str | Path, python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                  name: Optional[str] = None, overwrite: bool = False,
                  runner_factory: RunnerFactory = ProcessRunner) -> EngineJob:
    """A job that puts a model file into the user model folder (checked and copied, or the authors'
    checkpoint converted); its result is the model's registry name. Not started."""
    name = name or model_name_for_file(path)
    return EngineJob(add_model_args(path, name, overwrite), python, env, result=lambda: name,
                     runner_factory=runner_factory)


def demo_data_job(out_dir: str | Path, python: Sequence[str], env: Optional[Mapping[str, str]] = None,
                  runner_factory: RunnerFactory = ProcessRunner) -> EngineJob:
    """A job that has the engine write its demo case into `out_dir`; its result is the case's path. Not started."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DEMO_FILE

    def written() -> Path:
        if not path.exists():
            raise JobError(f"the engine finished but wrote no {DEMO_FILE}")
        return path

    return EngineJob(["demo-data", "-o", out_dir], python, env, result=written, runner_factory=runner_factory)


def run_to_end(job: EngineJob, timeout: Optional[float] = None) -> Any:
    """Start `job` if needed, wait for it (blocking: scripts, self-tests) and return its result."""
    if job.state is RunState.NOT_STARTED:
        job.start()
    if job.wait(timeout) is RunState.RUNNING:
        job.cancel()
        raise JobError(f"the engine did not finish within {timeout:g} s")
    return job.result()

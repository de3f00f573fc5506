"""Self-tests of SynomalyTraining, run inside Slicer; a stand-in engine replaces torch (no GPU needed)."""

import os
import shutil
import tempfile
import time
import unittest

import slicer

from SynomalyDetectLib import engine, jobs, runner



def _fake_engine() -> str:
    """The stand-in engine of SynomalyDetect's self-tests (installed next to this file, or in that module)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synomaly_fake_engine.py")
    if os.path.exists(here):
        return here
    detect = os.path.dirname(slicer.modules.synomalydetect.path)
    return os.path.join(detect, "Testing", "Python", "synomaly_fake_engine.py")


FAKE_ENGINE = _fake_engine()


class SynomalyTrainingSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tmp = tempfile.mkdtemp(prefix="synomaly-training-selftest-")
        self.models = os.path.join(self.tmp, "models")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _logic(self, **environment):
        from SynomalyTraining import SynomalyTrainingLogic

        environment.setdefault("SYNOMALY_MODELS_DIR", self.models)
        return SynomalyTrainingLogic(python=runner.python_command() + [FAKE_ENGINE], extraEnvironment=environment)

    def _healthy_volume(self):
        logic = self._logic()
        path = engine.generate_demo_data(os.path.join(self.tmp, "demo"), logic.python, logic.environment())
        return slicer.util.loadVolume(str(path))

    def test_training_installs_the_model_and_records_the_loss(self):
        volume = self._healthy_volume()
        job = self._logic().train(jobs.TrainingOptions(name="selftest", iterations=12), [volume], timeout=120)
        self.assertTrue(os.path.exists(os.path.join(self.models, "selftest.safetensors")))
        self.assertEqual(job.loss_table.GetTable().GetNumberOfRows(), 12)
        self.assertFalse(job.checkpoint.exists())
        self.assertFalse(job.temp_dir.exists())

    def test_cancel_then_resume(self):
        volume = self._healthy_volume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        logic = self._logic(FAKE_SYNOMALY_DELAY="0.2")
        options = jobs.TrainingOptions(name="resumable", iterations=30)
        job = logic.start(options, [volume])
        deadline = time.monotonic() + 60
        while job.loss_table.GetTable().GetNumberOfRows() < 3 and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        job.cancel()
        self.assertEqual(job.state, runner.RunState.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertTrue(logic.checkpointExists("resumable"))
        resumed = self._logic().train(options, [volume], resume=True, timeout=120)
        self.assertLess(resumed.loss_table.GetTable().GetNumberOfRows(), 30)
        self.assertTrue(os.path.exists(os.path.join(self.models, "resumable.safetensors")))

    def test_remove_user_model(self):
        logic = self._logic()
        os.makedirs(self.models, exist_ok=True)
        path = os.path.join(self.models, "old.safetensors")
        open(path, "wb").close()
        logic.removeModel("old")
        self.assertFalse(os.path.exists(path))

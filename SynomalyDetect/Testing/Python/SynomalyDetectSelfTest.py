"""Self-tests of SynomalyDetect, run inside Slicer (ctest, or "Reload and Test"); no GPU needed.

Most tests run the whole module logic against a stand-in engine (synomaly_fake_engine.py, numpy and
SimpleITK only), so they need neither torch nor a model. The last test runs the real engine on the
demo case when its dependencies and a model are installed, and is skipped otherwise.
"""

import os
import shutil
import tempfile
import time
import unittest

import slicer

from SynomalyDetectLib import bridge, engine, jobs, runner

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_ENGINE = os.path.join(HERE, "synomaly_fake_engine.py")


def _logic(**environment):
    from SynomalyDetect import SynomalyDetectLogic

    return SynomalyDetectLogic(python=runner.python_command() + [FAKE_ENGINE], extraEnvironment=environment)


class SynomalyDetectSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tmp = tempfile.mkdtemp(prefix="synomaly-selftest-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _demo_volume(self):
        logic = _logic()
        path = engine.generate_demo_data(self.tmp, logic.python, logic.environment())
        return slicer.util.loadVolume(str(path))

    def test_volume_geometry_round_trip(self):
        """An oblique volume written for the engine and read back keeps spacing, origin and direction."""
        import numpy as np

        matrix = np.array([[0.0, -0.8, 0.0, 12.5], [0.6, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
        volume = bridge.add_volume_from_array(slicer.mrmlScene, np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6),
                                              matrix, "oblique")
        path = bridge.write_volume(volume, os.path.join(self.tmp, "oblique.nrrd"))
        back = bridge.read_volume(path)
        np.testing.assert_allclose(bridge.ijk_to_ras(back), matrix, atol=1e-6)
        np.testing.assert_array_equal(bridge.array_from_volume(back), bridge.array_from_volume(volume))

    def test_detection_loads_all_outputs(self):
        volume = self._demo_volume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        result = _logic().process(volume, jobs.DetectionOptions(device="cpu"), showResults=True, timeout=120)
        self.assertEqual(len(result.created), 4)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertEqual(len(result.lesions), 1)
        segmentation = result.segmentation
        self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()).GetID(),
                         volume.GetID())
        names = bridge.segment_names_and_colors(segmentation)
        self.assertEqual(names[0][1], "Anomaly")
        self.assertNotEqual(names[0][2], (0.5, 0.5, 0.5))
        np_input = bridge.ijk_to_ras(volume)
        for node in (result.counterfactual, result.anomaly_map):
            self.assertTrue(((bridge.ijk_to_ras(node) - np_input) ** 2).sum() < 1e-10)

    def test_chosen_output_is_reused_and_nothing_else_replaced(self):
        volume = self._demo_volume()
        chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my counterfactual")
        bystander = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unrelated")
        outputs = jobs.DetectionOutputs(counterfactual=chosen)
        result = _logic().process(volume, jobs.DetectionOptions(), outputs, timeout=120)
        self.assertIs(result.counterfactual, chosen)
        self.assertIsNotNone(chosen.GetImageData())
        self.assertIsNone(bystander.GetImageData())
        self.assertEqual(len(result.created), 3)

    def test_input_cannot_be_an_output(self):
        volume = self._demo_volume()
        with self.assertRaises(jobs.JobError):
            _logic().start(volume, jobs.DetectionOptions(), jobs.DetectionOutputs(anomaly_map=volume))

    def test_cancel_leaves_the_scene_as_it_was(self):
        volume = self._demo_volume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = _logic(FAKE_SYNOMALY_DELAY="0.5").start(volume, jobs.DetectionOptions())
        deadline = time.monotonic() + 60
        while job.runner.last_progress is None and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        pid = job.runner.pid
        job.cancel()
        self.assertEqual(job.state, runner.RunState.CANCELLED)
        self.assertFalse(job.temp_dir.exists())
        self.assertIsNotNone(job.runner.returncode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        if os.name != "nt":
            with self.assertRaises(OSError):
                os.kill(pid, 0)

    def test_engine_error_reaches_the_user(self):
        volume = self._demo_volume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RuntimeError) as caught:
            _logic(FAKE_SYNOMALY_FAIL="3").process(volume, jobs.DetectionOptions(), timeout=60)
        self.assertIn("fake failure requested", str(caught.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_next_lesion_moves_the_slice_views(self):
        volume = self._demo_volume()
        logic = _logic()
        result = logic.process(volume, jobs.DetectionOptions(), showResults=True, timeout=120)
        lesion = result.lesions[0]
        logic.jumpToLesion(lesion, result.segmentation)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.assertAlmostEqual(red.GetSliceOffset(), lesion.centroid_ras[2], delta=2.0)

    def test_real_engine_on_the_demo_case(self):
        """The real engine, on CPU, when torch, MONAI and a model are installed (skipped otherwise)."""
        from SynomalyDetect import SynomalyDetectLogic

        if engine.missing_packages():
            self.skipTest("engine dependencies not installed: " + ", ".join(engine.missing_packages()))
        usable = [m for m in engine.list_models() if "card" in m]
        if not usable:
            self.skipTest("no model installed")
        logic = SynomalyDetectLogic()
        path = engine.generate_demo_data(self.tmp, logic.python, logic.environment())
        volume = slicer.util.loadVolume(str(path))
        options = jobs.DetectionOptions(model=usable[0]["name"], fpr=None, threshold=0.25, device="cpu")
        result = logic.process(volume, options, timeout=600)
        self.assertEqual(result.counterfactual.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())

"""Library of the SynomalyDetect and SynomalyTraining Slicer modules.

- runner: the engine's command line in a child process, with JSON progress, cancel and cleanup (no Qt)
- bridge: volume, segmentation and table nodes <-> arrays, SimpleITK and the engine's files
- review: side-by-side views, overlay, jumping to lesions, loss chart
- jobs: detection and training runs from scene to scene
- panel: what both module panels share (the job panel: start, poll, cancel; the engine-logic base; self-tests)
- engine: command lines, environment and the model registry
- dependencies: first-use installation of torch and the engine's packages inside Slicer

Submodules are imported explicitly (`from SynomalyDetectLib import bridge`) so that importing
the package itself costs nothing.
"""

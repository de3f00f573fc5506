"""The Python API as the README shows it, in a fresh interpreter."""

import subprocess
import sys


def test_public_names_work_in_a_fresh_interpreter():
    code = (
        "import synomaly\n"
        "from synomaly import DetectionSettings\n"
        "assert callable(synomaly.detect) and synomaly.DetectionSettings is DetectionSettings\n"
        "assert callable(synomaly.load_model) and callable(synomaly.read_image) and callable(synomaly.tune_model)\n"
        "assert DetectionSettings(fpr=1e-3).fpr == 1e-3\n"
        "try:\n"
        "    synomaly.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

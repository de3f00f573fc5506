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


def readme_python_blocks() -> list[str]:
    """The code of every ```python block of the README, in order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert readme_python_blocks(), "the README shows the Python API; the block pattern no longer finds it"


def test_every_readme_python_block_runs(tmp_path, phantom, tiny_model_file):
    """Each block runs in its own fresh interpreter, in a folder holding the files the README names:
    `scan.nii.gz` (a small generated head-like volume) and `model.safetensors` (the tiny model); registry
    names resolve to the shipped models only (an empty user folder)."""
    import shutil

    import SimpleITK as sitk

    from conftest import synomaly_env

    image = sitk.GetImageFromArray(phantom((6, 40, 40), seed=3))
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    shutil.copyfile(tiny_model_file, tmp_path / "model.safetensors")
    env = synomaly_env(SYNOMALY_MODELS_DIR=str(tmp_path / "user-models"))
    for number, code in enumerate(readme_python_blocks(), 1):
        script = tmp_path / f"readme_block_{number}.py"
        script.write_text(code, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=env)
        assert out.returncode == 0, f"README python block {number} fails:\n{code}\n{out.stderr[-3000:]}"

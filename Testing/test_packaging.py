"""A plain (non-editable) install from a wheel: the shipped default model and the brain atlas are inside and the
engine finds them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import synomaly_env

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = "brain-mri-axial.safetensors"
SHIPPED_PARTNER = "brain-mri-axial-128.safetensors"


def copy_source(dest: Path) -> Path:
    """The files a wheel is built from, copied out of the checkout (a build writes build/ and egg-info)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE.txt"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "SynomalyDetect" / "synomaly", dest / "SynomalyDetect" / "synomaly", ignore=skip)
    for resources in ("Models", "Atlas"):
        shutil.copytree(ROOT / "SynomalyDetect" / "Resources" / resources, dest / "SynomalyDetect" / "Resources" / resources)
    return dest


def test_wheel_carries_the_default_model_and_the_atlas_and_the_engine_finds_them(tmp_path):
    source = copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel, = dist.glob("synomaly-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"synomaly/models/{SHIPPED_MODEL}" in names
    assert f"synomaly/models/{SHIPPED_PARTNER}" in names, "the partner the shipped card averages volumes with"
    assert {"synomaly/atlasdata/t1-head-2mm.nrrd", "synomaly/atlasdata/brain-2mm.nrrd"} <= set(names)
    assert (ROOT / "SynomalyDetect" / "Resources" / "Models" / SHIPPED_MODEL).stat().st_size == \
        zipfile.ZipFile(wheel).getinfo(f"synomaly/models/{SHIPPED_MODEL}").file_size

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
                              "--target", str(site)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    code = (
        "import sys, pathlib, synomaly\n"
        "from synomaly.modelio import DEFAULT_MODEL, list_models, read_card, resolve_model_path\n"
        "site = pathlib.Path(sys.argv[1]).resolve()\n"
        "assert pathlib.Path(synomaly.__file__).resolve().is_relative_to(site), synomaly.__file__\n"
        "path = resolve_model_path(DEFAULT_MODEL)\n"
        "assert path.resolve().is_relative_to(site), path\n"
        "assert read_card(path).name == DEFAULT_MODEL\n"
        "assert [m['source'] for m in list_models() if m['name'] == DEFAULT_MODEL] == ['shipped']\n"
        "from synomaly.atlas import _load_atlas, atlas_dir\n"
        "assert atlas_dir().resolve().is_relative_to(site) and _load_atlas()[0].GetSize()[0] > 50, atlas_dir()\n"
        "print(path)\n"
    )
    env = synomaly_env(PYTHONPATH=str(site), SYNOMALY_MODELS_DIR=str(tmp_path / "user-models"))
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()) == site / "synomaly" / "models" / SHIPPED_MODEL

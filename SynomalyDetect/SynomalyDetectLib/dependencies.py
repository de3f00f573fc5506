"""Install the engine's Python packages inside Slicer on first use, with the user's consent.

torch comes from the PyTorch extension (PyTorchUtils picks the build for the user's GPU);
MONAI, scikit-image and safetensors through `slicer.packaging.pip_ensure` (Slicer >= 5.11) or
`slicer.util.pip_install` before. numpy and SimpleITK ship with Slicer and are never installed.
Nothing happens at import time: call `ensure_dependencies()` when the user asks for work.
"""

from __future__ import annotations

from .engine import DEMO_REQUIREMENT, PIP_REQUIREMENTS, TORCH_REQUIREMENT, missing_packages


class DependencyError(RuntimeError):
    """A package the engine needs is missing and was not installed."""


def ensure_torch() -> None:
    """Install PyTorch through the PyTorch extension if needed (it asks the user first)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError as exc:
        raise DependencyError(
            "Synomaly needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and restart Slicer."
        ) from exc
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled():
        return
    torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise DependencyError("PyTorch was not installed; Synomaly cannot run without it.")


def ensure_pip_packages(requester: str) -> None:
    """Install MONAI, scikit-image and safetensors if missing, after asking the user."""
    import slicer

    requirements = [PIP_REQUIREMENTS[name] for name in missing_packages() if name in PIP_REQUIREMENTS]
    if not requirements:
        return
    try:
        import slicer.packaging as packaging
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements, requester=requester)  # asks for consent itself
    else:
        question = (f"{requester} needs these Python packages, which are not installed yet:\n\n"
                    + "\n".join(requirements) + "\n\nDownload and install them now (a few hundred MB)?")
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=f"{requester}: install packages"):
            raise DependencyError("the packages were not installed; " + ", ".join(requirements) + " are needed")
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)
    still = [name for name in missing_packages() if name in PIP_REQUIREMENTS]
    if still:
        raise DependencyError("these packages are still missing: " + ", ".join(still))


def ensure_dependencies(requester: str = "Synomaly") -> None:
    """Everything the engine needs, installed with consent; raises DependencyError otherwise."""
    missing = missing_packages()
    if not missing:
        return
    if "torch" in missing:
        ensure_torch()
    ensure_pip_packages(requester)


def ensure_demo_data_package(requester: str = "Synomaly") -> None:
    """The demo case is built from the MNI152 template inside the `nilearn` wheel: install it (without
    its dependencies, a few MB) after asking, if it is missing."""
    import importlib.util

    import slicer

    if importlib.util.find_spec("nilearn") is not None:
        return
    question = (f"{requester} builds its demo case from the MNI152 brain template shipped in the '{DEMO_REQUIREMENT}' "
                "Python package, which is not installed.\n\nInstall it now (without its dependencies)?")
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=f"{requester}: install package"):
        raise DependencyError(f"the demo case needs the '{DEMO_REQUIREMENT}' package")
    with slicer.util.WaitCursor():
        slicer.util.pip_install(f"--no-deps {DEMO_REQUIREMENT}")

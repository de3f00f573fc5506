"""Static checks of the Slicer extension: what a Slicer build or the Extensions Index would reject,
caught without Slicer: files listed in CMake, panels bound to parameters, catalog metadata, imports, icons."""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import skip_or_fail_in_ci

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("SynomalyDetect", "SynomalyTraining")
# Slicer's published catalog-entry schema (Slicer/Schemas), carried here so a clone outside the workspace checks it
SCHEMA = ROOT / "Testing" / "data" / "catalog-entry-schema-v1.0.2.json"
WORKSPACE_SCHEMA = ROOT.parent / "shared" / "slicer" / SCHEMA.name
EXTENSION = "SynomalyExtension"
#: What a Slicer module file may import at module scope besides the standard library.
ALLOWED_MODULE_SCOPE = {"slicer", "vtk", "qt", "ctk", "SynomalyDetectLib", "__future__"}
#: Engine modules of plain data (standard library only, checked below) that the Slicer side may import anywhere.
LIGHT_ENGINE_MODULES = {"synomaly.settings", "synomaly.contract"}
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


# ---------------------------------------------------------------- helpers


def cmake_set(path: Path, variable: str) -> list[str]:
    """Items of `set(VARIABLE ...)` in a CMakeLists.txt, with ${MODULE_NAME} and the lists it names
    (${OTHER_VARIABLE} of the same file) resolved."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    module = re.search(r"set\(\s*MODULE_NAME\s+(\S+?)\s*\)", text)
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert match, f"{path} has no set({variable} ...)"
    items = match.group(1).split()
    if module:
        items = [item.replace("${MODULE_NAME}", module.group(1)) for item in items]
    expanded = []
    for item in items:
        listed = re.fullmatch(r"\$\{(\w+)\}", item)
        expanded += cmake_set(path, listed.group(1)) if listed else [item]
    return expanded


def cmake_variables(path: Path) -> set[str]:
    """The names of the variables a CMakeLists.txt sets."""
    return set(re.findall(r"^\s*set\(\s*(\w+)", re.sub(r"#[^\n]*", "", path.read_text()), re.M))


def cmake_extension_vars(path: Path) -> dict[str, str]:
    """EXTENSION_* variables of the top-level CMakeLists.txt (quoted values)."""
    text = path.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r'set\(\s*(EXTENSION_\w+)\s+"([^"]*)"\s*\)', text)}


def s4ext(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def module_files(module: str, suffix: str) -> set[str]:
    base = ROOT / module
    return {p.relative_to(base).as_posix() for p in base.rglob(f"*{suffix}")
            if not (IGNORED_PARTS & set(p.parts)) and not any(part.endswith(".egg-info") for part in p.parts)}


def parameter_node_fields(module: str) -> tuple[dict[str, ast.expr], set[str]]:
    """Annotated fields of the @parameterNodeWrapper class and the module's CODE_MANAGED_PARAMETERS."""
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    fields: dict[str, ast.expr] = {}
    code_managed: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    fields[item.target.id] = item.annotation
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CODE_MANAGED_PARAMETERS"
                                                for t in node.targets):
            code_managed = set(ast.literal_eval(node.value))
    assert fields, f"{module}.py has no @parameterNodeWrapper class"
    return fields, code_managed


def ui_widgets(module: str) -> list[tuple[str, str, str | None]]:
    """(class, name, SlicerParameterName or None) of every widget in the module's .ui file."""
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    out = []
    for widget in tree.iter("widget"):
        param = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                param = prop.findtext("string")
        out.append((widget.get("class"), widget.get("name"), param))
    return out


def annotation_kind(annotation: ast.expr) -> tuple[str, bool]:
    """('str'|'int'|'float'|'bool'|'node'|'list'|..., has a Choice annotation)."""
    choice = False
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name) and annotation.value.id == "Annotated":
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        annotation = elements[0]
        choice = any(isinstance(e, ast.Call) and getattr(e.func, "id", "") == "Choice" for e in elements[1:])
    if isinstance(annotation, ast.Subscript):
        return "list", choice
    name = annotation.id if isinstance(annotation, ast.Name) else ast.unparse(annotation)
    return ("node" if name.startswith("vtkMRML") else name), choice


#: Which widget classes Slicer's parameterNodeWrapper GUI connectors bind to which field types.
CONNECTORS = {
    ("str", True): {"QComboBox", "ctkComboBox"},
    ("str", False): {"QLineEdit", "QLabel", "QTextEdit"},
    ("float", True): {"QComboBox", "ctkComboBox"},
    ("float", False): {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
                       "ctkDoubleSpinBox", "qMRMLSpinBox"},
    ("int", True): {"QComboBox", "ctkComboBox"},
    ("int", False): {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    ("bool", False): {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    ("node", False): {"qMRMLNodeComboBox"},
}


# ---------------------------------------------------------------- CMake lists every file


@pytest.mark.parametrize("module", MODULES)
def test_every_python_file_of_the_module_is_listed_in_its_cmakelists(module):
    cmake = ROOT / module / "CMakeLists.txt"
    listed = set(cmake_set(cmake, "MODULE_PYTHON_SCRIPTS"))
    if "SYNOMALY_RESEARCH_SCRIPTS" in cmake_variables(cmake):  # listed too, but not installed (see below)
        listed |= set(cmake_set(cmake, "SYNOMALY_RESEARCH_SCRIPTS"))
    present = module_files(module, ".py")
    missing = sorted(present - listed)
    assert not missing, f"add these to MODULE_PYTHON_SCRIPTS in {module}/CMakeLists.txt: {missing}"
    stale = sorted(p for p in listed if not (ROOT / module / p).is_file())
    assert not stale, f"{module}/CMakeLists.txt lists files that do not exist: {stale}"


def engine_files_by_kind() -> tuple[set[str], set[str]]:
    """The engine's files (as CMake names them) that Slicer gets, and the research ones it does not: the modules
    of the research layer (Testing/test_architecture.py) and the command modules that import one of them."""
    from test_architecture import MODULE_LAYERS, graph, package_modules

    package = ROOT / "SynomalyDetect" / "synomaly"
    sources = package_modules(package)
    research = {m for m in sources if MODULE_LAYERS.get(m) == "research"}
    research |= {a for a, b, _ in graph(sources) if a.startswith("synomaly.cli") and b in research}

    def file_of(name: str) -> str:
        path = package.parent.joinpath(*name.split("."))
        return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(package.parent).as_posix()

    return {file_of(m) for m in sources if m not in research}, {file_of(m) for m in research}


def test_the_engine_is_installed_into_slicer_by_layer_without_the_research_layer():
    """Core, model, pipeline and the command line Slicer runs are installed; datasets, evaluation and their
    commands are not (they come with `pip install synomaly`)."""
    cmake = ROOT / "SynomalyDetect" / "CMakeLists.txt"
    installed = {f for f in cmake_set(cmake, "MODULE_PYTHON_SCRIPTS") if f.startswith("synomaly/")}
    product, research = engine_files_by_kind()
    assert product and research, "the engine package is missing"
    missing = sorted(product - installed)
    assert not missing, f"engine files not installed into Slicer (add to SynomalyDetect/CMakeLists.txt): {missing}"
    shipped = sorted(research & installed)
    assert not shipped, f"research files installed into Slicer (move to SYNOMALY_RESEARCH_SCRIPTS): {shipped}"
    assert set(cmake_set(cmake, "SYNOMALY_RESEARCH_SCRIPTS")) == research
    for layer in ("CORE", "MODEL", "PIPELINE", "INTERFACE"):
        assert f"${{SYNOMALY_{layer}_SCRIPTS}}" in cmake.read_text()


def test_the_command_line_works_with_only_what_slicer_installs(tmp_path):
    """The installed files alone (copied as Slicer installs them): the parser builds, `detect --help` works,
    no research module is imported, and a research command says where it is."""
    import subprocess

    installed = [f for f in cmake_set(ROOT / "SynomalyDetect" / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
                 if f.startswith("synomaly/")]
    for f in installed:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes((ROOT / "SynomalyDetect" / f).read_bytes())
    _, research = engine_files_by_kind()
    research_modules = sorted(f[:-3].replace("/", ".") for f in research)
    check = ("import sys, synomaly.cli as cli; cli.build_parser(); "
             f"assert cli.__file__.startswith({str(tmp_path)!r}), cli.__file__; "
             f"loaded = [m for m in {research_modules!r} if m in sys.modules]; assert not loaded, loaded")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    built = run("-c", check)
    assert built.returncode == 0, built.stderr
    detect = run("-m", "synomaly.cli", "detect", "--help")
    assert detect.returncode == 0 and "--fpr" in detect.stdout, detect.stderr
    for command in ("evaluate", "prepare"):
        refused = run("-m", "synomaly.cli", command, "--data", "x")
        assert refused.returncode != 0 and "pip install synomaly" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("module", MODULES)
def test_every_resource_is_listed_and_exists(module):
    listed = set(cmake_set(ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    present = {p for p in module_files(module, "") if p.startswith("Resources/") and (ROOT / module / p).is_file()
               and not p.endswith((".gitkeep", ".gitignore"))}
    assert not sorted(present - listed), f"add to MODULE_PYTHON_RESOURCES of {module}: {sorted(present - listed)}"
    assert not sorted(listed - present), f"{module}/CMakeLists.txt lists missing resources: {sorted(listed - present)}"


@pytest.mark.parametrize("module", MODULES)
def test_self_tests_are_registered(module):
    testing = (ROOT / module / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in (ROOT / module / "Testing" / "Python").glob(f"{module}*Test.py"):
        assert f"slicer_add_python_unittest(SCRIPT {script.name})" in testing
    assert "add_subdirectory(Testing)" in (ROOT / module / "CMakeLists.txt").read_text()
    assert "add_subdirectory(Python)" in (ROOT / module / "Testing" / "CMakeLists.txt").read_text()


def test_top_level_cmakelists_adds_both_modules():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert f"project({EXTENSION})" in text
    for module in MODULES:
        assert f"add_subdirectory({module})" in text


# ---------------------------------------------------------------- panels bound to parameter nodes


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_match_the_parameter_node(module):
    fields, code_managed = parameter_node_fields(module)
    bound = [param for _, _, param in ui_widgets(module) if param]
    assert len(bound) == len(set(bound)), f"a parameter is bound twice in {module}.ui"
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"{module}.ui binds names that are not parameter-node fields: {unknown}"
    assert code_managed <= set(fields), f"CODE_MANAGED_PARAMETERS names unknown fields: {code_managed - set(fields)}"
    unbound = sorted(set(fields) - set(bound) - code_managed)
    assert not unbound, f"parameter-node fields without a widget in {module}.ui (or CODE_MANAGED_PARAMETERS): {unbound}"
    assert not (code_managed & set(bound)), "a code-managed parameter is also bound in the .ui"


@pytest.mark.parametrize("module", MODULES)
def test_bound_widgets_have_a_gui_connector_for_their_field_type(module):
    fields, _ = parameter_node_fields(module)
    for cls, name, param in ui_widgets(module):
        if not param:
            continue
        kind = annotation_kind(fields[param])
        assert kind in CONNECTORS, f"{param}: no GUI connector for {kind}"
        assert cls in CONNECTORS[kind], f"{name} ({cls}) cannot be bound to {param} of type {kind}"


@pytest.mark.parametrize("module", MODULES)
def test_widgets_used_by_the_module_exist_in_its_ui(module):
    source = (ROOT / module / f"{module}.py").read_text()
    names = {name for _, name, _ in ui_widgets(module)}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert not sorted(used - names), f"{module}.py uses widgets missing from {module}.ui: {sorted(used - names)}"


@pytest.mark.parametrize("module", MODULES)
def test_the_shared_job_panel_finds_its_widgets_in_every_module_ui(module):
    """SynomalyDetectLib/panel.py drives the progress bar, the status line and the sections it locks while a
    job runs (each module's LOCKED_SECTIONS): all of them must be in the module's .ui."""
    panel = (ROOT / "SynomalyDetect" / "SynomalyDetectLib" / "panel.py").read_text()
    names = {name for _, name, _ in ui_widgets(module)}
    used = set(re.findall(r"self\.ui\.(\w+)", panel))
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Widget")
    locked = next(ast.literal_eval(n.value) for n in widget.body
                  if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "LOCKED_SECTIONS" for t in n.targets))
    assert used and locked
    assert not sorted((used | set(locked)) - names), f"missing from {module}.ui: {sorted((used | set(locked)) - names)}"


@pytest.mark.parametrize("module", MODULES)
def test_mrml_widgets_receive_the_scene(module):
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    receivers = {c.findtext("receiver") for c in tree.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {name for cls, name, _ in ui_widgets(module) if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert mrml == receivers


@pytest.mark.parametrize("module", MODULES)
def test_module_file_follows_the_template(module):
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    expected = [module, f"{module}ParameterNode", f"{module}Widget", f"{module}Logic", f"{module}Test"]
    assert classes == expected
    source = (ROOT / module / f"{module}.py").read_text()
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in source


# ---------------------------------------------------------------- imports


def _module_scope_imports(path: Path) -> set[str]:
    """Top-level package names imported outside functions and classes (including under if/try)."""
    roots: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module and node.module not in LIGHT_ENGINE_MODULES:
                    roots.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, field, [])
                    for item in block:
                        visit(item.body if isinstance(item, ast.ExceptHandler) else [item])

    visit(ast.parse(path.read_text()).body)
    return roots


SLICER_SIDE_FILES = sorted(
    [ROOT / m / f"{m}.py" for m in MODULES]
    + list((ROOT / "SynomalyDetect" / "SynomalyDetectLib").glob("*.py"))
    + [p for m in MODULES for p in (ROOT / m / "Testing" / "Python").glob(f"{m}*Test.py")]
)


@pytest.mark.parametrize("path", SLICER_SIDE_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_third_party_import_at_module_scope(path):
    allowed = set(sys.stdlib_module_names) | ALLOWED_MODULE_SCOPE
    third_party = sorted(_module_scope_imports(path) - allowed)
    assert not third_party, f"{path.name} imports {third_party} at module scope; import inside the function that needs it"


@pytest.mark.parametrize("name", sorted(LIGHT_ENGINE_MODULES))
def test_light_engine_modules_import_nothing_beyond_the_standard_library(name):
    import subprocess

    code = (f"import sys; before = set(sys.modules); import {name}; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names); "
            "print(sorted(new - {'synomaly'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- catalog metadata


def test_catalog_entry_is_valid_against_the_schema():
    import jsonschema  # a declared test dependency
    if not SCHEMA.exists():
        skip_or_fail_in_ci(f"schema not found at {SCHEMA}")
    entry = json.loads((ROOT / f"{EXTENSION}.json").read_text())
    jsonschema.validate(entry, json.loads(SCHEMA.read_text()))
    assert entry["build_dependencies"] == ["PyTorch"]


def test_a_check_that_cannot_run_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_or_fail_in_ci("schema not found")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail_in_ci("schema not found")


def test_ci_run_sets_ci_true():
    assert re.search(r"^export CI=true\b", (ROOT / ".ci" / "run").read_text(), re.M)


def test_schema_copy_is_the_workspace_schema():
    if not WORKSPACE_SCHEMA.exists():
        pytest.skip("the workspace's shared/slicer folder is not beside this checkout (the copy is checked above)")
    assert SCHEMA.read_text() == WORKSPACE_SCHEMA.read_text()


def test_catalog_entry_s4ext_and_cmake_agree():
    entry = json.loads((ROOT / f"{EXTENSION}.json").read_text())
    desc = s4ext(ROOT / f"{EXTENSION}.s4ext")
    cmake = cmake_extension_vars(ROOT / "CMakeLists.txt")
    assert cmake["EXTENSION_CATEGORY"] == entry["category"] == desc["category"] == "Segmentation"
    homepage = cmake["EXTENSION_HOMEPAGE"]
    assert homepage == desc["homepage"] == "https://github.com/synomaly/SlicerSynomaly"
    assert entry["scm_url"].removesuffix(".git") == desc["scmurl"].removesuffix(".git") == homepage
    assert entry.get("scm_revision", "main") == desc["scmrevision"]
    depends = cmake["EXTENSION_DEPENDS"].split()
    assert depends == entry["build_dependencies"] == desc["depends"].split() == ["PyTorch"]
    assert cmake["EXTENSION_DESCRIPTION"] == desc["description"]
    assert cmake["EXTENSION_CONTRIBUTORS"] == desc["contributors"]
    assert cmake["EXTENSION_ICONURL"] == desc["iconurl"]
    assert cmake["EXTENSION_SCREENSHOTURLS"].split() == desc["screenshoturls"].split()
    assert entry.get("tier", 1) == int(desc.get("tier", 1))


def test_repository_name_contains_slicer_as_the_extensions_index_requires():
    cmake = cmake_extension_vars(ROOT / "CMakeLists.txt")
    entry = json.loads((ROOT / f"{EXTENSION}.json").read_text())
    urls = [cmake["EXTENSION_HOMEPAGE"], entry["scm_url"], cmake["EXTENSION_ICONURL"],
            *cmake["EXTENSION_SCREENSHOTURLS"].split()]
    repositories = {re.match(r"https://(?:github\.com|raw\.githubusercontent\.com)/[^/]+/([^/]+)", u).group(1)
                    .removesuffix(".git") for u in urls}
    assert repositories == {"SlicerSynomaly"}
    assert "SlicerSynomaly" in (ROOT / "README.md").read_text()


def test_contributors_are_names_with_their_organisations():
    contributors = cmake_extension_vars(ROOT / "CMakeLists.txt")["EXTENSION_CONTRIBUTORS"]
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*", contributors), contributors
    people = re.findall(r"[^,()]+ \([^()]+\)", contributors)
    for module in MODULES:
        match = re.search(r"self\.parent\.contributors = (\[.*?\])", (ROOT / module / f"{module}.py").read_text())
        assert match and [p.strip() for p in ast.literal_eval(match.group(1))] == [p.strip() for p in people]


def test_icon_url_points_at_the_extension_icon_in_the_repository():
    url = cmake_extension_vars(ROOT / "CMakeLists.txt")["EXTENSION_ICONURL"]
    relative = url.split("/main/", 1)[1]
    assert (ROOT / relative).is_file()


def repository_path(url: str) -> str:
    """The path inside the repository of a GitHub raw or blob URL (any owner, repository and branch)."""
    match = (re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", url)
             or re.fullmatch(r"https://github\.com/[^/]+/[^/]+/(?:blob|raw)/[^/]+/(.+?)(?:\?raw=true)?", url))
    assert match, f"not a GitHub raw or blob URL: {url}"
    return match.group(1)


def test_repository_path_of_raw_and_blob_urls():
    assert repository_path("https://raw.githubusercontent.com/o/r/main/Docs/S/a.png") == "Docs/S/a.png"
    assert repository_path("https://github.com/o/r/blob/main/Docs/a.png") == "Docs/a.png"
    assert repository_path("https://github.com/o/r/raw/main/Docs/a.png?raw=true") == "Docs/a.png"


def test_every_screenshot_url_is_a_picture_in_the_repository():
    cmake = cmake_extension_vars(ROOT / "CMakeLists.txt")["EXTENSION_SCREENSHOTURLS"].split()
    desc = s4ext(ROOT / f"{EXTENSION}.s4ext")["screenshoturls"].split()
    assert cmake, "the extension lists no screenshot"
    import imageio.v3 as imageio  # installed with scikit-image
    for url in dict.fromkeys(cmake + desc):
        path = ROOT / repository_path(url)
        assert path.is_file(), f"{url} points to {path.relative_to(ROOT)}, which is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert path.stat().st_size < 400_000, f"{path.name} is {path.stat().st_size // 1024} KB"
        rgb = np.asarray(imageio.imread(path))[..., :3].astype(float)
        assert rgb.std() > 20, f"{path.name} is (nearly) blank"


ICONS = [ROOT / f"{EXTENSION}.png"] + [ROOT / m / "Resources" / "Icons" / f"{m}.png" for m in MODULES]


@pytest.mark.parametrize("path", ICONS, ids=lambda p: p.name)
def test_icons_are_128_pixel_pngs_with_content(path):
    import imageio.v3 as imageio  # installed with scikit-image
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(imageio.imread(path))
    assert image.shape[:2] == (128, 128)
    rgb = image[..., :3].astype(float)
    assert rgb.std() > 20 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50


def test_licence_is_apache_2():
    text = (ROOT / "LICENSE.txt").read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_slicer_installs_the_engine_dependencies_that_pyproject_declares():
    """One list of requirements: what Slicer installs on first use is pyproject's, less what Slicer ships."""
    import tomllib

    sys.path.insert(0, str(ROOT / "SynomalyDetect"))
    try:
        from SynomalyDetectLib import engine
    finally:
        sys.path.pop(0)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    shipped_with_slicer = {"numpy", "SimpleITK"}  # torch comes from the PyTorch extension
    want = {d for d in declared if re.split(r"[\[<>=]", d)[0] not in shipped_with_slicer | {"torch"}}
    assert set(engine.PIP_REQUIREMENTS.values()) == want
    assert any(d.startswith("torch") and d.endswith(engine.TORCH_REQUIREMENT) for d in declared)

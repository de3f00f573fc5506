"""The engine's layers import only downward and no two of its modules import each other (issue 13).

Every module of the `synomaly` package is parsed with `ast`; its imports of other modules of the package,
at module level and inside functions alike, are the edges of a graph. A module's layer is declared once,
in MODULE_LAYERS; an import from a lower layer to a higher one, any cycle, and any private name taken
from another module fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "SynomalyDetect" / "synomaly"

#: The layers, lowest first: a module may import from its own layer and the ones before it.
LAYERS = (
    "core",       # plain data and small pure functions: the contract, errors, card, schedule, noise, metrics
    "model",      # networks, model files and the registry
    "pipeline",   # one scan in, results out: prepare, detect, write, calibrate, tune, train, cohorts
    "research",   # datasets, evaluation data, evaluation and its pictures
    "interface",  # the package's lazy public API and the command line
)

MODULE_LAYERS = {
    "synomaly.contract": "core",
    "synomaly.errors": "core",
    "synomaly.card": "core",
    "synomaly.settings": "core",
    "synomaly.schedule": "core",
    "synomaly.noise": "core",
    "synomaly.filters": "core",
    "synomaly.device": "core",
    "synomaly.progress": "core",
    "synomaly.metrics": "core",
    "synomaly.gdunet": "model",
    "synomaly.modelio": "model",
    "synomaly.plan": "model",
    "synomaly.upstream": "model",
    "synomaly.prepare": "pipeline",
    "synomaly.atlas": "pipeline",
    "synomaly.detect": "pipeline",
    "synomaly.outputs": "pipeline",
    "synomaly.lesions": "pipeline",
    "synomaly.sampledata": "pipeline",
    "synomaly.calibrate": "pipeline",
    "synomaly.tune": "pipeline",
    "synomaly.pairing": "pipeline",
    "synomaly.train": "pipeline",
    "synomaly.cohort": "pipeline",
    "synomaly.datasplit": "research",
    "synomaly.manifest": "research",
    "synomaly.datasets": "research",
    "synomaly.evaldata": "research",
    "synomaly.evalplots": "research",
    "synomaly.evalstats": "research",
    "synomaly.evalruns": "research",
    "synomaly.evalthresholds": "research",
    "synomaly.evalreport": "research",
    "synomaly.evaluate": "research",
    "synomaly.authorsloop": "research",
    "synomaly": "interface",
    "synomaly.cli": "interface",
    "synomaly.cli.__main__": "interface",
    "synomaly.cli.common": "interface",
    "synomaly.cli.training": "interface",
    "synomaly.cli.detection": "interface",
    "synomaly.cli.cohorts": "interface",
    "synomaly.cli.models": "interface",
    "synomaly.cli.data": "interface",
    "synomaly.cli.preparation": "interface",
    "synomaly.cli.evaluation": "interface",
    "synomaly.cli.benchmarks": "interface",
}

Edge = tuple[str, str, str]  # (importing module, imported module, the name taken: "" for the module itself)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """The dotted name of a module file of the package ('synomaly.cli' for synomaly/cli/__init__.py)."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, str]:
    """Module name -> source text of every module of the package."""
    return {module_name(p, package): p.read_text(encoding="utf-8") for p in sorted(package.rglob("*.py"))
            if "__pycache__" not in p.parts}


def imports(name: str, source: str, modules: set[str], is_package: bool = False) -> list[Edge]:
    """Every import of another module of the package in `source`, wherever it stands (top level,
    function, class, TYPE_CHECKING block): (module, imported module, name taken from it)."""
    root = name.split(".")[0]
    here = name if is_package else name.rpartition(".")[0]
    edges: list[Edge] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges += [(name, alias.name, "") for alias in node.names if alias.name.split(".")[0] == root]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                edges.append((name, sub, "") if sub in modules else (name, target, alias.name))
    return [e for e in edges if e[1] != name]


def graph(sources: dict[str, str]) -> list[Edge]:
    """The import edges between the modules of `sources` (module name -> source text)."""
    modules = set(sources)
    packages = {m.rpartition(".")[0] for m in modules if "." in m}
    return [e for m, text in sources.items() for e in imports(m, text, modules, is_package=m in packages)]


def upward(edges: list[Edge], layers: dict[str, str], order: tuple[str, ...] = LAYERS) -> list[str]:
    """Imports from a lower layer to a higher one, as readable lines."""
    rank = {layer: i for i, layer in enumerate(order)}
    return sorted(f"{a} ({layers[a]}) imports {b} ({layers[b]})" for a, b, _ in edges
                  if a in layers and b in layers and rank[layers[a]] < rank[layers[b]])


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    following: dict[str, set[str]] = {}
    for a, b, _ in edges:
        following.setdefault(a, set()).add(b)
        following.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(following[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(following):
        if v not in index:
            visit(v)
    return sorted(found)


def private_names(edges: list[Edge]) -> list[str]:
    """Private names (a leading underscore, dunders aside) one module takes from another."""
    return sorted(f"{a} takes {b}.{n}" for a, b, n in edges
                  if n.startswith("_") and not (n.startswith("__") and n.endswith("__")))


# ---------------------------------------------------------------- the package


SOURCES = package_modules()
EDGES = graph(SOURCES)


def test_every_module_has_a_layer():
    undeclared = sorted(set(SOURCES) - set(MODULE_LAYERS))
    assert not undeclared, f"declare the layer of these modules in MODULE_LAYERS: {undeclared}"
    stale = sorted(set(MODULE_LAYERS) - set(SOURCES))
    assert not stale, f"MODULE_LAYERS names modules that do not exist: {stale}"
    assert set(MODULE_LAYERS.values()) <= set(LAYERS)


def test_no_import_goes_up_a_layer():
    wrong = upward(EDGES, MODULE_LAYERS)
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    found = cycles(EDGES)
    assert not found, "modules that import each other (directly or in a ring): " + "; ".join(
        " <-> ".join(group) for group in found)


def test_no_private_name_is_taken_from_another_module():
    taken = private_names(EDGES)
    assert not taken, "make these public or move them where they are used:\n" + "\n".join(taken)


def test_the_engine_knows_nothing_of_slicer_or_qt():
    for name, text in SOURCES.items():
        roots = {alias.name.split(".")[0] for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        assert not roots & {"slicer", "qt", "vtk", "ctk", "SynomalyDetectLib"}, name


# ---------------------------------------------------------------- the checks themselves


def _toy_edges(sources: dict[str, str]) -> list[Edge]:
    return graph({name: text for name, text in sources.items()})


def test_checks_see_function_local_relative_and_absolute_imports():
    edges = _toy_edges({
        "pkg": "",
        "pkg.low": "def f():\n    from .high import g\n",
        "pkg.high": "import pkg.low\nfrom pkg import low\n",
        "pkg.sub": "",
        "pkg.sub.cmd": "from ..low import _hidden\nfrom . import helper\n",
        "pkg.sub.helper": "",
    })
    assert ("pkg.low", "pkg.high", "g") in edges
    assert ("pkg.high", "pkg.low", "") in edges
    assert ("pkg.sub.cmd", "pkg.sub.helper", "") in edges
    layers = {"pkg": "interface", "pkg.low": "core", "pkg.high": "pipeline", "pkg.sub": "interface",
              "pkg.sub.cmd": "interface", "pkg.sub.helper": "interface"}
    assert upward(edges, layers) == ["pkg.low (core) imports pkg.high (pipeline)"]
    assert cycles(edges) == [["pkg.high", "pkg.low"]]
    assert private_names(edges) == ["pkg.sub.cmd takes pkg.low._hidden"]


@pytest.mark.parametrize("ring", [2, 3])
def test_a_ring_of_imports_is_a_cycle_and_a_chain_is_not(ring):
    names = [f"pkg.m{i}" for i in range(ring)]
    chain = {n: (f"from . import m{i + 1}\n" if i + 1 < ring else "") for i, n in enumerate(names)}
    assert cycles(_toy_edges({"pkg": "", **chain})) == []
    chain[names[-1]] = "from .m0 import something\n"
    assert cycles(_toy_edges({"pkg": "", **chain})) == [sorted(names)]

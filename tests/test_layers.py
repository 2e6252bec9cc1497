"""The import graph of the package follows its layers (imports point one way: the README's Layout).

Every ``import`` of the project's modules, at module level or inside a function, is read from the sources with
``ast`` (nothing is imported) and checked against the layers, bottom first:

1. ``tl_kernels``: the builders; they import nothing from ``dsa``, ``autotune`` or ``benchmarks``;
2. the lower half of ``autotune`` (``flops``, ``sku``, ``space``, ``cache``, ``select``: config lookup for the
   launchers) and ``benchmarks.cases`` (plain data): nothing from ``dsa`` or the upper half of ``autotune``;
3. ``dsa``: the library (reference, launchers, ops, modules, testing); nothing from the upper half of ``autotune``;
4. the upper half of ``autotune`` (tuner, measurement, benchmark, GPU check) and the rest of ``benchmarks``:
   anything below.

Besides: the project's module-level imports form no cycle; no import sits inside a ``try`` whose handler catches
``Exception`` (a broken module must fail loudly, not turn into "untuned"); ``scripts/`` never imports ``tests``;
outside frameworks (transformers) are imported only inside ``dsa/integrations/``, and importing the library loads
none of them (they are optional extras).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tl_kernels", "dsa", "autotune", "benchmarks")
LOWER_AUTOTUNE = frozenset({"autotune", "autotune.flops", "autotune.sku", "autotune.space", "autotune.cache",
                            "autotune.select"})  # fmt: skip
DATA_MODULES = frozenset({"benchmarks", "benchmarks.cases"})
BROAD_EXCEPTIONS = frozenset({"Exception", "BaseException"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*folders: str) -> dict[str, Path]:
    return {_module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "tl_kernels":
        return 1
    if module in LOWER_AUTOTUNE or module in DATA_MODULES:
        return 2
    if top == "dsa":
        return 3
    if top in ("autotune", "benchmarks"):  # benchmarks beyond its data modules: measurement, on top
        return 4
    raise ValueError(f"{module} is in no layer")


def _imports(tree: ast.AST, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of a project module in ``tree``."""
    found: list[tuple[str, int, bool]] = []
    top_level = set(map(id, getattr(tree, "body", [])))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES + ("tests",):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (``from pkg import mod`` names ``pkg.mod``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_points_down_the_layers() -> None:
    modules = _sources(*PACKAGES)
    upward = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name, line, _ in _imports(tree, module):
            target = _known(name, modules)
            if target is None:
                if name.split(".")[0] == "tests":
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {name} (the tests are not a library)")
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({module}, layer {_layer(module)}) imports {target} "
                              f"(layer {_layer(target)})")  # fmt: skip
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_module_level_imports_have_no_cycle() -> None:
    modules = _sources(*PACKAGES)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = {_known(name, modules) for name, _, top in _imports(tree, module) if top}
        graph[module] = {t for t in targets if t is not None and t != module and not module.startswith(t + ".")}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_import_inside_a_broad_except() -> None:
    offenders = []
    for module, path in _sources(*PACKAGES, "scripts").items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
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
                        offenders.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert not offenders, "imports inside a try with a broad except: " + ", ".join(offenders)


def test_scripts_never_import_the_tests() -> None:
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = [name for name, _, _ in _imports(tree, path.stem)]
        assert not [n for n in names if n.split(".")[0] == "tests"], f"{path.name} imports the tests: {names}"


def test_the_layer_checks_catch_a_planted_upward_import(tmp_path: Path) -> None:
    """The graph walk is not vacuous: ``tl_kernels`` importing ``dsa.env`` (the edge this layering removed) is an
    upward edge."""
    tree = ast.parse("from dsa import env\n")
    modules = _sources(*PACKAGES)
    ((name, _, top),) = [item for item in _imports(tree, "tl_kernels.build") if item[0] == "dsa.env"]
    assert top and _layer(_known(name, modules)) > _layer("tl_kernels.build")


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
    for module, path in _sources(*PACKAGES, "scripts").items():
        if module == INTEGRATIONS or module.startswith(INTEGRATIONS + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        offenders += [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line in _framework_imports(tree)]
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

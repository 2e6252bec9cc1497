"""The package's front door (``dsa/__init__.py``): the public ops and main classes are attributes of ``dsa``,
imported lazily, so ``import dsa`` runs nothing and loads no torch."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import dsa

ROOT = Path(__file__).resolve().parents[1]


def test_import_dsa_loads_nothing_heavy() -> None:
    code = "import sys, dsa\nprint(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('dsa.', 'tilelang'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("name", dsa.__all__)
def test_every_export_is_the_object_of_its_home_module(name: str) -> None:
    home = importlib.import_module(dsa._EXPORTS[name])
    assert getattr(dsa, name) is getattr(home, name)
    assert name in dir(dsa)


def test_the_ops_are_the_public_ops_and_unknown_names_fail() -> None:
    from dsa import ops

    assert set(ops.__all__) <= set(dsa.__all__)
    assert dsa.index_topk is ops.index_topk and dsa.sparse_mla_decode is ops.sparse_mla_decode
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        dsa.no_such_name  # noqa: B018
    from dsa import reference  # a submodule still imports through ``from dsa import``

    assert reference.sparse_mla is not dsa.sparse_mla

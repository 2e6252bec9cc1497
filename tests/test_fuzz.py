"""The fuzzer (``scripts/fuzz.py``, ``dsa.fuzz``): it runs the property suite for a while, counts examples, and keeps
a failure it finds so that it replays."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.support import SCRIPTS
from tests.support import run_python as _run

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def test_fuzz_reference_runs_and_reports_examples(tmp_path: Path) -> None:
    proc = _run(
        str(SCRIPTS / "fuzz.py"), "--backend", "reference", "--minutes", "0.2", "--chunk", "3",
        "--db", str(tmp_path / "db"), "--tests", "tests/test_reference.py",
        "-k", "test_sparse_mla_matches_dense_masked_attention",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"examples run: (\d+)", proc.stdout)
    assert match and int(match.group(1)) > 0, proc.stdout
    assert "failures: 0" in proc.stdout


def test_fuzz_finds_and_keeps_a_planted_failure(tmp_path: Path) -> None:
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "from hypothesis import given, strategies as st\n\n"
        "@given(st.integers(min_value=0, max_value=10**6))\n"
        "def test_small(x):\n    assert x < 1000\n"
    )
    db = tmp_path / "db"
    proc = _run(
        str(SCRIPTS / "fuzz.py"),
        "--backend",
        "reference",
        "--minutes",
        "0.3",
        "--chunk",
        "50",
        "--db",
        str(db),
        "--tests",
        str(planted),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fuzz: FAILED" in proc.stdout and "test_planted.py::test_small" in proc.stdout
    assert "x=1000" in proc.stdout, "the shrunk falsifying example must be printed"
    assert any(p.is_file() for p in (db / "examples").rglob("*")), "the failing example must be saved for replay"


def test_fuzz_covers_every_op_form_including_deepseek_v4() -> None:
    """The fuzzer runs every property file (it finds them by ``@given``), so the V4 forms' properties are in its
    run: two-source and ranged sparse_mla, the decode range form and MODEL1 pages, the paged index keys and
    compress_kv, on the reference and (tests/test_backend_agreement*.py) on both backends."""
    from dsa import fuzz

    files = set(fuzz.property_test_files())
    v4 = {"tests/test_backend_agreement.py", "tests/test_backend_agreement_v4.py", "tests/test_sparse_mla_two_source.py",
          "tests/test_compat_model1.py", "tests/test_index_topk_decode.py", "tests/test_compress_kv.py"}  # fmt: skip
    assert v4 <= files, sorted(v4 - files)
    assert not files & {f"tests/{name}" for name in fuzz.NEVER_FUZZ}

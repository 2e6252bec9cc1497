"""``dsa.env``: every ``DSA_*`` reader's parsing (blank means unset; case and spaces ignored for choices) and its error,
which names the variable and what it takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dsa import env

def _assert_reads(
    monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], Any], spelling: str, value: Any, unset: Any
) -> None:
    """``read()`` gives ``unset`` with ``name`` unset or blank and ``value`` with ``name`` set to ``spelling``."""
    for raw in (None, "", "  "):
        if raw is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, raw)
        assert read() == unset, raw
    monkeypatch.setenv(name, spelling)
    assert read() == value


CHOICES: list[tuple[str, Callable[[], Any], str, Any, Any]] = [
    # (variable, reader, a spelling to accept, what it reads as, the value when unset)
    ("DSA_BACKEND", env.backend, " TileLang ", "tilelang", "auto"),
    ("DSA_SELECTION", env.selection, "UNFUSED", "unfused", "fused"),
    ("DSA_PORTABLE", env.portable, "Yes", True, False),
    ("DSA_LOG", env.log_level, "debug", env.LOG_LEVELS["debug"], env.LOG_LEVELS["warning"]),
]


@pytest.mark.parametrize("name, read, spelling, value, unset", CHOICES, ids=[c[0] for c in CHOICES])
def test_choice_variables(
    monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], Any], spelling: str, value: Any, unset: Any
) -> None:
    _assert_reads(monkeypatch, name, read, spelling, value, unset)
    monkeypatch.setenv(name, "sometimes")
    with pytest.raises(ValueError, match=rf"^{name} must be one of \(.*\), got 'sometimes'$"):
        read()


NUMBERS: list[tuple[str, Callable[[], Any], str, str, Any, Any, list[str]]] = [
    # (variable, reader, its unit, a value to accept, what it reads as, the value when unset, values to reject)
    ("DSA_INDEXER_MEMORY_BYTES", env.indexer_memory_bytes, "bytes", " 4096 ", 4096, None, ["0", "-8", "1.5", "lots"]),
    ("DSA_TUNE_CANDIDATE_TIMEOUT_S", env.tune_candidate_timeout_s, "seconds", "2.5", 2.5, 120.0,
     ["0", "-1", "nan", "inf", "soon"]),
]  # fmt: skip


@pytest.mark.parametrize("name, read, unit, spelling, value, unset, bad", NUMBERS, ids=[n[0] for n in NUMBERS])
def test_positive_number_variables(
    monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], Any], unit: str, spelling: str, value: Any,
    unset: Any, bad: list[str],
) -> None:  # fmt: skip
    _assert_reads(monkeypatch, name, read, spelling, value, unset)
    for raw in bad:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=rf"^{name} must be a positive number of {unit}, got '{raw}'$"):
            read()

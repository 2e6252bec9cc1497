"""Every ``DSA_*`` environment variable, read lazily (never at import time), in this one module.

| variable | values | meaning |
|---|---|---|
| ``DSA_BACKEND`` | ``auto`` (default), ``tilelang``, ``reference`` | which implementation the ops dispatch to |
| ``DSA_CACHE_DIR`` | a directory | where tuned configs and cached ptxas reports live (default ``~/.cache/dsa-tilelang``) |
| ``DSA_CPU_COMPILE_FLAGS`` | g++ flags | flags for C-target kernels (default ``-O2``) |
| ``DSA_INDEXER_MEMORY_BYTES`` | bytes > 0 | the most index scores ``index_topk``'s unfused path holds at once (default: a quarter of free device memory on GPU, 1 GiB on CPU) |
| ``DSA_SELECTION`` | ``fused`` (default), ``unfused`` | how ``index_topk`` runs on the kernel backend: the fused kernel (no scores in memory), or the indexer and top-k kernels chunked under ``DSA_INDEXER_MEMORY_BYTES`` |
| ``DSA_PORTABLE`` | ``0`` (default), ``1`` | Hopper runs the portable schedule (sm_90) that other GPUs run |
| ``DSA_LOG`` | ``warning`` (default), ``info``, ``debug`` | how much TileLang logs (its INFO lines: one per compile) |
| ``DSA_TUNE_CANDIDATE_TIMEOUT_S`` | seconds > 0 | the tuner's time limit per candidate step on the GPU (default 120) |

The lower layers (``tl_kernels``, ``autotune.lookup``) read none of these: the launchers and the
tuner pass the values down.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

BACKENDS = ("auto", "tilelang", "reference")
SELECTIONS = ("fused", "unfused")
LOG_LEVELS: dict[str, int] = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_DEFAULT_CACHE_DIR = "~/.cache/dsa-tilelang"
_DEFAULT_LOG = "warning"
# Checking one candidate includes loading its kernel (TileLang's JIT load from the disk cache, or a compile when the
# cache misses); timing it at the largest preset size takes a few seconds. Two minutes leaves room for both.
_BOOL_VALUES: dict[str, bool] = {
    "0": False,
    "1": True,
    "false": False,
    "true": True,
    "no": False,
    "yes": True,
}
_DEFAULT_CANDIDATE_TIMEOUT_S = 120.0
# The folder below the cache directory where ptxas reports are cached by the hash of a kernel's CUDA source.
STATIC_REPORT_SUBDIR = "static-reports"

# DSA_CACHE_DIR as last read, and its Path: launchers ask on every CUDA launch, and building a Path costs more than
# the environment lookup.
_cache_dir_memo: tuple[str | None, Path] | None = None


_Number = TypeVar("_Number", int, float)


def _choice(name: str, default: str, choices: Collection[str]) -> str:
    """The environment variable ``name`` stripped and lower-cased (``default`` when unset or blank); ValueError naming
    the variable and its choices when it is not one of ``choices``."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _positive(name: str, parse: Callable[[str], _Number], unit: str) -> _Number | None:
    """The environment variable ``name`` parsed by ``parse`` (``int`` or ``float``), None when unset or blank;
    ValueError naming the variable unless it is a positive finite number (of ``unit``)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value: _Number | None = parse(raw)
    except ValueError:
        value = None
    # A NaN or infinite bound would never bind (a timeout that never fires); zero or less leaves nothing.
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of {unit}, got {raw!r}")
    return value


def backend() -> str:
    """The value of ``DSA_BACKEND`` (``auto`` when unset)."""
    return _choice("DSA_BACKEND", "auto", BACKENDS)


def portable() -> bool:
    """``DSA_PORTABLE``: whether Hopper gets the portable schedule (sm_90) instead of the Hopper one (sm_90a)."""
    return _BOOL_VALUES[_choice("DSA_PORTABLE", "0", _BOOL_VALUES)]


def cache_dir() -> Path:
    """The tuned-config cache directory (``DSA_CACHE_DIR`` or ``~/.cache/dsa-tilelang``)."""
    global _cache_dir_memo
    raw = os.environ.get("DSA_CACHE_DIR") or None
    memo = _cache_dir_memo
    if memo is not None and memo[0] == raw:
        return memo[1]
    path = Path(raw or _DEFAULT_CACHE_DIR).expanduser()
    _cache_dir_memo = (raw, path)
    return path


def static_report_dir() -> Path:
    """Where ptxas reports of compiled kernels are cached: ``<cache_dir>/static-reports``."""
    return cache_dir() / STATIC_REPORT_SUBDIR


def cpu_compile_flags() -> tuple[str, ...] | None:
    """g++ flags for C-target kernels from ``DSA_CPU_COMPILE_FLAGS``; ``None`` when unset (``tl_kernels.build``'s
    default, ``-O2``)."""
    raw = os.environ.get("DSA_CPU_COMPILE_FLAGS")
    return None if raw is None else tuple(raw.split())


def indexer_memory_bytes() -> int | None:
    """``DSA_INDEXER_MEMORY_BYTES``: the byte budget of one chunk of index scores, ``None`` when unset (the caller's
    device-dependent default)."""
    return _positive("DSA_INDEXER_MEMORY_BYTES", int, "bytes")


def selection() -> str:
    """``DSA_SELECTION``: ``fused`` (default) or ``unfused``, the kernel path of ``index_topk``."""
    return _choice("DSA_SELECTION", "fused", SELECTIONS)


def log_level() -> int:
    """The level of TileLang's logger that ``DSA_LOG`` asks for (``warning`` when unset: its per-compile INFO lines
    do not reach a user's stderr unless asked for)."""
    return LOG_LEVELS[_choice("DSA_LOG", _DEFAULT_LOG, LOG_LEVELS)]


def tune_candidate_timeout_s() -> float:
    """Seconds the tuner waits for one candidate step on the GPU (``DSA_TUNE_CANDIDATE_TIMEOUT_S``, default 120)."""
    value = _positive("DSA_TUNE_CANDIDATE_TIMEOUT_S", float, "seconds")
    return _DEFAULT_CANDIDATE_TIMEOUT_S if value is None else value

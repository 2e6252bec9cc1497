"""Every ``DSA_*`` environment variable, read lazily (never at import time).

| variable | values | meaning |
|---|---|---|
| ``DSA_BACKEND`` | ``auto`` (default), ``tilelang``, ``reference`` | which implementation the ops dispatch to |
| ``DSA_CACHE_DIR`` | a directory | where tuned configs are written and read (default ``~/.cache/dsa-tilelang``) |
| ``DSA_CPU_COMPILE_FLAGS`` | g++ flags | flags for C-target kernels (default ``-O2``) |
| ``DSA_TUNE_CANDIDATE_TIMEOUT_S`` | seconds > 0 | the tuner's time limit per candidate step on the GPU (default 120) |
"""

from __future__ import annotations

import math
import os
from pathlib import Path

BACKENDS = ("auto", "tilelang", "reference")
_DEFAULT_CACHE_DIR = Path("~/.cache/dsa-tilelang")
_DEFAULT_CPU_FLAGS = "-O2"
# Checking one candidate includes loading its kernel (TileLang's JIT load from the disk cache, or a compile when the
# cache misses); timing it at the largest preset size takes a few seconds. Two minutes leaves room for both.
_DEFAULT_CANDIDATE_TIMEOUT_S = 120.0


def backend() -> str:
    """The value of ``DSA_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("DSA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DSA_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def cache_dir() -> Path:
    """The tuned-config cache directory (``DSA_CACHE_DIR`` or ``~/.cache/dsa-tilelang``)."""
    raw = os.environ.get("DSA_CACHE_DIR")
    return Path(raw).expanduser() if raw else _DEFAULT_CACHE_DIR.expanduser()


def cpu_compile_flags() -> list[str]:
    """g++ flags for C-target kernels (``DSA_CPU_COMPILE_FLAGS``, default ``-O2``)."""
    return os.environ.get("DSA_CPU_COMPILE_FLAGS", _DEFAULT_CPU_FLAGS).split()


def tune_candidate_timeout_s() -> float:
    """Seconds the tuner waits for one candidate step on the GPU (``DSA_TUNE_CANDIDATE_TIMEOUT_S``, default 120)."""
    raw = os.environ.get("DSA_TUNE_CANDIDATE_TIMEOUT_S", "").strip()
    if not raw:
        return _DEFAULT_CANDIDATE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    # A NaN or infinite limit would never fire; zero or less would kill every candidate at once.
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"DSA_TUNE_CANDIDATE_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return value

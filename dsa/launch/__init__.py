"""Launchers, one per kernel: ``plan(...)`` once per shape (target, config, compiled kernels; ``None`` where the kernel
cannot take the problem) and ``run(plan, ...)`` per call on validated tensors (``common`` holds the plan cache)."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def launcher(name: str) -> ModuleType:
    """The launcher module ``name`` (e.g. ``"dsa.launch.sparse_mla_bwd"``), imported on first use (a ``sys.modules``
    hit afterwards).

    Callers look the launcher function up on the module at every call, so tests can replace the module with a spy.
    """
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)

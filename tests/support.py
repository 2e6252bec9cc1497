"""What several test modules share: the configs the build and GPU tiers cover, sm_90a builds compiled once per session
with their static reports logged, and running the repository's scripts in a subprocess."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from autotune import space
from dsa import env
from tl_kernels import build as tl_build

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

_BUILDS: dict[tuple[Any, ...], tuple[Any, tl_build.StaticReport, float]] = {}

# An int32 product of a block index and a symbolic size in generated CUDA (``((int)blockIdx.y) * seq_len_kv``): an
# address term that overflows once the sizes multiply past 2**31, even when the sum it enters is widened afterwards.
_INT32_BLOCK_PRODUCT = re.compile(r"\(\(int\)blockIdx\.[xyz]\) \* [A-Za-z_]\w*")


def assert_wide_addressing(source: str) -> None:
    """Every address term that multiplies a block index by a symbolic size (``B``, ``S``, ``S_kv``, ``k``) is formed
    in int64: the kernels serve any length, so no term may wrap at 2**31 (e.g. ``B * S_kv`` rows of KV)."""
    found = sorted(set(_INT32_BLOCK_PRODUCT.findall(source)))
    assert not found, f"int32 products of a block index and a symbolic size: {found}"


def hopper_configs(kernel: str, static: dict[str, Any]) -> list[Any]:
    """Every config of ``kernel``'s tuning space that ``check_config`` accepts for sm_90a at ``static``, the default
    first: exactly what the tuner's ``--full`` search (``autotune.space.full_space``) compiles."""
    module = space.kernel_module(kernel)
    return [module.Config(**config) for config in space.full_space(kernel, static)]


def hopper_build(name: str, builder: Callable[..., Any], **params: Hashable) -> tuple[Any, tl_build.StaticReport]:
    """``builder(**params)`` compiled for sm_90a once per session (ptxas reports cached in ``DSA_CACHE_DIR``), with its
    registers, spills, shared memory, matrix instructions and compile time logged under ``name``."""
    key = (builder.__module__, builder.__qualname__, tuple(sorted(params.items())))
    if key not in _BUILDS:
        start = time.perf_counter()
        kernel, report = tl_build.compile_hopper(builder, report_cache_dir=env.static_report_dir(), **params)
        _BUILDS[key] = (kernel, report, time.perf_counter() - start)
        logger.info(
            "%s: %d registers, %d B spills, %d B smem, mma %s, %.1f s", name, report.registers, report.spill_bytes,
            report.smem_bytes, report.mma_text, _BUILDS[key][2],
        )  # fmt: skip
    kernel, report, _ = _BUILDS[key]
    return kernel, report


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python *args`` from the repository root (this interpreter), its output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)

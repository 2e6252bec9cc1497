"""What several test modules share: the configs the build and GPU tiers cover, sm_90a builds compiled once per session
with their static reports logged, and running the repository's scripts in a subprocess."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import re
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from autotune import tuner
from autotune.lookup import space
from dsa import env
from tests import build_pool
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
    first: exactly what the tuner's ``--full`` search (``autotune.lookup.space.full_space``) compiles."""
    module = space.kernel_module(kernel)
    return [module.Config(**config) for config in space.full_space(kernel, static)]


def _build_key(builder: Callable[..., Any], params: dict[str, Any]) -> tuple[Any, ...]:
    return (builder.__module__, builder.__qualname__, tuple(sorted(params.items())))


def prebuild_hopper(builds: Sequence[tuple[Callable[..., Any], dict[str, Any]]]) -> None:
    """Compile ``builds`` (``(builder, params)``) for sm_90a in parallel, one process per usable CPU, so that the
    tests' :func:`hopper_build` calls then load them from TileLang's disk cache: nvcc and ptxas run one file per
    process, and the build tier is most of the suite's time on a 2-core machine. When the session's build pool
    (``tests.build_pool``) has them, this waits for the pool instead. A failing compile is left for the test to
    report."""
    if build_pool.wait([build_pool.HopperJob.of(b, p) for b, p in builds]) is not None:
        return  # the session's pool built them (a failed build is compiled again by its test, which reports it)
    # The pool's own job and worker function, run here for just these builds.
    jobs = list(dict.fromkeys(build_pool.HopperJob.of(b, p) for b, p in builds if _build_key(b, p) not in _BUILDS))
    workers = min(len(jobs), tuner.default_jobs())
    if workers < 2:
        return
    start = time.perf_counter()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            failures = [error for done, error in pool.map(build_pool.run_job, jobs) if not done]
    except Exception as exc:  # noqa: BLE001 - only a speed-up: the tests compile whatever is missing themselves
        logger.warning("parallel prebuild stopped (%s: %s); the tests compile serially", type(exc).__name__, exc)
        return
    logger.info("prebuilt %d sm_90a kernels on %d processes in %.1f s", len(jobs), workers, time.perf_counter() - start)
    for failure in failures:
        logger.warning("prebuild failed (the test will compile again and report it): %s", failure)


Build = tuple[Callable[..., Any], dict[str, Any]]
"""``(builder, params)``: one sm_90a compile."""


def config_builds(builder: Callable[..., Any], cases: Sequence[tuple[dict[str, Any], Any]]) -> list[Build]:
    """``builder`` at each ``(static, config)`` case: the static parameters plus the config's fields."""
    return [(builder, {**static, **dataclasses.asdict(config)}) for static, config in cases]


def prebuilt_fixture(builds: Callable[[], Sequence[Build]], doc: str = "") -> Any:
    """A module's ``hopper_prebuilt`` fixture (module scope): ``builds()`` compiled in parallel first
    (:func:`prebuild_hopper`), so that the module's build tests load them from TileLang's disk cache. Assign it to
    ``hopper_prebuilt`` in the module and mark the build tests ``usefixtures("hopper_prebuilt")``."""

    @pytest.fixture(scope="module", name="hopper_prebuilt")
    def hopper_prebuilt() -> None:
        prebuild_hopper(builds())

    hopper_prebuilt.__doc__ = doc or "This module's sm_90a builds compiled in parallel first (``prebuild_hopper``)."
    hopper_prebuilt.dsa_builds = builds  # for the session's build pool (``tests.build_pool``), read at collection
    return hopper_prebuilt


def hopper_build_case(
    name: str, builder: Callable[..., Any], case: tuple[dict[str, Any], Any]
) -> tuple[Any, tl_build.StaticReport]:
    """:func:`hopper_build` of ``builder`` at one ``(static, config)`` case."""
    static, config = case
    return hopper_build(name, builder, **static, **dataclasses.asdict(config))


def hopper_build(name: str, builder: Callable[..., Any], **params: Hashable) -> tuple[Any, tl_build.StaticReport]:
    """``builder(**params)`` compiled for sm_90a once per session (ptxas reports cached in ``DSA_CACHE_DIR``), with its
    registers, spills, shared memory, matrix instructions and compile time logged under ``name``."""
    key = _build_key(builder, params)
    if key not in _BUILDS:
        build_pool.wait([build_pool.HopperJob.of(builder, params)])  # when the session's pool has it: in the cache
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

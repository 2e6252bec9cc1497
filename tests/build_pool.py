"""One build pool for the whole test session: every sm_90a and portable build of the build tier, compiled in the
background while the rest of the suite runs.

Why: on a 2-core CI machine the build tier is most of the suite's CPU time (nvcc and ptxas, one file per process),
and the other tiers run mostly on one core. Compiled module by module (each module's builds in parallel before its
tests), the builds left the second core idle for the rest of the session; compiled by one pool started at collection
(at a lower CPU priority, so the tests in the foreground keep their core), they fill it. ``conftest.py`` moves the
build-marked tests to the end of the session, so by the time they run their kernels are usually in TileLang's disk
cache already; each distinct build is compiled once per session.

How the pieces meet:

* a test module declares its builds through ``tests.support.prebuilt_fixture`` (sm_90a builds: ``(builder,
  params)``) or, for tuner compile jobs, by giving its fixture a ``dsa_compile_jobs`` attribute; ``conftest.py``
  collects them from the modules whose build tests were selected and calls :func:`start`;
* the pool runs as ``python -m tests.build_pool FOLDER`` in its own process group (``nice`` +10), with one worker
  per usable CPU, and writes one marker file per finished job (the pickled outcome) into ``FOLDER``;
* a fixture that needs builds calls :func:`wait` (through ``support.prebuild_hopper`` or directly): it returns the
  outcomes once every marker is there, or ``None`` when no pool runs, the pool died, or ``WAIT_TIMEOUT_S`` passed;
  the caller then compiles what it needs itself, exactly as without a pool.

``DSA_TEST_BUILD_POOL=0`` turns the pool off (each module then prebuilds its own builds, as before).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
POOL_ENV = "DSA_TEST_BUILD_POOL"
NICENESS = 10
"""How much lower the pool's CPU priority is than the tests': the foreground tests keep their core."""
WAIT_TIMEOUT_S = 1800.0
POLL_S = 0.25
JOBS_FILE = "jobs.pkl"
LOG_FILE = "pool.log"


@dataclasses.dataclass(frozen=True)
class HopperJob:
    """One sm_90a build of a ``tl_kernels`` builder (``tests.support.hopper_build``'s unit)."""

    module: str
    qualname: str
    params_json: str  # the identity of the build (sorted keys)
    params_pickle: bytes = dataclasses.field(compare=False)  # the parameters as given (tuples stay tuples)

    @classmethod
    def of(cls, builder: Any, params: dict[str, Any]) -> HopperJob:
        key = json.dumps(params, sort_keys=True, default=repr)
        return cls(builder.__module__, builder.__qualname__, key, pickle.dumps(dict(params)))


Job = Any
"""A :class:`HopperJob` or an ``autotune.tuner.CompileJob`` (both frozen dataclasses of strings: picklable and
hashable)."""


def job_key(job: Job) -> str:
    """A file-name-safe key of ``job`` (the same in the pool and in the test process)."""
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.compare}
    text = f"{type(job).__name__}:{json.dumps(fields, sort_keys=True, default=repr)}"
    return hashlib.sha1(text.encode()).hexdigest()


def enabled() -> bool:
    return os.environ.get(POOL_ENV, "1") != "0"


@dataclasses.dataclass
class Pool:
    """A running pool: its process and the folder of its markers."""

    process: subprocess.Popen[bytes]
    folder: Path
    jobs: frozenset[str]


_ACTIVE: list[Pool] = []


def active() -> Pool | None:
    return _ACTIVE[0] if _ACTIVE else None


def start(jobs: Sequence[Job], folder: Path) -> Pool | None:
    """Start the session's pool on ``jobs`` (distinct ones, in order) with its markers in ``folder``; ``None`` when
    there is nothing to build or the pool is turned off."""
    unique = list(dict.fromkeys(jobs))
    if not unique or not enabled() or active() is not None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOBS_FILE).write_bytes(pickle.dumps(unique))
    log = open(folder / LOG_FILE, "wb")  # noqa: SIM115 - the child writes to it for the whole session
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.build_pool", str(folder)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # the tests' session (main() makes its own process group): see main() on why not a session of its own
    log.close()
    pool = Pool(process, folder, frozenset(job_key(j) for j in unique))
    _ACTIVE.append(pool)
    logger.info("build pool: %d builds in the background (pid %d, markers in %s)", len(unique), process.pid, folder)
    return pool


def stop() -> None:
    """Stop the session's pool (and every compile it started), if one runs."""
    while _ACTIVE:
        pool = _ACTIVE.pop()
        if pool.process.poll() is None:
            try:
                os.killpg(pool.process.pid, signal.SIGKILL)  # the pool and every compile it started
            except ProcessLookupError:  # not yet its own group leader: the pool alone
                pool.process.kill()
        pool.process.wait()


def wait(jobs: Sequence[Job], timeout_s: float = WAIT_TIMEOUT_S) -> dict[Job, tuple[bool, Any]] | None:
    """The pool's outcome of every job in ``jobs`` (``(True, result)`` or ``(False, error text)``), once all are
    done; ``None`` when no pool runs, one of ``jobs`` is not in it, the pool died first, or ``timeout_s`` passed."""
    pool = active()
    if pool is None:
        return None
    keys = {job: job_key(job) for job in jobs}
    if not set(keys.values()) <= pool.jobs:
        return None
    started = time.monotonic()
    deadline = started + timeout_s
    outcomes: dict[Job, tuple[bool, Any]] = {}
    while True:
        for job, key in keys.items():
            if job not in outcomes:
                marker = pool.folder / f"{key}.done"
                if marker.is_file():
                    outcomes[job] = pickle.loads(marker.read_bytes())
        if len(outcomes) == len(keys):
            logger.info("build pool: %d builds ready after waiting %.1f s", len(keys), time.monotonic() - started)
            return outcomes
        if pool.process.poll() is not None or time.monotonic() > deadline:
            logger.warning("build pool gone or late (rc %s): the tests compile what is missing", pool.process.poll())
            return None
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------------------------------
# The pool process
# ----------------------------------------------------------------------------------------------------------------------
def run_job(job: Job) -> tuple[bool, Any]:
    """Compile one job in a worker: ``(True, result)`` or ``(False, error text)``."""
    from autotune import tuner
    from dsa import env
    from tl_kernels import build as tl_build

    try:
        if isinstance(job, HopperJob):
            builder = getattr(importlib.import_module(job.module), job.qualname)
            params = pickle.loads(job.params_pickle)
            tl_build.compile_hopper(builder, report_cache_dir=env.static_report_dir(), **params)
            return True, None
        return True, tuner.compile_candidate(job)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which compiles again and fails with the cause
        return False, f"{type(exc).__name__}: {exc}"


def _write_marker(folder: Path, job: Job, outcome: tuple[bool, Any]) -> None:
    marker = folder / f"{job_key(job)}.done"
    tmp = marker.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(outcome))
    tmp.replace(marker)  # atomic: a reader never sees half a marker


def main(folder: Path) -> int:
    """Compile every job of ``folder``'s job file, one worker per usable CPU, writing a marker as each ends."""
    from autotune import tuner
    from tests import build_pool  # run as __main__: the workers must see this module's real name and classes

    # Its own process group, so the test session can stop it with every compile it started; but not its own session:
    # with the kernel's autogroup scheduling a new session gets an equal share of the CPUs whatever its nice value,
    # and would crowd out the tests in the foreground.
    os.setpgrp()
    os.nice(NICENESS)
    jobs: list[Job] = pickle.loads((folder / JOBS_FILE).read_bytes())
    workers = min(len(jobs), tuner.default_jobs())
    start = time.perf_counter()
    print(f"build pool: {len(jobs)} builds on {workers} processes", flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(build_pool.run_job, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker killed (e.g. out of memory)
                outcome = (False, f"build worker failed: {type(exc).__name__}: {exc}")
            build_pool._write_marker(folder, job, outcome)
            print(f"{time.perf_counter() - start:7.1f} s  {'ok ' if outcome[0] else 'ERR'} {job}", flush=True)
    print(f"build pool: done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

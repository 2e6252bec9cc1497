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
* the pool runs as ``python -m tests.build_pool FOLDER`` in its own process group, with one worker per usable CPU
  (``nice`` +10 once it reaches the sm_90a builds; the C-target builds before them run at the tests' priority, since
  the tests wait for them), and writes one marker file per finished job (the pickled outcome) into ``FOLDER``;
* a fixture that needs builds calls :func:`wait` (through ``support.prebuild_hopper`` or directly): it returns the
  outcomes once every marker is there, or ``None`` when no pool runs, the pool died, or ``WAIT_TIMEOUT_S`` passed;
  the caller then compiles what it needs itself, exactly as without a pool.

C-target builds (the CPU tier's kernels, compiled by the launchers the first time a test calls an op) are listed in
``tests/cpu_kernels.json``, recorded from a full run (``pytest --dsa-record-cpu-kernels tests/cpu_kernels.json``):
each kernel with the tests that first compile it. The pool compiles the selected tests' kernels first, in the order
the tests will ask for them, then the sm_90a builds (the build tier runs last). Whichever process starts a C-target
build first claims it (a ``.claim`` file created exclusively): the pool skips a kernel the tests' process already
compiles, and the tests' process waits for one the pool is compiling and then loads it from TileLang's disk cache
(:func:`install_cpu_hook`), so no kernel is compiled twice and neither process runs behind the other. A kernel
missing from the list is compiled by the test that needs it, as without a pool; a stale entry costs one compile.

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
"""How much lower the pool's priority is than the tests' for the sm_90a builds: the foreground tests keep their core.
Not for the C-target builds: a test waiting for one behind a niced process would wait for every other process on the
machine first."""
WAIT_TIMEOUT_S = 1800.0
POLL_S = 0.25
JOBS_FILE = "jobs.pkl"
LOG_FILE = "pool.log"
DONE_FILE = "pool.done"
CPU_KERNELS_FILE = ROOT / "tests" / "cpu_kernels.json"


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


@dataclasses.dataclass(frozen=True)
class CpuJob:
    """One C-target build of a ``tl_kernels`` builder, as a launcher's ``tl_kernels.build.get_kernel`` compiles it."""

    module: str
    qualname: str
    params_json: str  # the builder's parameters (sorted keys; ints, bools and strings)
    flags_json: str  # the g++ flags

    @classmethod
    def of(cls, module: str, qualname: str, params: dict[str, Any], flags: Sequence[str]) -> CpuJob:
        return cls(module, qualname, json.dumps(dict(params), sort_keys=True), json.dumps(list(flags)))


Job = Any
"""A :class:`HopperJob`, a :class:`CpuJob` or an ``autotune.tuner.CompileJob`` (frozen dataclasses of strings:
picklable and hashable)."""


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
    cpu_jobs: frozenset[str] = frozenset()  # the keys of its C-target builds
    waited_s: float = 0.0  # how long the tests' process has waited for it
    asked: set[str] = dataclasses.field(default_factory=set)  # the C-target builds the tests' process asked for


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
    cpu = frozenset(job_key(j) for j in unique if isinstance(j, CpuJob))
    pool = Pool(process, folder, frozenset(job_key(j) for j in unique), cpu)
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
            waited = time.monotonic() - started
            pool.waited_s += waited
            logger.info("build pool: %d builds ready after waiting %.1f s", len(keys), waited)
            return outcomes
        if pool.process.poll() is not None or time.monotonic() > deadline:
            pool.waited_s += time.monotonic() - started
            logger.warning("build pool gone or late (rc %s): the tests compile what is missing", pool.process.poll())
            return None
        time.sleep(POLL_S)


def summary() -> str | None:
    """One line on the session's pool for the end of the test report (how long it ran, how long the tests waited
    for it); ``None`` when no pool ran."""
    pool = active()
    if pool is None:
        return None
    done = pool.folder / DONE_FILE
    if done.is_file():
        counts = json.loads(done.read_text())
        line = (
            f"build pool: {counts['jobs']} builds ({counts['cpu']} C target, {counts['claimed']} of them compiled by "
            f"the tests instead, {counts['failed']} failed) in {counts['elapsed_s']:.0f} s"
        )
    else:
        line = f"build pool: {len(list(pool.folder.glob('*.done')))} of {len(pool.jobs)} builds done at the end"
    line += f"; the tests waited {pool.waited_s:.0f} s"
    unused, unlisted = len(pool.cpu_jobs - pool.asked), len(pool.asked - pool.cpu_jobs)
    if pool.cpu_jobs and (unused or unlisted):
        line += (
            f"; C-target kernels: {unused} listed and unused, {unlisted} not listed for these tests (in a full run,"
            f" either means: rerecord {CPU_KERNELS_FILE.name})"
        )
    return line


# ----------------------------------------------------------------------------------------------------------------------
# C-target builds: the recorded list, and the claims that share each build between the pool and the tests' process
# ----------------------------------------------------------------------------------------------------------------------
CLAIMED = "compiled by the tests' process"
"""The pool's outcome of a C-target build that the tests' process claimed first."""

_HOOK: list[Any] = []  # the original tl_kernels.build._compile while the hook is installed


def claim(folder: Path, job: Job) -> bool:
    """Whether this process is the first to start ``job`` (it then compiles it; the other process does not)."""
    try:
        os.close(os.open(folder / f"{job_key(job)}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _before_cpu_compile(job: CpuJob) -> None:
    """In the tests' process, before it compiles ``job``: claim it, or wait until the pool that claimed it is done
    (the compile that follows then loads it from TileLang's disk cache)."""
    pool = active()
    if pool is None:
        return
    key = job_key(job)
    pool.asked.add(key)
    if key in pool.jobs and not claim(pool.folder, job):
        wait([job])


def install_cpu_hook(on_compile: Any = None) -> None:
    """Send every C-target compile of this process through :func:`_before_cpu_compile` (and ``on_compile(job)``,
    the recorder of ``--dsa-record-cpu-kernels``). Wraps ``tl_kernels.build._compile``, the one place where
    ``get_kernel`` compiles on an in-process miss, because ``get_kernel`` has no hook of its own."""
    from tl_kernels import build as tl_build
    from tl_kernels import dsl

    if _HOOK:
        return
    original = tl_build._compile  # noqa: SLF001 - see the docstring

    def compile_claimed(builder: Any, target: Any, params: dict[str, Any], cpu_flags: tuple[str, ...]) -> Any:
        if dsl.is_cpu(target):
            job = CpuJob.of(builder.__module__, builder.__qualname__, params, cpu_flags)
            if on_compile is not None:
                on_compile(job)
            _before_cpu_compile(job)
        return original(builder, target, params, cpu_flags)

    _HOOK.append(original)
    tl_build._compile = compile_claimed  # noqa: SLF001


def uninstall_cpu_hook() -> None:
    from tl_kernels import build as tl_build

    while _HOOK:
        tl_build._compile = _HOOK.pop()  # noqa: SLF001


def read_cpu_kernels(path: Path = CPU_KERNELS_FILE) -> list[dict[str, Any]]:
    """The recorded C-target builds (``tests/cpu_kernels.json``): ``builder`` (``module:qualname``), ``params``,
    ``flags`` and ``test``, the node id (without parameters) of the test that compiled it first; ``[]`` when absent."""
    return json.loads(path.read_text()) if path.is_file() else []


def write_cpu_kernels(path: Path, compiled: Sequence[tuple[str, CpuJob]]) -> None:
    """Record ``compiled`` (``(test node id, job)`` in the order the builds ran) as :func:`read_cpu_kernels` reads
    them, one build per line."""
    entries, seen = [], set()
    for test_id, job in compiled:
        if job not in seen:
            seen.add(job)
            entries.append({
                "builder": f"{job.module}:{job.qualname}", "params": json.loads(job.params_json),
                "flags": json.loads(job.flags_json), "test": test_id.split("[")[0],
            })  # fmt: skip
    path.write_text("[\n" + ",\n".join(json.dumps(e, sort_keys=True) for e in entries) + "\n]\n", encoding="utf-8")


def cpu_jobs(entries: Sequence[dict[str, Any]], test_ids: Sequence[str], flags: Sequence[str]) -> list[CpuJob]:
    """The recorded builds (:func:`read_cpu_kernels`) that the tests ``test_ids`` (node ids in run order) compile
    first, with this session's g++ ``flags``, in the order the tests will ask for them."""
    first: dict[str, int] = {}
    for position, test_id in enumerate(test_ids):
        first.setdefault(test_id.split("[")[0], position)
    ranked = []
    for entry in entries:
        if entry["test"] in first and list(entry["flags"]) == list(flags):
            module, qualname = entry["builder"].split(":")
            ranked.append((first[entry["test"]], CpuJob.of(module, qualname, entry["params"], flags)))
    return [job for _, job in sorted(ranked, key=lambda ranked_job: ranked_job[0])]


# ----------------------------------------------------------------------------------------------------------------------
# The pool process
# ----------------------------------------------------------------------------------------------------------------------
def run_job(job: Job) -> tuple[bool, Any]:
    """Compile one job in a worker: ``(True, result)`` or ``(False, error text)``."""
    from autotune import tuner
    from dsa import env
    from tl_kernels import build as tl_build
    from tl_kernels import dsl

    try:
        if isinstance(job, HopperJob):
            builder = getattr(importlib.import_module(job.module), job.qualname)
            params = pickle.loads(job.params_pickle)
            tl_build.compile_hopper(builder, report_cache_dir=env.static_report_dir(), **params)
            return True, None
        if isinstance(job, CpuJob):
            builder = getattr(importlib.import_module(job.module), job.qualname)
            flags = tuple(json.loads(job.flags_json))
            tl_build.get_kernel(builder, target=dsl.CPU_TARGET, cpu_flags=flags, **json.loads(job.params_json))
            return True, None
        return True, tuner.compile_candidate(job)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which compiles again and fails with the cause
        return False, f"{type(exc).__name__}: {exc}"


def run_pooled(job: Job, folder: Path) -> tuple[bool, Any]:
    """:func:`run_job` in the pool, unless ``job`` is a C-target build the tests' process claimed first."""
    if isinstance(job, CpuJob):
        if not claim(folder, job):
            return True, CLAIMED
    elif not _NICED:
        _NICED.append(os.nice(NICENESS))  # once per worker: the C-target builds all come first
    return run_job(job)


_NICED: list[int] = []  # in a pool worker: its niceness, once lowered for the sm_90a builds


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
    # and would crowd out the tests in the foreground. The workers lower their own priority (run_pooled).
    os.setpgrp()
    jobs: list[Job] = pickle.loads((folder / JOBS_FILE).read_bytes())
    workers = min(len(jobs), tuner.default_jobs())
    start = time.perf_counter()
    print(f"build pool: {len(jobs)} builds on {workers} processes", flush=True)
    counts = {"jobs": len(jobs), "cpu": sum(isinstance(j, build_pool.CpuJob) for j in jobs), "claimed": 0, "failed": 0}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        # Submitted in order, taken in order: the C-target builds the tests need first come first.
        futures = {pool.submit(build_pool.run_pooled, job, folder): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker killed (e.g. out of memory)
                outcome = (False, f"build worker failed: {type(exc).__name__}: {exc}")
            build_pool._write_marker(folder, job, outcome)
            counts["claimed"] += outcome == (True, build_pool.CLAIMED)
            counts["failed"] += not outcome[0]
            print(f"{time.perf_counter() - start:7.1f} s  {'ok ' if outcome[0] else 'ERR'} {job}", flush=True)
    counts["elapsed_s"] = time.perf_counter() - start
    (folder / DONE_FILE).write_text(json.dumps(counts))
    print(f"build pool: done in {counts['elapsed_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

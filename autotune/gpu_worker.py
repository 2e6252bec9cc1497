"""The isolated mode of the tuner's GPU phase: checks and timings in a worker process that may crash or hang.

A candidate that has never run on a GPU (the warp-specialised forward schedule, for one) may deadlock or fault, and
an illegal address poisons the whole CUDA context. :class:`GpuTimer` therefore runs the steps of
:func:`autotune.gpu_phase.run_case` in a worker process, spawned so that it does not inherit a CUDA context and kept
across cases. The worker reports each step before it starts and each result as soon as it has it; when the worker
dies (a signal, a non-zero exit) or sends nothing for ``TuneOptions.candidate_timeout_s`` seconds
(``DSA_TUNE_CANDIDATE_TIMEOUT_S``, default 120; start-up has :data:`WORKER_STARTUP_TIMEOUT_S`), the parent kills the
worker's process group, records the step in progress as failed with the reason (``GPU worker process died with
signal 11 (SIGSEGV) while checking candidate {...} at {...}``, ``no result after 120 s while timing candidate {...}
at {...}: killed``; a candidate that failed so while being timed is not timed at later sizes either), and a fresh
worker takes the remaining steps. Results already reported are kept. When a step fails with an exception and CUDA
no longer works afterwards, the worker exits after reporting it and a fresh one goes on. Cache files are written by
the parent only.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from autotune import gpu_phase, tuner
from autotune.lookup import space
from benchmarks import measure as measure_mod
from benchmarks.runners import Runner, runner_for
from dsa import env

logger = logging.getLogger(__name__)

__all__ = ["EXIT_CONTEXT_LOST", "WORKER_STARTUP_TIMEOUT_S", "GpuTimer", "make_timer"]



# Importing torch and TileLang and creating a CUDA context, before the first step: slow on a loaded host, and not any
# candidate's fault, so it has its own, larger limit.
WORKER_STARTUP_TIMEOUT_S = 300.0
# How long a worker asked to stop may take before it is killed.
_STOP_GRACE_S = 10.0
# The exit status of a worker whose CUDA context broke (its last result was reported; a fresh worker goes on).
EXIT_CONTEXT_LOST = 3


@dataclass
class _CaseJob:
    """What the parent sends the worker for one case (pickled: every callable must be importable by name)."""

    case: space.Case
    candidates: list[Any]
    options: tuner.TuneOptions
    runner: Runner
    measure: Callable[..., float]
    progress: gpu_phase.Progress


def _worker_main(conn: Connection, device: torch.device, log_level: int) -> None:
    """The GPU worker process: run the case jobs received on ``conn`` until it receives ``None`` or closes."""
    # Its own process group, so that the parent can kill it together with anything it started (an nvcc run when a
    # kernel misses TileLang's cache) without touching the parent's group.
    os.setpgrp()
    # A fault prints this process's Python stack to stderr (the run's log) before the parent reports the death.
    faulthandler.enable()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [gpu worker]: %(message)s")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        if device.type == "cuda":  # the real runners load kernels through TileLang; fake CPU runners do not need it
            tuner.set_tilelang_log_level(job.options.tilelang_log_level)

        def report(message: gpu_phase.Step | gpu_phase.Result, job: _CaseJob = job) -> None:
            if isinstance(message, gpu_phase.Result):
                job.progress.add(message)
            conn.send(message)  # synchronous: a message sent is the parent's even if this process dies next

        try:
            gpu_phase.run_case(
                job.case, job.candidates, job.options, device=device, runner=job.runner, measure=job.measure,
                progress=job.progress, report=report,
            )  # fmt: skip
        except gpu_phase.ContextLost as exc:
            logger.error("%s: %s; a fresh worker takes the rest", job.case.kernel, exc)
            # os._exit: the interpreter's exit handlers would call into the broken context and could hang.
            os._exit(EXIT_CONTEXT_LOST)
        conn.send(gpu_phase.CaseDone())


def _kill_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL ``process`` and, when it leads its own process group (the worker makes one first thing), the group.

    Call it before ``process`` is reaped (``join``, ``exitcode``, ``is_alive``): until then its pid, and so the group
    id, cannot belong to anyone else."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
            return
    except OSError:  # already gone
        pass
    process.kill()  # it died or was killed before making its group: only the process itself


def _exit_text(exitcode: int | None) -> str:
    """How a worker ended, for a candidate's error, e.g. ``GPU worker process died with signal 11 (SIGSEGV)``."""
    if exitcode == EXIT_CONTEXT_LOST:
        return "GPU worker process exited because its CUDA context broke"
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"GPU worker process died with signal {-exitcode}{name}"
    return f"GPU worker process exited with code {exitcode}"


class _Worker:
    """One GPU worker process (spawned: it must not inherit the parent's CUDA context) and the parent's pipe end."""

    def __init__(self, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        # daemon: a worker the parent forgot to close is ended when the parent exits rather than waited for.
        self.process = context.Process(
            target=_worker_main,
            args=(child_conn, device, logging.getLogger().getEffectiveLevel()),
            name="dsa-tune-gpu-worker",
            daemon=True,
        )
        self.process.start()
        # Only the worker holds the sending end now, so its death reads as end-of-file here.
        child_conn.close()

    def stop(self, *, kill: bool) -> int | None:
        """End the worker, at once with ``kill`` (a hung or dead one), else by asking it first; returns its exit
        code (negative: the signal that ended it)."""
        if not kill:
            try:
                self.conn.send(None)
            except OSError:  # already gone
                pass
            # Wait on the sentinel, not join: the process must stay unreaped for _kill_group.
            kill = not multiprocessing.connection.wait([self.process.sentinel], timeout=_STOP_GRACE_S)
        if kill:
            _kill_group(self.process)
        self.process.join(timeout=_STOP_GRACE_S)
        self.conn.close()
        if self.process.exitcode is None:  # stuck in the driver past SIGKILL: nothing more to do from here
            logger.warning("GPU worker process %d did not end after SIGKILL; left behind", self.process.pid)
        return self.process.exitcode


def _describe(step: gpu_phase.Step | None, case: space.Case, candidates: Sequence[Any]) -> str:
    """The step for a failure message: ``checking candidate {...} at {...}``."""
    if step is None:
        return "outside any candidate (starting up or between steps)"
    if step.action == "reference":
        return f"computing the reference at {case.check_sizes}"
    if step.action == "inputs" and step.point is not None:
        return f"making inputs at {case.sizes[step.point]}"
    if step.candidate is not None:
        config = candidates[step.candidate].job.config_json
        if step.action == "check":
            return f"checking candidate {config} at {case.check_sizes}"
        if step.point is not None:
            return f"timing candidate {config} at {case.sizes[step.point]}"
    return f"step {step}"


class GpuTimer:
    """The ``timer`` of :func:`autotune.tuner.tune` for one CUDA device (see the module docstring).

    With ``options.isolate`` (the default) the check and timing steps run in a worker process that this timer keeps
    across cases; without it they run in this process (:func:`autotune.gpu_phase.time_case`). Close it (or use it as a context manager)
    to end the worker.

    Args:
        sku: SKU id the winners are stored under.
        device: the CUDA device; default the current one.
        runner: fixed runner for every case (tests); default :func:`benchmarks.runners.runner_for`
            ``(case.kernel)``. In the isolated mode its callables must be importable by name (the worker is spawned).
        measure: as for :func:`autotune.gpu_phase.time_case`; same rule.
    """

    def __init__(
        self,
        *,
        sku: str,
        device: torch.device | None = None,
        runner: Runner | None = None,
        measure: Callable[..., float] | None = None,
    ) -> None:
        self.sku = sku
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.runner = runner
        self.measure = measure
        self._worker: _Worker | None = None

    def __call__(
        self, case: space.Case, candidates: Sequence[Any], options: tuner.TuneOptions
    ) -> tuple[list[tuner.Record], list[Any], bool]:
        """Check and time ``candidates`` of ``case``: ``(records, cache files written, ok)`` as :func:`autotune.gpu_phase.time_case`."""
        if not options.isolate:
            return gpu_phase.time_case(
                case, candidates, options, sku=self.sku, device=self.device, runner=self.runner, measure=self.measure
            )
        runner = self.runner or runner_for(case.kernel)
        timeout_s = options.candidate_timeout_s or env.tune_candidate_timeout_s()
        progress = gpu_phase.Progress(len(candidates), len(case.sizes))
        job = _CaseJob(case, list(candidates), options, runner, self.measure or measure_mod.median_ms, progress)
        # Each round adds at least one result or failure (or finishes the case), so this ends.
        while not progress.finished():
            self._run_in_worker(job, timeout_s)
        return gpu_phase.case_records(case, candidates, progress, sku=self.sku, cache_dir=options.cache_dir)

    def _run_in_worker(self, job: _CaseJob, timeout_s: float) -> None:
        """Send ``job`` to the worker (starting one when there is none) and add what it reports to ``job.progress``
        until it finishes the case, dies or stops reporting for ``timeout_s``; then the step in progress is recorded
        as failed and the worker is dropped (the next round starts a fresh one)."""
        if self._worker is not None and not self._worker.process.is_alive():
            # Ended while idle (e.g. the out-of-memory killer): not the fault of the case about to be sent.
            logger.warning("%s while idle; starting a fresh one", _exit_text(self._worker.process.exitcode))
            self._drop(kill=False)
        fresh = self._worker is None
        if self._worker is None:
            self._worker = _Worker(self.device)
        worker = self._worker
        try:
            worker.conn.send(job)
        except OSError:  # a worker that died at start-up: found below
            pass
        limit = WORKER_STARTUP_TIMEOUT_S if fresh else timeout_s
        deadline = time.monotonic() + limit
        step: gpu_phase.Step | None = None  # the step in progress; None before the first and between steps
        results = 0
        while True:
            ready = multiprocessing.connection.wait(
                [worker.conn, worker.process.sentinel], timeout=max(0.0, deadline - time.monotonic())
            )
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # the worker is dead: below
                    message = None
                if isinstance(message, gpu_phase.CaseDone):
                    if not job.progress.finished():  # only a broken worker does this: never send the job again
                        job.progress.fail(None, "the GPU worker ended the case without a result for this candidate")
                    return
                if isinstance(message, (gpu_phase.Step, gpu_phase.Result)):
                    if isinstance(message, gpu_phase.Result):
                        job.progress.add(message)
                        results += 1
                        step = None
                    else:
                        step = message
                    limit = timeout_s
                    deadline = time.monotonic() + limit
                    continue
            # Nothing within the limit, or the worker is dead (end of file, or its sentinel with nothing to read).
            what = _describe(step, job.case, job.candidates)
            if ready:
                reason = f"{_exit_text(self._drop(kill=True))} while {what}"
            else:
                self._drop(kill=True)
                reason = f"no result after {limit:g} s while {what}: killed"
            if step is None and results:
                # Ended between steps after reporting (e.g. a broken CUDA context after a failed step): nothing is
                # lost, a fresh worker takes the rest.
                logger.warning("%s: %s; starting a fresh GPU worker", job.case.kernel, reason)
            else:
                logger.error("%s: %s", job.case.kernel, reason)
                job.progress.fail(step, reason)
            return

    def _drop(self, *, kill: bool) -> int | None:
        """Stop and forget the worker; returns its exit code."""
        worker, self._worker = self._worker, None
        return None if worker is None else worker.stop(kill=kill)

    def close(self) -> None:
        """End the worker, if any (asked first, killed after a grace period)."""
        self._drop(kill=False)

    def __enter__(self) -> GpuTimer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_timer(*, sku: str, device: torch.device | None = None) -> GpuTimer:
    """The ``timer`` argument of :func:`autotune.tuner.tune` for the current CUDA device (close it when done)."""
    return GpuTimer(sku=sku, device=device)

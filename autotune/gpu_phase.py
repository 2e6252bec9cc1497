"""The GPU phase of one tuning case: check every candidate against the reference, then time the correct ones.

A case runs in steps: the reference at the case's check sizes, then each candidate's check (its kernel loaded and run
once at the check sizes, compared with the reference by its :class:`benchmarks.runners.Runner`) one by one, then per
size point the input sets (rotated over more than twice the L2 cache, :mod:`benchmarks.measure`) and each correct
candidate's timing. Before each step :func:`run_case` reports a :class:`Step`, after it a :class:`Result`; a
:class:`Progress` holds the results, so that the step in progress when a worker process dies or hangs can be blamed
and the rest handed to a fresh one (:mod:`autotune.gpu_worker`). :func:`time_case` runs the steps in this process.

A wrong candidate never wins: only candidates whose check passed are timed, and each size point's fastest is stored
in the user cache (:func:`autotune.tuner.select_and_store`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autotune import tuner
from autotune.lookup import space
from benchmarks import measure as measure_mod
from benchmarks.runners import SEED, Runner, runner_for

logger = logging.getLogger(__name__)

__all__ = [
    "CaseDone",
    "ContextLost",
    "Progress",
    "Result",
    "Step",
    "case_records",
    "run_case",
    "stop_if_context_lost",
    "time_case",
]

Inputs = dict[str, Any]


def _checked_config(
    kernel: str, static: dict[str, Any], config: dict[str, Any], *, target: dict[str, str] | None = None
) -> Any:
    """The kernel module's ``Config`` for ``config``, checked for ``target`` (the run's; ``None``: sm_90a): what the
    launchers take as ``config=``."""
    return space.make_config(kernel, static, config, target=target)


def _tensor_bytes(inputs: Inputs) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


def _input_sets(runner: Runner, static: dict[str, Any], sizes: dict[str, int], device: torch.device) -> list[Inputs]:
    first = runner.make_inputs(static, sizes, device, SEED)
    if device.type != "cuda":
        return [first]
    free, _ = torch.cuda.mem_get_info(device)
    count = measure_mod.input_set_count(_tensor_bytes(first), l2=measure_mod.l2_bytes(device), free_bytes=free)
    return [first] + [runner.make_inputs(static, sizes, device, SEED + i) for i in range(1, count)]


@dataclass(frozen=True)
class Step:
    """The step the GPU phase starts now; the worker sends one before each step, so that the parent knows whom a crash
    or a hang belongs to.

    Attributes:
        action: ``"reference"`` (check inputs and expected outputs), ``"check"`` (load a candidate's kernel, run it
            at the check sizes, compare), ``"inputs"`` (the input sets of a size point) or ``"time"`` (time a
            candidate at a size point).
        point: position in ``case.sizes`` (``"inputs"`` and ``"time"``).
        candidate: position in the case's candidates (``"check"`` and ``"time"``).
    """

    action: str
    point: int | None = None
    candidate: int | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of checking (``point is None``) or timing (at ``case.sizes[point]``) one candidate."""

    candidate: int
    point: int | None
    latency_ms: float | None
    error: str | None


@dataclass(frozen=True)
class CaseDone:
    """The worker has run every step of the case it was sent."""


@dataclass
class Progress:
    """What the GPU phase of one case has found so far. A fresh worker gets a copy and skips what is in it.

    Attributes:
        candidates / points: how many candidates and size points the case has.
        checks: candidate -> ``None`` when its output matched the reference, else why it is rejected.
        times: ``(point, candidate)`` -> ``(median ms or None, why it has no time or None)``.
    """

    candidates: int
    points: int
    checks: dict[int, str | None] = field(default_factory=dict)
    times: dict[tuple[int, int], tuple[float | None, str | None]] = field(default_factory=dict)

    def unchecked(self) -> list[int]:
        """Candidates not checked yet."""
        return [i for i in range(self.candidates) if i not in self.checks]

    def untimed(self, point: int) -> list[int]:
        """Correct candidates without a result at size point ``point``."""
        return [i for i, error in sorted(self.checks.items()) if error is None and (point, i) not in self.times]

    def finished(self) -> bool:
        """Whether every candidate is checked and every correct one has a result at every size point."""
        return not self.unchecked() and not any(self.untimed(p) for p in range(self.points))

    def add(self, result: Result) -> None:
        """Record one step's result."""
        if result.point is None:
            self.checks[result.candidate] = result.error
        else:
            self.times[(result.point, result.candidate)] = (result.latency_ms, result.error)

    def fail(self, step: Step | None, reason: str) -> None:
        """Record ``reason`` as the result of the work ``step`` was doing, or of all the work left when ``step`` is
        ``None``. A candidate that failed while being timed is not timed at the later size points either: one that
        crashed or hung once would most likely do it again, and each time costs a worker and a time limit."""
        if step is None or step.action == "reference":
            for i in self.unchecked():
                self.checks[i] = reason
        if step is None:
            for point in range(self.points):
                for i in self.untimed(point):
                    self.times[(point, i)] = (None, reason)
        elif step.action == "check" and step.candidate is not None:
            self.checks[step.candidate] = reason
        elif step.action == "inputs" and step.point is not None:
            for i in self.untimed(step.point):
                self.times[(step.point, i)] = (None, reason)
        elif step.action == "time" and step.point is not None and step.candidate is not None:
            for point in range(step.point, self.points):
                self.times.setdefault((point, step.candidate), (None, reason))


class ContextLost(RuntimeError):
    """A step failed and CUDA no longer works in this process (e.g. after an illegal address): nothing more can run."""


def stop_if_context_lost(device: torch.device, after: str) -> None:
    """Raise :class:`ContextLost` when the CUDA context of ``device`` has become unusable (a sticky error makes every
    later call fail, which would wrongly reject every later candidate)."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        usable = float(torch.ones(1, device=device).sum().item()) == 1.0
    except Exception:  # noqa: BLE001 - whatever the error, the context cannot be trusted any more
        usable = False
    if not usable:
        raise ContextLost(f"CUDA no longer works after {after}")


def run_case(
    case: space.Case,
    candidates: Sequence[Any],
    options: tuner.TuneOptions,
    *,
    device: torch.device,
    runner: Runner,
    measure: Callable[..., float],
    progress: Progress,
    report: Callable[[Step | Result], None],
) -> None:
    """Check, then time, each candidate of ``case`` that ``progress`` holds no result for.

    Every candidate is checked (one by one) before any is timed, so that a crash while checking belongs to one
    candidate. ``report`` is called with a :class:`Step` before each step and with the :class:`Result` after it; it
    must add results to ``progress`` (the timing phase reads which candidates passed their check from it).

    Raises:
        ContextLost: a step failed and CUDA no longer works here (that step's result is reported first).
    """
    get_kernel = runner.get_kernel or functools.partial(_checked_config, target=options.target)
    prepared: dict[int, Any] = {}
    # 1. correctness at the small check size: a wrong candidate never wins, however fast.
    pending = progress.unchecked()
    check_inputs: Inputs | None = None
    expected: tuple[Any, ...] | None = None
    if pending:
        report(Step("reference"))
        try:
            check_inputs = runner.make_inputs(case.static, case.check_sizes, device, SEED)
            expected = runner.reference(case.static, check_inputs)
        except Exception as exc:  # noqa: BLE001 - without a reference nothing may win; report and go on
            reason = f"reference failed at {case.check_sizes}: {tuner.short_error(exc)}"
            for i in pending:
                report(Result(i, None, None, reason))
            stop_if_context_lost(device, f"computing the reference at {case.check_sizes}")
            pending = []
    for i in pending:
        report(Step("check", candidate=i))
        try:
            prepared[i] = get_kernel(case.kernel, case.static, candidates[i].job.config)
            got = runner.launch(prepared[i], case.static, check_inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            error = runner.compare(got, expected)
            report(Result(i, None, None, None if error is None else f"wrong result at {case.check_sizes}: {error}"))
        except Exception as exc:  # noqa: BLE001 - a crashing candidate is rejected, the others still run
            report(Result(i, None, None, f"failed at {case.check_sizes}: {tuner.short_error(exc)}"))
            stop_if_context_lost(device, f"checking candidate {candidates[i].job.config_json}")
    del check_inputs, expected

    # 2. timing per size point, inputs rotated.
    for point, sizes in enumerate(case.sizes):
        todo = progress.untimed(point)
        if not todo:
            continue
        report(Step("inputs", point=point))
        try:
            input_sets = _input_sets(runner, case.static, sizes, device)
        except Exception as exc:  # noqa: BLE001 - typically out of memory at the largest sizes
            reason = f"no inputs at {sizes}: {tuner.short_error(exc)}"
            for i in todo:
                report(Result(i, point, None, reason))
            stop_if_context_lost(device, f"making inputs at {sizes}")
            continue
        for i in todo:
            report(Step("time", point=point, candidate=i))
            try:
                if i not in prepared:  # a fresh worker loads the kernels its predecessor had checked
                    prepared[i] = get_kernel(case.kernel, case.static, candidates[i].job.config)
                latency = measure(
                    lambda inputs, ready=prepared[i]: runner.launch(ready, case.static, inputs),
                    input_sets,
                    warmup=options.warmup,
                    reps=options.reps,
                )
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for this tile at this size
                report(Result(i, point, None, f"failed at {sizes}: {tuner.short_error(exc)}"))
                stop_if_context_lost(device, f"timing candidate {candidates[i].job.config_json} at {sizes}")
                continue
            if math.isfinite(latency):
                report(Result(i, point, latency, None))
            else:
                report(Result(i, point, None, "non-finite latency"))
        del input_sets
        if device.type == "cuda":
            torch.cuda.empty_cache()


def case_records(
    case: space.Case, candidates: Sequence[Any], progress: Progress, *, sku: str, cache_dir: Path
) -> tuple[list[tuner.Record], list[Any], bool]:
    """Records of every candidate at every size point, each point's winner stored (``time_case``'s return value)."""
    records: list[tuner.Record] = []
    written: list[Any] = []
    ok = True
    for point, sizes in enumerate(case.sizes):
        latencies: dict[int, float | None] = {}
        errors: dict[int, str | None] = {}
        for i in range(len(candidates)):
            latency, error = None, progress.checks.get(i, "not checked")
            if error is None:
                latency, error = progress.times.get((point, i), (None, "not timed"))
            latencies[i], errors[i] = latency, error
        point_records, path = tuner.select_and_store(
            case, candidates, sizes, latencies, errors, sku=sku, cache_dir=cache_dir
        )
        records.extend(point_records)
        if path is None:
            ok = False
        elif path not in written:
            written.append(path)
    return records, written, ok


def time_case(
    case: space.Case,
    candidates: Sequence[Any],
    options: tuner.TuneOptions,
    *,
    sku: str,
    device: torch.device,
    runner: Runner | None = None,
    measure: Callable[..., float] | None = None,
) -> tuple[list[tuner.Record], list[Any], bool]:
    """Check every candidate of ``case`` at its ``check_sizes``, time the correct ones at each size point, store
    each size point's winner, all in this process (the in-process mode: tests with fake runners, debugging; a
    candidate that crashes the process or hangs takes the run with it; :class:`autotune.gpu_worker.GpuTimer` runs
    the same steps in a worker process).

    Args:
        candidates: compiled survivors of the case (``tuner._Candidate``: ``.job``, ``.compiled``), default first.
        runner: defaults to :func:`benchmarks.runners.runner_for` ``(case.kernel)``.
        measure: ``measure(call, input_sets, warmup=, reps=) -> median ms``; default CUDA events
            (:func:`benchmarks.measure.median_ms`).

    Returns:
        ``(records, cache files written, ok)``; ``ok`` is false when some size point has no valid candidate.
    """
    runner = runner or runner_for(case.kernel)
    progress = Progress(len(candidates), len(case.sizes))

    def report(message: Step | Result) -> None:
        if isinstance(message, Result):
            progress.add(message)

    try:
        run_case(
            case, candidates, options, device=device, runner=runner, measure=measure or measure_mod.median_ms,
            progress=progress, report=report,
        )  # fmt: skip
    except ContextLost as exc:
        reason = f"not run: {exc} (only the isolated mode can go on after that)"
        logger.error("%s: %s", case.kernel, reason)
        progress.fail(None, reason)
    return case_records(case, candidates, progress, sku=sku, cache_dir=options.cache_dir)

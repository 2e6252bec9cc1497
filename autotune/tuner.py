"""The tuner: compile candidates in parallel, prune by the static report, time survivors on a GPU, keep the fastest
correct config per (kernel, static parameters, size bucket).

Phases:

1. **Compile** every candidate config of every case (:mod:`autotune.lookup.space`) for the run's target (sm_90a, or the
   portable schedule of another architecture) in a process pool (``jobs`` workers; each calls
   ``tl_kernels.build.compile_cuda(module.build, target=..., **static, **config)``, and again with each of the
   spec's ``variants``: the decode attention's one-split ``direct`` kernel). Compiling in
   worker processes also fills TileLang's on-disk kernel cache, so the launchers (and the timing phase below) later
   load the same kernels in milliseconds. Without a GPU this is all that runs.
2. **Prune** candidates whose compile failed or whose static report has problems (spills, shared memory over the
   limit, a GEMM that is not the architecture's matrix instruction, wgmma on sm_90a and mma.sync elsewhere, where the
   kernel has GEMMs: ``StaticReport.problems(mma=...)``).
3. **Check** (GPU) each survivor at the case's small ``check_sizes`` against ``dsa.reference``
   (:mod:`benchmarks.runners`: scale-sensitive comparison); a wrong candidate never wins. Phases 3 and 4 run in a
   worker process by default, so that a candidate that crashes or hangs is recorded as failed and the others are
   still measured (:mod:`autotune.gpu_phase`, :mod:`autotune.gpu_worker`).
4. **Time** (GPU) the correct ones at each size point with CUDA events (:mod:`benchmarks.measure`): warm-up calls,
   then the median of repeated calls, the inputs rotated over enough copies to exceed twice the L2 cache so that no
   call finds its inputs in L2. The winner of each size point is stored in the user cache
   (:func:`autotune.lookup.cache.store`).

TileLang's own autotuner is not used (it times on the GPU only and writes ``autotuner.log`` into the working
directory); this module never changes directory or writes outside the cache and the report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.lookup import cache, space
from benchmarks import flops, measure
from dsa import env
from tl_kernels import dsl

logger = logging.getLogger(__name__)

_ERROR_CHARS = 4000


@dataclass
class CompileResult:
    """What compiling one candidate produced (picklable: it crosses the process pool)."""

    ok: bool
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    smem_bytes: int | None = None
    mma: str | None = None
    compile_s: float | None = None


@dataclass
class Record:
    """One row of the report: a candidate config of a kernel at some parameters.

    ``params`` holds the static parameters, plus the size point (``batch``, ``seq_len``, ``seq_len_kv``) when the
    candidate was timed; ``arch`` the CUDA architecture it was compiled for. ``mma`` names the matrix instructions of its GEMMs (``wgmma``, ``mma_sync``, both joined by
    ``+``, ``-`` for none). ``latency_ms`` and ``tflops`` are ``None`` without a GPU; ``chosen`` marks the winner of
    a size point (never set without a GPU).
    """

    kernel: str
    params: dict[str, Any]
    config: dict[str, Any]
    ok: bool
    error: str | None
    registers: int | None
    spill_bytes: int | None
    smem_bytes: int | None
    mma: str | None
    compile_s: float | None
    latency_ms: float | None = None
    tflops: float | None = None
    chosen: bool = False
    arch: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the ``--report`` format)."""
        return dataclasses.asdict(self)


@dataclass
class TuneResult:
    """Everything one tuning run produced."""

    records: list[Record] = field(default_factory=list)
    # (kernel, canonical static) of every case that ended without a single valid config.
    failed_cases: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Cache files written (GPU runs).
    written: list[str] = field(default_factory=list)
    timed: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Compile phase
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileJob:
    """One candidate to compile: a kernel module, static parameters and a config (all picklable).

    ``target_json`` is the CUDA target (canonical JSON of ``{"kind": "cuda", "arch": ...}``); ``mma`` the matrix
    instruction every GEMM must use (``None`` for a kernel without GEMMs); ``report_cache_dir`` where ptxas reports
    are cached (``None``: not cached); ``variants_json`` the spec's ``variants`` (a JSON list of extra static
    parameters the candidate is also compiled with, e.g. the decode attention's one-split ``direct`` kernel).
    """

    kernel: str
    module: str
    compile_fn: str
    static_json: str
    config_json: str
    target_json: str = cache.canonical(dsl.HOPPER_TARGET)
    mma: str | None = dsl.MMA_WGMMA
    report_cache_dir: str | None = None
    variants_json: str = "[]"

    @property
    def static(self) -> dict[str, Any]:
        return json.loads(self.static_json)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def target(self) -> dict[str, str]:
        return json.loads(self.target_json)


def short_error(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, cut to a few thousand characters (reports keep one line per candidate)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


def compile_candidate(job: CompileJob) -> CompileResult:
    """Compile one candidate and summarise its static report (runs in a worker process; never raises)."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(job.module)
        compile_fn = space.resolve(job.compile_fn)
    except Exception as exc:  # noqa: BLE001 - e.g. the module does not import
        return CompileResult(ok=False, error=short_error(exc), compile_s=0.0)
    try:
        # The default config is a candidate even if check_config rejects it; say so rather than compile it.
        space.checked_config(module, job.static, job.config, target=job.target)
    except (TypeError, ValueError) as exc:
        return CompileResult(ok=False, error=f"invalid config: {exc}", compile_s=0.0)
    cache_dir = None if job.report_cache_dir is None else Path(job.report_cache_dir)
    reports = []
    # The candidate itself, then each variant (another kernel a launcher runs with the same config): the candidate
    # passes only if every one of them compiles clean, and the record shows the worst figures among them.
    for variant in ({}, *json.loads(job.variants_json)):
        label = "".join(f"{name}={value}: " for name, value in variant.items())
        try:
            _, report = compile_fn(module.build, target=job.target, report_cache_dir=cache_dir,
                                   **{**job.static, **variant}, **job.config)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failing candidate is a result, not a crash
            return CompileResult(ok=False, error=label + short_error(exc), compile_s=time.perf_counter() - start)
        reports.append((label, report))
    elapsed = time.perf_counter() - start
    problems = [label + problem for label, report in reports for problem in report.problems(mma=job.mma)]
    return CompileResult(
        ok=not problems,
        error="; ".join(problems) or None,
        registers=max(report.registers for _, report in reports),
        spill_bytes=max(report.spill_bytes for _, report in reports),
        smem_bytes=max(report.smem_bytes for _, report in reports),
        mma="+".join(sorted({name for _, report in reports for name in report.mma})) or "-",
        compile_s=elapsed,
    )


def _progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool, unit: str = "kernel") -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)


def set_tilelang_log_level(level: int) -> None:
    """Set TileLang's logger level (its INFO lines, one per compile, would tear the progress bar apart)."""
    import tilelang  # noqa: F401 - importing it installs the "tilelang" logger's handler

    logging.getLogger("tilelang").setLevel(level)


def compile_all(
    jobs: Sequence[CompileJob], *, workers: int, progress: bool, tilelang_log_level: int = logging.WARNING
) -> dict[CompileJob, CompileResult]:
    """Compile ``jobs`` with ``workers`` processes (in this process when ``workers == 1``)."""
    results: dict[CompileJob, CompileResult] = {}
    if not jobs:
        return results
    set_tilelang_log_level(tilelang_log_level)
    if workers <= 1:
        for job in _progress(jobs, total=len(jobs), desc="compile", enabled=progress):
            results[job] = compile_candidate(job)
        return results
    # spawn, not fork: the parent may hold a CUDA context, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=context,
        initializer=set_tilelang_log_level,
        initargs=(tilelang_log_level,),
    ) as pool:
        futures = {pool.submit(compile_candidate, job): job for job in jobs}
        done = concurrent.futures.as_completed(futures)
        for future in _progress(done, total=len(futures), desc="compile", enabled=progress):
            job = futures[future]
            try:
                results[job] = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                results[job] = CompileResult(ok=False, error=f"compile worker failed: {short_error(exc)}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Choosing and storing winners
# ----------------------------------------------------------------------------------------------------------------------
def pick_winner(latencies: dict[int, float | None]) -> int | None:
    """Index of the fastest candidate among those with a latency (``None`` = rejected); ties go to the lower index
    (candidates are ordered default first, so a tie keeps the default)."""
    timed = [(lat, i) for i, lat in latencies.items() if lat is not None and math.isfinite(lat)]
    return min(timed)[1] if timed else None


def tflops_of(flops: float | None, latency_ms: float | None) -> float | None:
    """Throughput in TFLOP/s, or ``None`` when either figure is missing."""
    if flops is None or latency_ms is None or latency_ms <= 0:
        return None
    return flops / (latency_ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TuneOptions:
    """Options of one tuning run (the CLI's flags).

    Attributes:
        kernels: kernel names to tune.
        preset: a built-in preset name or a JSON file of cases.
        full: search the whole valid space instead of the pruned one.
        defaults_only: compile each case's default config alone (what every launch without a tuned config runs).
        target: the CUDA target to compile for (``dsa.hardware.target_for_capability`` of the GPU or the ``--sku``);
            ``None`` means sm_90a.
        jobs: compile workers.
        compile_only: compile and prune only, even when a GPU is present.
        sku: SKU id to store results under (GPU runs); ``None`` = the current device's.
        progress: show tqdm progress bars.
        warmup / reps: timing calls per candidate and size point.
        tilelang_log_level: level of TileLang's own logger during the run (INFO prints a line per compile).
        isolate: run the GPU phase in a separate worker process (see :mod:`autotune.gpu_worker`), so that a
            candidate that crashes, hangs or poisons the CUDA context is recorded as failed instead of ending the
            run; ``False`` runs it in this process (debugging).
        candidate_timeout_s: seconds one candidate step (its check including the kernel load, or its timing at one
            size) may take in the worker before it is killed; ``None``: ``DSA_TUNE_CANDIDATE_TIMEOUT_S`` or 120.
        cache_dir: the user cache folder winners are stored in (``dsa.env.cache_dir()``); ptxas reports are cached
            in its ``static-reports`` subfolder.
    """

    kernels: tuple[str, ...]
    preset: str = "deepseek-v3.2"
    full: bool = False
    defaults_only: bool = False
    target: dict[str, str] | None = None
    jobs: int = 1
    compile_only: bool = False
    sku: str | None = None
    progress: bool = True
    warmup: int = measure.WARMUP_CALLS
    reps: int = measure.TIMED_CALLS
    tilelang_log_level: int = logging.WARNING
    isolate: bool = True
    candidate_timeout_s: float | None = None
    cache_dir: Path = field(default_factory=env.cache_dir)


@dataclass
class _Candidate:
    job: CompileJob
    compiled: CompileResult


def _plan(
    options: TuneOptions,
) -> tuple[list[space.Case], dict[int, list[CompileJob]], dict[int, str], list[CompileJob]]:
    """Cases, the candidate jobs of each case (by position), why a case has none, and the deduplicated job list."""
    cases = space.preset_cases(options.preset, options.kernels)
    target = options.target or dict(dsl.HOPPER_TARGET)
    arch = dsl.arch_of(target)
    per_case: dict[int, list[CompileJob]] = {}
    plan_errors: dict[int, str] = {}
    unique: dict[CompileJob, None] = {}
    for i, case in enumerate(cases):
        kernel_spec = space.spec(case.kernel)
        try:
            space.check_static(case.kernel, case.static)
            configs = space.candidates(
                case.kernel, case.static, full=options.full, defaults_only=options.defaults_only, target=target
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a kernel module that does not import: report, go on
            plan_errors[i] = short_error(exc)
            per_case[i] = []
            continue
        jobs = [
            CompileJob(
                kernel=case.kernel,
                module=kernel_spec.module,
                compile_fn=kernel_spec.compile_fn,
                static_json=cache.canonical(case.static),
                config_json=cache.canonical(config),
                target_json=cache.canonical(target),
                mma=arch.mma if kernel_spec.has_gemm else None,
                report_cache_dir=str(options.cache_dir / env.STATIC_REPORT_SUBDIR),
                variants_json=json.dumps(list(kernel_spec.variants), sort_keys=True),
            )
            for config in configs
        ]
        per_case[i] = jobs
        for job in jobs:
            unique.setdefault(job, None)
    return cases, per_case, plan_errors, list(unique)


def _field_order(kernel: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its keys in the order of the kernel's ``Config`` fields (sorted JSON keys read worse)."""
    try:
        fields = space.config_fields(kernel)
    except Exception:  # noqa: BLE001 - only cosmetic
        return config
    return {**{name: config[name] for name in fields if name in config}, **config}


def _record(job: CompileJob, compiled: CompileResult, params: dict[str, Any], **extra: Any) -> Record:
    return Record(
        kernel=job.kernel,
        params=params,
        config=_field_order(job.kernel, job.config),
        ok=extra.pop("ok", compiled.ok),
        error=extra.pop("error", compiled.error),
        registers=compiled.registers,
        spill_bytes=compiled.spill_bytes,
        smem_bytes=compiled.smem_bytes,
        mma=compiled.mma,
        compile_s=None if compiled.compile_s is None else round(compiled.compile_s, 3),
        arch=job.target.get("arch"),
        **extra,
    )


def tune(options: TuneOptions, *, timer: Callable[..., Any] | None = None) -> TuneResult:
    """Run the tuner (see the module docstring).

    Args:
        options: what to tune.
        timer: the GPU phase, ``timer(case, candidates, options) -> (records, stored_paths, ok)``; ``None`` means
            compile-only. The CLI passes :func:`autotune.gpu_worker.make_timer`'s timer when a CUDA device is present; tests
            pass a fake to exercise the selection logic without a GPU.

    Returns:
        A :class:`TuneResult`; ``failed_cases`` lists every case left without a valid config.
    """
    if options.compile_only:
        timer = None
    cases, per_case, plan_errors, unique_jobs = _plan(options)
    compiled = compile_all(
        unique_jobs, workers=options.jobs, progress=options.progress, tilelang_log_level=options.tilelang_log_level
    )
    result = TuneResult(timed=timer is not None)
    # Timing goes case by case; compile-only finishes at once, so only a timed run gets a second bar.
    show_timing = options.progress and timer is not None
    case_iter = _progress(enumerate(cases), total=len(cases), desc="time", enabled=show_timing, unit="case")
    for i, case in case_iter:
        if i in plan_errors:
            result.records.append(
                Record(
                    kernel=case.kernel, params=dict(case.static), config={}, ok=False, error=plan_errors[i],
                    registers=None, spill_bytes=None, smem_bytes=None, mma=None, compile_s=None,
                    arch=(options.target or dsl.HOPPER_TARGET)["arch"],
                )  # fmt: skip
            )
            result.failed_cases.append((case.kernel, dict(case.static)))
            continue
        candidates = [_Candidate(job, compiled[job]) for job in per_case[i]]
        survivors = [c for c in candidates if c.compiled.ok]
        if timer is None:
            result.records.extend(_record(c.job, c.compiled, dict(case.static)) for c in candidates)
            if not survivors:
                result.failed_cases.append((case.kernel, dict(case.static)))
            continue
        failed = [c for c in candidates if not c.compiled.ok]
        result.records.extend(_record(c.job, c.compiled, dict(case.static)) for c in failed)
        if not survivors:
            result.failed_cases.append((case.kernel, dict(case.static)))
            continue
        records, written, ok = timer(case, survivors, options)
        result.records.extend(records)
        result.written.extend(str(p) for p in written if str(p) not in result.written)
        if not ok:
            result.failed_cases.append((case.kernel, dict(case.static)))
    return result


def select_and_store(
    case: space.Case,
    candidates: Sequence[_Candidate],
    sizes: dict[str, int],
    latencies: dict[int, float | None],
    errors: dict[int, str | None],
    *,
    sku: str,
    cache_dir: Path,
    store: bool = True,
) -> tuple[list[Record], Any]:
    """Turn one size point's measurements into records, mark the winner and store it in the cache.

    Args:
        latencies: candidate position -> median latency in ms, or ``None`` when the candidate was rejected.
        errors: candidate position -> why it was rejected (``None`` when it was timed).

    Returns:
        The records (one per candidate) and the cache file written, or ``None`` when no candidate was valid.
    """
    own = space.spec(case.kernel).flops
    work = own(case.static, sizes) if own is not None else flops.call_flops(case.kernel, case.static, sizes)
    winner = pick_winner(latencies)
    params = {**case.static, **sizes}
    records = []
    for i, cand in enumerate(candidates):
        lat = latencies.get(i)
        records.append(
            _record(
                cand.job,
                cand.compiled,
                params,
                ok=lat is not None,
                error=errors.get(i),
                latency_ms=None if lat is None else round(lat, 6),
                tflops=None if lat is None else _round(tflops_of(work, lat)),
                chosen=i == winner,
            )
        )
    written = None
    if winner is not None and store:
        default = space.default_config(case.kernel, case.static)
        default_at = next((i for i, c in enumerate(candidates) if c.job.config == default), None)
        default_lat = latencies.get(default_at) if default_at is not None else None
        metrics = {
            "latency_ms": latencies[winner],
            "tflops": tflops_of(work, latencies[winner]),
            "default_latency_ms": default_lat,
            "candidates": len(candidates),
        }
        written = cache.store(
            case.kernel, case.static, sizes, candidates[winner].job.config, sku=sku, cache_dir=cache_dir,
            metrics=metrics,
        )  # fmt: skip
    return records, written


def _round(value: float | None, digits: int = 4) -> float | None:
    """``value`` to ``digits`` significant digits (report precision)."""
    return None if value is None else float(f"{value:.{digits}g}")


def default_jobs() -> int:
    """Compile workers by default: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)

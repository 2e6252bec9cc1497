"""One command on a CUDA host: record the host, run the GPU tests, benchmark, tune briefly, write one JSON record.

Stages (each in its own subprocess with a time budget, so a crash or a hang in one is recorded and the later stages
still run; the record is rewritten after every stage, so even a killed run leaves what it measured):

1. ``host``: GPU name, SKU id (``autotune.lookup.sku``), driver, CUDA, torch and tilelang versions, and the host's
   measured ceilings: device-to-device copy bandwidth, bf16 and FP8 matrix rates (``dsa-bench --measure-ceilings``);
2. ``compile``: every sm_90a kernel the GPU tests use, compiled in parallel on every usable CPU into TileLang's cache
   (``dsa-autotune --compile-only --full`` over a shapes file that ``pytest --collect-only --dsa-gpu-kernels FILE``
   writes from the GPU test modules' ``GPU_KERNELS`` at run time, so the list cannot drift from the tests), so that
   the test stages load them in milliseconds instead of compiling them one after another (5-30 s of nvcc each). The
   same kernels serve the bench stage and the tune stage's candidates. A failed or timed-out compile stage is
   recorded and the later stages run anyway: whatever is not in the cache they compile on first use;
3. ``tests``: ``HYPOTHESIS_PROFILE=gpu python -m pytest -m "gpu and not ws and not portable"``, with pass/fail/skip
   counts and the failing tests;
4. ``tests_ws``: the same for ``-m "gpu and ws"``, the GPU tests of sparse_mla_fwd's warp-specialised schedule
   (``pipeline="ws"``, mbarrier hand-offs never run on a GPU before), in a stage of their own so that a deadlock
   there costs only this stage. Both test stages run with ``-o faulthandler_timeout=...``: a test still running by
   then has every thread's traceback dumped into the log, so a hang's location is in the record before the kill;
   ``tests_portable``: ``-m "gpu and portable"``, the portable schedule (mma.sync, no wgmma or TMA: what every other
   GPU runs) built for sm_90 with ``DSA_PORTABLE=1``, so that one Hopper session checks those kernels too (their
   default configs are compiled in the compile stage as well); ``tests_decode``: ``-m "gpu and decode"``, the decode
   kernels (paged bf16/FP8 caches) and the model served by them, which build their kernels in parallel first;
5. ``bench``: every standard benchmark case, the DSA kernels side by side with the reference, dense attention,
   ``torch.topk`` and FlashMLA/DeepGEMM where importable (``dsa-bench``);
6. ``tune``: a short tuning pass for this SKU (``dsa-autotune --sku auto`` over the small shapes file
   ``benchmarks/tune_small.json``; a candidate that hangs is killed after ``TUNE_CANDIDATE_TIMEOUT_S`` and recorded
   as rejected);
7. the record ``benchmarks/results/<sku>-<YYYYMMDD>.json``, a PNG plot beside it (TFLOP/s and latency against context
   length, DSA against dense attention; skipped with a note when matplotlib is missing), and a summary table, last.

The compile and tune stages write their tuning-cache files (tuned configs, cached ptxas reports) into a folder inside
the work directory (``DSA_CACHE_DIR``), never into the user's cache; TileLang's kernel cache is the environment's own
(``TILELANG_CACHE_DIR``), shared by every stage: that is how the later stages find the compiled kernels.
``scripts/gpu_check.sh`` puts both, and every other cache, in its work folder, so that a borrowed machine's home
directory is left alone.

Without a CUDA device it prints one line saying so and exits 2. Exit status otherwise: 0 when every stage passed,
1 when any stage failed or timed out (the record says which). Each stage prints its status and elapsed time when it
ends; each failed stage's record holds its first error (the first failing test's message, or the first error line of
its log).

``--collect-into DIR`` runs no stage: it packs what a run left (the newest record and PNG in ``--out-dir`` written
since ``--since FILE``'s mtime, the compile report and the logs of ``--work-dir``) into at most 8 files in ``DIR``
(:mod:`benchmarks.gpu_collect`): the record, the PNG, ``compile-report.json``, ``logs.tar.gz`` (every log, JUnit file
and intermediate JSON of the work folder) and ``summary.txt`` (stage by stage: passed, failed, timeout or skipped,
with counts and the first error). ``scripts/gpu_check.sh`` runs it for the device tool's ``$OUT``, which returns at
most 8 files of at most 16 MiB each.

The default budgets add up to 9 minutes; ``--budget stage=seconds`` changes one, ``--skip stage`` leaves one out.
It needs a checkout of the repository (it runs its ``tests/`` and writes into its ``benchmarks/results/``):
``scripts/gpu_check.py`` (or ``bash scripts/gpu_check.sh`` with the offline bundle) runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import gpu_record
from benchmarks.gpu_collect import COMPILE_REPORT_NAME, MAX_OUT_FILES, SUMMARY_NAME, collect_outputs
from benchmarks.gpu_record import FIRST_ERROR_CHARS, STAGES, first_error
from dsa import process

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
NO_GPU_MESSAGE = "gpu_check: no CUDA device found (torch.cuda.is_available() is False); run this on a CUDA host"
# Seconds per stage; their sum (540 s) keeps the whole check, with the bundle's unpacking, inside one 10-minute call.
# Without the compile stage every stage compiled its kernels one after another on first use, which a cold TileLang
# cache could not fit in the test stages' budgets; the compile stage builds all of them at once on the host's 16
# cores, so:
# - host: torch import, 1 GiB copies and two 8192^3 matmuls, 10 timings each: 20 s is ample;
# - compile: the 57 kernels the GPU tests used before the fused selection took 970 s of job time on a loaded 2-core
#   machine (8 min 17 s wall with 2 jobs): about 12 s a kernel, 30 s for the backward's. On 16 cores that is about a
#   minute (the backward's 16 come last, one round); the fused selection adds 16 (its whole Hopper space for four
#   statics, about 34 s each on 2 cores: one more round); 155 s leaves room for slower cores and the workers' start,
#   and 25 s of it build the portable schedule's default configs for sm_90 (one per static, about 16 kernels);
# - tests: the fuzz tests' examples with a warm cache, now that compiles take milliseconds: 125 s (110 s before the
#   fused selection's 17 tests, a few of them over 131K-key rows against the CPU reference);
# - tests_ws: sparse_mla_fwd's ws fuzz test and the two ws cases, with its kernels already compiled: 40 s;
# - tests_portable: about 30 explicit cases of the portable schedule (DSA_PORTABLE=1, sm_90), compiled: 45 s;
# - bench: its kernels are the tests' V3.2 ones (compiled, and loaded by the test stages), so what is left is the
#   timing itself, 19 cases at most 1.5 s per provider: 85 s (was 150 s; cases that do not fit are recorded as
#   such, the correctness stages come first); the portable schedule's provider beside dsa (attention and indexer
#   cases) shares that budget;
# - tests_decode: the decode kernels' GPU tests (split attention over paged bf16/FP8 caches, the paged selection, the
#   tiny model served by them), which compile their own kernels in parallel first (their modules' prebuild fixtures:
#   they are not tuner kernels; each took 17-54 s to build for sm_90a on 2 loaded cores): 60 s, from bench
#   (105 -> 85), tests (135 -> 125), compile (155 -> 145; its 25 s of slack) and tune (40 -> 20);
# - tune: tune_small.json's candidates are in the compile stage's set, so it only checks and times them: 20 s.
DEFAULT_BUDGETS: dict[str, int] = {
    "host": 20,
    "compile": 145,
    "tests": 125,
    "tests_ws": 40,
    "tests_portable": 45,
    "tests_decode": 60,
    "bench": 85,
    "tune": 20,
}
# The pytest -m expression of each test stage: the unverified ws schedule and the portable schedule apart from the rest.
TEST_STAGE_MARKERS: dict[str, str] = {
    "tests": "gpu and not ws and not portable and not decode",
    "tests_ws": "gpu and ws",
    "tests_portable": "gpu and portable",
    "tests_decode": "gpu and decode",
}
# A stage with less time than this before the overall deadline is not started (recorded as a timeout).
MIN_STAGE_S = 5.0
# A test still running after this many seconds (at most half its stage's budget, so that the dump lands before the
# kill) has its threads' tracebacks dumped into the log by pytest's built-in faulthandler_timeout; it is not stopped.
FAULTHANDLER_TIMEOUT_S = 30
# The tune stage's limit per candidate step: the compile phase has filled TileLang's kernel cache, so a check or a
# timing at the small shapes takes seconds, and a hung candidate (the ws schedule) must not eat the stage's budget.
TUNE_CANDIDATE_TIMEOUT_S = 20
# The bench stage runs 19 cases with up to 5 providers each: a short per-provider budget keeps it inside its stage.
BENCH_DEFAULT_ARGS: tuple[str, ...] = ("--reps", "10", "--warmup", "2", "--budget-s", "1.5")
TUNE_SHAPES = ROOT / "benchmarks" / "tune_small.json"
# The shapes file of the compile stage, written into the work directory from the GPU test modules' GPU_KERNELS (the
# option is tests/conftest.py's). Not in it: the backward's two small pre/post-processing kernels, which are not tuner
# kernels; the first backward test compiles them in a few seconds.
GPU_KERNELS_OPTION = "--dsa-gpu-kernels"
COMPILE_SHAPES_NAME = "gpu-test-kernels.json"
# The tuning-cache folder (DSA_CACHE_DIR) of the compile and tune stages, inside the work directory: shared, so that the
# tune stage finds the ptxas reports of its candidates, and apart from the user's cache.
DSA_CACHE_SUBDIR = "dsa-cache"
# Where the Linux kernel states a cgroup v2 CPU quota ("<quota> <period>" in microseconds, or "max <period>").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOG_TAIL_CHARS = 4000


@dataclass
class StageRun:
    """What one stage's subprocess did."""

    rc: int | None
    seconds: float
    timed_out: bool
    output: str


def run_stage_process(cmd: Sequence[str], *, budget_s: float, env: dict[str, str], log: Path) -> StageRun:
    """Run ``cmd`` in its own process group, its output in ``log``, and stop the group at ``budget_s``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        finished = process.run_with_deadline(cmd, timeout_s=budget_s, cwd=ROOT, env=env, stdout=sink)
    output = log.read_text(encoding="utf-8", errors="replace")
    return StageRun(finished.rc, finished.seconds, finished.timed_out, output)


def pytest_command(
    python: str, stage: str, *, budget_s: float, junit: Path, extra_args: Sequence[str] = ()
) -> list[str]:
    """The command of test stage ``stage`` (``tests`` or ``tests_ws``): its marker expression, a JUnit file, and a
    faulthandler timeout that dumps a hanging test's traceback before the stage is killed at ``budget_s``."""
    dump_after = max(1, min(FAULTHANDLER_TIMEOUT_S, int(budget_s // 2)))
    cmd = [python, "-m", "pytest", "-m", TEST_STAGE_MARKERS[stage], "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", "-o", f"faulthandler_timeout={dump_after}"]
    return cmd + list(extra_args)


def compile_jobs(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Parallel compile processes for the compile stage: the CPUs this process may run on.

    ``os.cpu_count()`` alone counts every CPU of the machine; in a container limited by CPU affinity or a cgroup quota
    that many nvcc processes would only contend for the same few cores (and their memory), so the smaller of the
    affinity mask and the quota wins.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one we do not understand: the affinity mask stands
        pass
    return max(1, cpus)


def collect_command(python: str, *, shapes: Path) -> list[str]:
    """The command that writes the compile stage's shapes file: the GPU tests collected (not run), their modules'
    ``GPU_KERNELS`` written to ``shapes`` by the option of ``tests/conftest.py``."""
    return [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
            f"{GPU_KERNELS_OPTION}={shapes}"]  # fmt: skip


def compile_command(python: str, *, jobs: int, report: Path, shapes: Path, defaults_only: bool = False) -> list[str]:
    """The compile stage's command: the whole tuning space (``--full``: the GPU tests run every config, which the
    default pruned space leaves out for the indexer and top-k) of every case in ``shapes``, or with
    ``defaults_only`` each case's default config (the portable schedule's tests run only those), compiled and pruned
    only, ``jobs`` at a time, with a JSON report of every kernel."""
    space = "--defaults-only" if defaults_only else "--full"
    cmd = [python, "-m", "autotune.cli", "--compile-only", space, "--shapes", str(shapes)]
    return cmd + ["--jobs", str(jobs), "--no-progress", "--report", str(report)]


def read_report(path: Path) -> list[dict[str, Any]] | None:
    """The records of an ``autotune.py --report`` file, or None when there is none: the tuner writes it once, at its
    end, so a stage killed at its budget (or during that write) leaves no usable report."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return records if isinstance(records, list) else None


def stage_record(name: str, run: StageRun, budget_s: float, **extra: Any) -> dict[str, Any]:
    """The JSON record of a stage: status ``ok`` / ``failed`` / ``timeout``, exit code, time, output tail, and for a
    stage that did not pass its first error (``extra``'s ``first_error`` when given, else one from its output)."""
    status = "timeout" if run.timed_out else ("ok" if run.rc == 0 else "failed")
    record = {
        "stage": name,
        "status": status,
        "rc": run.rc,
        "seconds": round(run.seconds, 1),
        "budget_s": budget_s,
        "log_tail": run.output[-LOG_TAIL_CHARS:],
        **extra,
    }
    if status != "ok" and not record.get("first_error"):
        record["first_error"] = first_error(run.output)
    return record


def announce(record: dict[str, Any]) -> None:
    """Print one line as a stage ends: its status and elapsed time against its budget."""
    print(
        f"[gpu_check] stage {record['stage']}: {record['status']} in {record['seconds']:.1f} s "
        f"(budget {record['budget_s']} s)",
        flush=True,
    )


def junit_counts(path: Path) -> dict[str, Any]:
    """Test counts and failing test ids from a pytest ``--junitxml`` file (empty when it is missing)."""
    if not path.is_file():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"junit_error": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    error: str | None = None
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                test_id = f"{case.get('classname')}::{case.get('name')}"
                failing.append(test_id)
                if error is None:
                    message = (problem.get("message") or problem.text or "").strip().splitlines()
                    error = f"{test_id}: {message[0] if message else problem.tag}"[:FIRST_ERROR_CHARS]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result: dict[str, Any] = {**counts, "failing": failing[:50]}
    if error is not None:
        result["first_error"] = error
    return result


def cuda_available() -> tuple[bool, str]:
    """Whether torch sees a CUDA device (asked in a subprocess-free, cheap way), and a reason when not."""
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return False, ""
    return True, ""


def results_paths(sku: str | None, out_dir: Path) -> tuple[Path, Path]:
    """``<out_dir>/<sku>-<YYYYMMDD>.json`` and the PNG beside it."""
    stem = f"{sku or 'unknown-gpu'}-{time.strftime('%Y%m%d', time.gmtime())}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.png"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


@dataclass
class Deadline:
    """The time the whole check must end by (``time.monotonic()``; ``None``: no limit): stage budgets are cut to fit,
    leaving each stage's stop grace (a stage stopped at its budget may take that long to exit)."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def clip(self, budget_s: float) -> float:
        """``budget_s``, or less when the deadline is nearer."""
        if self.at is None:
            return budget_s
        return min(budget_s, self.at - time.monotonic() - process.STOP_GRACE_S)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="gpu_check", description="One-shot GPU check: host, GPU tests, benchmarks, short tuning, record.")
    p.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where the record and plot go (default %(default)s)"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="logs and intermediate files (default: a temp folder)")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="change a stage's budget")
    p.add_argument("--skip", action="append", default=[], choices=STAGES, help="leave a stage out")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="end the whole check within this many seconds: each stage's budget is cut to the time left, and a stage "
        f"with under {MIN_STAGE_S} s left is recorded as a timeout without starting (gpu_check.sh passes what is left "
        "of the device call, so the record is always written and collected)",
    )
    p.add_argument("--bench-args", default="", help="extra arguments for dsa-bench (e.g. '--kernels topk')")
    p.add_argument("--pytest-args", default="", help="extra arguments for the GPU test run")
    p.add_argument(
        "--collect-into",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"run nothing: pack what a run left in --work-dir and --out-dir into at most {MAX_OUT_FILES} files in DIR",
    )
    p.add_argument(
        "--since", type=Path, default=None, metavar="FILE", help="with --collect-into: only records newer than FILE"
    )
    p.add_argument(
        "--runner-rc", type=int, default=None, help="with --collect-into: the check's exit status, for summary.txt"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.collect_into is not None:
        if args.work_dir is None:
            print("gpu_check: --collect-into needs --work-dir", file=sys.stderr)
            return EXIT_FAILED
        since = args.since.stat().st_mtime if args.since is not None and args.since.exists() else None
        written = collect_outputs(
            args.collect_into, work=args.work_dir, results=args.out_dir, since=since, runner_rc=args.runner_rc
        )
        print(f"gpu_check: {len(written)} files in {args.collect_into}: {', '.join(p.name for p in written)}")
        summary = args.collect_into / SUMMARY_NAME
        if summary.is_file():
            print(summary.read_text(encoding="utf-8"), end="")
        return EXIT_OK
    budgets = dict(DEFAULT_BUDGETS)
    for item in args.budget:
        stage, _, seconds = item.partition("=")
        if stage not in budgets or not seconds.replace(".", "", 1).isdigit():
            print(f"gpu_check: --budget needs STAGE=SECONDS with STAGE in {STAGES}, got {item!r}", file=sys.stderr)
            return EXIT_NO_GPU
        budgets[stage] = int(float(seconds))
    ok, reason = cuda_available()
    if not ok:
        print(NO_GPU_MESSAGE + (f": {reason}" if reason else ""), file=sys.stderr)
        return EXIT_NO_GPU
    if not (ROOT / "tests").is_dir():
        print(f"gpu_check: {ROOT} is not a checkout of the repository (no tests/): run it from one", file=sys.stderr)
        return EXIT_NO_GPU

    import tempfile

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dsa-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    py = sys.executable
    started = time.time()
    doc: dict[str, Any] = {
        "format": "dsa-gpu-check/1",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "budgets_s": budgets,
        "skipped": [stage for stage in STAGES if stage in args.skip],
        "stages": [],
        "host": {},
        "ceilings": {},
    }
    record_path, png_path = results_paths(None, args.out_dir)
    deadline = Deadline.after(args.deadline_s)

    def save() -> None:
        doc["record_path"] = str(record_path)
        write_json(record_path, doc)

    def out_of_time(stage: str) -> bool:
        """Whether the overall deadline leaves ``stage`` too little time; if so it is recorded as a timeout."""
        if deadline.clip(budgets[stage]) >= MIN_STAGE_S:
            return False
        rec = {"stage": stage, "status": "timeout", "rc": None, "seconds": 0.0, "budget_s": budgets[stage],
               "log_tail": "", "first_error": "not started: the overall deadline (--deadline-s) left no time"}  # fmt: skip
        doc["stages"].append(rec)
        announce(rec)
        save()
        return True

    # 1. host and ceilings
    ceilings_json = work / "ceilings.json"
    if "host" not in args.skip and not out_of_time("host"):
        print("[gpu_check] stage host: versions, SKU, ceilings", flush=True)
        run = run_stage_process(
            [py, "-m", "benchmarks.bench", "--measure-ceilings", "--json", str(ceilings_json)],
            budget_s=deadline.clip(budgets["host"]), env=env, log=work / "host.log",
        )  # fmt: skip
        doc["stages"].append(stage_record("host", run, budgets["host"]))
        announce(doc["stages"][-1])
        if ceilings_json.is_file():
            measured = json.loads(ceilings_json.read_text())
            doc["host"], doc["ceilings"] = measured.get("host", {}), measured.get("ceilings", {})
    record_path, png_path = results_paths(doc["host"].get("sku"), args.out_dir)
    save()

    # 2. every kernel of the GPU tests, compiled in parallel into TileLang's disk cache (the later stages run whatever
    # happens here: a kernel missing from the cache is compiled on first use, as it was before this stage)
    dsa_cache = work / DSA_CACHE_SUBDIR
    if "compile" not in args.skip and not out_of_time("compile"):
        jobs = compile_jobs()
        print(f"[gpu_check] stage compile: the GPU tests' kernels, {jobs} at a time", flush=True)
        report = work / COMPILE_REPORT_NAME
        shapes = work / COMPILE_SHAPES_NAME
        compile_env = {**env, "DSA_CACHE_DIR": str(dsa_cache)}
        started_compile = time.monotonic()
        run = run_stage_process(
            collect_command(py, shapes=shapes),
            budget_s=deadline.clip(budgets["compile"]),
            env=env,
            log=work / "collect.log",
        )
        records: list[dict[str, Any]] | None = None
        if shapes.is_file():
            left = max(1.0, deadline.clip(budgets["compile"] - (time.monotonic() - started_compile)))
            cmd = compile_command(py, jobs=jobs, report=report, shapes=shapes)
            run = run_stage_process(cmd, budget_s=left, env=compile_env, log=work / "compile.log")
            records = read_report(report)
            if "tests_portable" not in args.skip and run.rc == 0:
                # The portable schedule's default configs for the same shapes (DSA_PORTABLE=1: sm_90 on Hopper).
                left = max(1.0, deadline.clip(budgets["compile"] - (time.monotonic() - started_compile)))
                portable_report = work / "compile-portable-report.json"
                cmd = compile_command(py, jobs=jobs, report=portable_report, shapes=shapes, defaults_only=True)
                portable_env = {**compile_env, "DSA_PORTABLE": "1"}
                run = run_stage_process(cmd, budget_s=left, env=portable_env, log=work / "compile-portable.log")
                portable = read_report(portable_report)
                records = None if portable is None or records is None else records + portable
        counts = {} if records is None else {"kernels": len(records), "ok": sum(bool(r.get("ok")) for r in records)}
        # The stage's seconds are its whole time: the collect step and both compiles.
        seconds = round(time.monotonic() - started_compile, 1)
        rec = stage_record("compile", run, budgets["compile"], jobs=jobs, seconds=seconds, **counts)
        doc["stages"].append(rec)
        announce(rec)
        if records is None:
            outcome = "no report (the tuner did not finish)"
        else:
            outcome = f"{counts['kernels']} kernels, {counts['ok']} ok"
        doc["compile"] = {"status": rec["status"], "summary": f"{outcome}, {jobs} jobs", **counts}
        save()

    # 3./4. gpu-marked tests under the gpu Hypothesis profile: all but the ws and portable schedules', then each
    test_env = {**env, "HYPOTHESIS_PROFILE": "gpu"}
    for stage in ("tests", "tests_ws", "tests_portable", "tests_decode"):
        if stage in args.skip or out_of_time(stage):
            continue
        selection = TEST_STAGE_MARKERS[stage]
        print(f"[gpu_check] stage {stage}: pytest -m '{selection}' (HYPOTHESIS_PROFILE=gpu)", flush=True)
        junit = work / f"{stage}.xml"
        stage_budget = deadline.clip(budgets[stage])
        cmd = pytest_command(py, stage, budget_s=stage_budget, junit=junit, extra_args=args.pytest_args.split())
        run = run_stage_process(cmd, budget_s=stage_budget, env=test_env, log=work / f"{stage}.log")
        counts = junit_counts(junit)
        doc[stage] = counts
        # pytest exits 5 when nothing is collected: no gpu tests is a failure of this stage, not a pass.
        doc["stages"].append(
            stage_record(stage, run, budgets[stage], **{k: v for k, v in counts.items() if k != "failing"})
        )
        announce(doc["stages"][-1])
        save()

    # 5. benchmarks
    bench_json = work / "bench.json"
    if "bench" not in args.skip and not out_of_time("bench"):
        print("[gpu_check] stage bench: standard cases side by side", flush=True)
        cmd = [py, "-m", "benchmarks.bench", "--json", str(bench_json), *BENCH_DEFAULT_ARGS]
        if ceilings_json.is_file():
            cmd += ["--ceilings", str(ceilings_json)]
        cmd += args.bench_args.split()
        run = run_stage_process(cmd, budget_s=deadline.clip(budgets["bench"]), env=env, log=work / "bench.log")
        bench = json.loads(bench_json.read_text()) if bench_json.is_file() else {}
        doc["bench"] = {"rows": bench.get("rows", []), "failed_cases": bench.get("failed_cases", [])}
        doc["stages"].append(stage_record("bench", run, budgets["bench"], rows=len(doc["bench"]["rows"])))
        announce(doc["stages"][-1])
        save()

    # 6. short tuning pass for this SKU
    if "tune" not in args.skip and not out_of_time("tune"):
        print("[gpu_check] stage tune: autotune --sku auto (small shapes)", flush=True)
        report = work / "autotune-report.json"
        tune_env = {**env, "DSA_CACHE_DIR": str(dsa_cache)}
        cmd = [py, "-m", "autotune.cli", "--sku", "auto", "--shapes", str(TUNE_SHAPES), "--no-progress"]
        cmd += ["--report", str(report), "--candidate-timeout", str(TUNE_CANDIDATE_TIMEOUT_S)]
        run = run_stage_process(cmd, budget_s=deadline.clip(budgets["tune"]), env=tune_env, log=work / "tune.log")
        records = json.loads(report.read_text()) if report.is_file() else []
        chosen = [r for r in records if r.get("chosen")]
        rec = stage_record("tune", run, budgets["tune"], records=len(records))
        doc["stages"].append(rec)
        announce(rec)
        doc["tune"] = {
            "status": rec["status"],
            "summary": f"{len(records)} candidates, {len(chosen)} chosen, cache {dsa_cache}",
            "chosen": chosen,
        }
        save()

    # 7. plot and summary
    title = f"DSA vs dense attention on {doc['host'].get('gpu', '?')} ({doc['host'].get('sku', '?')})"
    note = gpu_record.plot(doc.get("bench", {}).get("rows", []), png_path, title)
    doc["plot"] = None if note else str(png_path)
    if note:
        doc["plot_note"] = note
    doc["seconds"] = round(time.time() - started, 1)
    failed = [s["stage"] for s in doc["stages"] if s["status"] != "ok"]
    doc["ok"] = not failed
    save()
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(gpu_record.summary(doc))
    if failed:
        print(f"gpu_check: stages not ok: {', '.join(failed)}")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

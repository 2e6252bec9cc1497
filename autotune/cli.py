"""``dsa-autotune`` / ``scripts/autotune.py``: tune every kernel for this GPU and save the winners in the cache.

With a CUDA device: compile the candidates (in parallel on the CPU), prune them by their static report, check each
against the reference, time the correct ones, store the fastest per size bucket in ``<DSA_CACHE_DIR>/<sku>/`` and print
a table per kernel. Checks and timings run in a worker process: a candidate that crashes it or runs past
``--candidate-timeout`` is recorded as rejected and the rest go on (``--in-process`` turns that off). Without one,
or with ``--compile-only``: compile for the architecture of ``--sku`` (sm_90a when none is given) and prune only (this
warms TileLang's kernel cache for that target) and print the same table without times. The architecture comes from
``dsa.hardware.target_for_capability`` alone: sm_90a for Hopper, the portable schedule for every other GPU.

Exit status: 0 when every tuned case has a valid config, 1 when some case has none, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from autotune import tuner
from autotune.lookup import sku as sku_mod
from autotune.lookup import space
from benchmarks import measure
from dsa import env, hardware

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_VALID_CONFIG = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="dsa-autotune",
        description="Tune the DSA TileLang kernels for this GPU and save the fastest correct configs.",
    )
    parser.add_argument(
        "--sku",
        default="auto",
        help=f"SKU id to tune for ({', '.join(sku_mod.KNOWN_SKUS)}), a family of them (e.g. a100) or "
        "sm<major><minor>-<name>; 'auto' (default) detects the current GPU, or compiles for sm_90a without one",
    )
    parser.add_argument(
        "--kernels",
        default="all",
        help=f"'all' or a comma-separated subset of: {', '.join(space.TUNED_KERNEL_NAMES)}",
    )
    parser.add_argument(
        "--shapes",
        default="deepseek-v3.2",
        help=f"a preset ({', '.join(space.PRESETS)}) or a JSON file of cases (default: deepseek-v3.2)",
    )
    parser.add_argument("--compile-only", action="store_true", help="compile and prune only, even with a GPU")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: usable CPUs)")
    parser.add_argument("--report", type=Path, default=None, help="write a JSON list of every candidate's record")
    space_group = parser.add_mutually_exclusive_group()
    space_group.add_argument("--full", action="store_true", help="search the whole space (default: a pruned space)")
    space_group.add_argument(
        "--defaults-only", action="store_true", help="only each case's default config (what an untuned launch runs)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--reps", type=int, default=measure.TIMED_CALLS, help="timed calls per candidate and size")
    parser.add_argument(
        "--candidate-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill a candidate that runs this long in one step on the GPU (its check including the kernel load, or "
        "its timing at one size) and record it as failed (default: $DSA_TUNE_CANDIDATE_TIMEOUT_S or 120)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="check and time in this process instead of a worker process (debugging: a candidate that crashes or "
        "hangs then ends the whole run)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def _parse_kernels(value: str) -> tuple[str, ...]:
    if value.strip() == "all":
        return space.TUNED_KERNEL_NAMES  # the built-in kernels (kernels registered by tests are named explicitly)
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise ValueError("--kernels needs 'all' or at least one kernel name")
    for name in names:
        space.spec(name)
    return names


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _sku_target(sku: str) -> dict[str, str]:
    """The target kernels for ``sku`` are built for (``ValueError`` for an unknown id or a GPU without kernels)."""
    major, minor = sku_mod.capability_for_sku(sku)
    target = hardware.target_for_capability((major, minor), portable=env.portable())
    if target is None:
        raise ValueError(f"--sku {sku}: no kernels are built for compute capability {major}.{minor}")
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def render_table(records: Sequence[tuner.Record], *, timed: bool) -> str:
    """A plain-text table per kernel and parameter set: config, registers, spills, shared memory, the GEMMs' matrix
    instruction, compile time, and with a GPU the latency, TFLOP/s and the winner."""
    lines: list[str] = []
    header = ["config", "regs", "spill B", "smem KiB", "mma", "compile s"]
    if timed:
        header += ["time ms", "TFLOP/s", "winner"]
    header.append("status")
    groups: dict[tuple[str, str], list[tuner.Record]] = {}
    for rec in records:
        groups.setdefault((rec.kernel, json.dumps(rec.params)), []).append(rec)
    for (kernel, _), recs in groups.items():
        rows = []
        for rec in recs:
            row = [
                _config_text(rec.config),
                _fmt(rec.registers),
                _fmt(rec.spill_bytes),
                _fmt(None if rec.smem_bytes is None else rec.smem_bytes / 1024, ".1f"),
                _fmt(rec.mma),
                _fmt(rec.compile_s, ".1f"),
            ]
            if timed:
                row += [_fmt(rec.latency_ms, ".4f"), _fmt(rec.tflops, ".1f"), "*" if rec.chosen else ""]
            status = "ok" if rec.ok else f"rejected: {(rec.error or '').splitlines()[0][:100] if rec.error else '?'}"
            row.append(status)
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        arch = f" on {recs[0].arch}" if recs[0].arch else ""
        lines.append(f"{kernel}{arch}  [{_params_text(recs[0].params)}]")
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
        lines.append("")
    return "\n".join(lines)


def write_report(path: Path, records: Sequence[tuner.Record]) -> None:
    """Write the ``--report`` JSON: a list of records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([rec.to_json() for rec in records], indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the tuner from the command line (see ``--help``); returns the exit status."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        kernels = _parse_kernels(args.kernels)
        if args.shapes not in space.preset_names() and not Path(args.shapes).is_file():
            raise ValueError(f"--shapes: {args.shapes!r} is neither a preset ({', '.join(space.PRESETS)}) nor a file")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError("--jobs must be at least 1")
        if args.reps < 1:
            raise ValueError("--reps must be at least 1")
        if args.candidate_timeout is not None and not 0 < args.candidate_timeout < math.inf:
            raise ValueError("--candidate-timeout must be a positive number of seconds")
        # Read now, so that a bad DSA_TUNE_CANDIDATE_TIMEOUT_S is a usage error, not a failure after compiling.
        candidate_timeout_s = args.candidate_timeout or env.tune_candidate_timeout_s()
        sku_target: dict[str, str] | None = None
        if args.sku != "auto":
            if not sku_mod.is_valid_sku(args.sku):
                raise ValueError(f"--sku: {args.sku!r} is not a SKU id (lower-case letters, digits and dashes)")
            sku_target = _sku_target(args.sku)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"dsa-autotune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    has_gpu = _cuda_available()
    timed = has_gpu and not args.compile_only
    sku: str | None = None
    target = sku_target or dict(space.HOPPER_TARGET)
    if has_gpu:
        import torch

        detected = sku_mod.current_sku()
        device_target = hardware.device_target(torch.device("cuda"))
        sku = detected if args.sku == "auto" else args.sku
        if sku_target is None:
            target = device_target or target
        if sku != detected:
            logger.warning("tuning on a %s but storing results under --sku %s", detected, sku)
        if timed and env.portable() and hardware.is_hopper(torch.device("cuda")):
            # The SKU's cache holds configs for its own schedule (sm_90a); DSA_PORTABLE=1 is a check, not a schedule
            # to tune (launchers run its default).
            print("DSA_PORTABLE=1 on Hopper: compiling the portable schedule only (nothing is tuned for it).", file=out)
            timed = False
        if timed and target != device_target:
            # A kernel built for another architecture does not run here (or runs another schedule): no timing.
            print(f"This GPU ({detected}) does not run {target['arch']} kernels: compiling only.", file=out)
            timed = False
    else:
        sku = None if args.sku == "auto" else args.sku
        what = f"SKU {sku} ({target['arch']})" if sku else target["arch"]
        print(f"No CUDA device: compiling for {what} and pruning only (no timing, nothing saved).", file=out)
    if has_gpu and args.compile_only:
        print(f"--compile-only: compiling for {target['arch']} and pruning only (no timing, nothing saved).", file=out)

    options = tuner.TuneOptions(
        kernels=kernels,
        preset=args.shapes,
        full=args.full,
        defaults_only=args.defaults_only,
        target=target,
        jobs=args.jobs or tuner.default_jobs(),
        compile_only=not timed,
        sku=sku,
        progress=not args.no_progress,
        reps=args.reps,
        tilelang_log_level=logging.INFO if args.verbose else logging.WARNING,
        isolate=not args.in_process,
        candidate_timeout_s=candidate_timeout_s,
        cache_dir=env.cache_dir(),
    )
    timer = None
    if timed:
        from autotune import gpu_worker

        timer = gpu_worker.make_timer(sku=sku)
    start = time.perf_counter()
    try:
        result = tuner.tune(options, timer=timer)
    finally:
        if timer is not None:
            timer.close()  # ends the GPU worker process
    elapsed = time.perf_counter() - start

    print(render_table(result.records, timed=result.timed), file=out)
    if args.report is not None:
        write_report(args.report, result.records)
        print(f"report: {args.report}", file=out)
    for path in result.written:
        print(f"saved: {path}", file=out)
    n_ok = sum(rec.ok for rec in result.records)
    print(f"{len(result.records)} records, {n_ok} ok, in {elapsed:.1f} s", file=out)
    if result.failed_cases:
        for kernel, static in result.failed_cases:
            print(f"NO VALID CONFIG: {kernel} {_params_text(static)}", file=out)
        return EXIT_NO_VALID_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

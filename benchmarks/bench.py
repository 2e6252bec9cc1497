"""``dsa-bench``: benchmark the DSA kernels side by side with the reference, dense attention, ``torch.topk`` and
(where importable) FlashMLA / DeepGEMM, on one CUDA GPU.

The cases are declared once in ``benchmarks/cases.py`` (with their FLOP and byte counts); this module is the command
line over the harness (:mod:`benchmarks.harness`). For each case and provider:

* makes its inputs with the tuner's makers (:mod:`benchmarks.inputs` over :mod:`benchmarks.runners`, on top of
  ``dsa.testing``), enough input sets that together they exceed twice the L2 cache, and rotates through them
  (:mod:`benchmarks.measure`);
* makes one untimed call first (compilation, config lookup and allocator growth stay out of the numbers); a baseline
  whose first call alone exceeds the time budget is recorded with that one host-clock sample and skipped for the
  later cases of its kernel;
* times the calls with CUDA events, cut to the time budget, and reports the median and the spread (p10, p90, min,
  max), TFLOP/s and GB/s, and the targets of the case against the measured ceilings;
* checks the ``dsa`` provider once per case against ``dsa.reference`` on a slice of the problem, with every
  launcher output poisoned (NaN) before the call, by the comparison the tuner's gate uses.

The decode cases (``sparse_mla_decode``, ``index_topk_decode``: paged caches, not tuner kernels) get their inputs and
their check from :mod:`benchmarks.inputs` (``make_inputs``, ``check_dsa``), the same way. Cases marked
``quick=False`` in ``benchmarks/cases.py`` run only with ``--full`` or when ``--cases`` names them.

Results are long-format rows ``(kernel, provider, case, metric, value, unit, gpu, sku, versions, commit, note)``
written as JSON (``--json``, rewritten after every case so an interrupted run keeps what it measured).

Exit status: 0 when everything that ran passed its check; 1 when a ``dsa`` check failed or a ``dsa`` provider
errored; 2 without a CUDA device (or for bad arguments).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autotune.lookup import sku
from benchmarks import cases as case_data
from benchmarks import cost, harness, measure
from benchmarks.harness import DEFAULT_BUDGET_S, DEFAULT_REPS, DEFAULT_WARMUP, GIGA, CaseResult, RunOptions, run_case

__all__ = ["host_info", "main", "select_cases"]

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
NO_GPU_MESSAGE = "dsa-bench: no CUDA device is available; run on a GPU host (use --dry-run to list the cases)"
# The repository root, for the commit of the record (None outside a git checkout).
_ROOT = Path(__file__).resolve().parent.parent


def select_cases(kernels: str, names: str | None, *, tiny: bool = False, full: bool = False) -> list[case_data.Case]:
    """The standard (or, with ``tiny``, the miniature) cases of ``kernels`` (``all`` or comma list) whose name
    contains one of ``names`` (comma list). Without ``full`` and ``names`` only the default run's (``quick``) cases;
    ``names`` choose among every case (naming a case runs it)."""
    wanted = case_data.KERNELS if kernels.strip() == "all" else tuple(
        k.strip() for k in kernels.split(",") if k.strip()
    )  # fmt: skip
    unknown = set(wanted) - set(case_data.KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(case_data.KERNELS)}")
    selected = case_data.tiny_cases(wanted) if tiny else case_data.standard_cases(wanted, full=full or bool(names))
    if names:
        parts = [c.strip() for c in names.split(",") if c.strip()]
        selected = [c for c in selected if any(w == c.name or w in c.name for w in parts)]
    return selected


def dry_run_rows(selected: Sequence[case_data.Case], sku_id: str = cost.DEFAULT_SKU) -> list[dict[str, Any]]:
    """Rows with the FLOP and byte counts of ``selected`` and the cost model's estimate on ``sku_id`` (what
    ``--dry-run --json`` writes)."""
    rows = []
    for case in selected:
        note = json.dumps({**case.static, **case.sizes}, sort_keys=True)
        for metric, value, unit in (("flops", case.flops, "FLOP"), ("bytes", case.bytes, "B")):
            rows.append(harness.row(case, "-", metric, value, unit, note=note))
        rows += harness.model_rows(case, sku_id)[0]
    return rows


def _model_columns(case: case_data.Case, sku_id: str) -> tuple[str, ...]:
    estimate = cost.case_estimate(case, sku_id)
    if estimate is None:
        return ("-",) * 6
    waves = f"{estimate.waves:.2f}" if estimate.blocks else "-"
    rows = str(estimate.rows_dequantised) if estimate.rows_dequantised else "-"
    flashmla = cost.case_estimate(case, sku_id, provider="flashmla")
    flashmla_us = f"{flashmla.model_s * 1e6:.1f}" if flashmla else "-"
    return f"{estimate.model_s * 1e6:.1f}", f"{estimate.roofline_s * 1e6:.1f}", estimate.bound, waves, rows, flashmla_us


def format_dry_run(selected: Sequence[case_data.Case], sku_id: str = cost.DEFAULT_SKU) -> str:
    """A table of the cases: name, GFLOP, MB moved, arithmetic intensity, the cost model's time, roofline, bound,
    waves and dequantised rows on ``sku_id`` (``benchmarks.cost``), the model's time of FlashMLA's schedule (FP8
    decode cases), targets, parameters."""
    header = ("case", "GFLOP", "MB", "FLOP/B", f"model us ({sku_id})", "roofline us", "bound", "waves", "deq rows",
              "flashmla model us", "targets", "params")  # fmt: skip
    rows = []
    for c in selected:
        intensity = f"{c.flops / c.bytes:.1f}" if c.bytes and c.flops else "-"
        params = " ".join(f"{k}={v}" for k, v in {**c.static, **c.sizes}.items())
        targets = "; ".join(t.describe() for t in c.targets) or "-"
        rows.append((c.name, f"{c.flops / GIGA:.3f}", f"{c.bytes / 1e6:.1f}", intensity, *_model_columns(c, sku_id),
                     targets, params))  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Host description
# ----------------------------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command_output(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The repository's HEAD (``+dirty`` when the tree has changes), or None outside a git checkout."""
    head = _command_output(["git", "-C", str(_ROOT), "rev-parse", "--short=12", "HEAD"])
    if not head:
        return None
    dirty = _command_output(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def host_info() -> dict[str, Any]:
    """GPU name, SKU, memory, SM count, L2 size, the versions of driver, CUDA, torch and tilelang, and the torch CPU
    threads this process runs with (CPU timings depend on them: on a loaded 2-core machine the default threads made
    CPU decoding 10-60x slower than one thread)."""
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tilelang": _version("tilelang"),
        "driver": driver.splitlines()[0] if driver else None,
        "commit": git_commit(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=measure.l2_bytes(torch.device("cuda", 0)),
        )
        try:
            info["sku"] = sku.current_sku()
        except Exception as exc:  # noqa: BLE001 - the SKU is a label; a failure must not stop the run
            info["sku"] = None
            info["sku_error"] = f"{type(exc).__name__}: {exc}"
    return info


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """A compact table: one line per (case, provider) with median latency, throughput and the dsa check."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["provider"] == "-":
            continue
        entry = by_key.setdefault((r["case"], r["provider"]), {})
        entry[r["metric"]] = r["value"] if r["value"] is not None else r.get("note", "")
        if r["metric"] in ("skipped", "error"):
            entry[r["metric"]] = r.get("note", "")
    lines = [f"{'case':44} {'provider':13} {'ms':>10} {'TFLOP/s':>9} {'GB/s':>8}  note"]
    for (case, provider), e in by_key.items():
        ms, tf, gb = e.get("latency_ms"), e.get("tflops"), e.get("gbps")
        note = e.get("skipped") or e.get("error") or ""
        if "check" in e:
            note = ("check ok " if e["check"] is True else "CHECK FAILED ") + note
        if "peak_bytes" in e:
            note = f"peak {e['peak_bytes'] / 1e9:.2f} GB " + note
        if "peak_ratio_vs_dsa" in e:
            note += f"{e['peak_ratio_vs_dsa']:.2f}x dsa memory"
        ms_text = f"{ms:.4f}" if isinstance(ms, float) else "-"
        tf_text = f"{tf:.1f}" if isinstance(tf, float) else "-"
        gb_text = f"{gb:.0f}" if isinstance(gb, float) else "-"
        lines.append(f"{case[:44]:44} {provider[:13]:13} {ms_text:>10} {tf_text:>9} {gb_text:>8}  {str(note)[:70]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="dsa-bench", description="Benchmark the DSA kernels against the reference and dense attention."
    )
    p.add_argument(
        "--kernels", default="all", help=f"'all' or a comma list of: {', '.join(case_data.KERNELS)}"
    )
    p.add_argument(
        "--cases", default=None, help="comma list of case names (or substrings) to keep, among all cases (--full)"
    )
    p.add_argument(
        "--full", action="store_true", help="every case, also those left out of the default run (decode sweeps)"
    )
    p.add_argument("--providers", default=None, help="comma list of providers to run (default: all)")
    p.add_argument("--json", type=Path, default=None, help="write the result rows (and host, ceilings) here")
    p.add_argument(
        "--dry-run", action="store_true", help="list the cases with their counts and cost model; needs no GPU"
    )
    p.add_argument(
        "--sku", default=cost.DEFAULT_SKU, choices=sorted(sku.PERF_TABLE),
        help="the SKU the dry run's cost model estimates for (a GPU run uses its own)",
    )  # fmt: skip
    p.add_argument(
        "--ceilings", type=Path, default=None, help="read measured ceilings from this JSON (default: measure)"
    )
    p.add_argument("--measure-ceilings", action="store_true", help="only measure the ceilings (written to --json)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    p.add_argument("--reps", type=int, default=DEFAULT_REPS)
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time budget per provider and case")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: test the harness itself (host clock)"
    )
    p.add_argument("--tiny", action="store_true", help="miniature cases (harness tests; not benchmarks)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        selected = select_cases(args.kernels, args.cases, tiny=args.tiny, full=args.full)
    except ValueError as exc:
        print(f"dsa-bench: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    if args.dry_run:
        print(format_dry_run(selected, args.sku))
        if args.json:
            write_json(args.json, {"dry_run": True, "rows": dry_run_rows(selected, args.sku)})
        return EXIT_OK
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_NO_GPU
    harness.META.update(host_info())
    if args.measure_ceilings:
        if args.device != "cuda":
            print("dsa-bench: --measure-ceilings needs CUDA", file=sys.stderr)
            return EXIT_NO_GPU
        ceilings = measure.measure_ceilings()
        print(json.dumps(ceilings, indent=1))
        if args.json:
            write_json(args.json, {"host": harness.META, "ceilings": ceilings})
        return EXIT_OK
    if args.ceilings:
        ceilings = json.loads(args.ceilings.read_text())["ceilings"]
    else:
        ceilings = measure.measure_ceilings() if args.device == "cuda" else {}
    options = RunOptions(
        warmup=args.warmup,
        reps=args.reps,
        budget_s=args.budget_s,
        providers=tuple(p.strip() for p in args.providers.split(",")) if args.providers else None,
        check=not args.no_check,
        device=torch.device(args.device),
    )
    meta = harness.META
    doc: dict[str, Any] = {"host": meta, "ceilings": ceilings, "rows": [], "failed_cases": []}
    print(
        f"[bench] torch CPU threads: {meta['torch_threads']} (OMP_NUM_THREADS={meta['omp_num_threads'] or 'unset'}; "
        "torch.set_num_threads or OMP_NUM_THREADS changes it)",
        flush=True,
    )
    failed = False
    for case in selected:
        t0 = time.perf_counter()
        print(f"[bench] {case.name} ...", flush=True)
        try:
            result = run_case(case, options, ceilings)
        except Exception as exc:  # noqa: BLE001 - input creation or a harness bug: record, go on
            traceback.print_exc()
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            result = CaseResult([harness.row(case, "-", "error", None, "", error)], True)
            harness.empty_cache(options.device)
        doc["rows"] += result.rows
        if result.failed:
            doc["failed_cases"].append(case.name)
            failed = True
        print(
            f"[bench] {case.name} done in {time.perf_counter() - t0:.1f} s{' (FAILED)' if result.failed else ''}",
            flush=True,
        )
        if args.json:
            write_json(args.json, doc)
    print(summary_table(doc["rows"]))
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

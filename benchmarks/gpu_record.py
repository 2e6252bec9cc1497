"""The one-shot GPU check's record, read back: its stages, the first error line of a stage's output, a PNG plot of the
sparse MLA forward against dense attention, the summary table printed last, and the short stage-by-stage
``summary.txt`` returned beside the record (:mod:`benchmarks.gpu_check` writes the record,
:mod:`benchmarks.gpu_collect` packs it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "brief", "first_error", "plot", "summary"]

STAGES: tuple[str, ...] = ("host", "compile", "tests", "tests_ws", "tests_portable", "tests_decode", "bench", "tune")
"""The check's stages in the order they run; a record lists them in this order."""

# The first error line kept in a stage's record and in summary.txt.
FIRST_ERROR_CHARS = 300
# Lines that state an error: an exception (``ValueError: ...``, pytest's ``E   ...Error``), a fatal signal, pytest's
# FAILED/ERROR summary lines, faulthandler's ``Timeout (0:00:30)!``, a command-line tool's ``...: error: ...``. Lines of
# source code quoted in a traceback (``raise ValueError(...)``) start with something else and do not match.
_ERROR_LINE = re.compile(
    r"^\s*(?:E\s+)?(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b(?::|$)|Fatal Python error|FAILED\b|ERROR\b"
    r"|Segmentation fault|Timeout \()|\berror: "
)

DENSE_PROVIDERS: tuple[str, ...] = ("dense-sdpa", "dense-matmul")
"""Providers drawn as dense attention in the plot, in order of preference."""


def first_error(text: str) -> str | None:
    """The first line of ``text`` that states an error (see ``_ERROR_LINE``), else its last non-empty line, else None;
    at most ``FIRST_ERROR_CHARS`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in lines if _ERROR_LINE.search(line)), lines[-1] if lines else None)
    return None if found is None else found[:FIRST_ERROR_CHARS]


def _series(
    rows: Sequence[dict[str, Any]], kernel: str, provider: str, metric: str, prefix: str
) -> list[tuple[int, float]]:
    pts = [
        (int(r["context"]), float(r["value"]))
        for r in rows
        if r["kernel"] == kernel and r["provider"] == provider and r["metric"] == metric
        and r["case"].startswith(prefix) and r["value"] is not None
    ]  # fmt: skip
    return sorted(pts)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> str | None:
    """TFLOP/s and latency against context length: DSA (sparse MLA forward, prefill cases; and the whole DSA path's
    indexer) against dense attention. Returns None when written, else the reason it was not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no plot"
    prefix = "sparse_mla_fwd-prefill"
    providers = ("dsa", *DENSE_PROVIDERS, "flashmla", "reference")
    fig, (ax_tf, ax_ms) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = 0
    for provider in providers:
        tf = _series(rows, "sparse_mla_fwd", provider, "tflops", prefix)
        ms = _series(rows, "sparse_mla_fwd", provider, "latency_ms", prefix)
        label = "DSA sparse MLA fwd" if provider == "dsa" else provider
        if tf:
            ax_tf.plot(*zip(*tf, strict=True), marker="o", label=label)
        if ms:
            ax_ms.plot(*zip(*ms, strict=True), marker="o", label=label)
            drawn += 1
    idx = _series(rows, "indexer", "dsa", "latency_ms", "indexer-fp8")
    if idx:
        ax_ms.plot(*zip(*idx, strict=True), marker="s", linestyle="--", label="DSA FP8 indexer (S = S_kv)")
    if not drawn:
        plt.close(fig)
        return "no sparse_mla_fwd timings to plot"
    for ax, ylabel in ((ax_tf, "TFLOP/s (each provider's own useful FLOPs)"), (ax_ms, "latency (ms, median)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (keys)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_ms.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def summary(doc: dict[str, Any]) -> str:
    """The compact table printed last: host, ceilings, stages, tests, the DSA kernels against their baselines and
    their measured time as a multiple of the cost model's (``benchmarks.cost``; ``1.50x model``: 1.5 times as long as
    the model says)."""
    host = doc.get("host", {})
    ceil = doc.get("ceilings", {})
    lines = [
        f"host: {host.get('gpu', '?')} sku={host.get('sku', '?')} driver={host.get('driver', '?')} "
        f"cuda={host.get('cuda', '?')} torch={host.get('torch', '?')} tilelang={host.get('tilelang', '?')}",
        f"ceilings: copy {_fmt(ceil.get('copy_gbps'), '.0f')} GB/s, bf16 {_fmt(ceil.get('bf16_tflops'), '.0f')} "
        f"TFLOP/s, fp8 {_fmt(ceil.get('fp8_tflops'), '.0f')} TFLOP/s",
        "stages: "
        + ", ".join(f"{s['stage']} {s['status']} ({s.get('seconds', 0):.0f} s)" for s in doc.get("stages", [])),
    ]
    compiled = doc.get("compile", {})
    if compiled:
        lines.append(f"compile: {compiled.get('status', '?')}; {compiled.get('summary', '')}")
    for stage, label in (
        ("tests", "gpu tests"),
        ("tests_ws", "gpu tests (ws schedule)"),
        ("tests_portable", "gpu tests (portable schedule)"),
        ("tests_decode", "gpu tests (decode)"),
    ):
        tests = doc.get(stage, {})
        if tests:
            lines.append(
                f"{label}: {tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
                f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped"
            )
    rows = doc.get("bench", {}).get("rows", [])
    by_case: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = by_case.setdefault(r["case"], {"targets": []})
        if r["provider"] == "dsa":
            if r["metric"] in ("latency_ms", "tflops", "gbps", "check"):
                entry[r["metric"]] = r["value"]
            elif r["metric"] == "target":
                entry["targets"].append(r.get("note", ""))
            elif r["metric"].startswith("speedup_vs_") or r["metric"] == "time_vs_model":
                entry[r["metric"]] = r["value"]
            elif r["metric"] == "peak_bytes":
                entry["peak"] = r["value"]
            elif r["metric"] == "error":
                entry["error"] = r.get("note")
        elif r["metric"] == "peak_ratio_vs_dsa":
            entry[f"ratio_{r['provider']}"] = r["value"]
    if by_case:
        lines.append(f"{'case':40} {'dsa ms':>9} {'TFLOP/s':>8} {'GB/s':>6} {'check':>6}  vs baselines / targets")
    for case, e in by_case.items():
        speedups = " ".join(
            f"{k[len('speedup_vs_') :]}={v:.2f}x" for k, v in e.items() if k.startswith("speedup_vs_") and v
        )
        if "peak" in e:
            ratios = " ".join(f"{k[6:]}={v:.2f}x" for k, v in e.items() if k.startswith("ratio_") and v)
            blank = " " * 34
            lines.append(f"{case:40} {blank}  dsa peak {e['peak'] / 1e9:.2f} GB; dense/dsa {ratios or '-'}")
            continue
        check = {True: "ok", False: "FAIL"}.get(e.get("check"), "-")
        model = e.get("time_vs_model")
        model_text = f"{model:.2f}x model" if isinstance(model, (int, float)) else ""
        tail = " | ".join(filter(None, [model_text, speedups, "; ".join(e["targets"]), e.get("error")]))
        lines.append(
            f"{case[:40]:40} {_fmt(e.get('latency_ms'), '.3f'):>9} {_fmt(e.get('tflops'), '.1f'):>8} "
            f"{_fmt(e.get('gbps'), '.0f'):>6} {check:>6}  {tail[:110]}"
        )
    tune = doc.get("tune", {})
    if tune:
        lines.append(f"tune: {tune.get('status', '?')}; {tune.get('summary', '')}")
    if doc.get("plot_note"):
        lines.append(f"plot: {doc['plot_note']}")
    lines.append(f"record: {doc.get('record_path')}")
    return "\n".join(lines)


_WORDS = {"ok": "passed", "failed": "failed", "timeout": "timeout"}


def _counts(stage: dict[str, Any]) -> str:
    """A stage record's counts in words: tests, compiled kernels, bench rows or tuning candidates."""
    if "tests" in stage:
        return (
            f"{stage.get('passed', '?')} passed, {stage.get('failures', '?')} failed, "
            f"{stage.get('errors', '?')} errors, {stage.get('skipped', '?')} skipped"
        )
    if "kernels" in stage:
        return f"{stage['kernels']} kernels, {stage.get('ok', '?')} ok"
    if "rows" in stage:
        return f"{stage['rows']} rows"
    if "records" in stage:
        return f"{stage['records']} candidates"
    return ""


def brief(
    doc: dict[str, Any] | None,
    stages: Sequence[str],
    *,
    runner_rc: int | None = None,
    record: Path | None = None,
    runner_error: str | None = None,
) -> str:
    """The short ``summary.txt``: the verdict, the host, then one line per stage of ``stages`` (``passed``,
    ``failed``, ``timeout``, ``skipped``, or ``not run`` when the check ended before it), with its seconds against
    its budget, its counts and its first error. ``doc`` None (no record was written) says so, with ``runner_error``
    (the first error line of the check's own output)."""
    rc = "" if runner_rc is None else f" (the check exited {runner_rc})"
    if doc is None:
        error = f"first error: {runner_error}\n" if runner_error else ""
        return f"gpu check: no record was written{rc}; see logs.tar.gz\n{error}"
    ran = {s.get("stage"): s for s in doc.get("stages", [])}
    not_passed = [name for name, s in ran.items() if s.get("status") != "ok"]
    if not_passed:
        verdict = f"FAILED (not passed: {', '.join(map(str, not_passed))})"
    elif doc.get("ok"):
        verdict = "passed"
    else:
        verdict = "unfinished (the record was not completed)"
    host = doc.get("host", {})
    lines = [
        f"gpu check: {verdict}{rc}",
        f"host: {host.get('gpu', '?')} sku={host.get('sku', '?')} cuda={host.get('cuda', '?')} "
        f"torch={host.get('torch', '?')} tilelang={host.get('tilelang', '?')}",
        f"{'stage':15} {'status':8} {'seconds':>8} {'budget':>7}  counts; first error",
    ]
    skipped = set(doc.get("skipped", []))
    for name in stages:
        stage = ran.get(name)
        if stage is None:
            lines.append(f"{name:15} {'skipped' if name in skipped else 'not run'}")
            continue
        status = _WORDS.get(stage.get("status", "?"), str(stage.get("status")))
        error = stage.get("first_error")
        detail = "; ".join(filter(None, [_counts(stage), error and f"first error: {error}"]))
        lines.append(
            f"{name:15} {status:8} {_fmt(stage.get('seconds'), '.1f'):>8} {_fmt(stage.get('budget_s'), '.0f'):>7}  "
            f"{detail}".rstrip()
        )
    if isinstance(doc.get("seconds"), (int, float)):
        lines.append(f"total: {doc['seconds']:.1f} s")
    lines.append(f"record: {record.name if record is not None else doc.get('record_path')}")
    return "\n".join(lines) + "\n"

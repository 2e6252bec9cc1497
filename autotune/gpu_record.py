"""The one-shot GPU check's record, read back: a PNG plot of the sparse MLA forward against dense attention, and the
summary table printed last (``autotune.gpu_check``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot", "summary"]

DENSE_PROVIDERS: tuple[str, ...] = ("dense-sdpa", "dense-matmul")
"""Providers drawn as dense attention in the plot, in order of preference."""


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
    """The compact table printed last: host, ceilings, stages, tests, the DSA kernels against their baselines."""
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
            elif r["metric"].startswith("speedup_vs_"):
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
        tail = " | ".join(filter(None, [speedups, "; ".join(e["targets"]), e.get("error")]))
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

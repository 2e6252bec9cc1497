"""The benchmark harness: time every provider of a case, check ``dsa`` once, and turn the results into rows.

For each case and provider (:mod:`benchmarks.providers`): enough input sets (:mod:`benchmarks.inputs`) that together
they exceed twice the L2 cache, rotated through (:mod:`benchmarks.measure`); one untimed call first (compilation,
config lookup and allocator growth stay out of the numbers; a baseline whose first call alone exceeds the time budget
is recorded with that one host-clock sample and skipped for the later cases of its kernel); then the calls timed with
CUDA events, cut to the budget: median, spread (p10, p90, min, max), TFLOP/s and GB/s, and the case's targets against
the measured ceilings. The ``memory`` and ``selection`` cases record peak device memory and one call's wall time of
each path instead. Rows are long-format ``(kernel, provider, case, metric, value, unit, gpu, sku, versions, commit,
note)``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import cases as case_data
from benchmarks import cost, measure, providers
from benchmarks.inputs import check_dsa, make_inputs, tensor_bytes
from benchmarks.providers import Provider

__all__ = [
    "META", "CaseResult", "RunOptions", "empty_cache", "model_rows", "row", "run_case",
    "run_memory_case", "target_rows", "timing_rows",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_WARMUP = 3
DEFAULT_REPS = 15
DEFAULT_BUDGET_S = 6.0
"""Seconds per provider and case for the timed calls, after the first (untimed) call."""
MAX_INPUT_SETS = 16
GIGA, TERA = 1e9, 1e12
SEED = 0


# ----------------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------------
META: dict[str, Any] = {}
"""The host description every row carries (``gpu``, ``sku``, versions, commit): ``dsa-bench`` fills it once."""


def row(case: case_data.Case, provider: str, metric: str, value: Any, unit: str, note: str = "") -> dict[str, Any]:
    """One long-format result row: (kernel, provider, case, context, metric, value, unit), the host of :data:`META`
    and the note."""
    out = {
        "kernel": case.kernel,
        "provider": provider,
        "case": case.name,
        "context": case.context,
        "metric": metric,
        "value": value,
        "unit": unit,
        "gpu": META.get("gpu"),
        "sku": META.get("sku"),
        "versions": {k: META.get(k) for k in ("torch", "cuda", "tilelang", "driver")},
        "commit": META.get("commit"),
    }
    if note:
        out["note"] = note
    return out


def timing_rows(case: case_data.Case, provider: Provider, timing: measure.Timing) -> list[dict[str, Any]]:
    """Latency statistics and throughput rows of one timed provider."""
    med = timing.median
    rows = [
        row(case, provider.name, "latency_ms", med, "ms", timing.note),
        row(case, provider.name, "latency_ms_p10", timing.quantile(0.1), "ms"),
        row(case, provider.name, "latency_ms_p90", timing.quantile(0.9), "ms"),
        row(case, provider.name, "latency_ms_min", min(timing.samples), "ms"),
        row(case, provider.name, "latency_ms_max", max(timing.samples), "ms"),
        row(case, provider.name, "samples", len(timing.samples), "calls"),
    ]
    work = provider.flops if provider.flops is not None else case.flops
    if work:
        rows.append(row(case, provider.name, "tflops", work / (med * 1e-3) / TERA, "TFLOP/s"))
    if case.bytes and provider.flops is None:
        rows.append(row(case, provider.name, "gbps", case.bytes / (med * 1e-3) / GIGA, "GB/s"))
    return rows


def target_rows(case: case_data.Case, medians: dict[str, float], ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target of ``case``: the achieved value, ``note`` says met or missed (or why not evaluated)."""
    rows = []
    dsa_ms = medians.get("dsa")
    for target in case.targets:
        desc = target.describe()
        if dsa_ms is None:
            rows.append(row(case, "dsa", "target", None, "", f"{desc}: not evaluated (dsa did not run)"))
            continue
        if target.metric == "speedup":
            other = medians.get(target.against or "")
            if other is None:
                rows.append(
                    row(case, "dsa", "target", None, "x", f"{desc}: not evaluated ({target.against} did not run)")
                )
                continue
            achieved, goal, unit = other / dsa_ms, target.value, "x"
        else:
            work = case.flops / TERA if target.metric == "tflops" else case.bytes / GIGA
            rate = work / (dsa_ms * 1e-3)
            if target.of:
                ceiling = ceilings.get(target.of)
                if not ceiling:
                    rows.append(
                        row(case, "dsa", "target", None, "", f"{desc}: not evaluated (no {target.of} ceiling)")
                    )
                    continue
                achieved, goal, unit = rate / ceiling, target.value, f"of {target.of}"
            else:
                achieved, goal, unit = rate, target.value, "TFLOP/s" if target.metric == "tflops" else "GB/s"
        rows.append(row(case, "dsa", "target", achieved, unit, f"{desc}: {'met' if achieved >= goal else 'missed'}"))
    return rows


def model_rows(case: case_data.Case, sku_id: str | None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The cost model's rows of ``case`` on ``sku_id`` (default :data:`benchmarks.cost.DEFAULT_SKU`), and the model's
    time in ms per provider it models (``dsa``; ``flashmla`` for the FP8 decode cases). No rows for a SKU without
    datasheet figures or a case the model does not cover."""
    sku_id = sku_id or cost.DEFAULT_SKU
    times: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for provider in cost.MODELLED_PROVIDERS:
        estimate = cost.case_estimate(case, sku_id, provider=provider)
        if estimate is None:
            continue
        times[provider] = estimate.model_s * 1e3
        label = "-" if provider == "dsa" else provider
        note = f"{sku_id}, bound: {estimate.bound}"
        rows += [
            row(case, label, "model_ms", estimate.model_s * 1e3, "ms", note),
            row(case, label, "roofline_ms", estimate.roofline_s * 1e3, "ms", note),
            row(case, label, "model_dram_bytes", estimate.dram_bytes, "B"),
            row(case, label, "model_rows_dequantised", estimate.rows_dequantised, "rows"),
        ]
        if estimate.blocks:
            rows += [
                row(case, label, "model_blocks", estimate.blocks, "blocks", f"{estimate.blocks_per_sm} per SM"),
                row(case, label, "model_waves", estimate.waves, "waves"),
            ]
    return rows, times


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    """How to time a case: warm-up and timed calls, the time budget per provider, which providers, the check, the
    device (``cpu``: the harness itself, host clock)."""

    warmup: int = DEFAULT_WARMUP
    reps: int = DEFAULT_REPS
    budget_s: float = DEFAULT_BUDGET_S
    providers: tuple[str, ...] | None = None
    check: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))


@dataclass
class CaseResult:
    """A case's rows, and whether its ``dsa`` provider failed (check, error or out of memory)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: bool = False


# (kernel, provider) -> (case, seconds) of a baseline whose first call exceeded the budget: later cases of the same
# kernel skip it (a reference or dense call only grows with the sizes that follow).
_SLOW: dict[tuple[str, str], tuple[str, float]] = {}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    """Collect garbage and return the allocator's cached blocks (between providers and cases)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_provider(provider: Provider, sets: list[dict[str, Any]], options: RunOptions) -> measure.Timing:
    """The first call untimed (host clock; a baseline slower than the budget stops there), then the timed calls."""
    t0 = time.perf_counter()
    provider.fn(sets[0])
    _synchronize(options.device)
    first_s = time.perf_counter() - t0
    if first_s > options.budget_s and provider.name != "dsa":
        return measure.Timing([first_s * 1e3], f"one call only (host clock): {first_s:.1f} s > budget")
    return measure.time_calls(
        provider.fn, sets, warmup=options.warmup, reps=options.reps, budget_s=options.budget_s
    )


def _out_of_memoryrow(case: case_data.Case, name: str, exc: BaseException) -> dict[str, Any]:
    return row(case, name, "skipped", None, "", f"out of memory: {str(exc).splitlines()[0][:200]}")


def _memory_paths(case: case_data.Case, inp: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """The paths a memory-kind case measures, ``dsa`` first.

    ``memory``: the DSA path (FP8 indexer selection through ``index_topk`` -> sparse MLA forward) against dense
    attention. ``selection``: ``index_topk`` (the fused kernel) against the indexer and top-k kernels chunked under
    the memory budget (``chunked``, what ``DSA_SELECTION=unfused`` runs), and against the materialised ``[B, S,
    S_kv]`` scores followed by our top-k kernel (``unfused``) or by ``torch.topk``."""
    from dsa import autograd, ops

    def select() -> Any:
        return ops.index_topk(inp["iq"], inp["ik"], inp["iw"], inp["topk"], k_scale=inp["iscale"])

    def chunked() -> Any:
        return autograd.unfused_index_topk(inp["iq"], inp["ik"], inp["iw"], inp["iscale"], None, None, inp["topk"])

    def materialised(topk: Callable[[torch.Tensor, int], Any]) -> Callable[[], Any]:
        return lambda: topk(ops.index_scores(inp["iq"], inp["ik"], inp["iw"], k_scale=inp["iscale"]), inp["topk"])

    if case.kernel == case_data.SELECTION:
        return {
            "dsa": select,
            "chunked": chunked,
            "unfused": materialised(ops.topk_indices),
            "torch.topk": materialised(lambda scores, k: torch.topk(scores, k, dim=-1).indices),
        }
    return {
        "dsa": lambda: ops.sparse_mla(inp["q"], inp["kv"], select(), sm_scale=inp["sm_scale"], d_v=inp["d_v"]),
        "dense-sdpa": lambda: providers.dense_sdpa(inp["q"], inp["kv"], inp["d_v"], inp["sm_scale"]),
        "dense-matmul": lambda: providers.dense_matmul(inp["q"], inp["kv"], inp["d_v"], inp["sm_scale"]),
    }


def run_memory_case(case: case_data.Case, options: RunOptions) -> CaseResult:
    """Peak device memory and one call's wall time of each path of a ``memory`` or ``selection`` case."""
    result = CaseResult()
    if options.device.type != "cuda":
        result.rows.append(row(case, "dsa", "skipped", None, "", "peak device memory needs CUDA"))
        return result
    inp = make_inputs(case, options.device, SEED)
    torch.cuda.synchronize()
    paths = _memory_paths(case, inp)
    peaks: dict[str, int] = {}
    for name, fn in paths.items():
        if options.providers and name not in options.providers:
            continue
        try:
            fn()  # warm: compile, allocator growth
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            peaks[name] = torch.cuda.max_memory_allocated() - base
            del out
            result.rows += [
                row(case, name, "peak_bytes", peaks[name], "B", "above the inputs, after reset_peak_memory_stats"),
                row(case, name, "wall_ms", elapsed_ms, "ms", "one call, host clock around a synchronize"),
            ]
        except torch.OutOfMemoryError as exc:
            result.rows.append(_out_of_memoryrow(case, name, exc))
        except Exception as exc:  # noqa: BLE001 - recorded; other paths still run
            result.rows.append(row(case, name, "error", None, "", f"{type(exc).__name__}: {str(exc)[:300]}"))
            result.failed |= name == "dsa"
        torch.cuda.empty_cache()
    result.rows.append(row(case, "inputs", "input_bytes", tensor_bytes(inp), "B"))
    for other in (name for name in paths if name != "dsa"):
        if peaks.get("dsa") and other in peaks:
            result.rows.append(row(case, other, "peak_ratio_vs_dsa", peaks[other] / peaks["dsa"], "x"))
    return result


def _input_sets(case: case_data.Case, options: RunOptions) -> list[dict[str, Any]]:
    first = make_inputs(case, options.device, SEED)
    set_bytes = tensor_bytes(first)
    free = torch.cuda.mem_get_info()[0] if options.device.type == "cuda" else None
    count = min(MAX_INPUT_SETS, measure.input_set_count(set_bytes, l2=measure.l2_bytes(), free_bytes=free))
    return [first] + [make_inputs(case, options.device, SEED + i) for i in range(1, count)]


def run_case(case: case_data.Case, options: RunOptions, ceilings: dict[str, Any]) -> CaseResult:
    """Time every provider of ``case``, check ``dsa`` once, evaluate targets; returns the rows."""
    if case.kernel in case_data.MEMORY_KINDS:
        return run_memory_case(case, options)
    result = CaseResult()
    result.rows += [row(case, "-", "flops", case.flops, "FLOP"), row(case, "-", "bytes", case.bytes, "B")]
    modelled, model_ms = model_rows(case, META.get("sku"))
    result.rows += modelled
    sets = _input_sets(case, options)
    result.rows.append(row(case, "-", "input_sets", len(sets), "sets", f"{tensor_bytes(sets[0])} B each"))
    medians: dict[str, float] = {}
    for provider in providers.providers_for(case):
        if options.providers and provider.name not in options.providers:
            continue
        slow = _SLOW.get((case.kernel, provider.name))
        if not provider.skip and slow is not None and provider.name != "dsa":
            provider.skip = f"skipped: one call took {slow[1]:.1f} s at {slow[0]} (over the {options.budget_s:g} s budget)"
        if provider.skip:
            result.rows.append(row(case, provider.name, "skipped", None, "", provider.skip))
            continue
        try:
            timing = _time_provider(provider, sets, options)
            if len(timing.samples) == 1 and timing.samples[0] > options.budget_s * 1e3:
                _SLOW[(case.kernel, provider.name)] = (case.name, timing.samples[0] / 1e3)
            medians[provider.name] = timing.median
            result.rows += timing_rows(case, provider, timing)
        except torch.OutOfMemoryError as exc:
            result.rows.append(_out_of_memoryrow(case, provider.name, exc))
            result.failed |= provider.name == "dsa"
        except Exception as exc:  # noqa: BLE001 - recorded; the next provider still runs
            logger.debug("provider %s on %s failed", provider.name, case.name, exc_info=True)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            result.rows.append(row(case, provider.name, "error", None, "", msg))
            result.failed |= provider.name == "dsa"
        empty_cache(options.device)
    if options.check and (not options.providers or "dsa" in options.providers):
        problem = check_dsa(case, sets[0])
        result.rows.append(row(case, "dsa", "check", problem is None, "pass", problem or "matches dsa.reference"))
        result.failed |= problem is not None
    for base in ("torch.topk", "dense-sdpa", "dense-matmul", "reference", "flashmla", "deepgemm"):
        if "dsa" in medians and base in medians:
            result.rows.append(row(case, "dsa", f"speedup_vs_{base}", medians[base] / medians["dsa"], "x"))
    for name, modelled_ms in model_ms.items():
        if name in medians:
            result.rows.append(row(case, name, "time_vs_model", medians[name] / modelled_ms, "x model"))
    result.rows += target_rows(case, medians, ceilings)
    del sets
    empty_cache(options.device)
    return result

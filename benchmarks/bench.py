"""``dsa-bench``: benchmark the DSA kernels side by side with the reference, dense attention, ``torch.topk`` and
(where importable) FlashMLA / DeepGEMM, on one CUDA GPU.

The cases are declared once in ``benchmarks/cases.py`` (with their FLOP and byte counts). For each case and provider
this harness:

* makes its inputs with the tuner's makers (:mod:`benchmarks.runners`, on top of ``dsa.testing``), enough input sets
  that together they exceed twice the L2 cache, and rotates through them (:mod:`benchmarks.measure`);
* makes one untimed call first (compilation, config lookup and allocator growth stay out of the numbers); a baseline
  whose first call alone exceeds the time budget is recorded with that one host-clock sample and skipped for the
  later cases of its kernel;
* times the calls with CUDA events, cut to the time budget, and reports the median and the spread (p10, p90, min,
  max), TFLOP/s and GB/s, and the targets of the case against the measured ceilings;
* checks the ``dsa`` provider once per case against ``dsa.reference`` on a slice of the problem, with every
  launcher output poisoned (NaN) before the call, by the comparison the tuner's gate uses.

The decode cases (``sparse_mla_decode``, ``index_topk_decode``: paged caches, not tuner kernels) get their inputs and
their check from this module (:func:`make_inputs`, :func:`check_dsa`), the same way. Cases marked ``quick=False`` in
``benchmarks/cases.py`` run only with ``--full`` or when ``--cases`` names them.

Results are long-format rows ``(kernel, provider, case, metric, value, unit, gpu, sku, versions, commit, note)``
written as JSON (``--json``, rewritten after every case so an interrupted run keeps what it measured).

Exit status: 0 when everything that ran passed its check; 1 when a ``dsa`` check failed or a ``dsa`` provider
errored; 2 without a CUDA device (or for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autotune.lookup import sku
from benchmarks import cases as case_data
from benchmarks import measure, providers, runners
from benchmarks.providers import Provider
from dsa import cache, reference, testing
from dsa.launch import common

logger = logging.getLogger(__name__)

__all__ = ["check_dsa", "main", "make_inputs", "run_case", "select_cases"]

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
NO_GPU_MESSAGE = "dsa-bench: no CUDA device is available; run on a GPU host (use --dry-run to list the cases)"
DEFAULT_WARMUP = 3
DEFAULT_REPS = 15
DEFAULT_BUDGET_S = 6.0
"""Seconds per provider and case for the timed calls, after the first (untimed) call."""
MAX_INPUT_SETS = 16
MEMORY_HEADROOM = 0.9
GIGA, TERA = 1e9, 1e12
SEED = 0
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


def dry_run_rows(selected: Sequence[case_data.Case]) -> list[dict[str, Any]]:
    """Rows with the FLOP and byte counts of ``selected`` (what ``--dry-run --json`` writes)."""
    rows = []
    for case in selected:
        note = json.dumps({**case.static, **case.sizes}, sort_keys=True)
        for metric, value, unit in (("flops", case.flops, "FLOP"), ("bytes", case.bytes, "B")):
            rows.append(_row(case, "-", metric, value, unit, note=note))
    return rows


def format_dry_run(selected: Sequence[case_data.Case]) -> str:
    """A table of the cases: name, GFLOP, MB moved, arithmetic intensity, targets, parameters."""
    header = ("case", "GFLOP", "MB", "FLOP/B", "targets", "params")
    rows = []
    for c in selected:
        intensity = f"{c.flops / c.bytes:.1f}" if c.bytes and c.flops else "-"
        params = " ".join(f"{k}={v}" for k, v in {**c.static, **c.sizes}.items())
        targets = "; ".join(t.describe() for t in c.targets) or "-"
        rows.append((c.name, f"{c.flops / GIGA:.3f}", f"{c.bytes / 1e6:.1f}", intensity, targets, params))
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


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and the dsa check
# ----------------------------------------------------------------------------------------------------------------------
def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return 0


def make_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of ``case`` on ``device`` (random, never zeros): the runner's inputs of its kernel; for the
    ``memory`` and ``selection`` cases the FP8 indexer's (``iq``, ``ik``, ``iw``, ``iscale``, and ``topk``) and for
    ``memory`` also the attention's (``q``, ``kv``); for the decode cases :func:`decode_inputs`."""
    if case.kernel in case_data.DECODE_KINDS:
        return decode_inputs(case, device, seed)
    if case.kernel not in case_data.MEMORY_KINDS:
        return runners.runner_for(case.kernel).make_inputs(case.static, case.sizes, device, seed)
    s = case.static
    dims = {"batch": case.sizes["batch"], "seq": case.sizes["seq_len"], "seq_kv": case.sizes["seq_len_kv"]}
    index = testing.indexer_inputs(
        **dims, heads=s["index_heads"], dim=s["index_dim"], dtype="float8_e4m3fn", seed=seed, device=device,
        weight_scale=(s["index_heads"] * s["index_dim"]) ** -0.5,
    )  # fmt: skip
    if case.kernel == case_data.SELECTION:
        return {"iq": index["q"], "ik": index["k"], "iw": index["weights"], "iscale": index["k_scale"], "topk": s["topk"]}
    attention = testing.sparse_mla_inputs(
        **dims, heads=s["heads"], d_qk=s["d_qk"], d_v=s["d_v"], topk=1, seed=seed + 1, device=device,
        sm_scale=s["d_qk"] ** -0.5,
    )  # fmt: skip
    return {
        "iq": index["q"], "ik": index["k"], "iw": index["weights"], "iscale": index["k_scale"],
        "q": attention["q"], "kv": attention["kv"], "sm_scale": attention["sm_scale"], "d_v": s["d_v"],
        "topk": s["topk"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Decode cases: paged caches (dsa.cache), their inputs, launch, narrowing and check
# ----------------------------------------------------------------------------------------------------------------------
FILL_ELEMENTS = 1 << 26
"""A cache is written in chunks of at most this many values (bounds the FP8 quantisation's float32 temporaries)."""


def _chunks(batch: int, length: int, width: int) -> Iterator[int]:
    """Token counts per append that cover ``length`` tokens of ``batch`` sequences, ``FILL_ELEMENTS`` values each."""
    step = max(1, FILL_ELEMENTS // (batch * width))
    for start in range(0, length, step):
        yield min(step, length - start)


def _decode_ends(batch: int, s_q: int, context: int, device: torch.device) -> torch.Tensor:
    """``[B, s_q]`` int32: query ``t`` is the token at ``context - s_q + t`` and sees the positions before it and
    itself."""
    ends = torch.arange(s_q, dtype=torch.int32, device=device) + (context - s_q + 1)
    return ends.view(1, s_q).expand(batch, s_q).contiguous()


def _sparse_mla_decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """A paged cache of ``context`` random latent rows per sequence (FP8 in FlashMLA's layout, or bf16; each
    sequence on its own run of pages, ``PagedKVCache``'s allocation), bf16 queries, and for each query ``topk``
    distinct random positions among those it sees, as slots."""
    s, z = case.static, case.sizes
    batch, s_q, context, topk, d_qk = z["batch"], z["seq_len"], z["seq_len_kv"], z["topk"], s["d_qk"]
    g = testing.generator(seed, device)
    kv = cache.PagedKVCache(
        batch, context, d_qk, page_size=s["page_size"], dtype="fp8" if s["kv_format"] == "fp8" else torch.bfloat16,
        d_rope=s["d_rope"], device=device,
    )  # fmt: skip
    for n in _chunks(batch, context, d_qk):
        kv.append(torch.randn((batch, n, d_qk), generator=g, device=device).to(torch.bfloat16))
    ends = _decode_ends(batch, s_q, context, device)
    keys = torch.rand((batch, s_q, context), generator=g, device=device)
    keys.masked_fill_(torch.arange(context, device=device).view(1, 1, -1) >= ends.unsqueeze(-1), -1.0)
    positions = keys.topk(topk, dim=-1).indices  # distinct; all visible while topk <= context - s_q + 1
    del keys
    return {
        "q": torch.randn((batch, s_q, s["heads"], d_qk), generator=g, device=device).to(torch.bfloat16),
        "kv_cache": kv.pages,
        "indices": kv.slots(positions.view(batch, s_q * topk)).view(batch, s_q, topk),
        "block_table": kv.block_table,
        "cache_seqlens": kv.seq_lens,
        "sm_scale": d_qk**-0.5,
        "d_v": s["d_v"],
        "d_rope": s["d_rope"],
    }


def _index_topk_decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """A paged key cache of ``context`` keys per sequence behind a shuffled block table (pages in any order, as a
    serving allocator leaves them), FP8 key rows (``dsa.cache.pack_index_keys_fp8``) or bf16 keys, and the newest
    ``s_q`` queries of each sequence. Integer-valued, as the ``index_topk`` runner's (power-of-two key scales): every
    implementation computes the scores exactly, so the check compares the selections exactly."""
    s, z = case.static, case.sizes
    batch, s_q, context, heads, dim = z["batch"], z["seq_len"], z["seq_len_kv"], s["heads"], s["dim"]
    fp8 = s["dtype"] == "float8_e4m3fn"
    g = testing.generator(seed, device)
    keys = cache.PagedKVCache(
        batch, context, dim, page_size=s["page_size"], dtype="fp8" if fp8 else torch.bfloat16, d_rope=0, device=device
    )
    table = torch.randperm(keys.block_table.numel(), generator=g, device=device)
    keys.block_table = table.to(torch.int32).view_as(keys.block_table)

    def small_integers(shape: tuple[int, ...], bound: int) -> torch.Tensor:
        return torch.randint(-bound, bound + 1, shape, generator=g, device=device).float()

    for n in _chunks(batch, context, dim):
        values = small_integers((batch, n, dim), 3)
        if fp8:
            scale = torch.exp2(small_integers((batch, n), 2))
            keys.append_rows(cache.pack_index_keys_fp8(values.to(torch.float8_e4m3fn), scale))
        else:
            keys.append(values.to(torch.bfloat16))
    return {
        "q": small_integers((batch, s_q, heads, dim), 3).to(torch.float8_e4m3fn if fp8 else torch.bfloat16),
        "k_cache": keys.pages,
        "weights": small_integers((batch, s_q, heads), 2),
        "block_table": keys.block_table,
        "ends": _decode_ends(batch, s_q, context, device),
        "starts": None,
        "topk": s["topk"],
    }


def decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of a decode case: the keyword arguments its providers take (see the makers above)."""
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        return _sparse_mla_decode_inputs(case, device, seed)
    return _index_topk_decode_inputs(case, device, seed)


def _decode_launch(case: case_data.Case, i: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The decode kernel through its launcher (the ops' call path on the kernel backend; the C-target builds on a
    CPU)."""
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        from dsa.launch import sparse_mla_decode

        return sparse_mla_decode.sparse_mla_decode(
            i["q"], i["kv_cache"], i["indices"], sm_scale=i["sm_scale"], d_v=i["d_v"], d_rope=i["d_rope"]
        )
    from dsa.launch import index_topk

    return index_topk.index_topk_paged(
        i["q"], i["k_cache"], i["weights"], i["topk"], block_table=i["block_table"], ends=i["ends"], starts=i["starts"]
    )


def _decode_narrow(
    case: case_data.Case, i: dict[str, Any], out: tuple[torch.Tensor, ...]
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """The first ``runners.CHECK_BATCHES`` sequences of a decode problem and of its outputs. The attention's cache is
    cut to the pages those sequences use (its reference dequantises the whole cache it is given); the indexer's
    reference reads only through the narrowed block table."""
    n = runners.CHECK_BATCHES
    caches = ("kv_cache", "k_cache")
    narrowed = {k: (v[:n] if isinstance(v, torch.Tensor) and k not in caches else v) for k, v in i.items()}
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        narrowed["kv_cache"] = i["kv_cache"][: int(i["block_table"][:n].max()) + 1]
    return narrowed, tuple(t[:n] for t in out)


def _decode_reference(case: case_data.Case, i: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        return reference.sparse_mla_decode(
            i["q"], i["kv_cache"], i["indices"], sm_scale=i["sm_scale"], d_v=i["d_v"], d_rope=i["d_rope"]
        )
    return reference.index_topk_decode(
        i["q"], i["k_cache"], i["weights"], i["topk"], block_table=i["block_table"], ends=i["ends"],
        starts=i["starts"], return_scores=True,
    )  # fmt: skip


def _same_selection(out: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    """``None`` when both selections hold the same positions per row (any order) with the same scores."""
    (indices, scores), (want, want_scores) = ((a.cpu(), b.cpu().float()) for a, b in (out, expected))
    if indices.dtype != torch.int32 or indices.shape != want.shape:
        return f"indices: {indices.dtype} {tuple(indices.shape)}, expected torch.int32 {tuple(want.shape)}"
    order, want_order = indices.argsort(-1), want.argsort(-1)
    differ = (indices.gather(-1, order) != want.gather(-1, want_order)).any(-1)
    if differ.any():
        return f"indices: another set of positions in {int(differ.sum())} of {differ.numel()} rows"
    if not torch.equal(scores.gather(-1, order), want_scores.gather(-1, want_order)):
        return "scores: not the exact index scores at the selected positions"
    return None


def _check_decode(case: case_data.Case, inputs: dict[str, Any]) -> str | None:
    """:func:`check_dsa` for a decode case: the launcher on the whole input set, its outputs narrowed, the reference
    on the narrowed problem; attention compared as the forward's runner compares, the selection exactly."""
    outputs = _decode_launch(case, inputs)
    narrowed, narrowed_outputs = _decode_narrow(case, inputs, outputs)
    expected = _decode_reference(case, narrowed)
    if case.kernel == case_data.INDEX_TOPK_DECODE:
        return _same_selection(narrowed_outputs, expected)
    problems = [
        testing.compare(narrowed_outputs[0], expected[0], **runners.BF16_TOL, name="out"),
        testing.compare(narrowed_outputs[1], expected[1], **runners.LSE_TOL, max_diff=None, name="lse"),
    ]
    return next((p for p in problems if p is not None), None)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every launcher output starts NaN-/sentinel-filled for the duration (``dsa.launch.common.new_output``)."""
    original = common.new_output
    common.new_output = testing.poisoned_empty
    try:
        yield
    finally:
        common.new_output = original


def check_dsa(case: case_data.Case, inputs: dict[str, Any]) -> str | None:
    """``None`` when the ``dsa`` kernel matches the reference on a slice of ``case``'s problem (else the reason).

    The kernel runs on the whole input set with poisoned outputs; the runner narrows inputs and outputs to a slice of
    the queries small enough for the reference (a kernel whose outputs sum over queries runs again on the slice) and
    compares them with the tuner's comparison.
    """
    if case.kernel in case_data.MEMORY_KINDS:
        return None  # whole paths, not one kernel: the kernels' own cases and the GPU tier check them
    try:
        with poisoned_outputs(), torch.no_grad():
            if case.kernel in case_data.DECODE_KINDS:
                problem = _check_decode(case, inputs)
            else:
                runner = runners.runner_for(case.kernel)
                outputs = runner.launch(None, case.static, inputs)
                narrowed, narrowed_outputs = runner.narrow(inputs, outputs) if runner.narrow else (inputs, outputs)
                if narrowed_outputs is None:
                    narrowed_outputs = runner.launch(None, case.static, narrowed)
                problem = runner.compare(narrowed_outputs, runner.reference(case.static, narrowed))
    except Exception as exc:  # noqa: BLE001 - recorded; the harness goes on with the next case
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None if problem is None else f"mismatch: {problem[:300]}"


# ----------------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------------
_META: dict[str, Any] = {}


def _row(case: case_data.Case, provider: str, metric: str, value: Any, unit: str, note: str = "") -> dict[str, Any]:
    row = {
        "kernel": case.kernel,
        "provider": provider,
        "case": case.name,
        "context": case.context,
        "metric": metric,
        "value": value,
        "unit": unit,
        "gpu": _META.get("gpu"),
        "sku": _META.get("sku"),
        "versions": {k: _META.get(k) for k in ("torch", "cuda", "tilelang", "driver")},
        "commit": _META.get("commit"),
    }
    if note:
        row["note"] = note
    return row


def timing_rows(case: case_data.Case, provider: Provider, timing: measure.Timing) -> list[dict[str, Any]]:
    """Latency statistics and throughput rows of one timed provider."""
    med = timing.median
    rows = [
        _row(case, provider.name, "latency_ms", med, "ms", timing.note),
        _row(case, provider.name, "latency_ms_p10", timing.quantile(0.1), "ms"),
        _row(case, provider.name, "latency_ms_p90", timing.quantile(0.9), "ms"),
        _row(case, provider.name, "latency_ms_min", min(timing.samples), "ms"),
        _row(case, provider.name, "latency_ms_max", max(timing.samples), "ms"),
        _row(case, provider.name, "samples", len(timing.samples), "calls"),
    ]
    work = provider.flops if provider.flops is not None else case.flops
    if work:
        rows.append(_row(case, provider.name, "tflops", work / (med * 1e-3) / TERA, "TFLOP/s"))
    if case.bytes and provider.flops is None:
        rows.append(_row(case, provider.name, "gbps", case.bytes / (med * 1e-3) / GIGA, "GB/s"))
    return rows


def target_rows(case: case_data.Case, medians: dict[str, float], ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target of ``case``: the achieved value, ``note`` says met or missed (or why not evaluated)."""
    rows = []
    dsa_ms = medians.get("dsa")
    for target in case.targets:
        desc = target.describe()
        if dsa_ms is None:
            rows.append(_row(case, "dsa", "target", None, "", f"{desc}: not evaluated (dsa did not run)"))
            continue
        if target.metric == "speedup":
            other = medians.get(target.against or "")
            if other is None:
                rows.append(
                    _row(case, "dsa", "target", None, "x", f"{desc}: not evaluated ({target.against} did not run)")
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
                        _row(case, "dsa", "target", None, "", f"{desc}: not evaluated (no {target.of} ceiling)")
                    )
                    continue
                achieved, goal, unit = rate / ceiling, target.value, f"of {target.of}"
            else:
                achieved, goal, unit = rate, target.value, "TFLOP/s" if target.metric == "tflops" else "GB/s"
        rows.append(_row(case, "dsa", "target", achieved, unit, f"{desc}: {'met' if achieved >= goal else 'missed'}"))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    warmup: int = DEFAULT_WARMUP
    reps: int = DEFAULT_REPS
    budget_s: float = DEFAULT_BUDGET_S
    providers: tuple[str, ...] | None = None
    check: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))


@dataclass
class CaseResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: bool = False


# (kernel, provider) -> (case, seconds) of a baseline whose first call exceeded the budget: later cases of the same
# kernel skip it (a reference or dense call only grows with the sizes that follow).
_SLOW: dict[tuple[str, str], tuple[str, float]] = {}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
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


def _out_of_memory_row(case: case_data.Case, name: str, exc: BaseException) -> dict[str, Any]:
    return _row(case, name, "skipped", None, "", f"out of memory: {str(exc).splitlines()[0][:200]}")


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
        result.rows.append(_row(case, "dsa", "skipped", None, "", "peak device memory needs CUDA"))
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
                _row(case, name, "peak_bytes", peaks[name], "B", "above the inputs, after reset_peak_memory_stats"),
                _row(case, name, "wall_ms", elapsed_ms, "ms", "one call, host clock around a synchronize"),
            ]
        except torch.OutOfMemoryError as exc:
            result.rows.append(_out_of_memory_row(case, name, exc))
        except Exception as exc:  # noqa: BLE001 - recorded; other paths still run
            result.rows.append(_row(case, name, "error", None, "", f"{type(exc).__name__}: {str(exc)[:300]}"))
            result.failed |= name == "dsa"
        torch.cuda.empty_cache()
    result.rows.append(_row(case, "inputs", "input_bytes", _tensor_bytes(inp), "B"))
    for other in (name for name in paths if name != "dsa"):
        if peaks.get("dsa") and other in peaks:
            result.rows.append(_row(case, other, "peak_ratio_vs_dsa", peaks[other] / peaks["dsa"], "x"))
    return result


def _input_sets(case: case_data.Case, options: RunOptions) -> list[dict[str, Any]]:
    first = make_inputs(case, options.device, SEED)
    set_bytes = _tensor_bytes(first)
    free = torch.cuda.mem_get_info()[0] if options.device.type == "cuda" else None
    count = min(MAX_INPUT_SETS, measure.input_set_count(set_bytes, l2=measure.l2_bytes(), free_bytes=free))
    return [first] + [make_inputs(case, options.device, SEED + i) for i in range(1, count)]


def run_case(case: case_data.Case, options: RunOptions, ceilings: dict[str, Any]) -> CaseResult:
    """Time every provider of ``case``, check ``dsa`` once, evaluate targets; returns the rows."""
    if case.kernel in case_data.MEMORY_KINDS:
        return run_memory_case(case, options)
    result = CaseResult()
    result.rows += [_row(case, "-", "flops", case.flops, "FLOP"), _row(case, "-", "bytes", case.bytes, "B")]
    sets = _input_sets(case, options)
    result.rows.append(_row(case, "-", "input_sets", len(sets), "sets", f"{_tensor_bytes(sets[0])} B each"))
    medians: dict[str, float] = {}
    for provider in providers.providers_for(case):
        if options.providers and provider.name not in options.providers:
            continue
        slow = _SLOW.get((case.kernel, provider.name))
        if not provider.skip and slow is not None and provider.name != "dsa":
            provider.skip = f"skipped: one call took {slow[1]:.1f} s at {slow[0]} (over the {options.budget_s:g} s budget)"
        if provider.skip:
            result.rows.append(_row(case, provider.name, "skipped", None, "", provider.skip))
            continue
        try:
            timing = _time_provider(provider, sets, options)
            if len(timing.samples) == 1 and timing.samples[0] > options.budget_s * 1e3:
                _SLOW[(case.kernel, provider.name)] = (case.name, timing.samples[0] / 1e3)
            medians[provider.name] = timing.median
            result.rows += timing_rows(case, provider, timing)
        except torch.OutOfMemoryError as exc:
            result.rows.append(_out_of_memory_row(case, provider.name, exc))
            result.failed |= provider.name == "dsa"
        except Exception as exc:  # noqa: BLE001 - recorded; the next provider still runs
            logger.debug("provider %s on %s failed", provider.name, case.name, exc_info=True)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            result.rows.append(_row(case, provider.name, "error", None, "", msg))
            result.failed |= provider.name == "dsa"
        _empty_cache(options.device)
    if options.check and (not options.providers or "dsa" in options.providers):
        problem = check_dsa(case, sets[0])
        result.rows.append(_row(case, "dsa", "check", problem is None, "pass", problem or "matches dsa.reference"))
        result.failed |= problem is not None
    for base in ("torch.topk", "dense-sdpa", "dense-matmul", "reference", "flashmla", "deepgemm"):
        if "dsa" in medians and base in medians:
            result.rows.append(_row(case, "dsa", f"speedup_vs_{base}", medians[base] / medians["dsa"], "x"))
    result.rows += target_rows(case, medians, ceilings)
    del sets
    _empty_cache(options.device)
    return result


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
    p.add_argument("--dry-run", action="store_true", help="list the cases with their FLOP/byte counts; needs no GPU")
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
        print(format_dry_run(selected))
        if args.json:
            write_json(args.json, {"dry_run": True, "rows": dry_run_rows(selected)})
        return EXIT_OK
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_NO_GPU
    _META.update(host_info())
    if args.measure_ceilings:
        if args.device != "cuda":
            print("dsa-bench: --measure-ceilings needs CUDA", file=sys.stderr)
            return EXIT_NO_GPU
        ceilings = measure.measure_ceilings()
        print(json.dumps(ceilings, indent=1))
        if args.json:
            write_json(args.json, {"host": _META, "ceilings": ceilings})
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
    doc: dict[str, Any] = {"host": _META, "ceilings": ceilings, "rows": [], "failed_cases": []}
    print(
        f"[bench] torch CPU threads: {_META['torch_threads']} (OMP_NUM_THREADS={_META['omp_num_threads'] or 'unset'}; "
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
            result = CaseResult([_row(case, "-", "error", None, "", f"{type(exc).__name__}: {str(exc)[:300]}")], True)
            _empty_cache(options.device)
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

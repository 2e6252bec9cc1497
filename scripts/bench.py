#!/usr/bin/env python3
"""Benchmark the DSA kernels side by side with the reference, dense attention, ``torch.topk`` and (where importable)
FlashMLA / DeepGEMM, on one CUDA GPU.

The cases are declared once in ``benchmarks/cases.py`` (with their FLOP and byte counts). For each case and provider
this harness:

* allocates enough input sets that together they exceed twice the L2 cache (``N * bytes > 2 * L2``) and rotates
  through them, so that no timed call finds its inputs in the cache;
* warms up (compilation, autotune lookup and allocator growth stay out of the numbers), then times each call with
  its own pair of CUDA events and reports the median and the spread (p10, p90, min, max);
* caps slow providers (the chunked reference, dense attention at long context) by a time budget: after one timed
  call it runs only as many calls as fit, or skips with a recorded reason when a static size rule says the provider
  would not fit in memory or time;
* checks the ``dsa`` provider once per case against ``dsa.reference`` on a slice of the problem, with the kernels'
  outputs poisoned (NaN) before the call, so an unwritten element fails the check.

Results are long-format rows ``(kernel, provider, case, metric, value, unit, gpu, sku, versions, commit, note)``
written as JSON (``--json``, rewritten after every case so an interrupted run keeps what it measured).

Usage::

    python scripts/bench.py --dry-run                      # list the cases and their FLOP/byte counts (no GPU)
    python scripts/bench.py --kernels topk --json out.json  # run the top-k cases
    python scripts/bench.py --measure-ceilings --json ceilings.json

Exit status: 0 when everything that ran passed its check; 1 when a ``dsa`` check failed or a ``dsa`` provider
errored; 2 without a CUDA device (or for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a file, this script's folder is first on sys.path (scripts/autotune.py would shadow the autotune package);
# the repository root must be importable for dsa, tl_kernels, autotune and tests.helpers.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench")

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
NO_GPU_MESSAGE = "bench: no CUDA device is available; run on a GPU host (use --dry-run to list the cases)"
DEFAULT_WARMUP = 3
DEFAULT_REPS = 15
DEFAULT_BUDGET_S = 6.0  # per provider and case, after its first (warm-up) call
FALLBACK_L2_BYTES = 50 * 1024 * 1024
L2_ROTATE_FACTOR = 2  # input sets together exceed this many L2 sizes
MAX_INPUT_SETS = 16
# The chunked reference indexer is float32 over every (query, key) pair; beyond this it takes minutes.
REFERENCE_INDEXER_MAX_PAIRS = 16384 * 16384
# Queries (or batch rows for decode shapes) checked against the reference per case.
CHECK_ROWS = 64
CHECK_BATCHES = 4
# Dense matmul attention materialises float32 scores of this many bytes per query chunk.
DENSE_CHUNK_BYTES = 2 << 30
# Leave this share of free device memory unused when deciding whether a provider fits.
MEMORY_HEADROOM = 0.9
TOL = {
    "indexer": {"atol": 1e-3, "rtol": 1e-3},
    "out": {"atol": 2e-2, "rtol": 2e-2},
    "lse": {"atol": 1e-3, "rtol": 1e-3},
    "grad": {"atol": 2e-2, "rtol": 2e-2},
}
LAUNCHER_MODULES = ("dsa.launch.indexer", "dsa.launch.topk", "dsa.launch.sparse_mla_fwd", "dsa.launch.sparse_mla_bwd")
# V3.2's softmax scale: the qk head dim of the un-absorbed attention (128 nope + 64 rope), not 576.
SM_SCALE = 192**-0.5
GIGA, TERA = 1e9, 1e12
# ``--device cpu`` runs the harness itself on a CPU (tiny cases, host-clock timing): for testing, not for numbers.
_DEVICE = {"type": "cuda"}


def on_cuda() -> bool:
    return _DEVICE["type"] == "cuda"


def device() -> Any:
    import torch

    return torch.device(_DEVICE["type"])


def _empty_cache() -> None:
    import torch

    if on_cuda():
        torch.cuda.empty_cache()


def load_cases_module() -> ModuleType:
    """``benchmarks/cases.py`` (loaded by path: ``benchmarks`` is a folder of data, not an installed package)."""
    name = "dsa_benchmark_cases"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Case selection and the dry run
# ----------------------------------------------------------------------------------------------------------------------
def select_cases(kernels: str, cases: str | None, *, tiny: bool = False) -> list[Any]:
    """The standard (or, with ``tiny``, the miniature) cases of ``kernels`` (``all`` or comma list) whose name
    contains one of ``cases`` (comma list)."""
    mod = load_cases_module()
    names = mod.KERNELS if kernels.strip() == "all" else tuple(k.strip() for k in kernels.split(",") if k.strip())
    unknown = set(names) - set(mod.KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(mod.KERNELS)}")
    selected = mod.tiny_cases(names) if tiny else mod.standard_cases(names)
    if cases:
        wanted = [c.strip() for c in cases.split(",") if c.strip()]
        selected = [c for c in selected if any(w == c.name or w in c.name for w in wanted)]
    return selected


def dry_run_rows(cases: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows with the FLOP and byte counts of ``cases`` (what ``--dry-run --json`` writes)."""
    rows = []
    for case in cases:
        for metric, value, unit in (("flops", case.flops, "FLOP"), ("bytes", case.bytes, "B")):
            rows.append(_row(case, "-", metric, value, unit, note=json.dumps(case.params, sort_keys=True)))
    return rows


def format_dry_run(cases: Sequence[Any]) -> str:
    """A table of the cases: name, parameters, GFLOP, MB moved, arithmetic intensity, targets."""
    header = ("case", "GFLOP", "MB", "FLOP/B", "targets", "params")
    rows = []
    for c in cases:
        intensity = f"{c.flops / c.bytes:.1f}" if c.bytes and c.flops else "-"
        params = " ".join(f"{k}={v}" for k, v in c.params.items())
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


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """The repository's HEAD (``+dirty`` when the tree has changes), or None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def host_info() -> dict[str, Any]:
    """GPU name, SKU, memory, SM count, L2 size and the versions of driver, CUDA, torch and tilelang."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tilelang": _version("tilelang"),
        "driver": _driver_version(),
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
            l2_bytes=int(getattr(props, "L2_cache_size", 0) or 0) or None,
        )
        try:
            from autotune import sku

            info["sku"] = sku.current_sku()
        except Exception as exc:  # noqa: BLE001 - the SKU is a label; a failure must not stop the run
            info["sku"] = None
            info["sku_error"] = f"{type(exc).__name__}: {exc}"
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """CUDA-event times of one provider on one case, in milliseconds."""

    samples: list[float]
    note: str = ""

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_calls(
    fn: Callable[[Any], Any], sets: Sequence[Any], *, warmup: int, reps: int, budget_s: float, compiles: bool = False
) -> Timing:
    """Time ``fn(set)`` over rotating input ``sets`` with CUDA events.

    The first call is untimed (it compiles and warms caches); one more call estimates the cost, and the number of
    timed calls is cut so that they fit ``budget_s``. When the first call alone takes longer than ``budget_s`` (a slow
    baseline, not a compiling kernel: see ``run_case``), its host-clock time is the only sample.
    """
    import torch

    if not on_cuda():
        fn(sets[0])
        samples = []
        for i in range(max(1, reps)):
            t0 = time.perf_counter()
            fn(sets[i % len(sets)])
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing(samples, "host clock (CPU harness test)")
    t0 = time.perf_counter()
    fn(sets[0])
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if first_s > budget_s and not compiles:
        return Timing([first_s * 1e3], f"one call only (host clock): {first_s:.1f} s > budget {budget_s:g} s")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(sets[1 % len(sets)])
    end.record()
    torch.cuda.synchronize()
    probe_ms = start.elapsed_time(end)
    affordable = int(budget_s * 1e3 / max(probe_ms, 1e-3))
    note = ""
    if affordable < reps:
        note = f"{max(1, affordable)} of {reps} timed calls (budget {budget_s:g} s, one call {probe_ms:.1f} ms)"
    n = max(1, min(reps, affordable))
    for i in range(min(warmup, n)):
        fn(sets[i % len(sets)])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    torch.cuda.synchronize()
    for i, (s, e) in enumerate(events):
        s.record()
        fn(sets[i % len(sets)])
        e.record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in events], note)


def _median_event_ms(fn: Callable[[], Any], reps: int = 10, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


CEILING_COPY_ELEMENTS = 1 << 28  # 1 GiB of float32 per buffer
CEILING_MATMUL_SIZE = 8192


def _copy_gbps() -> float:
    import torch

    x = torch.randn(CEILING_COPY_ELEMENTS, device="cuda")
    y = torch.empty_like(x)
    ms = _median_event_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / GIGA


def _bf16_tflops() -> float:
    import torch

    m = CEILING_MATMUL_SIZE
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    return 2.0 * m**3 / (_median_event_ms(lambda: a @ b) * 1e-3) / TERA


def _fp8_tflops() -> float:
    import torch

    m = CEILING_MATMUL_SIZE
    a = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm requires
    one = torch.ones((), device="cuda", dtype=torch.float32)
    ms = _median_event_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2.0 * m**3 / (ms * 1e-3) / TERA


def measure_ceilings() -> dict[str, Any]:
    """The host's measured ceilings: device-to-device copy bandwidth (bytes read + written), bf16 and FP8 matrix
    rates (8192^3 products through torch; FP8 via ``torch._scaled_mm``), each the median of 10 CUDA-event timings.
    A ceiling that cannot be measured is recorded as ``<name>_error`` and the others still run."""
    out: dict[str, Any] = {}
    for name, fn in (("copy_gbps", _copy_gbps), ("bf16_tflops", _bf16_tflops), ("fp8_tflops", _fp8_tflops)):
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the other ceilings still run
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        _empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------
def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def l2_bytes() -> int:
    import torch

    if not on_cuda():
        return FALLBACK_L2_BYTES
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 0) or 0) or FALLBACK_L2_BYTES


def input_set_count(set_bytes: int) -> int:
    """How many input sets to rotate through so that together they exceed ``2 * L2``."""
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_ROTATE_FACTOR * l2_bytes() / max(1, set_bytes))))


def random_indices(batch: int, seq: int, seq_kv: int, topk: int, device: Any, gen: Any) -> Any:
    """``[B, S, topk]`` int32: distinct random key positions per query (what a top-k selection returns)."""
    import torch

    out = torch.empty((batch, seq, topk), dtype=torch.int32, device=device)
    rows_per_chunk = max(1, (1 << 28) // max(1, seq_kv))  # bound the random matrix at 1 GiB of float32
    flat = out.view(batch * seq, topk)
    for r0 in range(0, batch * seq, rows_per_chunk):
        r1 = min(batch * seq, r0 + rows_per_chunk)
        u = torch.rand((r1 - r0, seq_kv), device=device, generator=gen)
        flat[r0:r1] = u.topk(topk, dim=-1).indices.to(torch.int32)
    return out


def make_inputs(case: Any, device: Any, seed: int) -> dict[str, Any]:
    """One input set of ``case`` on ``device`` (random, never zeros)."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    p = case.params

    def randn(*shape: int, scale: float = 1.0, dtype: Any = torch.float32) -> Any:
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    if case.kernel == "indexer":
        dtype = getattr(torch, p["dtype"])
        b, s, skv, h, d = p["batch"], p["seq"], p["seq_kv"], p["heads"], p["dim"]
        inputs = {
            "q": randn(b, s, h, d, dtype=dtype),
            "k": randn(b, skv, d, dtype=dtype),
            "weights": randn(b, s, h, scale=(h * d) ** -0.5),
            "k_scale": None,
        }
        if dtype == torch.float8_e4m3fn:
            inputs["k_scale"] = torch.rand(b, skv, device=device, generator=gen) * 0.5 + 0.75
        return inputs
    if case.kernel == "topk":
        return {"scores": randn(p["batch"], p["rows"], p["length"])}
    if case.kernel in ("sparse_mla_fwd", "sparse_mla_bwd", "memory"):
        b, s, skv, h = p["batch"], p["seq"], p["seq_kv"], p["heads"]
        inputs = {
            "q": randn(b, s, h, p["d_qk"], dtype=torch.bfloat16),
            "kv": randn(b, skv, p["d_qk"], dtype=torch.bfloat16),
        }
        if case.kernel == "memory":
            hi, di = p["index_heads"], p["index_dim"]
            inputs.update(
                iq=randn(b, s, hi, di, dtype=torch.float8_e4m3fn),
                ik=randn(b, skv, di, dtype=torch.float8_e4m3fn),
                iw=randn(b, s, hi, scale=(hi * di) ** -0.5),
                iscale=torch.rand(b, skv, device=device, generator=gen) * 0.5 + 0.75,
            )
            return inputs
        inputs["indices"] = random_indices(b, s, skv, p["topk"], device, gen)
        if case.kernel == "sparse_mla_bwd":
            from dsa import ops, reference

            args = (inputs["q"], inputs["kv"], inputs["indices"])
            with torch.no_grad():
                try:
                    out, lse = ops.sparse_mla(*args, sm_scale=SM_SCALE, d_v=p["d_v"])
                except Exception:  # noqa: BLE001 - the forward kernel's own case records its failure
                    logger.warning("sparse_mla forward failed; the backward case uses the reference forward")
                    out, lse = reference.sparse_mla(*args, sm_scale=SM_SCALE, d_v=p["d_v"])
            inputs.update(out=out, lse=lse, d_out=randn(b, s, h, p["d_v"], dtype=torch.bfloat16))
        return inputs
    raise ValueError(f"unknown kernel {case.kernel!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Provider:
    """One implementation timed on a case.

    Attributes:
        name: ``dsa``, ``reference``, ``torch.topk``, ``dense-sdpa``, ``dense-matmul``, ``flashmla``, ``deepgemm``.
        fn: the call, given one input set.
        flops: the provider's own useful FLOPs when they differ from the case's (dense attention computes every
            visible pair, not only the top-k); ``None`` uses the case's count.
        skip: a reason not to run it (recorded as a row), or empty.
    """

    name: str
    fn: Callable[[dict[str, Any]], Any]
    flops: float | None = None
    skip: str = ""


def _dense_flops(case: Any) -> float:
    cases = load_cases_module()
    p = case.params
    return 2.0 * p["batch"] * p["heads"] * cases.causal_pairs(p["seq"], p["seq_kv"]) * (p["d_qk"] + p["d_v"])


def dense_sdpa(q: Any, kv: Any, d_v: int) -> Any:
    """Dense causal (bottom-right) attention over the whole context through ``torch.nn.functional.sdpa``.

    Args: q ``[B, S, H, d_qk]`` bf16, kv ``[B, S_kv, d_qk]`` bf16. Returns ``[B, H, S, d_v]`` bf16.
    """
    import torch
    from torch.nn.attention.bias import causal_lower_right

    b, s, h, _ = q.shape
    skv = kv.shape[1]
    k = kv.unsqueeze(1).expand(b, h, skv, kv.shape[-1])
    v = kv[..., :d_v].unsqueeze(1).expand(b, h, skv, d_v)
    mask = causal_lower_right(s, skv)
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=SM_SCALE)


def dense_matmul(q: Any, kv: Any, d_v: int) -> Any:
    """Dense causal (bottom-right) attention as bf16 matmuls over query chunks (float32 softmax).

    Args: q ``[B, S, H, d_qk]`` bf16, kv ``[B, S_kv, d_qk]`` bf16. Returns ``[B, S, H, d_v]`` bf16.
    """
    import torch

    b, s, h, _ = q.shape
    skv = kv.shape[1]
    out = torch.empty((b, s, h, d_v), dtype=q.dtype, device=q.device)
    rows = max(1, DENSE_CHUNK_BYTES // (h * skv * 4))
    keys = torch.arange(skv, device=q.device)
    for t0 in range(0, s, rows):
        t1 = min(s, t0 + rows)
        scores = torch.einsum("bshd,btd->bsht", q[:, t0:t1], kv).float() * SM_SCALE
        limit = torch.arange(t0, t1, device=q.device) + (skv - s)
        scores.masked_fill_((keys.view(1, -1) > limit.view(-1, 1)).view(1, t1 - t0, 1, skv), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[:, t0:t1] = torch.einsum("bsht,btd->bshd", probs, kv[..., :d_v])
    return out


def _flashmla_fwd(inp: dict[str, Any], d_v: int) -> Any:
    import flash_mla  # type: ignore[import-not-found]
    import torch

    q, kv, idx = inp["q"], inp["kv"], inp["indices"]
    b, s, h, d = q.shape
    skv = kv.shape[1]
    # FlashMLA's sparse prefill takes one sequence: flatten the batch, offsetting each row's indices into it.
    offsets = (torch.arange(b, device=q.device, dtype=torch.int32) * skv).view(b, 1, 1)
    flat_idx = torch.where(idx >= 0, idx + offsets, idx).view(b * s, 1, -1)
    return flash_mla.flash_mla_sparse_fwd(q.view(b * s, h, d), kv.view(b * skv, 1, d), flat_idx, SM_SCALE, d_v)


def _deepgemm_indexer(inp: dict[str, Any]) -> Any:
    import deep_gemm  # type: ignore[import-not-found]
    import torch

    q, k, w, ks = inp["q"], inp["k"], inp["weights"], inp["k_scale"]
    s, skv = q.shape[1], k.shape[1]
    starts = torch.zeros(s, dtype=torch.int32, device=q.device)
    ends = torch.arange(s, dtype=torch.int32, device=q.device) + (skv - s + 1)
    return deep_gemm.fp8_mqa_logits(q[0], (k[0], ks[0]), w[0], starts, ends)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fits(case: Any, need_bytes: float) -> bool:
    import torch

    if not on_cuda():
        return True
    free, _ = torch.cuda.mem_get_info()
    return need_bytes < free * MEMORY_HEADROOM


def providers_for(case: Any) -> list[Provider]:
    """The providers timed on ``case`` (``dsa`` first), each possibly marked to skip with a reason."""
    import torch

    from dsa import autograd, ops, reference

    p = case.params
    if case.kernel == "indexer":
        pairs = p["seq"] * p["seq_kv"]
        out = [
            Provider("dsa", lambda i: ops.index_scores(i["q"], i["k"], i["weights"], k_scale=i["k_scale"])),
            Provider(
                "reference",
                lambda i: reference.index_scores(i["q"], i["k"], i["weights"], k_scale=i["k_scale"]),
                skip=""
                if pairs <= REFERENCE_INDEXER_MAX_PAIRS
                else f"reference capped at S*S_kv <= {REFERENCE_INDEXER_MAX_PAIRS}",
            ),
        ]
        if p["dtype"] == "float8_e4m3fn":
            out.append(
                Provider(
                    "deepgemm", _deepgemm_indexer, skip="" if _importable("deep_gemm") else "deep_gemm not importable"
                )
            )
        return out
    if case.kernel == "topk":
        k = p["k"]
        return [
            Provider("dsa", lambda i: ops.topk_indices(i["scores"], k)),
            Provider("torch.topk", lambda i: torch.topk(i["scores"], k, dim=-1).indices),
            Provider("reference", lambda i: reference.topk_indices(i["scores"], k)),
        ]
    if case.kernel == "sparse_mla_fwd":
        d_v = p["d_v"]
        dense_bytes = p["batch"] * p["seq"] * p["heads"] * p["seq_kv"] * 4.0  # a materialised float32 score matrix
        return [
            Provider("dsa", lambda i: ops.sparse_mla(i["q"], i["kv"], i["indices"], sm_scale=SM_SCALE, d_v=d_v)),
            Provider(
                "reference",
                lambda i: reference.sparse_mla(i["q"], i["kv"], i["indices"], sm_scale=SM_SCALE, d_v=d_v),
            ),
            Provider("dense-sdpa", lambda i: dense_sdpa(i["q"], i["kv"], d_v), flops=_dense_flops(case)),
            Provider(
                "dense-matmul",
                lambda i: dense_matmul(i["q"], i["kv"], d_v),
                flops=_dense_flops(case),
                skip=""
                if _fits(case, min(dense_bytes, DENSE_CHUNK_BYTES) * 3)
                else "dense matmul would not fit memory",
            ),
            Provider(
                "flashmla",
                lambda i: _flashmla_fwd(i, d_v),
                skip="" if _importable("flash_mla") else "flash_mla not importable",
            ),
        ]
    if case.kernel == "sparse_mla_bwd":
        d_v = p["d_v"]

        def bwd(backend: str) -> Callable[[dict[str, Any]], Any]:
            return lambda i: autograd.sparse_mla_bwd_impl(
                i["q"], i["kv"], i["out"], i["lse"], i["d_out"], i["indices"], SM_SCALE, d_v, None, None, None, backend
            )

        return [Provider("dsa", bwd("tilelang")), Provider("reference", bwd("reference"))]
    raise ValueError(f"no providers for kernel {case.kernel!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Correctness check of the dsa provider (poisoned outputs, a slice of the problem against the reference)
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poisoned_launcher_outputs() -> Iterator[None]:
    """Make every launcher's ``new_output`` return NaN-/sentinel-filled tensors for the duration."""
    from tests.helpers import poison

    patched: list[tuple[ModuleType, Callable[..., Any]]] = []
    for name in LAUNCHER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "new_output", None)
        if original is None:
            continue

        def poisoned(*args: Any, _orig: Callable[..., Any] = original, **kwargs: Any) -> Any:
            return poison(_orig(*args, **kwargs))

        module.new_output = poisoned  # type: ignore[attr-defined]
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.new_output = original  # type: ignore[attr-defined]


def check_dsa(case: Any, inp: dict[str, Any]) -> str | None:
    """``None`` when the ``dsa`` provider matches the reference on a slice of ``case`` (else the reason)."""
    import torch

    from dsa import autograd, ops, reference
    from tests.helpers import assert_close, assert_topk_valid

    p = case.params
    try:
        with poisoned_launcher_outputs(), torch.no_grad():
            if case.kernel == "indexer":
                scores = ops.index_scores(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"])
                rows = slice(p["seq"] - min(CHECK_ROWS, p["seq"]), p["seq"])  # bottom-right causal: last rows align
                q_rows, w_rows = inp["q"][:, rows].contiguous(), inp["weights"][:, rows].contiguous()
                expected = reference.index_scores(q_rows, inp["k"], w_rows, k_scale=inp["k_scale"])
                assert_close(scores[:, rows], expected, **TOL["indexer"], name="scores")
            elif case.kernel == "topk":
                idx = ops.topk_indices(inp["scores"], p["k"])
                rows = slice(0, CHECK_ROWS)
                assert_topk_valid(inp["scores"][:, rows], idx[:, rows], p["k"])
            elif case.kernel == "sparse_mla_fwd":
                bs, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
                out, lse = ops.sparse_mla(inp["q"], inp["kv"], inp["indices"], sm_scale=SM_SCALE, d_v=p["d_v"])
                sub_q, sub_kv = inp["q"][bs, rows].contiguous(), inp["kv"][bs].contiguous()
                sub_idx = inp["indices"][bs, rows].contiguous()
                ref_out, ref_lse = reference.sparse_mla(sub_q, sub_kv, sub_idx, sm_scale=SM_SCALE, d_v=p["d_v"])
                assert_close(out[bs, rows], ref_out, **TOL["out"], name="out")
                assert_close(lse[bs, rows], ref_lse, **TOL["lse"], min_cos=None, name="lse")
            elif case.kernel == "sparse_mla_bwd":
                # dkv sums over every query, so the kernel runs on the sliced problem itself.
                bs, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
                sub = {k: inp[k][bs, rows].contiguous() for k in ("q", "indices", "out", "lse", "d_out")}
                kv = inp["kv"][bs].contiguous()
                args = (
                    sub["q"],
                    kv,
                    sub["out"],
                    sub["lse"],
                    sub["d_out"],
                    sub["indices"],
                    SM_SCALE,
                    p["d_v"],
                    None,  # topk_length
                    None,  # attn_sink
                    None,  # d_lse
                )
                dq, dkv = autograd.sparse_mla_bwd_impl(*args, "tilelang")
                ref_dq, ref_dkv = autograd.sparse_mla_bwd_impl(*args, "reference")
                assert_close(dq, ref_dq, **TOL["grad"], name="dq")
                assert_close(dkv, ref_dkv, **TOL["grad"], name="dkv")
            else:
                return None
    except AssertionError as exc:
        return f"mismatch: {str(exc).splitlines()[0][:300]}"
    except Exception as exc:  # noqa: BLE001 - recorded; the harness goes on with the next case
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------------
_META: dict[str, Any] = {}


def _row(case: Any, provider: str, metric: str, value: Any, unit: str, note: str = "") -> dict[str, Any]:
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


def timing_rows(case: Any, provider: Provider, timing: Timing) -> list[dict[str, Any]]:
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
    flops = provider.flops if provider.flops is not None else case.flops
    if flops:
        rows.append(_row(case, provider.name, "tflops", flops / (med * 1e-3) / TERA, "TFLOP/s"))
    if case.bytes and provider.flops is None:
        rows.append(_row(case, provider.name, "gbps", case.bytes / (med * 1e-3) / GIGA, "GB/s"))
    return rows


def target_rows(case: Any, medians: dict[str, float], ceilings: dict[str, Any]) -> list[dict[str, Any]]:
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
            rate = (
                case.flops / (dsa_ms * 1e-3) / TERA
                if target.metric == "tflops"
                else case.bytes / (dsa_ms * 1e-3) / GIGA
            )
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


# (kernel, provider) -> (case, seconds) of a baseline whose single call exceeded the budget: later cases of the same
# kernel skip it (a reference or dense call only grows with the sizes that follow).
_SLOW: dict[tuple[str, str], tuple[str, float]] = {}


@dataclass
class CaseResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: bool = False


def _free(*objs: Any) -> None:
    import gc

    del objs
    gc.collect()
    _empty_cache()


def run_memory_case(case: Any, options: RunOptions) -> CaseResult:
    """Peak device memory of the DSA path (FP8 indexer -> top-k -> sparse MLA forward) against dense attention."""
    import torch

    from dsa import ops

    p = case.params
    result = CaseResult()
    if not on_cuda():
        result.rows.append(_row(case, "dsa", "skipped", None, "", "peak device memory needs CUDA"))
        return result
    inp = make_inputs(case, torch.device("cuda"), seed=0)
    torch.cuda.synchronize()

    def dsa_path() -> Any:
        scores = ops.index_scores(inp["iq"], inp["ik"], inp["iw"], k_scale=inp["iscale"])
        idx = ops.topk_indices(scores, p["topk"])
        del scores
        return ops.sparse_mla(inp["q"], inp["kv"], idx, sm_scale=SM_SCALE, d_v=p["d_v"])

    paths = {
        "dsa": dsa_path,
        "dense-sdpa": lambda: dense_sdpa(inp["q"], inp["kv"], p["d_v"]),
        "dense-matmul": lambda: dense_matmul(inp["q"], inp["kv"], p["d_v"]),
    }
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
            peak = torch.cuda.max_memory_allocated() - base
            del out
            peaks[name] = peak
            result.rows += [
                _row(case, name, "peak_bytes", peak, "B", "above the inputs, after torch.cuda.reset_peak_memory_stats"),
                _row(case, name, "wall_ms", elapsed_ms, "ms", "one call, host clock around a synchronize"),
            ]
        except torch.OutOfMemoryError as exc:
            result.rows.append(
                _row(case, name, "skipped", None, "", f"out of memory: {str(exc).splitlines()[0][:200]}")
            )
        except Exception as exc:  # noqa: BLE001 - recorded; other paths still run
            result.rows.append(_row(case, name, "error", None, "", f"{type(exc).__name__}: {str(exc)[:300]}"))
            result.failed |= name == "dsa"
        torch.cuda.empty_cache()
    result.rows.append(_row(case, "inputs", "input_bytes", _tensor_bytes(inp), "B"))
    for dense in ("dense-sdpa", "dense-matmul"):
        if "dsa" in peaks and dense in peaks and peaks["dsa"]:
            result.rows.append(_row(case, dense, "peak_ratio_vs_dsa", peaks[dense] / peaks["dsa"], "x"))
    _free(inp)
    return result


def run_case(case: Any, options: RunOptions, ceilings: dict[str, Any]) -> CaseResult:
    """Time every provider of ``case``, check ``dsa`` once, evaluate targets; returns the rows."""
    import torch

    if case.kernel == "memory":
        return run_memory_case(case, options)
    result = CaseResult()
    result.rows += [_row(case, "-", "flops", case.flops, "FLOP"), _row(case, "-", "bytes", case.bytes, "B")]
    dev = device()
    first = make_inputs(case, dev, seed=0)
    n_sets = input_set_count(_tensor_bytes(first))
    if not _fits(case, _tensor_bytes(first) * (n_sets - 1)):
        n_sets = 1
    sets = [first] + [make_inputs(case, dev, seed=i) for i in range(1, n_sets)]
    result.rows.append(
        _row(case, "-", "input_sets", n_sets, "sets", f"{_tensor_bytes(first)} B each; L2 {l2_bytes()} B")
    )
    medians: dict[str, float] = {}
    for provider in providers_for(case):
        if options.providers and provider.name not in options.providers:
            continue
        slow = _SLOW.get((case.kernel, provider.name))
        if not provider.skip and slow is not None and provider.name != "dsa":
            provider.skip = (
                f"skipped: one call took {slow[1]:.1f} s at {slow[0]} (over the {options.budget_s:g} s budget)"
            )
        if provider.skip:
            result.rows.append(_row(case, provider.name, "skipped", None, "", provider.skip))
            continue
        try:
            timing = time_calls(
                provider.fn, sets, warmup=options.warmup, reps=options.reps, budget_s=options.budget_s,
                compiles=provider.name == "dsa",
            )  # fmt: skip
            if len(timing.samples) == 1 and timing.samples[0] > options.budget_s * 1e3:
                _SLOW[(case.kernel, provider.name)] = (case.name, timing.samples[0] / 1e3)
            medians[provider.name] = timing.median
            result.rows += timing_rows(case, provider, timing)
        except torch.OutOfMemoryError as exc:
            result.rows.append(
                _row(case, provider.name, "skipped", None, "", f"out of memory: {str(exc).splitlines()[0][:200]}")
            )
            result.failed |= provider.name == "dsa"
        except Exception as exc:  # noqa: BLE001 - recorded; the next provider still runs
            logger.debug("provider %s on %s failed", provider.name, case.name, exc_info=True)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            result.rows.append(_row(case, provider.name, "error", None, "", msg))
            result.failed |= provider.name == "dsa"
        _empty_cache()
    if options.check and (not options.providers or "dsa" in options.providers):
        problem = check_dsa(case, sets[0])
        result.rows.append(_row(case, "dsa", "check", problem is None, "pass", problem or "matches dsa.reference"))
        result.failed |= problem is not None
    for base in ("torch.topk", "dense-sdpa", "dense-matmul", "reference", "flashmla", "deepgemm"):
        if "dsa" in medians and base in medians:
            result.rows.append(_row(case, "dsa", f"speedup_vs_{base}", medians[base] / medians["dsa"], "x"))
    result.rows += target_rows(case, medians, ceilings)
    _free(sets, first)
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
        ms = e.get("latency_ms")
        note = e.get("skipped") or e.get("error") or ""
        if "check" in e:
            note = ("check ok " if e["check"] is True else "CHECK FAILED ") + note
        if "peak_bytes" in e:
            note = f"peak {e['peak_bytes'] / 1e9:.2f} GB " + note
        if "peak_ratio_vs_dsa" in e:
            note += f"{e['peak_ratio_vs_dsa']:.2f}x dsa memory"
        tf = e.get("tflops")
        gb = e.get("gbps")
        ms_text = f"{ms:.4f}" if isinstance(ms, float) else "-"
        tf_text = f"{tf:.1f}" if isinstance(tf, float) else "-"
        gb_text = f"{gb:.0f}" if isinstance(gb, float) else "-"
        lines.append(f"{case[:44]:44} {provider[:13]:13} {ms_text:>10} {tf_text:>9} {gb_text:>8}  {str(note)[:70]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description="Benchmark the DSA kernels against the reference and dense attention.")
    p.add_argument(
        "--kernels",
        default="all",
        help="'all' or a comma list of: indexer, topk, sparse_mla_fwd, sparse_mla_bwd, memory",
    )
    p.add_argument("--cases", default=None, help="comma list of case names (or substrings) to keep")
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
        cases = select_cases(args.kernels, args.cases, tiny=args.tiny)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    if args.dry_run:
        print(format_dry_run(cases))
        if args.json:
            write_json(args.json, {"dry_run": True, "rows": dry_run_rows(cases)})
        return EXIT_OK
    import torch

    _DEVICE["type"] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_NO_GPU
    _META.update(host_info())
    if args.measure_ceilings:
        if not on_cuda():
            print("bench: --measure-ceilings needs CUDA", file=sys.stderr)
            return EXIT_NO_GPU
        ceilings = measure_ceilings()
        print(json.dumps(ceilings, indent=1))
        if args.json:
            write_json(args.json, {"host": _META, "ceilings": ceilings})
        return EXIT_OK
    if args.ceilings:
        ceilings = json.loads(args.ceilings.read_text())["ceilings"]
    else:
        ceilings = measure_ceilings() if on_cuda() else {}
    options = RunOptions(
        warmup=args.warmup,
        reps=args.reps,
        budget_s=args.budget_s,
        providers=tuple(p.strip() for p in args.providers.split(",")) if args.providers else None,
        check=not args.no_check,
    )
    doc: dict[str, Any] = {"host": _META, "ceilings": ceilings, "rows": [], "failed_cases": []}
    failed = False
    for case in cases:
        t0 = time.perf_counter()
        print(f"[bench] {case.name} ...", flush=True)
        try:
            result = run_case(case, options, ceilings)
        except Exception as exc:  # noqa: BLE001 - input creation or a harness bug: record, go on
            traceback.print_exc()
            result = CaseResult([_row(case, "-", "error", None, "", f"{type(exc).__name__}: {str(exc)[:300]}")], True)
            try:
                _empty_cache()
            except Exception:  # noqa: BLE001
                pass
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

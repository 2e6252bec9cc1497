"""GPU time measurement shared by the tuner and the benchmark: CUDA events over L2-rotating inputs, and ceilings.

* :func:`input_set_count`: how many copies of a call's inputs to rotate through so that together they exceed twice
  the L2 cache (no timed call finds its inputs there), within a share of the free device memory;
* :func:`time_calls`: warm-up calls, then each timed call between its own pair of CUDA events, inputs rotated per
  call, optionally cut to a time budget; :func:`median_ms` is its median (the tuner's ``measure``);
* :func:`measure_ceilings`: the device's copy bandwidth and bf16/FP8 matrix rates, the yardsticks of the benchmark's
  targets.

Without CUDA (the CPU harness tests) :func:`time_calls` uses the host clock and says so in its note.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FALLBACK_L2_BYTES",
    "Timing",
    "input_set_count",
    "l2_bytes",
    "measure_ceilings",
    "median_ms",
    "time_calls",
]

WARMUP_CALLS = 3
TIMED_CALLS = 20
L2_ROTATION_FACTOR = 2
"""Input sets together exceed this many L2 sizes."""
MAX_INPUT_SETS = 32
INPUT_MEMORY_SHARE = 0.5
"""Input copies may use at most this share of the free device memory."""
FALLBACK_L2_BYTES = 50 * 1024 * 1024
"""The L2 size assumed when the device does not report one (Hopper's is 50 MB)."""
CEILING_COPY_ELEMENTS = 1 << 28
"""1 GiB of float32 per buffer for the copy-bandwidth ceiling."""
CEILING_MATMUL_SIZE = 8192
CEILING_REPS = 10
GIGA, TERA = 1e9, 1e12


@dataclass
class Timing:
    """Times of one call in milliseconds (CUDA events, or the host clock without CUDA: see ``note``)."""

    samples: list[float]
    note: str = ""

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the samples, linearly interpolated."""
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def l2_bytes(device: torch.device | None = None) -> int:
    """The L2 cache size of a CUDA ``device`` (default: the current one), :data:`FALLBACK_L2_BYTES` when unknown or
    without CUDA."""
    if not torch.cuda.is_available():
        return FALLBACK_L2_BYTES
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 0) or FALLBACK_L2_BYTES


def input_set_count(bytes_per_set: int, *, l2: int, free_bytes: int | None = None) -> int:
    """How many input copies to rotate over: enough to exceed :data:`L2_ROTATION_FACTOR` x ``l2``, at most
    :data:`MAX_INPUT_SETS`, and (given ``free_bytes``) within :data:`INPUT_MEMORY_SHARE` of the free memory."""
    if bytes_per_set <= 0:
        return 1
    wanted = math.ceil(L2_ROTATION_FACTOR * l2 / bytes_per_set)
    if free_bytes is not None:
        wanted = min(wanted, int(INPUT_MEMORY_SHARE * free_bytes // bytes_per_set))
    return max(1, min(wanted, MAX_INPUT_SETS))


def time_calls(
    fn: Callable[[Any], Any],
    sets: Sequence[Any],
    *,
    warmup: int = WARMUP_CALLS,
    reps: int = TIMED_CALLS,
    budget_s: float | None = None,
) -> Timing:
    """Time ``fn(inputs)`` over rotating input ``sets``.

    ``warmup`` untimed calls, then ``reps`` calls, each between its own pair of CUDA events. With ``budget_s``, one
    probe call estimates the cost first and the timed calls are cut to fit the budget (at least one), which the note
    says. Without CUDA the host clock times each call (for tests of the harness, not for numbers).
    """
    if not torch.cuda.is_available():
        fn(sets[0])
        samples = []
        for i in range(max(1, reps)):
            t0 = time.perf_counter()
            fn(sets[i % len(sets)])
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing(samples, "host clock (no CUDA)")
    note = ""
    n = max(1, reps)
    if budget_s is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(sets[0])
        end.record()
        torch.cuda.synchronize()
        probe_ms = start.elapsed_time(end)
        affordable = int(budget_s * 1e3 / max(probe_ms, 1e-3))
        if affordable < n:
            note = f"{max(1, affordable)} of {n} timed calls (budget {budget_s:g} s, one call {probe_ms:.1f} ms)"
            n = max(1, affordable)
    for i in range(warmup):
        fn(sets[i % len(sets)])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    torch.cuda.synchronize()
    for i, (s, e) in enumerate(events):
        s.record()
        fn(sets[(warmup + i) % len(sets)])
        e.record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in events], note)


def median_ms(
    call: Callable[[Any], Any], input_sets: Sequence[Any], *, warmup: int = WARMUP_CALLS, reps: int = TIMED_CALLS
) -> float:
    """Median latency in ms of ``call(inputs)`` over ``reps`` calls (:func:`time_calls`): the tuner's measure."""
    return time_calls(call, input_sets, warmup=warmup, reps=reps).median


def _copy_gbps() -> float:
    x = torch.randn(CEILING_COPY_ELEMENTS, device="cuda")
    y = torch.empty_like(x)
    ms = time_calls(lambda _: y.copy_(x), [None], reps=CEILING_REPS).median
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / GIGA


def _bf16_tflops() -> float:
    m = CEILING_MATMUL_SIZE
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = time_calls(lambda _: a @ b, [None], reps=CEILING_REPS).median
    return 2.0 * m**3 / (ms * 1e-3) / TERA


def _fp8_tflops() -> float:
    m = CEILING_MATMUL_SIZE
    a = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm requires
    one = torch.ones((), device="cuda", dtype=torch.float32)
    ms = time_calls(
        lambda _: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), [None], reps=CEILING_REPS
    ).median
    return 2.0 * m**3 / (ms * 1e-3) / TERA


def measure_ceilings() -> dict[str, Any]:
    """The device's measured ceilings: device-to-device copy bandwidth (bytes read + written), bf16 and FP8 matrix
    rates (8192^3 products through torch; FP8 via ``torch._scaled_mm``), each the median of 10 CUDA-event timings.
    A ceiling that cannot be measured is recorded as ``<name>_error`` and the others still run."""
    out: dict[str, Any] = {}
    for name, fn in (("copy_gbps", _copy_gbps), ("bf16_tflops", _bf16_tflops), ("fp8_tflops", _fp8_tflops)):
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the other ceilings still run
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        torch.cuda.empty_cache()
    return out

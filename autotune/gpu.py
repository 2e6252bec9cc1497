"""The GPU phase of the tuner: check candidates against ``dsa.reference`` and time them with CUDA events.

UNVERIFIED ON A GPU: this module was written on a machine without one. The selection logic (:func:`time_case` with
a fake runner and a fake clock) and the worker process (:class:`GpuTimer` with fake runners that crash or hang) are
unit-tested on the CPU; the per-kernel runners below have not run on CUDA yet.

A :class:`Runner` knows, for one kernel, how to make random inputs of a size point, how to run the kernel on them
with a given config, what ``dsa.reference`` returns for them, and how to compare. Kernels run through their launchers
in ``dsa.launch`` with the launcher's ``config=`` override, i.e. exactly the call path of the ops (for the backward
that includes its small preprocess and postprocess kernels). A kernel whose launcher does not exist yet is called
directly with the argument list its ``build`` docstring documents.

Each case runs in steps: the reference at the check sizes, then each candidate's check (its kernel loaded and run
once at the check sizes, compared with the reference) one by one, then per size point the input sets and each correct
candidate's timing. A candidate that has never run on a GPU (the warp-specialised forward schedule, for one) may
deadlock or fault, and an illegal address poisons the whole CUDA context, so by default (:class:`GpuTimer`,
``TuneOptions.isolate``) the steps run in a worker process, spawned so that it does not inherit a CUDA context and
kept across cases. The worker reports each step before it starts and each result as soon as it has it; when the
worker dies (a signal, a non-zero exit) or sends nothing for ``TuneOptions.candidate_timeout_s`` seconds
(``DSA_TUNE_CANDIDATE_TIMEOUT_S``, default 120; start-up has :data:`WORKER_STARTUP_TIMEOUT_S`), the parent kills
the worker's process group, records the step in progress as failed with the reason (``GPU worker process died with
signal 11 (SIGSEGV) while checking candidate {...} at {...}``, ``no result after 120 s while timing candidate {...}
at {...}: killed``; a candidate that failed so while being timed is not timed at later sizes either), and a fresh
worker takes the remaining steps. Results already reported are kept. When a step fails with an exception and CUDA
no longer works afterwards, the worker exits after reporting it and a fresh one goes on. Cache files are written
by the parent only. :func:`time_case` runs the same steps in this process (tests with fake runners, debugging).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from autotune import space, tuner
from dsa import env

logger = logging.getLogger(__name__)

Inputs = dict[str, Any]
# Loose, tuner-level tolerances (the test suite holds the kernels to stricter ones): a candidate is rejected when its
# output is plainly wrong, not for rounding. bf16 outputs carry about 3 significant digits.
BF16_ATOL = 2e-2
BF16_RTOL = 2e-2
F32_ATOL = 1e-3
F32_RTOL = 1e-3
MIN_COSINE = 0.999
SEED = 20251201
HOPPER_TARGET = {"kind": "cuda", "arch": "sm_90a"}


@dataclass(frozen=True)
class Runner:
    """How to exercise one kernel.

    Attributes:
        make_inputs: ``(static, sizes, device, seed) -> inputs`` with random, non-zero data.
        launch: ``(prepared, static, inputs) -> outputs`` (a tuple of tensors); ``prepared`` is what ``get_kernel``
            returned for the candidate.
        reference: ``(static, inputs) -> expected outputs`` (same structure as ``launch``'s).
        compare: ``(outputs, expected) -> None or a reason the outputs are wrong``.
        get_kernel: ``(kernel name, static, config dict) -> prepared``; default: the kernel module's checked
            ``Config`` (the launcher compiles through ``tl_kernels.build.get_kernel``, which loads the kernel from
            TileLang's disk cache filled by the compile phase).
    """

    make_inputs: Callable[[dict[str, Any], dict[str, int], torch.device, int], Inputs]
    launch: Callable[[Any, dict[str, Any], Inputs], tuple[Any, ...]]
    reference: Callable[[dict[str, Any], Inputs], tuple[Any, ...]]
    compare: Callable[[tuple[Any, ...], tuple[Any, ...]], str | None]
    get_kernel: Callable[[str, dict[str, Any], dict[str, Any]], Any] | None = None


def _checked_config(kernel: str, static: dict[str, Any], config: dict[str, Any]) -> Any:
    """The kernel module's ``Config`` for ``config``, checked for sm_90a: what the launchers take as ``config=``."""
    return space.make_config(kernel, static, config)


def _launcher(module: str, function: str) -> Callable[..., Any] | None:
    """``dsa.launch.<module>.<function>`` when that launcher exists, else ``None``."""
    try:
        return getattr(importlib.import_module(f"dsa.launch.{module}"), function)
    except (ImportError, AttributeError):
        return None


def _direct_kernel(kernel: str, static: dict[str, Any], config: Any) -> Any:
    """The sm_90a kernel for a candidate, for kernels whose launcher is missing."""
    from tl_kernels import build

    module = space.kernel_module(kernel)
    return build.get_kernel(module.build, target=HOPPER_TARGET, **static, **dataclasses.asdict(config))


# ----------------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------------
def compare_tensor(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str) -> str | None:
    """``None`` when ``actual`` matches ``expected`` (same NaN/inf positions, finite values within
    ``atol + rtol * |expected|``, cosine similarity >= :data:`MIN_COSINE`), else a short reason."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double()
    for label, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = int((fn(a) != fn(e)).sum())
        if differ:
            return f"{name}: {differ} {label} positions differ"
    finite = torch.isfinite(e)
    af, ef = a[finite], e[finite]
    if af.numel() == 0:
        return None
    bad = int(((af - ef).abs() > atol + rtol * ef.abs()).sum())
    if bad:
        worst = float((af - ef).abs().max())
        return f"{name}: {bad} of {af.numel()} values outside tolerance (max abs error {worst:.3g})"
    denom = float(af.norm() * ef.norm())
    if denom > 0:
        cosine = float((af * ef).sum()) / denom
        if cosine < MIN_COSINE:
            return f"{name}: cosine similarity {cosine:.6f} < {MIN_COSINE}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------------------------------
def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 1.0):
    return (torch.randn(*shape, device=device, generator=gen, dtype=torch.float32) * scale).to(dtype)


def causal_random_indices(
    batch: int, seq_len: int, seq_len_kv: int, topk: int, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """``[B, S, topk]`` int32: random key positions each query may see (``s <= t + S_kv - S``), ``-1`` past the number
    of visible keys; duplicates are possible (the kernels must accept them). Cheap at 64K tokens (no sort)."""
    t = torch.arange(seq_len, device=device, dtype=torch.int64)
    visible = (t + (seq_len_kv - seq_len) + 1).clamp(min=0, max=seq_len_kv)  # [S]
    u = torch.rand(batch, seq_len, topk, device=device, generator=gen)
    idx = (u * visible.view(1, seq_len, 1)).to(torch.int64)
    slot = torch.arange(topk, device=device).view(1, 1, topk)
    idx = torch.where(slot < visible.view(1, seq_len, 1), idx, torch.full_like(idx, -1))
    return idx.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------------------------
def _index_scores_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    gen = _generator(device, seed)
    b, s, s_kv = sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"]
    heads, dim = static["heads"], static["dim"]
    dtype = getattr(torch, static["dtype"])
    inputs: Inputs = {
        "q": _randn((b, s, heads, dim), dtype, device, gen),
        "k": _randn((b, s_kv, dim), dtype, device, gen),
        "weights": _randn((b, s, heads), torch.float32, device, gen, scale=(heads * dim) ** -0.5),
        "k_scale": None,
    }
    if static["dtype"] == "float8_e4m3fn":
        inputs["k_scale"] = torch.rand(b, s_kv, device=device, generator=gen) + 0.5
    return inputs


def _index_scores_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa.launch import indexer

    scores = indexer.index_scores(inputs["q"], inputs["k"], inputs["weights"], k_scale=inputs["k_scale"], config=config)
    return (scores,)


def _index_scores_reference(static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa import reference

    return (reference.index_scores(inputs["q"], inputs["k"], inputs["weights"], k_scale=inputs["k_scale"]),)


def _index_scores_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    scale = float(ref[0][torch.isfinite(ref[0])].abs().max()) if torch.isfinite(ref[0]).any() else 1.0
    return compare_tensor(out[0], ref[0], atol=F32_ATOL * max(scale, 1.0), rtol=BF16_RTOL, name="scores")


def causal_scores(
    batch: int, seq_len: int, seq_len_kv: int, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """``[B, S, S_kv]`` float32 random scores, ``-inf`` where the query may not see the key (what the indexer
    produces under bottom-right aligned causality). Masked in row chunks so that no full-size mask is allocated."""
    scores = torch.randn(batch, seq_len, seq_len_kv, device=device, generator=gen, dtype=torch.float32)
    keys = torch.arange(seq_len_kv, device=device)
    rows_per_chunk = max(1, (1 << 26) // max(seq_len_kv, 1))
    for lo in range(0, seq_len, rows_per_chunk):
        t = torch.arange(lo, min(seq_len, lo + rows_per_chunk), device=device)
        hidden = keys.view(1, -1) > (t + (seq_len_kv - seq_len)).view(-1, 1)
        scores[:, lo : lo + t.numel()].masked_fill_(hidden.unsqueeze(0), float("-inf"))
    return scores


def _topk_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    gen = _generator(device, seed)
    return {"scores": causal_scores(sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"], device, gen)}


def _topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    scores = inputs["scores"]
    launcher = _launcher("topk", "topk_indices")
    if launcher is not None:
        return launcher(scores, static["k"], config=config), scores
    # No launcher yet: the kernel's documented arguments (scores [B, S, S_kv] f32, indices [B, S, k] i32).
    indices = torch.empty(*scores.shape[:2], static["k"], dtype=torch.int32, device=scores.device)
    _direct_kernel("topk_indices", static, config)(scores, indices)
    return indices, scores


def _topk_reference(static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa import reference

    return reference.topk_indices(inputs["scores"], static["k"]), inputs["scores"]


def topk_set_error(indices: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor) -> str | None:
    """Compare two top-k results as sets (any choice among exact ties is allowed): ``None`` when every index is in
    range or ``-1``, no row repeats an index, and the multisets of selected scores are equal."""
    s_kv = scores.shape[-1]
    if indices.shape != expected.shape:
        return f"indices: shape {tuple(indices.shape)} != {tuple(expected.shape)}"
    if bool(((indices < -1) | (indices >= s_kv)).any()):
        return "indices: out of range (neither -1 nor a key position)"
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        return f"indices: {int(repeated.sum())} repeated indices"

    def selected(idx: torch.Tensor) -> torch.Tensor:
        gathered = scores.gather(-1, idx.clamp(min=0).long())
        return gathered.masked_fill(idx < 0, float("-inf")).sort(dim=-1).values

    differ = int((selected(indices) != selected(expected)).sum())
    return f"indices: selected scores differ in {differ} places" if differ else None


def _topk_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    return topk_set_error(out[0], ref[0], ref[1])


def _mla_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    gen = _generator(device, seed)
    b, s, s_kv = sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"]
    topk = int(static["topk"] if "topk" in static else sizes["topk"])
    heads, d_qk = static["heads"], static["d_qk"]
    return {
        "q": _randn((b, s, heads, d_qk), torch.bfloat16, device, gen),
        "kv": _randn((b, s_kv, d_qk), torch.bfloat16, device, gen),
        "indices": causal_random_indices(b, s, s_kv, topk, device, gen),
        "sm_scale": d_qk**-0.5,
    }


def _fwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    q = inputs["q"]
    launcher = _launcher("sparse_mla_fwd", "sparse_mla_fwd")
    if launcher is not None:
        out, lse = launcher(
            q, inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"], d_v=static["d_v"], config=config
        )
        return out, lse
    # No launcher yet: the kernel's documented arguments; without topk_length and sink it takes placeholders.
    b, s, heads, _ = q.shape
    out = torch.empty(b, s, heads, static["d_v"], dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(b, s, heads, dtype=torch.float32, device=q.device)
    topk_length = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    sink = torch.zeros(1, dtype=torch.float32, device=q.device)
    kernel = _direct_kernel("sparse_mla_fwd", static, config)
    kernel(q, inputs["kv"], inputs["indices"], topk_length, sink, inputs["sm_scale"], out, lse)
    return out, lse


def _fwd_reference(static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa import reference

    return reference.sparse_mla(
        inputs["q"], inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"], d_v=static["d_v"]
    )


def _fwd_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    return compare_tensor(out[0], ref[0], atol=BF16_ATOL, rtol=BF16_RTOL, name="out") or compare_tensor(
        out[1], ref[1], atol=F32_ATOL * 10, rtol=F32_RTOL, name="lse"
    )


def _bwd_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    from dsa import reference

    inputs = _mla_inputs(static, sizes, device, seed)
    gen = _generator(device, seed + 1)
    q = inputs["q"]
    inputs["d_out"] = _randn((*q.shape[:3], static["d_v"]), torch.bfloat16, device, gen)
    with torch.no_grad():
        out, lse = reference.sparse_mla(
            q, inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"], d_v=static["d_v"]
        )
    inputs["out"] = out.to(torch.bfloat16).contiguous()
    inputs["lse"] = lse.float().contiguous()
    return inputs


def _bwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa.launch import sparse_mla_bwd

    return sparse_mla_bwd.sparse_mla_bwd(
        inputs["q"],
        inputs["kv"],
        inputs["out"],
        inputs["lse"],
        inputs["d_out"],
        inputs["indices"],
        sm_scale=inputs["sm_scale"],
        d_v=static["d_v"],
        config=config,
    )


def _bwd_reference(static: dict[str, Any], inputs: Inputs) -> tuple[Any, ...]:
    from dsa import reference

    q = inputs["q"].float().requires_grad_(True)
    kv = inputs["kv"].float().requires_grad_(True)
    out, _ = reference.sparse_mla(q, kv, inputs["indices"], sm_scale=inputs["sm_scale"], d_v=static["d_v"])
    out.backward(inputs["d_out"].float())
    return q.grad, kv.grad


def _bwd_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    def scaled(t: torch.Tensor) -> float:
        return max(float(t.abs().max()), 1e-6)

    return compare_tensor(out[0], ref[0], atol=BF16_ATOL * scaled(ref[0]), rtol=BF16_RTOL, name="dq") or (
        compare_tensor(out[1], ref[1], atol=BF16_ATOL * scaled(ref[1]), rtol=BF16_RTOL, name="dkv")
    )


_RUNNERS: dict[str, Runner] = {
    "index_scores": Runner(_index_scores_inputs, _index_scores_launch, _index_scores_reference, _index_scores_compare),
    "topk_indices": Runner(_topk_inputs, _topk_launch, _topk_reference, _topk_compare),
    "sparse_mla_fwd": Runner(_mla_inputs, _fwd_launch, _fwd_reference, _fwd_compare),
    "sparse_mla_bwd": Runner(_bwd_inputs, _bwd_launch, _bwd_reference, _bwd_compare),
}


def register_runner(kernel: str, runner: Runner) -> None:
    """Add or replace the runner of ``kernel`` (tests plug in a fake one)."""
    _RUNNERS[kernel] = runner


def runner_for(kernel: str) -> Runner | None:
    """The runner of ``kernel``, or ``None`` when it has none (the kernel is then compiled but not timed)."""
    return _RUNNERS.get(kernel)


# ----------------------------------------------------------------------------------------------------------------------
# The GPU phase of one case: its steps, their results, and what is still to do
# ----------------------------------------------------------------------------------------------------------------------
def _tensor_bytes(inputs: Inputs) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


def _input_sets(runner: Runner, static: dict[str, Any], sizes: dict[str, int], device: torch.device) -> list[Inputs]:
    first = runner.make_inputs(static, sizes, device, SEED)
    if device.type != "cuda":
        return [first]
    props = torch.cuda.get_device_properties(device)
    free, _ = torch.cuda.mem_get_info(device)
    count = tuner.input_set_count(_tensor_bytes(first), l2_bytes=props.L2_cache_size, free_bytes=free)
    return [first] + [runner.make_inputs(static, sizes, device, SEED + i) for i in range(1, count)]


@dataclass(frozen=True)
class _Step:
    """The step the GPU phase starts now; the worker sends one before each step, so that the parent knows whom a crash
    or a hang belongs to.

    Attributes:
        action: ``"reference"`` (check inputs and expected outputs), ``"check"`` (load a candidate's kernel, run it
            at the check sizes, compare), ``"inputs"`` (the input sets of a size point) or ``"time"`` (time a
            candidate at a size point).
        point: position in ``case.sizes`` (``"inputs"`` and ``"time"``).
        candidate: position in the case's candidates (``"check"`` and ``"time"``).
    """

    action: str
    point: int | None = None
    candidate: int | None = None


@dataclass(frozen=True)
class _Result:
    """The outcome of checking (``point is None``) or timing (at ``case.sizes[point]``) one candidate."""

    candidate: int
    point: int | None
    latency_ms: float | None
    error: str | None


@dataclass(frozen=True)
class _CaseDone:
    """The worker has run every step of the case it was sent."""


@dataclass
class _Progress:
    """What the GPU phase of one case has found so far. A fresh worker gets a copy and skips what is in it.

    Attributes:
        candidates / points: how many candidates and size points the case has.
        checks: candidate -> ``None`` when its output matched the reference, else why it is rejected.
        times: ``(point, candidate)`` -> ``(median ms or None, why it has no time or None)``.
    """

    candidates: int
    points: int
    checks: dict[int, str | None] = field(default_factory=dict)
    times: dict[tuple[int, int], tuple[float | None, str | None]] = field(default_factory=dict)

    def unchecked(self) -> list[int]:
        """Candidates not checked yet."""
        return [i for i in range(self.candidates) if i not in self.checks]

    def untimed(self, point: int) -> list[int]:
        """Correct candidates without a result at size point ``point``."""
        return [i for i, error in sorted(self.checks.items()) if error is None and (point, i) not in self.times]

    def finished(self) -> bool:
        """Whether every candidate is checked and every correct one has a result at every size point."""
        return not self.unchecked() and not any(self.untimed(p) for p in range(self.points))

    def add(self, result: _Result) -> None:
        """Record one step's result."""
        if result.point is None:
            self.checks[result.candidate] = result.error
        else:
            self.times[(result.point, result.candidate)] = (result.latency_ms, result.error)

    def fail(self, step: _Step | None, reason: str) -> None:
        """Record ``reason`` as the result of the work ``step`` was doing, or of all the work left when ``step`` is
        ``None``. A candidate that failed while being timed is not timed at the later size points either: one that
        crashed or hung once would most likely do it again, and each time costs a worker and a time limit."""
        if step is None or step.action == "reference":
            for i in self.unchecked():
                self.checks[i] = reason
        if step is None:
            for point in range(self.points):
                for i in self.untimed(point):
                    self.times[(point, i)] = (None, reason)
        elif step.action == "check" and step.candidate is not None:
            self.checks[step.candidate] = reason
        elif step.action == "inputs" and step.point is not None:
            for i in self.untimed(step.point):
                self.times[(step.point, i)] = (None, reason)
        elif step.action == "time" and step.point is not None and step.candidate is not None:
            for point in range(step.point, self.points):
                self.times.setdefault((point, step.candidate), (None, reason))


class _ContextLost(RuntimeError):
    """A step failed and CUDA no longer works in this process (e.g. after an illegal address): nothing more can run."""


def _stop_if_context_lost(device: torch.device, after: str) -> None:
    """Raise :class:`_ContextLost` when the CUDA context of ``device`` has become unusable (a sticky error makes every
    later call fail, which would wrongly reject every later candidate)."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        usable = float(torch.ones(1, device=device).sum().item()) == 1.0
    except Exception:  # noqa: BLE001 - whatever the error, the context cannot be trusted any more
        usable = False
    if not usable:
        raise _ContextLost(f"CUDA no longer works after {after}")


def _run_case(
    case: space.Case,
    candidates: Sequence[Any],
    options: tuner.TuneOptions,
    *,
    device: torch.device,
    runner: Runner,
    measure: Callable[..., float],
    progress: _Progress,
    report: Callable[[_Step | _Result], None],
) -> None:
    """Check, then time, each candidate of ``case`` that ``progress`` holds no result for.

    Every candidate is checked (one by one) before any is timed, so that a crash while checking belongs to one
    candidate. ``report`` is called with a :class:`_Step` before each step and with the :class:`_Result` after it; it
    must add results to ``progress`` (the timing phase reads which candidates passed their check from it).

    Raises:
        _ContextLost: a step failed and CUDA no longer works here (that step's result is reported first).
    """
    get_kernel = runner.get_kernel or _checked_config
    prepared: dict[int, Any] = {}
    # 1. correctness at the small check size: a wrong candidate never wins, however fast.
    pending = progress.unchecked()
    check_inputs: Inputs | None = None
    expected: tuple[Any, ...] | None = None
    if pending:
        report(_Step("reference"))
        try:
            check_inputs = runner.make_inputs(case.static, case.check_sizes, device, SEED)
            expected = runner.reference(case.static, check_inputs)
        except Exception as exc:  # noqa: BLE001 - without a reference nothing may win; report and go on
            reason = f"reference failed at {case.check_sizes}: {tuner._short_error(exc)}"
            for i in pending:
                report(_Result(i, None, None, reason))
            _stop_if_context_lost(device, f"computing the reference at {case.check_sizes}")
            pending = []
    for i in pending:
        report(_Step("check", candidate=i))
        try:
            prepared[i] = get_kernel(case.kernel, case.static, candidates[i].job.config)
            got = runner.launch(prepared[i], case.static, check_inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            error = runner.compare(got, expected)
            report(_Result(i, None, None, None if error is None else f"wrong result at {case.check_sizes}: {error}"))
        except Exception as exc:  # noqa: BLE001 - a crashing candidate is rejected, the others still run
            report(_Result(i, None, None, f"failed at {case.check_sizes}: {tuner._short_error(exc)}"))
            _stop_if_context_lost(device, f"checking candidate {candidates[i].job.config_json}")
    del check_inputs, expected

    # 2. timing per size point, inputs rotated.
    for point, sizes in enumerate(case.sizes):
        todo = progress.untimed(point)
        if not todo:
            continue
        report(_Step("inputs", point=point))
        try:
            input_sets = _input_sets(runner, case.static, sizes, device)
        except Exception as exc:  # noqa: BLE001 - typically out of memory at the largest sizes
            reason = f"no inputs at {sizes}: {tuner._short_error(exc)}"
            for i in todo:
                report(_Result(i, point, None, reason))
            _stop_if_context_lost(device, f"making inputs at {sizes}")
            continue
        for i in todo:
            report(_Step("time", point=point, candidate=i))
            try:
                if i not in prepared:  # a fresh worker loads the kernels its predecessor had checked
                    prepared[i] = get_kernel(case.kernel, case.static, candidates[i].job.config)
                latency = measure(
                    lambda inputs, ready=prepared[i]: runner.launch(ready, case.static, inputs),
                    input_sets,
                    warmup=options.warmup,
                    reps=options.reps,
                )
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for this tile at this size
                report(_Result(i, point, None, f"failed at {sizes}: {tuner._short_error(exc)}"))
                _stop_if_context_lost(device, f"timing candidate {candidates[i].job.config_json} at {sizes}")
                continue
            if math.isfinite(latency):
                report(_Result(i, point, latency, None))
            else:
                report(_Result(i, point, None, "non-finite latency"))
        del input_sets
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _case_records(
    case: space.Case, candidates: Sequence[Any], progress: _Progress, *, sku: str
) -> tuple[list[tuner.Record], list[Any], bool]:
    """Records of every candidate at every size point, each point's winner stored (``time_case``'s return value)."""
    records: list[tuner.Record] = []
    written: list[Any] = []
    ok = True
    for point, sizes in enumerate(case.sizes):
        latencies: dict[int, float | None] = {}
        errors: dict[int, str | None] = {}
        for i in range(len(candidates)):
            latency, error = None, progress.checks.get(i, "not checked")
            if error is None:
                latency, error = progress.times.get((point, i), (None, "not timed"))
            latencies[i], errors[i] = latency, error
        point_records, path = tuner.select_and_store(case, candidates, sizes, latencies, errors, sku=sku)
        records.extend(point_records)
        if path is None:
            ok = False
        elif path not in written:
            written.append(path)
    return records, written, ok


def _untimed_records(case: space.Case, candidates: Sequence[Any]) -> tuple[list[tuner.Record], list[Any], bool]:
    """The result of a case whose kernel has no runner: compiled, not timed, not a failure."""
    logger.warning("%s: no GPU runner yet; compiled but not timed", case.kernel)
    records = [
        tuner._record(c.job, c.compiled, dict(case.static), error="not timed: no GPU runner for this kernel")
        for c in candidates
    ]
    return records, [], True


def time_case(
    case: space.Case,
    candidates: Sequence[Any],
    options: tuner.TuneOptions,
    *,
    sku: str,
    device: torch.device,
    runner: Runner | None = None,
    measure: Callable[..., float] | None = None,
) -> tuple[list[tuner.Record], list[Any], bool]:
    """Check every candidate of ``case`` at its ``check_sizes``, time the correct ones at each size point, store
    each size point's winner, all in this process (the in-process mode: tests with fake runners, debugging; a
    candidate that crashes the process or hangs takes the run with it, see :class:`GpuTimer` for the isolated mode).

    Args:
        candidates: compiled survivors of the case (``tuner._Candidate``: ``.job``, ``.compiled``), default first.
        runner: defaults to :func:`runner_for` ``(case.kernel)``.
        measure: ``measure(call, input_sets, warmup=, reps=) -> median ms``; default CUDA events
            (:func:`autotune.tuner.median_latency_ms`).

    Returns:
        ``(records, cache files written, ok)``; ``ok`` is false when some size point has no valid candidate.
    """
    runner = runner or runner_for(case.kernel)
    if runner is None:
        return _untimed_records(case, candidates)
    progress = _Progress(len(candidates), len(case.sizes))

    def report(message: _Step | _Result) -> None:
        if isinstance(message, _Result):
            progress.add(message)

    try:
        _run_case(
            case, candidates, options, device=device, runner=runner, measure=measure or tuner.median_latency_ms,
            progress=progress, report=report,
        )  # fmt: skip
    except _ContextLost as exc:
        reason = f"not run: {exc} (only the isolated mode can go on after that)"
        logger.error("%s: %s", case.kernel, reason)
        progress.fail(None, reason)
    return _case_records(case, candidates, progress, sku=sku)


# ----------------------------------------------------------------------------------------------------------------------
# The isolated mode: the GPU phase in a worker process
# ----------------------------------------------------------------------------------------------------------------------
# Importing torch and TileLang and creating a CUDA context, before the first step: slow on a loaded host, and not any
# candidate's fault, so it has its own, larger limit.
WORKER_STARTUP_TIMEOUT_S = 300.0
# How long a worker asked to stop may take before it is killed.
_STOP_GRACE_S = 10.0
# The exit status of a worker whose CUDA context broke (its last result was reported; a fresh worker goes on).
EXIT_CONTEXT_LOST = 3


@dataclass
class _CaseJob:
    """What the parent sends the worker for one case (pickled: every callable must be importable by name)."""

    case: space.Case
    candidates: list[Any]
    options: tuner.TuneOptions
    runner: Runner
    measure: Callable[..., float]
    progress: _Progress


def _worker_main(conn: Connection, device: torch.device, log_level: int) -> None:
    """The GPU worker process: run the case jobs received on ``conn`` until it receives ``None`` or closes."""
    # Its own process group, so that the parent can kill it together with anything it started (an nvcc run when a
    # kernel misses TileLang's cache) without touching the parent's group.
    os.setpgrp()
    # A fault prints this process's Python stack to stderr (the run's log) before the parent reports the death.
    faulthandler.enable()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [gpu worker]: %(message)s")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        if device.type == "cuda":  # the real runners load kernels through TileLang; fake CPU runners do not need it
            tuner.set_tilelang_log_level(job.options.tilelang_log_level)

        def report(message: _Step | _Result, job: _CaseJob = job) -> None:
            if isinstance(message, _Result):
                job.progress.add(message)
            conn.send(message)  # synchronous: a message sent is the parent's even if this process dies next

        try:
            _run_case(
                job.case, job.candidates, job.options, device=device, runner=job.runner, measure=job.measure,
                progress=job.progress, report=report,
            )  # fmt: skip
        except _ContextLost as exc:
            logger.error("%s: %s; a fresh worker takes the rest", job.case.kernel, exc)
            # os._exit: the interpreter's exit handlers would call into the broken context and could hang.
            os._exit(EXIT_CONTEXT_LOST)
        conn.send(_CaseDone())


def _kill_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL ``process`` and, when it leads its own process group (the worker makes one first thing), the group.

    Call it before ``process`` is reaped (``join``, ``exitcode``, ``is_alive``): until then its pid, and so the group
    id, cannot belong to anyone else."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
            return
    except OSError:  # already gone
        pass
    process.kill()  # it died or was killed before making its group: only the process itself


def _exit_text(exitcode: int | None) -> str:
    """How a worker ended, for a candidate's error, e.g. ``GPU worker process died with signal 11 (SIGSEGV)``."""
    if exitcode == EXIT_CONTEXT_LOST:
        return "GPU worker process exited because its CUDA context broke"
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"GPU worker process died with signal {-exitcode}{name}"
    return f"GPU worker process exited with code {exitcode}"


class _Worker:
    """One GPU worker process (spawned: it must not inherit the parent's CUDA context) and the parent's pipe end."""

    def __init__(self, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        # daemon: a worker the parent forgot to close is ended when the parent exits rather than waited for.
        self.process = context.Process(
            target=_worker_main,
            args=(child_conn, device, logging.getLogger().getEffectiveLevel()),
            name="dsa-tune-gpu-worker",
            daemon=True,
        )
        self.process.start()
        # Only the worker holds the sending end now, so its death reads as end-of-file here.
        child_conn.close()

    def stop(self, *, kill: bool) -> int | None:
        """End the worker, at once with ``kill`` (a hung or dead one), else by asking it first; returns its exit
        code (negative: the signal that ended it)."""
        if not kill:
            try:
                self.conn.send(None)
            except OSError:  # already gone
                pass
            # Wait on the sentinel, not join: the process must stay unreaped for _kill_group.
            kill = not multiprocessing.connection.wait([self.process.sentinel], timeout=_STOP_GRACE_S)
        if kill:
            _kill_group(self.process)
        self.process.join(timeout=_STOP_GRACE_S)
        self.conn.close()
        if self.process.exitcode is None:  # stuck in the driver past SIGKILL: nothing more to do from here
            logger.warning("GPU worker process %d did not end after SIGKILL; left behind", self.process.pid)
        return self.process.exitcode


def _describe(step: _Step | None, case: space.Case, candidates: Sequence[Any]) -> str:
    """The step for a failure message: ``checking candidate {...} at {...}``."""
    if step is None:
        return "outside any candidate (starting up or between steps)"
    if step.action == "reference":
        return f"computing the reference at {case.check_sizes}"
    if step.action == "inputs" and step.point is not None:
        return f"making inputs at {case.sizes[step.point]}"
    if step.candidate is not None:
        config = candidates[step.candidate].job.config_json
        if step.action == "check":
            return f"checking candidate {config} at {case.check_sizes}"
        if step.point is not None:
            return f"timing candidate {config} at {case.sizes[step.point]}"
    return f"step {step}"


class GpuTimer:
    """The ``timer`` of :func:`autotune.tuner.tune` for one CUDA device (see the module docstring).

    With ``options.isolate`` (the default) the check and timing steps run in a worker process that this timer keeps
    across cases; without it they run in this process (:func:`time_case`). Close it (or use it as a context manager)
    to end the worker.

    Args:
        sku: SKU id the winners are stored under.
        device: the CUDA device; default the current one.
        runner: fixed runner for every case (tests); default :func:`runner_for` ``(case.kernel)``. In the isolated
            mode its callables must be importable by name (the worker is spawned).
        measure: as for :func:`time_case`; same rule.
    """

    def __init__(
        self,
        *,
        sku: str,
        device: torch.device | None = None,
        runner: Runner | None = None,
        measure: Callable[..., float] | None = None,
    ) -> None:
        self.sku = sku
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.runner = runner
        self.measure = measure
        self._worker: _Worker | None = None

    def __call__(
        self, case: space.Case, candidates: Sequence[Any], options: tuner.TuneOptions
    ) -> tuple[list[tuner.Record], list[Any], bool]:
        """Check and time ``candidates`` of ``case``: ``(records, cache files written, ok)`` as :func:`time_case`."""
        if not options.isolate:
            return time_case(
                case, candidates, options, sku=self.sku, device=self.device, runner=self.runner, measure=self.measure
            )
        runner = self.runner or runner_for(case.kernel)
        if runner is None:
            return _untimed_records(case, candidates)
        timeout_s = options.candidate_timeout_s or env.tune_candidate_timeout_s()
        progress = _Progress(len(candidates), len(case.sizes))
        job = _CaseJob(case, list(candidates), options, runner, self.measure or tuner.median_latency_ms, progress)
        # Each round adds at least one result or failure (or finishes the case), so this ends.
        while not progress.finished():
            self._run_in_worker(job, timeout_s)
        return _case_records(case, candidates, progress, sku=self.sku)

    def _run_in_worker(self, job: _CaseJob, timeout_s: float) -> None:
        """Send ``job`` to the worker (starting one when there is none) and add what it reports to ``job.progress``
        until it finishes the case, dies or stops reporting for ``timeout_s``; then the step in progress is recorded
        as failed and the worker is dropped (the next round starts a fresh one)."""
        if self._worker is not None and not self._worker.process.is_alive():
            # Ended while idle (e.g. the out-of-memory killer): not the fault of the case about to be sent.
            logger.warning("%s while idle; starting a fresh one", _exit_text(self._worker.process.exitcode))
            self._drop(kill=False)
        fresh = self._worker is None
        if self._worker is None:
            self._worker = _Worker(self.device)
        worker = self._worker
        try:
            worker.conn.send(job)
        except OSError:  # a worker that died at start-up: found below
            pass
        limit = WORKER_STARTUP_TIMEOUT_S if fresh else timeout_s
        deadline = time.monotonic() + limit
        step: _Step | None = None  # the step in progress; None before the first and between steps
        results = 0
        while True:
            ready = multiprocessing.connection.wait(
                [worker.conn, worker.process.sentinel], timeout=max(0.0, deadline - time.monotonic())
            )
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # the worker is dead: below
                    message = None
                if isinstance(message, _CaseDone):
                    if not job.progress.finished():  # only a broken worker does this: never send the job again
                        job.progress.fail(None, "the GPU worker ended the case without a result for this candidate")
                    return
                if isinstance(message, (_Step, _Result)):
                    if isinstance(message, _Result):
                        job.progress.add(message)
                        results += 1
                        step = None
                    else:
                        step = message
                    limit = timeout_s
                    deadline = time.monotonic() + limit
                    continue
            # Nothing within the limit, or the worker is dead (end of file, or its sentinel with nothing to read).
            what = _describe(step, job.case, job.candidates)
            if ready:
                reason = f"{_exit_text(self._drop(kill=True))} while {what}"
            else:
                self._drop(kill=True)
                reason = f"no result after {limit:g} s while {what}: killed"
            if step is None and results:
                # Ended between steps after reporting (e.g. a broken CUDA context after a failed step): nothing is
                # lost, a fresh worker takes the rest.
                logger.warning("%s: %s; starting a fresh GPU worker", job.case.kernel, reason)
            else:
                logger.error("%s: %s", job.case.kernel, reason)
                job.progress.fail(step, reason)
            return

    def _drop(self, *, kill: bool) -> int | None:
        """Stop and forget the worker; returns its exit code."""
        worker, self._worker = self._worker, None
        return None if worker is None else worker.stop(kill=kill)

    def close(self) -> None:
        """End the worker, if any (asked first, killed after a grace period)."""
        self._drop(kill=False)

    def __enter__(self) -> GpuTimer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_timer(*, sku: str, device: torch.device | None = None) -> GpuTimer:
    """The ``timer`` argument of :func:`autotune.tuner.tune` for the current CUDA device (close it when done)."""
    return GpuTimer(sku=sku, device=device)


__all__ = [
    "GpuTimer",
    "Runner",
    "causal_random_indices",
    "causal_scores",
    "compare_tensor",
    "make_timer",
    "register_runner",
    "runner_for",
    "time_case",
    "topk_set_error",
]

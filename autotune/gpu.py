"""The GPU phase of the tuner: check candidates against ``dsa.reference`` and time them with CUDA events.

UNVERIFIED ON A GPU: this module was written on a machine without one. The selection logic (:func:`time_case` with
a fake runner and a fake clock) is unit-tested on the CPU; the per-kernel runners below have not run on CUDA yet.

A :class:`Runner` knows, for one kernel, how to make random inputs of a size point, how to run the kernel on them
with a given config, what ``dsa.reference`` returns for them, and how to compare. Kernels run through their launchers
in ``dsa.launch`` with the launcher's ``config=`` override, i.e. exactly the call path of the ops (for the backward
that includes its small preprocess and postprocess kernels). A kernel whose launcher does not exist yet is called
directly with the argument list its ``build`` docstring documents.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autotune import space, tuner

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
# The timer used by tuner.tune
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
    each size point's winner.

    Args:
        candidates: compiled survivors of the case (``tuner._Candidate``: ``.job``, ``.compiled``), default first.
        runner: defaults to :func:`runner_for` ``(case.kernel)``.
        measure: ``measure(call, input_sets, warmup=, reps=) -> median ms``; default CUDA events
            (:func:`autotune.tuner.median_latency_ms`).

    Returns:
        ``(records, cache files written, ok)``; ``ok`` is false when some size point has no valid candidate.
    """
    runner = runner or runner_for(case.kernel)
    measure = measure or tuner.median_latency_ms
    if runner is None:
        logger.warning("%s: no GPU runner yet; compiled but not timed", case.kernel)
        records = [
            tuner._record(c.job, c.compiled, dict(case.static), error="not timed: no GPU runner for this kernel")
            for c in candidates
        ]
        return records, [], True
    get_kernel = runner.get_kernel or _checked_config
    prepared: dict[int, Any] = {}
    errors: dict[int, str | None] = {}
    # 1. correctness at the small check size: a wrong candidate never wins, however fast.
    try:
        check_inputs = runner.make_inputs(case.static, case.check_sizes, device, SEED)
        expected = runner.reference(case.static, check_inputs)
    except Exception as exc:  # noqa: BLE001 - without a reference nothing may win; report and go on
        reason = f"reference failed at {case.check_sizes}: {tuner._short_error(exc)}"
        check_inputs, expected = None, None
        errors = {i: reason for i in range(len(candidates))}
    for i, cand in enumerate(candidates):
        if errors.get(i) is not None:
            continue
        try:
            prepared[i] = get_kernel(case.kernel, case.static, cand.job.config)
            got = runner.launch(prepared[i], case.static, check_inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            errors[i] = runner.compare(got, expected)
            if errors[i] is not None:
                errors[i] = f"wrong result at {case.check_sizes}: {errors[i]}"
        except Exception as exc:  # noqa: BLE001 - a crashing candidate is rejected, the others still run
            errors[i] = f"failed at {case.check_sizes}: {tuner._short_error(exc)}"
    del check_inputs, expected

    records: list[tuner.Record] = []
    written: list[Any] = []
    ok = True
    # 2. timing per size point, inputs rotated.
    for sizes in case.sizes:
        latencies: dict[int, float | None] = {}
        point_errors = dict(errors)
        input_sets: list[Inputs] = []
        if any(point_errors.get(i) is None for i in range(len(candidates))):
            try:
                input_sets = _input_sets(runner, case.static, sizes, device)
            except Exception as exc:  # noqa: BLE001 - typically out of memory at the largest sizes
                reason = f"no inputs at {sizes}: {tuner._short_error(exc)}"
                point_errors = {i: point_errors.get(i) or reason for i in range(len(candidates))}
        for i in range(len(candidates)):
            if point_errors.get(i) is not None or not input_sets:
                latencies[i] = None
                continue
            try:
                latencies[i] = measure(
                    lambda inputs, ready=prepared[i]: runner.launch(ready, case.static, inputs),
                    input_sets,
                    warmup=options.warmup,
                    reps=options.reps,
                )
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for this tile at this size
                latencies[i] = None
                point_errors[i] = f"failed at {sizes}: {tuner._short_error(exc)}"
            if latencies[i] is not None and not math.isfinite(latencies[i]):
                latencies[i], point_errors[i] = None, "non-finite latency"
        del input_sets
        point_records, path = tuner.select_and_store(case, candidates, sizes, latencies, point_errors, sku=sku)
        records.extend(point_records)
        if path is None:
            ok = False
        elif path not in written:
            written.append(path)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records, written, ok


def make_timer(*, sku: str, device: torch.device | None = None) -> Callable[..., Any]:
    """The ``timer`` argument of :func:`autotune.tuner.tune` for the current CUDA device."""
    dev = device or torch.device("cuda", torch.cuda.current_device())

    def timer(case: space.Case, candidates: Sequence[Any], options: tuner.TuneOptions) -> Any:
        return time_case(case, candidates, options, sku=sku, device=dev)

    return timer


__all__ = [
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

"""How to exercise each kernel: its inputs, its launch with a given config, its reference, and the comparison.

One :class:`Runner` per kernel name of :data:`autotune.lookup.space.KERNEL_NAMES`, shared by the tuner's GPU phase
(every candidate is checked against the reference before it may be timed) and the benchmark (its ``dsa`` check): the
measurement package's one description of a tuner kernel's problem, which is why it lives here, below the tuner. Inputs
come from the makers of ``dsa.testing`` (the same ones the property tests draw from), comparisons from
``dsa.testing.compare`` (NaN/inf positions, per-output tolerances, and the scale-sensitive difference, so a candidate
with a 2 % scale error is rejected), and kernels run through their launchers in ``dsa.launch`` with the launcher's
``config=`` override, i.e. exactly the call path of the ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsa import reference, testing
from dsa.launch import index_topk, indexer, sparse_mla_bwd, sparse_mla_fwd, topk

__all__ = ["SEED", "Runner", "register_runner", "runner_for"]

Inputs = dict[str, Any]
Outputs = tuple[Any, ...]
SEED = 20251201
# Tuner-level tolerances (the test suite holds the kernels to stricter ones): bf16 outputs carry about 3 significant
# digits; P and dS enter the MMAs as bf16 on CUDA. The scale-sensitive difference (testing.DEFAULT_MAX_DIFF) is what
# rejects a kernel that is off by a constant factor these elementwise bounds would forgive.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
LSE_TOL = {"atol": 1e-2, "rtol": 1e-3}
SCORE_RTOL = 2e-2
SCORE_ATOL_SHARE = 1e-3
"""Indexer scores: absolute tolerance as a share of the largest |score| (a score may cancel to far below its
terms, and float32 accumulation error scales with the terms)."""
CHECK_ROWS = 64
"""Queries a narrowed check keeps (the benchmark checks a slice of its large problems)."""
CHECK_BATCHES = 4


@dataclass(frozen=True)
class Runner:
    """How to exercise one kernel.

    Attributes:
        make_inputs: ``(static, sizes, device, seed) -> inputs`` with random, non-zero data.
        launch: ``(config, static, inputs) -> outputs``; ``config`` is the kernel module's checked ``Config`` (or
            ``None``: the launcher's own choice).
        reference: ``(static, inputs) -> expected``, what ``compare`` takes.
        compare: ``(outputs, expected) -> None`` or the reason the outputs are wrong.
        narrow: ``(inputs, outputs) -> (inputs, outputs or None)``: a slice of the queries small enough for the
            reference (``None`` outputs: launch again on the narrowed inputs, for outputs that sum over queries).
        get_kernel: ``(kernel name, static, config dict) -> config`` handed to ``launch``; ``None``: the module's
            checked ``Config`` (tests substitute a fake).
    """

    make_inputs: Callable[[dict[str, Any], dict[str, int], torch.device, int], Inputs]
    launch: Callable[[Any, dict[str, Any], Inputs], Outputs]
    reference: Callable[[dict[str, Any], Inputs], Any]
    compare: Callable[[Outputs, Any], str | None]
    narrow: Callable[[Inputs, Outputs], tuple[Inputs, Outputs | None]] | None = None
    get_kernel: Callable[[str, dict[str, Any], dict[str, Any]], Any] | None = None


def _first_of_each(compared: list[str | None]) -> str | None:
    return next((problem for problem in compared if problem is not None), None)


# ----------------------------------------------------------------------------------------------------------------------
# indexer
# ----------------------------------------------------------------------------------------------------------------------
def _indexer_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.indexer_inputs(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        dim=static["dim"], dtype=static["dtype"], mode=static["mode"], range_kind="packed", seed=seed, device=device,
        weight_scale=(static["heads"] * static["dim"]) ** -0.5,
    )  # fmt: skip


def _indexer_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (inputs["q"], inputs["k"], inputs["weights"]), {k: inputs[k] for k in ("k_scale", "starts", "ends")}


def _indexer_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    args, kwargs = _indexer_args(inputs)
    return (indexer.index_scores(*args, **kwargs, config=config),)


def _indexer_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    args, kwargs = _indexer_args(inputs)
    return (reference.index_scores(*args, **kwargs),)


def _indexer_compare(out: Outputs, expected: Any) -> str | None:
    finite = torch.isfinite(expected[0])
    scale = float(expected[0][finite].abs().max()) if finite.any() else 1.0
    return testing.compare(
        out[0], expected[0], atol=SCORE_ATOL_SHARE * max(scale, 1e-6), rtol=SCORE_RTOL, name="scores"
    )


def _indexer_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    # The last queries: bottom-right causality aligns them with the last keys in the narrowed problem too, so each
    # sees exactly the keys it saw in the full one.
    seq = inputs["q"].shape[1]
    rows = slice(max(0, seq - CHECK_ROWS), seq)
    narrowed = dict(inputs)
    for name in ("q", "weights", "starts", "ends"):
        if narrowed[name] is not None:
            narrowed[name] = narrowed[name][:, rows].contiguous()
    return narrowed, (out[0][:, rows],)


# ----------------------------------------------------------------------------------------------------------------------
# topk
# ----------------------------------------------------------------------------------------------------------------------
def _topk_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    scores = testing.causal_scores(sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"], seed=seed, device=device)
    return {"scores": scores, "k": static["k"]}


def _topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return (topk.topk_indices(inputs["scores"], inputs["k"], config=config),)


def _topk_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    # The contract itself is the reference: the check needs the scores, not another selection.
    return inputs["scores"], inputs["k"]


def _topk_compare(out: Outputs, expected: Any) -> str | None:
    scores, k = expected
    return testing.topk_error(scores, out[0], k)


def _topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    rows = slice(0, CHECK_ROWS)
    return {**inputs, "scores": inputs["scores"][:, rows]}, (out[0][:, rows],)


# ----------------------------------------------------------------------------------------------------------------------
# sparse_mla_fwd / sparse_mla_bwd
# ----------------------------------------------------------------------------------------------------------------------
def _mla_sizes(static: dict[str, Any], sizes: dict[str, int], seed: int) -> dict[str, Any]:
    # sparse_mla_fwd takes k at run time (a size); sparse_mla_bwd compiles it in (a static parameter).
    return dict(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        d_qk=static["d_qk"], d_v=static["d_v"], topk=int(sizes.get("topk", static.get("topk", 0))), seed=seed,
        sm_scale=static["d_qk"] ** -0.5, has_topk_length=static["has_topk_length"], has_sink=static["has_sink"],
    )  # fmt: skip


def _fwd_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.sparse_mla_inputs(**_mla_sizes(static, sizes, seed), device=device)


def _mla_kwargs(inputs: Inputs) -> dict[str, Any]:
    return {k: inputs[k] for k in ("sm_scale", "d_v", "topk_length", "attn_sink")}


def _fwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_fwd.sparse_mla_fwd(inputs["q"], inputs["kv"], inputs["indices"], **_mla_kwargs(inputs), config=config)


def _fwd_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    return reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], **_mla_kwargs(inputs))


def _fwd_compare(out: Outputs, expected: Any) -> str | None:
    return _first_of_each([
        testing.compare(out[0], expected[0], **BF16_TOL, name="out"),
        testing.compare(out[1], expected[1], **LSE_TOL, max_diff=None, name="lse"),
    ])  # fmt: skip


def _rows_of(inputs: Inputs, names: tuple[str, ...]) -> Inputs:
    batches, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
    narrowed = dict(inputs)
    for name in names:
        if narrowed.get(name) is not None:
            narrowed[name] = narrowed[name][batches, rows].contiguous()
    narrowed["kv"] = inputs["kv"][batches].contiguous()
    return narrowed


def _fwd_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    batches, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
    return _rows_of(inputs, ("q", "indices", "topk_length")), (out[0][batches, rows], out[1][batches, rows])


def _bwd_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.sparse_mla_bwd_inputs(**_mla_sizes(static, sizes, seed), device=device)


def _bwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_bwd.sparse_mla_bwd(
        inputs["q"], inputs["kv"], inputs["out"], inputs["lse"], inputs["d_out"], inputs["indices"],
        **_mla_kwargs(inputs), config=config,
    )  # fmt: skip


def _bwd_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    with torch.enable_grad():  # callers may check under no_grad (the benchmark does)
        q = inputs["q"].float().requires_grad_(True)
        kv = inputs["kv"].float().requires_grad_(True)
        out, _ = reference.sparse_mla(q, kv, inputs["indices"], **_mla_kwargs(inputs))
        out.backward(inputs["d_out"].float())
    return q.grad, kv.grad


def _bwd_compare(out: Outputs, expected: Any) -> str | None:
    def tolerance(t: torch.Tensor) -> dict[str, float]:
        return {"atol": BF16_TOL["atol"] * max(float(t.abs().max()), 1e-6), "rtol": BF16_TOL["rtol"]}

    return _first_of_each([
        testing.compare(out[0], expected[0], **tolerance(expected[0]), name="dq"),
        testing.compare(out[1], expected[1], **tolerance(expected[1]), name="dkv"),
    ])  # fmt: skip


def _bwd_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, None]:
    # dkv sums over every query: the kernel runs again on the narrowed problem itself.
    return _rows_of(inputs, ("q", "indices", "topk_length", "out", "lse", "d_out")), None


# ----------------------------------------------------------------------------------------------------------------------
# index_topk (the fused selection)
# ----------------------------------------------------------------------------------------------------------------------
def _index_topk_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    # Integer-valued: every implementation computes the scores exactly, so the selection is compared exactly.
    inputs = testing.indexer_inputs(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        dim=static["dim"], dtype=static["dtype"], mode=static["mode"], range_kind="packed", seed=seed, device=device,
        integer_valued=True,
    )  # fmt: skip
    return {**inputs, "topk": static["topk"]}


def _index_topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    args, kwargs = _indexer_args(inputs)
    return index_topk.index_topk(*args, inputs["topk"], **kwargs, config=config)


def _index_topk_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    # The check needs every score of the checked rows (the contract is stated on them), not another selection.
    args, kwargs = _indexer_args(inputs)
    return reference.index_scores(*args, **kwargs), inputs["topk"]


def _index_topk_compare(out: Outputs, expected: Any) -> str | None:
    scores, topk_ = expected
    problem = testing.topk_error(scores, out[0], topk_)
    if problem is not None:
        return problem
    if not torch.equal(out[1].cpu(), reference.gather_scores(scores, out[0]).cpu().to(out[1].dtype)):
        return "scores: not the exact index scores at the selected positions"
    return None


def _index_topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    narrowed, (indices,) = _indexer_narrow(inputs, (out[0],))
    seq = inputs["q"].shape[1]
    return narrowed, (indices, out[1][:, max(0, seq - CHECK_ROWS) : seq])


_RUNNERS: dict[str, Runner] = {
    indexer.KERNEL_NAME: Runner(_indexer_inputs, _indexer_launch, _indexer_reference, _indexer_compare, _indexer_narrow),
    topk.KERNEL_NAME: Runner(_topk_inputs, _topk_launch, _topk_reference, _topk_compare, _topk_narrow),
    index_topk.KERNEL_NAME: Runner(
        _index_topk_inputs, _index_topk_launch, _index_topk_reference, _index_topk_compare, _index_topk_narrow
    ),
    sparse_mla_fwd.KERNEL_NAME: Runner(_fwd_inputs, _fwd_launch, _fwd_reference, _fwd_compare, _fwd_narrow),
    sparse_mla_bwd.KERNEL_NAME: Runner(_bwd_inputs, _bwd_launch, _bwd_reference, _bwd_compare, _bwd_narrow),
}


def register_runner(kernel: str, runner: Runner) -> None:
    """Add or replace the runner of ``kernel`` (tests plug in a fake one)."""
    _RUNNERS[kernel] = runner


def runner_for(kernel: str) -> Runner:
    """The runner of ``kernel``; ``KeyError`` names the known kernels."""
    try:
        return _RUNNERS[kernel]
    except KeyError:
        raise KeyError(f"no runner for kernel {kernel!r}; known: {', '.join(_RUNNERS)}") from None

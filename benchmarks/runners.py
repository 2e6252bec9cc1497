"""How to exercise each kernel: its problem (``benchmarks.problems``), its launch with a given config, and the narrowing
of a large problem to a slice the reference can check.

One :class:`Runner` per kernel name of :data:`autotune.lookup.space.TUNED_KERNEL_NAMES`, shared by the tuner's GPU phase
(every candidate is checked against the reference before it may be timed) and the benchmark (its ``dsa`` check). The
inputs, the reference and the comparison are the kernel's problem description's (``benchmarks.problems.problem_for``:
the same makers as the property tests, comparisons by ``dsa.testing.compare`` with NaN/inf positions, per-output
tolerances and the scale-sensitive difference, so a candidate with a 2 % scale error is rejected); kernels run through
their launchers in ``dsa.launch`` with the launcher's ``config=`` override, i.e. exactly the call path of the ops.
The paged ``index_topk`` cases (a ``page_size`` in the static parameters: the decode selection) launch
``dsa.launch.index_topk.index_topk_paged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import problems
from dsa.launch import index_topk, indexer, sparse_mla_bwd, sparse_mla_decode, sparse_mla_fwd, topk

__all__ = ["SEED", "Runner", "register_runner", "runner_for"]

Inputs = dict[str, Any]
Outputs = tuple[Any, ...]
SEED = 20251201
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


# ----------------------------------------------------------------------------------------------------------------------
# Launches and narrowing (the inputs, reference and comparison are the problems')
# ----------------------------------------------------------------------------------------------------------------------
def _indexer_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    args, kwargs = problems.IndexerProblem.args(inputs)
    return (indexer.index_scores(*args, **kwargs, config=config),)


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


def _topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return (topk.topk_indices(inputs["scores"], inputs["k"], config=config),)


def _topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    rows = slice(0, CHECK_ROWS)
    return {**inputs, "scores": inputs["scores"][:, rows]}, (out[0][:, rows],)


def _fwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    kwargs = problems.SparseMlaProblem.kwargs(inputs)
    return sparse_mla_fwd.sparse_mla_fwd(inputs["q"], inputs["kv"], inputs["indices"], **kwargs, config=config)


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


def _bwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_bwd.sparse_mla_bwd(
        inputs["q"], inputs["kv"], inputs["out"], inputs["lse"], inputs["d_out"], inputs["indices"],
        **problems.SparseMlaProblem.kwargs(inputs), config=config,
    )  # fmt: skip


def _bwd_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, None]:
    # dkv sums over every query: the kernel runs again on the narrowed problem itself.
    return _rows_of(inputs, ("q", "indices", "topk_length", "out", "lse", "d_out")), None


def _index_topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    if "k_cache" in inputs:
        args, kwargs = problems.PagedSelectionProblem.args(inputs)
        return index_topk.index_topk_paged(*args, **kwargs, config=config)
    args, kwargs = problems.IndexerProblem.args(inputs)
    return index_topk.index_topk(*args, inputs["topk"], **kwargs, config=config)


def _index_topk_compare(out: Outputs, expected: Any) -> str | None:
    # The paged reference returns its selection (two tensors), the prefill one the scores and k.
    paged = isinstance(expected[1], torch.Tensor)
    return (problems.PagedSelectionProblem if paged else problems.IndexTopkProblem).compare(out, expected)


def _index_topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    if "k_cache" in inputs:  # the first sequences; the reference reads the keys through their block table rows
        n = CHECK_BATCHES
        narrowed = {k: v[:n] if k in ("q", "weights", "block_table", "ends") else v for k, v in inputs.items()}
        return narrowed, tuple(t[:n] for t in out)
    narrowed, (indices,) = _indexer_narrow(inputs, (out[0],))
    seq = inputs["q"].shape[1]
    return narrowed, (indices, out[1][:, max(0, seq - CHECK_ROWS) : seq])


def _decode_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    kwargs = problems.SparseMlaDecodeProblem.kwargs(inputs)
    return sparse_mla_decode.sparse_mla_decode(inputs["q"], inputs["kv_cache"], inputs["indices"], **kwargs,
                                               config=config)  # fmt: skip


def _decode_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    """The first ``CHECK_BATCHES`` sequences, the cache cut to their pages (the reference reads the whole cache)."""
    n = CHECK_BATCHES
    narrowed = {k: v[:n] if k in ("q", "indices", "block_table", "cache_seqlens") else v for k, v in inputs.items()}
    narrowed["kv_cache"] = inputs["kv_cache"][: int(inputs["block_table"][:n].max()) + 1]
    return narrowed, tuple(t[:n] for t in out)


def _runner(
    kernel: str,
    launch: Callable[[Any, dict[str, Any], Inputs], Outputs],
    narrow: Callable[[Inputs, Outputs], tuple[Inputs, Outputs | None]],
    compare: Callable[[Outputs, Any], str | None] | None = None,
) -> Runner:
    """The runner of ``kernel``: inputs, reference and comparison from its problem description, and ``launch``."""

    def make_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
        return problems.problem_for(kernel, static, sizes).inputs(device, seed)

    def reference(static: dict[str, Any], inputs: Inputs) -> Any:
        return problems.family_for(kernel, static).reference(inputs)

    return Runner(make_inputs, launch, reference, compare or problems.family_for(kernel, {}).compare, narrow)


_RUNNERS: dict[str, Runner] = {
    indexer.KERNEL_NAME: _runner(indexer.KERNEL_NAME, _indexer_launch, _indexer_narrow),
    topk.KERNEL_NAME: _runner(topk.KERNEL_NAME, _topk_launch, _topk_narrow),
    index_topk.KERNEL_NAME: _runner(
        index_topk.KERNEL_NAME, _index_topk_launch, _index_topk_narrow, _index_topk_compare
    ),
    sparse_mla_fwd.KERNEL_NAME: _runner(sparse_mla_fwd.KERNEL_NAME, _fwd_launch, _fwd_narrow),
    sparse_mla_bwd.KERNEL_NAME: _runner(sparse_mla_bwd.KERNEL_NAME, _bwd_launch, _bwd_narrow),
    sparse_mla_decode.KERNEL_NAME: _runner(sparse_mla_decode.KERNEL_NAME, _decode_launch, _decode_narrow),
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

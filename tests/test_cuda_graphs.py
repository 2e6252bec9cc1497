"""Decode selection and attention inside a CUDA graph: what serving engines capture once and replay every step.

At ``B = 1`` the split selection is four launches (sub-ranges, the split kernel, two keyed merge levels) of a few
microseconds each, so a step is only at the hardware's pace when its launches are replayed from a graph. Capture
needs every launch on the capturing stream, no host synchronisation (no value checks that read device memory), no
allocation that a replay would not repeat, and plans that do not change between replays: these tests capture
``dsa.ops.index_topk_decode`` and ``dsa.ops.sparse_mla_decode`` on the kernels, replay them on new inputs copied
into the captured ones, and compare with eager calls (the same sets and scores: ``dsa.testing.same_selection``; the
attention bit for bit, the same kernels on the same inputs).

GPU tier only (nothing here runs without CUDA); the kernels are those of ``tests/test_index_topk_decode_split.py``
and of the V3.2 decode benchmark case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks import problems
from dsa import ops, testing
from tests.test_index_topk_decode import V32, hopper_prebuilt, make_problem  # the paged kernels, built in parallel

REPLAYS = 3
"""New inputs replayed through one captured graph."""


def _captured(cuda_device: torch.device, call: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``call()`` captured into a graph after two eager calls on a side stream (which make its plans and kernels:
    torch's recipe for warming up a capture); the graph and the outputs it writes."""
    side = torch.cuda.Stream(cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    return graph, outputs


def _select(args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    call = dict(args)
    return ops.index_topk_decode(call.pop("q"), call.pop("k_cache"), call.pop("weights"), V32["topk"], **call,
                                 return_scores=True)  # type: ignore[return-value]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(
    ("fmt", "batch", "s_q", "context"),
    [("fp8-pages", 1, 1, 131_072), ("fp8", 1, 2, 65_536), ("fp8", 64, 2, 8_192)],
    ids=["pages-b1-128k-split", "rows-b1-mtp-64k-split", "rows-b64-mtp-8k"],
)
def test_decode_selection_replays_in_a_cuda_graph(
    cuda_device: torch.device, fmt: str, batch: int, s_q: int, context: int
) -> None:  # fmt: skip
    """V3.2 selection (64 x 128 FP8 keys, top-2048) captured once: split at B = 1 (two merge levels at 128K) and
    unsplit at B = 64; each replay on new queries, weights and lengths selects what an eager call selects."""
    args = make_problem(fmt=fmt, seed=5, batch=batch, s_q=s_q, lengths=[context] * batch, heads=V32["heads"],
                        dim=V32["dim"], page_size=V32["page_size"], device=cuda_device)  # fmt: skip
    static = dict(args)
    graph, captured = _captured(cuda_device, lambda: _select(static))
    for replay in range(REPLAYS):
        fresh = make_problem(fmt=fmt, seed=100 + replay, batch=batch, s_q=s_q,
                             lengths=[max(1, context - 97 * (replay + 1) - 13 * b) for b in range(batch)],
                             heads=V32["heads"], dim=V32["dim"], page_size=V32["page_size"], device=cuda_device)
        # The same cache and block table (a serving step appends to them in place); new queries and lengths.
        for name in ("q", "weights", "ends"):
            static[name].copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        want = _select(static)
        error = testing.same_selection((captured[0].clone(), captured[1].clone()), want)
        assert error is None, f"replay {replay}: {error}"


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.parametrize(("batch", "s_q"), [(1, 2), (32, 2)], ids=["b1-mtp-splits", "b32-mtp"])
def test_decode_attention_replays_in_a_cuda_graph(cuda_device: torch.device, batch: int, s_q: int) -> None:
    """V3.2 FP8 decode attention (128 heads, top-2048 over a 16K context) captured once: several splits and a combine
    at B = 1, the launcher's split count at B = 32; each replay on new queries and indices writes exactly what an
    eager call writes."""
    problem = problems.SparseMlaDecodeProblem(batch=batch, s_q=s_q, context=16_384, heads=128, d_qk=576, d_v=512,
                                              d_rope=64, topk=2048, kv_format="fp8", page_size=64)  # fmt: skip
    static = problem.inputs(cuda_device, seed=11)
    kwargs = problems.SparseMlaDecodeProblem.kwargs(static)

    def attend() -> tuple[torch.Tensor, torch.Tensor]:
        return ops.sparse_mla_decode(static["q"], static["kv_cache"], static["indices"], **kwargs)

    graph, captured = _captured(cuda_device, attend)
    for replay in range(REPLAYS):
        fresh = problem.inputs(cuda_device, seed=200 + replay)
        # The same cache; new queries, and indices drawn for another cache of the same shape (valid slots here).
        for name in ("q", "indices"):
            static[name].copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        out, lse = attend()
        assert torch.equal(captured[0], out) and torch.equal(captured[1], lse), f"replay {replay}"

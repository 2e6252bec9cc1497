"""The problem descriptions (``benchmarks.problems``): one per op family, shared by the tests, the tuner's runners and
the benchmark. Each family's inputs are a function of the seed alone, its comparison accepts the reference's own
outputs and rejects a planted error, and the tuner's FLOP count and the benchmark cases' counts are the problem's.
Reference only: nothing here compiles a kernel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autotune.lookup import space
from benchmarks import cases as case_data
from benchmarks import flops, inputs, problems
from dsa import reference

SCALE_ERROR = 1.02
"""A constant factor that loose elementwise bounds forgive and the scale-sensitive difference does not."""

PROBLEMS: dict[str, problems.Problem] = {
    "indexer-fp8-range": problems.IndexerProblem(2, 5, 40, 4, 32, problems.FP8, "range"),
    "topk-causal": problems.TopkProblem(2, 6, 50, 8),
    "topk-ties": problems.TopkProblem(1, 4, 30, 8, "ties"),
    "index_topk-bf16": problems.IndexTopkProblem(2, 5, 40, 4, 32, "bfloat16", topk=8),
    "paged-selection-fp8": problems.PagedSelectionProblem(2, 2, 50, 4, 32, problems.FP8, 8, 16),
    "sparse_mla_fwd": problems.SparseMlaProblem(2, 3, 40, 4, 64, 32, 16, has_topk_length=True, has_sink=True),
    "sparse_mla_bwd": problems.SparseMlaBwdProblem(1, 3, 40, 4, 64, 32, 16, kind="regular"),
    "sparse_mla_decode-fp8": problems.SparseMlaDecodeProblem(2, 2, 48, 4, 128, 64, 64, 8, "fp8", 16),
    "sparse_mla_decode-model1": problems.SparseMlaDecodeProblem(1, 2, 40, 4, 512, 512, 64, 8, "fp8_paged", 64),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        # Compared as bytes: equal NaNs are the same input.
        same_kind = isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return same_kind and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a == b


def _as_out(problem: problems.Problem, i: dict[str, Any]) -> tuple[Any, ...]:
    """What a correct kernel returns for ``i``: the reference's result in the kernel's output form."""
    if isinstance(problem, problems.TopkProblem):
        return (reference.topk_indices(i["scores"], i["k"]),)
    if isinstance(problem, problems.IndexTopkProblem):
        args, kwargs = problems.IndexerProblem.args(i)
        return reference.index_topk(*args, i["topk"], **kwargs, return_scores=True)
    expected = problem.reference(i)
    if isinstance(problem, (problems.SparseMlaProblem, problems.SparseMlaDecodeProblem)) and not isinstance(
        problem, problems.SparseMlaBwdProblem
    ):
        return expected[0].to(torch.bfloat16), expected[1]
    return tuple(expected)


def _planted(out: tuple[Any, ...]) -> tuple[Any, ...]:
    """``out`` with its first output wrong: other rows' indices, or off by :data:`SCALE_ERROR`."""
    first = out[0]
    if first.dtype == torch.int32:
        return (first.roll(1, dims=0 if first.shape[0] > 1 else 1), *out[1:])
    return (first * SCALE_ERROR, *out[1:])


@pytest.mark.parametrize("name", PROBLEMS)
def test_inputs_depend_on_the_seed_alone(name: str) -> None:
    problem = PROBLEMS[name]
    first, again, other = problem.inputs("cpu", 5), problem.inputs("cpu", 5), problem.inputs("cpu", 6)
    assert first.keys() == again.keys()
    assert all(_same(first[k], again[k]) for k in first), "the same seed gave other inputs"
    assert not all(_same(first[k], other[k]) for k in first), "another seed gave the same inputs"


@pytest.mark.parametrize("name", PROBLEMS)
def test_compare_accepts_the_reference_and_rejects_a_planted_error(name: str) -> None:
    problem = PROBLEMS[name]
    i = problem.inputs("cpu", 3)
    expected = problem.reference(i)
    out = _as_out(problem, i)
    assert problem.compare(out, expected) is None
    assert problem.compare(_planted(out), expected) is not None


@pytest.mark.parametrize("name", PROBLEMS)
def test_counts_are_positive(name: str) -> None:
    problem = PROBLEMS[name]
    work = problem.flops()
    assert (work is None) == isinstance(problem, problems.TopkProblem)
    assert (work is None or work > 0) and problem.bytes() > 0


def test_the_tuner_and_the_benchmark_count_what_the_problem_counts() -> None:
    """``flops.call_flops`` (the tuner) and every benchmark case of a kernel family (its ``flops``/``bytes``) are the
    problem's counts; a kernel without a description has none."""
    for case in space.preset_cases("tiny", space.KERNEL_NAMES):
        want = problems.problem_for(case.kernel, case.static, case.check_sizes).flops()
        assert flops.call_flops(case.kernel, case.static, case.check_sizes) == want
    assert flops.call_flops("no_such_kernel", {}, {}) is None
    kinds = ("indexer", "topk", "index_topk", "sparse_mla_fwd", "sparse_mla_bwd", *case_data.DECODE_KINDS)
    for case in case_data.standard_cases(kinds, full=True) + case_data.tiny_cases(kinds):
        problem = problems.problem_for(case.kernel, case.static, case.sizes)
        assert (case.flops, case.bytes) == (problem.flops() or 0.0, problem.bytes()), case.name


def test_a_benchmark_case_takes_its_problems_inputs() -> None:
    case = next(c for c in case_data.tiny_cases(case_data.DECODE_KINDS) if c.kernel == case_data.INDEX_TOPK_DECODE)
    problem = problems.problem_for(case.kernel, case.static, case.sizes)
    assert isinstance(problem, problems.PagedSelectionProblem)
    got, want = inputs.make_inputs(case, torch.device("cpu"), 4), problem.inputs("cpu", 4)
    assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in got)


def test_an_unknown_kernel_has_no_problem() -> None:
    with pytest.raises(KeyError, match="no_such_kernel"):
        problems.family_for("no_such_kernel", {})

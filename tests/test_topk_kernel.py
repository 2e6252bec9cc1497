"""Top-k selector kernel (``tl_kernels.topk`` through ``dsa.launch.topk``) against the ``topk_indices`` contract.

Every check is the contract as a set (``dsa.testing.assert_topk_valid``: no duplicates, every selected score >= every
unselected finite score, ``-1`` padding exactly when a row has fewer than ``k`` finite scores, never a ``-inf``/NaN/
``+inf`` position; together these fix the multiset of selected scores, i.e. the reference's). Outputs are poisoned
before every launch.

Tiers:
- ``cpu_kernel``: the C-target build. It runs the same selection logic as the CUDA kernel (key transform, radix
  rounds, threshold search, candidate buffer and its re-read fallback, tie policy, padding) with serial loops in place
  of the block's threads, so it proves the logic but not the CUDA kernel's barriers and atomics: a small candidate
  buffer (``SMALL_CAPACITY``) forces the fallback path that the default buffer only takes on wide rows.
- ``build``: the default config and every tuning-space config compile for sm_90a at ``k = 2048`` (and the default at
  ``k = 64``) with no register spills and shared memory within the limit; the numbers are logged.
- ``gpu``: the same properties against the CUDA radix kernel, every tuning-space config, rows up to 131,072 wide and
  the adversarial rows that broke public radix top-k kernels. Only this tier proves the CUDA kernel itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from benchmarks import problems
from dsa import reference
from dsa.launch import topk as launch
from dsa.testing import assert_topk_valid
from tests import strategies, support
from tl_kernels import dsl, radix_select
from tl_kernels import topk as kernels

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = kernels.Config().cand_capacity
# Small enough that most threshold bins overflow it (the re-read fallback), large enough that some fit (the buffer).
SMALL_CAPACITY = 16
# (k, cand_capacity) of the C-target kernels, each one compile of a few seconds; shapes vary freely at run time.
CPU_CASES = ((1, DEFAULT_CAPACITY), (48, DEFAULT_CAPACITY), (48, SMALL_CAPACITY))
V32_K = 2048
FLT_MAX = torch.finfo(torch.float32).max
FLT_TINY = torch.finfo(torch.float32).tiny



def check_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """``indices`` satisfies the top-k contract for ``scores`` (hence selects the reference's multiset of scores)."""
    assert_topk_valid(scores.cpu(), indices.cpu(), k)


def run(scores: torch.Tensor, k: int, capacity: int = DEFAULT_CAPACITY, threads: int | None = None) -> torch.Tensor:
    """The launcher with an explicit config (``capacity`` candidate-buffer entries)."""
    config = kernels.Config(cand_capacity=capacity, **({} if threads is None else {"threads": threads}))
    return launch.topk_indices(scores, k, config=config)


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.int32).view(torch.float32)


def adversarial_row(kind: str, width: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[width]`` float32 rows built against radix top-k (beyond ``tests.strategies.SCORE_PATTERNS``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bin_overflow":
        # Every score shares its top 22 key bits: one bin of every round but the last holds the whole row.
        base = torch.tensor(3.0).view(torch.int32)
        return _bits(base + torch.randint(0, 1 << 10, (width,), generator=g))
    if kind == "ties_k_plus_1":
        # The threshold value is shared by k + 1 entries: exactly one must be dropped.
        row = torch.randn(width, generator=g) - 10
        row[torch.randperm(width, generator=g)[: min(width, k + 1)]] = 2.5
        return row
    if kind == "ties_2k_minus_1":
        # Between k and 2k candidates at the threshold (a known failure of a public radix top-k).
        row = torch.randn(width, generator=g) - 10
        row[torch.randperm(width, generator=g)[: min(width, 2 * k - 1)]] = 2.5
        return row
    if kind == "ties_above_and_at":
        # k/2 distinct winners above a tie group of 3k/2: the remaining half must come from the tie group.
        row = torch.randn(width, generator=g) - 10
        perm = torch.randperm(width, generator=g)
        row[perm[: min(width, 2 * k)]] = 2.5
        row[perm[: min(width, k // 2)]] = 7.0 + torch.rand(min(width, k // 2), generator=g)
        return row
    if kind == "signed_zeros":
        # -0.0 and +0.0 are equal scores with different bits (different keys); with a few negatives and positives.
        row = torch.where(torch.rand(width, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        spread = torch.rand(width, generator=g) < 0.1
        return torch.where(spread, torch.randn(width, generator=g), row)
    if kind == "extremes":
        # +-FLT_MAX, the smallest normals and subnormals of both signs, infinities and NaN.
        pool = torch.tensor(
            [FLT_MAX, -FLT_MAX, FLT_TINY, -FLT_TINY, FLT_TINY / 8, -FLT_TINY / 8, 1.0, -1.0,
             float("inf"), float("-inf"), float("nan"), -float("nan")]
        )
        return pool[torch.randint(0, pool.numel(), (width,), generator=g)]
    if kind == "exact_k_finite":
        row = torch.full((width,), float("-inf"))
        row[torch.randperm(width, generator=g)[: min(width, k)]] = torch.randn(min(width, k), generator=g)
        return row
    if kind == "one_finite":
        row = torch.full((width,), float("nan"))
        row[int(torch.randint(0, width, (1,), generator=g))] = -3.0
        return row
    if kind == "all_nan":
        return torch.full((width,), float("nan"))
    if kind == "descending":
        return torch.arange(width, 0, -1, dtype=torch.float32)
    raise ValueError(f"unknown adversarial row {kind!r}")


ADVERSARIAL_KINDS = (
    "bin_overflow",
    "ties_k_plus_1",
    "ties_2k_minus_1",
    "ties_above_and_at",
    "signed_zeros",
    "extremes",
    "exact_k_finite",
    "one_finite",
    "all_nan",
    "descending",
)


def adversarial_batch(width: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[2, len(ADVERSARIAL_KINDS), width]``: every adversarial row kind, twice (different seeds)."""
    rows = [[adversarial_row(kind, width, k, seed + 1000 * b) for kind in ADVERSARIAL_KINDS] for b in range(2)]
    return torch.stack([torch.stack(r) for r in rows]).contiguous()


# --------------------------------------------------------------------------------------------- pure Python checks


def test_tuning_space_is_small_and_valid() -> None:
    """Every tuning-space combination passes ``check_config`` for k = 1..2048 and fits in shared memory."""
    combos = [
        kernels.Config(threads=t, cand_capacity=c)
        for t in kernels.TUNING_SPACE["threads"]
        for c in kernels.TUNING_SPACE["cand_capacity"]
    ]
    assert 2 <= len(combos) <= 8
    for k in (1, 64, V32_K):
        for config in combos:
            kernels.check_config({"k": k, "target": "c"}, config)
            assert kernels.shared_memory_bytes(config) <= dsl.HOPPER_SMEM_BYTES
        assert kernels.default_config({"k": k}) == kernels.Config()


@pytest.mark.parametrize(
    ("static", "config", "reason"),
    [
        ({"k": 0}, kernels.Config(), "k must be a positive int"),
        ({"k": True}, kernels.Config(), "k must be a positive int"),
        ({}, kernels.Config(), "k must be a positive int"),
        ({"k": 8}, kernels.Config(threads=100), "threads must be a multiple of 32"),
        ({"k": 8}, kernels.Config(threads=2048), "threads must be a multiple of 32"),
        ({"k": 8}, kernels.Config(cand_capacity=0), "cand_capacity must be >= 1"),
        ({"k": 8}, kernels.Config(cand_capacity=1 << 15), "shared memory"),
    ],
)
def test_check_config_rejects(static: dict[str, Any], config: kernels.Config, reason: str) -> None:
    """Each invalid combination is rejected for the reason it is invalid (not for another one)."""
    with pytest.raises(ValueError, match=reason):
        kernels.check_config(static, config)


def test_digits_cover_the_key() -> None:
    """The radix rounds fix every key bit exactly once, most significant first."""
    rounds = radix_select.rounds()
    assert rounds[0].match_mask == 0 and rounds[-1].level_mask == radix_select.ALL_ONES and rounds[-1].shift == 0
    for before, after in zip(rounds, rounds[1:]):
        assert after.match_mask == before.level_mask
    for rnd in rounds:
        assert rnd.level_mask == rnd.match_mask | (rnd.digit_mask << rnd.shift)


# ------------------------------------------------------------------------------------------------------- CPU tier


@pytest.mark.cpu_kernel
@given(
    case=st.sampled_from(CPU_CASES),
    **strategies.sizes(batch=2, seq=3, seq_kv=400),
    kind=st.sampled_from(strategies.SCORE_PATTERNS),
    seed=strategies.SEEDS,
)
# Many scores share their high bits: the threshold bin overflows the small buffer (re-read fallback).
@example(case=(48, SMALL_CAPACITY), batch=1, seq=2, seq_kv=400, kind="shared_high_bits", seed=1)
# Between k and 2k entries share the threshold value, with and without the buffer.
@example(case=(48, DEFAULT_CAPACITY), batch=2, seq=2, seq_kv=300, kind="k_boundary", seed=2)
@example(case=(48, SMALL_CAPACITY), batch=2, seq=2, seq_kv=300, kind="k_boundary", seed=3)
# All-equal rows wider than the small buffer; k = 1; k > S_kv; fewer finite than k; NaN and +-inf.
@example(case=(1, DEFAULT_CAPACITY), batch=1, seq=3, seq_kv=257, kind="all_equal", seed=4)
@example(case=(48, SMALL_CAPACITY), batch=1, seq=3, seq_kv=257, kind="all_equal", seed=4)
@example(case=(48, DEFAULT_CAPACITY), batch=1, seq=1, seq_kv=5, kind="random", seed=5)
@example(case=(48, SMALL_CAPACITY), batch=2, seq=3, seq_kv=100, kind="few_finite", seed=6)
@example(case=(48, DEFAULT_CAPACITY), batch=2, seq=3, seq_kv=200, kind="nan", seed=7)
@example(case=(1, DEFAULT_CAPACITY), batch=2, seq=3, seq_kv=50, kind="neg_inf_rows", seed=8)
@example(case=(48, SMALL_CAPACITY), batch=1, seq=2, seq_kv=400, kind="low_bits", seed=9)
def test_cpu_matches_contract(case: tuple[int, int], batch: int, seq: int, seq_kv: int, kind: str, seed: int) -> None:
    """The C-target kernel returns a valid top-k set with the reference's scores for every score pattern.

    This proves the shared selection logic; the CUDA kernel itself is only proven by the ``gpu`` tier.
    """
    k, capacity = case
    problem = problems.TopkProblem(batch, seq, seq_kv, k, kind)
    inputs = problem.inputs("cpu", seed)
    error = problem.compare((run(inputs["scores"], k, capacity),), problem.reference(inputs))
    assert error is None, error


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(
    case=st.sampled_from(CPU_CASES),
    **strategies.sizes(batch=2, seq=3, seq_kv=400),
    kind=st.sampled_from(strategies.SCORE_PATTERNS),
    how=strategies.sprinkles(),
    seed=strategies.SEEDS,
)
# NaN and +inf among many exact ties, the small buffer; -inf and NaN in all-equal rows wider than it.
@example(case=(48, SMALL_CAPACITY), batch=1, seq=2, seq_kv=300, kind="ties",
         how=strategies.Sprinkle(0.1, (strategies.NAN, strategies.POS_INF), False), seed=1)  # fmt: skip
@example(case=(48, SMALL_CAPACITY), batch=1, seq=3, seq_kv=257, kind="all_equal",
         how=strategies.Sprinkle(0.3, strategies.NON_FINITE, False), seed=2)  # fmt: skip
def test_cpu_non_finite_scores_select_the_reference_set(
    case: tuple[int, int], batch: int, seq: int, seq_kv: int, kind: str, how: strategies.Sprinkle, seed: int
) -> None:
    """Every score pattern with NaN, ``+inf`` and ``-inf`` sprinkled in (single entries or whole rows): the C-target
    kernel never selects a non-finite score and returns exactly the reference's set (tie rule included)."""
    k, capacity = case
    scores = strategies.sprinkle(strategies.make_scores(kind, seed, batch, seq, seq_kv, k), how, seed + 1)
    indices = run(scores, k, capacity)
    check_topk(scores, indices, k)
    assert torch.equal(indices.sort(-1).values, reference.topk_indices(scores, k).sort(-1).values)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"k{c[0]}_c{c[1]}")
@pytest.mark.parametrize("width", [1, 2, 47, 48, 49, 95, 96, 97, 300])
def test_cpu_adversarial_rows(case: tuple[int, int], width: int) -> None:
    """Every adversarial row kind, around the ``k`` and ``2k`` boundaries of the row width."""
    k, capacity = case
    scores = adversarial_batch(width, k, seed=width)
    check_topk(scores, run(scores, k, capacity), k)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kind", ["bin_overflow", "ties_2k_minus_1", "ties_above_and_at", "random", "all_equal"])
def test_cpu_v32_k_wide_rows(kind: str) -> None:
    """k = 2048 over rows wider than the default buffer (5000): overflowing bins re-read the row, the rest fit."""
    width = 5000
    if kind in ADVERSARIAL_KINDS:
        scores = torch.stack([adversarial_row(kind, width, V32_K, seed) for seed in range(3)]).view(1, 3, width)
    else:
        scores = strategies.make_scores(kind, 11, 1, 3, width, V32_K)
    check_topk(scores, run(scores.contiguous(), V32_K), V32_K)


@pytest.mark.cpu_kernel
def test_cpu_launcher_default_config_and_speed() -> None:
    """The launcher's own config selection on CPU, and the C-target kernel's speed on 64 x 8192 at k = 2048 (logged)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 1, 8192, generator=g)
    indices = launch.topk_indices(scores, V32_K)  # compiles (or loads from TileLang's disk cache)
    check_topk(scores, indices, V32_K)
    start = time.perf_counter()
    launch.topk_indices(scores, V32_K)
    elapsed = time.perf_counter() - start
    logger.info("C-target top-k, 64 x 8192 rows, k = %d: %.2f ms", V32_K, 1e3 * elapsed)


# The keyed form (candidate lists: scores with their own positions; the split selection's merge) at the merge's k on
# the C target (tests/test_index_topk_decode_split.py runs the same kernel).
KEYED_CPU_K = 16


def keyed_reference(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's answer for candidate rows: the top-``k`` of each row once its columns are put in position
    order (so the tie rule's smaller column is the smaller position), as ``(positions, scores)`` sorted by position
    (``-1``/``-inf`` padding last)."""
    finite = torch.isfinite(scores)
    order = torch.where(finite, positions.long(), torch.iinfo(torch.int64).max).argsort(dim=-1, stable=True)
    ordered = scores.gather(-1, order)
    columns = reference.topk_indices(ordered.contiguous(), k)
    valid = columns >= 0
    safe = columns.clamp_min(0).long()
    picked = torch.where(valid, positions.gather(-1, order.gather(-1, safe)), -1)
    return _by_position(picked, torch.where(valid, ordered.gather(-1, safe), float("-inf")))


def _by_position(positions: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, scores)`` rows sorted by position, ``-1`` padding last."""
    key = torch.where(positions < 0, torch.iinfo(torch.int64).max, positions.long())
    order = key.argsort(dim=-1)
    return positions.gather(-1, order).to(torch.int32), scores.gather(-1, order)


def candidate_positions(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Distinct non-negative positions in no particular column order (drawn from three times the row width), and
    ``-1`` at the non-finite scores' columns, where the kernel must not read them."""
    g = torch.Generator().manual_seed(seed)
    *rows, width = scores.shape
    positions = torch.stack([torch.randperm(3 * width, generator=g)[:width] for _ in range(math.prod(rows))])
    return positions.view(scores.shape).to(torch.int32).masked_fill(~torch.isfinite(scores), -1).contiguous()


def check_keyed(scores: torch.Tensor, positions: torch.Tensor, k: int) -> None:
    """The keyed kernel's positions and scores are the reference's (as sets; each position with its score)."""
    got = launch.topk_of_candidates(scores, positions, k)
    want = keyed_reference(scores.cpu(), positions.cpu(), k)
    got = _by_position(got[0].cpu(), got[1].cpu())
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.cpu_kernel
@strategies.examples(0.5)
@given(
    **strategies.sizes(batch=2, seq=3, seq_kv=300),
    kind=st.sampled_from(strategies.SCORE_PATTERNS),
    seed=strategies.SEEDS,
)
@example(batch=1, seq=2, seq_kv=100, kind="all_equal", seed=1)  # every tie decided by position, not column
@example(batch=2, seq=1, seq_kv=40, kind="k_boundary", seed=2)
def test_cpu_keyed_rows_select_by_position(batch: int, seq: int, seq_kv: int, kind: str, seed: int) -> None:
    """Candidate rows (every score pattern, positions shuffled against the columns, ``-1`` at non-finite scores): the
    keyed kernel selects the contract's top-k in *position* order, ties to the smaller position, and writes each
    selected position with its score."""
    scores = strategies.make_scores(kind, seed, batch, seq, seq_kv, KEYED_CPU_K).contiguous()
    check_keyed(scores, candidate_positions(scores, seed + 1), KEYED_CPU_K)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("width", [1, 15, 16, 17, 33, 300])
def test_cpu_keyed_adversarial_rows(width: int) -> None:
    """Every adversarial row kind around ``k`` and ``2k``, with shuffled positions."""
    scores = adversarial_batch(width, KEYED_CPU_K, seed=width)
    check_keyed(scores, candidate_positions(scores, width), KEYED_CPU_K)


# ----------------------------------------------------------------------------------------------------- build tier

HOPPER_BUILDS: list[tuple[int, kernels.Config]] = [
    (V32_K, kernels.Config(threads=threads, cand_capacity=capacity))
    for threads in kernels.TUNING_SPACE["threads"]
    for capacity in kernels.TUNING_SPACE["cand_capacity"]
] + [(64, kernels.default_config({"k": 64}))]


def test_hopper_builds_include_the_default() -> None:
    assert (V32_K, kernels.default_config({"k": V32_K})) in HOPPER_BUILDS


def _build_id(item: tuple[int, kernels.Config]) -> str:
    k, config = item
    return f"k{k}_t{config.threads}_c{config.cand_capacity}"


KEYED_BUILD = (V32_K, kernels.default_config({"k": V32_K}))
"""The keyed form's sm_90a build: the split selection's merge at V3.2's ``topk``, default config."""

hopper_prebuilt = support.prebuilt_fixture(
    lambda: support.config_builds(
        kernels.build,
        [({"k": k}, config) for k, config in HOPPER_BUILDS] + [({"k": KEYED_BUILD[0], "keyed": True}, KEYED_BUILD[1])],
    )
)


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("item", HOPPER_BUILDS, ids=_build_id)
def test_hopper_build_is_clean(item: tuple[int, kernels.Config]) -> None:
    """No spills, shared memory as estimated and within the limit, no matrix instruction (the selection has no
    GEMM); no atomic evaluated inside a store index."""
    k, config = item
    kernel, report = support.hopper_build(_build_id(item), kernels.build, k=k, **dataclasses.asdict(config))
    assert report.problems() == [] and report.mma == {}, report.ptxas_log
    assert report.smem_bytes <= kernels.shared_memory_bytes(config) + 1024, (report.smem_bytes, config)
    source = kernel.get_kernel_source()
    # An atomic inside an index expression was evaluated several times on sm_90a: results must be bound first.
    assert not re.search(r"\[[^\]\n]*Atomic", source), "an atomic is used inside an index expression"
    assert "AtomicAddRet" in source, "the compaction counters should be atomics that return the previous value"
    assert f"__launch_bounds__({config.threads}" in source
    support.assert_wide_addressing(source)


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
def test_hopper_keyed_build_is_clean() -> None:
    """The keyed form (four arguments: scores, positions, indices, scores out) builds as cleanly as the plain one,
    and reads a candidate's position only where its score is finite (one ``positions`` load per visit)."""
    k, config = KEYED_BUILD
    kernel, report = support.hopper_build(f"keyed_{_build_id(KEYED_BUILD)}", kernels.build, k=k, keyed=True,
                                          **dataclasses.asdict(config))  # fmt: skip
    assert report.problems() == [] and report.mma == {}, report.ptxas_log
    assert report.smem_bytes <= kernels.shared_memory_bytes(config) + 1024, (report.smem_bytes, config)
    source = kernel.get_kernel_source()
    assert "topk_keyed_kernel(" in source and "out_scores[" in source and "positions[" in source
    assert not re.search(r"\[[^\]\n]*Atomic", source), "an atomic is used inside an index expression"
    support.assert_wide_addressing(source)


# ------------------------------------------------------------------------------------------------------- GPU tier

# Rows up to at least 131,072 wide (the longest V3.2 contexts the brief asks for).
LONG_WIDTH = 131_072
# Every kernel the GPU tier compiles is one of HOPPER_BUILDS (the launcher's default at V32_K among them; each an sm_90a
# compile of 5-30 s).
GPU_KERNEL_STATICS: tuple[dict[str, Any], ...] = tuple(
    launch.static_params(k) for k in dict.fromkeys(k for k, _ in HOPPER_BUILDS)
) + (launch.static_params(KEYED_BUILD[0], keyed=True),)
GPU_CONFIGS: tuple[kernels.Config, ...] = tuple(dict.fromkeys(config for _, config in HOPPER_BUILDS))
"""The configs the GPU tests pass explicitly (the others run the launcher's choice, the default on a fresh host)."""
GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {launch.KERNEL_NAME: GPU_KERNEL_STATICS}
"""What the GPU tests compile, by kernel: the one-shot GPU check compiles these (every config of the whole tuning
space) in parallel before it runs the tests (``pytest --collect-only --dsa-gpu-kernels FILE``, tests/conftest.py)."""


@st.composite
def gpu_problems(draw: st.DrawFn) -> tuple[int, kernels.Config, torch.Tensor]:
    k, config = draw(st.sampled_from(HOPPER_BUILDS))
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 4))
    seq_kv = draw(st.sampled_from((1, 7, k - 1, k, k + 1, 2 * k - 1, 2 * k + 1, 5000, 20_000)))
    kind = draw(st.sampled_from(strategies.SCORE_PATTERNS))
    return k, config, strategies.make_scores(kind, draw(strategies.SEEDS), batch, seq, max(1, seq_kv), k)


@pytest.mark.gpu
@given(problem=gpu_problems())
def test_gpu_matches_contract(problem: tuple[int, kernels.Config, torch.Tensor], cuda_device: torch.device) -> None:
    """The CUDA radix kernel, every tuning-space config, every score pattern, widths around k and 2k."""
    k, config, scores = problem
    indices = launch.topk_indices(scores.to(cuda_device), k, config=config)
    torch.cuda.synchronize()
    check_topk(scores, indices, k)


@pytest.mark.gpu
@pytest.mark.parametrize("item", HOPPER_BUILDS, ids=_build_id)
@pytest.mark.parametrize("width", [1, 63, 64, 65, 2047, 2048, 2049, 4095, 4097, 9000])
def test_gpu_adversarial_rows(item: tuple[int, kernels.Config], width: int, cuda_device: torch.device) -> None:
    """Every adversarial row kind on the CUDA kernel: overflowing bins, ties between k and 2k, NaN, signed zeros."""
    k, config = item
    scores = adversarial_batch(width, k, seed=width)
    indices = launch.topk_indices(scores.to(cuda_device), k, config=config)
    torch.cuda.synchronize()
    check_topk(scores, indices, k)


@pytest.mark.gpu
@pytest.mark.parametrize("item", HOPPER_BUILDS[:4], ids=_build_id)
def test_gpu_long_rows(item: tuple[int, kernels.Config], cuda_device: torch.device) -> None:
    """131,072-wide rows: random, every adversarial kind and every score pattern, at k = 2048."""
    k, config = item
    random = torch.randn(1, 2, LONG_WIDTH, generator=torch.Generator().manual_seed(3))
    patterns = torch.cat([strategies.make_scores(kind, 5, 1, 1, LONG_WIDTH, k) for kind in strategies.SCORE_PATTERNS], 1)
    for scores in (random, adversarial_batch(LONG_WIDTH, k, seed=17), patterns):
        indices = launch.topk_indices(scores.contiguous().to(cuda_device), k, config=config)
        torch.cuda.synchronize()
        check_topk(scores, indices, k)


@pytest.mark.gpu
def test_gpu_launcher_default_config(cuda_device: torch.device) -> None:
    """The launcher's own config selection (tuned cache or default) on a V3.2-like causal score block."""
    g = torch.Generator().manual_seed(9)
    seq, seq_kv = 64, 8192
    scores = torch.randn(2, seq, seq_kv, generator=g)
    visible = torch.arange(seq_kv).view(1, -1) <= (torch.arange(seq) + seq_kv - seq).view(-1, 1)
    scores = scores.masked_fill(~visible, float("-inf")).contiguous()
    indices = launch.topk_indices(scores.to(cuda_device), V32_K)
    torch.cuda.synchronize()
    check_topk(scores, indices, V32_K)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1, 2047, 2049, 16_896, LONG_WIDTH])
def test_gpu_keyed_adversarial_rows(width: int, cuda_device: torch.device) -> None:
    """The keyed form at k = 2048 (the split selection's merge; 16,896: a first-level row of its B = 1, 128K case)
    on every adversarial row kind with shuffled positions: the reference's positions and scores."""
    scores = adversarial_batch(width, V32_K, seed=width + 2)
    positions = candidate_positions(scores, width)
    check_keyed(scores.to(cuda_device), positions.to(cuda_device), V32_K)


@pytest.mark.gpu
@pytest.mark.portable
@pytest.mark.parametrize("width", [1, 2047, 2049, 9000, LONG_WIDTH])
def test_gpu_portable_adversarial_rows(width: int, portable_cuda_device: torch.device) -> None:
    """The radix kernel built for this GPU's portable architecture (sm_90 on Hopper: no TMA) with its default config,
    on the adversarial rows at k = 2048."""
    scores = adversarial_batch(width, V32_K, seed=width + 1)
    indices = launch.topk_indices(scores.to(portable_cuda_device), V32_K)
    torch.cuda.synchronize()
    check_topk(scores, indices, V32_K)

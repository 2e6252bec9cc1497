"""Split-K decode selection (``dsa.launch.index_topk_split`` under ``dsa.launch.index_topk.run_paged``): each query's
key range over several thread blocks, merged by the top-k kernel's keyed form, exactly the reference's selection.

The problems are :func:`tests.test_index_topk_decode.make_problem`'s (integer-valued, so every score is exact and the
tie rule decides every tie): random, tied (every score of a row equal), ordered and reversed rows; bf16 keys, FP8 key
rows and FP8 key pages (DeepGEMM's per-page layout); 1-4 queries per sequence; lengths and ranges that are not
multiples of the key block; unallocated pages. The split count is forced to 1..7 on the C target (whose default is
1), and the merge's first-level group count to 1..4 (two levels from 2; the C target's default is one level). The
CPU tier compiles kernels of its own: the keyed ``k = 16`` top-k kernel (both merge levels run it), the sub-range
kernel (``tl_kernels.split_ranges``, about a second each) and, for lists narrower than ``topk``, the key-pages kernel
at 8 entries with 8-key blocks; the other paged kernels are the ones ``tests/test_index_topk_decode.py`` compiles.
Tiers: the rules (pure Python), ``cpu_kernel`` (the sub-ranges, the merge, the whole split launch), ``gpu`` (V3.2
at 128K: the split count and merge levels the rules pick against one launch and the reference).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsa import reference, testing
from dsa.launch import index_topk as launch
from dsa.launch import index_topk_split as split
from dsa.launch import topk as topk_launch
from tests import strategies, support
from tests.test_index_topk_decode import (  # hopper_prebuilt: the GPU tier's paged kernels, built in parallel
    CPU_TOPK, FORMATS, PATTERNS, V32, _assert_same_selection, _paged_draws, _paged_problem, _reference, _spoil_cache,
    hopper_prebuilt, is_fp8, make_problem,
)  # fmt: skip
from tl_kernels import dsl, indexer
from tl_kernels import index_topk as kernels
from tl_kernels import split_ranges as range_kernels

H100_SMS = 132
V32_STATIC = {"heads": V32["heads"], "dim": V32["dim"], "dtype": "float8_e4m3fn", "mode": "range", "topk": V32["topk"],
              "page_size": V32["page_size"], "target": dsl.HOPPER_TARGET}  # fmt: skip


def _v32_tiling() -> tuple[int, int]:
    """``(block_Q, block_N)`` of the V3.2 FP8 paged kernel's default Hopper config."""
    config = kernels.default_config(V32_STATIC)
    return indexer.block_queries(V32["heads"], config.q_rows), config.block_N


# ----------------------------------------------------------------------------------------------- the rule


def test_rule_fills_two_waves_at_one_sequence_of_128k() -> None:
    """V3.2 (FP8, 64 heads, default sm_90a config), B = 1, s_q = 1, a 128K context on 132 SMs: the rule splits each
    query's keys 264 ways, so 264 thread blocks run instead of one, each over 3-4 key blocks."""
    block_Q, block_N = _v32_tiling()
    key_blocks = -(-131_072 // block_N)
    splits = split.num_splits(batch=1, s_q=1, block_Q=block_Q, key_blocks=key_blocks, sms=H100_SMS)
    assert split.launched_blocks(batch=1, s_q=1, block_Q=block_Q, splits=1) == 1
    assert split.launched_blocks(batch=1, s_q=1, block_Q=block_Q, splits=splits) == 264 == split.WAVES * H100_SMS
    assert key_blocks // splits >= split.MIN_KEY_BLOCKS_PER_SPLIT
    # Two MTP queries (one block each at block_Q = 1): half the splits, the same 264 blocks.
    mtp = split.num_splits(batch=1, s_q=2, block_Q=block_Q, key_blocks=key_blocks, sms=H100_SMS)
    assert (mtp, split.launched_blocks(batch=1, s_q=2, block_Q=block_Q, splits=mtp)) == (132, 264)


@pytest.mark.parametrize(
    ("batch", "s_q", "block_Q", "key_blocks", "sms", "want"),
    [
        (1, 1, 1, 1024, None, 1),  # the C target: blocks run one after another
        (128, 2, 1, 1024, 132, 2),  # 256 blocks are under two waves: two splits, 512 blocks
        (128, 2, 2, 1024, 132, 3),  # MTP queries share a block: 128 blocks, three splits
        (300, 1, 1, 1024, 132, 1),  # the batch alone fills two waves
        (1, 1, 1, 9, 132, 4),  # a short context: no split under two key blocks
        (1, 1, 1, 1, 132, 1),
        (1, 3, 2, 1024, 132, 132),  # three queries in two blocks of two (the fourth a padding query)
    ],
)
def test_rule_split_count(batch: int, s_q: int, block_Q: int, key_blocks: int, sms: int | None, want: int) -> None:
    assert split.num_splits(batch=batch, s_q=s_q, block_Q=block_Q, key_blocks=key_blocks, sms=sms) == want


def test_merge_rule_uses_two_levels_at_one_sequence_of_128k() -> None:
    """V3.2 at B = 1, s_q = 1, 128K on 132 SMs: 264 lists of 512 candidates; the merge runs 8 groups of 33 lists
    (rows of 16,896 candidates), then one row of 8 x 2048: the longest rows add up to a quarter of one level's."""
    block_Q, block_N = _v32_tiling()
    key_blocks = -(-131_072 // block_N)
    splits = split.num_splits(batch=1, s_q=1, block_Q=block_Q, key_blocks=key_blocks, sms=H100_SMS)
    width = split.list_width(topk=V32["topk"], splits=splits, key_blocks=key_blocks, block_N=block_N)
    assert (splits, width) == (264, 512)
    groups = split.merge_groups(batch=1, s_q=1, splits=splits, width=width, topk=V32["topk"], sms=H100_SMS)
    assert groups == 8
    rows = split.merge_rows(splits=splits, width=width, topk=V32["topk"], groups=groups)
    assert rows == (33 * 512, 8 * 2048) and 4 * sum(rows) < split.merge_rows(splits=splits, width=width,
                                                                             topk=V32["topk"], groups=1)[0]


def test_list_width_holds_a_sub_range_and_few_widths_serve_a_growing_context() -> None:
    """A list holds every key of its sub-range (at most ``ceil(key_blocks / splits)`` blocks) or ``topk``, rounded up
    to a power of two of key blocks: V3.2 at B = 1 on 132 SMs, every context from one page to 512K (one page at a
    time) compiles at most ``log2(topk / block_N)`` list widths besides ``topk``."""
    block_Q, block_N = _v32_tiling()
    topk = V32["topk"]
    widths = set()
    for pages in range(1, 512 * 1024 // V32["page_size"] + 1):
        key_blocks = -(-pages * V32["page_size"] // block_N)
        splits = split.num_splits(batch=1, s_q=1, block_Q=block_Q, key_blocks=key_blocks, sms=H100_SMS)
        width = split.list_width(topk=topk, splits=splits, key_blocks=key_blocks, block_N=block_N)
        assert width >= min(topk, -(-key_blocks // splits) * block_N)
        blocks = width // block_N
        assert width == topk or (width % block_N == 0 and blocks & (blocks - 1) == 0)
        assert width == topk or width in split.list_widths(topk=topk, block_N=block_N)
        widths.add(width)
    assert widths - {topk} and len(widths - {topk}) <= (topk // block_N).bit_length() - 1, widths
    assert split.list_width(topk=topk, splits=3, key_blocks=0, block_N=block_N) == block_N  # an empty table


def test_a_gpus_first_narrow_list_plans_every_width_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (faked SM count; kernel builds stubbed) the first narrow list of a plan plans every width
    :func:`list_width` can pick, so a growing context never compiles mid-stream; later narrow lists plan only their
    own (a cached plan); the C target, and a caller's one-off config (``warm=False``), plan only what they launch."""
    monkeypatch.setattr(launch.common, "get_kernel", lambda *args, **kwargs: "kernel")
    monkeypatch.setattr(launch.common, "target_for", lambda device: dsl.HOPPER_TARGET)
    monkeypatch.setattr(launch, "_WARMED_LISTS", set())
    planned: list[int] = []
    real = launch.plan_paged

    def spy(q: torch.Tensor, topk: int, **kwargs: Any) -> Any:
        planned.append(topk)
        return real(q, topk, **kwargs)

    monkeypatch.setattr(launch, "plan_paged", spy)
    q = torch.zeros(1, 1, V32["heads"], V32["dim"], dtype=torch.float8_e4m3fn)
    try:  # stub plans on a CPU device key: forgotten afterwards
        wide = real(q, V32["topk"], page_size=V32["page_size"], key_layout="paged")
        monkeypatch.setattr(split, "device_sms", lambda device: None)
        assert launch._list_plan(wide, q, V32["page_size"], 512).topk == 512 and planned == [512]
        monkeypatch.setattr(split, "device_sms", lambda device: H100_SMS)
        planned.clear()
        assert launch._list_plan(wide, q, V32["page_size"], 512, warm=False).topk == 512 and planned == [512]
        planned.clear()
        assert launch._list_plan(wide, q, V32["page_size"], 512).topk == 512
        assert sorted(set(planned)) == [128, 256, 512, 1024] == list(split.list_widths(topk=2048, block_N=128))
        planned.clear()
        assert launch._list_plan(wide, q, V32["page_size"], 256).topk == 256 and planned == [256]
        assert launch._list_plan(wide, q, V32["page_size"], V32["topk"]) is wide
    finally:
        launch._PAGED_PLANS.clear()


@pytest.mark.parametrize(
    ("batch", "s_q", "splits", "width", "sms", "want"),
    [
        (1, 1, 264, 512, None, 1),  # the C target: rows run one after another, a level only adds work
        (1, 2, 132, 1024, 132, 7),  # two MTP queries: 7 groups of 19 lists (19,456 + 14,336 of 135,168)
        (32, 2, 5, 2048, 132, 1),  # 10,240 candidates: two levels would not halve the row
        (1, 1, 128, 256, 132, 4),  # 32K context: 32,768 candidates, exactly 16 x topk: 8,192 + 8,192
        (1, 1, 64, 256, 132, 1),  # 16K context: under 16 x topk
        (200, 1, 264, 512, 132, 1),  # B x s_q rows alone fill the two waves: no room for groups
        (50, 1, 264, 512, 132, 5),  # at most two waves of first-level rows (250 of 264): five groups, not eight
        (4, 1, 66, 2048, 132, 6),  # 6 and 8 groups tie (11 + 6 and 9 + 8 lists of 2048): the fewer
    ],
)
def test_merge_rule_group_count(batch: int, s_q: int, splits: int, width: int, sms: int | None, want: int) -> None:
    got = split.merge_groups(batch=batch, s_q=s_q, splits=splits, width=width, topk=V32["topk"], sms=sms)
    assert got == want
    if want > 1:  # the chosen count is the best one the cap allows, and halves the longest rows' sum
        def path(g: int) -> int:
            return sum(split.merge_rows(splits=splits, width=width, topk=V32["topk"], groups=g))

        allowed = range(2, min(splits, split.WAVES * sms // (batch * s_q)) + 1)
        assert path(want) == min(path(g) for g in allowed)
        assert split.MERGE_GAIN * path(want) <= splits * width


# ----------------------------------------------------------------------------------------------- CPU tier


@pytest.mark.cpu_kernel
@given(
    **strategies.sizes(batch=3, s_q=4),
    splits=st.integers(1, 7),
    block_Q=st.sampled_from([1, 2, 16]),
    block_N=st.sampled_from([1, 4, 64]),
    seq_kv=st.integers(1, 300),
    seed=strategies.SEEDS,
)
def test_expand_partitions_each_range_on_key_block_edges(
    batch: int, s_q: int, splits: int, block_Q: int, block_N: int, seq_kv: int, seed: int
) -> None:
    """The sub-range kernel (``tl_kernels.split_ranges``, C target: one build per ``block_N``, about a second each):
    each query's visible range (clamped to the kernel's keys) is the disjoint union of its sub-ranges, in split
    order, each within one sequence-wide run of key blocks no longer than :func:`list_width`; padding queries and
    empty sub-ranges are ``[0, 0)``; q and weights hold one row per padded query, the real query's (padding: the last
    one's)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(-5, seq_kv + 5, (batch, s_q), generator=g, dtype=torch.int32)
    ends = starts + torch.randint(-5, seq_kv + 5, (batch, s_q), generator=g, dtype=torch.int32)
    q = torch.randn(batch, s_q, 2, 3, generator=g)
    weights = torch.randn(batch, s_q, 2, generator=g)
    v_q, v_w, v_starts, v_ends = split.expand(q, weights, starts, ends, splits=splits, block_Q=block_Q,
                                              block_N=block_N, seq_kv=seq_kv)  # fmt: skip
    s_pad = split.padded_queries(s_q, block_Q)
    assert s_pad % block_Q == 0 and v_starts.shape == v_ends.shape == (batch, splits * s_pad)
    # One row per (padded) query, not per split: the kernel reads virtual query v's row at v % s_pad.
    assert v_q.shape == (batch, s_pad, 2, 3) and v_w.shape == (batch, s_pad, 2)
    assert torch.equal(v_q, q[:, [min(t, s_q - 1) for t in range(s_pad)]])
    assert torch.equal(v_w, weights[:, [min(t, s_q - 1) for t in range(s_pad)]])
    width = split.list_width(topk=10**9, splits=splits, key_blocks=-(-seq_kv // block_N), block_N=block_N)
    for b in range(batch):
        for t in range(s_pad):
            rows = [j * s_pad + t for j in range(splits)]
            covered = [range(int(v_starts[b, r]), int(v_ends[b, r])) for r in rows]
            if t >= s_q:
                assert all(len(c) == 0 for c in covered) and not v_starts[b, rows].any()
                continue
            lo, hi = max(int(starts[b, t]), 0), min(int(ends[b, t]), seq_kv)
            assert [p for c in covered for p in c] == list(range(lo, hi))  # disjoint, in order, complete
            assert all(len(c) <= width for c in covered)
            assert all(c.start == 0 for c in covered if len(c) == 0)
    # The splits' key-block edges are shared by the sequence's queries: a key block belongs to one split.
    for b in range(batch):
        owner: dict[int, int] = {}
        for j in range(splits):
            for t in range(s_q):
                r = j * s_pad + t
                for kb in range(int(v_starts[b, r]) // block_N, -(-int(v_ends[b, r]) // block_N)):
                    assert owner.setdefault(kb, j) == j, f"key block {kb} in splits {owner[kb]} and {j}"


def _sub_range_lists(scores: torch.Tensor, edges: list[int], order_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a split launch leaves for ``scores [B, s_q, L]`` cut at ``edges``: per sub-range its reference top-k
    positions (``-1`` padding) and scores (``-inf`` there), each list in a random order (a GPU block writes its
    list in whatever order its threads win the output slots). ``[B, splits * s_q, topk]`` each, split-major."""
    g = torch.Generator().manual_seed(order_seed)
    positions, picked = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        local = reference.topk_indices(scores[..., lo:hi].contiguous(), CPU_TOPK)
        shuffle = torch.rand(local.shape, generator=g).argsort(dim=-1)
        local = local.gather(-1, shuffle)
        picked.append(scores[..., lo:hi].gather(-1, local.clamp_min(0).long()).masked_fill(local < 0, float("-inf")))
        positions.append(torch.where(local >= 0, local + lo, -1))
    return torch.cat(positions, dim=1).to(torch.int32), torch.cat(picked, dim=1)


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(
    kind=st.sampled_from(testing.SCORE_PATTERNS),
    **strategies.sizes(batch=2, s_q=4),
    length=st.integers(1, 120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    groups=st.integers(1, 4),
    seed=strategies.SEEDS,
)
@example(kind="all_equal", batch=1, s_q=1, length=100, cuts=[10, 40, 41, 90], groups=1, seed=0)
@example(kind="all_equal", batch=2, s_q=3, length=120, cuts=[7, 30, 31, 64, 90, 100], groups=3, seed=1)
@example(kind="all_equal", batch=1, s_q=2, length=50, cuts=[20], groups=4, seed=2)  # more groups than lists
@example(kind="random", batch=1, s_q=2, length=1, cuts=[], groups=2, seed=0)  # a width-1 list: a strided view
def test_merge_of_shuffled_sub_range_lists_is_the_rows_top_k(
    kind: str, batch: int, s_q: int, length: int, cuts: list[int], groups: int, seed: int
) -> None:
    """The merge alone (the top-k kernel at ``k = 16``, in one level or two: 2-4 groups of lists) over lists in
    arbitrary order from arbitrary contiguous sub-ranges (ties, equal rows, NaN and infinities of
    ``dsa.testing.SCORE_PATTERNS``): exactly the row's top-k, ties to the smaller position, whichever sub-ranges and
    groups the tied keys fall in."""
    scores = testing.make_scores(kind, seed, batch, s_q, length, CPU_TOPK)
    edges = sorted({0, length, *(min(c, length) for c in cuts)})
    positions, picked = _sub_range_lists(scores, edges, seed + 1)
    got = split.merge(positions, picked, s_q=s_q, splits=len(edges) - 1, topk=CPU_TOPK, groups=groups)
    want = reference.topk_indices(scores, CPU_TOPK)
    _assert_same_selection(got, (want, scores.gather(-1, want.clamp_min(0).long()).masked_fill(want < 0, -torch.inf)))


def _count_merge_levels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """A list that receives the ``[rows, s_q, columns]`` shape of every keyed top-k launch (one per merge level)
    from now on; the launches still run."""
    shapes: list[tuple[int, ...]] = []
    topk_of_candidates = topk_launch.topk_of_candidates

    def spy(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        shapes.append(tuple(scores.shape))
        return topk_of_candidates(scores, positions, k)

    monkeypatch.setattr(topk_launch, "topk_of_candidates", spy)
    return shapes


@pytest.mark.cpu_kernel
def test_merge_default_takes_the_rules_levels_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """``groups=None``: the merge asks :func:`merge_groups` for the tensors' device; with 132 SMs and 64 lists of 16
    it runs two levels (8 groups: the top-k kernel over ``[B * 8, s_q, 128]``, then ``[B, s_q, 128]``), the row's
    top-k exactly; with ``device_sms`` left to the CPU, one level."""
    scores = testing.make_scores("random", 9, 2, 3, 1024, CPU_TOPK)
    positions, picked = _sub_range_lists(scores, list(range(0, 1025, 16)), 10)
    want = reference.topk_indices(scores, CPU_TOPK)
    want = (want, scores.gather(-1, want.clamp_min(0).long()).masked_fill(want < 0, -torch.inf))
    shapes = _count_merge_levels(monkeypatch)
    _assert_same_selection(split.merge(positions, picked, s_q=3, splits=64, topk=CPU_TOPK), want)
    monkeypatch.setattr(split, "device_sms", lambda device: H100_SMS)
    _assert_same_selection(split.merge(positions, picked, s_q=3, splits=64, topk=CPU_TOPK), want)
    assert shapes == [(2, 3, 1024), (16, 3, 128), (2, 3, 128)]


def _run_split(
    args: dict[str, Any], splits: int | None, topk: int = CPU_TOPK, groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged launcher with ``splits`` forced (``None``: the rule's) and the merge's first-level group count
    forced to ``groups`` (``None``: the rule's)."""
    call = dict(args)
    forced = mock.patch.object(split, "merge_groups", lambda **_: groups) if groups is not None else nullcontext()
    with forced:
        return launch.index_topk_paged(call.pop("q"), call.pop("k_cache"), call.pop("weights"), topk, **call,
                                       splits=splits)  # fmt: skip


@pytest.mark.cpu_kernel
@strategies.examples(0.5)
@given(**_paged_draws(0), pattern=st.sampled_from(PATTERNS), splits=st.integers(1, 7), groups=st.integers(1, 4))
@example(fmt="fp8", batch=2, s_q=2, length=299, ranges="decode", unallocated=True, seed=1, pattern="tied", splits=7,
         groups=3)  # fmt: skip
@example(fmt="bf16", batch=1, s_q=4, length=300, ranges="decode", unallocated=False, seed=2, pattern="ordered",
         splits=5, groups=2)  # fmt: skip
@example(fmt="fp8", batch=3, s_q=3, length=250, ranges="random", unallocated=True, seed=3, pattern="reversed",
         splits=3, groups=4)  # fmt: skip
@example(fmt="bf16", batch=2, s_q=1, length=130, ranges="random", unallocated=False, seed=4, pattern="random",
         splits=2, groups=1)  # fmt: skip
@example(fmt="fp8-pages", batch=2, s_q=3, length=280, ranges="decode", unallocated=True, seed=5, pattern="tied",
         splits=4, groups=2)  # fmt: skip
@example(fmt="bf16", batch=1, s_q=3, length=300, ranges="decode", unallocated=False, seed=6, pattern="tied",
         splits=7, groups=3)  # fmt: skip
def test_cpu_split_selection_matches_reference(
    fmt: str, batch: int, s_q: int, length: int, ranges: str, unallocated: bool, seed: int, pattern: str, splits: int,
    groups: int,
) -> None:  # fmt: skip
    """Forced 1..7 splits (64-key blocks, rows of up to 300 keys: empty, partial and several-block sub-ranges),
    merged in one level or two (1..4 groups of splits, the last groups short or empty): the same sets and scores as
    the reference, ties to the smaller position across and inside sub-ranges and groups."""
    args = _paged_problem(fmt, batch, s_q, length, ranges, unallocated, seed, shortest=0, pattern=pattern)
    _assert_same_selection(_run_split(args, splits, groups=groups), _reference(args, CPU_TOPK))


@pytest.mark.cpu_kernel
@strategies.examples(0.2)
@given(fmt=st.sampled_from(FORMATS), splits=st.integers(2, 7), **strategies.sizes(batch=2, s_q=4),
       length=st.integers(1, 300), seed=strategies.SEEDS, data=st.data())  # fmt: skip
def test_cpu_split_selection_with_non_finite_keys_matches_reference(
    fmt: str, splits: int, batch: int, s_q: int, length: int, seed: int, data: st.DataObject
) -> None:
    """NaN and ``+-inf`` in the cached keys (and FP8 scales): no sub-range lets a non-finite score into the merge,
    and the merged selection is the reference's."""
    args = make_problem(fmt=fmt, seed=seed, batch=batch, s_q=s_q, lengths=[length] * batch, unallocated=True)
    parts = ["keys"] + (["key_scales"] if is_fp8(fmt) else [])
    args["k_cache"] = _spoil_cache(args["k_cache"], fmt, parts, data, seed)
    indices, scores = _run_split(args, splits)
    _assert_same_selection((indices, scores), _reference(args, CPU_TOPK))
    assert torch.isfinite(scores[indices >= 0]).all(), "a non-finite score was selected"


NARROW_BLOCK_N = 8
"""Keys per block of the narrow-list test: a sub-range of one 8-key block fits a list of 8 < ``CPU_TOPK``."""


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(**strategies.sizes(batch=2, s_q=3), length=st.integers(1, 120), extra=st.integers(0, 3),
       pattern=st.sampled_from(PATTERNS), seed=strategies.SEEDS)  # fmt: skip
@example(batch=2, s_q=3, length=120, extra=0, pattern="tied", seed=1)
@example(batch=1, s_q=2, length=7, extra=3, pattern="ordered", seed=2)
def test_cpu_narrow_lists_match_reference(
    monkeypatch: pytest.MonkeyPatch, batch: int, s_q: int, length: int, extra: int, pattern: str, seed: int
) -> None:  # fmt: skip
    """Lists narrower than ``topk``: FP8 key pages in 8-key blocks, split into one key block per sub-range (and up to
    3 empty ones): the split launch runs the kernel compiled for 8 entries (:func:`list_width`), the merge's rows are
    ``splits x 8`` wide, and the selection is the reference's, ties included.

    The wide plan is handed in without a kernel: with splits only its config (the geometry) is used, so this test
    compiles one paged kernel, the 8-entry one."""
    args = _paged_problem("fp8-pages", batch, s_q, length, "decode", True, seed, shortest=0, pattern=pattern)
    q, page_size = args["q"], args["k_cache"].shape[1]
    static = launch.paged_static_params(q, CPU_TOPK, page_size=page_size, key_layout="paged")
    config = dataclasses.replace(kernels.default_config({**static, "target": dsl.CPU_TARGET}), block_N=NARROW_BLOCK_N)
    wide = launch.Plan(dsl.CPU_TARGET, config, None, CPU_TOPK, "paged")
    key_blocks = -(-args["block_table"].shape[1] * page_size // NARROW_BLOCK_N)
    splits = key_blocks + extra
    assert split.list_width(topk=CPU_TOPK, splits=splits, key_blocks=key_blocks, block_N=NARROW_BLOCK_N) == 8
    shapes = _count_merge_levels(monkeypatch)
    call = dict(args)
    got = launch.index_topk_paged(call.pop("q"), call.pop("k_cache"), call.pop("weights"), CPU_TOPK, **call,
                                  planned=wide, splits=splits)  # fmt: skip
    assert shapes == [(batch, s_q, splits * 8)]
    _assert_same_selection(got, _reference(args, CPU_TOPK))


@pytest.mark.cpu_kernel
def test_cpu_default_is_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the C target the rule keeps one launch: the merge (the top-k launcher) never runs."""
    calls = []
    monkeypatch.setattr(split, "merge", lambda *a, **k: calls.append(1))
    args = make_problem(fmt="bf16", seed=6, batch=1, s_q=2, lengths=[200])
    p = launch.plan_paged(args["q"], CPU_TOPK, page_size=args["k_cache"].shape[1])
    assert launch.paged_splits(p, args["q"], args["block_table"], args["k_cache"].shape[1]) == 1
    _assert_same_selection(_run_split(args, None), _reference(args, CPU_TOPK))
    assert calls == []


@pytest.mark.parametrize("splits", [0, -2, 2.0, True])
def test_bad_split_count_names_the_argument(splits: object) -> None:
    args = make_problem(fmt="bf16", seed=8, batch=1, s_q=1, lengths=[20])
    with pytest.raises(ValueError, match="^index_topk_decode: splits must be a positive int"):
        _run_split(args, splits)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- build tier


@pytest.mark.build
@pytest.mark.parametrize("has_starts", [False, True])
def test_hopper_build_of_the_sub_range_kernel_is_clean(has_starts: bool) -> None:
    """The sub-range kernel at V3.2's 128-key blocks builds for sm_90a without spills, shared memory or matrix
    instructions, and writes both outputs (one block per sequence, its sub-ranges strided over its threads)."""
    kernel, report = support.hopper_build(f"split_ranges_{has_starts}", range_kernels.build, block_N=128,
                                          has_starts=has_starts)  # fmt: skip
    assert report.problems() == [] and report.mma == {} and report.smem_bytes == 0, report.ptxas_log
    source = kernel.get_kernel_source()
    assert "SubStarts[" in source and "SubEnds[" in source
    assert ("Starts[" in source.replace("SubStarts[", "")) == has_starts
    assert f"__launch_bounds__({range_kernels.THREADS}" in source


# ----------------------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(
    ("fmt", "pattern", "batch", "s_q", "context"),
    [("fp8", "random", 1, 1, 131_072), ("bf16", "tied", 1, 2, 131_072), ("fp8", "ordered", 2, 4, 40_000),
     ("fp8-pages", "random", 1, 1, 131_072)],
)
def test_gpu_split_selection_matches_one_launch_and_reference(
    cuda_device: torch.device, monkeypatch: pytest.MonkeyPatch, fmt: str, pattern: str, batch: int, s_q: int,
    context: int,
) -> None:  # fmt: skip
    """V3.2 shapes at up to 128K: the rule's split count (more than one here; each block writes its list in the
    order its threads win the slots) and its two-level merge (the top-k kernel launched twice: over the groups,
    then over their lists) select exactly what one launch and the reference select, ties included."""
    lengths = [context - 999 * b for b in range(batch)]
    args = make_problem(fmt=fmt, seed=7, batch=batch, s_q=s_q, lengths=lengths, heads=V32["heads"], dim=V32["dim"],
                        page_size=V32["page_size"], unallocated=True, pattern=pattern, device=cuda_device)  # fmt: skip
    p = launch.plan_paged(args["q"], V32["topk"], page_size=V32["page_size"], key_layout=args.get("key_layout", "rows"))
    assert launch.paged_splits(p, args["q"], args["block_table"], V32["page_size"]) > 1
    with monkeypatch.context() as patch:  # only this call counted (undo() would drop the poisoned outputs too)
        merges = _count_merge_levels(patch)
        got = _run_split(args, None, V32["topk"])
    assert len(merges) == 2 and merges[1][:2] == (batch, s_q), merges  # [B * G, s_q, ...], then [B, s_q, G * topk]
    _assert_same_selection(got, _run_split(args, 1, V32["topk"]))
    _assert_same_selection(got, _reference(args, V32["topk"]))

"""Split-K decode selection (flash-decoding for selection): each query's key range spread over thread blocks, exact.

The paged fused kernel (``tl_kernels.index_topk`` with ``page_size > 0``) runs one thread block per ``block_Q``
queries of a sequence, and each block walks all of its queries' key blocks in sequence: in decode that is ``B x
ceil(s_q / block_Q)`` blocks, one at ``B = 1`` for a 128K context. Here, with the same kernel:

1. :func:`expand`: every query's visible range ``[starts, ends)`` is cut into ``splits`` contiguous sub-ranges on
   ``block_N`` boundaries (the key blocks of its sequence's union range dealt out evenly, so no key block is loaded
   by two splits and every split of a long row gets work; one small launch, ``tl_kernels.split_ranges``). The
   sub-ranges become virtual queries of the same sequence, ``[B, splits * s_pad]`` laid out split-major (``s_pad``:
   ``s_q`` rounded up to whole kernel blocks, the padding queries see nothing), so one kernel launch over the
   unchanged block table runs ``B x splits x s_pad / block_Q`` blocks, and the MTP queries of one split share a block
   (and its key tiles) whenever ``block_Q > 1``. The query and weight rows are not copied per split: virtual query
   ``j * s_pad + t`` reads row ``t`` (the paged kernel reads query row ``v % s_pad``), so only ``s_q`` is padded to
   ``s_pad`` rows; the block table is shared.
2. The launch runs the same kernel compiled for ``width`` entries (:func:`list_width`: ``topk``, or the keys one
   sub-range can hold at most, rounded up to a power of two of key blocks where that is fewer): each sub-range's list
   is its top-``width`` positions and scores (the tie rule applies inside it), ``-1``/``-inf`` padding, in any order.
   A sub-range holding fewer than ``topk`` keys thus writes and hands on no ``topk``-wide padding, and the rounding
   bounds the kernels a growing context compiles (at most ``log2(topk / block_N)`` list widths besides ``topk``).
3. :func:`merge`: a row's lists are laid side by side (one copy when ``s_q > 1``; at ``s_q = 1`` the split-major
   launch output already is the rows), and the top-k kernel's keyed form (``tl_kernels.topk`` with ``keyed=True``,
   through ``dsa.launch.topk.topk_of_candidates``) selects the ``topk`` best (score, position) candidates of each
   row, ties to the smaller *position*, and writes their positions and scores: one launch, no sort, no gather.
4. Two levels (:func:`merge_groups`): one top-k block per query over ``splits x width`` candidates is the longest
   step at a small batch (``B = 1``, a 128K context, 132 SMs: 264 lists of 512, one block over 135K candidates). The
   splits are then dealt into ``G`` contiguous groups (``ceil(splits / G)`` each, in split order; the last groups
   padded with empty lists); step 3 runs over ``B x s_q x G`` rows, one per group, and again over the groups' ``G``
   lists of ``topk``. The same compiled kernel serves both levels (its ``B``, ``S`` and ``S_kv`` are symbolic). There:
   ``G = 8``, rows of ``33 x 512`` then ``8 x 2048`` candidates (a quarter of the longest row).

Exactness (same sets, same scores, same tie rule as one launch). Order a row's keys by ``x < y`` iff ``score(x) >
score(y)`` or (equal scores and ``pos(x) < pos(y)``), over finite scores only: the contract's top-k is the first
``topk`` keys of that total order (all finite keys when fewer). Let ``x`` be selected and ``R`` its sub-range: fewer
than ``topk`` keys of the row precede ``x``, so fewer than ``topk`` keys of ``R`` do, and ``x`` is in ``R``'s top-k
(the kernel uses the same order); where the list is narrower than ``topk``, ``R`` holds at most ``width`` keys and
its list is all of its finite ones. So the union ``U`` of the sub-ranges' lists contains the answer, and since ``U``
is a subset of the row, the first ``topk`` of ``U`` are the first ``topk`` of the row. The keyed top-k kernel orders
its candidates by score, then the smaller position: the same order; positions are distinct (sub-ranges are
disjoint), so its tie select is exact. Padding holds ``-inf``, which is never selected. Scores are the kernel's own,
passed on unchanged.

Two levels are exact by the same argument applied twice. A group is a run of consecutive sub-ranges, so its keys are
themselves a sub-range (disjoint from the other groups'), and the candidates of its splits contain its top-``topk``:
step 3 over one group leaves exactly that group's top-``topk`` (padding ``-1``/``-inf``, in any order). These ``G``
lists are lists of the kind step 3 takes, from ``G`` disjoint sub-ranges, so step 3 over them is the row's
top-``topk``, with the same scores and the same tie rule. Empty padding lists hold only padding, never selected.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from dsa.launch import common
from dsa.launch import topk as topk_launch
from tl_kernels import split_ranges as range_kernels

__all__ = [
    "MERGE_GAIN", "MIN_KEY_BLOCKS_PER_SPLIT", "WAVES", "device_sms", "expand", "launched_blocks", "merge",
    "list_width", "list_widths", "merge_groups", "merge_rows", "num_splits", "padded_queries",
]  # fmt: skip

WAVES = 2
"""Thread blocks per streaming multiprocessor the split count aims for: a small batch spreads each query's key range
over enough blocks to fill the GPU twice over."""
MIN_KEY_BLOCKS_PER_SPLIT = 2
"""The fewest key blocks a split walks: below it each split's fixed cost (its query tile, its list written and merged
again) outweighs its keys."""
MERGE_GAIN = 2
"""A second merge level runs only where it shortens the merge's critical path (its levels' longest rows, added) at
least this many times: each level costs a launch (with ``s_q > 1`` a layout copy too) and the top-k kernel's
fixed radix rounds."""


def padded_queries(s_q: int, block_Q: int) -> int:
    """Virtual queries per split: ``s_q`` rounded up to whole kernel blocks of ``block_Q`` queries."""
    return -(-s_q // block_Q) * block_Q


def launched_blocks(*, batch: int, s_q: int, block_Q: int, splits: int) -> int:
    """Thread blocks of the paged kernel for ``splits`` splits (``splits = 1``: the unsplit launch, ``B x
    ceil(s_q / block_Q)``)."""
    return batch * splits * (padded_queries(s_q, block_Q) // block_Q)


def num_splits(*, batch: int, s_q: int, block_Q: int, key_blocks: int, sms: int | None) -> int:
    """The split count: enough blocks for :data:`WAVES` per SM (``ceil(WAVES * sms / unsplit blocks)``), never
    fewer than :data:`MIN_KEY_BLOCKS_PER_SPLIT` of the ``key_blocks`` (``ceil(max_pages * page_size / block_N)``) per
    split, at least one. ``sms=None`` (the C target, whose blocks run one after another): one.

    At V3.2 (64 heads, ``block_Q = 1``, ``block_N = 128``), ``B = 1``, ``s_q = 1``, a 128K context on 132 SMs: 264
    splits of 3-4 key blocks, 264 blocks (the unsplit launch: one).
    """
    if sms is None:
        return 1
    unsplit = launched_blocks(batch=batch, s_q=s_q, block_Q=block_Q, splits=1)
    most = max(1, key_blocks // MIN_KEY_BLOCKS_PER_SPLIT)
    return max(1, min(math.ceil(WAVES * sms / unsplit), most))


def device_sms(device: torch.device) -> int | None:
    """The streaming multiprocessors of a CUDA ``device``; ``None`` elsewhere (the C target runs blocks in turn)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def merge_rows(*, splits: int, width: int, topk: int, groups: int) -> tuple[int, ...]:
    """Candidates in one row of each merge level: ``(splits * width,)`` for one level; for ``groups > 1``, a group's
    ``ceil(splits / groups)`` lists of ``width``, then ``groups`` lists of ``topk`` (the first level's rows)."""
    if groups == 1:
        return (splits * width,)
    return -(-splits // groups) * width, groups * topk


def merge_groups(*, batch: int, s_q: int, splits: int, width: int, topk: int, sms: int | None) -> int:
    """The merge's group count ``G`` (module docstring, step 4; 1: one level).

    Rule: a level's rows run side by side, so a level costs its longest row and the merge the sum of its levels'
    (:func:`merge_rows`, added). ``G`` minimises that sum over ``2 <= G <= splits`` with the first level's ``B x s_q
    x G`` rows at most :data:`WAVES` per SM (the top-k kernel's 1024-thread blocks: two fit an SM at once, so those
    rows all run together; more would queue behind each other and add work), and two levels are used only where the
    sum is at most ``1 / MERGE_GAIN`` of one level's row. ``sms=None`` (the C target): one level.

    The optimum is near ``sqrt(splits * width / topk)``, so two levels pay from about ``16 x topk`` candidates per
    query. V3.2 (``topk = 2048``), ``B = 1``, ``s_q = 1``, 128K, 132 SMs: 264 lists of 512, ``G = 8``, rows of
    16,896 then 16,384 candidates against 135,168 (4.1x shorter). ``B = 32``, ``s_q = 2``: 5 lists of 2048, one
    level. Filling two waves with the first level instead (``G = 264`` at ``B = 1``) would make the second level's row
    ``264 x 512`` again: the rule bounds the work, not the block count.
    """
    most = min(splits, WAVES * sms // (batch * s_q)) if sms is not None else 1
    if most < 2:
        return 1
    return _best_groups(splits, width, topk, most)


@functools.lru_cache(maxsize=1024)
def _best_groups(splits: int, width: int, topk: int, most: int) -> int:
    """:func:`merge_groups` once its cap ``most >= 2`` is known: every count searched (once per shape, cached)."""
    def path(groups: int) -> int:
        return sum(merge_rows(splits=splits, width=width, topk=topk, groups=groups))

    best = min(range(2, most + 1), key=path)  # the first (fewest groups) of equal sums
    return best if MERGE_GAIN * path(best) <= splits * width else 1


def list_width(*, topk: int, splits: int, key_blocks: int, block_N: int) -> int:
    """Entries of each split's list (the split launch's ``topk``): ``topk``, or, where fewer, the keys a sub-range
    can hold (it spans at most ``ceil(key_blocks / splits)`` key blocks) rounded up to a power of two of key blocks,
    so that a context growing one page at a time compiles few list widths. V3.2, ``B = 1``, 128K, 264 splits: 4 key
    blocks, 512."""
    blocks = max(1, -(-key_blocks // splits))  # an empty table still launches one key block's list
    return min(topk, (1 << (blocks - 1).bit_length()) * block_N)


def list_widths(*, topk: int, block_N: int) -> tuple[int, ...]:
    """Every list width narrower than ``topk`` that :func:`list_width` can pick for ``block_N``-key blocks (powers of
    two of key blocks below ``topk``, at most ``log2(topk / block_N)``), narrowest first. V3.2: 128, 256, 512, 1024."""
    widths = []
    blocks = 1
    while blocks * block_N < topk:
        widths.append(blocks * block_N)
        blocks *= 2
    return tuple(widths)


def expand(
    q: Tensor, weights: Tensor, starts: Tensor | None, ends: Tensor, *, splits: int, block_Q: int, block_N: int,
    seq_kv: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The virtual queries of a split launch (module docstring, step 1).

    Args:
        q (Tensor): ``[B, s_q, H_i, D_i]`` bfloat16 or float8_e4m3fn.
        weights (Tensor): ``[B, s_q, H_i]`` float32.
        starts (Tensor | None): ``[B, s_q]`` int32 (``None``: 0).
        ends (Tensor): ``[B, s_q]`` int32.
        splits, block_Q, block_N: the split count and the kernel's queries and keys per block.
        seq_kv (int): the kernel's logical key length, ``max_pages * page_size`` (positions past it are invisible).

    Returns:
        q ``[B, s_pad, H_i, D_i]`` and weights ``[B, s_pad, H_i]`` (the inputs, padded with copies of the last real
        query; the inputs themselves when ``s_pad = s_q``), starts and ends ``[B, splits * s_pad]`` int32: virtual
        query ``j * s_pad + t`` is query ``t`` (row ``t`` of q) restricted to sub-range ``j`` (``t >= s_q``, and every
        empty restriction: ``[0, 0)``). Contiguous.
    """
    batch, s_q = ends.shape
    s_pad = padded_queries(s_q, block_Q)
    shape = (batch, splits, s_pad)
    sub_starts = common.new_output(shape, torch.int32, ends.device)
    sub_ends = common.new_output(shape, torch.int32, ends.device)
    kernel = common.get_kernel(range_kernels.build, common.target_for(ends.device), block_N=int(block_N),
                               has_starts=starts is not None)  # fmt: skip
    kernel(*([] if starts is None else [starts]), ends, sub_starts, sub_ends, int(seq_kv))
    if s_pad > s_q:  # padding queries repeat the last real one (any valid values do: they see no key)
        rows = torch.arange(s_pad, device=q.device).clamp(max=s_q - 1)
        q, weights = q[:, rows], weights[:, rows]
    return q, weights, sub_starts.view(batch, -1), sub_ends.view(batch, -1)


def merge(
    positions: Tensor, scores: Tensor, *, s_q: int, splits: int, topk: int, groups: int | None = None
) -> tuple[Tensor, Tensor]:
    """The top-``topk`` of the splits' candidates (module docstring, steps 3 and 4).

    Args:
        positions (Tensor): ``[B, splits * s_pad, width]`` int32, the split launch's positions (``-1`` padding, any
            order; ``width``: :func:`list_width`).
        scores (Tensor): ``[B, splits * s_pad, width]`` float32, their scores (``-inf`` at padding).
        s_q (int): real queries per sequence (virtual queries ``t >= s_q`` of each split are dropped).
        splits (int): sub-ranges per query.
        topk (int): entries per query.
        groups (int | None): the first level's groups of splits (1: one level; any ``>= 1``, tests force it);
            default :func:`merge_groups` for the tensors' device.

    Returns:
        positions ``[B, s_q, topk]`` int32 (``-1`` padding) and scores ``[B, s_q, topk]`` float32 (``-inf`` there).
    """
    batch, width = positions.shape[0], positions.shape[-1]
    shape = (batch, splits, -1, width)
    positions = positions.view(shape)[:, :, :s_q]
    scores = scores.view(shape)[:, :, :s_q]
    if groups is None:
        groups = merge_groups(batch=batch, s_q=s_q, splits=splits, width=width, topk=topk,
                              sms=device_sms(positions.device))  # fmt: skip
    if groups > 1:
        per_group = -(-splits // groups)
        # Empty lists after the last split: whole groups of per_group lists.
        missing = (0, 0, 0, 0, 0, groups * per_group - splits)
        if missing[-1]:
            positions = torch.nn.functional.pad(positions, missing, value=-1)
            scores = torch.nn.functional.pad(scores, missing, value=float("-inf"))
        # [B * G, per_group, s_q, width]: a group's lists are consecutive splits, so each group is one merge row.
        flat = (batch * groups, per_group, s_q, width)
        positions, scores = _merge_level(positions.reshape(flat), scores.reshape(flat), topk=topk)
        positions, scores = positions.view(batch, groups, s_q, topk), scores.view(batch, groups, s_q, topk)
    return _merge_level(positions, scores, topk=topk)


def _merge_level(positions: Tensor, scores: Tensor, *, topk: int) -> tuple[Tensor, Tensor]:
    """One keyed top-k launch over ``[N, lists, s_q, L]`` int32 positions and float32 scores (a row's lists from
    disjoint sub-ranges, any order): ``[N, s_q, topk]`` positions and scores."""
    rows, lists, s_q, length = positions.shape
    # [N, s_q, lists * L], row-major (the kernel's layout): a view of the launch's output at s_q = 1, else a copy.
    flat = (rows, s_q, lists * length)
    positions = positions.transpose(1, 2).reshape(flat).contiguous()
    scores = scores.transpose(1, 2).reshape(flat).contiguous()
    return topk_launch.topk_of_candidates(scores, positions, topk)

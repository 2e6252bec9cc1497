"""The key sources of ``sparse_mla``: an index list or a per-query contiguous range over one KV tensor.

DeepSeek-V4 attends over two sources in one softmax (the sliding window over raw tokens and the compressed entries).
A source is passed between the internal layers (reference, autograd, library, launch glue) as one :class:`Source`
instead of four loose arguments. A ranged source is never expanded for the whole sequence: the reference turns a
range into entries one chunk of query rows at a time (:func:`chunk_entries`); the kernels read ranges directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dsa.reference.common import OptTensor, valid_index_mask
from dsa.validation import SourceArgs


class Source(NamedTuple):
    """One key source of ``sparse_mla``.

    Attributes:
        kv (Tensor): ``[B, S_kv, d_qk]``: the rows (key = value's first ``d_v`` columns).
        indices (Tensor): ``[B, S, k]`` int32 row numbers, or with ``ranged`` ``[B, S, 2]`` int32 ``(start, end)``:
            rows ``start .. end - 1`` (an empty or negative range is valid and empty; rows outside ``[0, S_kv)``
            are invalid entries).
        topk_length (Tensor | None): ``[B, S]`` int32, index lists only: how many leading entries count.
        ranged (bool): whether ``indices`` holds ranges.
    """

    kv: Tensor
    indices: Tensor
    topk_length: OptTensor
    ranged: bool


def sources_of(*given: SourceArgs) -> tuple[Source, ...]:
    """The sources of a ``sparse_mla`` call from its arguments as validated by ``dsa.validation`` (one
    ``dsa.validation.SourceArgs`` per source: exactly one of indices/ranges each; one whose ``kv`` is None is
    absent)."""
    return tuple(Source(a.kv, a.entries, a.topk_length, a.ranged) for a in given if a.kv is not None)


def clamped_ranges(ranges: Tensor, seq_kv: int) -> tuple[Tensor, Tensor]:
    """``ranges [..., 2]`` int32 cut to the rows that exist: ``(start [...] int64, length [...] int64)`` with
    ``0 <= start``, ``start + length <= seq_kv`` and ``length >= 0``. The valid entries of a range are exactly these
    rows (the order of a softmax's entries does not matter), so the width a chunk needs is at most ``seq_kv``."""
    start = ranges[..., 0].to(torch.int64).clamp(0, seq_kv)
    end = ranges[..., 1].to(torch.int64).clamp(0, seq_kv)
    return start, (end - start).clamp_min(0)


def entry_width(source: Source) -> int:
    """Entries per query row of ``source``: ``k`` for an index list, the longest clamped range for a ranged one
    (at least 1, so every chunk has a column)."""
    if not source.ranged:
        return source.indices.shape[-1]
    return _longest(clamped_ranges(source.indices, source.kv.shape[1])[1])


def _longest(length: Tensor) -> int:
    """The longest of the clamped range lengths ``length`` (at least 1: a chunk always has a column)."""
    return max(1, int(length.max())) if length.numel() else 1


def chunk_entries(source: Source, rows: slice) -> tuple[Tensor, Tensor]:
    """The entries of query rows ``rows`` of ``source``: ``(indices [B, c, k], valid [B, c, k] bool)``.

    An index list gives its own columns (``k`` of the list); a range gives ``start + j`` for ``j`` below the chunk's
    longest clamped range, valid for ``j < length`` (int64). Only the chunk's entries are built."""
    seq_kv = source.kv.shape[1]
    if not source.ranged:
        length = None if source.topk_length is None else source.topk_length[:, rows]
        indices = source.indices[:, rows]
        return indices, valid_index_mask(indices, seq_kv, length)
    return range_entries(source.indices[:, rows], seq_kv)


def range_entries(ranges: Tensor, seq_kv: int) -> tuple[Tensor, Tensor]:
    """``ranges [B, c, 2]`` int32 as entries: ``(indices [B, c, w] int64, valid [B, c, w] bool)``, ``w`` the longest
    clamped range of these rows (at least 1); entry ``j`` of a row is ``start + j``, valid for ``j < length``."""
    start, length = clamped_ranges(ranges, seq_kv)
    j = torch.arange(_longest(length), device=start.device)
    return start.unsqueeze(-1) + j, j < length.unsqueeze(-1)


def flat_sources(sources: Sequence[Source]) -> tuple[tuple[bool, ...], tuple[OptTensor, ...]]:
    """``(ranged flags, (kv, indices, topk_length) of each source in order)``: the sources as arguments of an
    autograd Function or a ``torch.library`` op (neither takes a NamedTuple)."""
    return tuple(s.ranged for s in sources), tuple(t for s in sources for t in (s.kv, s.indices, s.topk_length))


def unflat_sources(ranged: Sequence[bool], tensors: Sequence[OptTensor]) -> tuple[Source, ...]:
    """The inverse of :func:`flat_sources`."""
    return tuple(Source(tensors[3 * i], tensors[3 * i + 1], tensors[3 * i + 2], r) for i, r in enumerate(ranged))

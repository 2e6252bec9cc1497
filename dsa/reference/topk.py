"""Top-k selection: ``topk_indices`` over a score matrix and ``index_topk``, the indexer's selection walked in
bounded memory, with the tie rule (the larger score, then the smaller position) that every backend follows."""

from __future__ import annotations

import torch
from torch import Tensor

from dsa import validation
from dsa.reference.common import INVALID_INDEX, OptTensor, _chunk_rows, compute_dtype, valid_index_mask
from dsa.reference.indexer import _score_block

# index_topk's reference walk: all temporaries of one (query rows x key block) step together stay under
# SELECT_CHUNK_ELEMENTS float32-sized elements (16 MB), which keeps its peak memory far below the score matrix.
SELECT_CHUNK_ELEMENTS = 1 << 22
LOGIT_COPIES = 3  # logits, their ReLU, the einsum's permuted copy
SORT_ELEMENTS_PER_SCORE = 20  # score, mask, value + int64 position (concatenated), two int64 permutations, gathers
# Keys per block of ``index_topk``'s reference walk (wider when ``topk`` is).
KEY_BLOCK = 2048


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest finite scores of each row.

    Args:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32.
        k (int): ``>= 1``; may exceed ``S_kv``.

    Returns:
        indices (torch.Tensor): ``[B, S, k]``, int32. The set of the ``k`` largest finite scores of the row; among
        exactly equal scores the smaller position wins (``-0.0`` equals ``+0.0``), so the set is the same on every
        backend, path and chunking. ``-inf``, ``+inf`` and NaN are never selected. A row with fewer than ``k`` finite
        scores returns every finite position and ``-1`` in the rest. No index appears twice; the order within a row
        is unspecified (callers treat it as a set).
    """
    validation.check_topk_indices(scores, k)
    return topk_indices_impl(scores, k)


def _best(values: Tensor, positions: Tensor, take: int) -> tuple[Tensor, Tensor]:
    """The ``take`` best ``(value, position)`` pairs of each row under the tie rule: larger value first, then the
    smaller position. ``values [..., n]`` (``-inf`` marks an entry that can never be chosen), ``positions [..., n]``
    int64, ``take <= n``. Returns ``(values, positions)`` ``[..., take]``."""
    # Order by position first, then a stable sort by value keeps that order inside every group of equal values.
    by_position = torch.argsort(positions, dim=-1, stable=True)
    values, positions = values.gather(-1, by_position), positions.gather(-1, by_position)
    by_value = torch.argsort(values, dim=-1, descending=True, stable=True)[..., :take]
    return values.gather(-1, by_value), positions.gather(-1, by_value)


def _finite_or_neginf(scores: Tensor) -> Tensor:
    """``scores`` with every non-finite value (``+inf`` and NaN too) replaced by ``-inf``: never selectable."""
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("-inf")))


def _as_indices(values: Tensor, positions: Tensor, k: int) -> Tensor:
    """int32 ``[..., k]`` from the kept ``(values, positions)``: ``-1`` where nothing was selectable, padded to ``k``."""
    return _pad_last(positions.to(torch.int32).masked_fill(torch.isneginf(values), INVALID_INDEX), k, INVALID_INDEX)


def _pad_last(t: Tensor, k: int, fill: float) -> Tensor:
    """``t [..., n]`` padded with ``fill`` to ``[..., k]`` (unchanged when ``n >= k``)."""
    if t.shape[-1] >= k:
        return t
    pad = torch.full((*t.shape[:-1], k - t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=-1)


def topk_indices_impl(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_indices` without validation, for callers that validated the inputs already (``dsa.ops``)."""
    batch, seq, seq_kv = scores.shape
    take = min(k, seq_kv)
    # Sorting needs an int64 position and an index per element: bound the chunk like every other intermediate.
    step = _chunk_rows(3 * batch * seq_kv, seq)
    positions = torch.arange(seq_kv, device=scores.device)
    chunks = []
    for t0 in range(0, seq, step):
        block = _finite_or_neginf(scores[:, t0 : t0 + step])
        values, picked = _best(block, positions.expand(block.shape), take)
        chunks.append(_as_indices(values, picked, k))
    return torch.cat(chunks, dim=1)


def index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The indexer's selection in bounded memory: ``topk_indices(index_scores(q, k, weights, ...), topk)``.

    Args:
        q, k, weights, k_scale, starts, ends: as in :func:`index_scores`.
        topk (int): ``>= 1``; may exceed ``S_kv``.
        return_scores (bool): also return the selected positions' index scores.

    Returns:
        indices (torch.Tensor): ``[B, S, topk]``, int32, exactly :func:`topk_indices` of the full score matrix (the
        tie rule included: among equal scores the smaller position wins); order unspecified, ``-1`` padding.
        scores (torch.Tensor, with ``return_scores``): ``[B, S, topk]``, float32 (float64 for float64 inputs): the
        index score of each selected position, ``-inf`` at ``-1`` padding. Differentiable in ``q``, ``k`` and
        ``weights`` for floating inputs (the sparse-stage indexer loss of V3.2 needs them).

    Memory: never an ``[S, S_kv]`` buffer for the whole problem. Queries and keys are walked in blocks whose
    temporaries stay under ``SELECT_CHUNK_ELEMENTS`` (key blocks of one width, so the heap reuses them); each query
    keeps only its running best ``topk`` (value, position) pairs.
    """
    validation.check_index_topk(q, k, weights, topk, k_scale, starts, ends)
    return index_topk_impl(q, k, weights, topk, k_scale, starts, ends, return_scores)


def index_topk_impl(
    q: Tensor, k: Tensor, weights: Tensor, topk: int, k_scale: OptTensor, starts: OptTensor, ends: OptTensor,
    return_scores: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`index_topk` without validation, for callers that validated the inputs already (``dsa.ops``)."""
    with torch.no_grad():
        indices, _ = select_topk(q, k, weights, topk, k_scale, starts, ends)
    if not return_scores:
        return indices
    return indices, selected_scores(q, k, weights, indices, k_scale)


def select_topk(
    q: Tensor, k: Tensor, weights: Tensor, topk: int, k_scale: OptTensor, starts: OptTensor, ends: OptTensor
) -> tuple[Tensor, Tensor]:
    """The selection of :func:`index_topk` and its scores, walking query rows and key blocks (call under no_grad).

    Returns ``(indices [B, S, topk] int32, scores [B, S, topk])``: the scores in the compute dtype, exactly the values
    the selection compared (``-inf`` at ``-1`` padding)."""
    batch, seq, heads, _ = q.shape
    seq_kv = k.shape[1]
    # Per score of a block, in float32-sized elements: the heads' logits and their ReLU (with the einsum's own copy),
    # plus the mask and the merge's sort (values, int64 positions, two int64 permutations and their gathers).
    per_score = LOGIT_COPIES * heads + SORT_ELEMENTS_PER_SCORE
    # Key blocks of one width (the heap reuses the previous block's memory; growing blocks would make the peak grow
    # with S), at least as wide as the kept set, so that a merge sorts at most twice the block.
    cols_step = min(seq_kv, max(topk, KEY_BLOCK))
    rows_step = max(1, min(seq, SELECT_CHUNK_ELEMENTS // max(1, batch * per_score * (cols_step + topk))))
    # Outputs allocated once, before any temporary: per-chunk results allocated between the chunks' large
    # temporaries would pin the heap above them and make the process's peak memory grow with S.
    indices = torch.empty((batch, seq, topk), dtype=torch.int32, device=q.device)
    scores = torch.empty((batch, seq, topk), dtype=compute_dtype(q.dtype), device=q.device)
    for t0 in range(0, seq, rows_step):
        rows = slice(t0, min(seq, t0 + rows_step))
        # Causal rows see no key past their last row's horizon: blocks wholly beyond it are skipped.
        horizon = seq_kv if starts is not None else max(1, min(seq_kv, rows.stop + seq_kv - seq))
        best_values = best_positions = None
        for s0 in range(0, horizon, cols_step):
            cols = slice(s0, min(seq_kv, s0 + cols_step))
            values = _finite_or_neginf(_score_block(q, k, weights, k_scale, starts, ends, rows, cols))
            positions = torch.arange(cols.start, cols.stop, device=q.device).expand(values.shape)
            if best_values is not None:
                values = torch.cat([best_values, values], dim=-1)
                positions = torch.cat([best_positions, positions], dim=-1)
            best_values, best_positions = _best(values, positions, min(topk, values.shape[-1]))
        indices[:, rows] = _as_indices(best_values, best_positions, topk)
        scores[:, rows] = _pad_last(best_values, topk, float("-inf"))
    return indices, scores


def gather_scores(scores: Tensor, indices: Tensor) -> Tensor:
    """``scores [B, S, S_kv]`` at ``indices [B, S, k]`` -> ``[B, S, k]``, ``-inf`` at invalid entries (``-1`` or
    outside ``[0, S_kv)``)."""
    valid = valid_index_mask(indices, scores.shape[-1])
    picked = scores.gather(-1, torch.where(valid, indices, 0).to(torch.int64))
    return picked.masked_fill(~valid, float("-inf"))


def selected_scores(q: Tensor, k: Tensor, weights: Tensor, indices: Tensor, k_scale: OptTensor = None) -> Tensor:
    """Index scores at the selected positions: ``[B, S, topk]`` in the compute dtype, ``-inf`` where ``indices`` is
    invalid (``-1`` or outside ``[0, S_kv)``). Plain differentiable PyTorch (the normative formula of
    ``index_topk(..., return_scores=True)``); it gathers ``[B, S, topk, D_i]`` key rows, so it suits test sizes."""
    dtype = compute_dtype(q.dtype)
    valid = valid_index_mask(indices, k.shape[1])
    b = torch.arange(k.shape[0], device=k.device).view(-1, 1, 1)
    rows = torch.where(valid, indices.to(torch.int64), 0)
    k_rows = k[b, rows].to(dtype)  # [B, S, topk, D_i]
    logits = torch.einsum("bthd,btkd->bthk", q.to(dtype), k_rows)
    score = torch.einsum("bthk,bth->btk", torch.relu(logits), weights.to(dtype))
    if k_scale is not None:
        score = score * k_scale.to(dtype)[b, rows]
    return score.masked_fill(~valid, float("-inf"))

"""The normative PyTorch definition of every DSA op.

The docstrings in this module are the contract: a kernel is correct when it matches these functions. The math runs
in float32 (float64 for float64 inputs). Nothing here materialises an ``[S, S_kv]`` matrix per head: ``index_scores``
and ``sparse_mla`` walk the queries in chunks, so the reference stays usable at a few thousand tokens on a CPU.
``dense_masked_attention`` is the deliberately obvious full-matrix version, used only as an oracle in tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsa import cache, validation

OptTensor = Tensor | None

# Elements of the largest intermediate a chunk may hold (about 64 MB of float32), which bounds the reference's memory.
CHUNK_ELEMENTS = 1 << 24
# index_topk's reference walk: all temporaries of one (query rows x key block) step together stay under
# SELECT_CHUNK_ELEMENTS float32-sized elements (16 MB), which keeps its peak memory far below the score matrix.
SELECT_CHUNK_ELEMENTS = 1 << 22
LOGIT_COPIES = 3  # logits, their ReLU, the einsum's permuted copy
SORT_ELEMENTS_PER_SCORE = 20  # score, mask, value + int64 position (concatenated), two int64 permutations, gathers
# Keys per block of ``index_topk``'s reference walk (wider when ``topk`` is).
KEY_BLOCK = 2048
INVALID_INDEX = -1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64 (gradcheck, oracles); everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(per_row_elements: int, rows: int) -> int:
    """How many query rows one chunk may hold so that it stays under ``CHUNK_ELEMENTS``."""
    return max(1, min(rows, CHUNK_ELEMENTS // max(1, per_row_elements)))


def visibility_mask(
    batch: int,
    seq: int,
    seq_kv: int,
    *,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    rows: slice = slice(None),
    cols: slice = slice(None),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which key positions each query of the indexer may see.

    Returns a bool tensor ``[B, len(rows), len(cols)]`` (``cols`` selects key positions). Causal (the default) is
    aligned bottom-right: query ``t`` sees ``s <= t + (S_kv - S)``. With ``starts``/``ends`` (``[B, S]`` int32) query
    ``t`` sees ``starts[b, t] <= s < ends[b, t]``.
    """
    t = torch.arange(seq, device=device)[rows]
    s = torch.arange(seq_kv, device=device)[cols]
    if starts is None or ends is None:
        mask = s[None, :] <= (t[:, None] + (seq_kv - seq))
        return mask.unsqueeze(0).expand(batch, -1, -1)
    lo = starts[:, rows].to(torch.int64).unsqueeze(-1)
    hi = ends[:, rows].to(torch.int64).unsqueeze(-1)
    return (s.view(1, 1, -1) >= lo) & (s.view(1, 1, -1) < hi)


def _score_block(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor, rows: slice, cols: slice
) -> Tensor:
    """Index scores of the queries ``rows`` against the keys ``cols``: ``[B, len(rows), len(cols)]`` in the compute
    dtype, ``-inf`` where invisible. The one formula behind ``index_scores`` and ``index_topk``."""
    batch, seq = q.shape[:2]
    dtype = compute_dtype(q.dtype)
    logits = torch.einsum("bthd,bsd->bths", q[:, rows].to(dtype), k[:, cols].to(dtype))
    score = torch.einsum("bths,bth->bts", torch.relu(logits), weights[:, rows].to(dtype))
    if k_scale is not None:
        score = score * k_scale[:, cols].to(dtype).unsqueeze(1)
    visible = visibility_mask(batch, seq, k.shape[1], starts=starts, ends=ends, rows=rows, cols=cols, device=q.device)
    return score.masked_fill(~visible, float("-inf"))


def index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores of every key position for every query.

    Args:
        q (torch.Tensor): ``[B, S, H_i, D_i]``, bfloat16 or float8_e4m3fn (the reference also takes float32/float64).
        k (torch.Tensor): ``[B, S_kv, D_i]``, the same dtype as ``q``.
        weights (torch.Tensor): ``[B, S, H_i]``, float32: per-head weights. V3.2 folds the query quantisation scale,
            ``H_i**-0.5`` and ``D_i**-0.5`` into them; this op does not.
        k_scale (torch.Tensor | None): ``[B, S_kv]``, float32: per-key dequantisation scale; required for FP8 inputs,
            must be None otherwise.
        starts, ends (torch.Tensor | None): ``[B, S]``, int32, given together: query ``t`` sees ``starts <= s < ends``
            (packed variable-length batches). Omitted: causal, aligned bottom-right (``s <= t + S_kv - S``).

    Returns:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32 (float64 for float64 inputs):
        ``k_scale[b, s] * sum_j weights[b, t, j] * relu(q[b, t, j] . k[b, s])`` accumulated in float32 where visible,
        exactly ``-inf`` where not. Differentiable in ``q``, ``k`` and ``weights`` for floating inputs.
    """
    validation.check_index_scores(q, k, weights, k_scale, starts, ends)
    return index_scores_impl(q, k, weights, k_scale, starts, ends)


def index_scores_impl(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor
) -> Tensor:
    """:func:`index_scores` without validation, for callers that validated the inputs already (``dsa.ops``)."""
    batch, seq, heads, _ = q.shape
    seq_kv = k.shape[1]
    step = _chunk_rows(heads * seq_kv * batch, seq)
    every_key = slice(None)
    chunks = [
        _score_block(q, k, weights, k_scale, starts, ends, slice(t0, min(seq, t0 + step)), every_key)
        for t0 in range(0, seq, step)
    ]
    return torch.cat(chunks, dim=1)


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


def valid_index_mask(indices: torch.Tensor, seq_kv: int, topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S, k]`` bool: ``0 <= idx < S_kv`` and, with ``topk_length [B, S]``, position in the row ``< topk_length``."""
    valid = (indices >= 0) & (indices < seq_kv)
    if topk_length is not None:
        position = torch.arange(indices.shape[-1], device=indices.device)
        valid = valid & (position.view(1, 1, -1) < topk_length.unsqueeze(-1).to(torch.int64))
    return valid


def _effective_lse(lse: torch.Tensor, attn_sink: torch.Tensor | None) -> torch.Tensor:
    """The softmax denominator's log: ``lse``, or ``logaddexp(lse, sink)`` with an attention sink."""
    if attn_sink is None:
        return lse
    return torch.logaddexp(lse, attn_sink.to(lse.dtype).view(1, 1, -1))


def _probabilities(scores: torch.Tensor, log_denominator: torch.Tensor) -> torch.Tensor:
    """``exp(scores - log_denominator)``: 0 (never NaN) where the row is empty (denominator ``-inf``)."""
    # Only an empty row (-inf) needs a stand-in; a +inf denominator (an infinite sink) correctly gives 0 everywhere.
    safe = torch.where(torch.isneginf(log_denominator), torch.zeros_like(log_denominator), log_denominator)
    return torch.exp(scores - safe.unsqueeze(-1))


class _SparseMLA(torch.autograd.Function):
    """Chunked sparse MLA whose backward recomputes the probabilities (no gathered KV is kept between passes)."""

    @staticmethod
    def forward(ctx, q, kv, indices, sm_scale, d_v, topk_length, attn_sink):  # type: ignore[override]
        out, lse = _sparse_mla_forward(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
        ctx.save_for_backward(q, kv, indices, topk_length, attn_sink, out, lse)
        ctx.sm_scale, ctx.d_v = sm_scale, d_v
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):  # type: ignore[override]
        q, kv, indices, topk_length, attn_sink, out, lse = ctx.saved_tensors
        dq, dkv, d_sink = sparse_mla_backward(
            q, kv, indices, ctx.sm_scale, ctx.d_v, topk_length, attn_sink, out, lse, d_out, d_lse
        )
        return dq, dkv, None, None, None, None, d_sink


def _gather_rows(
    kv: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``kv [B, S_kv, D]`` selected by ``indices [B, c, k]``, and the row numbers read.

    Returns ``(rows [B, c, k, D] in dtype, idx [B, c, k] int64)``. An invalid entry (``valid`` False) reads row 0 and
    its gathered row is replaced by zeros, so it contributes exactly nothing, even if that row (or the row its index
    names) holds Inf or NaN, as unwritten cache memory may.
    """
    batch = kv.shape[0]
    b = torch.arange(batch, device=kv.device).view(batch, 1, 1)
    idx = torch.where(valid, indices.to(torch.int64), 0)
    rows = kv[b, idx].to(dtype)
    return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=dtype, device=kv.device)), idx


def _chunk_plan(q: torch.Tensor, indices: torch.Tensor) -> int:
    batch, _, heads, d_qk = q.shape
    top = indices.shape[-1]
    return _chunk_rows(batch * top * max(d_qk, heads), q.shape[1])


def _chunk_scores(q_c, kv_c, valid_c, sm_scale):
    """Masked scaled logits ``[B, c, H, k]`` of one chunk (``-inf`` at invalid entries)."""
    scores = torch.einsum("bchd,bckd->bchk", q_c, kv_c) * sm_scale
    return scores.masked_fill(~valid_c.unsqueeze(2), float("-inf"))


def _sparse_mla_forward(q, kv, indices, sm_scale, d_v, topk_length, attn_sink):
    batch, seq, heads, _ = q.shape
    seq_kv = kv.shape[1]
    dtype = compute_dtype(q.dtype)
    lse_dtype = dtype
    out = torch.empty((batch, seq, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, seq, heads), dtype=lse_dtype, device=q.device)
    valid = valid_index_mask(indices, seq_kv, topk_length)
    step = _chunk_plan(q, indices)
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        kv_c, _ = _gather_rows(kv, indices[:, rows], valid[:, rows], dtype)
        scores = _chunk_scores(q[:, rows].to(dtype), kv_c, valid[:, rows], sm_scale)
        lse_c = torch.logsumexp(scores, dim=-1)
        p = _probabilities(scores, _effective_lse(lse_c, attn_sink))
        out[:, rows] = torch.einsum("bchk,bckd->bchd", p, kv_c[..., :d_v]).to(q.dtype)
        lse[:, rows] = lse_c
    return out, lse


def sparse_mla_backward(q, kv, indices, sm_scale, d_v, topk_length, attn_sink, out, lse, d_out, d_lse):
    """Gradients of ``sparse_mla`` recomputed from ``out`` and ``lse`` (chunked, nothing gathered is kept).

    Args are those of ``sparse_mla`` plus ``out``/``lse`` from the forward and the incoming ``d_out [B, S, H, d_v]``
    and ``d_lse [B, S, H]`` (either may be None). Returns ``(dq [B, S, H, d_qk], dkv [B, S_kv, d_qk], d_sink [H] or
    None)`` in the dtypes of ``q``, ``kv`` and ``attn_sink``; ``dkv`` sums every query and duplicate that used a row.
    """
    batch, seq, heads, d_qk = q.shape
    seq_kv = kv.shape[1]
    dtype = compute_dtype(q.dtype)
    dq = torch.zeros((batch, seq, heads, d_qk), dtype=dtype, device=q.device)
    dkv = torch.zeros((batch, seq_kv, d_qk), dtype=dtype, device=q.device)
    d_sink = torch.zeros((heads,), dtype=dtype, device=q.device) if attn_sink is not None else None
    valid = valid_index_mask(indices, seq_kv, topk_length)
    log_denominator = _effective_lse(lse.to(dtype), attn_sink)
    step = _chunk_plan(q, indices)
    batch_index = torch.arange(batch, device=q.device).view(batch, 1, 1)
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        kv_c, idx = _gather_rows(kv, indices[:, rows], valid[:, rows], dtype)
        q_c = q[:, rows].to(dtype)
        scores = _chunk_scores(q_c, kv_c, valid[:, rows], sm_scale)
        p = _probabilities(scores, log_denominator[:, rows])
        grad_scores = torch.zeros_like(p)
        grad_kv = torch.zeros_like(kv_c)
        if d_out is not None:
            g = d_out[:, rows].to(dtype)
            # delta = rowsum(out * d_out) is the softmax Jacobian's correction term (the sink has no value row).
            delta = (out[:, rows].to(dtype) * g).sum(-1)
            dp = torch.einsum("bchd,bckd->bchk", g, kv_c[..., :d_v])
            grad_scores = p * (dp - delta.unsqueeze(-1))
            grad_kv[..., :d_v] += torch.einsum("bchk,bchd->bckd", p, g)
            if d_sink is not None:
                sink_p = _probabilities(attn_sink.to(dtype).view(1, 1, -1, 1), log_denominator[:, rows]).squeeze(-1)
                d_sink -= (sink_p * delta).sum(dim=(0, 1))
        if d_lse is not None:
            # d lse / d score = softmax over the valid scores alone (the sink is not part of lse).
            d_lse_c = d_lse[:, rows].to(dtype).unsqueeze(-1)
            grad_scores = grad_scores + _probabilities(scores, lse[:, rows].to(dtype)) * d_lse_c
        grad_scores = grad_scores * sm_scale
        dq[:, rows] = torch.einsum("bchk,bckd->bchd", grad_scores, kv_c)
        grad_kv += torch.einsum("bchk,bchd->bckd", grad_scores, q_c)
        grad_kv = grad_kv * valid[:, rows].unsqueeze(-1)
        flat = (batch_index * seq_kv + idx).reshape(-1)
        dkv.view(-1, d_qk).index_add_(0, flat, grad_kv.reshape(-1, d_qk))
    d_sink_out = d_sink.to(attn_sink.dtype) if d_sink is not None else None
    return dq.to(q.dtype), dkv.to(kv.dtype), d_sink_out


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse multi-head latent attention over selected key positions.

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16 (the reference also takes float32/float64).
        kv (torch.Tensor): ``[B, S_kv, d_qk]``, the same dtype as ``q``: one latent head shared by every query head;
            the value is ``kv[..., :d_v]``.
        indices (torch.Tensor): ``[B, S, k]``, int32. An entry is valid iff ``0 <= idx < S_kv`` and, with
            ``topk_length``, its position in the row is ``< topk_length[b, t]``. Invalid entries are ignored and
            never read. Valid duplicates count once per occurrence (gather semantics). No causal masking here.
        sm_scale (float): softmax scale, required (V3.2 uses ``192**-0.5 * mscale**2``).
        d_v (int): value width, ``1 <= d_v <= d_qk``.
        topk_length (torch.Tensor | None): ``[B, S]``, int32: how many leading entries of each row count.
        attn_sink (torch.Tensor | None): ``[H]``, float32: an extra logit per head in the softmax denominator with
            no value row.

    Returns:
        out (torch.Tensor): ``[B, S, H, d_v]``, the dtype of ``q``: softmax over the valid entries of
        ``sm_scale * q . kv[idx]``, times ``kv[idx, :d_v]``; 0 for a query with no valid entry.
        lse (torch.Tensor): ``[B, S, H]``, float32 (float64 for float64 inputs): natural-log log-sum-exp of the valid
        scores alone (the sink excluded); ``-inf`` for a query with no valid entry.

    Differentiable in ``q``, ``kv`` (summed over every query and duplicate that used a row) and ``attn_sink``; the
    gradient also flows through ``lse``.
    """
    validation.check_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
    return sparse_mla_impl(q, kv, indices, float(sm_scale), int(d_v), topk_length, attn_sink)


def sparse_mla_impl(
    q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int, topk_length: OptTensor, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_mla` without validation, for callers that validated the inputs already (``dsa.ops``)."""
    return _SparseMLA.apply(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)


def dense_masked_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    mask: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious full-matrix masked attention, used only as an oracle.

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``; kv (torch.Tensor): ``[B, S_kv, d_qk]`` (same floating dtype).
        mask (torch.Tensor): ``[B, S, S_kv]`` or ``[B, S, H, S_kv]``, bool: True where a key takes part.
        sm_scale (float), d_v (int), attn_sink (torch.Tensor | None ``[H]``): as in ``sparse_mla``.

    Returns:
        ``(out [B, S, H, d_v] in q's dtype, lse [B, S, H])`` with the conventions of ``sparse_mla``.
    """
    dtype = compute_dtype(q.dtype)
    scores = torch.einsum("bshd,btd->bsht", q.to(dtype), kv.to(dtype)) * sm_scale
    full_mask = mask.unsqueeze(2) if mask.dim() == 3 else mask
    scores = scores.masked_fill(~full_mask, float("-inf"))
    # logsumexp over an all -inf row has a NaN gradient; compute it on zeros there and put -inf back afterwards.
    empty = ~full_mask.any(dim=-1).expand(scores.shape[:-1])
    lse = torch.logsumexp(scores.masked_fill(empty.unsqueeze(-1), 0.0), dim=-1).masked_fill(empty, float("-inf"))
    p = _probabilities(scores, _effective_lse(lse, attn_sink))
    out = torch.einsum("bsht,btd->bshd", p, kv[..., :d_v].to(dtype))
    return out.to(q.dtype), lse


def _cache_layout(kv_cache: Tensor, width: int, d_rope: int, name: str) -> cache.FP8Layout | None:
    """The FP8 row layout of a paged cache tensor (``None`` for a plain cache of ``width``-wide rows), after checking
    that its rows fit ``width`` and ``d_rope``."""
    if kv_cache.dim() != 3:
        raise ValueError(f"sparse_mla_decode: {name} must be [num_pages, page_size, row], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        if not 0 <= d_rope < width:
            raise ValueError(f"sparse_mla_decode: d_rope must lie in [0, {width}) for {width}-wide rows, got {d_rope}")
        layout = cache.FP8Layout.for_width(width, d_rope)
        if kv_cache.shape[-1] != layout.bytes_per_token:
            raise ValueError(
                f"sparse_mla_decode: {name} holds {kv_cache.shape[-1]}-byte FP8 rows; a {width}-wide row with "
                f"{d_rope} RoPE values takes {layout.bytes_per_token} ({layout})"
            )
        return layout
    if kv_cache.shape[-1] != width:
        raise ValueError(f"sparse_mla_decode: {name} rows must be {width} wide (q's last dim), got {kv_cache.shape[-1]}")
    return None


def _per_query_lengths(topk_length: OptTensor, rows: int) -> OptTensor:
    """``topk_length`` (``[B]`` or ``[B, s_q]``) as ``[B * s_q]``: a ``[B]`` length applies to every query of its
    sequence."""
    if topk_length is None:
        return None
    if topk_length.dim() == 1:
        topk_length = topk_length.view(-1, 1).expand(-1, rows // topk_length.shape[0])
    return topk_length.reshape(rows)


def _source_rows(
    kv_cache: Tensor, layout: cache.FP8Layout | None, slots: Tensor, topk_length: OptTensor, width: int
) -> tuple[Tensor, Tensor]:
    """The cache rows that the valid entries of ``slots`` name, and nothing else: gathered first, then (FP8)
    dequantised, so the work is O(entries), whatever the size of the cache.

    Args:
        kv_cache (Tensor): ``[num_pages, page_size, row]`` (any strides: rows are read by page and offset, the cache
            is never flattened or copied).
        layout (FP8Layout | None): the FP8 row layout, None for a plain cache.
        slots (Tensor): ``[n, topk]`` integer slots; valid iff ``0 <= slot < num_pages * page_size`` and (with
            ``topk_length [n]``) the entry's position in its row is ``< topk_length``.

    Returns:
        rows ``[n, topk, width]`` (bfloat16 for FP8 caches, the cache dtype otherwise; zero at invalid entries, which
        are never read) and valid ``[n, topk]`` bool.
    """
    page_size = kv_cache.shape[1]
    valid = (slots >= 0) & (slots < kv_cache.shape[0] * page_size)
    if topk_length is not None:
        position = torch.arange(slots.shape[-1], device=slots.device).view(1, -1)
        valid &= position < topk_length.view(-1, 1).to(torch.int64)
    picked = slots[valid].to(torch.int64)  # the valid entries only, row-major; duplicates once per occurrence
    stored = kv_cache[picked // page_size, picked % page_size]  # [n_valid, row]
    values = cache.dequantize_kv_fp8(stored, layout) if layout is not None else stored
    rows = values.new_zeros((*slots.shape, width))
    rows[valid] = values
    return rows, valid


def sparse_mla_decode(
    q: Tensor,
    kv_cache: Tensor,
    indices: Tensor,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: OptTensor = None,
    attn_sink: OptTensor = None,
    extra_kv_cache: OptTensor = None,
    extra_indices: OptTensor = None,
    extra_topk_length: OptTensor = None,
    d_rope: int = 64,
) -> tuple[Tensor, Tensor]:
    """Sparse MLA for decoding: the ``s_q`` newest queries of each sequence attend to cache slots.

    Args:
        q (Tensor): ``[B, s_q, H, d_qk]`` (``s_q`` = 1 plus speculative tokens).
        kv_cache (Tensor): the pages of a ``dsa.cache.PagedKVCache``: ``[num_pages, page_size, d_qk]`` in q's dtype
            (bf16 or float32), or ``[num_pages, page_size, bytes]`` uint8/int8/float8 bytes in the FP8 layout of a
            ``d_qk``-wide row with ``d_rope`` RoPE values (dequantised here, exactly as
            ``dsa.cache.dequantize_kv_fp8``).
        indices (Tensor): ``[B, s_q, topk]`` int32 slots (``page * page_size + offset``); ``-1`` or out of range is
            invalid and never read.
        sm_scale (float), d_v (int), attn_sink (Tensor | None ``[H]`` float32): as in :func:`sparse_mla`.
        topk_length (Tensor | None): ``[B]`` or ``[B, s_q]``: how many leading entries of each row count.
        extra_kv_cache, extra_indices, extra_topk_length: a second source (e.g. a sliding window) with the same
            conventions, joining the same softmax.
        d_rope (int): the RoPE width of FP8 rows (64 for V3.2).

    Returns:
        out ``[B, s_q, H, d_v]`` in q's dtype and lse ``[B, s_q, H]`` float32 (natural log, the sink excluded,
        ``-inf`` and ``out = 0`` for a query with nothing valid): :func:`sparse_mla` over the gathered rows.

    Cost: only the rows the valid entries name are read (and dequantised), so a call costs O(B * s_q * topk) rows
    whatever the cache holds; the caches may have any strides and are never copied. Queries are processed in chunks
    whose gathered rows stay under ``CHUNK_ELEMENTS``.
    """
    if q.dim() != 4 or indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(
            f"sparse_mla_decode: q must be [B, s_q, H, d_qk] and indices [B, s_q, topk], got {tuple(q.shape)} and "
            f"{tuple(indices.shape)}"
        )
    if (extra_kv_cache is None) != (extra_indices is None):
        raise ValueError("sparse_mla_decode: extra_kv_cache and extra_indices go together")
    batch, s_q, heads, width = q.shape
    n = batch * s_q
    # One decode query is one row of every source: [B * s_q, topk] slots and [B * s_q] lengths.
    sources = [(kv_cache, _cache_layout(kv_cache, width, d_rope, "kv_cache"), indices.reshape(n, -1),
                _per_query_lengths(topk_length, n))]  # fmt: skip
    if extra_kv_cache is not None:
        layout = _cache_layout(extra_kv_cache, width, d_rope, "extra_kv_cache")
        sources.append((extra_kv_cache, layout, extra_indices.reshape(n, -1), _per_query_lengths(extra_topk_length, n)))
    entries = sum(s[2].shape[-1] for s in sources)
    q_rows = q.reshape(n, 1, heads, width)
    out = torch.empty((n, 1, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, 1, heads), dtype=compute_dtype(q.dtype), device=q.device)
    step = _chunk_rows(entries * max(width, heads), n)
    for r0 in range(0, n, step):
        r = slice(r0, min(n, r0 + step))
        gathered = [_source_rows(c, layout, slots[r], None if length is None else length[r], width)
                    for c, layout, slots, length in sources]  # fmt: skip
        rows = torch.cat([g[0] for g in gathered], dim=1).to(q.dtype)  # [c, entries, width]
        valid = torch.cat([g[1] for g in gathered], dim=1)
        # Each query attends to its own gathered rows: position j of its row, -1 where the entry was invalid.
        local = torch.arange(entries, device=q.device).to(torch.int32).expand(valid.shape)
        local = torch.where(valid, local, INVALID_INDEX).unsqueeze(1)
        out[r], lse[r] = sparse_mla(q_rows[r], rows, local, sm_scale=sm_scale, d_v=d_v, attn_sink=attn_sink)
    return out.view(batch, s_q, heads, d_v), lse.view(batch, s_q, heads)


def index_topk_decode(
    q: Tensor,
    k_cache: Tensor,
    weights: Tensor,
    topk: int,
    *,
    block_table: Tensor,
    ends: Tensor,
    starts: OptTensor = None,
    return_scores: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The indexer's top-k for decoding: the ``s_q`` new queries of each sequence against its keys in a paged cache.

    Args:
        q (Tensor): ``[B, s_q, H_i, D_i]``, as in :func:`index_scores` (FP8, bf16, float32/float64).
        k_cache (Tensor): ``[num_pages, page_size, D_i]`` in q's dtype, or for FP8 ``q`` the FP8 key rows
            ``[num_pages, page_size, D_i + 4]`` uint8 (``dsa.cache.index_key_layout``: the key's FP8 bytes, then its
            float32 scale).
        weights (Tensor): ``[B, s_q, H_i]`` float32.
        topk (int): ``>= 1``.
        block_table (Tensor): ``[B, pages_per_sequence]`` int32 (``dsa.cache.PagedKVCache.block_table``).
        ends, starts (Tensor): ``[B, s_q]`` int32: query ``t`` of sequence ``b`` sees the key positions ``starts <= s
            < ends`` (``starts`` default 0; for the newest tokens of sequences of ``L`` cached tokens, ``ends = L -
            s_q + t + 1``). A position whose page entry is negative, or whose slot lies past the cache, is invisible.
            The op has no record of which rows were written: ``ends`` must not pass a sequence's written length,
            or the rows past it are scored as they are stored (a fresh ``PagedKVCache`` holds zero keys there,
            which score 0). ``dsa.generation.select_from_cache`` clamps ``ends`` to the cache's ``seq_lens``.
        return_scores (bool): also return the selected positions' scores.

    Returns:
        indices ``[B, s_q, topk]`` int32 logical **positions** (map them with ``dsa.cache.positions_to_slots``), a set
        per row, ``-1`` padding, ties to the smaller position; with ``return_scores`` also their scores (float32,
        ``-inf`` at padding): :func:`index_topk` over the keys gathered through the block table.
    """
    batch = q.shape[0]
    page_size = k_cache.shape[1]
    # Keys at or past every query's end are invisible: read positions up to the largest end only, so the cost follows
    # the context, not the block table's (or the cache's) capacity.
    horizon = max(1, min(block_table.shape[1] * page_size, int(ends.max())))
    positions = torch.arange(horizon, device=q.device).expand(batch, -1)
    table = block_table[:, : -(-horizon // page_size)]  # the pages those positions lie on
    slots = cache.positions_to_slots(table, page_size, positions, num_slots=k_cache.shape[0] * page_size)
    # Read by page and offset (any strides; the cache is never flattened or copied). An invalid slot reads row 0 of
    # page 0, and its score is replaced by -inf below.
    safe = slots.clamp_min(0).to(torch.int64)
    rows = k_cache[safe // page_size, safe % page_size]
    k_scale = None
    if q.dtype in validation.FP8_DTYPES:
        k, k_scale = cache.unpack_index_keys_fp8(rows, q.shape[-1])
    else:
        k = rows
    if starts is None:
        starts = torch.zeros_like(ends)
    scores = index_scores(q, k, weights, k_scale=k_scale, starts=starts, ends=ends)
    scores = scores.masked_fill((slots < 0).unsqueeze(1), float("-inf"))
    indices = topk_indices(scores, topk)
    if not return_scores:
        return indices
    picked = scores.gather(-1, indices.clamp_min(0).long()).masked_fill(indices < 0, float("-inf"))
    return indices, picked

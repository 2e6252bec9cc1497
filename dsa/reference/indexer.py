"""The lightning indexer's scores: which keys a query sees and how much it wants them (``index_scores``)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsa import validation
from dsa.reference.common import OptTensor, _chunk_rows, compute_dtype


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

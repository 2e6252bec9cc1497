"""The indexer's backward in PyTorch for both backends (there is no indexer backward kernel): ``index_scores_bwd`` over
every key and ``index_topk_bwd`` over the selected keys, both recomputing the logits one chunk of query rows at a time,
sharing the per-chunk math (:func:`chunk_grads`). ``dsa.library`` registers them as the ``dsa::`` primitives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsa import reference
from dsa.reference import compute_dtype

__all__ = ["chunk_grads", "grads_out", "index_scores_bwd_impl", "index_topk_bwd_impl", "new_grads"]

OptTensor = Tensor | None

# Bound the index_scores backward's largest intermediate ([B, rows, H_i, S_kv] float32) like the reference does.
_BWD_CHUNK_ELEMENTS = 1 << 24


def index_scores_bwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    d_scores: torch.Tensor,
    need_qk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``index_scores`` by recomputation, in float32 (float64 for float64 inputs), chunked over queries.

    With ``G = d_scores * k_scale`` on visible positions (0 elsewhere) and ``L = q . k``:
    ``dweights[t, j] = sum_s G[t, s] relu(L[t, j, s])``, ``dL = G * weights * (L > 0)``, ``dq = dL k``, ``dk = dL^T q``.

    Args:
        q ``[B, S, H_i, D_i]``, k ``[B, S_kv, D_i]``, weights ``[B, S, H_i]``, k_scale ``[B, S_kv]`` or None,
        starts/ends ``[B, S]`` int32 or None: the forward's inputs.
        d_scores (torch.Tensor): ``[B, S, S_kv]``, float: the gradient of the scores (ignored where invisible).
        need_qk (bool): compute ``dq``/``dk``; when False they are returned empty (``[0]``), e.g. for FP8 inputs.

    Returns:
        dq ``[B, S, H_i, D_i]`` (q's dtype), dk ``[B, S_kv, D_i]`` (k's dtype), dweights ``[B, S, H_i]`` (weights'
        dtype).
    """
    batch, seq, heads, _ = q.shape
    seq_kv = k.shape[1]
    dtype = compute_dtype(q.dtype)
    kf = k.to(dtype)
    dw, dq, dk = new_grads(q, k, need_qk)
    step = max(1, min(seq, _BWD_CHUNK_ELEMENTS // max(1, batch * heads * seq_kv)))
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        visible = reference.visibility_mask(batch, seq, seq_kv, starts=starts, ends=ends, rows=rows, device=q.device)
        # where (not a product): the upstream gradient at -inf positions may be anything, NaN included.
        g = torch.where(visible, d_scores[:, rows].to(dtype), torch.zeros((), dtype=dtype, device=q.device))
        if k_scale is not None:
            g = g * k_scale.to(dtype).unsqueeze(1)
        dw[:, rows], dq_c, dk_c = chunk_grads(q[:, rows].to(dtype), kf, "bkd", g, weights[:, rows], need_qk)
        if need_qk:
            dq[:, rows] = dq_c
            dk += dk_c
    return grads_out(q, k, weights, dw, dq, dk)


def index_topk_bwd_impl(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, indices: Tensor, d_scores: Tensor, need_qk: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``index_topk``'s scores by recomputation at the selected keys, chunked over queries.

    The formula of ``index_scores_bwd_impl`` restricted to the gathered keys ``k[indices]``: with ``G = d_scores *
    k_scale[idx]`` at valid entries (0 at ``-1`` padding, whatever ``d_scores`` holds there) and ``L = q . k[idx]``:
    ``dweights = sum_i G relu(L)``, ``dL = G * weights * (L > 0)``, ``dq = dL k[idx]``, ``dk[idx] += dL^T q``.

    Args:
        q ``[B, S, H_i, D_i]``, k ``[B, S_kv, D_i]``, weights ``[B, S, H_i]``, k_scale ``[B, S_kv]`` or None: the
        forward's inputs. indices ``[B, S, topk]`` int32: the selection. d_scores ``[B, S, topk]``: the scores'
        gradient. need_qk (bool): compute ``dq``/``dk`` (False: returned empty, e.g. for FP8 inputs).

    Returns:
        dq ``[B, S, H_i, D_i]`` (q's dtype), dk ``[B, S_kv, D_i]`` (k's dtype), dweights ``[B, S, H_i]`` (weights').
    """
    batch, seq, heads, dim = q.shape
    seq_kv, top = k.shape[1], indices.shape[-1]
    dtype = compute_dtype(q.dtype)
    dw, dq, dk = new_grads(q, k, need_qk)
    valid = reference.valid_index_mask(indices, seq_kv)
    rows_all = torch.where(valid, indices.to(torch.int64), 0)
    b = torch.arange(batch, device=q.device).view(batch, 1, 1)
    step = max(1, min(seq, _BWD_CHUNK_ELEMENTS // max(1, batch * top * max(heads, dim))))
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        key_rows = rows_all[:, rows]
        k_sel = k[b, key_rows].to(dtype)  # [B, c, topk, D_i]
        g = torch.where(valid[:, rows], d_scores[:, rows].to(dtype), torch.zeros((), dtype=dtype, device=q.device))
        if k_scale is not None:
            g = g * k_scale.to(dtype)[b, key_rows]
        dw[:, rows], dq_c, dk_sel = chunk_grads(
            q[:, rows].to(dtype), k_sel, "btkd", g, weights[:, rows], need_qk
        )
        if need_qk:
            dq[:, rows] = dq_c
            dk.view(batch * seq_kv, dim).index_add_(0, (b * seq_kv + key_rows).reshape(-1), dk_sel.reshape(-1, dim))
    return grads_out(q, k, weights, dw, dq, dk)


def new_grads(q: Tensor, k: Tensor, need_qk: bool) -> tuple[Tensor, OptTensor, OptTensor]:
    """The indexer backward's accumulators in the compute dtype: ``dweights [B, S, H_i]`` (every element written),
    ``dq [B, S, H_i, D_i]`` (every element written) and ``dk [B, S_kv, D_i]`` (zeros: summed into), the last two
    ``None`` unless ``need_qk``."""
    batch, seq, heads, dim = q.shape
    dtype, device = compute_dtype(q.dtype), q.device
    dw = torch.empty((batch, seq, heads), dtype=dtype, device=device)
    if not need_qk:
        return dw, None, None
    dq = torch.empty((batch, seq, heads, dim), dtype=dtype, device=device)
    return dw, dq, torch.zeros((batch, k.shape[1], dim), dtype=dtype, device=device)


def chunk_grads(
    q_c: Tensor, keys: Tensor, key_subscripts: str, g: Tensor, weights_c: Tensor, need_qk: bool
) -> tuple[Tensor, OptTensor, OptTensor]:
    """One chunk of query rows of the indexer backward (formula in :func:`index_scores_bwd_impl`).

    Args:
        q_c (Tensor): ``[B, c, H_i, D_i]``, the chunk's queries in the compute dtype.
        keys (Tensor): the keys in the compute dtype: every key ``[B, N, D_i]`` (``key_subscripts="bkd"``) or each
            query's gathered keys ``[B, c, N, D_i]`` (``"btkd"``).
        g (Tensor): ``[B, c, N]``, compute dtype: the scores' gradient times ``k_scale``, 0 where not visible.
        weights_c (Tensor): ``[B, c, H_i]``, the chunk's head weights (any float dtype).

    Returns:
        dweights ``[B, c, H_i]``; with ``need_qk`` dq ``[B, c, H_i, D_i]`` and dkeys (``keys``' shape), else ``None``.
    """
    logits = torch.einsum(f"bthd,{key_subscripts}->bthk", q_c, keys)
    dw = torch.einsum("btk,bthk->bth", g, torch.relu(logits))
    if not need_qk:
        return dw, None, None
    d_logits = g.unsqueeze(2) * weights_c.to(g.dtype).unsqueeze(-1) * (logits > 0).to(g.dtype)
    dq = torch.einsum(f"bthk,{key_subscripts}->bthd", d_logits, keys)
    return dw, dq, torch.einsum(f"bthk,bthd->{key_subscripts}", d_logits, q_c)


def grads_out(
    q: Tensor, k: Tensor, weights: Tensor, dw: Tensor, dq: OptTensor, dk: OptTensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dweights)`` in the inputs' dtypes; ``dq``/``dk`` empty (``[0]``) where not computed (``None``)."""
    if dq is None or dk is None:
        empty = q.new_empty((0,), dtype=dw.dtype)
        return empty, empty.clone(), dw.to(weights.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(weights.dtype)

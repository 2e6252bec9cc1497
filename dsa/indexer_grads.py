"""What the indexer's two backwards in PyTorch share (there is no indexer backward kernel): ``dsa.library``'s
``index_scores_bwd_impl`` over every key and ``index_topk_bwd_impl`` over the selected keys recompute the logits one
chunk of query rows at a time, with one allocation (:func:`new_grads`), one per-chunk math (:func:`chunk_grads`) and
one output step (:func:`grads_out`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsa.reference import compute_dtype

__all__ = ["chunk_grads", "grads_out", "new_grads"]

OptTensor = Tensor | None


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
    """One chunk of query rows of the indexer backward (formula in ``dsa.library.index_scores_bwd_impl``).

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

"""The deliberately obvious full-matrix masked attention: an oracle for tests, never a path of the library."""

from __future__ import annotations

import torch

from dsa.reference.common import compute_dtype
from dsa.reference.mla import _effective_lse, _probabilities


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

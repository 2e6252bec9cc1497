"""FlashMLA-compatible entry points: ``flash_mla_sparse_fwd`` (sparse prefill, here) and the sparse decode pair
``get_mla_metadata``/``flash_mla_with_kvcache`` (re-exported from ``dsa.serving.flashmla_decode``, whose docstring gives
their conventions). ``dsa.compat`` re-exports all of them under their first public name.

``flash_mla_sparse_fwd`` takes FlashMLA's shapes (no batch dimension, an explicit single KV head) and returns its
triple ``(out, max_logits, lse)``, for both of FlashMLA's head sizes: V3.2's ``d_qk`` 576 (``d_v`` 512, the value the
first 512 columns of a row) and MODEL1's (DeepSeek-V4) ``d_qk = d_v = 512`` (K = V; FlashMLA's MODEL1 configs: 64
heads with top-k 512, 128 heads with top-k 1024). The conventions follow FlashMLA's ``tests/ref.py`` (the definition its docstring
points to, in the releases since January 2026):

- ``lse`` and ``max_logits`` are **natural-log** quantities of the scaled logits ``P = sm_scale * q . kv[idx]``:
  ``lse = logsumexp(P)``, ``max_logits = max(P)`` over the valid indices. FlashMLA's README and its first sparse
  release (September 2025) used base 2 (``P * log2(e)``, ``log2sumexp2``); pass ``base2=True`` for those values
  (both outputs multiplied by ``log2(e)``).
- A query with no valid index gets ``out = 0``, ``lse = +inf`` (FlashMLA's convention; ``dsa.ops.sparse_mla``
  returns ``-inf``) and ``max_logits = -inf``.
- ``attn_sink`` scales ``out`` by ``exp(lse) / (exp(lse) + exp(sink))`` and changes neither ``lse`` nor
  ``max_logits``; ``topk_length [s_q]`` keeps the first ``topk_length[i]`` entries of row ``i``.

``max_logits`` is not produced by the kernels: it is computed here in PyTorch, chunked over queries, at about the
cost of one extra pass over the gathered keys (no gradient flows through it). ``out`` and ``lse`` come from
``dsa.ops.sparse_mla`` and are differentiable like its outputs, although FlashMLA's own entry point is forward-only.
Every tensor may have any strides (FlashMLA's tests pass slices of padded buffers): the op lays them out for the
kernels, with one copy where needed.
"""

from __future__ import annotations

import math

import torch

from dsa import ops, reference
from dsa.serving.flashmla_decode import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

__all__ = ["LOG2_E", "FlashMLASchedMeta", "flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata"]

# Bound the [rows, h_q, topk] float32 logits that the max_logits pass holds at once.
_CHUNK_ELEMENTS = 1 << 24
LOG2_E = math.log2(math.e)


_OP = "flash_mla_sparse_fwd"


def _require_shape(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{_OP}: {name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")


def _max_logits(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, topk_length: torch.Tensor | None
) -> torch.Tensor:
    """``[s_q, h_q]`` float32 max of ``sm_scale * q . kv[idx]`` over valid indices, ``-inf`` for empty rows.

    q ``[s_q, h_q, d_qk]``, kv ``[s_kv, d_qk]``, indices ``[s_q, topk]`` int32, topk_length ``[s_q]`` int32 or None.
    """
    s_q, h_q, _ = q.shape
    s_kv, top = kv.shape[0], indices.shape[-1]
    valid = reference.valid_index_mask(
        indices.unsqueeze(0), s_kv, None if topk_length is None else topk_length.unsqueeze(0)
    ).squeeze(0)
    result = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    step = max(1, min(s_q, _CHUNK_ELEMENTS // max(1, h_q * top)))
    for t0 in range(0, s_q, step):
        rows = slice(t0, min(s_q, t0 + step))
        idx = torch.where(valid[rows], indices[rows].to(torch.int64), 0)
        logits = torch.einsum("shd,skd->shk", q[rows].float(), kv[idx].float()) * sm_scale
        result[rows] = logits.masked_fill(~valid[rows].unsqueeze(1), float("-inf")).amax(dim=-1)
    return result


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    *,
    base2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's ``flash_mla_sparse_fwd`` on top of ``dsa.ops.sparse_mla``.

    Args:
        q (torch.Tensor): ``[s_q, h_q, d_qk]``, bfloat16 (float32/float64 run the reference); ``d_qk`` 576 (V3.2)
            or 512 (MODEL1), any width here.
        kv (torch.Tensor): ``[s_kv, 1, d_qk]``, q's dtype (``h_kv`` must be 1).
        indices (torch.Tensor): ``[s_q, 1, topk]``, int32; ``-1`` or ``>= s_kv`` marks an invalid entry.
        sm_scale (float): softmax scale.
        d_v (int): value width (FlashMLA supports 512 only, ``= d_qk`` for MODEL1; any ``<= d_qk`` works here).
        attn_sink (torch.Tensor | None): ``[h_q]``, float32.
        topk_length (torch.Tensor | None): ``[s_q]``, int32.
        base2 (bool): return ``max_logits``/``lse`` in base 2 (FlashMLA's first sparse release and README).

    Returns:
        out ``[s_q, h_q, d_v]`` (q's dtype), max_logits ``[s_q, h_q]`` float32 (``-inf`` for an empty row),
        lse ``[s_q, h_q]`` float32 (``+inf`` for an empty row).
    """
    _require_shape("q", q, 3, "[s_q, h_q, d_qk]")
    _require_shape("kv", kv, 3, "[s_kv, h_kv=1, d_qk]")
    _require_shape("indices", indices, 3, "[s_q, h_kv=1, topk]")
    if kv.shape[1] != 1 or indices.shape[1] != 1:
        raise ValueError(
            f"{_OP}: kv [s_kv, h_kv, d_qk] and indices [s_q, h_kv, topk] must have h_kv = 1 (MLA's single latent head), "
            f"got kv {list(kv.shape)}, indices {list(indices.shape)}"
        )
    if topk_length is not None:
        _require_shape("topk_length", topk_length, 1, "[s_q]")
    kv2 = kv.squeeze(1)
    idx2 = indices.squeeze(1)
    out, lse = ops.sparse_mla(
        q.unsqueeze(0),
        kv2.unsqueeze(0),
        idx2.unsqueeze(0),
        sm_scale=sm_scale,
        d_v=d_v,
        topk_length=None if topk_length is None else topk_length.unsqueeze(0),
        attn_sink=attn_sink,
    )
    out, lse = out.squeeze(0), lse.squeeze(0).float()
    with torch.no_grad():
        max_logits = _max_logits(q, kv2, idx2, float(sm_scale), topk_length)
    # FlashMLA marks a query with nothing to attend to by lse = +inf (our op returns -inf there).
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    if base2:
        lse, max_logits = lse * LOG2_E, max_logits * LOG2_E
    return out, max_logits, lse

"""Sparse MLA forward and its backward math (``sparse_mla``, ``sparse_mla_backward``), chunked over queries."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dsa import validation
from dsa.reference.common import OptTensor, _chunk_rows, compute_dtype
from dsa.reference.sources import Source, chunk_entries, entry_width, flat_sources, sources_of, unflat_sources


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
    """Chunked sparse MLA over one or two sources whose backward recomputes the probabilities (no gathered KV is kept
    between passes). The sources travel flat (``dsa.reference.sources.flat_sources``)."""

    @staticmethod
    def forward(ctx, q, attn_sink, sm_scale, d_v, ranged, *flat):  # type: ignore[override]
        out, lse = _sparse_mla_forward(q, unflat_sources(ranged, flat), sm_scale, d_v, attn_sink)
        ctx.save_for_backward(q, attn_sink, out, lse, *flat)
        ctx.sm_scale, ctx.d_v, ctx.ranged = sm_scale, d_v, ranged
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):  # type: ignore[override]
        q, attn_sink, out, lse, *flat = ctx.saved_tensors
        sources = unflat_sources(ctx.ranged, flat)
        dq, dkvs, d_sink = sparse_mla_sources_backward(
            q, sources, ctx.sm_scale, ctx.d_v, attn_sink, out, lse, d_out, d_lse
        )
        return (dq, d_sink, None, None, None, *(g for dkv in dkvs for g in (dkv, None, None)))


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


def _chunk_plan(q: torch.Tensor, entries: int) -> int:
    """Query rows per chunk when each row gathers ``entries`` key rows (all sources together)."""
    batch, _, heads, d_qk = q.shape
    return _chunk_rows(batch * entries * max(d_qk, heads), q.shape[1])


def _chunk_scores(q_c, kv_c, valid_c, sm_scale):
    """Masked scaled logits ``[B, c, H, k]`` of one chunk (``-inf`` at invalid entries)."""
    scores = torch.einsum("bchd,bckd->bchk", q_c, kv_c) * sm_scale
    return scores.masked_fill(~valid_c.unsqueeze(2), float("-inf"))


def _chunk_keys(
    sources: Sequence[Source], rows: slice, dtype: torch.dtype
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """The key rows every source gives the query rows ``rows``, side by side: ``(keys [B, c, K, D] in dtype, valid
    [B, c, K] bool, per source (row numbers read [B, c, k_s] int64, valid [B, c, k_s]))``, ``K`` the sum of the
    sources' entry counts. One softmax runs over all ``K`` entries."""
    parts = []
    for source in sources:
        indices, valid = chunk_entries(source, rows)
        keys, idx = _gather_rows(source.kv, indices, valid, dtype)
        parts.append((keys, idx, valid))
    if len(parts) == 1:
        keys, idx, valid = parts[0]
        return keys, valid, [(idx, valid)]
    keys = torch.cat([p[0] for p in parts], dim=2)
    return keys, torch.cat([p[2] for p in parts], dim=-1), [(p[1], p[2]) for p in parts]


def _sparse_mla_forward(q, sources, sm_scale, d_v, attn_sink):
    batch, seq, heads, _ = q.shape
    dtype = compute_dtype(q.dtype)
    out = torch.empty((batch, seq, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, seq, heads), dtype=dtype, device=q.device)
    step = _chunk_plan(q, sum(entry_width(s) for s in sources))
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        kv_c, valid_c, _ = _chunk_keys(sources, rows, dtype)
        scores = _chunk_scores(q[:, rows].to(dtype), kv_c, valid_c, sm_scale)
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
    source = Source(kv, indices, topk_length, False)
    dq, (dkv,), d_sink = sparse_mla_sources_backward(q, (source,), sm_scale, d_v, attn_sink, out, lse, d_out, d_lse)
    return dq, dkv, d_sink


def sparse_mla_sources_backward(
    q: Tensor, sources: Sequence[Source], sm_scale: float, d_v: int, attn_sink: OptTensor, out: Tensor, lse: Tensor,
    d_out: OptTensor, d_lse: OptTensor,
) -> tuple[Tensor, list[Tensor], OptTensor]:  # fmt: skip
    """:func:`sparse_mla_backward` over one softmax across ``sources`` (``dsa.reference.sources.Source``): ``(dq
    [B, S, H, d_qk] q's dtype, [dkv [B, S_kv_s, d_qk] per source, in its kv's dtype], d_sink [H] or None)``."""
    batch, seq, heads, d_qk = q.shape
    dtype = compute_dtype(q.dtype)
    dq = torch.zeros((batch, seq, heads, d_qk), dtype=dtype, device=q.device)
    dkvs = [torch.zeros((batch * s.kv.shape[1], d_qk), dtype=dtype, device=q.device) for s in sources]
    d_sink = torch.zeros((heads,), dtype=dtype, device=q.device) if attn_sink is not None else None
    log_denominator = _effective_lse(lse.to(dtype), attn_sink)
    step = _chunk_plan(q, sum(entry_width(s) for s in sources))
    batch_index = torch.arange(batch, device=q.device).view(batch, 1, 1)
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        kv_c, valid_c, per_source = _chunk_keys(sources, rows, dtype)
        q_c = q[:, rows].to(dtype)
        scores = _chunk_scores(q_c, kv_c, valid_c, sm_scale)
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
        grad_kv = grad_kv * valid_c.unsqueeze(-1)
        start = 0
        for dkv, source, (idx, _) in zip(dkvs, sources, per_source):
            width = idx.shape[-1]
            flat = (batch_index * source.kv.shape[1] + idx).reshape(-1)
            dkv.index_add_(0, flat, grad_kv[:, :, start : start + width].reshape(-1, d_qk))
            start += width
    d_sink_out = d_sink.to(attn_sink.dtype) if d_sink is not None else None
    dkvs = [dkv.view(batch, s.kv.shape[1], d_qk).to(s.kv.dtype) for dkv, s in zip(dkvs, sources)]
    return dq.to(q.dtype), dkvs, d_sink_out


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    ranges: torch.Tensor | None = None,
    extra_kv: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    extra_ranges: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse multi-head latent attention over selected key positions, from one or two sources in one softmax.

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16 (the reference also takes float32/float64).
        kv (torch.Tensor): ``[B, S_kv, d_qk]``, the same dtype as ``q``: one latent head shared by every query head;
            the value is ``kv[..., :d_v]`` (``d_v = d_qk``: K = V).
        indices (torch.Tensor | None): ``[B, S, k]``, int32. An entry is valid iff ``0 <= idx < S_kv`` and, with
            ``topk_length``, its position in the row is ``< topk_length[b, t]``. Invalid entries are ignored and
            never read. Valid duplicates count once per occurrence (gather semantics). No causal masking here.
            None when ``ranges`` is given (exactly one of the two).
        sm_scale (float): softmax scale, required (V3.2 uses ``192**-0.5 * mscale**2``).
        d_v (int): value width, ``1 <= d_v <= d_qk``.
        topk_length (torch.Tensor | None): ``[B, S]``, int32: how many leading entries of each row count (with
            ``indices`` only).
        attn_sink (torch.Tensor | None): ``[H]``, float32: an extra logit per head in the softmax denominator with
            no value row.
        ranges (torch.Tensor | None): ``[B, S, 2]``, int32 ``(start, end)`` per query, instead of ``indices``: the
            entries are rows ``start .. end - 1`` of ``kv`` (entry ``j`` is row ``start + j``, valid iff
            ``start + j < end`` and ``0 <= start + j < S_kv``; an empty or negative range is valid and empty). No
            ``[S, range length]`` index tensor is built (DeepSeek-V4's window ``[t - 127, t + 1)`` and HCA's
            ``[0, (t + 1) // 128)``).
        extra_kv (torch.Tensor | None): ``[B, S_extra, d_qk]``, kv's dtype and device: a second source whose valid
            entries join the same softmax (DeepSeek-V4: the window and the compressed entries).
        extra_indices, extra_topk_length, extra_ranges: the second source's entries, as ``indices``,
            ``topk_length`` and ``ranges`` are the first's (exactly one of ``extra_indices``/``extra_ranges`` with
            ``extra_kv``, none without it).

    Returns:
        out (torch.Tensor): ``[B, S, H, d_v]``, the dtype of ``q``: softmax over the valid entries of both sources
        of ``sm_scale * q . row``, times ``row[:d_v]``; 0 for a query with no valid entry.
        lse (torch.Tensor): ``[B, S, H]``, float32 (float64 for float64 inputs): natural-log log-sum-exp of the valid
        scores of both sources alone (the sink excluded); ``-inf`` for a query with no valid entry.

    Differentiable in ``q``, ``kv`` and ``extra_kv`` (summed over every query and duplicate that used a row) and
    ``attn_sink``; the gradient also flows through ``lse``.
    """
    extra = validation.SourceArgs(extra_kv, extra_indices, extra_topk_length, extra_ranges)
    validation.check_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink, ranges=ranges, extra=extra)
    sources = sources_of(validation.SourceArgs(kv, indices, topk_length, ranges), extra)
    return sparse_mla_sources_impl(q, sources, float(sm_scale), int(d_v), attn_sink)


def sparse_mla_impl(
    q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int, topk_length: OptTensor, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_mla` of one index list without validation, for callers that validated the inputs already."""
    return _SparseMLA.apply(q, attn_sink, sm_scale, d_v, (False,), kv, indices, topk_length)


def sparse_mla_sources_impl(
    q: Tensor, sources: Sequence[Source], sm_scale: float, d_v: int, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_mla` over ``sources`` (``dsa.reference.sources.Source``, one or two) without validation."""
    ranged, flat = flat_sources(sources)
    return _SparseMLA.apply(q, attn_sink, sm_scale, d_v, ranged, *flat)

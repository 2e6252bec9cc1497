"""``sparse_mla`` over ranged or two sources on the kernels: one launch of the existing kernels per source, combined.

Forward: each source runs the forward kernel WITHOUT the sink, giving ``(out_k, lse_k)`` (softmax over that source's
valid entries alone). One softmax over the union is then exact: ``lse = logaddexp(lse_1, lse_2)`` and, with the sink
joining the denominator ``L = logaddexp(lse, sink)``, ``out = sum_k exp(lse_k - L) out_k``. The weights follow the
reference's convention for an empty row (``L = -inf`` is replaced by 0, so an empty source weighs exactly 0 and an
all-empty row gives ``out = 0``), so NaN and infinities land where the reference puts them: a NaN or ``+inf`` score
makes its ``lse_k`` and so ``L`` NaN/``+inf`` and every weight NaN; a ``+inf`` sink gives weights 0.

Backward: for one softmax over a union, an entry's gradient depends only on its score, the total ``lse``, the sink,
``out``, ``d_out`` and ``d_lse``, so the backward kernel called per source with the COMBINED ``out``/``lse`` (and the
sink) gives exactly that source's ``dkv`` and its share of ``dq``; ``dq`` is their sum. (``d_sink`` is
``dsa.library.attn_sink_grad`` on the totals, in ``dsa.autograd``.)

A ranged source runs through the kernels' ranged form (``ranged=True``: the ranges ``[B, S, 2]`` passed as
``indices``, each query reading its own rows), so no ``S x range length`` index list exists on this path either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dsa.launch import launcher
from dsa.reference.sources import Source

OptTensor = Tensor | None

# Looked up at every call (``dsa.launch.launcher``), as ``dsa.library`` does, so a test's spy launcher is the one run.
_FWD_LAUNCHER = "dsa.launch.sparse_mla_fwd"
_BWD_LAUNCHER = "dsa.launch.sparse_mla_bwd"

__all__ = ["combine", "sparse_mla_sources_bwd", "sparse_mla_sources_fwd"]


def _source_fwd(q: Tensor, source: Source, sm_scale: float, d_v: int) -> tuple[Tensor, Tensor]:
    """``(out [B, S, H, d_v] bf16, lse [B, S, H] float32)`` of the softmax over ``source``'s entries alone."""
    return launcher(_FWD_LAUNCHER).sparse_mla_fwd(q, source.kv, source.indices, sm_scale=sm_scale, d_v=d_v,
                                                 topk_length=source.topk_length, ranged=source.ranged)  # fmt: skip


_COMBINE_ELEMENTS = 1 << 25
"""Elements of one float32 temporary of the combines (128 MiB): they walk the query rows in chunks, so a V4 prefill
(``[1, 64K, 64, 512]`` outputs: 4 GiB in bf16) never holds a float32 copy of a whole output."""


def _row_chunks(t: Tensor) -> list[slice]:
    """Chunks of the query rows (dim 1) of ``t [B, S, ...]`` with at most :data:`_COMBINE_ELEMENTS` elements."""
    per_row = max(1, t[:, :1].numel())
    step = max(1, _COMBINE_ELEMENTS // per_row)
    return [slice(t0, min(t.shape[1], t0 + step)) for t0 in range(0, t.shape[1], step)]


def combine(parts: Sequence[tuple[Tensor, Tensor]], attn_sink: OptTensor) -> tuple[Tensor, Tensor]:
    """One softmax from per-source ones: ``parts`` = ``(out_k [B, S, H, d_v], lse_k [B, S, H] float32)`` each over
    its own entries without the sink; ``attn_sink [H]`` float32 or None. Returns ``(out [B, S, H, d_v] in out_k's
    dtype, lse [B, S, H] float32)`` with ``lse = logaddexp`` of the parts (sink excluded, as the contract says).
    ``out`` is written into the first part's output (a fresh kernel output), in float32 one chunk of rows at a time.
    """
    lse = parts[0][1]
    for _, lse_k in parts[1:]:
        lse = torch.logaddexp(lse, lse_k)
    denominator = lse if attn_sink is None else torch.logaddexp(lse, attn_sink.to(lse.dtype).view(1, 1, -1))
    # The reference's stand-in for an empty row: exp(-inf - 0) = 0, never exp(-inf - -inf) = NaN.
    safe = torch.where(torch.isneginf(denominator), torch.zeros_like(denominator), denominator)
    weights = [torch.exp(lse_k - safe).unsqueeze(-1) for _, lse_k in parts]
    out = parts[0][0]
    for rows in _row_chunks(out):
        acc = out[:, rows].float().mul_(weights[0][:, rows])
        for (out_k, _), weight in zip(parts[1:], weights[1:]):
            acc.addcmul_(out_k[:, rows].float(), weight[:, rows])
        out[:, rows] = acc
    return out, lse


def sparse_mla_sources_fwd(
    q: Tensor, sources: Sequence[Source], sm_scale: float, d_v: int, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """``sparse_mla`` (contract: ``dsa.reference.sparse_mla``) over ``sources`` (one or two
    ``dsa.reference.sources.Source``, at least one ranged or two of them) on the kernels: bf16 inputs laid out by
    the op. Returns ``(out [B, S, H, d_v] bfloat16, lse [B, S, H] float32)``."""
    parts = [_source_fwd(q, source, sm_scale, d_v) for source in sources]
    if len(parts) == 1 and attn_sink is None:
        return parts[0]
    return combine(parts, attn_sink)


def _source_bwd(
    q: Tensor, source: Source, sm_scale: float, d_v: int, attn_sink: OptTensor, out: Tensor, lse: Tensor,
    d_out: Tensor, d_lse: OptTensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(dq [B, S, H, d_qk] bf16, dkv [B, S_kv, d_qk] bf16)`` of ``source``'s entries under the combined softmax."""
    return launcher(_BWD_LAUNCHER).sparse_mla_bwd(q, source.kv, out, lse, d_out, source.indices, sm_scale=sm_scale,
                                                 d_v=d_v, topk_length=source.topk_length, attn_sink=attn_sink,
                                                 d_lse=d_lse, ranged=source.ranged)  # fmt: skip


def sparse_mla_sources_bwd(
    q: Tensor, sources: Sequence[Source], sm_scale: float, d_v: int, attn_sink: OptTensor, out: Tensor, lse: Tensor,
    d_out: Tensor, d_lse: OptTensor,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """Gradients of :func:`sparse_mla_sources_fwd` for ``q`` and each source's ``kv``: ``(dq [B, S, H, d_qk] q's
    dtype, [dkv [B, S_kv, d_qk] per source])``. ``out``/``lse`` are the combined forward's, ``d_out`` has ``out``'s
    dtype, ``d_lse`` is float32 or None; all row-major."""
    grads = [_source_bwd(q, source, sm_scale, d_v, attn_sink, out, lse, d_out, d_lse) for source in sources]
    dq = grads[0][0]  # a fresh kernel output: the sum is written into it, one chunk of rows at a time
    for rows in _row_chunks(dq) if len(grads) > 1 else ():
        acc = dq[:, rows].float()
        for dq_k, _ in grads[1:]:
            acc += dq_k[:, rows].float()
        dq[:, rows] = acc
    return dq, [dkv for _, dkv in grads]

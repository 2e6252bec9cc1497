"""The autograd Functions over the ``dsa::`` primitives (``dsa.library``): they only manage ``ctx``.

Gradients:
- ``sparse_mla``: ``dq``, ``dkv`` (and ``d extra_kv`` for a second source: one backward per source against the
  combined ``out``/``lse``) and ``d attn_sink``, from the gradients of both
  outputs: a loss may use ``lse`` (e.g. to merge partial attention results), and its gradient reaches ``dq``/``dkv``
  through the backward kernel's ``d_lse`` input. The sink gradient is computed in PyTorch from ``out``, ``d_out`` and ``lse``
  (``-sum_{b,t} p_sink * rowsum(out * d_out)``; ``lse`` excludes the sink, so ``d_lse`` adds nothing to it), the same
  for both backends.
- ``index_scores``: gradients for ``q``/``k`` when they are floating point (bfloat16, float32, float64) and for
  ``weights`` always. FP8 ``q``/``k`` get none (quantisation has no useful derivative); ``weights`` still trains.
  Positions that are invisible (score ``-inf``) receive no gradient.
- ``topk_indices``: integer output, no gradient.
- ``index_topk``: no gradient to the indices; the selected scores have the gradients of ``index_scores`` at the
  selected positions (``-inf`` padding receives none).

The primitives' names (``call_*``, the ``*_impl`` implementations, ``launcher``, ``unfused_index_topk``) are
re-exported here for the callers that reach them as ``dsa.autograd.*`` (``dsa.ops``, the benchmark's providers, tests).
"""

from __future__ import annotations

import torch

from dsa import library
from dsa.library import (  # noqa: F401 - re-exported: dsa.ops, the benchmark and tests reach them here
    OptTensor,
    attn_sink_grad,
    call,
    call_index_scores,
    call_index_topk,
    call_sparse_mla_decode,
    call_topk_indices,
    index_scores_bwd_impl,
    index_scores_impl,
    index_topk_bwd_impl,
    index_topk_decode_impl,
    index_topk_impl,
    launcher,
    sparse_mla_bwd_impl,
    sparse_mla_decode_impl,
    sparse_mla_impl,
    sparse_mla_sources_bwd_impl,
    sparse_mla_sources_impl,
    topk_indices_impl,
    unfused_index_topk,
)
from dsa.validation import FP8_DTYPES


def _needs_qk_grads(ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor) -> bool:
    """Whether an indexer backward computes ``dq``/``dk``: ``q`` or ``k`` (the Function's first two inputs) wants a
    gradient and they are floating (FP8 inputs have none)."""
    return q.dtype not in FP8_DTYPES and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])


def _wanted_indexer_grads(
    ctx: torch.autograd.function.FunctionCtx, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], need_qk: bool
) -> tuple[OptTensor, OptTensor, OptTensor]:
    """``(dq, dk, dweights)`` of an indexer backward, ``None`` for each input (``q``, ``k``, ``weights``: the first
    three of the Function) that needs none; ``dq``/``dk`` exist only with ``need_qk``."""
    dq, dk, dw = grads
    return (
        dq if need_qk and ctx.needs_input_grad[0] else None,
        dk if need_qk and ctx.needs_input_grad[1] else None,
        dw if ctx.needs_input_grad[2] else None,
    )


class IndexScoresFunction(torch.autograd.Function):
    """``index_scores`` with gradients for ``q``, ``k`` (floating inputs only) and ``weights``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_scale: OptTensor, starts: OptTensor,
        ends: OptTensor, backend: str,
    ) -> torch.Tensor:
        scores = library.call("index_scores", q, k, weights, k_scale, starts, ends, backend)
        ctx.save_for_backward(q, k, weights, k_scale, starts, ends)
        return scores

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_scores: torch.Tensor) -> tuple:  # type: ignore[override]
        q, k, weights, k_scale, starts, ends = ctx.saved_tensors
        need_qk = _needs_qk_grads(ctx, q)
        grads = library.call("index_scores_bwd", q, k, weights, k_scale, starts, ends, d_scores, need_qk)
        return (*_wanted_indexer_grads(ctx, grads, need_qk), None, None, None, None)


class IndexTopkFunction(torch.autograd.Function):
    """``index_topk`` with gradients of the selected scores for ``q``, ``k`` (floating inputs only) and ``weights``;
    the indices are not differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_scale: OptTensor, starts: OptTensor,
        ends: OptTensor, topk: int, backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices, scores = library.call("index_topk", q, k, weights, k_scale, starts, ends, topk, backend)
        ctx.save_for_backward(q, k, weights, k_scale, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return indices, scores

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_indices: OptTensor, d_scores: OptTensor
    ) -> tuple:
        if d_scores is None:
            return (None,) * 8
        q, k, weights, k_scale, indices = ctx.saved_tensors
        need_qk = _needs_qk_grads(ctx, q)
        grads = library.call("index_topk_bwd", q, k, weights, k_scale, indices, d_scores, need_qk)
        return (*_wanted_indexer_grads(ctx, grads, need_qk), None, None, None, None, None)


class SparseMLAFunction(torch.autograd.Function):
    """``sparse_mla`` over one or two sources with gradients for ``q``, ``kv``, ``extra_kv`` and ``attn_sink`` from
    the gradients of ``out`` and ``lse``. ``entries`` are a source's indices or, when its ``ranged`` flag is set, its
    ranges. The forward is ``dsa::sparse_mla`` for one index list (the sink inside the kernel) and
    ``dsa::sparse_mla_sources`` otherwise (:func:`sparse_mla_forward`); the backward is ``dsa::sparse_mla_sources_bwd``
    for both."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, topk_length: OptTensor, extra_kv: OptTensor,
        extra_entries: OptTensor, extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, sm_scale: float,
        d_v: int, attn_sink: OptTensor, backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sources = (q, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length, ranged, extra_ranged)
        out, lse = sparse_mla_forward(*sources, sm_scale, d_v, attn_sink, backend)
        ctx.save_for_backward(q, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length, attn_sink, out,
                              lse)  # fmt: skip
        ctx.ranged, ctx.sm_scale, ctx.d_v, ctx.backend = (ranged, extra_ranged), sm_scale, d_v, backend
        # Unused outputs' gradients arrive as None instead of materialised zeros: no d_lse work when the loss
        # ignores lse (the common case).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: OptTensor, d_lse: OptTensor
    ) -> tuple:
        *sources, attn_sink, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads: list[OptTensor] = [None] * len(need)
        if d_out is None and d_lse is None:
            return tuple(grads)
        if d_out is None:  # only lse reached the loss
            d_out = torch.zeros_like(out)
        kernel_inputs = (0, 1, 4)  # q, kv and extra_kv
        if any(need[i] for i in kernel_inputs):
            kernel_grads = library.call(
                "sparse_mla_sources_bwd", *sources, *ctx.ranged, out, lse, d_out, ctx.sm_scale, ctx.d_v, attn_sink,
                d_lse, ctx.backend,
            )  # fmt: skip
            for i, grad in zip(kernel_inputs, kernel_grads, strict=True):
                grads[i] = grad if need[i] else None
        sink_at = 11
        if attn_sink is not None and need[sink_at]:
            grads[sink_at] = library.attn_sink_grad(out, lse, d_out, attn_sink)
        return tuple(grads)


def sparse_mla_forward(
    q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, topk_length: OptTensor, extra_kv: OptTensor,
    extra_entries: OptTensor, extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, sm_scale: float,
    d_v: int, attn_sink: OptTensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, lse)`` of ``sparse_mla`` (arguments as :class:`SparseMLAFunction` takes them), no gradient: one index
    list runs ``dsa::sparse_mla`` (one kernel launch, the sink inside it), ranges or two sources
    ``dsa::sparse_mla_sources``."""
    if extra_kv is None and not ranged:
        return library.call("sparse_mla", q, kv, entries, sm_scale, d_v, topk_length, attn_sink, backend)
    return library.call(
        "sparse_mla_sources", q, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length, ranged,
        extra_ranged, sm_scale, d_v, attn_sink, backend,
    )  # fmt: skip

"""The public DSA ops: validate, choose the implementation, run it (with autograd where it applies).

Signatures and semantics are those of ``dsa.reference`` (the contract, also summarised in the README). Each call:

1. chooses the backend from the inputs' device and dtype and ``DSA_BACKEND`` (``dsa.hardware.select_backend``):
   TileLang kernels on Hopper GPUs (and on the CPU with ``DSA_BACKEND=tilelang``, as C-target kernels), the
   reference otherwise. Inputs whose dtype the kernels do not take (float32/float64) always run the reference;
2. validates the inputs with ``dsa.validation`` (the kernel rules when the kernels will run), before any custom op,
   so that a bad input raises a clear ``ValueError``/``TypeError`` naming the argument;
3. when the kernels will run, lays every tensor input out as they read it (``dsa.validation.kernel_layout``: row-major,
   16-byte aligned). Any strides are accepted on every backend: a transposed, sliced or expanded input is copied
   once, here (differentiably, so gradients reach the strided original); an input already in that layout is passed
   as it is. The reference takes any strides as they are;
4. runs the primitive: in eager mode the implementation is called directly, under ``torch.compile`` through the
   ``dsa::*`` custom ops registered in ``dsa.autograd`` (fake implementations included, so ``fullgraph=True``
   works). The backend is chosen when a graph is traced: a compiled graph keeps the implementation it was traced
   with.

Gradients: ``sparse_mla`` for ``q``, ``kv``, ``attn_sink`` (through ``out`` and ``lse``); ``index_scores`` for
``weights`` and, for floating (bfloat16/float32/float64) ``q``/``k``, for those too; FP8 ``q``/``k`` get none;
``topk_indices`` returns integers (no gradient); ``index_topk``'s scores have ``index_scores``' gradients at the
selected positions, its indices none.

Validation runs once per call, here: the reference and the launchers the ops dispatch to take the inputs as
checked (``dsa.reference.*_impl``).
"""

from __future__ import annotations

import torch

from dsa import autograd, validation
from dsa.hardware import TILELANG, select_backend

__all__ = ["index_scores", "index_topk", "index_topk_decode", "sparse_mla", "sparse_mla_decode", "topk_indices"]


def _kernel_layout(backend: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` as the kernels read them when ``backend`` is the kernels' (each one copied at most once, only when
    its strides or alignment differ from row-major), else unchanged."""
    if backend != TILELANG:
        return tensors
    return tuple(validation.kernel_layout(t) for t in tensors)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling():
        # Always go through the autograd Function under compile: AOT autograd decides what needs a backward.
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """``index_scores`` (contract: ``dsa.reference.index_scores``): ``scores [B, S, S_kv]`` float32, ``-inf`` where
    invisible. The kernels take bfloat16 and float8_e4m3fn ``q``/``k``; float32/float64 run the reference.
    Differentiable in ``weights`` and (floating inputs) ``q``, ``k``."""
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_scores(q, k, weights, k_scale, starts, ends, kernel=backend == TILELANG)
    q, k, weights, k_scale, starts, ends = _kernel_layout(backend, q, k, weights, k_scale, starts, ends)
    if _needs_grad(q, k, weights):
        return autograd.IndexScoresFunction.apply(q, k, weights, k_scale, starts, ends, backend)
    return autograd.call_index_scores(q, k, weights, k_scale, starts, ends, backend)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_indices`` (contract: ``dsa.reference.topk_indices``): ``indices [B, S, k]`` int32, a set per row,
    ``-1`` padding. The kernels take float32 scores; float64 runs the reference. Not differentiable."""
    backend = select_backend(scores.device, scores.dtype == torch.float32)
    validation.check_topk_indices(scores, k, kernel=backend == TILELANG)
    (scores,) = _kernel_layout(backend, scores.detach())
    return autograd.call_topk_indices(scores, int(k), backend)


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
    """``index_topk`` (contract: ``dsa.reference.index_topk``): ``indices [B, S, topk]`` int32 (and with
    ``return_scores`` their scores, differentiable in ``weights`` and floating ``q``/``k``), never an ``[B, S, S_kv]``
    buffer.

    On the kernels the fused selection runs where its candidate buffers fit (``DSA_SELECTION=fused``, the default),
    else the indexer and top-k kernels one chunk of query rows at a time, holding at most
    ``DSA_INDEXER_MEMORY_BYTES`` of scores (default a quarter of free GPU memory, 1 GiB on CPU).
    """
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_topk(q, k, weights, topk, k_scale, starts, ends, kernel=backend == TILELANG)
    q, k, weights, k_scale, starts, ends = _kernel_layout(backend, q, k, weights, k_scale, starts, ends)
    topk = int(topk)
    if return_scores and _needs_grad(q, k, weights):
        return autograd.IndexTopkFunction.apply(q, k, weights, k_scale, starts, ends, topk, backend)
    indices, scores = autograd.call_index_topk(q, k, weights, k_scale, starts, ends, topk, backend)
    return (indices, scores) if return_scores else indices


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
    """``sparse_mla`` (contract: ``dsa.reference.sparse_mla``): ``(out [B, S, H, d_v] in q's dtype, lse [B, S, H]
    float32)``, both differentiable in ``q``, ``kv`` and ``attn_sink``. The kernels take bfloat16; float32/float64
    run the reference."""
    backend = select_backend(q.device, q.dtype in validation.ATTENTION_KERNEL_DTYPES)
    validation.check_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink, kernel=backend == TILELANG)
    q, kv, indices, topk_length, attn_sink = _kernel_layout(backend, q, kv, indices, topk_length, attn_sink)
    sm_scale, d_v = float(sm_scale), int(d_v)
    if _needs_grad(q, kv, attn_sink):
        return autograd.SparseMLAFunction.apply(q, kv, indices, sm_scale, d_v, topk_length, attn_sink, backend)
    return autograd.call_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink, backend)


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_kv_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    d_rope: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla_decode`` (contract: ``dsa.reference.sparse_mla_decode``): ``(out [B, s_q, H, d_v], lse [B, s_q,
    H] float32)`` over paged caches (``dsa.serving.cache.PagedKVCache`` pages, bf16 rows or FP8-layout bytes). Forward
    only.

    Unlike the reference, a plain cache must have q's dtype. The kernels take bfloat16 q (FP8 rows are dequantised
    inside the kernel); float32/float64 run the reference, and so do widths the CUDA kernels cannot take (``d_qk``
    or ``d_v`` not a multiple of 64), logged at info level.
    """
    backend = select_backend(q.device, q.dtype in validation.ATTENTION_KERNEL_DTYPES)
    validation.check_sparse_mla_decode(
        q, kv_cache, indices, sm_scale, d_v, topk_length, attn_sink, extra_kv_cache, extra_indices,
        extra_topk_length, validation.fp8_row_bytes(q.shape[-1], int(d_rope)), kernel=backend == TILELANG,
    )  # fmt: skip
    q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices, extra_topk_length = _kernel_layout(
        backend, q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices, extra_topk_length
    )
    return autograd.call_sparse_mla_decode(
        q, kv_cache, indices, float(sm_scale), int(d_v), topk_length, attn_sink, extra_kv_cache, extra_indices,
        extra_topk_length, int(d_rope), backend,
    )  # fmt: skip


def index_topk_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    block_table: torch.Tensor,
    ends: torch.Tensor,
    starts: torch.Tensor | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``index_topk_decode`` (contract: ``dsa.reference.index_topk_decode``): ``[B, s_q, topk]`` int32 **positions**
    (``-1`` padding; slots: ``dsa.kv_format.positions_to_slots``), and their scores with ``return_scores``. Not
    differentiable.

    On the kernels the fused selection reads the keys through the block table (no gathered copy, no ``[B, s_q,
    S_kv]`` scores); a ``topk`` whose buffers do not fit runs the reference.
    """
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_topk_decode(q, k_cache, weights, topk, block_table, ends, starts, kernel=backend == TILELANG)
    q, k_cache, weights, block_table, ends, starts = _kernel_layout(
        backend, q, k_cache, weights, block_table, ends, starts
    )
    indices, scores = autograd.index_topk_decode_impl(q, k_cache, weights, int(topk), block_table, ends, starts, backend)
    return (indices, scores) if return_scores else indices

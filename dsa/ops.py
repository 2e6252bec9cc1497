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
    """Lightning-indexer scores of every key position for every query (contract: ``dsa.reference.index_scores``).

    Args:
        q (torch.Tensor): ``[B, S, H_i, D_i]``, bfloat16 or float8_e4m3fn (float32/float64 run the reference).
        k (torch.Tensor): ``[B, S_kv, D_i]``, the dtype of ``q``.
        weights (torch.Tensor): ``[B, S, H_i]``, float32 (V3.2 folds the q scale, ``H_i**-0.5``, ``D_i**-0.5`` in).
        k_scale (torch.Tensor | None): ``[B, S_kv]``, float32, FP8 only.
        starts, ends (torch.Tensor | None): ``[B, S]``, int32, together; default causal (bottom-right aligned).

    Returns:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32; exactly ``-inf`` where invisible. Differentiable in
        ``weights`` and (floating inputs) ``q``, ``k``.
    """
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_scores(q, k, weights, k_scale, starts, ends, kernel=backend == TILELANG)
    q, k, weights, k_scale, starts, ends = _kernel_layout(backend, q, k, weights, k_scale, starts, ends)
    if _needs_grad(q, k, weights):
        return autograd.IndexScoresFunction.apply(q, k, weights, k_scale, starts, ends, backend)
    return autograd.call_index_scores(q, k, weights, k_scale, starts, ends, backend)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest finite scores per row (contract: ``dsa.reference.topk_indices``).

    Args:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32 (float64 runs the reference).
        k (int): ``>= 1``; may exceed ``S_kv``.

    Returns:
        indices (torch.Tensor): ``[B, S, k]``, int32, a set per row (order unspecified), ``-1`` padding when a row
        has fewer than ``k`` finite scores. Not differentiable.
    """
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
    """The indexer's top-k selection without the ``[B, S, S_kv]`` scores (contract: ``dsa.reference.index_topk``).

    Equal to ``topk_indices(index_scores(q, k, weights, ...), topk)``, ties included (the smaller position wins). The
    kernels run one chunk of query rows at a time, holding at most ``DSA_INDEXER_MEMORY_BYTES`` of scores (default a
    quarter of free GPU memory, 1 GiB on CPU); the reference walks query and key blocks of bounded size.

    Args:
        q, k, weights, k_scale, starts, ends: as in :func:`index_scores`.
        topk (int): ``>= 1``; may exceed ``S_kv``.
        return_scores (bool): also return the selected positions' scores.

    Returns:
        indices (torch.Tensor): ``[B, S, topk]``, int32, a set per row, ``-1`` padding. Not differentiable.
        scores (torch.Tensor, with ``return_scores``): ``[B, S, topk]``, float32 (float64 for float64 inputs), ``-inf``
        at padding; differentiable in ``weights`` and (floating inputs) ``q``, ``k``.
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
    """Sparse MLA attention over the selected key positions (contract: ``dsa.reference.sparse_mla``).

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16 (float32/float64 run the reference).
        kv (torch.Tensor): ``[B, S_kv, d_qk]``, the dtype of ``q``; the value is ``kv[..., :d_v]``.
        indices (torch.Tensor): ``[B, S, k]``, int32; entries outside ``[0, S_kv)`` or past ``topk_length`` ignored.
        sm_scale (float): softmax scale (V3.2: ``192**-0.5 * mscale**2``).
        d_v (int): value width, ``<= d_qk``.
        topk_length (torch.Tensor | None): ``[B, S]``, int32.
        attn_sink (torch.Tensor | None): ``[H]``, float32.

    Returns:
        out (torch.Tensor): ``[B, S, H, d_v]``, q's dtype; 0 for a query with no valid index.
        lse (torch.Tensor): ``[B, S, H]``, float32, natural log, sink excluded; ``-inf`` for a query with no valid
        index. Both outputs are differentiable (in ``q``, ``kv`` and ``attn_sink``): a loss may use ``lse``.
    """
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
    """Sparse MLA for decoding over paged caches (contract: ``dsa.reference.sparse_mla_decode``). Forward only.

    Args:
        q (torch.Tensor): ``[B, s_q, H, d_qk]``, bfloat16 (float32/float64 run the reference); ``s_q`` is 1 plus
            the speculative tokens.
        kv_cache (torch.Tensor): the pages of a ``dsa.cache.PagedKVCache``: ``[num_pages, page_size, d_qk]`` in q's
            dtype, or ``[num_pages, page_size, bytes]`` uint8/int8/float8_e4m3fn in the FP8 layout
            (``dsa.cache.FP8Layout.for_width(d_qk, d_rope)``: 656 bytes for V3.2), dequantised inside the kernel.
        indices (torch.Tensor): ``[B, s_q, topk]``, int32 slots (``page * page_size + offset``); ``-1`` or out of
            range is invalid and never read.
        sm_scale (float): softmax scale. d_v (int): value width (the first ``d_v`` columns of a row).
        topk_length (torch.Tensor | None): ``[B]`` or ``[B, s_q]``, int32: only the leading entries count.
        attn_sink (torch.Tensor | None): ``[H]``, float32, in the denominator only.
        extra_kv_cache, extra_indices, extra_topk_length: a second source (say a sliding window) with the same
            conventions, in the same softmax.
        d_rope (int): the RoPE width of FP8 rows (stored as bf16, not quantised); ignored for plain caches.

    Returns:
        out (torch.Tensor): ``[B, s_q, H, d_v]``, q's dtype; 0 for a query with nothing valid.
        lse (torch.Tensor): ``[B, s_q, H]``, float32, natural log, the sink excluded; ``-inf`` for a query with
        nothing valid.
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
    """The indexer's top-k for decoding over a paged key cache (contract: ``dsa.reference.index_topk_decode``).

    On the kernel backend the fused selection kernel reads the keys through the block table (no gathered copy, no
    ``[B, s_q, S_kv]`` scores). Not differentiable (decoding).

    Args:
        q (torch.Tensor): ``[B, s_q, H_i, D_i]``, bfloat16 or float8_e4m3fn (float32/float64 run the reference).
        k_cache (torch.Tensor): ``[num_pages, page_size, D_i]`` in q's dtype, or for FP8 q ``[num_pages, page_size,
            D_i + 4]`` uint8 key rows (``dsa.cache.index_key_layout``: FP8 values, then a float32 scale).
        weights (torch.Tensor): ``[B, s_q, H_i]``, float32.
        topk (int): ``>= 1``.
        block_table (torch.Tensor): ``[B, pages_per_sequence]``, int32.
        ends, starts (torch.Tensor): ``[B, s_q]``, int32: query ``t`` sees positions ``starts <= s < ends`` (``starts``
            default 0); positions on unallocated pages (negative entries) are invisible.
        return_scores (bool): also return the selected positions' scores.

    Returns:
        indices (torch.Tensor): ``[B, s_q, topk]``, int32 **positions**, a set per row, ``-1`` padding (slots:
        ``dsa.cache.positions_to_slots``). scores (with ``return_scores``): ``[B, s_q, topk]`` float32.
    """
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_topk_decode(q, k_cache, weights, topk, block_table, ends, starts, kernel=backend == TILELANG)
    q, k_cache, weights, block_table, ends, starts = _kernel_layout(
        backend, q, k_cache, weights, block_table, ends, starts
    )
    indices, scores = autograd.index_topk_decode_impl(q, k_cache, weights, int(topk), block_table, ends, starts, backend)
    return (indices, scores) if return_scores else indices

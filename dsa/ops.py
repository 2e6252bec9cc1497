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

Gradients: ``sparse_mla`` for ``q``, ``kv``, ``extra_kv``, ``attn_sink`` (through ``out`` and ``lse``);
``index_scores`` for ``weights`` and, for floating (bfloat16/float32/float64) ``q``/``k``, for those too; FP8
``q``/``k`` get none; ``topk_indices`` returns integers (no gradient); ``index_topk``'s scores have
``index_scores``' gradients at the selected positions, its indices none.

Validation runs once per call, here: the reference and the launchers the ops dispatch to take the inputs as
checked (``dsa.reference.*_impl``).
"""

from __future__ import annotations

import torch

from dsa import autograd, validation
from dsa.hardware import TILELANG, select_backend
from dsa.reference.compress import compress_kv  # one implementation for every backend: the op is the reference's
from dsa.reference.decode import PagedKeys, range_slots

__all__ = [
    "compress_kv", "index_scores", "index_topk", "index_topk_decode", "sparse_mla", "sparse_mla_decode", "topk_indices",
]


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
    """``sparse_mla`` (contract: ``dsa.reference.sparse_mla``): ``(out [B, S, H, d_v] in q's dtype, lse [B, S, H]
    float32)``, both differentiable in ``q``, ``kv``, ``extra_kv`` and ``attn_sink``. The kernels take bfloat16;
    float32/float64 run the reference.

    One index list runs the forward and backward kernels once each. Ranges or a second source (DeepSeek-V4's window
    and compressed entries) run the kernels once per source and combine them exactly (``dsa.launch.two_source``)."""
    backend = select_backend(q.device, q.dtype in validation.ATTENTION_KERNEL_DTYPES)
    extra = validation.SourceArgs(extra_kv, extra_indices, extra_topk_length, extra_ranges)
    validation.check_sparse_mla(
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink, kernel=backend == TILELANG, ranges=ranges, extra=extra
    )
    ranged = indices is None
    q, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length, attn_sink = _kernel_layout(
        backend, q, kv, ranges if ranged else indices, topk_length, extra_kv, extra.entries, extra_topk_length,
        attn_sink,
    )  # fmt: skip
    args = (q, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length, ranged, extra.ranged,
            float(sm_scale), int(d_v), attn_sink, backend)  # fmt: skip
    if _needs_grad(q, kv, extra_kv, attn_sink):
        return autograd.SparseMLAFunction.apply(*args)
    return autograd.sparse_mla_forward(*args)


def _decode_cache(backend: str, d_qk: int, d_rope: int, cache: torch.Tensor | None) -> torch.Tensor | None:
    """A ``sparse_mla_decode`` cache as the kernels read it (:func:`_kernel_layout`), except an FP8 cache in MODEL1's
    split layout: FlashMLA's view of its pages is not row-major (a page's padding lies past its rows), and the
    launcher reads the pages in place (``dsa.launch.sparse_mla_decode.page_stride``), copying only pages it cannot.
    Called after validation."""
    if backend == TILELANG and cache is not None and validation.is_fp8_cache(cache):
        layout = validation.fp8_cache_layout(d_qk, d_rope, cache.shape[-1])
        if layout is not None and layout.scales_after_values:
            return cache
    return _kernel_layout(backend, cache)[0]


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_kv_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    d_rope: int = 64,
    ranges: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    extra_ranges: torch.Tensor | None = None,
    extra_block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla_decode`` (contract: ``dsa.reference.sparse_mla_decode``): ``(out [B, s_q, H, d_v], lse [B, s_q,
    H] float32)`` over paged caches (``dsa.serving.cache.PagedKVCache`` pages, bf16 rows or FP8-layout bytes: V3.2's
    row per token, or MODEL1's split pages viewed as ``[num_pages, page_size, 584]``). Forward only.

    Unlike the reference, a plain cache must have q's dtype. The kernels take bfloat16 q (FP8 rows are dequantised
    inside the kernel, MODEL1's split pages read in place); float32/float64 run the reference, and so do, logged at
    info level, widths the CUDA kernels cannot take (``d_qk`` or ``d_v`` not a multiple of 64). A source in range
    form (``ranges`` with its cache's ``block_table``, e.g. V4's sliding window) becomes its slot list here (``dsa.reference.decode
    .range_slots``: ``B * s_q`` rows of the longest range, read from the ranges, so not under
    ``torch.compile(fullgraph=True)``), on every backend.
    """
    backend = select_backend(q.device, q.dtype in validation.ATTENTION_KERNEL_DTYPES)
    source = validation.SourceArgs(kv_cache, indices, topk_length, ranges, block_table)
    extra = validation.SourceArgs(extra_kv_cache, extra_indices, extra_topk_length, extra_ranges, extra_block_table)
    validation.check_sparse_mla_decode(
        q, source, sm_scale, d_v, attn_sink, int(d_rope), kernel=backend == TILELANG, extra=extra
    )
    if ranges is not None:
        indices = range_slots(ranges, block_table, kv_cache)
    if extra_ranges is not None:
        extra_indices = range_slots(extra_ranges, extra_block_table, extra_kv_cache)
    kv_cache, extra_kv_cache = (_decode_cache(backend, q.shape[-1], int(d_rope), c) for c in (kv_cache, extra_kv_cache))
    q, indices, topk_length, attn_sink, extra_indices, extra_topk_length = _kernel_layout(
        backend, q, indices, topk_length, attn_sink, extra_indices, extra_topk_length
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
    key_layout: str = "rows",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``index_topk_decode`` (contract: ``dsa.reference.index_topk_decode``): ``[B, s_q, topk]`` int32 **positions**
    (``-1`` padding; slots: ``dsa.kv_format.positions_to_slots``), and their scores with ``return_scores``. Not
    differentiable.

    On the kernels the fused selection reads the keys through the block table (no gathered copy, no ``[B, s_q,
    S_kv]`` scores); a ``topk`` whose buffers do not fit runs the reference. ``key_layout="paged"`` takes an FP8 key
    cache in DeepGEMM's and vLLM's per-page layout as it is (``dsa.kv_format.INDEX_KEY_LAYOUTS``; its key tiles load
    as 16-byte vectors on a GPU).
    """
    backend = select_backend(q.device, q.dtype in validation.INDEXER_KERNEL_DTYPES)
    validation.check_index_topk_decode(q, k_cache, weights, topk, block_table, ends, starts, kernel=backend == TILELANG,
                                       key_layout=key_layout)  # fmt: skip
    q, k_cache, weights, block_table, ends, starts = _kernel_layout(
        backend, q, k_cache, weights, block_table, ends, starts
    )
    keys = PagedKeys(k_cache, block_table, key_layout)
    indices, scores = autograd.index_topk_decode_impl(q, keys, weights, int(topk), ends, starts, backend)
    return (indices, scores) if return_scores else indices

"""The op primitives as ``torch.library`` custom ops (namespace ``dsa``), their fakes and the one call helper.

Primitives (each takes the already-chosen ``backend``, ``"tilelang"`` or ``"reference"``, as its last argument, so a
compiled graph runs the implementation chosen when it was traced):

| op | returns | implementation |
|---|---|---|
| ``dsa::index_scores`` | scores | launcher ``dsa.launch.indexer`` or ``dsa.reference.index_scores`` |
| ``dsa::index_scores_bwd`` | (dq, dk, dweights) | PyTorch for both backends (there is no indexer backward kernel) |
| ``dsa::topk_indices`` | indices | launcher ``dsa.launch.topk`` or ``dsa.reference.topk_indices`` |
| ``dsa::index_topk`` | (indices, scores) | the fused kernel, or ``dsa.selection`` over the indexer and top-k launchers (chunked), or ``dsa.reference.select_topk`` |
| ``dsa::index_topk_bwd`` | (dq, dk, dweights) | PyTorch for both backends, chunked recomputation at the selected keys |
| ``dsa::sparse_mla`` | (out, lse) | one index list: launcher ``dsa.launch.sparse_mla_fwd`` or the reference forward |
| ``dsa::sparse_mla_sources`` | (out, lse) | ``sparse_mla`` over ranged or two sources: ``dsa.launch.two_source`` (a launch per source, combined) or the reference |
| ``dsa::sparse_mla_sources_bwd`` | (dq, dkv, d extra_kv) | the backward of both: ``dsa.launch.two_source`` (launcher ``dsa.launch.sparse_mla_bwd`` per source) or the reference's recompute backward |
| (eager only) ``index_topk_decode`` | (positions, scores) | launcher ``dsa.launch.index_topk`` (paged) or ``dsa.reference.index_topk_decode`` |
| ``dsa::sparse_mla_decode`` | (out, lse) | launcher ``dsa.launch.sparse_mla_decode`` or ``dsa.reference.sparse_mla_decode`` (forward only) |

Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through them. The ops are defined
with ``torch.library.Library`` (not ``torch.library.custom_op``): its Python wrapper costs tens of microseconds per
call, the plain dispatcher path a few. :func:`call` is the one way in: in eager mode it calls the implementation
directly (no dispatcher at all), under ``torch.compile`` the registered op. Both paths run the same functions. The
autograd Functions over these primitives live in ``dsa.autograd``.

The launchers are imported lazily on the first TileLang call (importing them compiles nothing).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from dsa import env, indexer_grads, reference, selection, validation
from dsa.hardware import TILELANG
from dsa.launch import launcher
from dsa.reference import compute_dtype
from dsa.reference.decode import PagedKeys, decode_sources
from dsa.reference.sources import Source, unflat_sources

_LAUNCH_INDEXER = "dsa.launch.indexer"
_LAUNCH_INDEX_TOPK = "dsa.launch.index_topk"
_LAUNCH_TOPK = "dsa.launch.topk"
_LAUNCH_SPARSE_MLA_FWD = "dsa.launch.sparse_mla_fwd"
_LAUNCH_SPARSE_MLA_DECODE = "dsa.launch.sparse_mla_decode"
_LAUNCH_TWO_SOURCE = "dsa.launch.two_source"

OptTensor = Tensor | None
logger = logging.getLogger(__name__)

# Bound the index_scores backward's largest intermediate ([B, rows, H_i, S_kv] float32) like the reference does.
_BWD_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------------------
# Implementations (plain functions; eager calls them directly, the registered ops wrap them).
# --------------------------------------------------------------------------------------------------------------------


def index_scores_impl(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor, backend: str
) -> Tensor:
    """Forward of ``index_scores`` (contract in ``dsa.reference.index_scores``): scores ``[B, S, S_kv]`` float32."""
    if backend == TILELANG:
        return launcher(_LAUNCH_INDEXER).index_scores(q, k, weights, k_scale=k_scale, starts=starts, ends=ends)
    with torch.no_grad():
        return reference.index_scores_impl(q, k, weights, k_scale, starts, ends)


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
    dw, dq, dk = indexer_grads.new_grads(q, k, need_qk)
    step = max(1, min(seq, _BWD_CHUNK_ELEMENTS // max(1, batch * heads * seq_kv)))
    for t0 in range(0, seq, step):
        rows = slice(t0, min(seq, t0 + step))
        visible = reference.visibility_mask(batch, seq, seq_kv, starts=starts, ends=ends, rows=rows, device=q.device)
        # where (not a product): the upstream gradient at -inf positions may be anything, NaN included.
        g = torch.where(visible, d_scores[:, rows].to(dtype), torch.zeros((), dtype=dtype, device=q.device))
        if k_scale is not None:
            g = g * k_scale.to(dtype).unsqueeze(1)
        dw[:, rows], dq_c, dk_c = indexer_grads.chunk_grads(
            q[:, rows].to(dtype), kf, "bkd", g, weights[:, rows], need_qk
        )
        if need_qk:
            dq[:, rows] = dq_c
            dk += dk_c
    return indexer_grads.grads_out(q, k, weights, dw, dq, dk)


def topk_indices_impl(scores: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """``topk_indices`` (contract in ``dsa.reference.topk_indices``): indices ``[B, S, k]`` int32."""
    if backend == TILELANG:
        return launcher(_LAUNCH_TOPK).topk_indices(scores, k)
    return reference.topk_indices_impl(scores, k)


def index_topk_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    topk: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_topk`` (contract in ``dsa.reference.index_topk``): ``(indices [B, S, topk] int32, scores [B, S, topk]
    float32)``, the scores ``-inf`` at ``-1`` padding. The TileLang path runs the fused kernel (``DSA_SELECTION=fused``,
    the default, where its candidate buffers fit in shared memory), else the indexer and top-k kernels one chunk of
    query rows at a time under the memory budget (``dsa.selection``)."""
    if backend == TILELANG:
        fused = launcher(_LAUNCH_INDEX_TOPK)
        if env.selection() == "fused":
            planned = fused.plan(q, k.shape[1], topk, ranged=starts is not None)
            if planned is not None:
                return fused.index_topk(q, k, weights, topk, k_scale=k_scale, starts=starts, ends=ends, planned=planned)
            logger.info("index_topk: no fused config fits topk=%d on %s; running the chunked kernels", topk, q.device)
        return unfused_index_topk(q, k, weights, k_scale, starts, ends, topk)
    with torch.no_grad():
        return reference.select_topk(q, k, weights, topk, k_scale, starts, ends)


def unfused_index_topk(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor, topk: int
) -> tuple[Tensor, Tensor]:
    """``index_topk`` through the indexer and top-k kernels, one chunk of query rows at a time under the memory budget
    (``dsa.selection``): what ``DSA_SELECTION=unfused`` runs, and the benchmark's ``chunked`` provider."""
    return selection.chunked_index_topk(
        selection.IndexerInputs(q, k, weights, k_scale, starts, ends), topk,
        index_scores=launcher(_LAUNCH_INDEXER).index_scores,
        topk_indices=launcher(_LAUNCH_TOPK).topk_indices,
        budget_bytes=selection.memory_budget_bytes(q.device),
    )  # fmt: skip


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
    dw, dq, dk = indexer_grads.new_grads(q, k, need_qk)
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
        dw[:, rows], dq_c, dk_sel = indexer_grads.chunk_grads(
            q[:, rows].to(dtype), k_sel, "btkd", g, weights[:, rows], need_qk
        )
        if need_qk:
            dq[:, rows] = dq_c
            dk.view(batch * seq_kv, dim).index_add_(0, (b * seq_kv + key_rows).reshape(-1), dk_sel.reshape(-1, dim))
    return indexer_grads.grads_out(q, k, weights, dw, dq, dk)


def sparse_mla_impl(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of ``sparse_mla`` (contract in ``dsa.reference.sparse_mla``): ``(out [B, S, H, d_v], lse [B, S, H])``."""
    if backend == TILELANG:
        return launcher(_LAUNCH_SPARSE_MLA_FWD).sparse_mla_fwd(
            q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length, attn_sink=attn_sink
        )
    with torch.no_grad():
        return reference.sparse_mla_impl(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)


def index_topk_decode_impl(
    q: Tensor, keys: PagedKeys, weights: Tensor, topk: int, ends: Tensor, starts: OptTensor, backend: str
) -> tuple[Tensor, Tensor]:
    """``index_topk_decode`` (contract in ``dsa.reference.index_topk_decode``): ``(positions, scores)``, each ``[B,
    s_q, topk]``, over the paged ``keys`` (``dsa.reference.decode.PagedKeys``: cache, block table, FP8 byte layout).
    The kernel backend runs the fused kernel over the paged keys wherever a config fits, else (a very large
    ``topk``) the reference, logged once per call."""
    if backend == TILELANG:
        launch = launcher(_LAUNCH_INDEX_TOPK)
        planned = launch.plan_paged(
            q, topk, page_size=keys.cache.shape[1], key_layout=keys.layout, max_pages=keys.block_table.shape[1]
        )
        if planned is not None:
            return launch.index_topk_paged(
                q, keys.cache, weights, topk, block_table=keys.block_table, ends=ends, starts=starts, planned=planned
            )
        logger.info("index_topk_decode: no fused config fits topk=%d here; running the reference", topk)
    with torch.no_grad():
        return reference.index_topk_decode_impl(q, keys, weights, topk, ends, starts)


def sparse_mla_decode_impl(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    topk_length: OptTensor,
    attn_sink: OptTensor,
    extra_kv_cache: OptTensor,
    extra_indices: OptTensor,
    extra_topk_length: OptTensor,
    d_rope: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla_decode`` (contract in ``dsa.reference.sparse_mla_decode``): ``(out [B, s_q, H, d_v], lse [B, s_q,
    H])``. On the kernel backend widths the kernels cannot take (CUDA: ``d_qk``/``d_v`` not multiples of 64, e.g. the
    tiny config's 40) run the reference, logged at info level, so one model serves on every device."""
    sources = decode_sources(kv_cache, indices, topk_length, extra_kv_cache, extra_indices, extra_topk_length)
    if backend == TILELANG:
        launch = launcher(_LAUNCH_SPARSE_MLA_DECODE)
        planned = launch.plan(q, [s.kv for s in sources], [s.indices.shape[-1] for s in sources], d_v=d_v,
                              d_rope=d_rope, has_sink=attn_sink is not None)  # fmt: skip
        if planned is not None:
            return launch.sparse_mla_decode(
                q, kv_cache, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length, attn_sink=attn_sink,
                extra_kv_cache=extra_kv_cache, extra_indices=extra_indices, extra_topk_length=extra_topk_length,
                d_rope=d_rope, planned=planned,
            )  # fmt: skip
        logger.info("sparse_mla_decode: no kernel for d_qk=%d, d_v=%d on %s; running the reference", q.shape[-1], d_v,
                    q.device)  # fmt: skip
    with torch.no_grad():
        return reference.sparse_mla_decode_impl(q, sources, sm_scale, d_v, attn_sink, d_rope)


def _sources(ranged: bool, extra_ranged: bool, *flat: OptTensor) -> tuple[Source, ...]:
    """The sources of a ``dsa::sparse_mla_sources`` call (``flat``: kv, entries, topk_length, then the extra ones)."""
    return unflat_sources((ranged, extra_ranged)[: 1 if flat[3] is None else 2], flat)


def sparse_mla_sources_impl(
    q: Tensor, kv: Tensor, entries: Tensor, topk_length: OptTensor, extra_kv: OptTensor, extra_entries: OptTensor,
    extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, sm_scale: float, d_v: int, attn_sink: OptTensor,
    backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Forward of ``sparse_mla`` over ranged or two sources (contract in ``dsa.reference.sparse_mla``): ``(out [B, S,
    H, d_v], lse [B, S, H])``; the kernels per source, combined (``dsa.launch.two_source``), or the reference."""
    sources = _sources(ranged, extra_ranged, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length)
    if backend == TILELANG:
        return launcher(_LAUNCH_TWO_SOURCE).sparse_mla_sources_fwd(q, sources, sm_scale, d_v, attn_sink)
    with torch.no_grad():
        return reference.sparse_mla_sources_impl(q, sources, sm_scale, d_v, attn_sink)


def sparse_mla_sources_bwd_impl(
    q: Tensor, kv: Tensor, entries: Tensor, topk_length: OptTensor, extra_kv: OptTensor, extra_entries: OptTensor,
    extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, out: Tensor, lse: Tensor, d_out: Tensor,
    sm_scale: float, d_v: int, attn_sink: OptTensor, d_lse: OptTensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of ``sparse_mla`` over one or two sources (:func:`sparse_mla_sources_impl`, and
    :func:`sparse_mla_impl`'s one index list: ``extra_kv`` None, neither source ranged): ``(dq [B, S, H, d_qk], dkv
    [B, S_kv, d_qk], d extra_kv [B, S_extra, d_qk] or empty [0] without a second source)``, in the inputs' dtypes.

    ``d_out [B, S, H, d_v]`` must have ``out``'s dtype; ``d_lse [B, S, H]`` (float, or None for no gradient through
    ``lse``); both may arrive with any strides (autograd hands over expanded or transposed gradients), and the kernel
    path gets each laid out as it reads it (``validation.kernel_layout``: one copy where needed). The sources and
    the rest are the forward's inputs, already laid out by the op. The reference path is the reference's recompute
    backward, which takes any strides. The sink's gradient is ``dsa.autograd``'s."""
    sources = _sources(ranged, extra_ranged, kv, entries, topk_length, extra_kv, extra_entries, extra_topk_length)
    if backend == TILELANG:
        d_out, d_lse = validation.kernel_layout(d_out), validation.kernel_layout(d_lse)
        dq, dkvs = launcher(_LAUNCH_TWO_SOURCE).sparse_mla_sources_bwd(
            q, sources, sm_scale, d_v, attn_sink, out, lse, d_out, d_lse
        )
    else:
        dq, dkvs, _ = reference.sparse_mla_sources_backward(
            q, sources, sm_scale, d_v, attn_sink, out, lse, d_out, d_lse
        )
    return dq, dkvs[0], dkvs[1] if len(dkvs) > 1 else q.new_empty((0,))


def sparse_mla_bwd_impl(
    q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, indices: Tensor, sm_scale: float, d_v: int,
    topk_length: OptTensor, attn_sink: OptTensor, d_lse: OptTensor, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Backward of ``sparse_mla`` over one index list: ``(dq [B, S, H, d_qk] q's dtype, dkv [B, S_kv, d_qk] kv's
    dtype)``, :func:`sparse_mla_sources_bwd_impl` of that one source (no registered op of its own; the benchmark's
    providers call it)."""
    dq, dkv, _ = sparse_mla_sources_bwd_impl(
        q, kv, indices, topk_length, None, None, None, False, False, out, lse, d_out, sm_scale, d_v, attn_sink,
        d_lse, backend,
    )  # fmt: skip
    return dq, dkv


def attn_sink_grad(out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """Gradient of the loss with respect to ``attn_sink [H]``.

    The sink's probability is ``p_sink = exp(sink - logaddexp(lse, sink))`` and it has no value row, so
    ``d sink = -sum_{b,t} p_sink * rowsum(out * d_out)``. Rows where both ``lse`` and the sink are ``-inf`` add 0.

    Args:
        out ``[B, S, H, d_v]``, lse ``[B, S, H]`` float, d_out ``[B, S, H, d_v]``, attn_sink ``[H]`` float32.
    Returns:
        ``[H]`` in ``attn_sink``'s dtype.
    """
    dtype = compute_dtype(lse.dtype)
    sink = attn_sink.to(dtype).view(1, 1, -1)
    lse_f = lse.to(dtype)
    denominator = torch.logaddexp(lse_f, sink)
    finite = torch.isfinite(denominator)
    p_sink = torch.where(finite, torch.exp(sink - torch.where(finite, denominator, 0.0)), 0.0)
    delta = (out.to(dtype) * d_out.to(dtype)).sum(-1)
    return (-(p_sink * delta).sum(dim=(0, 1))).to(attn_sink.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Registration as torch.library ops (declarations only: nothing runs or compiles at import).
# --------------------------------------------------------------------------------------------------------------------

_LIB = torch.library.Library("dsa", "FRAGMENT")
_LIB.define(
    "index_scores(Tensor q, Tensor k, Tensor weights, Tensor? k_scale, Tensor? starts, Tensor? ends, str backend)"
    " -> Tensor"
)
_LIB.define(
    "index_scores_bwd(Tensor q, Tensor k, Tensor weights, Tensor? k_scale, Tensor? starts, Tensor? ends,"
    " Tensor d_scores, bool need_qk) -> (Tensor, Tensor, Tensor)"
)
_LIB.define("topk_indices(Tensor scores, int k, str backend) -> Tensor")
_LIB.define(
    "index_topk(Tensor q, Tensor k, Tensor weights, Tensor? k_scale, Tensor? starts, Tensor? ends, int topk,"
    " str backend) -> (Tensor, Tensor)"
)
_LIB.define(
    "index_topk_bwd(Tensor q, Tensor k, Tensor weights, Tensor? k_scale, Tensor indices, Tensor d_scores,"
    " bool need_qk) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "sparse_mla(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? topk_length,"
    " Tensor? attn_sink, str backend) -> (Tensor, Tensor)"
)
_LIB.define(
    "sparse_mla_decode(Tensor q, Tensor kv_cache, Tensor indices, float sm_scale, int d_v, Tensor? topk_length,"
    " Tensor? attn_sink, Tensor? extra_kv_cache, Tensor? extra_indices, Tensor? extra_topk_length, int d_rope,"
    " str backend) -> (Tensor, Tensor)"
)
_SOURCES_ARGS = (
    "Tensor q, Tensor kv, Tensor entries, Tensor? topk_length, Tensor? extra_kv, Tensor? extra_entries,"
    " Tensor? extra_topk_length, bool ranged, bool extra_ranged"
)
_LIB.define(
    f"sparse_mla_sources({_SOURCES_ARGS}, float sm_scale, int d_v, Tensor? attn_sink, str backend)"
    " -> (Tensor, Tensor)"
)
_LIB.define(
    f"sparse_mla_sources_bwd({_SOURCES_ARGS}, Tensor out, Tensor lse, Tensor d_out, float sm_scale, int d_v,"
    " Tensor? attn_sink, Tensor? d_lse, str backend) -> (Tensor, Tensor, Tensor)"
)
_COMPOSITE = "CompositeExplicitAutograd"
_LIB.impl("index_scores", index_scores_impl, _COMPOSITE)
_LIB.impl("index_scores_bwd", index_scores_bwd_impl, _COMPOSITE)
_LIB.impl("topk_indices", topk_indices_impl, _COMPOSITE)
_LIB.impl("index_topk", index_topk_impl, _COMPOSITE)
_LIB.impl("index_topk_bwd", index_topk_bwd_impl, _COMPOSITE)
_LIB.impl("sparse_mla", sparse_mla_impl, _COMPOSITE)
_LIB.impl("sparse_mla_decode", sparse_mla_decode_impl, _COMPOSITE)
_LIB.impl("sparse_mla_sources", sparse_mla_sources_impl, _COMPOSITE)
_LIB.impl("sparse_mla_sources_bwd", sparse_mla_sources_bwd_impl, _COMPOSITE)


@torch.library.register_fake("dsa::index_scores")
def _index_scores_fake(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor, backend: str
) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=compute_dtype(q.dtype))


def _indexer_grads_fake(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, need_qk: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of an indexer backward (``index_scores_bwd``, ``index_topk_bwd``): dq, dk (empty without
    ``need_qk``), dweights."""
    dw = torch.empty_like(weights)
    if not need_qk:
        empty = q.new_empty((0,), dtype=compute_dtype(q.dtype))
        return empty, empty.clone(), dw
    return torch.empty_like(q), torch.empty_like(k), dw


@torch.library.register_fake("dsa::index_scores_bwd")
def _index_scores_bwd_fake(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor,
    d_scores: torch.Tensor, need_qk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _indexer_grads_fake(q, k, weights, need_qk)


@torch.library.register_fake("dsa::index_topk")
def _index_topk_fake(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor,
    topk: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (q.shape[0], q.shape[1], topk)
    return q.new_empty(shape, dtype=torch.int32), q.new_empty(shape, dtype=compute_dtype(q.dtype))


@torch.library.register_fake("dsa::index_topk_bwd")
def _index_topk_bwd_fake(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, indices: Tensor, d_scores: Tensor, need_qk: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _indexer_grads_fake(q, k, weights, need_qk)


@torch.library.register_fake("dsa::topk_indices")
def _topk_indices_fake(scores: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    return scores.new_empty((scores.shape[0], scores.shape[1], k), dtype=torch.int32)


@torch.library.register_fake("dsa::sparse_mla")
def _sparse_mla_fake(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, topk_length: OptTensor,
    attn_sink: OptTensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, _ = q.shape
    out = q.new_empty((batch, seq, heads, d_v))
    lse = q.new_empty((batch, seq, heads), dtype=compute_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("dsa::sparse_mla_decode")
def _sparse_mla_decode_fake(
    q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, topk_length: OptTensor,
    attn_sink: OptTensor, extra_kv_cache: OptTensor, extra_indices: OptTensor, extra_topk_length: OptTensor,
    d_rope: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _sparse_mla_fake(q, kv_cache, indices, sm_scale, d_v, topk_length, attn_sink, backend)


@torch.library.register_fake("dsa::sparse_mla_sources")
def _sparse_mla_sources_fake(
    q: Tensor, kv: Tensor, entries: Tensor, topk_length: OptTensor, extra_kv: OptTensor, extra_entries: OptTensor,
    extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, sm_scale: float, d_v: int, attn_sink: OptTensor,
    backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _sparse_mla_fake(q, kv, entries, sm_scale, d_v, topk_length, attn_sink, backend)


@torch.library.register_fake("dsa::sparse_mla_sources_bwd")
def _sparse_mla_sources_bwd_fake(
    q: Tensor, kv: Tensor, entries: Tensor, topk_length: OptTensor, extra_kv: OptTensor, extra_entries: OptTensor,
    extra_topk_length: OptTensor, ranged: bool, extra_ranged: bool, out: Tensor, lse: Tensor, d_out: Tensor,
    sm_scale: float, d_v: int, attn_sink: OptTensor, d_lse: OptTensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    extra = q.new_empty((0,)) if extra_kv is None else torch.empty_like(extra_kv)
    return torch.empty_like(q), torch.empty_like(kv), extra

# --------------------------------------------------------------------------------------------------------------------
# The one call helper: the registered op under torch.compile, the plain function in eager mode (same code, less
# overhead).
# --------------------------------------------------------------------------------------------------------------------

_IMPLEMENTATIONS = {
    "index_scores": index_scores_impl,
    "index_scores_bwd": index_scores_bwd_impl,
    "topk_indices": topk_indices_impl,
    "index_topk": index_topk_impl,
    "index_topk_bwd": index_topk_bwd_impl,
    "sparse_mla": sparse_mla_impl,
    "sparse_mla_decode": sparse_mla_decode_impl,
    "sparse_mla_sources": sparse_mla_sources_impl,
    "sparse_mla_sources_bwd": sparse_mla_sources_bwd_impl,
}


def call(op: str, *args: object) -> object:
    """Run the primitive ``op`` (a ``dsa::`` op name) on ``args`` (its schema's arguments, in order): the registered
    op ``torch.ops.dsa.<op>`` under ``torch.compile``, the implementation itself in eager mode."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.dsa, op)(*args)
    return _IMPLEMENTATIONS[op](*args)


# Named entry points of the forward primitives (``dsa.ops`` calls them): ``call`` with the op name bound.
call_index_scores = functools.partial(call, "index_scores")
call_topk_indices = functools.partial(call, "topk_indices")
call_index_topk = functools.partial(call, "index_topk")
call_sparse_mla_decode = functools.partial(call, "sparse_mla_decode")

"""What both schedules of the sparse MLA forward share: the index rules of a row and the online-softmax math.

``tl_kernels.sparse_mla_fwd`` (the plain schedule, C target and sm_90a) and ``tl_kernels.sparse_mla_fwd_ws`` (the
warp-specialised sm_90a schedule) differ in who gathers and who multiplies; the masking of invalid entries, the
online softmax in the log2 domain and the final normalisation (sink, ``lse``, empty rows) are written once, here.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func's annotations, which refer to closure
# variables (shapes, dtypes).
import math
from dataclasses import dataclass
from typing import Any

import tilelang.language as T

__all__ = [
    "ACCUM_DTYPE",
    "CUDA_PASS_CONFIGS",
    "DATA_DTYPE",
    "INDEX_DTYPE",
    "LN2",
    "LOG2E",
    "RANGE_WIDTH",
    "WARPGROUP_THREADS",
    "WGMMA_M",
    "Dims",
    "entry_valid",
    "forward_kernel",
    "gather_row",
    "index_at",
    "plain_step_macros",
    "range_length",
    "range_start",
    "softmax_macros",
]

LOG2E = math.log2(math.e)
"""Scores are pre-multiplied by ``sm_scale * log2(e)`` so the softmax can use ``exp2``."""
LN2 = math.log(2.0)
"""Turns the kernel's base-2 log-sum-exp into the natural log the API returns."""

ACCUM_DTYPE = "float32"
INDEX_DTYPE = "int32"
RANGE_WIDTH = 2
"""Columns of a ranged kernel's ``indices [B, S, 2]``: (start, end) of the query's contiguous row range."""
DATA_DTYPE = "bfloat16"
WGMMA_M = 64
"""Rows of one Hopper warpgroup MMA: the CUDA head block (64 heads, every warpgroup on wgmma)."""
WARPGROUP_THREADS = 128

CUDA_PASS_CONFIGS: dict[str, bool] = {
    # The index gather cannot use TMA, and TileLang's automatic warp specialisation would then only move the index
    # copy to a producer warpgroup (leaving the KV gather synchronous in the consumers). Without both, the plain
    # schedule's pipeliner issues the whole KV gather as cp.async, and the ws schedule specialises its warps itself.
    "tl.disable_tma_lower": True,
    "tl.disable_warp_specialized": True,
}


def index_at(indices: Any, b: Any, s: Any, pos: Any, width: Any, ranged: bool, limit: Any) -> Any:
    """The KV row that entry ``pos`` of query ``(b, s)`` names (before the validity check of :func:`entry_valid`).

    An index list (``ranged=False``, ``indices [B, S, k]``) is read at ``min(pos, k - 1)``: the last step of a row
    whose width is not a multiple of the step stays in bounds (positions ``>= k`` are masked by :func:`entry_valid`).
    A range (``ranged=True``, ``indices [B, S, 2]`` = (start, end)) names row ``range_start + min(pos, limit)``
    (``limit``: the row's :func:`range_length`; the same row as ``range_start + pos`` for every valid entry, and an
    invalid one is masked by ``pos >= limit``): no index is read per entry, only the row's start. The ``min`` is
    there for the CUDA code: with a row that is affine in the tile row (``start + pos``), TileLang 0.1.15 lowered the
    gather to scalar synchronous loads instead of 16-byte cp.async (and the ws producer then spilled 500 bytes); the
    runtime ``limit`` keeps the row opaque, as an index read from memory is. This is the one place that knows which
    source a kernel reads; the gather and the mask both go through it.
    """
    if ranged:
        return range_start(indices, b, s) + T.min(pos, limit)
    return indices[b, s, T.min(pos, width - 1)]


def range_start(indices: Any, b: Any, s: Any) -> Any:
    """The first row of query ``(b, s)``'s range that can be valid: ``max(start, 0)`` (rows below 0 do not exist, so
    they take no step)."""
    return T.max(indices[b, s, 0], 0)


def range_length(indices: Any, b: Any, s: Any, seq_len_kv: Any) -> Any:
    """How many entries of query ``(b, s)``'s range ``[start, end)`` name existing rows: the length of
    ``[max(start, 0), min(end, S_kv))``, at least 0. Both ends are clamped to ``[0, S_kv]`` before the subtraction,
    so no pair of int32 values overflows it (``end - start`` itself would for ``start = -2**31``). Entry ``pos`` of
    the range is row ``range_start + pos``, valid iff ``pos < range_length``."""
    end = T.max(T.min(indices[b, s, 1], seq_len_kv), 0)
    return T.max(end - range_start(indices, b, s), 0)


def entry_valid(idx: Any, pos: Any, limit: Any, seq_len_kv: Any) -> Any:
    """Whether the entry at position ``pos`` of its row, holding ``idx``, takes part in the softmax."""
    return T.And(pos < limit, T.And(idx >= 0, idx < seq_len_kv))


def wide(batch_index: Any) -> Any:
    """The batch index in int64 for a KV address: ``b * S_kv`` would otherwise be an int32 product (widened only
    after it is formed), which overflows once ``B * S_kv >= 2**31``."""
    return T.Cast("int64", batch_index)


def gather_row(
    indices: Any, b: Any, s: Any, pos: Any, width: Any, limit: Any, seq_len_kv: Any, ranged: bool = False
) -> Any:
    """The KV row a gather reads for entry ``pos`` of query ``(b, s)``: its index (int64) when valid, else -1.

    TileLang's bound guard cannot prove this row in ``[0, S_kv)``, so it wraps the copy in the row's bounds check: on
    CUDA the copy becomes a predicated cp.async that, for an invalid entry, reads nothing and zero-fills the tile row
    (a select around the load would make the copy synchronous); the C target gets the same guard as a branch. A zero
    row, not the memory an invalid index names, then meets the MMAs: Inf/NaN there (an unwritten cache slot) cannot
    leak into ``out`` through ``0 * V``.
    """
    idx = index_at(indices, b, s, pos, width, ranged, limit)
    # In int64, the type of the address arithmetic: with an int32 row the guard evaluates it twice (int64 for the
    # address, int32 for the predicate) and the ws producer issued 73 index loads per step instead of 37.
    return T.if_then_else(entry_valid(idx, pos, limit, seq_len_kv), T.Cast("int64", idx), T.int64(-1))


def softmax_macros(parallel: Any, block_h: int, block_k: int, heads: int, has_sink: bool) -> tuple[Any, Any]:
    """The two online-softmax macros of a schedule whose loops over a tile are ``parallel`` (``T.Parallel`` on CUDA,
    ``T.grid`` on the C target).

    ``online_softmax(acc_s, m_i, m_prev, m_safe, alpha, l_i, row_sum)``: one step over the masked, log2-scaled scores
    ``acc_s [block_h, block_k]`` (invalid entries exactly ``-inf``): the new running maximum ``m_i`` (the old one in
    ``m_prev``), the rescale factor ``alpha = exp2(m_prev - m_new)`` of the running sums, ``acc_s`` replaced by the
    unnormalised probabilities, and the running denominator ``l_i`` updated. The caller rescales its output
    accumulator(s) by ``alpha`` and multiplies ``acc_s`` into them.

    ``finalize(m_i, m_safe, l_i, inv, lse, attn_sink, h0)``: after the last step, ``inv`` holds the factor that
    normalises the output (the sink joins the denominator as ``exp2(sink * log2(e) - m)``; 0 for a row with nothing
    valid, whose output is then 0) and ``lse`` the natural-log log-sum-exp of the valid scores alone (``-inf`` for an
    empty row).

    Non-finite scores give ``torch.logsumexp``'s answers, which the reference uses (``p = exp(s - lse)``):

    =============================  ==========================  =========================================
    valid scores of a row          ``lse``                     ``out``
    =============================  ==========================  =========================================
    a NaN among them               NaN                         NaN
    a ``+inf``, no NaN             ``+inf``                    NaN (``exp(inf - inf)``)
    all ``-inf`` (or none)         ``-inf``                    0 (NaN where a value is infinite: ``0*inf``)
    =============================  ==========================  =========================================

    A NaN sink makes ``out`` NaN (empty rows included), a ``+inf`` sink makes it 0 (NaN with a ``+inf`` score); the
    sink never changes ``lse``. How: like ``torch.logsumexp``, the shift ``m_safe`` is the running maximum, or 0 when
    that is infinite. A ``+inf`` score then adds ``exp2(inf) = inf`` to ``l`` (not ``exp2(inf - inf) = NaN``), so
    ``l`` is NaN exactly when a NaN score was seen: ``exp2(NaN - m)`` poisons the running sum whether or not the
    running maximum kept the NaN (``max``/``fmaxf`` drop it, so nothing may depend on the maximum seeing it), and a
    NaN maximum poisons ``alpha``. ``log2(l) + m_safe`` is then NaN, ``+inf`` or ``-inf`` as above, and ``out``
    inherits NaN through ``P . V`` (a NaN ``P`` or ``inf * V`` in ``acc_o``, times ``1 / l = 0``). The normaliser
    is ``1 / d`` for every ``d`` but 0, so a NaN denominator stays NaN. All of it is per row (once per step, and in
    ``finalize``), nothing is added per score.
    """
    neg_inf = -T.infinity(ACCUM_DTYPE)
    pos_inf = T.infinity(ACCUM_DTYPE)

    def shift(m: Any) -> Any:
        # torch.logsumexp's shift: the maximum, or 0 when it is +-inf. While a row has seen no valid score its
        # maximum is -inf, and exp2(-inf - 0) = 0 (exp2(-inf - -inf) would be NaN); once it is +inf, exp2(inf - 0)
        # adds +inf to the sum instead of NaN, which keeps "+inf score" (lse +inf) apart from "NaN score" (lse NaN).
        return T.if_then_else(T.Or(m == neg_inf, m == pos_inf), T.float32(0), m)

    @T.macro
    def online_softmax(acc_s, m_i, m_prev, m_safe, alpha, l_i, row_sum):  # noqa: ANN001, ANN202
        T.copy(m_i, m_prev)
        T.reduce_max(acc_s, m_i, dim=1, clear=False)
        for h in parallel(block_h):
            m_safe[h] = shift(m_i[h])
            # With m_prev = -inf this is 0 (l and the output are still 0); with m_prev = +inf it is +inf, and l is
            # +inf already, so the row's answer (lse +inf, out NaN) does not change.
            alpha[h] = T.exp2(m_prev[h] - m_safe[h])
        for h, j in parallel(block_h, block_k):
            acc_s[h, j] = T.exp2(acc_s[h, j] - m_safe[h])
        T.reduce_sum(acc_s, row_sum, dim=1)
        for h in parallel(block_h):
            l_i[h] = l_i[h] * alpha[h] + row_sum[h]

    @T.macro
    def finalize(m_i, m_safe, l_i, inv, lse, attn_sink, h0):  # noqa: ANN001, ANN202
        for h in parallel(block_h):
            m_safe[h] = shift(m_i[h])
            if has_sink:
                inv[h] = l_i[h] + T.exp2(attn_sink[T.min(h0 + h, heads - 1)] * T.float32(LOG2E) - m_safe[h])
            else:
                inv[h] = l_i[h]
            # Only a zero denominator (an empty row: its output is 0) is special; a NaN one (NaN score or sink) must
            # stay NaN, and "d > 0 ? 1 / d : 0" would turn it into an output of 0.
            inv[h] = T.if_then_else(inv[h] == 0, T.float32(0), 1.0 / inv[h])
            # l = 0 only for a row of -inf scores; NaN and +inf sums give NaN and +inf (log2(l) + 0).
            lse[h] = T.if_then_else(l_i[h] == 0, neg_inf, (T.log2(l_i[h]) + m_safe[h]) * T.float32(LN2))

    return online_softmax, finalize


def plain_step_macros(
    alloc: Any, online_softmax: Any, *, heads: int, block_h: int, block_k: int, d_qk: int, d_v: int, tile_dtype: str,
    load: Any, ranged: bool = False,
) -> tuple[Any, Any]:
    """The two macros of the plain schedule (every thread gathers, multiplies and normalises), which the forward
    (``tl_kernels.sparse_mla_fwd``) and the split decode kernel (``tl_kernels.sparse_mla_decode``) both run.

    ``open_rows(Q, b, s, h0) -> (q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum)``: the head
    block's buffers (``q_s [block_h, d_qk]``, ``kv_s [block_k, d_qk]`` and ``p_s [block_h, block_k]`` of
    ``tile_dtype`` in shared memory; the float32 scores ``acc_s [block_h, block_k]``, output accumulator ``acc_o
    [block_h, d_v]`` and per-head softmax state), with the queries of heads ``h0 ..`` of ``Q[b, s]`` loaded (``load``
    decodes an element; heads past ``heads`` are zeros, never stored) and the state cleared.

    ``attend(<open_rows' buffers>, Indices, b, s, step, topk, limit, seq_len_kv, scale_log2)``: one step over the
    ``block_k`` entries ``step * block_k ..`` of the row (``kv_s`` already gathered): the scores, ``-inf`` exactly
    where an entry is invalid (see :func:`entry_valid`; ``seq_len_kv`` is the number of rows an index may name),
    scaled to the log2 domain, one ``online_softmax`` step, and ``acc_o`` rescaled and accumulated (the value is
    ``kv_s[:, :d_v]``). ``topk`` is the index rows' width; with ``ranged`` ``Indices`` holds (start, end) per query
    and the entries are the range's rows (:func:`index_at`). (The size parameters carry the names of the kernels'
    symbolic sizes: TileLang names a variable after the macro parameter it is passed to.)
    """
    neg_inf = -T.infinity(ACCUM_DTYPE)

    # Macro parameters carry no annotations on purpose: TileLang gives annotated macro parameters meaning (T.Ref).

    @T.macro
    def open_rows(Q, b, s, h0):  # noqa: ANN001, ANN202
        q_s = alloc.shared([block_h, d_qk], tile_dtype)
        kv_s = alloc.shared([block_k, d_qk], tile_dtype)
        p_s = alloc.shared([block_h, block_k], tile_dtype)
        acc_s = alloc.fragment([block_h, block_k], ACCUM_DTYPE)
        acc_o = alloc.fragment([block_h, d_v], ACCUM_DTYPE)
        m_i = alloc.fragment([block_h], ACCUM_DTYPE)
        m_prev = alloc.fragment([block_h], ACCUM_DTYPE)
        m_safe = alloc.fragment([block_h], ACCUM_DTYPE)
        alpha = alloc.fragment([block_h], ACCUM_DTYPE)
        l_i = alloc.fragment([block_h], ACCUM_DTYPE)
        row_sum = alloc.fragment([block_h], ACCUM_DTYPE)
        for h, d in alloc.parallel(block_h, d_qk):
            q_s[h, d] = T.if_then_else(h0 + h < heads, load(Q[b, s, T.min(h0 + h, heads - 1), d]), 0)
        T.fill(acc_o, 0)
        T.fill(l_i, 0)
        T.fill(m_i, neg_inf)
        return q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum

    @T.macro
    def attend(  # noqa: ANN202
        q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum,  # noqa: ANN001
        Indices, b, s, step, topk, limit, seq_len_kv, scale_log2,  # noqa: ANN001
    ):  # fmt: skip
        T.clear(acc_s)
        T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        # Select the mask: a masked entry's zero row gives a score of 0 that must become exactly -inf.
        for h, j in alloc.parallel(block_h, block_k):
            acc_s[h, j] = T.if_then_else(
                entry_valid(
                    index_at(Indices, b, s, step * block_k + j, topk, ranged, limit), step * block_k + j, limit,
                    seq_len_kv,
                ),
                acc_s[h, j] * scale_log2,
                neg_inf,
            )
        online_softmax(acc_s, m_i, m_prev, m_safe, alpha, l_i, row_sum)
        for h, d in alloc.parallel(block_h, d_v):
            acc_o[h, d] = acc_o[h, d] * alpha[h]
        T.copy(acc_s, p_s)
        T.gemm(p_s, kv_s[:, 0:d_v], acc_o, policy=T.GemmWarpPolicy.FullRow)

    return open_rows, attend


@dataclass(frozen=True)
class Dims:
    """The symbolic sizes of one forward kernel: ``B``, ``S``, ``S_kv`` and the index-row width ``k``, and the shapes
    of the optional inputs (``[1, 1]`` / ``[1]`` placeholders when absent)."""

    batch: Any
    seq_len: Any
    seq_len_kv: Any
    width: Any
    topk_length_shape: list[Any]
    sink_shape: list[Any]


def kernel_dims(heads: int, has_topk_length: bool, has_sink: bool, ranged: bool = False) -> Dims:
    """Fresh symbolic sizes for one forward kernel (one compiled kernel serves every ``B``, ``S``, ``S_kv``, ``k``);
    with ``ranged`` the index rows are (start, end) pairs, ``RANGE_WIDTH`` wide."""
    batch, seq_len = T.dynamic("batch"), T.dynamic("seq_len")
    return Dims(
        batch=batch,
        seq_len=seq_len,
        seq_len_kv=T.dynamic("seq_len_kv"),
        width=RANGE_WIDTH if ranged else T.dynamic("topk"),
        topk_length_shape=[batch, seq_len] if has_topk_length else [1, 1],
        sink_shape=[heads] if has_sink else [1],
    )


def forward_kernel(
    dims: Dims,
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool,
    block_h: int,
    block_k: int,
    threads: int,
    data_dtype: str,
    body: Any,
    ranged: bool = False,
) -> Any:
    """The forward's ``prim_func``: its arguments (the kernel's ABI, the same for every schedule), one thread block
    per query token and ``block_h`` heads, and the row's bookkeeping; ``body`` (a ``T.macro``) is the schedule.

    Arguments (``data_dtype``: bfloat16, or its ``uint16`` storage on the C target): ``Q [B, S, heads, d_qk]``,
    ``KV [B, S_kv, d_qk]``, ``Indices [B, S, k]`` int32 (``[B, S, 2]`` (start, end) with ``ranged``), ``TopkLength``
    (``[B, S]`` int32 or a placeholder), ``AttnSink`` (``[heads]`` float32 or a placeholder), ``sm_scale`` float32,
    ``Out [B, S, heads, d_v]`` (written), ``Lse [B, S, heads]`` float32 (written).

    ``body(Q, KV, Indices, AttnSink, Out, Lse, b, s, h0, scale_log2, limit, num_steps)`` runs inside the thread block
    of query ``s`` of batch row ``b`` and head block ``h0``: ``scale_log2 = sm_scale * log2(e)``; entries at positions
    ``>= limit`` (the row width, or ``topk_length`` when smaller; with ``ranged`` the number of the range's rows in
    ``[0, S_kv)``, :func:`range_length`) are invalid; ``num_steps = ceil(limit / block_k)`` steps hold every valid
    entry (a short ``topk_length`` row skips the rest, an empty range runs none).
    """
    head_blocks = (heads + block_h - 1) // block_h
    batch, seq_len, seq_len_kv, width = dims.batch, dims.seq_len, dims.seq_len_kv, dims.width

    @T.prim_func
    def main(
        Q: T.Tensor([batch, seq_len, heads, d_qk], data_dtype),  # type: ignore[valid-type]
        KV: T.Tensor([batch, seq_len_kv, d_qk], data_dtype),  # type: ignore[valid-type]
        Indices: T.Tensor([batch, seq_len, width], INDEX_DTYPE),  # type: ignore[valid-type]
        TopkLength: T.Tensor(dims.topk_length_shape, INDEX_DTYPE),  # type: ignore[valid-type]
        AttnSink: T.Tensor(dims.sink_shape, ACCUM_DTYPE),  # type: ignore[valid-type]
        sm_scale: T.float32,
        Out: T.Tensor([batch, seq_len, heads, d_v], data_dtype),  # type: ignore[valid-type]
        Lse: T.Tensor([batch, seq_len, heads], ACCUM_DTYPE),  # type: ignore[valid-type]
    ):
        with T.Kernel(seq_len * head_blocks, batch, threads=threads) as (bx, by):
            b = by
            s = bx // head_blocks
            h0 = (bx % head_blocks) * block_h
            scale_log2 = sm_scale * T.float32(LOG2E)
            if ranged:
                limit = range_length(Indices, b, s, seq_len_kv)
            else:
                limit = T.min(TopkLength[b, s], width) if has_topk_length else width
            num_steps = T.ceildiv(limit, block_k)
            body(Q, KV, Indices, AttnSink, Out, Lse, b, s, h0, scale_log2, limit, num_steps)

    return main

"""The lightning indexer's math, written once for the two kernels that compute its scores: ``tl_kernels.indexer``
(writes every score) and ``tl_kernels.index_topk`` (selects from them without writing them).

``scores[b, t, s] = k_scale[b, s] * sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s])`` over a block of ``block_Q``
queries whose ``heads_pad`` padded heads form the ``[rows, dim]`` q tile; the pieces here are the key range the block
visits, the q and weight tile loads, one key block's head-weighted sum (the GEMM, ReLU, weights, the sum over heads)
and the visibility and scale of one score. The key-tile load and what happens to the scores stay in each kernel.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

from typing import Any, NamedTuple

import tilelang.language as T

from tl_kernels import dsl

__all__ = ["ACCUM_DTYPE", "FP8", "INT32_MAX", "IndexerMath", "indexer_math"]

FP8 = "float8_e4m3fn"
# A large int32 used as the "empty" lower bound when folding per-query ranges with min.
INT32_MAX = 2**31 - 1
ACCUM_DTYPE = "float32"  # accumulators, weights and logits


class IndexerMath(NamedTuple):
    """Expression helpers and macros of one indexer configuration (see :func:`indexer_math`)."""

    load: Any  # load(value) -> the value as the tile dtype (decoded from bits on the C target)
    visible: Any  # visible(Starts, Ends, b, t, s, shift) -> whether query t sees key s
    scaled: Any  # scaled(value, KScale, b, s) -> value times k_scale[b, s] (FP8), else value
    key_range: Any  # key_range(Starts, Ends, b, t0, seq_len, seq_len_kv, shift, bounds): [lo, hi) into bounds[0:2]
    key_blocks: Any  # key_blocks(<key_range's arguments>): the key blocks [lo, hi) of that range into bounds[0:2]
    load_queries: Any  # load_queries(Q, W, q_tile, w_tile, b, t0, seq_len): the block's q and weight tiles
    head_sum: Any  # macro head_sum(k_tile, q_tile, acc, acc_heads, w_tile, logits): logits[n, i] for one key block
    tiles: Any  # macro tiles() -> (q_tile, k_tile, acc, acc_heads, w_tile, logits): a block's buffers for the above


def indexer_math(
    *,
    heads: int,
    heads_pad: int,
    block_Q: int,
    block_N: int,
    dim: int,
    dtype: str,
    mode: str,
    tile_dtype: str,
    target: dsl.Target,
) -> IndexerMath:
    """The indexer math for ``block_Q`` queries of ``heads`` heads (padded to ``heads_pad``) of width ``dim`` in
    ``dtype`` (``"bfloat16"`` or FP8) against key blocks of ``block_N``, visibility ``mode`` (``"causal"``: ``s <= t +
    shift``; ``"range"``: ``starts <= s < ends``), tiles of ``tile_dtype`` on ``target``."""
    cpu = dsl.is_cpu(target)
    alloc = dsl.allocators(target)
    fp8 = dtype == FP8
    causal = mode == "causal"

    def load(value: Any) -> Any:
        if tile_dtype != dtype and not cpu:
            return T.Cast(tile_dtype, value)
        return dsl.load_tile(value, dtype, target)

    def visible(Starts: Any, Ends: Any, b: Any, t: Any, s: Any, shift: Any) -> Any:
        if causal:
            return s <= t + shift
        return T.And(Starts[b, t] <= s, s < Ends[b, t])

    def scaled(value: Any, KScale: Any, b: Any, s: Any) -> Any:
        return value * KScale[b, s] if fp8 else value

    def weighted_relu(logit: Any, weight: Any, h: Any) -> Any:
        """``weight * relu(logit)`` of head ``h`` as the reference computes it (``torch.relu`` keeps NaN), and
        exactly 0 for a padded head (``h >= heads``).

        The ReLU is a select, ``logit < 0 ? 0 : logit``: ``max(logit, 0)`` lowers to ``fmaxf`` on CUDA and to
        ``max`` on the C target, both of which turn a NaN logit (a NaN key or query) into 0, so a NaN position would
        score 0.0 and could be selected. A padded head is dropped by a select too, not by its zero weight: a
        ``+-inf`` key times the padded q row's zeros is NaN, and NaN times 0 stays NaN, where the reference (which
        has no padded heads) gives ``+-inf``."""
        relu = T.Select(logit < T.float32(0), T.float32(0), logit)
        if heads_pad == heads:  # a Python test: no padded head in this tile
            return relu * weight
        return T.Select(h < heads, relu * weight, T.float32(0))

    # Macro parameters carry no annotations on purpose: TileLang gives annotated macro parameters meaning (T.Ref).

    @T.macro
    def key_range(Starts, Ends, b, t0, seq_len, seq_len_kv, shift, bounds):
        """The key range ``[bounds[0], bounds[1])`` that at least one query of the block sees (empty: lo >= hi).
        Written into a local buffer: a macro cannot rebind its caller's variables. (The size parameters carry the
        names of the kernels' symbolic sizes: TileLang names a variable after the macro parameter it is passed to.)"""
        if causal:
            bounds[0] = 0
            bounds[1] = T.max(0, T.min(seq_len_kv, T.min(seq_len, t0 + block_Q) + shift))
        else:
            bounds[0] = INT32_MAX
            bounds[1] = 0
            for i in T.serial(block_Q):
                if t0 + i < seq_len:
                    lo_i = T.max(Starts[b, t0 + i], 0)
                    hi_i = T.min(Ends[b, t0 + i], seq_len_kv)
                    if lo_i < hi_i:
                        bounds[0] = T.min(bounds[0], lo_i)
                        bounds[1] = T.max(bounds[1], hi_i)

    @T.macro
    def key_blocks(Starts, Ends, b, t0, seq_len, seq_len_kv, shift, bounds):
        """:func:`key_range`, then turned into the key blocks ``[bounds[0], bounds[1])`` of ``block_N`` keys that
        cover it (both 0 when it is empty)."""
        key_range(Starts, Ends, b, t0, seq_len, seq_len_kv, shift, bounds)
        if bounds[0] < bounds[1]:
            bounds[0] = bounds[0] // block_N
            bounds[1] = T.ceildiv(bounds[1], block_N)
        else:
            bounds[0] = 0
            bounds[1] = 0

    @T.macro
    def load_queries(Q, W, q_tile, w_tile, b, t0, seq_len):
        """The block's ``[block_Q * heads_pad, dim]`` q tile and ``[block_Q, heads_pad]`` weights; padded heads and
        queries past ``seq_len`` are zero. (Zeros alone do not make a padded head add nothing: ``0 * inf`` is NaN,
        so ``head_sum`` drops padded heads with a select; the scores of queries past ``seq_len`` are never used.)"""
        for r, d in alloc.parallel(block_Q * heads_pad, dim):
            q_tile[r, d] = T.if_then_else(
                t0 + r // heads_pad < seq_len and r % heads_pad < heads,
                load(Q[b, t0 + r // heads_pad, r % heads_pad, d]),
                T.cast(0, tile_dtype),
            )
        for i, h in alloc.parallel(block_Q, heads_pad):
            w_tile[i, h] = T.if_then_else(t0 + i < seq_len and h < heads, W[b, t0 + i, h], T.float32(0))

    @T.macro
    def head_sum(k_tile, q_tile, acc, acc_heads, w_tile, logits):
        """``logits[n, i] = sum_h w[i, h] * relu(k_tile[n] . q_tile[i, h])`` (before ``k_scale``) for one key block,
        over the real heads only; NaN and ``+-inf`` propagate as in the reference (see ``weighted_relu``)."""
        # FullRow: the warpgroups split the keys (M), each holds all q-head rows (N) of its keys, so the sum over
        # heads below stays inside a thread quad (FullCol split the heads and reduced through shared memory with a
        # block-wide barrier per step).
        T.gemm(k_tile, q_tile, acc, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        for n, i, h in alloc.parallel(block_N, block_Q, heads_pad):
            acc_heads[n, i, h] = weighted_relu(acc_heads[n, i, h], w_tile[i, h], h)
        T.reduce_sum(acc_heads, logits, dim=-1, clear=True)

    @T.macro
    def tiles():
        """The block's buffers: the q tile ``[block_Q * heads_pad, dim]`` and a key tile ``[block_N, dim]`` (tile
        dtype, shared), the GEMM accumulator ``[block_N, block_Q * heads_pad]`` with its per-head view ``[block_N,
        block_Q, heads_pad]``, the weights ``[block_Q, heads_pad]`` and the logits ``[block_N, block_Q]`` (float32)."""
        q_tile = alloc.shared([block_Q * heads_pad, dim], tile_dtype)
        k_tile = alloc.shared([block_N, dim], tile_dtype)
        acc = alloc.fragment([block_N, block_Q * heads_pad], ACCUM_DTYPE)
        acc_heads = T.reshape(acc, [block_N, block_Q, heads_pad])
        # The weights live in shared memory, not registers: as a fragment every thread would hold the weights of all
        # its accumulator columns (32 floats at 128 rows), which spilled at 4 consumer warpgroups.
        w_tile = alloc.shared([block_Q, heads_pad], ACCUM_DTYPE)
        logits = alloc.fragment([block_N, block_Q], ACCUM_DTYPE)
        return q_tile, k_tile, acc, acc_heads, w_tile, logits

    return IndexerMath(load, visible, scaled, key_range, key_blocks, load_queries, head_sum, tiles)

"""Fused selection: the lightning indexer's scores and their top-k in one kernel that never writes the scores.

Contract: ``dsa.reference.index_topk`` (``indices [B, S, topk]`` int32, a set per row with ``-1`` padding, and the
selected scores ``[B, S, topk]`` float32 with ``-inf`` at padding; among equal scores the smaller key position wins).
The scores are those of ``tl_kernels.indexer``: ``k_scale[b, s] * sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s])``.

Algorithm (one thread block per ``block_Q`` queries of one batch row, as in the indexer):

* The block walks the key blocks that some of its queries see, in increasing position, and computes each block's
  scores with the indexer's tiling (one GEMM ``k_tile x q_tile^T``, ReLU, head weights, sum over heads, ``k_scale``)
  into a ``[block_N, block_Q]`` tile in shared memory; invisible positions become ``-inf``.
* Each query keeps a candidate buffer in shared memory (``cand_capacity`` positions and order-preserving keys, see
  ``tl_kernels.radix_select``) and a threshold key ``T`` (none at first). A visible finite score whose key is above
  ``T`` is appended (an atomic slot counter); every other score is dropped on the spot.
* Before a key block is appended, a buffer that might overflow (``fill + block_N > cand_capacity``) is compacted:
  the exact radix select of ``tl_kernels.radix_select`` (with its tie select on the position) picks the ``topk``
  best candidates, writes them to the output rows, and they are read back as the buffer's first ``topk`` entries;
  ``T`` rises to the ``topk``-th key (``radix_select.exclusive_threshold``).
* Ties need nothing more: keys arrive in increasing position, so a later key equal to ``T`` always loses to the
  kept ones (the tie rule), and dropping it is exact; inside the buffer the radix select's tie select applies.
* At the end a row whose buffer holds at most ``topk`` candidates (every row with ``topk`` or fewer visible keys:
  the short-row path) is copied out and padded without any search; any other runs the radix select once more.

Nothing of size ``S x S_kv`` exists: the workspace is the shared memory of the grid's blocks, and the only global
writes are the two ``[B, S, topk]`` outputs (also the staging area of compactions). Insertions for random order:
about ``topk * ln(S_kv / topk)`` per query, so a few compactions per row; an increasing score sequence compacts every
``cand_capacity - topk`` keys (linear, still correct).

Targets: the C target (serial loops, the CPU tier) and CUDA. On sm_90a the GEMM is a wgmma; the key tile is loaded
without TMA or warp specialisation (the selection code indexes threads directly, which automatic warp specialisation
would split): in 16-byte vectors from contiguous keys (FP8 and bf16) and from FP8 key pages in DeepGEMM's per-page
layout (``key_layout="paged"``, whose per-page scales load as 16-byte vectors too, once per key block), a byte at a
time from 132-byte FP8 key rows. ``Config.prefetch`` (every layout; the default by :func:`prefetch_by_default`)
double-buffers the key tile through registers: the next key block's loads are issued before the current block's
selection, so they overlap it. (Not ``cp.async`` into a second shared tile: the same 2 blocks per SM at V3.2 for
16 KB more shared memory, and TileLang 0.1.15 cannot pipeline a copy over a symbolic trip count on the portable
schedule, see ``tl_kernels.indexer``.)
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

import dataclasses
from dataclasses import dataclass
from typing import Any

import tilelang.language as T

from tl_kernels import dsl, indexer
from tl_kernels import radix_select as rs
from tl_kernels.indexer_steps import indexer_math

__all__ = [
    "CPU_DEFAULT",
    "KEY_LAYOUTS",
    "PORTABLE_TUNING_SPACE",
    "TUNING_SPACE",
    "Config",
    "build",
    "cand_capacity",
    "check_config",
    "default_config",
    "prefetch_by_default",
    "smem_bytes",
]

ACCUM_DTYPE = "float32"
KEY_LAYOUTS = ("rows", "paged")
"""Byte layouts of a paged FP8 key cache (``dsa.kv_format.index_key_layout``): ``"rows"``, one ``dim + 4``-byte row
per key (the values, then the float32 scale); ``"paged"``, DeepGEMM's and vLLM's indexer cache, a page holds its
``page_size`` keys' values (``page_size * dim`` bytes) and then their ``page_size`` float32 scales."""
_SCALE_BYTES = 4
_SCALE_VECTOR = 4  # float32 scales per 16-byte load
INDEX_DTYPE = "int32"
COUNT_DTYPE = "int32"
SLOT_DTYPE = "int64"
SLOT_BYTES = 8
SLOT_ALIGN_SLACK_BYTES = 256
CAND_ENTRY_BYTES = 4 + 4  # int32 position + uint32 key
# Per query: the fill counter (int32) and the threshold key (uint32).
ROW_STATE_BYTES = 4 + 4
# Shared memory of the explicit barriers' design: TileLang's automatic storage sync would put barriers inside the
# selection's divergent single-writer branches.
_PASS_CONFIGS: dict[str, Any] = {
    **rs.PASS_CONFIGS,
    "tl.disable_warp_specialized": True,
    "tl.disable_tma_lower": True,
}


@dataclass(frozen=True)
class Config:
    """Tunable parameters of the fused kernel.

    q_rows: q-head rows one block aims for (its queries times their padded heads, :func:`indexer.block_queries`),
        the GEMM N dimension. Every query of the block has its own candidate buffer, so fewer rows leave room for
        larger ``topk``.
    block_N: keys per step (the GEMM M dimension; a multiple of 64 per warpgroup on CUDA).
    threads: threads per block (whole warpgroups on CUDA; the C target ignores it).
    cand_factor: candidate slots per query are ``max(cand_factor * topk, topk + block_N)``; larger means fewer
        compactions and more shared memory.
    prefetch: the key tile double-buffered through registers: key block ``i + 1``'s loads are issued right after
        block ``i``'s scores, into a ``[block_N, dim]`` register fragment (at V3.2 FP8: 4 x 16 bytes a thread), so
        they are in flight during block ``i``'s selection (candidate inserts, compactions) and are stored to the
        shared key tile at the start of step ``i + 1``. ``False``: each block's loads are issued and waited for at
        the start of its step (the older schedule; fewer registers).
    """

    q_rows: int = 64
    block_N: int = 128
    threads: int = 256
    cand_factor: int = 2
    prefetch: bool = False


TUNING_SPACE: dict[str, tuple] = {
    "q_rows": (64, 128),
    "block_N": (128,),
    "threads": (256,),
    "cand_factor": (2,),
    "prefetch": (True, False),
}
PORTABLE_TUNING_SPACE: dict[str, tuple] = {
    "q_rows": (64,),
    "block_N": (64, 128),
    "threads": (128, 256),
    "cand_factor": (2,),
    "prefetch": (False, True),
}
"""The candidates on the portable schedule (mma.sync; most of its architectures have 99 KB of shared memory)."""
CPU_DEFAULT = Config(q_rows=64, block_N=64, threads=128, cand_factor=2)
"""C-target default: short key tiles and small buffers, so the CPU tests compact often (its ``prefetch`` is
:func:`prefetch_by_default`'s, set by :func:`default_config`, so the C target runs what sm_90a runs)."""

# default_config tries these in order; later ones need less shared memory (large topk, large head dims).
_DEFAULT_LADDER = (
    Config(q_rows=64, block_N=128, threads=256, cand_factor=2),
    Config(q_rows=64, block_N=64, threads=128, cand_factor=2),
    Config(q_rows=16, block_N=64, threads=128, cand_factor=1),
)


def cand_capacity(topk: int, config: Config) -> int:
    """Candidate slots per query: room for ``topk`` kept entries and at least one whole key block more."""
    return max(config.cand_factor * topk, topk + config.block_N)


def _indexer_config(config: Config) -> indexer.Config:
    """The indexer tiling this config shares (one key tile in flight)."""
    return indexer.Config(q_rows=config.q_rows, block_N=config.block_N, num_stages=1, threads=config.threads)


def _indexer_static(static: dict) -> dict:
    return {name: static[name] for name in ("heads", "dim", "dtype", "mode", "target") if name in static}


def smem_bytes(static: dict, config: Config) -> int:
    """Shared memory of one CUDA block: the indexer's tiles (one key tile), the score tile, the radix histograms, the
    select state, and per query its candidate buffer, fill counter and threshold."""
    block_Q = indexer.block_queries(static["heads"], config.q_rows)
    tiles = indexer.smem_bytes(_indexer_static(static), _indexer_config(config))
    score_tile = config.block_N * block_Q * 4
    buffers = block_Q * (cand_capacity(static["topk"], config) * CAND_ENTRY_BYTES + ROW_STATE_BYTES)
    # A paged key block's cache rows (with the alignment TileLang gives the extra tile: 184 B on sm_90a at V3.2).
    slots = config.block_N * SLOT_BYTES + SLOT_ALIGN_SLACK_BYTES if static.get("page_size", 0) else SLOT_BYTES
    # Key pages: a key block's scales (the prefetch's registers take no shared memory).
    scales = config.block_N * _SCALE_BYTES if static.get("key_layout", "rows") == "paged" else 0
    return tiles + score_tile + rs.hist_bytes() + rs.state_bytes() + buffers + slots + scales


def check_config(static: dict, config: Config) -> None:
    """Raise ValueError when ``config`` cannot build for ``static``: the indexer's ``heads``, ``dim``, ``dtype``,
    ``mode`` (and optionally ``target``) plus ``topk`` (a positive int). The tile constraints are the indexer's; the
    shared memory adds the candidate buffers."""
    topk = static.get("topk")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if config.cand_factor < 1:
        raise ValueError(f"cand_factor must be >= 1, got {config.cand_factor}")
    indexer.check_config(_indexer_static(static), _indexer_config(config))
    limit = dsl.smem_limit_bytes(dsl.static_target(static))
    if limit is None:  # the C target: no shared memory
        return
    smem = smem_bytes(static, config)
    if smem > limit:
        raise ValueError(f"shared memory {smem} B exceeds {limit} B (topk {topk}, {config})")


def prefetch_by_default(static: dict) -> bool:
    """The ``prefetch`` rule of :func:`default_config` until a GPU record decides: on for contiguous keys (prefill)
    and FP8 key pages, on sm_90a and on the C target (which checks the schedule Hopper runs); off for paged key rows
    (their builds stay what they were) and on the portable schedule (unmeasured there; its default build stays what
    it was, and ``PORTABLE_TUNING_SPACE`` holds both).

    Why on for sm_90a, at V3.2 (64 heads x 128 FP8 keys, topk 2048, 256 threads, ptxas): the 72 registers of the
    old schedule become 94 (0 spills, same shared memory), so an SM holds 2 blocks instead of 3 at 64 q-head rows
    (unchanged at 128, 110 -> 128 registers: its 116,736 B allow one; bf16 keys, 80 -> 110 registers, keep the 2
    that their 99,344 B allow); each step's key loads then overlap its own block's selection instead of waiting at
    the step's start and relying on a third block to cover them. Forcing 3 blocks (``__launch_bounds__(256, 3)``)
    caps it at 80 registers and spills 8 bytes. Which one is faster is the GPU record's question: both are in
    :data:`TUNING_SPACE`."""
    target = dsl.static_target(static)
    if static.get("page_size", 0) and static.get("key_layout", "rows") == "rows":
        return False
    return dsl.is_cpu(target) or dsl.is_hopper(target)


def default_config(static: dict) -> Config:
    """A config that builds for ``static`` and serves every shape: :data:`CPU_DEFAULT` on the C target, else the
    first of the ladder that fits (ValueError when none does: too many heads, or a ``topk`` whose buffers exceed
    shared memory even one query per block); ``prefetch`` by :func:`prefetch_by_default`."""
    if dsl.is_cpu(dsl.static_target(static)):
        config = CPU_DEFAULT
    else:
        config = dsl.first_valid_config(check_config, static, _DEFAULT_LADDER, kernel="fused index_topk")
    config = dataclasses.replace(config, prefetch=prefetch_by_default(static))
    check_config(static, config)
    return config


def build(
    *,
    heads: int,
    dim: int,
    dtype: str,
    mode: str,
    topk: int,
    q_rows: int = Config.q_rows,
    block_N: int = Config.block_N,
    threads: int = Config.threads,
    cand_factor: int = Config.cand_factor,
    prefetch: bool = Config.prefetch,
    page_size: int = 0,
    scale_col: int = 0,
    key_layout: str = "rows",
    target: dsl.Target = dsl.CPU_TARGET,
) -> Any:
    """The fused ``index_topk`` prim_func for the given static parameters; B, S and S_kv are dynamic.

    Args:
        heads, dim, dtype, mode: as ``tl_kernels.indexer.build`` (``"causal"``: ``s <= t + S_kv - S``; ``"range"``:
            ``starts[b, t] <= s < ends[b, t]``).
        topk: entries per query (any positive int; rows with fewer visible keys are padded).
        q_rows, block_N, threads, cand_factor, prefetch: the :class:`Config` fields (``prefetch`` for every key
            layout: contiguous keys, paged key rows and key pages).
        page_size: 0 for contiguous keys; else the keys live in a **paged cache** of ``page_size``-token pages
            (decoding, ``"range"`` mode only): key position ``s`` of sequence ``b`` is cache row ``block_table[b, s //
            page_size] * page_size + s % page_size``; a position whose page entry is negative or whose row is past the
            cache is invisible. The logical key length is ``pages_per_sequence * page_size``.
        scale_col: paged FP8 ``"rows"`` only: the column of a row's float32 scale in the ``k_scale`` view (below).
        key_layout: paged FP8 only, one of :data:`KEY_LAYOUTS`. ``"paged"`` keeps each key's ``dim`` bytes
            contiguous at a multiple of ``dim`` bytes into its page, so (with 16-byte aligned pages) the key tile is
            loaded in 16-byte vectors; ``"rows"`` rows are ``dim + 4`` bytes apart (4-byte aligned), loaded bytewise.
        target: ``"c"`` or a CUDA target dict.

    Kernel arguments, in order (``k_scale`` only for FP8, ``starts``/``ends`` only in ``"range"`` mode):
        q ``[B, S, heads, dim]`` dtype; k ``[B, S_kv, dim]`` dtype; weights ``[B, S, heads]`` float32;
        [k_scale ``[B, S_kv]`` float32]; [starts, ends ``[B, S]`` int32]; indices ``[B, S, topk]`` int32 and
        scores ``[B, S, topk]`` float32 (both written completely). On the C target the dtype tensors travel as
        ``dsl.storage_dtype`` bits (uint16 / uint8).
        Paged (``page_size > 0``): k ``[num_slots, k_row]`` dtype (a row's first ``dim`` values are the key; FP8 rows
        may carry their scale bytes after them), [k_scale ``[num_slots, scale_row]`` float32, read at column
        ``scale_col``: for FP8-layout bytes a float32 view of the same rows], block_table ``[B, pages_per_sequence]``
        int32, then starts, ends, indices, scores as above; q ``[B, Q, heads, dim]`` and weights ``[B, Q, heads]``
        have their own length ``Q``, and query ``t`` reads row ``t % Q``: ``Q = S`` for one query per row, or (a split
        launch's virtual queries, ``S = splits x Q``) ``Q`` a multiple of the block's queries, so that every split's
        queries read the same rows. With ``key_layout="paged"``: k ``[num_pages, page_size *
        (dim + 4)]`` dtype (whole pages; key ``o`` of page ``p`` at ``k[p, o * dim : (o + 1) * dim]``) and k_scale
        ``[num_pages, page_size * (dim + 4) / 4]`` float32 (a view of the same bytes; its scale at column
        ``page_size * dim / 4 + o``); slot ``p * page_size + o`` as before.
    """
    cpu = dsl.is_cpu(target)
    paged = page_size > 0
    if page_size < 0 or (paged and mode != "range"):
        raise ValueError(f"page_size must be >= 0, and a paged cache needs mode 'range'; got {page_size}, {mode!r}")
    if key_layout not in KEY_LAYOUTS or (key_layout != "rows" and not (paged and dtype == indexer.FP8)):
        raise ValueError(f"key_layout must be one of {KEY_LAYOUTS} ('paged' for paged FP8 keys), got {key_layout!r}")
    # DeepGEMM's per-page layout: a page's values, then its scales (as float32 words, the page is `page_words`).
    page_keys = key_layout == "paged"
    page_words = page_size * (dim + _SCALE_BYTES) // _SCALE_BYTES
    # Key pages: a key block's scales are runs of `_SCALE_VECTOR` consecutive float32 scales of one page (16 bytes,
    # 16-byte aligned when pages are), loaded as vectors into a shared `[block_N]` scale tile once per key block
    # (instead of one scalar load per score), where every run lies in one page: page_size and block_N (so every
    # key block's start) multiples of the run. Whole runs are valid or invalid together (one page).
    scale_runs = page_keys and page_size % _SCALE_VECTOR == 0 and block_N % _SCALE_VECTOR == 0
    scale_run_count = block_N // _SCALE_VECTOR
    static = {"heads": heads, "dim": dim, "dtype": dtype, "mode": mode, "topk": topk, "target": target}
    config = Config(q_rows=q_rows, block_N=block_N, threads=threads, cand_factor=cand_factor, prefetch=prefetch)
    check_config(static, config)
    capacity = cand_capacity(topk, config)
    block_Q = indexer.block_queries(heads, q_rows)
    heads_pad = indexer.padded_heads(heads, block_Q)
    alloc = dsl.allocators(target)
    select = rs.select_macros(k=topk, cand_capacity=capacity, threads=threads, cpu=cpu)
    fp8 = dtype == indexer.FP8
    causal = mode == "causal"
    io_dtype = dsl.storage_dtype(dtype, target)
    tile_dtype = indexer.tile_dtype_for(dtype, target)
    neg_inf = -T.infinity(ACCUM_DTYPE)
    math_ = indexer_math(
        heads=heads, heads_pad=heads_pad, block_Q=block_Q, block_N=block_N, dim=dim, dtype=dtype, mode=mode,
        tile_dtype=tile_dtype, target=target,
    )  # fmt: skip

    batch, seq = T.dynamic("batch, seq_len")
    # Paged: the query rows are their own length, and query t reads row t % q_len (a split launch's virtual queries
    # share their real query's row instead of copies of it; dsa.launch.index_topk_split). Otherwise q_len is seq.
    q_len = T.dynamic("q_len") if paged else seq
    if page_keys:
        num_pages, max_pages = T.dynamic("num_pages, max_pages")
        num_slots = num_pages * page_size
        seq_kv = max_pages * page_size
    elif paged:
        num_slots, k_row, scale_row, max_pages = T.dynamic("num_slots, k_row, scale_row, max_pages")
        seq_kv = max_pages * page_size
    else:
        seq_kv = T.dynamic("seq_len_kv")

    def key_slot(BlockTable: Any, b: Any, pos: Any) -> Any:
        """The cache row (int64) of key position ``pos`` of sequence ``b``, -1 when its page entry is negative or
        the row lies past the cache (paged keys only)."""
        page = BlockTable[b, T.min(pos // page_size, max_pages - 1)]
        slot = T.Cast("int64", page) * page_size + pos % page_size
        return T.if_then_else(T.And(T.And(pos < seq_kv, page >= 0), slot < num_slots), slot, T.int64(-1))

    def key_value(K: Any, slot_tile: Any, b: Any, pos: Any, n: Any, d: Any) -> Any:
        """Element ``d`` of key ``pos`` (row ``n`` of the key block) as a tile value, 0 past the keys (or at an
        invalid paged row, whose row ``slot_tile[n]`` is -1)."""
        if page_keys:
            # Page, then a dim-aligned offset into it: the vectoriser sees 16-byte aligned runs along d.
            slot = T.max(slot_tile[n], 0)
            value = K[slot // page_size, slot % page_size * dim + d]
            return T.if_then_else(slot_tile[n] >= 0, math_.load(value), T.cast(0, tile_dtype))
        if paged:
            return T.if_then_else(slot_tile[n] >= 0, math_.load(K[T.max(slot_tile[n], 0), d]), T.cast(0, tile_dtype))
        return T.if_then_else(pos < seq_kv, math_.load(K[b, T.min(pos, seq_kv - 1), d]), T.cast(0, tile_dtype))

    def run_scale(KScale: Any, slot_tile: Any, s0: Any, r: Any, v: Any) -> Any:
        """Scale ``v`` of run ``r`` of the key block at ``s0`` (key pages with ``scale_runs``): the run's page from
        its first key's cache row (page 0 for an invalid run, whose scales are never used), its offset in the page
        from the position (a multiple of the run length, so the loads vectorise)."""
        page = T.max(slot_tile[r * _SCALE_VECTOR], 0) // page_size
        # The run's offset in runs, so that it is a visible multiple of 4 whatever the analyser knows of s0.
        offset = (s0 // _SCALE_VECTOR + r) % (page_size // _SCALE_VECTOR) * _SCALE_VECTOR
        return KScale[page, page_size * dim // _SCALE_BYTES + offset + v]

    def key_score(logit: Any, KScale: Any, slot_tile: Any, scale_tile: Any, b: Any, pos: Any, n: Any) -> Any:
        """The score of a visible key from its head-weighted sum: times its FP8 scale; -inf at an invalid paged row."""
        if not paged:
            return math_.scaled(logit, KScale, b, T.min(pos, seq_kv - 1))
        slot = T.max(slot_tile[n], 0)
        if scale_runs:
            value = logit * scale_tile[n]
        elif page_keys:
            value = logit * KScale[slot // page_size, page_size * dim // _SCALE_BYTES + slot % page_size]
        else:
            value = logit * KScale[slot, scale_col] if fp8 else logit
        return T.if_then_else(slot_tile[n] >= 0, value, neg_inf)

    # Macro parameters carry no annotations on purpose: TileLang gives annotated macro parameters meaning (T.Ref).

    # The block-wide macros take the block's first row (its threads, candidate buffers and locals) and the per-query
    # state as a payload: fill ([block_Q] int32, candidates per buffer), threshold ([block_Q] uint32, keys at or below
    # it are dropped) and score_tile ([block_N, block_Q] float32, the key block's scores, -inf where invisible).

    @T.macro
    def init_rows(row, state):
        fill, threshold = state
        for i in T.serial(block_Q):
            fill[i] = 0
            threshold[i] = T.uint32(0)  # below every finite key: nothing is dropped before the first compaction

    @T.macro
    def insert(row, j, args):
        """Score ``j`` of the tile (key ``j // block_Q``, query ``j % block_Q``) joins its query's candidates when it
        is finite and above the query's threshold."""
        s0, fill, threshold, score_tile = args
        n = j // block_Q
        i = j % block_Q
        row.local_key[0] = rs.order_key(score_tile[n, i])
        if rs.is_finite_key(row.local_key[0]) and row.local_key[0] > threshold[i]:
            row.local_count[0] = T.atomic_add(fill[i], 1, return_prev=True)
            if row.local_count[0] < capacity:  # never false: full buffers were compacted before this block
                row.cand_idx[i * capacity + row.local_count[0]] = s0 + n
                row.cand_key[i * capacity + row.local_count[0]] = row.local_key[0]

    @T.macro
    def reload(row, j, _):
        """Entry ``j`` of the row's selection (just written to the outputs) back into its candidate buffer."""
        row.cand_idx[row.cand_base + j] = row.indices[row.b, row.s, j]
        row.cand_key[row.cand_base + j] = rs.order_key(row.out_scores[row.b, row.s, j])

    @T.macro
    def after_compaction(row, args):
        i, fill, threshold = args
        fill[i] = topk
        threshold[i] = rs.exclusive_threshold(row.key_state)

    @T.macro
    def copy_out(row, j, n):
        """Short rows: candidate ``j`` of ``n <= topk`` straight to the outputs, padding after them."""
        if j < n:
            row.indices[row.b, row.s, j] = row.cand_idx[row.cand_base + j]
            row.out_scores[row.b, row.s, j] = rs.key_score(row.cand_key[row.cand_base + j])
        else:
            row.indices[row.b, row.s, j] = rs.INVALID_INDEX
            row.out_scores[row.b, row.s, j] = neg_inf

    @T.macro
    def fetch_keys(K, KScale, BlockTable, slot_tile, dst, scale_regs, b, s0):
        """Key block ``[s0, s0 + block_N)`` of sequence ``b``: (paged) its cache rows into ``slot_tile``, then its
        values into ``dst`` (``[block_N, dim]`` tile values, 0 past the keys and at invalid rows) and (key pages with
        ``scale_runs``) its scales into ``scale_regs`` (per thread on CUDA: one run of the first ``block_N / 4``
        threads, a 16-byte load; the whole block's on the C target; :func:`store_scales` stores them)."""
        if paged:
            for n in alloc.parallel(block_N):
                slot_tile[n] = key_slot(BlockTable, b, s0 + n)
            select.barrier()
        for n, d in alloc.parallel(block_N, dim):
            dst[n, d] = key_value(K, slot_tile, b, s0 + n, n, d)
        if scale_runs:
            if cpu:
                for r, v in T.grid(scale_run_count, _SCALE_VECTOR):
                    scale_regs[r * _SCALE_VECTOR + v] = run_scale(KScale, slot_tile, s0, r, v)
            else:
                # Explicit threads and a vectorised loop: a parallel loop spreads 128 scales over 256 threads, one
                # scalar load each.
                if T.get_thread_binding() < scale_run_count:
                    for v in T.vectorized(_SCALE_VECTOR):
                        scale_regs[v] = run_scale(KScale, slot_tile, s0, T.get_thread_binding(), v)

    @T.macro
    def store_scales(scale_regs, scale_tile):
        """The scales :func:`fetch_keys` loaded into the shared ``[block_N]`` scale tile."""
        if cpu:
            for n in T.serial(block_N):
                scale_tile[n] = scale_regs[n]
        else:
            if T.get_thread_binding() < scale_run_count:
                for v in T.vectorized(_SCALE_VECTOR):
                    scale_tile[T.get_thread_binding() * _SCALE_VECTOR + v] = scale_regs[v]

    @T.macro
    def body(Q, K, W, KScale, BlockTable, Starts, Ends, Indices, Scores):
        with T.Kernel(T.ceildiv(seq, block_Q), batch, threads=threads) as (bq, bb):
            q_tile, k_tile, acc, acc_heads, w_tile, logits = math_.tiles()
            score_tile = alloc.shared([block_N, block_Q], ACCUM_DTYPE)
            fill = alloc.shared([block_Q], COUNT_DTYPE)
            threshold = alloc.shared([block_Q], rs.KEY_DTYPE)
            bounds = T.alloc_local([2], INDEX_DTYPE)
            # Paged keys: each key block's cache rows, looked up in the block table once per key (not per element).
            slot_tile = alloc.shared([block_N if paged else 1], SLOT_DTYPE)
            # Key pages: each key block's scales (see scale_runs).
            scale_tile = alloc.shared([block_N], ACCUM_DTYPE) if scale_runs else None
            kb_lo = T.alloc_var(INDEX_DTYPE)
            kb_hi = T.alloc_var(INDEX_DTYPE)
            t0 = bq * block_Q
            shift = seq_kv - seq  # causal alignment: query t sees s <= t + shift
            base = rs.new_row(
                alloc, cand_entries=block_Q * capacity, scores=None, indices=Indices, out_scores=Scores, b=bb, s=t0,
                width=seq_kv, tx=None if cpu else T.get_thread_binding(),
            )  # fmt: skip

            # The key blocks [kb_lo, kb_hi) that at least one query of this block sees.
            math_.key_blocks(Starts, Ends, bb, t0, seq, seq_kv, shift, bounds)
            kb_lo = bounds[0]
            kb_hi = bounds[1]
            # t0 % q_len + i is t0 + i's row: q_len is a multiple of block_Q (the split launcher pads to it) or seq;
            # truncmod: both are non-negative, and floormod's sign fix-ups would be generated at every use.
            # T.max(q_len, 1) (q_len >= 1 anyway): TileLang 0.1.15 renames a bare Var passed to a macro after the
            # macro's parameter (seq_len), and two Vars named seq_len break the C target's host call.
            if paged:
                math_.load_queries(Q, W, q_tile, w_tile, bb, T.truncmod(t0, q_len), T.max(q_len, 1))
            else:
                math_.load_queries(Q, W, q_tile, w_tile, bb, t0, seq)
            select.single(base, init_rows, (fill, threshold))
            select.barrier()

            # One more step than key blocks: the last one selects every row's result. The select is written once
            # (for compactions and the final selection alike): each instance of it costs lowering time and code.
            n_steps = kb_hi - kb_lo
            # With prefetch: the next key block's values, in registers between the steps (the double buffer's
            # second half; the shared key tile is the first).
            k_next = alloc.fragment([block_N, dim], tile_dtype) if prefetch else None
            # Key pages: this thread's loaded scales (with prefetch: the next key block's, between the steps).
            scale_regs = T.alloc_local([block_N if cpu else _SCALE_VECTOR], ACCUM_DTYPE) if scale_runs else None
            if prefetch:
                if n_steps > 0:
                    fetch_keys(K, KScale, BlockTable, slot_tile, k_next, scale_regs, bb, kb_lo * block_N)
            for step in T.serial(n_steps + 1):
                s0 = (kb_lo + step) * block_N
                if step < n_steps:
                    if prefetch:
                        for n, d in alloc.parallel(block_N, dim):
                            k_tile[n, d] = k_next[n, d]
                    else:
                        fetch_keys(K, KScale, BlockTable, slot_tile, k_tile, scale_regs, bb, s0)
                    if scale_runs:
                        store_scales(scale_regs, scale_tile)
                    select.barrier()
                    math_.head_sum(k_tile, q_tile, acc, acc_heads, w_tile, logits)
                    for n, i in alloc.parallel(block_N, block_Q):
                        score_tile[n, i] = T.if_then_else(
                            t0 + i < seq and s0 + n < seq_kv and math_.visible(Starts, Ends, bb, t0 + i, s0 + n, shift),
                            key_score(logits[n, i], KScale, slot_tile, scale_tile, bb, s0 + n, n),
                            neg_inf,
                        )
                    select.barrier()
                    if prefetch:
                        # Block i + 1's loads go out now and land while block i's candidates are selected.
                        if step + 1 < n_steps:
                            fetch_keys(K, KScale, BlockTable, slot_tile, k_next, scale_regs, bb, s0 + block_N)
                for i in T.serial(block_Q):
                    row = base._replace(s=t0 + i, cand_base=i * capacity)
                    # Before a key block: make room where this block could overflow the buffer (it keeps its topk
                    # best). At the end: select each row that holds more than topk candidates. fill is uniform.
                    if (step < n_steps and fill[i] + block_N > capacity) or (
                        step == n_steps and t0 + i < seq and fill[i] > topk
                    ):
                        select.select_row(row, fill[i])
                        if step < n_steps:
                            select.for_range(row, topk, reload, None)
                            select.single(base, after_compaction, (i, fill, threshold))
                            select.barrier()
                    elif step == n_steps and t0 + i < seq:
                        select.for_range(row, topk, copy_out, fill[i])
                if step < n_steps:
                    select.for_range(base, block_N * block_Q, insert, (s0, fill, threshold, score_tile))
                    select.barrier()

    q_shape = [batch, q_len, heads, dim]
    k_shape = [batch, seq_kv, dim]
    w_shape = [batch, q_len, heads]
    row_shape = [batch, seq]
    out_shape = [batch, seq, topk]

    def index_topk(
        Q=None, K=None, W=None, KScale=None, BlockTable=None, Starts=None, Ends=None, Indices=None, Scores=None
    ):
        body(Q, K, W, KScale, BlockTable, Starts, Ends, Indices, Scores)

    ranged = not causal  # paged implies range mode (checked above)
    if page_keys:
        k_arg_shape, scale_shape = [num_pages, page_words * _SCALE_BYTES], [num_pages, page_words]
    elif paged:
        k_arg_shape, scale_shape = [num_slots, k_row], [num_slots, scale_row]
    else:
        k_arg_shape, scale_shape = k_shape, [batch, seq_kv]
    func = dsl.prim_func(
        index_topk,
        f"index_topk_{'fp8' if fp8 else 'bf16'}_{'paged' if paged else mode}{'_pages' if page_keys else ''}",
        Q=T.Tensor(q_shape, io_dtype),
        K=T.Tensor(k_arg_shape, io_dtype),
        W=T.Tensor(w_shape, ACCUM_DTYPE),
        KScale=T.Tensor(scale_shape, ACCUM_DTYPE) if fp8 else None,
        BlockTable=T.Tensor([batch, max_pages], INDEX_DTYPE) if paged else None,
        Starts=T.Tensor(row_shape, INDEX_DTYPE) if ranged else None,
        Ends=T.Tensor(row_shape, INDEX_DTYPE) if ranged else None,
        Indices=T.Tensor(out_shape, INDEX_DTYPE),
        Scores=T.Tensor(out_shape, ACCUM_DTYPE),
    )
    if cpu:
        return dsl.with_pass_configs(func, rs.PASS_CONFIGS)
    return dsl.with_target_pass_configs(func, target, _PASS_CONFIGS)

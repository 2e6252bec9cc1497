"""Sparse MLA attention backward as TileLang kernels (one source for the C target and sm_90a).

Three kernels, run in this order by :func:`dsa.launch.sparse_mla_bwd.sparse_mla_bwd`:

1. :func:`build_preprocess`: ``delta[b, t, h] = sum_d out[b, t, h, d] * d_out[b, t, h, d]`` in float32.
2. :func:`build` (the main kernel): one program per (head block, query token, batch). It recomputes the attention
   probabilities from the forward's ``lse`` and, per block of ``block_topk`` indices,

   - ``s = sm_scale * q . k`` (``k = kv[idx]``), ``e = exp(s - lse)`` and ``p = r * e`` on valid indices (0
     elsewhere), where ``r = exp(lse - lse_eff) = 1 / (1 + exp(attn_sink[h] - lse))`` with a sink (1 without) and
     ``lse_eff = logaddexp(lse, attn_sink[h])`` is the softmax denominator;
   - ``dp = d_out . v`` (``v = kv[idx, :d_v]``), ``ds = p * (dp - delta) + e * d_lse``: the second term is the
     gradient arriving through ``lse`` (``d lse / d s = e``, the softmax of the valid scores alone, since ``lse``
     excludes the sink). Writing both through ``e`` and ``r <= 1`` keeps them exact for any sink, ``+inf``
     included (``r = 0``), where ``exp(lse_eff - lse)`` would overflow;
   - ``dq += sm_scale * ds @ k`` (kept in registers for the whole row of indices);
   - ``dkv[idx, :] += sm_scale * ds^T q`` and ``dkv[idx, :d_v] += p^T d_out``, scattered with float32 atomics into a
     ``[B, S_kv, d_qk]`` float32 buffer, so duplicates and rows shared by several queries accumulate.

   ``dkv`` is produced transposed per column chunk (``[chunk, block_topk] = q_chunk^T @ ds``) so that its MMA has
   ``M = chunk`` (a multiple of 64 on Hopper) for any ``block_topk``, which lets 32-index blocks use wgmma too.
   On Hopper the per-chunk MMAs are issued asynchronously in groups with one wait each (``s`` with ``dp``; ``dq``
   with the first ``dkv`` chunk; each further ``dkv`` chunk), so a step drains the wgmma pipeline 1 + chunks times
   instead of once per MMA.
3. :func:`build_postprocess`: casts the float32 ``dkv`` accumulator to bfloat16.

An index is valid iff ``0 <= idx < S_kv`` and (with ``topk_length``) its position in the row is below
``topk_length[b, t]``. An invalid slot never touches memory outside ``kv`` and contributes exactly nothing: its kv
tile row is zero-filled by a guarded load that reads nothing (row number -1, which TileLang's bound guard turns into a
predicated load on both targets; a select around the load cost a 16-byte spill at ``block_topk = 64``), so Inf/NaN in
the rows invalid entries name (unwritten cache slots) cannot reach ``dq`` through ``0 * k``; its probability is forced
to exactly 0 and the atomics skip it. A row whose ``lse`` is ``-inf`` (no valid index in the forward) contributes
nothing and produces no NaN: its probabilities are forced to 0 before any exponential of an infinity can happen.

With ``ranged=True`` (static) each query's entries are a contiguous row range: ``Indices [B, S, 2]`` holds (start,
end), entry ``j`` is row ``start + j``, valid iff ``start + j < end`` and ``0 <= start + j < S_kv``; the steps cover
only the range's rows in ``[0, S_kv)``. The forward's helpers (``tl_kernels.sparse_mla_fwd_steps.index_at`` and
``range_length``) give the row and the step count, so both directions read a range the same way.

Heads are processed ``block_h`` at a time; the head count need not be a multiple (padded heads load zeros, get
``p = 0`` and are never stored). ``topk`` must be a multiple of ``block_topk`` (the launcher pads indices with -1).

On the C target (CPU tier) the tiles are float32 local arrays (bf16 arrives as ``uint16`` bits and is decoded with
:func:`tl_kernels.dsl.load_f32`); on CUDA they are bf16 shared-memory tiles feeding wgmma.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel signatures' annotations, which refer to
# closure variables (shapes, storage dtypes).
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import tilelang
import tilelang.language as T
from tvm import tirx

from tl_kernels import dsl
from tl_kernels import sparse_mla_fwd_steps as fwd_steps

__all__ = [
    "CPU_DEFAULT",
    "TOPK_ALIGN",
    "TUNING_SPACE",
    "Config",
    "build",
    "build_postprocess",
    "build_preprocess",
    "check_config",
    "chunk_bounds",
    "config_params",
    "default_config",
    "shared_memory_bytes",
]

LOG2E = math.log2(math.e)
"""Probabilities are computed with exp2: ``exp(x) = exp2(x * log2(e))``, one FMA cheaper per element."""

# A padded head or an empty row (lse = -inf) gets this huge, finite log2-domain lse instead of +inf: every
# exp2(s - _EMPTY_LSE2) underflows to exactly 0 without any inf - inf arithmetic that could turn into NaN.
_EMPTY_LSE2 = 1.0e30
# lse values at or below this are treated as -inf (an empty row). Comparing against a finite threshold rather
# than -inf keeps the test meaningful even if a build enables finite-math-only optimisations.
_EMPTY_LSE_THRESHOLD = -1.0e30

_WGMMA_M = 64
"""Rows of one Hopper wgmma per warpgroup: head blocks and dkv chunks are multiples of it on CUDA."""
_MIN_BLOCK_TOPK_CUDA = 32
"""block_topk must be a multiple of this on CUDA: with 16 the ds tile (A operand of dq's MMA, B operand of dkv's)
gets two conflicting shared-memory layouts and TileLang's layout inference rejects the kernel."""


INDEX_DTYPE = "int32"
ACC_DTYPE = "float32"
IN_DTYPE = "bfloat16"

# Main-kernel pass configs. The gather is an indexed row copy (not a TMA-able tile) and the kernel is not warp
# specialised; TL_ENABLE_AGGRESSIVE_SHARED_MEMORY_MERGE is deliberately absent (reported to give NaN
# gradients in TileLang's own sparse MLA backward).
PASS_CONFIGS: dict[str, Any] = {
    tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER.value: True,
    tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED.value: True,
}

_PREPROCESS_BLOCK_ROWS = 16
_PREPROCESS_BLOCK_D = 64
_PREPROCESS_THREADS = 128
_POSTPROCESS_BLOCK_ROWS = 16
_POSTPROCESS_THREADS = 128


@dataclass(frozen=True)
class Config:
    """Tunable parameters of the main backward kernel.

    block_h: query heads per program (padded heads are masked); a multiple of 64 on CUDA (wgmma M).
    block_topk: indices gathered and processed per step; ``topk`` is padded to a multiple of it.
    dkv_chunk: columns of ``d_qk`` per ``dkv`` MMA and per shared tile of q/d_out/kv; a multiple of 64 on CUDA.
    num_stages: software-pipelining depth of the loop over index blocks (0 = no pipelining). Stages >= 1 turn the
        gather into cp.async, but at V3.2 shapes that spilled (3.4 KB with block_topk=32 and 2 stages, 4 KB with
        block_topk=64 and 1 stage: the pipeliner duplicates the loop body), so the tuning space keeps 0: dq's
        64 x 576 float32 accumulator alone takes 144 of the 255 registers per thread.
    threads: threads per program (two warpgroups; 512 threads caps registers at 128 and spilled 848 B).
    """

    block_h: int = 64
    block_topk: int = 64
    dkv_chunk: int = 64
    num_stages: int = 0
    threads: int = 256


# Both configs were built at V3.2 shapes (128 heads, 576/512, topk 2048): 255 registers, 0 spills; shared memory
# 230400 B (block_topk 64) and 185344 B (block_topk 32).
TUNING_SPACE: dict[str, tuple[Any, ...]] = {
    "block_h": (64,),
    "block_topk": (32, 64),
    "dkv_chunk": (64,),
    "num_stages": (0,),
    "threads": (256,),
}
"""Candidate values per :class:`Config` field (every combination that passes :func:`check_config` is built in CI)."""

PORTABLE_TUNING_SPACE: dict[str, tuple[Any, ...]] = {
    "block_h": (16, 32),
    "block_topk": (32, 64),
    "dkv_chunk": (64,),
    "num_stages": (0,),
    "threads": (128, 256),
}
"""The candidates on the portable schedule (every CUDA architecture but sm_90a); shared memory decides which fit."""

PORTABLE_LADDER: tuple[Config, ...] = (
    Config(block_h=32, block_topk=64, threads=256),
    Config(block_h=32, block_topk=32, threads=256),
    Config(block_h=16, block_topk=32, threads=128),
)
"""default_config's candidates on the portable schedule, in order; later ones need less shared memory (at V3.2
widths about 151 KB, 111 KB and 74 KB: the first fits sm_80, sm_90 and sm_100a, the last the 99 KB of sm_86, sm_89
and sm_120)."""

TOPK_ALIGN = 64
"""The launcher pads ``topk`` to a multiple of this (a multiple of every ``block_topk`` in :data:`TUNING_SPACE`)."""


def chunk_bounds(d_qk: int, d_v: int, chunk: int) -> list[tuple[int, int]]:
    """Column chunks ``[(start, size), ...]`` covering ``[0, d_qk)``, split at ``d_v`` and every ``chunk`` columns.

    The split at ``d_v`` keeps every chunk either entirely value columns (which also receive ``p^T d_out``) or
    entirely rotary columns.
    """
    bounds: list[tuple[int, int]] = []
    for lo, hi in ((0, d_v), (d_v, d_qk)):
        for start in range(lo, hi, chunk):
            bounds.append((start, min(chunk, hi - start)))
    return bounds


def check_config(static: dict[str, Any], config: Config) -> None:
    """Raise ``ValueError`` when ``config`` cannot serve the static parameters ``static``.

    ``static`` holds ``heads``, ``d_qk``, ``d_v``, ``topk`` (already padded by the launcher; absent or 0 with
    ``ranged``), ``has_topk_length``, ``has_sink`` and optionally ``ranged``; ``target`` (optional) enables the
    Hopper-specific constraints.
    """
    d_qk, d_v, topk = int(static["d_qk"]), int(static["d_v"]), int(static.get("topk", 0))
    if static.get("ranged", False) and (static.get("has_topk_length", False) or topk):
        raise ValueError("ranged kernels take no topk and no topk_length: a range's end bounds its entries")
    if not 0 < d_v <= d_qk:
        raise ValueError(f"need 0 < d_v <= d_qk, got d_v={d_v}, d_qk={d_qk}")
    for name in ("block_h", "block_topk", "dkv_chunk", "threads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.num_stages < 0:
        raise ValueError(f"num_stages must be >= 0, got {config.num_stages}")
    if topk % config.block_topk != 0:
        raise ValueError(f"topk={topk} must be a multiple of block_topk={config.block_topk} (launcher pads with -1)")
    target = static.get("target")
    if target is None or dsl.is_cpu(target):
        return
    hopper = dsl.is_hopper(target)
    # wgmma takes 64 rows per warpgroup; mma.sync 16 per warp.
    row_tile = _WGMMA_M if hopper else dsl.MMA_SYNC_WARP_M
    if config.block_h % row_tile != 0:
        raise ValueError(
            f"block_h={config.block_h} must be a multiple of {row_tile} on {dsl.arch_of(target).name} "
            f"({'wgmma' if hopper else 'mma.sync'} M)"
        )
    if config.block_topk % _MIN_BLOCK_TOPK_CUDA != 0:
        raise ValueError(f"block_topk={config.block_topk} must be a multiple of {_MIN_BLOCK_TOPK_CUDA} on CUDA")
    if config.threads % 128 != 0:
        raise ValueError(f"threads={config.threads} must be whole warpgroups (multiple of 128) on CUDA")
    for start, size in chunk_bounds(d_qk, d_v, config.dkv_chunk):
        if size % _WGMMA_M != 0:
            raise ValueError(
                f"column chunk [{start}, {start + size}) is not a multiple of {_WGMMA_M} on CUDA "
                f"(d_qk={d_qk}, d_v={d_v}, dkv_chunk={config.dkv_chunk})"
            )
    if not hopper:
        for m, n in _gemm_shapes(d_qk, d_v, config):
            if not dsl.mma_sync_warps_fit(m, n, config.threads):
                raise ValueError(
                    f"a {m} x {n} GEMM cannot be split over {config.threads // 32} warps (each needs a multiple of "
                    f"{dsl.MMA_SYNC_WARP_M} rows and {dsl.MMA_SYNC_WARP_N} columns)"
                )
    smem, limit = shared_memory_bytes(static, config), dsl.smem_limit_bytes(target)
    if smem > limit:
        raise ValueError(
            f"config needs {smem} B of shared memory, more than {limit} B on {dsl.arch_of(target).name}"
        )


def _dkv_transposed(block_topk: int) -> bool:
    """dkv's MMA needs M >= 64 for wgmma: with 64-index blocks it is [block_topk, chunk] (each thread then scatters
    into only two kv rows, which keeps address registers low); smaller blocks compute it transposed, [chunk,
    block_topk]."""
    return block_topk % _WGMMA_M != 0


def _gemm_shapes(d_qk: int, d_v: int, config: Config) -> set[tuple[int, int]]:
    """The (M, N) of every GEMM of the main kernel: scores and dp, dq per column chunk, dkv per column chunk."""
    bh, bk = config.block_h, config.block_topk
    sizes = {size for _, size in chunk_bounds(d_qk, d_v, config.dkv_chunk)}
    dkv = {(size, bk) if _dkv_transposed(bk) else (bk, size) for size in sizes}
    return {(bh, bk)} | {(bh, size) for size in sizes} | dkv


def shared_memory_bytes(static: dict[str, Any], config: Config) -> int:
    """Estimated shared memory of the main kernel on CUDA (bf16 tiles; the kv tile is multiplied by the stages)."""
    d_qk, d_v = int(static["d_qk"]), int(static["d_v"])
    bf16 = 2
    q_tile = config.block_h * d_qk * bf16
    do_tile = config.block_h * d_v * bf16
    kv_tile = config.block_topk * d_qk * bf16 * max(1, config.num_stages)
    p_ds = 2 * config.block_h * config.block_topk * bf16
    small = 2 * config.block_topk * 4 * max(1, config.num_stages) + 2 * config.block_h * 4
    return q_tile + do_tile + kv_tile + p_ds + small


CPU_DEFAULT = Config(block_h=16, block_topk=32, dkv_chunk=256, num_stages=0, threads=128)
"""C-target default: small head blocks (little padding work for the few heads of CPU tests) and wide column chunks
(fewer unrolled loops, so g++ compiles it faster); the C target has no MMA shape constraints."""


def default_config(static: dict[str, Any]) -> Config:
    """A config that serves every shape of ``static`` (``topk`` is a multiple of :data:`TOPK_ALIGN`).

    ``static["target"]`` (optional) selects :data:`CPU_DEFAULT` for the C target, the Hopper default for sm_90a (and
    when absent), and the first of :data:`PORTABLE_LADDER` that fits the architecture otherwise (``ValueError``, the
    last rejection, when none does).
    """
    target = static.get("target")
    if target is not None and dsl.is_cpu(target):
        return CPU_DEFAULT
    if target is None or dsl.is_hopper(target):
        return Config()
    return dsl.first_valid_config(check_config, static, PORTABLE_LADDER)


def config_params(config: Config) -> dict[str, Any]:
    """``config`` as the keyword arguments of :func:`build`."""
    return dataclasses.asdict(config)


def _sym(name: str) -> tirx.Var:
    return T.dynamic(name)


def build_preprocess(*, d_v: int, target: dsl.Target) -> tirx.PrimFunc:
    """``delta = sum(out * d_out, -1)`` in float32, over flattened ``rows = B * S * H`` (symbolic).

    Kernel arguments: ``Out [rows, d_v]`` bf16, ``dOut [rows, d_v]`` bf16, ``Delta [rows]`` float32 (written).
    """
    alloc = dsl.allocators(target)
    storage = dsl.storage_dtype(IN_DTYPE, target)
    rows = _sym("rows")
    block_r = _PREPROCESS_BLOCK_ROWS
    block_d = min(_PREPROCESS_BLOCK_D, d_v)
    n_d = (d_v + block_d - 1) // block_d

    @T.prim_func
    def preprocess(
        Out: T.Tensor([rows, d_v], storage),
        dOut: T.Tensor([rows, d_v], storage),
        Delta: T.Tensor([rows], ACC_DTYPE),
    ):
        with T.Kernel(T.ceildiv(rows, block_r), threads=_PREPROCESS_THREADS) as rb:
            acc = alloc.fragment([block_r, block_d], ACC_DTYPE)
            row_sum = alloc.fragment([block_r], ACC_DTYPE)
            T.clear(acc)
            for kd in T.serial(n_d):
                for r, d in alloc.parallel(block_r, block_d):
                    if rb * block_r + r < rows and kd * block_d + d < d_v:
                        acc[r, d] += dsl.load_f32(Out[rb * block_r + r, kd * block_d + d], IN_DTYPE, target) * (
                            dsl.load_f32(dOut[rb * block_r + r, kd * block_d + d], IN_DTYPE, target)
                        )
            T.reduce_sum(acc, row_sum, dim=1)
            for r in alloc.parallel(block_r):
                if rb * block_r + r < rows:
                    Delta[rb * block_r + r] = row_sum[r]

    return preprocess


def build_postprocess(*, d_qk: int, target: dsl.Target) -> tirx.PrimFunc:
    """Cast the float32 ``dkv`` accumulator to bf16.

    Kernel arguments: ``dKVAcc [B, S_kv, d_qk]`` float32, ``dKV [B, S_kv, d_qk]`` bf16 (written).
    """
    alloc = dsl.allocators(target)
    storage = dsl.storage_dtype(IN_DTYPE, target)
    batch, seq_kv = _sym("batch"), _sym("seq_kv")
    rows = _POSTPROCESS_BLOCK_ROWS

    @T.prim_func
    def postprocess(
        dKVAcc: T.Tensor([batch, seq_kv, d_qk], ACC_DTYPE),
        dKV: T.Tensor([batch, seq_kv, d_qk], storage),
    ):
        with T.Kernel(T.ceildiv(seq_kv, rows), batch, threads=_POSTPROCESS_THREADS) as (rb, b):
            for r, d in alloc.parallel(rows, d_qk):
                if rb * rows + r < seq_kv:
                    dKV[b, rb * rows + r, d] = dsl.store_bf16(dKVAcc[b, rb * rows + r, d], target)

    return postprocess


def build(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    topk: int = 0,
    has_topk_length: bool,
    has_sink: bool,
    ranged: bool = False,
    block_h: int = Config.block_h,
    block_topk: int = Config.block_topk,
    dkv_chunk: int = Config.dkv_chunk,
    num_stages: int = Config.num_stages,
    threads: int = Config.threads,
    target: dsl.Target,
) -> tirx.PrimFunc:
    """The main backward kernel (see the module docstring for the math).

    Kernel arguments (B, S, S_kv symbolic; bf16 travels as ``uint16`` on the C target):

    - ``Q [B, S, heads, d_qk]`` bf16, ``KV [B, S_kv, d_qk]`` bf16, ``dOut [B, S, heads, d_v]`` bf16;
    - ``Indices [B, S, topk]`` int32 (any value: invalid entries get probability 0 and are never used as addresses),
      or with ``ranged`` ``[B, S, 2]`` int32 (start, end) per query (``topk`` is then 0: the range sets the steps);
    - ``Lse [B, S, heads]`` float32 (natural log, ``-inf`` for empty rows), ``Delta [B, S, heads]`` float32,
      ``DLse [B, S, heads]`` float32 (the incoming gradient of ``lse``; zeros when ``lse`` is not differentiated);
    - ``TopkLength [B, S]`` int32 (only when ``has_topk_length``), ``Sink [heads]`` float32 (only when ``has_sink``);
    - ``sm_scale`` float32 scalar;
    - ``dQ [B, S, heads, d_qk]`` bf16 (written), ``dKVAcc [B, S_kv, d_qk]`` float32 (accumulated atomically; zero it
      first).
    """
    static = {"heads": heads, "d_qk": d_qk, "d_v": d_v, "topk": topk, "has_topk_length": has_topk_length,
              "ranged": ranged, "target": target}  # fmt: skip
    check_config(static, Config(block_h, block_topk, dkv_chunk, num_stages, threads))
    cpu = dsl.is_cpu(target)
    alloc = dsl.allocators(target)
    storage = dsl.storage_dtype(IN_DTYPE, target)
    # MMA operand tiles: bf16 on CUDA (wgmma inputs); float32 on the C target, which has no bf16 C type.
    op_dtype = ACC_DTYPE if cpu else IN_DTYPE
    batch, seq, seq_kv = _sym("batch"), _sym("seq"), _sym("seq_kv")
    n_blocks = topk // block_topk
    n_head_blocks = (heads + block_h - 1) // block_h
    chunks = chunk_bounds(d_qk, d_v, dkv_chunk)
    n_value_chunks = sum(1 for start, _ in chunks if start < d_v)
    policy = T.GemmWarpPolicy.FullCol
    dkv_transposed = _dkv_transposed(block_topk)
    bh, bk = block_h, block_topk

    # MMAs are issued in groups with one wait per group. On Hopper each T.gemm waits for its own wgmma to drain
    # before the next is issued (one pipeline drain per 64-column chunk, about 40 per step); T.wgmma_gemm leaves
    # them in flight and one T.wait_wgmma(0) covers the group. Accumulating several MMAs of a group into one
    # accumulator is the chaining a single GEMM's K loop does anyway. The C target has no wgmma: T.gemm there.
    # (Written inline in the kernel body, not in a Python helper: the frontend records only expression statements
    # of the traced body or of a T.macro, so a helper's T.gemm calls would be silently dropped.)
    # The portable schedule (every CUDA architecture but sm_90a) has no wgmma either: its T.gemm is a synchronous
    # mma.sync loop, so nothing is left in flight to wait for.
    hopper = dsl.is_hopper(target)
    mma = T.wgmma_gemm if hopper else T.gemm

    def load(value: Any) -> Any:
        return dsl.load_tile(value, IN_DTYPE, target)

    def entry(indices: Any, b: Any, t: Any, pos: Any, limit: Any) -> Any:
        # The row entry `pos` names, before the validity check: the list's index, or the range's row.
        if ranged:
            return fwd_steps.index_at(indices, b, t, pos, fwd_steps.RANGE_WIDTH, ranged, limit)
        return indices[b, t, pos]

    def slot_valid(idx: Any, pos: Any, limit: Any) -> Any:
        # An index takes part iff it names a kv row and its position is below topk_length (when given).
        return (idx >= 0) & (idx < seq_kv) & (pos < limit)

    # Optional inputs keep a 1-element placeholder shape when absent, so both variants share one signature.
    topk_length_shape = [batch, seq] if has_topk_length else [1]
    sink_shape = [heads] if has_sink else [1]

    @T.prim_func
    def main(
        Q: T.Tensor([batch, seq, heads, d_qk], storage),
        KV: T.Tensor([batch, seq_kv, d_qk], storage),
        dOut: T.Tensor([batch, seq, heads, d_v], storage),
        Indices: T.Tensor([batch, seq, fwd_steps.RANGE_WIDTH if ranged else topk], INDEX_DTYPE),
        Lse: T.Tensor([batch, seq, heads], ACC_DTYPE),
        Delta: T.Tensor([batch, seq, heads], ACC_DTYPE),
        DLse: T.Tensor([batch, seq, heads], ACC_DTYPE),
        TopkLength: T.Tensor(topk_length_shape, INDEX_DTYPE),
        Sink: T.Tensor(sink_shape, ACC_DTYPE),
        sm_scale: T.float32,
        dQ: T.Tensor([batch, seq, heads, d_qk], storage),
        dKVAcc: T.Tensor([batch, seq_kv, d_qk], ACC_DTYPE),
    ):
        # (head block, token) pairs share grid x, head blocks of one token adjacent so their identical kv gathers
        # meet in L2; grid y (batch) is small. Grid y/z are capped at 65535, too few for long sequences.
        with T.Kernel(seq * n_head_blocks, batch, threads=threads) as (bx, b):
            q_tiles = [alloc.shared([bh, size], op_dtype) for _, size in chunks]
            do_tiles = [alloc.shared([bh, size], op_dtype) for _, size in chunks[:n_value_chunks]]
            kv_tiles = [alloc.shared([bk, size], op_dtype) for _, size in chunks]
            p_tile = alloc.shared([bh, bk], op_dtype)
            ds_tile = alloc.shared([bh, bk], op_dtype)
            idx_tile = alloc.shared([bk], INDEX_DTYPE)
            lse2_tile = alloc.shared([bh], ACC_DTYPE)
            # Per-head factors of p = ratio * e and ds = e * (ds_scale * dp + ds_bias) (see the module docstring).
            ratio_tile = alloc.shared([bh], ACC_DTYPE)
            ds_scale_tile = alloc.shared([bh], ACC_DTYPE)
            ds_bias_tile = alloc.shared([bh], ACC_DTYPE)

            acc_s = alloc.fragment([bh, bk], ACC_DTYPE)
            acc_dp = alloc.fragment([bh, bk], ACC_DTYPE)
            acc_dq = [alloc.fragment([bh, size], ACC_DTYPE) for _, size in chunks]
            # One dkv accumulator per distinct chunk width, reused by every chunk of that width.
            dkv_acc_of = {
                size: alloc.fragment([size, bk] if dkv_transposed else [bk, size], ACC_DTYPE)
                for size in sorted({size for _, size in chunks})
            }

            t = bx // n_head_blocks
            head0 = (bx % n_head_blocks) * bh
            scale2 = sm_scale * LOG2E
            if ranged:
                # Positions >= limit are invalid: the range's rows in [0, S_kv), which are all the steps.
                limit = fwd_steps.range_length(Indices, b, t, seq_kv)
                n_steps = T.ceildiv(limit, bk)
            else:
                # Positions >= limit are invalid: topk_length[b, t] when given (the padded width bounds it anyway).
                limit = TopkLength[b, t] if has_topk_length else topk
                # Blocks past topk_length hold no valid index: a short row skips them (a row of length <= 0 runs
                # none).
                n_steps = T.ceildiv(T.min(limit, topk), bk) if has_topk_length else n_blocks

            # Query and output-gradient rows of this head block; padded heads are zero (never read from memory).
            for ci, (start, size) in enumerate(chunks):
                for r, c in alloc.parallel(bh, size):
                    if head0 + r < heads:
                        q_tiles[ci][r, c] = load(Q[b, t, head0 + r, start + c])
                    else:
                        q_tiles[ci][r, c] = T.cast(0, op_dtype)
                T.clear(acc_dq[ci])
            for ci, (start, size) in enumerate(chunks[:n_value_chunks]):
                for r, c in alloc.parallel(bh, size):
                    if head0 + r < heads:
                        do_tiles[ci][r, c] = load(dOut[b, t, head0 + r, start + c])
                    else:
                        do_tiles[ci][r, c] = T.cast(0, op_dtype)

            # Per-head log2-domain lse and the factors of p and ds, sm_scale folded in once. Empty rows and padded
            # heads get a huge lse, so that every e (hence p and ds) is exactly 0, and zero factors. (With fewer heads
            # than threads, bh 16 on the portable schedule, TileLang warns "Hoisting sync out of an if ... the race
            # remains": its barrier inference cannot see that each element is written and read by one thread only.
            # Writing each factor once in an if/else silences it, but made the sm_90a kernel spill 4 bytes.)
            for h in alloc.parallel(bh):
                lse2_tile[h] = T.float32(_EMPTY_LSE2)
                ratio_tile[h] = T.float32(0)
                ds_scale_tile[h] = T.float32(0)
                ds_bias_tile[h] = T.float32(0)
                if head0 + h < heads:
                    if Lse[b, t, head0 + h] > T.float32(_EMPTY_LSE_THRESHOLD):
                        lse2_tile[h] = Lse[b, t, head0 + h] * LOG2E
                        if has_sink:
                            # exp overflows to +inf for a sink far above lse (or +inf): then r = 1 / inf = 0.
                            ratio_tile[h] = T.float32(1) / (
                                T.float32(1) + T.exp(Sink[head0 + h] - Lse[b, t, head0 + h])
                            )
                        else:
                            ratio_tile[h] = T.float32(1)
                        ds_scale_tile[h] = ratio_tile[h] * sm_scale
                        ds_bias_tile[h] = (DLse[b, t, head0 + h] - ratio_tile[h] * Delta[b, t, head0 + h]) * sm_scale

            for kb in T.Pipelined(n_steps, num_stages=num_stages):
                # The block's indices with -1 where invalid (out of range, or at a position >= topk_length), read
                # straight from global memory like the gather's (see below).
                for j in alloc.parallel(bk):
                    idx_tile[j] = T.if_then_else(
                        slot_valid(entry(Indices, b, t, kb * bk + j, limit), kb * bk + j, limit),
                        entry(Indices, b, t, kb * bk + j, limit),
                        -1,
                    )
                # Gather the selected kv rows; an invalid slot's row is zero (never the memory its index names, which
                # may hold Inf/NaN: 0 * NaN would be NaN in dq and dp). Its row number is -1, which TileLang's bound
                # guard turns into a guarded load that reads nothing (on both targets). Each element reads its index
                # from global memory: a gather whose addresses come from an asynchronous copy into shared memory
                # would race with it if the loop were ever pipelined.
                for ci, (start, size) in enumerate(chunks):
                    for r, c in alloc.parallel(bk, size):
                        kv_tiles[ci][r, c] = load(
                            KV[
                                b,
                                T.if_then_else(
                                    slot_valid(entry(Indices, b, t, kb * bk + r, limit), kb * bk + r, limit),
                                    entry(Indices, b, t, kb * bk + r, limit),
                                    -1,
                                ),
                                start + c,
                            ]
                        )

                # Python loops over the tile lists unroll at trace time: one MMA per column chunk, s and dp issued
                # as one group.
                T.clear(acc_s)
                T.clear(acc_dp)
                for q_tile, kv_tile in zip(q_tiles, kv_tiles):
                    mma(q_tile, kv_tile, acc_s, transpose_B=True, policy=policy)
                for do_tile, kv_tile in zip(do_tiles, kv_tiles):
                    mma(do_tile, kv_tile, acc_dp, transpose_B=True, policy=policy)
                if hopper:
                    T.wait_wgmma(0)

                # e = exp(s - lse) on valid slots (0 elsewhere); ds = sm_scale * (p * (dp - delta) + e * d_lse)
                # = e * (ds_scale * dp + ds_bias); then p = r * e.
                for h, j in alloc.parallel(bh, bk):
                    acc_s[h, j] = T.if_then_else(
                        idx_tile[j] >= 0, T.exp2(acc_s[h, j] * scale2 - lse2_tile[h]), T.float32(0)
                    )
                    acc_dp[h, j] = acc_s[h, j] * (acc_dp[h, j] * ds_scale_tile[h] + ds_bias_tile[h])
                    acc_s[h, j] = acc_s[h, j] * ratio_tile[h]
                T.copy(acc_s, p_tile)
                T.copy(acc_dp, ds_tile)

                for kv_tile, acc_dq_chunk in zip(kv_tiles, acc_dq):
                    mma(ds_tile, kv_tile, acc_dq_chunk, policy=policy)
                # No wait here: dq's accumulators are not read in this step, and its operands (ds, kv) stay put until
                # the first dkv chunk's wait, which covers this group too.

                # dkv for each column chunk: ds^T @ q_chunk (+ p^T @ d_out_chunk on value columns), then scattered.
                for ci, (start, size) in enumerate(chunks):
                    acc_c = dkv_acc_of[size]
                    if dkv_transposed:
                        mma(q_tiles[ci], ds_tile, acc_c, transpose_A=True, policy=policy, clear_accum=True)
                        if ci < n_value_chunks:
                            mma(do_tiles[ci], p_tile, acc_c, transpose_A=True, policy=policy)
                        if hopper:
                            T.wait_wgmma(0)
                        for d, j in alloc.parallel(size, bk):
                            if idx_tile[j] >= 0:
                                T.atomic_add(dKVAcc[b, idx_tile[j], start + d], acc_c[d, j])
                    else:
                        mma(ds_tile, q_tiles[ci], acc_c, transpose_A=True, policy=policy, clear_accum=True)
                        if ci < n_value_chunks:
                            mma(p_tile, do_tiles[ci], acc_c, transpose_A=True, policy=policy)
                        if hopper:
                            T.wait_wgmma(0)
                        for j, d in alloc.parallel(bk, size):
                            if idx_tile[j] >= 0:
                                T.atomic_add(dKVAcc[b, idx_tile[j], start + d], acc_c[j, d])

            for ci, (start, size) in enumerate(chunks):
                for h, d in alloc.parallel(bh, size):
                    if head0 + h < heads:
                        dQ[b, t, head0 + h, start + d] = dsl.store_bf16(acc_dq[ci][h, d], target)

    return dsl.with_target_pass_configs(main, target, PASS_CONFIGS)

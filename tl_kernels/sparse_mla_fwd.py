"""Sparse MLA attention forward (DeepSeek Sparse Attention) as one TileLang builder for the C target and sm_90a.

Each thread block owns one query token and ``block_h`` heads. It walks the token's top-k index row ``block_k`` entries
at a time: it gathers the selected latent KV rows into shared memory (cp.async on Hopper; double-buffered by a
producer warpgroup in the ``ws`` schedule), computes ``Q . K^T`` with wgmma, runs the online softmax in the log2
domain, and accumulates ``P . V`` where V is the first ``d_v`` columns of the same gathered rows. Semantics follow
``dsa.reference.sparse_mla``:

* an entry is valid iff ``0 <= idx < S_kv`` and its position in the row is ``< min(k, topk_length[b, t])``; an invalid
  entry is never dereferenced and contributes exactly nothing: its tile row is zero-filled (its row number is -1, and
  TileLang's bound guard turns the copy into a predicated one that reads nothing: a zero-filling cp.async on CUDA, in
  both schedules) and its score is masked to ``-inf``, so Inf/NaN in the rows it names (unwritten cache slots) cannot
  reach ``out`` through ``0 * V``;
* a query with no valid entry gets ``out = 0`` and ``lse = -inf`` (no NaN on the way: the running maximum is replaced
  by 0 while it is still ``-inf``);
* ``attn_sink[h]`` joins only the final denominator; ``lse`` is the natural-log log-sum-exp of the valid scores alone;
* any head count works: heads past ``heads`` in the last head block read zeros and are never written.

Batch, query length, KV length and the top-k width are symbolic, so one compiled kernel serves every such shape.

Two CUDA schedules (``Config.pipeline``): ``"none"`` (default) is the one described above, with two
warpgroups and one KV tile; ``"ws"`` (opt-in) adds a producer warpgroup that gathers into two mbarrier-guarded KV
buffers while the two consumer warpgroups compute (see ``_build_ws``). On the C target both are the same plain loop;
the ``ws`` kernel's GPU correctness rests on the GPU tier.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel signature's annotations, which
# refer to closure variables (shapes, dtypes).
import dataclasses
import math
from typing import Any

import tilelang.language as T

from tl_kernels import build as build_mod
from tl_kernels import dsl

__all__ = ["TUNING_PRESETS", "TUNING_SPACE", "Config", "build", "check_config", "default_config"]

LOG2E = math.log2(math.e)
"""Scores are pre-multiplied by ``sm_scale * log2(e)`` so the softmax can use ``exp2``."""
LN2 = math.log(2.0)
"""Turns the kernel's base-2 log-sum-exp into the natural log the API returns."""

ACCUM_DTYPE = "float32"
INDEX_DTYPE = "int32"
DATA_DTYPE = "bfloat16"

WGMMA_M = 64
"""Rows of one Hopper warpgroup MMA: the CUDA head block (64 heads, every warpgroup on wgmma)."""
WARPGROUP_THREADS = 128
CUDA_THREADS = 2 * WARPGROUP_THREADS
"""Two warpgroups split the N of both GEMMs (the ``block_k`` score columns, the ``d_v`` output columns)."""
CUDA_DIM_ALIGN = 64
"""``d_qk`` and ``d_v`` on CUDA: whole 128-byte swizzle atoms of bf16 (V3.2: 576 and 512)."""
CUDA_BLOCK_K_ALIGN = 16
"""Each of the two warpgroups takes ``block_k / 2`` score columns (a wgmma N of at least 8); 16 is also the bf16 MMA
reduction step of ``P . V``."""
CUDA_MAX_STAGES = 1
"""TileLang 0.1.15 emits a non-constant ``cp.async.wait_group`` in the epilogue of a multi-stage pipeline whose trip
count is symbolic (nvcc then rejects it), and a variant with a compile-time top-k width (constant trip count, two
stages) spilled 330-480 bytes. With one stage the gather of step i+1 is still issued as cp.async, right after the
``P . V`` of step i frees the single KV tile, so it overlaps nothing but the loop's bookkeeping: the kernel is
correct and spill-free but latency-bound on the gather; ``pipeline="ws"`` is the warp-specialised alternative."""

PIPELINE_NONE = "none"
"""The default schedule: two warpgroups, one KV tile, the gather of step i+1 issued after step i (see above)."""
PIPELINE_WS = "ws"
"""Opt-in warp-specialised schedule (CUDA only): a producer warpgroup gathers into two mbarrier-guarded KV buffers
while two consumer warpgroups do the math. On the C target it lowers to the default schedule's plain loop."""
PIPELINES = (PIPELINE_NONE, PIPELINE_WS)
CUDA_MAX_BLOCK_K = 32
"""Largest ``block_k`` of the default schedule on CUDA: at 64 the 64 x 512 float32 accumulator (128 registers per
thread) plus the scores spilled 52 bytes at V3.2 widths (255 registers); 16 and 32 compile clean."""
WS_BLOCK_K = 64
"""The ``ws`` schedule's step (rows per KV buffer): the size that was compiled and checked (0 spills, 231,040 B of
shared memory at V3.2 widths, two buffers); other sizes are rejected rather than shipped unchecked."""
WS_THREADS = 3 * WARPGROUP_THREADS
"""``pipeline="ws"``: consumer warpgroup 0 (scores, softmax, left half of the output), consumer warpgroup 1 (right
half of the output), producer warpgroup (the KV gather)."""
WS_KV_BUFFERS = 2
"""KV tiles in flight in the ``ws`` schedule: the producer fills one while the consumers work on the other."""
WS_ASYNC_COPY: dict[str, bool] = {"parallel_async_without_async_commit_wait": True}
"""Loop annotation: lower the producer's global -> shared copies to cp.async with no commit/wait groups."""
WS_CONSUMER0_REGS = 232
WS_CONSUMER1_REGS = 168
WS_PRODUCER_REGS = 88
"""Per-warpgroup register budgets (``setmaxnreg``): 128 * (232 + 168 + 88) <= 64 K registers of an SM. The producer's
predicated (zero-filling) gather needs 88: at 80 the build without topk_length spilled 176 bytes; consumer 0 peaked at
183 registers of its former 240, consumer 1 at 151 of 168 (SASS, before the predicated gather)."""
HOPPER_SMEM_BYTES = build_mod.SMEM_LIMIT_BYTES
SMEM_ALIGN_SLACK_BYTES = 4 * 1024
"""Room for TileLang's 1024-byte tile alignment and reduction workspaces on top of the tiles themselves."""
BF16_BYTES = 2

_CUDA_PASS_CONFIGS: dict[str, bool] = {
    # The index gather cannot use TMA, and TileLang's automatic warp specialisation would then only move the index
    # copy to a producer warpgroup (leaving the KV gather synchronous in the consumers). Without both, the pipeliner
    # issues the whole KV gather as cp.async.
    "tl.disable_tma_lower": True,
    "tl.disable_warp_specialized": True,
}


_WS_PASS_CONFIGS: dict[str, bool] = dict(_CUDA_PASS_CONFIGS)
"""The ws kernel's pass configs: the default schedule's. TileLang's bound guard stays on: it is what turns the
producer's row number -1 for an invalid entry into a zero-filling predicated cp.async (see ``_gather_row``)."""
WS_SMEM_SLACK_BYTES = 2 * 1024
"""Room for the ``ws`` schedule's 1024-byte tile alignment and its mbarriers on top of the tiles and vectors."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunable schedule of the forward kernel.

    Attributes:
        block_h: query heads per thread block (the M of both GEMMs); 64 on CUDA.
        block_k: top-k entries gathered per step (the N of ``Q . K^T``, the reduction of ``P . V``).
        num_stages: software-pipeline depth of the gather (1 on CUDA, see ``CUDA_MAX_STAGES``).
        threads: threads per block on CUDA (ignored by the C target): ``CUDA_THREADS`` (256) for
            ``pipeline="none"``, ``WS_THREADS`` (384) for ``pipeline="ws"``.
        pipeline: the schedule, one of ``PIPELINES``. ``"none"`` (default) or ``"ws"`` (opt-in warp
            specialisation, ``block_k = WS_BLOCK_K``). On the C target both lower to the same plain loop, so the CPU
            tier checks the ``ws`` config's plumbing and semantics at ``block_k = 64`` but not its barriers and
            producer: the ``ws`` kernel's GPU correctness is proven only by the GPU tier (and the autotuner, which
            checks every candidate's output on the GPU before it can win).
    """

    block_h: int = WGMMA_M
    block_k: int = 32
    num_stages: int = 1
    threads: int = CUDA_THREADS
    pipeline: str = PIPELINE_NONE


TUNING_SPACE: dict[str, tuple[Any, ...]] = {
    "block_h": (WGMMA_M,),
    # 16 and 32 for the default schedule (64 spilled 52 bytes there at V3.2 shapes: the 64 x 512 float32
    # accumulator takes 128 registers per thread, see CUDA_MAX_BLOCK_K); 64 for the ws schedule.
    "block_k": (16, 32, WS_BLOCK_K),
    "num_stages": (1,),
    "threads": (CUDA_THREADS, WS_THREADS),
    "pipeline": PIPELINES,
}
"""Candidate values per :class:`Config` field. Their product holds invalid combinations (``check_config`` rejects
them, as the autotuner's enumeration does); the valid ones at V3.2 shapes are ``none`` with ``block_k`` 16 or 32 and
256 threads, and ``ws`` with ``block_k`` 64 and 384 threads. Each compiles clean for sm_90a."""

TUNING_PRESETS: tuple[dict[str, Any], ...] = ({"pipeline": "ws", "block_k": WS_BLOCK_K, "threads": WS_THREADS},)
"""Whole alternative schedules the pruned tuning space always tries (``autotune.space.pruned_space``)."""


def smem_bytes(static: dict[str, Any], config: Config) -> int:
    """Shared memory of the CUDA kernel (an upper estimate): the Q tile, ``num_stages`` KV tiles (two with
    ``pipeline="ws"``), the bf16 P tile, and alignment slack (plus, for ``ws``, its per-row and per-head vectors)."""
    d_qk = int(static["d_qk"])
    q_tile = config.block_h * d_qk * BF16_BYTES
    if config.pipeline == PIPELINE_WS:
        kv_tiles = WS_KV_BUFFERS * config.block_k * d_qk * BF16_BYTES
        p_tile = config.block_h * config.block_k * BF16_BYTES
        # alpha and the final normaliser (float32 per head), one validity byte per row and buffer.
        vectors = 2 * config.block_h * 4 + WS_KV_BUFFERS * config.block_k
        return q_tile + kv_tiles + p_tile + vectors + WS_SMEM_SLACK_BYTES
    kv_tiles = config.num_stages * config.block_k * d_qk * BF16_BYTES
    p_tile = config.block_h * config.block_k * BF16_BYTES
    return q_tile + kv_tiles + p_tile + SMEM_ALIGN_SLACK_BYTES


def check_config(static: dict[str, Any], config: Config) -> None:
    """Raise ``ValueError`` when ``config`` cannot serve the static parameters ``static``.

    ``static`` holds ``heads``, ``d_qk``, ``d_v``, ``has_topk_length``, ``has_sink`` and optionally ``target``
    (default: sm_90a); the Hopper constraints apply to CUDA targets only.
    """
    d_qk, d_v, heads = int(static["d_qk"]), int(static["d_v"]), int(static["heads"])
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if not 1 <= d_v <= d_qk:
        raise ValueError(f"need 1 <= d_v <= d_qk, got d_v={d_v}, d_qk={d_qk}")
    if config.block_h < 1 or config.block_h & (config.block_h - 1):
        raise ValueError(f"block_h must be a power of two, got {config.block_h}")
    if config.block_k < 1 or config.block_k & (config.block_k - 1):
        raise ValueError(f"block_k must be a power of two, got {config.block_k}")
    if config.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {config.num_stages}")
    if config.pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {config.pipeline!r}")
    if dsl.is_cpu(static.get("target", dsl.HOPPER_TARGET)):
        return
    if config.block_h != WGMMA_M:
        raise ValueError(f"block_h must be {WGMMA_M} on CUDA (one wgmma M per warpgroup), got {config.block_h}")
    ws = config.pipeline == PIPELINE_WS
    want_threads = WS_THREADS if ws else CUDA_THREADS
    if config.threads != want_threads:
        raise ValueError(
            f"threads must be {want_threads} with pipeline={config.pipeline!r} on CUDA, got {config.threads}"
        )
    if ws and config.block_k != WS_BLOCK_K:
        raise ValueError(f"block_k must be {WS_BLOCK_K} with pipeline='ws', got {config.block_k}")
    if not ws and config.block_k > CUDA_MAX_BLOCK_K:
        raise ValueError(f"block_k must be <= {CUDA_MAX_BLOCK_K} on CUDA with pipeline='none', got {config.block_k}")
    if config.block_k % CUDA_BLOCK_K_ALIGN:
        raise ValueError(f"block_k must be a multiple of {CUDA_BLOCK_K_ALIGN} on CUDA, got {config.block_k}")
    if config.num_stages > CUDA_MAX_STAGES:
        raise ValueError(f"num_stages must be <= {CUDA_MAX_STAGES} on CUDA, got {config.num_stages}")
    if d_qk % CUDA_DIM_ALIGN or d_v % CUDA_DIM_ALIGN:
        raise ValueError(f"d_qk and d_v must be multiples of {CUDA_DIM_ALIGN} on CUDA, got {d_qk} and {d_v}")
    if ws and (d_v % (2 * CUDA_DIM_ALIGN) or d_qk == d_v):
        # Each consumer warpgroup owns d_v / 2 output columns (whole swizzle atoms); the scores take three wgmma
        # (left, right, tail), so the tail d_qk - d_v must be non-empty.
        raise ValueError(
            f"pipeline='ws' needs d_v a multiple of {2 * CUDA_DIM_ALIGN} and d_qk > d_v, got d_qk={d_qk}, d_v={d_v}"
        )
    needed = smem_bytes(static, config)
    if needed > HOPPER_SMEM_BYTES:
        raise ValueError(f"{config} needs {needed} B of shared memory, more than {HOPPER_SMEM_BYTES}")


def default_config(static: dict[str, Any]) -> Config:
    """A config that works for every shape with these static parameters.

    On the C target the head block shrinks to the head count's power of two (at most 64) so that a few heads do not
    pay for 64; on CUDA it is the wgmma M of 64 (heads past ``heads`` are masked).
    """
    if dsl.is_cpu(static.get("target", dsl.HOPPER_TARGET)):
        heads = int(static["heads"])
        return Config(block_h=min(WGMMA_M, 1 << max(heads - 1, 0).bit_length()))
    return Config()


def build(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool = False,
    has_sink: bool = False,
    block_h: int = Config.block_h,
    block_k: int = Config.block_k,
    num_stages: int = Config.num_stages,
    threads: int = Config.threads,
    pipeline: str = Config.pipeline,
    target: dsl.Target = dsl.HOPPER_TARGET,
) -> Any:
    """The forward kernel for ``heads`` query heads of width ``d_qk`` and value width ``d_v``.

    Kernel arguments (B, S, S_kv and k symbolic; bf16 travels as ``uint16`` on the C target):
        q: ``[B, S, heads, d_qk]`` bfloat16; kv: ``[B, S_kv, d_qk]`` bfloat16; indices: ``[B, S, k]`` int32;
        topk_length: ``[B, S]`` int32 with ``has_topk_length``, else a ``[1, 1]`` int32 placeholder;
        attn_sink: ``[heads]`` float32 with ``has_sink``, else a ``[1]`` float32 placeholder;
        sm_scale: float32 scalar (the softmax scale, natural units);
        out: ``[B, S, heads, d_v]`` bfloat16 (written); lse: ``[B, S, heads]`` float32, natural log (written).

    ``pipeline="ws"`` selects the warp-specialised schedule on CUDA (:func:`_build_ws`); on the C target it lowers to
    the same plain loop as ``"none"`` (the C target has no threads, barriers or asynchronous copies).
    """
    check_config(
        {"heads": heads, "d_qk": d_qk, "d_v": d_v, "target": target},
        Config(block_h=block_h, block_k=block_k, num_stages=num_stages, threads=threads, pipeline=pipeline),
    )
    cpu = dsl.is_cpu(target)
    if pipeline == PIPELINE_WS and not cpu:
        return _build_ws(
            heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink, block_k=block_k
        )
    alloc = dsl.allocators(target)
    data_storage = dsl.storage_dtype(DATA_DTYPE, target)
    # On the C target the tiles hold decoded float32 (its GEMM has no bf16); on CUDA they hold bf16 for wgmma.
    tile_dtype = ACCUM_DTYPE if cpu else DATA_DTYPE
    head_blocks = (heads + block_h - 1) // block_h
    neg_inf = -T.infinity(ACCUM_DTYPE)

    batch = T.dynamic("batch")
    seq_len = T.dynamic("seq_len")
    seq_len_kv = T.dynamic("seq_len_kv")
    width = T.dynamic("topk")
    topk_length_shape = [batch, seq_len] if has_topk_length else [1, 1]
    sink_shape = [heads] if has_sink else [1]

    def load(value: Any) -> Any:
        return dsl.load_tile(value, DATA_DTYPE, target)

    @T.prim_func
    def main(
        Q: T.Tensor([batch, seq_len, heads, d_qk], data_storage),  # type: ignore[valid-type]
        KV: T.Tensor([batch, seq_len_kv, d_qk], data_storage),  # type: ignore[valid-type]
        Indices: T.Tensor([batch, seq_len, width], INDEX_DTYPE),  # type: ignore[valid-type]
        TopkLength: T.Tensor(topk_length_shape, INDEX_DTYPE),  # type: ignore[valid-type]
        AttnSink: T.Tensor(sink_shape, ACCUM_DTYPE),  # type: ignore[valid-type]
        sm_scale: T.float32,
        Out: T.Tensor([batch, seq_len, heads, d_v], data_storage),  # type: ignore[valid-type]
        Lse: T.Tensor([batch, seq_len, heads], ACCUM_DTYPE),  # type: ignore[valid-type]
    ):
        with T.Kernel(seq_len * head_blocks, batch, threads=threads) as (bx, by):
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

            b = by
            s = bx // head_blocks
            h0 = (bx % head_blocks) * block_h
            scale_log2 = sm_scale * T.float32(LOG2E)
            # Entries at positions >= limit are invalid: the row width k, or topk_length[b, s] when it is smaller.
            limit = T.min(TopkLength[b, s], width) if has_topk_length else width
            # Steps past `limit` hold no valid entry: a short topk_length row skips them.
            num_steps = T.ceildiv(limit, block_k)

            # Heads past `heads` (last head block) load zeros; they are never stored.
            for h, d in alloc.parallel(block_h, d_qk):
                q_s[h, d] = T.if_then_else(h0 + h < heads, load(Q[b, s, T.min(h0 + h, heads - 1), d]), 0)
            T.fill(acc_o, 0)
            T.fill(l_i, 0)
            T.fill(m_i, neg_inf)

            for step in T.Pipelined(num_steps, num_stages=num_stages):
                # The gather: V is the first d_v columns of the same rows, so one tile feeds both GEMMs. Each element
                # reads its index straight from global memory (cached): staging the indices in shared memory would
                # make them a second asynchronous copy, and TileLang 0.1.15 does not wait for one cp.async group
                # before another copy's address reads it.
                # An invalid entry's tile row is zero, never the memory its index names (see _gather_row).
                for j, d in alloc.parallel(block_k, d_qk):
                    kv_s[j, d] = load(
                        KV[b, _gather_row(Indices, b, s, step * block_k + j, width, limit, seq_len_kv), d]
                    )

                T.clear(acc_s)
                T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                # Select the mask: a masked entry's zero row gives a score of 0 that must become exactly -inf.
                for h, j in alloc.parallel(block_h, block_k):
                    acc_s[h, j] = T.if_then_else(
                        _entry_valid(
                            _index_at(Indices, b, s, step * block_k + j, width), step * block_k + j, limit, seq_len_kv
                        ),
                        acc_s[h, j] * scale_log2,
                        neg_inf,
                    )

                T.copy(m_i, m_prev)
                T.reduce_max(acc_s, m_i, dim=1, clear=False)
                for h in alloc.parallel(block_h):
                    # While a row has seen no valid score its maximum is -inf; subtracting 0 instead keeps
                    # exp2(-inf - m) at 0 rather than NaN.
                    m_safe[h] = T.if_then_else(m_i[h] == neg_inf, 0, m_i[h])
                    alpha[h] = T.exp2(m_prev[h] - m_safe[h])
                for h, j in alloc.parallel(block_h, block_k):
                    acc_s[h, j] = T.exp2(acc_s[h, j] - m_safe[h])
                T.reduce_sum(acc_s, row_sum, dim=1)
                for h in alloc.parallel(block_h):
                    l_i[h] = l_i[h] * alpha[h] + row_sum[h]
                for h, d in alloc.parallel(block_h, d_v):
                    acc_o[h, d] = acc_o[h, d] * alpha[h]
                T.copy(acc_s, p_s)
                T.gemm(p_s, kv_s[:, 0:d_v], acc_o, policy=T.GemmWarpPolicy.FullRow)

            # Final normalisation. The sink adds exp(sink) to the natural-units denominator, i.e.
            # exp2(sink * log2(e) - m) in the kernel's shifted base-2 units. A row with no valid entry has
            # l = 0 and acc_o = 0: its output is 0 and its lse -inf.
            for h in alloc.parallel(block_h):
                m_safe[h] = T.if_then_else(m_i[h] == neg_inf, 0, m_i[h])
                if has_sink:
                    alpha[h] = l_i[h] + T.exp2(
                        AttnSink[T.min(h0 + h, heads - 1)] * T.float32(LOG2E) - m_safe[h]
                    )
                else:
                    alpha[h] = l_i[h]
                alpha[h] = T.if_then_else(alpha[h] > 0, 1.0 / alpha[h], 0)
                row_sum[h] = T.if_then_else(l_i[h] > 0, (T.log2(l_i[h]) + m_safe[h]) * T.float32(LN2), neg_inf)
            for h, d in alloc.parallel(block_h, d_v):
                if h0 + h < heads:
                    Out[b, s, h0 + h, d] = dsl.store_bf16(acc_o[h, d] * alpha[h], target)
            for h in alloc.parallel(block_h):
                if h0 + h < heads:
                    Lse[b, s, h0 + h] = row_sum[h]

    if cpu:
        return main
    return build_mod.with_pass_configs(main, _CUDA_PASS_CONFIGS)


def _build_ws(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool,
    has_sink: bool,
    block_k: int,
) -> Any:
    """The warp-specialised CUDA kernel (``pipeline="ws"``); same arguments and semantics as :func:`build`.

    Three warpgroups (``WS_THREADS``) share two KV buffers of ``block_k`` rows, each split into the left and right
    halves of the value columns and the tail ``d_qk - d_v``:

    * the producer (threads 256-383, ``setmaxnreg`` 88) gathers step ``i`` into buffer ``i % 2`` with 16-byte
      cp.async copies (zero-filling for invalid entries) and writes each row's validity byte, then arrives on
      ``ready`` twice per thread: once through ``cp.async.mbarrier.arrive.noinc`` (fires when its copies land) and
      once plainly (releases its validity stores);
    * consumer 0 (threads 0-127, 232 registers) waits for ``ready``, computes the masked scores (three wgmma into
      one cleared accumulator, then -inf selected where invalid), runs the online softmax, writes bf16 ``P`` and the
      rescale factors to shared memory, and accumulates the left half of ``P . V``;
    * consumer 1 (threads 128-255, 168 registers) rescales and accumulates the right half of ``P . V`` from them.

    Hand-offs are mbarriers with phase parities: ``ready``/``free`` per buffer (a buffer is refilled only after both
    consumers released it), ``p_ready``/``p_free`` for ``P`` and the factors (consumer 0 overwrites them only after
    consumer 1 read them), ``fin`` for the final normaliser. Step ``i`` uses buffer ``i % 2`` with phase parity
    ``(i // 2) & 1``, which holds for any step count (a row of ``limit <= 64`` entries runs one step). Every arrival is
    ordered after the previous phase completed (each side waits on the other before arriving again), so no phase can
    be completed by one side's repeated arrivals.

    An invalid entry's tile row is zero-filled by the producer's predicated cp.async (row number -1, see
    ``_gather_row``) and its score is selected to ``-inf`` after the MMA.

    A static audit of the generated CUDA (barrier counts, phase parities over odd/even/zero step counts, proxy fences,
    ``setmaxnreg`` budgets, padded heads) and a randomised model of the barrier protocol found no hang or race; the
    GPU tier is still the proof.
    """
    block_h = WGMMA_M
    half_v = d_v // 2
    tail = d_qk - d_v
    head_blocks = (heads + block_h - 1) // block_h
    neg_inf = -T.infinity(ACCUM_DTYPE)
    consumers = 2 * WARPGROUP_THREADS

    batch = T.dynamic("batch")
    seq_len = T.dynamic("seq_len")
    seq_len_kv = T.dynamic("seq_len_kv")
    width = T.dynamic("topk")
    topk_length_shape = [batch, seq_len] if has_topk_length else [1, 1]
    sink_shape = [heads] if has_sink else [1]

    # Macros take TileLang buffers and expressions (no Python annotations: the eager builder binds them itself).
    @T.macro
    def scores(q_l, q_r, q_t, kv_l, kv_r, k_t, valid, ready, parity, acc_s, scale_log2):  # noqa: ANN001, ANN202
        # Consumer 0: the masked, log2-scaled scores of one KV buffer. The mask is selected after the MMA (a masked
        # entry's zero row gives a score of 0 that must become -inf).
        T.barrier_wait(ready, parity)
        # The tiles were written by cp.async (generic proxy) and are read by wgmma (async proxy).
        T.fence_proxy_async()
        T.clear(acc_s)
        T.wgmma_gemm(q_l, kv_l, acc_s, transpose_B=True)
        T.wgmma_gemm(q_r, kv_r, acc_s, transpose_B=True)
        T.wgmma_gemm(q_t, k_t, acc_s, transpose_B=True)
        T.wait_wgmma(0)
        for h, j in T.Parallel(block_h, block_k):
            acc_s[h, j] = T.if_then_else(valid[j] != 0, acc_s[h, j] * scale_log2, neg_inf)

    @T.macro
    def produce(kv_src, indices, b, s, step, limit, kv_l, kv_r, k_t, valid):  # noqa: ANN001, ANN202
        # Producer: gather the rows of `step` into one KV buffer as cp.async copies without commit/wait groups (the
        # caller's cp.async mbarrier arrival tracks their completion), and record each row's validity. Each element
        # reads its index straight from global memory (cached), as the single-warpgroup schedule does; an invalid
        # entry's row number is -1, which the bound guard turns into a zero-filling predicated cp.async that reads
        # nothing (see _gather_row).
        for j in T.Parallel(block_k):
            valid[j] = T.Cast(
                "uint8",
                _entry_valid(
                    _index_at(indices, b, s, step * block_k + j, width), step * block_k + j, limit, seq_len_kv
                ),
            )
        for j, d in T.Parallel(block_k, half_v, annotations=WS_ASYNC_COPY):
            kv_l[j, d] = kv_src[b, _gather_row(indices, b, s, step * block_k + j, width, limit, seq_len_kv), d]
        for j, d in T.Parallel(block_k, half_v, annotations=WS_ASYNC_COPY):
            kv_r[j, d] = kv_src[b, _gather_row(indices, b, s, step * block_k + j, width, limit, seq_len_kv), half_v + d]
        for j, d in T.Parallel(block_k, tail, annotations=WS_ASYNC_COPY):
            k_t[j, d] = kv_src[b, _gather_row(indices, b, s, step * block_k + j, width, limit, seq_len_kv), d_v + d]

    @T.prim_func
    def main(
        Q: T.Tensor([batch, seq_len, heads, d_qk], DATA_DTYPE),  # type: ignore[valid-type]
        KV: T.Tensor([batch, seq_len_kv, d_qk], DATA_DTYPE),  # type: ignore[valid-type]
        Indices: T.Tensor([batch, seq_len, width], INDEX_DTYPE),  # type: ignore[valid-type]
        TopkLength: T.Tensor(topk_length_shape, INDEX_DTYPE),  # type: ignore[valid-type]
        AttnSink: T.Tensor(sink_shape, ACCUM_DTYPE),  # type: ignore[valid-type]
        sm_scale: T.float32,
        Out: T.Tensor([batch, seq_len, heads, d_v], DATA_DTYPE),  # type: ignore[valid-type]
        Lse: T.Tensor([batch, seq_len, heads], ACCUM_DTYPE),  # type: ignore[valid-type]
    ):
        with T.Kernel(seq_len * head_blocks, batch, threads=WS_THREADS) as (bx, by):
            q_l = T.alloc_shared([block_h, half_v], DATA_DTYPE)
            q_r = T.alloc_shared([block_h, half_v], DATA_DTYPE)
            q_t = T.alloc_shared([block_h, tail], DATA_DTYPE)
            kv_l0 = T.alloc_shared([block_k, half_v], DATA_DTYPE)
            kv_r0 = T.alloc_shared([block_k, half_v], DATA_DTYPE)
            k_t0 = T.alloc_shared([block_k, tail], DATA_DTYPE)
            kv_l1 = T.alloc_shared([block_k, half_v], DATA_DTYPE)
            kv_r1 = T.alloc_shared([block_k, half_v], DATA_DTYPE)
            k_t1 = T.alloc_shared([block_k, tail], DATA_DTYPE)
            p_s = T.alloc_shared([block_h, block_k], DATA_DTYPE)
            # Whether each gathered row takes part in the softmax, per KV buffer (written by the producer).
            valid0 = T.alloc_shared([block_k], "uint8")
            valid1 = T.alloc_shared([block_k], "uint8")
            alpha_s = T.alloc_shared([block_h], ACCUM_DTYPE)
            inv_s = T.alloc_shared([block_h], ACCUM_DTYPE)

            acc_s = T.alloc_fragment([block_h, block_k], ACCUM_DTYPE)
            acc_o_l = T.alloc_fragment([block_h, half_v], ACCUM_DTYPE)
            acc_o_r = T.alloc_fragment([block_h, half_v], ACCUM_DTYPE)
            m_i = T.alloc_fragment([block_h], ACCUM_DTYPE)
            m_prev = T.alloc_fragment([block_h], ACCUM_DTYPE)
            m_safe = T.alloc_fragment([block_h], ACCUM_DTYPE)
            alpha = T.alloc_fragment([block_h], ACCUM_DTYPE)
            l_i = T.alloc_fragment([block_h], ACCUM_DTYPE)
            row_sum = T.alloc_fragment([block_h], ACCUM_DTYPE)

            bar_q = T.alloc_barrier(WS_THREADS)
            # ready_i: the producer's 128 cp.async completions plus its 128 plain arrivals (which release its
            # valid_i stores); free_i: both consumer warpgroups are done with buffer i.
            ready0 = T.alloc_barrier(2 * WARPGROUP_THREADS)
            ready1 = T.alloc_barrier(2 * WARPGROUP_THREADS)
            free0 = T.alloc_barrier(consumers)
            free1 = T.alloc_barrier(consumers)
            # p_ready: p_s and alpha_s hold this step's values; p_free: both consumers are done reading them.
            p_ready = T.alloc_barrier(consumers)
            p_free = T.alloc_barrier(consumers)
            # fin: consumer 0 wrote the final normaliser into inv_s.
            fin = T.alloc_barrier(WARPGROUP_THREADS)

            b = by
            s = bx // head_blocks
            h0 = (bx % head_blocks) * block_h
            scale_log2 = sm_scale * T.float32(LOG2E)
            limit = T.min(TopkLength[b, s], width) if has_topk_length else width
            # Every role runs the same step count, computed from the same value. Step i uses buffer i % 2 with
            # phase parity (i // 2) & 1, which holds for any count, odd included (no padding step).
            num_steps = T.ceildiv(limit, block_k)
            tx = T.get_thread_binding()

            # Heads past `heads` (last head block) load zeros; they are never stored.
            for h, d in T.Parallel(block_h, half_v):
                q_l[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), d], 0)
                q_r[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), half_v + d], 0)
            for h, d in T.Parallel(block_h, tail):
                q_t[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), d_v + d], 0)
            # Each writer makes its Q stores visible to wgmma (async proxy) before releasing them.
            T.fence_proxy_async()
            T.barrier_arrive(bar_q)

            if tx < WARPGROUP_THREADS:
                T.set_max_nreg(WS_CONSUMER0_REGS, 1)
                T.fill(acc_o_l, 0)
                T.fill(l_i, 0)
                T.fill(m_i, neg_inf)
                T.barrier_wait(bar_q, 0)
                for step in T.serial(num_steps):
                    pair = step // WS_KV_BUFFERS
                    if step % WS_KV_BUFFERS == 0:
                        scores(q_l, q_r, q_t, kv_l0, kv_r0, k_t0, valid0, ready0, pair & 1, acc_s, scale_log2)
                    else:
                        scores(q_l, q_r, q_t, kv_l1, kv_r1, k_t1, valid1, ready1, pair & 1, acc_s, scale_log2)
                    if step > 0:
                        # Consumer 1 must have read the previous step's p_s and alpha_s.
                        T.barrier_arrive(p_free)
                        T.barrier_wait(p_free, (step - 1) & 1)
                    T.copy(m_i, m_prev)
                    T.reduce_max(acc_s, m_i, dim=1, clear=False)
                    for h in T.Parallel(block_h):
                        # exp2(-inf - m) stays 0 (not NaN) while a row has seen no valid score.
                        m_safe[h] = T.if_then_else(m_i[h] == neg_inf, 0, m_i[h])
                        alpha[h] = T.exp2(m_prev[h] - m_safe[h])
                    for h, j in T.Parallel(block_h, block_k):
                        acc_s[h, j] = T.exp2(acc_s[h, j] - m_safe[h])
                    T.reduce_sum(acc_s, row_sum, dim=1)
                    for h in T.Parallel(block_h):
                        l_i[h] = l_i[h] * alpha[h] + row_sum[h]
                    for h, d in T.Parallel(block_h, half_v):
                        acc_o_l[h, d] = acc_o_l[h, d] * alpha[h]
                    T.copy(alpha, alpha_s)
                    T.copy(acc_s, p_s)
                    # Release P and alpha before this warpgroup's own P . V, so both halves run concurrently. Each
                    # thread fences its P stores for consumer 1's wgmma (async proxy) before arriving.
                    T.fence_proxy_async()
                    T.barrier_arrive(p_ready)
                    if step % WS_KV_BUFFERS == 0:
                        T.gemm(p_s, kv_l0, acc_o_l)
                        T.barrier_arrive(free0)
                    else:
                        T.gemm(p_s, kv_l1, acc_o_l)
                        T.barrier_arrive(free1)
                # The sink adds exp2(sink * log2(e) - m) to the shifted base-2 denominator; an empty row has l = 0,
                # acc_o = 0: out 0, lse -inf.
                for h in T.Parallel(block_h):
                    m_safe[h] = T.if_then_else(m_i[h] == neg_inf, 0, m_i[h])
                    if has_sink:
                        alpha[h] = l_i[h] + T.exp2(AttnSink[T.min(h0 + h, heads - 1)] * T.float32(LOG2E) - m_safe[h])
                    else:
                        alpha[h] = l_i[h]
                    alpha[h] = T.if_then_else(alpha[h] > 0, 1.0 / alpha[h], 0)
                    row_sum[h] = T.if_then_else(l_i[h] > 0, (T.log2(l_i[h]) + m_safe[h]) * T.float32(LN2), neg_inf)
                T.copy(alpha, inv_s)
                T.barrier_arrive(fin)
                for h, d in T.Parallel(block_h, half_v):
                    if h0 + h < heads:
                        Out[b, s, h0 + h, d] = T.Cast(DATA_DTYPE, acc_o_l[h, d] * alpha[h])
                for h in T.Parallel(block_h):
                    if h0 + h < heads:
                        Lse[b, s, h0 + h] = row_sum[h]
            elif tx < consumers:
                T.set_max_nreg(WS_CONSUMER1_REGS, 1)
                T.fill(acc_o_r, 0)
                for step in T.serial(num_steps):
                    T.barrier_arrive(p_ready)
                    T.barrier_wait(p_ready, step & 1)
                    # kv_r came from the producer's cp.async (generic proxy); wgmma reads it through the async proxy.
                    T.fence_proxy_async()
                    for h, d in T.Parallel(block_h, half_v):
                        acc_o_r[h, d] = acc_o_r[h, d] * alpha_s[h]
                    if step % WS_KV_BUFFERS == 0:
                        T.gemm(p_s, kv_r0, acc_o_r)
                        T.barrier_arrive(free0)
                    else:
                        T.gemm(p_s, kv_r1, acc_o_r)
                        T.barrier_arrive(free1)
                    T.barrier_arrive(p_free)
                T.barrier_wait(fin, 0)
                for h, d in T.Parallel(block_h, half_v):
                    if h0 + h < heads:
                        Out[b, s, h0 + h, half_v + d] = T.Cast(DATA_DTYPE, acc_o_r[h, d] * inv_s[h])
            else:
                T.set_max_nreg(WS_PRODUCER_REGS, 0)
                for step in T.serial(num_steps):
                    pair = step // WS_KV_BUFFERS
                    # Parity trick: waiting for the phase before the first completes at once (buffers start free).
                    if step % WS_KV_BUFFERS == 0:
                        T.barrier_wait(free0, (pair & 1) ^ 1)
                        produce(KV, Indices, b, s, step, limit, kv_l0, kv_r0, k_t0, valid0)
                        T.cp_async_barrier_noinc(ready0)
                        T.barrier_arrive(ready0)
                    else:
                        T.barrier_wait(free1, (pair & 1) ^ 1)
                        produce(KV, Indices, b, s, step, limit, kv_l1, kv_r1, k_t1, valid1)
                        T.cp_async_barrier_noinc(ready1)
                        T.barrier_arrive(ready1)

    return build_mod.with_pass_configs(main, _WS_PASS_CONFIGS)


def _index_at(indices: Any, b: Any, s: Any, pos: Any, width: Any) -> Any:
    """Entry ``pos`` of query ``(b, s)``'s index row, read at ``min(pos, k - 1)``: the last step of a row whose width
    is not a multiple of ``block_k`` stays in bounds (positions ``>= k`` are masked by ``_entry_valid``)."""
    return indices[b, s, T.min(pos, width - 1)]


def _gather_row(indices: Any, b: Any, s: Any, pos: Any, width: Any, limit: Any, seq_len_kv: Any) -> Any:
    """The KV row a gather reads for entry ``pos`` of query ``(b, s)``: its index (int64) when valid, else -1.

    TileLang's bound guard cannot prove this row in ``[0, S_kv)``, so it wraps the copy in the row's bounds check: on
    CUDA the copy becomes a predicated cp.async that, for an invalid entry, reads nothing and zero-fills the tile row
    (a select around the load would make the copy synchronous); the C target gets the same guard as a branch. A zero
    row, not the memory an invalid index names, then meets the MMAs: Inf/NaN there (an unwritten cache slot) cannot
    leak into ``out`` through ``0 * V``.
    """
    idx = _index_at(indices, b, s, pos, width)
    # In int64, the type of the address arithmetic: with an int32 row the guard evaluates it twice (int64 for the
    # address, int32 for the predicate) and the ws producer issued 73 index loads per step instead of 37.
    return T.if_then_else(_entry_valid(idx, pos, limit, seq_len_kv), T.Cast("int64", idx), T.int64(-1))


def _entry_valid(idx: Any, pos: Any, limit: Any, seq_len_kv: Any) -> Any:
    """Whether the entry at position ``pos`` of its row, holding ``idx``, takes part in the softmax."""
    return T.And(pos < limit, T.And(idx >= 0, idx < seq_len_kv))

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
* non-finite inputs give the reference's (``torch.logsumexp``'s) answer, NaN and infinities at the same places: a
  NaN score (NaN in ``q`` or in a referenced row) makes ``lse`` and ``out`` NaN, a ``+inf`` score (and no NaN) makes
  ``lse = +inf`` and ``out`` NaN, scores that are all ``-inf`` give ``lse = -inf`` and ``out = 0``; a NaN sink makes
  ``out`` NaN, a ``+inf`` sink 0 (see ``tl_kernels.sparse_mla_fwd_steps.softmax_macros``, which adds nothing per
  score: the shift and the final selects are per row);
* ``attn_sink[h]`` joins only the final denominator; ``lse`` is the natural-log log-sum-exp of the valid scores alone;
* any head count works: heads past ``heads`` in the last head block read zeros and are never written;
* ``ranged=True`` (static): each query's entries are a contiguous row range instead of an index list (DeepSeek-V4's
  sliding window and HCA entries): ``indices [B, S, 2]`` holds (start, end), entry ``j`` is row ``start + j``, valid
  iff ``start + j < end`` and ``0 <= start + j < S_kv``. Only the rows in ``[0, S_kv)`` take steps (the range is
  clamped first: ``tl_kernels.sparse_mla_fwd_steps.range_length``), and everything else above holds unchanged: the
  range only changes which (row, valid) an entry has (``steps.index_at``), for the gather and the mask alike.

Batch, query length, KV length and the top-k width are symbolic, so one compiled kernel serves every such shape.

Two CUDA schedules (``Config.pipeline``): ``"none"`` (default) is the one described above, with two
warpgroups and one KV tile; ``"ws"`` (opt-in) adds a producer warpgroup that gathers into two mbarrier-guarded KV
buffers while the two consumer warpgroups compute (``tl_kernels.sparse_mla_fwd_ws``). Both share the entry rules and
the online-softmax math (``tl_kernels.sparse_mla_fwd_steps``). On the C target both are the same plain loop; the
``ws`` kernel's GPU correctness rests on the GPU tier.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel signature's annotations, which refer to
# closure variables (shapes, dtypes).
import dataclasses
from typing import Any

import tilelang.language as T

from tl_kernels import dsl
from tl_kernels.sparse_mla_fwd_steps import (
    ACCUM_DTYPE,
    CUDA_PASS_CONFIGS,
    DATA_DTYPE,
    WARPGROUP_THREADS,
    WGMMA_M,
    entry_valid,
    forward_kernel,
    gather_row,
    index_at,
    kernel_dims,
    plain_step_macros,
    softmax_macros,
    wide,
)
from tl_kernels.sparse_mla_fwd_ws import (
    WS_BLOCK_K,
    WS_KV_BUFFERS,
    WS_SMEM_SLACK_BYTES,
    WS_THREADS,
    build_ws,
)

__all__ = [
    "PIPELINES",
    "PIPELINE_NONE",
    "PIPELINE_WS",
    "PORTABLE_TUNING_PRESETS",
    "PORTABLE_TUNING_SPACE",
    "TUNING_PRESETS",
    "TUNING_SPACE",
    "WS_BLOCK_K",
    "WS_THREADS",
    "Config",
    "build",
    "check_config",
    "default_config",
    "smem_bytes",
]

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
SMEM_ALIGN_SLACK_BYTES = 4 * 1024
"""Room for TileLang's 1024-byte tile alignment and reduction workspaces on top of the tiles themselves."""
BF16_BYTES = 2
PORTABLE_THREADS = (WARPGROUP_THREADS, CUDA_THREADS)
"""Threads per block of the portable schedule: one or two warpgroups' worth of warps."""



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

PORTABLE_TUNING_SPACE: dict[str, tuple[Any, ...]] = {
    "block_h": (32, WGMMA_M),
    "block_k": (16, 32),
    "num_stages": (1,),
    "threads": PORTABLE_THREADS,
    "pipeline": (PIPELINE_NONE,),
}
"""The candidates on the portable schedule (``autotune.lookup.space`` uses it for every CUDA architecture but sm_90a); the
compile-only tuner prunes those that spill (at V3.2 widths 64 x 32 with 128 threads spilled 4.9 KB on sm_80)."""

_PORTABLE_LADDER: tuple[tuple[int, int, int], ...] = ((32, 32, CUDA_THREADS), (32, 16, WARPGROUP_THREADS))
"""default_config's (block_h, block_k, threads) on the portable schedule, in order; the second needs less shared
memory (four warps: a 32 x 16 score tile cannot be split over eight). At V3.2 widths (576/512) the first takes 76 KB
and compiles without spills on sm_80, sm_86, sm_89, sm_90, sm_100a and sm_120 (182-255 registers). 64-head blocks
halve the KV reads but sit at the register limit: 64 x 32 spilled 16 bytes on sm_90 with topk_length and sink (clean
on sm_80 and sm_100a), 64 x 16 spilled 16 bytes on sm_120, so they are tuning candidates (the tuner prunes spills),
not defaults."""

PORTABLE_TUNING_PRESETS: tuple[dict[str, Any], ...] = ({"block_h": WGMMA_M, "block_k": 16},)
"""Whole alternative portable configs the pruned space tries beside the one-field neighbours of the default (which
include 64 x 32): 64 heads x 16 entries, half the KV reads of 32-head blocks in 96 KB."""

TUNING_PRESETS: tuple[dict[str, Any], ...] = ({"pipeline": "ws", "block_k": WS_BLOCK_K, "threads": WS_THREADS},)
"""Whole alternative schedules the pruned tuning space always tries (``autotune.lookup.space.pruned_space``)."""


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

    ``static`` holds ``heads``, ``d_qk``, ``d_v``, ``has_topk_length``, ``has_sink`` and optionally ``ranged``
    (default False) and ``target`` (default: sm_90a); the Hopper constraints apply to CUDA targets only.
    """
    d_qk, d_v, heads = int(static["d_qk"]), int(static["d_v"]), int(static["heads"])
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if static.get("ranged", False) and static.get("has_topk_length", False):
        raise ValueError("ranged kernels take no topk_length: a range's end bounds its entries")
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
    target = dsl.static_target(static)
    if dsl.is_cpu(target):
        return
    if not dsl.is_hopper(target):
        _check_portable(static, config, target)
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
    if ws and d_v % (2 * CUDA_DIM_ALIGN):
        # Each consumer warpgroup owns d_v / 2 output columns (whole swizzle atoms); the scores take a wgmma per half
        # and one for the key-only tail d_qk - d_v when there is one.
        raise ValueError(f"pipeline='ws' needs d_v a multiple of {2 * CUDA_DIM_ALIGN}, got d_v={d_v}")
    _check_cuda_common(static, config, target)


def _check_cuda_common(static: dict[str, Any], config: Config, target: dsl.Target) -> None:
    """The constraints both CUDA schedules share: tile alignment and the architecture's shared memory."""
    d_qk, d_v = int(static["d_qk"]), int(static["d_v"])
    if config.block_k % CUDA_BLOCK_K_ALIGN:
        raise ValueError(f"block_k must be a multiple of {CUDA_BLOCK_K_ALIGN} on CUDA, got {config.block_k}")
    if config.num_stages > CUDA_MAX_STAGES:
        raise ValueError(f"num_stages must be <= {CUDA_MAX_STAGES} on CUDA, got {config.num_stages}")
    if d_qk % CUDA_DIM_ALIGN or d_v % CUDA_DIM_ALIGN:
        raise ValueError(f"d_qk and d_v must be multiples of {CUDA_DIM_ALIGN} on CUDA, got {d_qk} and {d_v}")
    needed, limit = smem_bytes(static, config), dsl.smem_limit_bytes(target)
    if needed > limit:
        raise ValueError(
            f"{config} needs {needed} B of shared memory, more than {limit} B on {dsl.arch_of(target).name}"
        )


def _check_portable(static: dict[str, Any], config: Config, target: dsl.Target) -> None:
    """The portable schedule (mma.sync; every CUDA architecture but sm_90a): the default loop only, head blocks of
    whole mma.sync row tiles, one or two warpgroups."""
    if config.pipeline != PIPELINE_NONE:
        raise ValueError(
            f"pipeline={config.pipeline!r} needs sm_90a (wgmma, setmaxnreg); the portable schedule is 'none'"
        )
    if config.block_h % dsl.MMA_SYNC_WARP_M or config.block_h > WGMMA_M:
        raise ValueError(
            f"block_h must be a multiple of {dsl.MMA_SYNC_WARP_M} up to {WGMMA_M} on the portable schedule, "
            f"got {config.block_h}"
        )
    if config.threads not in PORTABLE_THREADS:
        raise ValueError(f"threads must be one of {PORTABLE_THREADS} on the portable schedule, got {config.threads}")
    if config.block_k > CUDA_MAX_BLOCK_K:
        raise ValueError(f"block_k must be <= {CUDA_MAX_BLOCK_K} on CUDA with pipeline='none', got {config.block_k}")
    if not dsl.mma_sync_warps_fit(config.block_h, config.block_k, config.threads):
        raise ValueError(
            f"the {config.block_h} x {config.block_k} score GEMM cannot be split over {config.threads // 32} warps "
            f"(each needs a multiple of {dsl.MMA_SYNC_WARP_M} rows and {dsl.MMA_SYNC_WARP_N} columns)"
        )
    _check_cuda_common(static, config, target)


def default_config(static: dict[str, Any]) -> Config:
    """A config that works for every shape with these static parameters.

    On the C target the head block shrinks to the head count's power of two (at most 64) so that a few heads do not
    pay for 64; on sm_90a it is the wgmma M of 64 (heads past ``heads`` are masked); on the portable schedule the
    first of :data:`_PORTABLE_LADDER` that fits the architecture's shared memory. Raises ``ValueError`` when nothing
    fits (its message is the last rejection).
    """
    target = dsl.static_target(static)
    if dsl.is_cpu(target):
        heads = int(static["heads"])
        return Config(block_h=min(WGMMA_M, 1 << max(heads - 1, 0).bit_length()))
    if dsl.is_hopper(target):
        return Config()
    ladder = (Config(block_h=bh, block_k=bk, threads=threads) for bh, bk, threads in _PORTABLE_LADDER)
    return dsl.first_valid_config(check_config, static, ladder)


def build(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool = False,
    has_sink: bool = False,
    ranged: bool = False,
    block_h: int = Config.block_h,
    block_k: int = Config.block_k,
    num_stages: int = Config.num_stages,
    threads: int = Config.threads,
    pipeline: str = Config.pipeline,
    target: dsl.Target = dsl.HOPPER_TARGET,
) -> Any:
    """The forward kernel for ``heads`` query heads of width ``d_qk`` and value width ``d_v``.

    Kernel arguments (B, S, S_kv and k symbolic; bf16 travels as ``uint16`` on the C target):
        q: ``[B, S, heads, d_qk]`` bfloat16; kv: ``[B, S_kv, d_qk]`` bfloat16; indices: ``[B, S, k]`` int32, or with
        ``ranged`` ``[B, S, 2]`` int32 (start, end) per query (see the module docstring);
        topk_length: ``[B, S]`` int32 with ``has_topk_length`` (never with ``ranged``), else a ``[1, 1]`` int32
        placeholder;
        attn_sink: ``[heads]`` float32 with ``has_sink``, else a ``[1]`` float32 placeholder;
        sm_scale: float32 scalar (the softmax scale, natural units);
        out: ``[B, S, heads, d_v]`` bfloat16 (written); lse: ``[B, S, heads]`` float32, natural log (written).

    ``pipeline="ws"`` selects the warp-specialised schedule on CUDA (:func:`tl_kernels.sparse_mla_fwd_ws.build_ws`);
    on the C target it lowers to the same plain loop as ``"none"`` (the C target has no threads, barriers or asynchronous copies).
    """
    check_config(
        {"heads": heads, "d_qk": d_qk, "d_v": d_v, "has_topk_length": has_topk_length, "ranged": ranged,
         "target": target},
        Config(block_h=block_h, block_k=block_k, num_stages=num_stages, threads=threads, pipeline=pipeline),
    )  # fmt: skip
    cpu = dsl.is_cpu(target)
    if pipeline == PIPELINE_WS and not cpu:
        return build_ws(
            heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink, block_k=block_k,
            ranged=ranged,
        )  # fmt: skip
    alloc = dsl.allocators(target)
    data_storage = dsl.storage_dtype(DATA_DTYPE, target)
    # On the C target the tiles hold decoded float32 (its GEMM has no bf16); on CUDA they hold bf16 for wgmma.
    tile_dtype = ACCUM_DTYPE if cpu else DATA_DTYPE
    neg_inf = -T.infinity(ACCUM_DTYPE)

    dims = kernel_dims(heads, has_topk_length, has_sink, ranged)
    width, seq_len_kv = dims.width, dims.seq_len_kv

    def load(value: Any) -> Any:
        return dsl.load_tile(value, DATA_DTYPE, target)

    online_softmax, finalize = softmax_macros(alloc.parallel, block_h, block_k, heads, has_sink)
    open_rows, attend = plain_step_macros(
        alloc, online_softmax, heads=heads, block_h=block_h, block_k=block_k, d_qk=d_qk, d_v=d_v,
        tile_dtype=tile_dtype, load=load, ranged=ranged,
    )  # fmt: skip

    @T.macro
    def schedule(Q, KV, Indices, AttnSink, Out, Lse, b, s, h0, scale_log2, limit, num_steps):  # noqa: ANN001, ANN202
        # Heads past `heads` (last head block) load zeros; they are never stored.
        q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum = open_rows(Q, b, s, h0)

        for step in T.Pipelined(num_steps, num_stages=num_stages):
            # The gather: V is the first d_v columns of the same rows, so one tile feeds both GEMMs. Each element
            # reads its index straight from global memory (cached): staging the indices in shared memory would
            # make them a second asynchronous copy, and TileLang 0.1.15 does not wait for one cp.async group
            # before another copy's address reads it.
            # An invalid entry's tile row is zero, never the memory its index names (see gather_row).
            for j, d in alloc.parallel(block_k, d_qk):
                kv_s[j, d] = load(
                    KV[wide(b), gather_row(Indices, b, s, step * block_k + j, width, limit, seq_len_kv, ranged), d]
                )

            attend(
                q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum, Indices, b, s, step, width,
                limit, seq_len_kv, scale_log2,
            )  # fmt: skip

        # alpha: the output's normaliser (the sink in the denominator; 0 for an empty row, whose output is then
        # 0), row_sum: lse (-inf for an empty row).
        finalize(m_i, m_safe, l_i, alpha, row_sum, AttnSink, h0)
        for h, d in alloc.parallel(block_h, d_v):
            if h0 + h < heads:
                Out[b, s, h0 + h, d] = dsl.store_bf16(acc_o[h, d] * alpha[h], target)
        for h in alloc.parallel(block_h):
            if h0 + h < heads:
                Lse[b, s, h0 + h] = row_sum[h]

    main = forward_kernel(
        dims, heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, block_h=block_h, block_k=block_k,
        threads=threads, data_dtype=data_storage, body=schedule, ranged=ranged,
    )  # fmt: skip
    return dsl.with_target_pass_configs(main, target, CUDA_PASS_CONFIGS)

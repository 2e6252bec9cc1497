"""Lightning indexer: ``scores[b, t, s] = k_scale[b, s] * sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s])``.

One builder lowers for the C target (CPU tier) and for sm_90a. Schedule (the idea of DeepSeek's ``fp8_mqa_logits``
and TileLang's ``fp8_lighting_indexer``, written here from scratch):

* a thread block owns ``block_Q`` queries of one batch row; their ``block_Q * heads`` q-head vectors form one
  ``[rows, D_i]`` tile in shared memory, loaded once;
* it walks only the key blocks (``block_N`` keys each) that some of its queries can see; per step one GEMM
  ``k_tile [block_N, D_i] x q_tile^T -> [block_N, rows]`` (wgmma on Hopper, keys as the M dimension so that the sum
  over heads is a reduction along each accumulator row, i.e. inside a thread quad instead of across warps), then
  ReLU, times the head weight, summed over heads, times ``k_scale``;
* every key block it does not visit is written as ``-inf``, and inside visited blocks each invisible position is
  ``-inf`` too, so the whole ``[block_Q, S_kv]`` stripe of the output is written exactly once.

Inputs are bfloat16 or float8_e4m3fn with float32 accumulation. On the C target they travel as ``uint16``/``uint8``
bits and are decoded to float32 tiles (``dsl.load_f32``) before a float32 GEMM; on CUDA the tiles stay in the input
dtype and the GEMM is a wgmma with float32 accumulators.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

import math
from dataclasses import dataclass
from typing import Any

import tilelang.language as T

from tl_kernels import dsl
from tl_kernels.indexer_steps import FP8, indexer_math

__all__ = [
    "CPU_DEFAULT",
    "DTYPES",
    "MODES",
    "PORTABLE_TUNING_SPACE",
    "TUNING_SPACE",
    "Config",
    "block_queries",
    "build",
    "check_config",
    "default_config",
    "padded_heads",
    "smem_bytes",
    "tile_rows",
]

BF16 = "bfloat16"
DTYPES = (BF16, FP8)
MODES = ("causal", "range")
ACCUM_DTYPE = "float32"
INDEX_DTYPE = "int32"

# The wgmma N dimension (here: q-head rows of the tile) is a multiple of 8 up to 256; rows are padded to a multiple of
# ROW_ALIGN with zero q rows of zero weight (they add nothing), so every head count gets a legal tile.
ROW_ALIGN = 16
MAX_ROWS = 256
# The wgmma K step: 16 elements of bf16, 32 of e4m3 (32 bytes either way).
K_ALIGN = {"bfloat16": 16, "float8_e4m3fn": 32}
ELEMENT_BYTES = {"bfloat16": 2, "float8_e4m3fn": 1}
ACCUM_BYTES = 4
# The wgmma M tile is 64 rows per warpgroup of 128 threads.
WARPGROUP_THREADS = 128
WGMMA_M = 64


@dataclass(frozen=True)
class Config:
    """Tunable tile sizes of the indexer (the defaults are the known-good Hopper tiling: 128 q-head rows x 256 keys).

    q_rows: q-head rows one block aims for: it takes the most whole queries whose heads (padded so the rows are a
        multiple of 16) fit, at least one (:func:`block_queries`); those rows are the GEMM N dimension
        (V3.2: 2 queries x 64 heads = 128).
    block_N: keys per step (the GEMM M dimension, split over the warpgroups: a multiple of 64 per warpgroup).
    num_stages: depth of the key-tile pipeline (TMA ring buffer in shared memory).
    threads: consumer threads per block (TileLang adds a 128-thread producer warpgroup for TMA).
    """

    q_rows: int = 128
    block_N: int = 256
    num_stages: int = 2
    threads: int = 512


# Every combination compiles in CI (build tier), so the space stays small: 3 valid configs per dtype after
# check_config (block_N=128 cannot feed 4 warpgroups). All three build without spills at 64 x 128 for both dtypes.
TUNING_SPACE: dict[str, tuple] = {
    "q_rows": (128,),
    "block_N": (128, 256),
    "num_stages": (2,),
    "threads": (256, 512),
}
PORTABLE_TUNING_SPACE: dict[str, tuple] = {
    "q_rows": (64,),
    "block_N": (64, 128),
    "num_stages": (2,),
    "threads": (128, 256),
}
"""The candidates on the portable schedule (``autotune.lookup.space`` uses it for every CUDA architecture but sm_90a)."""

# default_config tries these (block_N, num_stages, threads) in order; later ones need less shared memory. The portable
# schedule (mma.sync) starts smaller: most of its architectures have 99 KB of shared memory per block.
_DEFAULT_LADDER = (
    (128, 256, 2, 512),
    (128, 128, 2, 256),
    (128, 128, 1, 256),
    (128, 64, 1, 128),
)
# One query's 64 heads per block on the portable schedule: at 128 q-head rows its FP8 MMA (sm_90, sm_100a) reached 255
# registers and spilled 16-52 bytes; at 64 rows it needs 234-240 and bf16 about 140.
_PORTABLE_LADDER = ((64, 128, 2, 256), (64, 64, 2, 128), (64, 64, 1, 128))


def block_queries(heads: int, q_rows: int) -> int:
    """Queries per thread block: the most whole queries whose padded rows fit in ``q_rows``, at least one."""
    for block_Q in range(max(1, q_rows // heads), 0, -1):
        if block_Q * padded_heads(heads, block_Q) <= q_rows:
            return block_Q
    return 1


def padded_heads(heads: int, block_Q: int) -> int:
    """Heads per query in the tile: ``heads`` rounded up so that ``block_Q * padded`` is a multiple of 16."""
    step = ROW_ALIGN // math.gcd(ROW_ALIGN, block_Q)
    return -(-heads // step) * step


def tile_rows(heads: int, q_rows: int) -> int:
    """GEMM rows (N dimension) of a block: its queries times their padded heads."""
    block_Q = block_queries(heads, q_rows)
    return block_Q * padded_heads(heads, block_Q)


def tile_dtype_for(dtype: str, target: dsl.Target) -> str:
    """The dtype of the q and key tiles the MMA reads: float32 on the C target (decoded; it has no bf16 or FP8
    arithmetic), the input dtype on CUDA, except FP8 on an architecture without FP8 matrix instructions (sm_80,
    sm_86), where the kernel converts it to bfloat16 (exactly: every e4m3 value is a bf16 value)."""
    if dsl.is_cpu(target):
        return ACCUM_DTYPE
    if dtype == FP8 and not dsl.arch_of(target).fp8_mma:
        return BF16
    return dtype


def smem_bytes(static: dict, config: Config) -> int:
    """Shared memory the CUDA kernel allocates: the q tile, ``num_stages`` key tiles and the weight tile."""
    rows = tile_rows(static["heads"], config.q_rows)
    elem = ELEMENT_BYTES[tile_dtype_for(static["dtype"], dsl.static_target(static))]
    return (rows + config.num_stages * config.block_N) * static["dim"] * elem + rows * ACCUM_BYTES


def _is_cpu_static(static: dict) -> bool:
    """Whether ``static["target"]`` names the C target (absent means sm_90a: the tuning space is for Hopper)."""
    return dsl.is_cpu(dsl.static_target(static))


def check_config(static: dict, config: Config) -> None:
    """Raise ValueError when ``config`` cannot build for the static parameters ``static``.

    ``static`` holds ``heads``, ``dim``, ``dtype`` (``"bfloat16"`` or ``"float8_e4m3fn"``), ``mode`` (``"causal"`` or
    ``"range"``) and optionally ``target``. The Hopper constraints (wgmma shapes, warpgroups, shared memory) apply
    unless ``target`` is the C target, which only needs positive sizes.
    """
    heads, dim, dtype, mode = static["heads"], static["dim"], static["dtype"], static["mode"]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if heads < 1 or dim < 1:
        raise ValueError(f"heads and dim must be positive, got heads={heads}, dim={dim}")
    for name in ("q_rows", "block_N", "num_stages", "threads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if _is_cpu_static(static):
        return
    if dim % K_ALIGN[dtype]:
        raise ValueError(f"dim={dim} must be a multiple of {K_ALIGN[dtype]} for {dtype} (the wgmma K step)")
    rows = tile_rows(heads, config.q_rows)
    if rows > MAX_ROWS:
        raise ValueError(f"a block's {rows} q-head rows exceed the wgmma N limit {MAX_ROWS} (heads={heads})")
    if config.threads % WARPGROUP_THREADS:
        raise ValueError(f"threads={config.threads} must be a multiple of {WARPGROUP_THREADS} (whole warpgroups)")
    warpgroups = config.threads // WARPGROUP_THREADS
    if config.block_N % (WGMMA_M * warpgroups):
        raise ValueError(f"block_N={config.block_N} must be a multiple of {WGMMA_M} x {warpgroups} warpgroups")
    smem, limit = (
        smem_bytes(static, config),
        dsl.smem_limit_bytes(dsl.static_target(static)),
    )
    if smem > limit:
        raise ValueError(f"shared memory {smem} B exceeds {limit} B")


CPU_DEFAULT = Config(q_rows=128, block_N=64, num_stages=1, threads=128)
"""C-target default: short key tiles waste little work on the short sequences of CPU tests (no MMA constraints)."""


def default_config(static: dict) -> Config:
    """A config that builds for ``static`` and serves every batch and sequence length.

    On sm_90a: 128 q-head rows x 256 keys with 4 consumer warpgroups, stepping down to smaller key tiles when a large
    head dim does not fit in shared memory; on the other CUDA architectures (the portable schedule) 128 keys with 2
    warpgroups first, stepping down the same way. Raises ValueError when nothing fits (more than 256 heads, or a head
    dim that is not a multiple of the MMA K step): such shapes need another kernel. ``static["target"] == "c"`` gets
    :data:`CPU_DEFAULT`.
    """
    if _is_cpu_static(static):
        check_config(static, CPU_DEFAULT)
        return CPU_DEFAULT
    ladder = _DEFAULT_LADDER if dsl.is_hopper(dsl.static_target(static)) else _PORTABLE_LADDER
    configs = (Config(q_rows=q, block_N=n, num_stages=stages, threads=threads) for q, n, stages, threads in ladder)
    return dsl.first_valid_config(check_config, static, configs, kernel="indexer")


def build(
    *,
    heads: int,
    dim: int,
    dtype: str,
    mode: str,
    q_rows: int = Config.q_rows,
    block_N: int = Config.block_N,
    num_stages: int = Config.num_stages,
    threads: int = Config.threads,
    target: dsl.Target = dsl.CPU_TARGET,
) -> Any:
    """The indexer ``prim_func`` for the given static parameters; B, S and S_kv are dynamic.

    Args:
        heads, dim: H_i and D_i. dtype: ``"bfloat16"`` or ``"float8_e4m3fn"``. mode: ``"causal"`` (bottom-right
            aligned, ``s <= t + S_kv - S``) or ``"range"`` (``starts[b, t] <= s < ends[b, t]``).
        q_rows, block_N, num_stages, threads: the :class:`Config` fields (checked by :func:`check_config` on CUDA).
        target: ``"c"`` or ``{"kind": "cuda", "arch": "sm_90a"}``.

    Kernel arguments, in order (``k_scale`` only for FP8, ``starts``/``ends`` only in ``"range"`` mode):
        q ``[B, S, heads, dim]`` dtype; k ``[B, S_kv, dim]`` dtype; weights ``[B, S, heads]`` float32;
        [k_scale ``[B, S_kv]`` float32]; [starts, ends ``[B, S]`` int32]; scores ``[B, S, S_kv]`` float32 (written
        completely). On the C target the dtype tensors travel as ``dsl.storage_dtype`` bits (uint16 / uint8).
    """
    cpu = dsl.is_cpu(target)
    static = {"heads": heads, "dim": dim, "dtype": dtype, "mode": mode, "target": target}
    check_config(static, Config(q_rows=q_rows, block_N=block_N, num_stages=num_stages, threads=threads))
    block_Q = block_queries(heads, q_rows)
    alloc = dsl.allocators(target)
    fp8 = dtype == FP8
    causal = mode == "causal"
    io_dtype = dsl.storage_dtype(dtype, target)
    tile_dtype = tile_dtype_for(dtype, target)
    # Hopper: one TMA tile copy per key block. The portable schedule loads the key tile element by element, bounds
    # checked and converted where FP8 has no MMA, with plain (synchronous) loads: TileLang 0.1.15 fails to generate
    # a pipelined tile copy or plain element copy there ("Downcast from tirx.Sub to ir.IntImm": the cp.async wait
    # count of a symbolic trip count), so this schedule's key loads do not overlap its MMAs (a known cost).
    element_k = not dsl.is_hopper(target)
    heads_pad = padded_heads(heads, block_Q)
    neg_inf = -T.infinity(ACCUM_DTYPE)
    math_ = indexer_math(
        heads=heads, heads_pad=heads_pad, block_Q=block_Q, block_N=block_N, dim=dim, dtype=dtype, mode=mode,
        tile_dtype=tile_dtype, target=target,
    )  # fmt: skip

    batch, seq, seq_kv = T.dynamic("batch, seq_len, seq_len_kv")

    @T.macro
    def body(Q, K, W, KScale, Starts, Ends, Out):
        with T.Kernel(T.ceildiv(seq, block_Q), batch, threads=threads) as (bq, bb):
            q_tile, k_tile, acc, acc_heads, w_tile, logits = math_.tiles()
            bounds = T.alloc_local([2], INDEX_DTYPE)
            kb_lo = T.alloc_var(INDEX_DTYPE)
            kb_hi = T.alloc_var(INDEX_DTYPE)
            t0 = bq * block_Q
            shift = seq_kv - seq  # causal alignment: query t sees s <= t + shift

            # The key blocks [kb_lo, kb_hi) that at least one query of this block sees.
            math_.key_blocks(Starts, Ends, bb, t0, seq, seq_kv, shift, bounds)
            kb_lo = bounds[0]
            kb_hi = bounds[1]
            math_.load_queries(Q, W, q_tile, w_tile, bb, t0, seq)

            for step in T.Pipelined(kb_hi - kb_lo, num_stages=num_stages):
                s0 = (kb_lo + step) * block_N
                if cpu:
                    for n, d in T.grid(block_N, dim):
                        k_tile[n, d] = T.if_then_else(s0 + n < seq_kv, math_.load(K[bb, s0 + n, d]), T.float32(0))
                elif element_k:
                    for n, d in T.Parallel(block_N, dim):
                        k_tile[n, d] = T.if_then_else(
                            s0 + n < seq_kv,
                            math_.load(K[bb, T.min(s0 + n, seq_kv - 1), d]),
                            T.cast(0, tile_dtype),
                        )
                else:
                    T.copy(K[bb, s0 : s0 + block_N, :], k_tile)
                math_.head_sum(k_tile, q_tile, acc, acc_heads, w_tile, logits)
                for i, n in alloc.parallel(block_Q, block_N):
                    if t0 + i < seq and s0 + n < seq_kv:
                        Out[bb, t0 + i, s0 + n] = T.if_then_else(
                            math_.visible(Starts, Ends, bb, t0 + i, s0 + n, shift),
                            math_.scaled(logits[n, i], KScale, bb, s0 + n),
                            neg_inf,
                        )

            # Key blocks no query of this block sees: write -inf without touching q or k.
            for kb in T.serial(T.ceildiv(seq_kv, block_N)):
                if kb < kb_lo or kb >= kb_hi:
                    for i, n in alloc.parallel(block_Q, block_N):
                        if t0 + i < seq and kb * block_N + n < seq_kv:
                            Out[bb, t0 + i, kb * block_N + n] = neg_inf

    q_shape = [batch, seq, heads, dim]
    k_shape = [batch, seq_kv, dim]
    w_shape = [batch, seq, heads]
    row_shape = [batch, seq]
    out_shape = [batch, seq, seq_kv]

    def index_scores(Q=None, K=None, W=None, KScale=None, Starts=None, Ends=None, Out=None):
        body(Q, K, W, KScale, Starts, Ends, Out)

    func = dsl.prim_func(
        index_scores,
        f"index_scores_{'fp8' if fp8 else 'bf16'}_{mode}",
        Q=T.Tensor(q_shape, io_dtype),
        K=T.Tensor(k_shape, io_dtype),
        W=T.Tensor(w_shape, ACCUM_DTYPE),
        KScale=T.Tensor([batch, seq_kv], ACCUM_DTYPE) if fp8 else None,
        Starts=None if causal else T.Tensor(row_shape, INDEX_DTYPE),
        Ends=None if causal else T.Tensor(row_shape, INDEX_DTYPE),
        Out=T.Tensor(out_shape, ACCUM_DTYPE),
    )
    return dsl.with_target_pass_configs(func, target)

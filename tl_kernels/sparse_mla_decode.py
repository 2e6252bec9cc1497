"""Sparse MLA decoding over a paged KV cache (bf16 rows or FlashMLA's FP8 layout) as TileLang builders for the C
target, sm_90a and the portable schedule: a split attention kernel and the kernel that combines its splits.

**Attention** (:func:`build`): each thread block owns one query token ``(b, t)``, ``block_h`` heads and one **split**
of the token's slot list: split ``z`` of ``Z`` takes the ``block_k``-entry steps ``[z * per, (z + 1) * per)`` with
``per = ceil(ceil(k / block_k) / Z)``, so a batch of one token still spreads over ``Z`` thread blocks per head block
(flash-decoding). Within its steps it runs the forward kernel's loop: gather the selected cache rows into a shared tile,
``Q . K^T``, the online softmax in the log2 domain (``tl_kernels.sparse_mla_fwd_steps``), ``P . V`` over the first
``d_v`` columns of the same rows. It writes its split's **normalised** float32 output and natural-log ``lse`` (``-inf``
and 0 for a split with nothing valid; NaN and NaN for a split that saw a NaN score, ``+inf`` and NaN for one that saw
a ``+inf`` score, as the forward); the sink is left to the combine. With ``direct`` (one split, one source: a batch
large enough to fill the GPU by itself) the same kernel instead finishes the softmax with the sink as the forward does
and writes the bf16 output and ``lse`` itself: no float32 partials (256 KB per token at V3.2), no combine launch.

* Slots index the cache viewed as ``[num_slots, row]``; an entry is valid iff ``0 <= slot < num_slots`` and its
  position in the row is ``< min(k, topk_length[b, t])``. An invalid entry's tile row is zero and is never read, and
  its score is ``-inf`` (the forward's rules, ``entry_valid`` / ``gather_row``), so Inf/NaN in unwritten slots cannot
  reach the output.
* **FP8 cache** (``kv_format="fp8"``): the rows are FlashMLA's bytes (``dsa.cache.FP8Layout``). The kernel takes the
  same cache memory as three views, ``float8_e4m3fn [num_slots, row_bytes]`` (the NoPE values),
  ``float32 [num_slots, row_bytes / 4]`` (the scales) and ``bfloat16 [num_slots, row_bytes / 2]`` (the RoPE values),
  and dequantises while it gathers: ``fp8 * scale`` (exact in bf16 for power-of-two scales) into the bf16 tile. The
  gather is then a load-convert-store instead of a ``cp.async``.
* **Paged FP8 cache** (``kv_format="fp8_paged"``, FlashMLA's MODEL1 for DeepSeek-V4): a page of ``page_size`` tokens
  holds every token's ``value_bytes`` value bytes (``d_nope`` e4m3, then ``d_rope`` bf16), then every token's
  ``scale_group_bytes`` scale group (one UE8M0 byte per tile: ``2^(byte - 127)``, 255 NaN), and pages are
  ``page_bytes`` apart. Slot ``s`` is token ``s % page_size`` of page ``s // page_size``: its values at ``page_bytes *
  page + offset * value_bytes``, its scales at ``page_size * value_bytes + offset * scale_group_bytes`` of the page.
  The views cut the pages into value rows (``[num_pages * page_bytes / value_bytes, value_bytes]`` e4m3,
  ``[.., value_bytes / 2]`` bf16) and scale groups (``[num_pages * page_bytes / scale_group_bytes,
  scale_group_bytes]`` uint8), so a token's values are one row as in V3.2's view (row ``page * page_bytes /
  value_bytes + offset``; its 16-byte loads stay vectorised) and its scales another.

**Combine** (:func:`build_combine`): one thread block per ``(b, t, head)`` merges the ``P`` splits (of one source or
of two, e.g. a sliding window beside the selected tokens): with ``m = max_p lse_p`` and ``w_p = exp(lse_p - m)``,
``lse = m + log(sum_p w_p)`` and ``out = sum_p w_p out_p / (sum_p w_p + exp(sink - m))``: the sink joins the
denominator only, and a query with nothing valid gets ``out = 0`` and ``lse = -inf``. As in ``torch.logsumexp``, ``m``
is replaced by 0 when it is infinite, so the merge of the parts is the reference's one softmax over all of them for
non-finite parts too: any NaN part (or NaN sink) gives NaN, a ``+inf`` part ``lse = +inf`` and ``out`` NaN.

Batch, query count, slot count, top-k width and split count are symbolic: one compiled kernel serves every shape.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel signature's annotations, which refer to
# closure variables (shapes, dtypes).
import dataclasses
from typing import Any

import tilelang.language as T

from tl_kernels import dsl
from tl_kernels import sparse_mla_fwd as forward
from tl_kernels import decode_cluster_steps as cluster_steps
from tl_kernels.sparse_mla_fwd_steps import (
    ACCUM_DTYPE,
    CUDA_PASS_CONFIGS,
    DATA_DTYPE,
    INDEX_DTYPE,
    LOG2E,
    entry_valid,
    gather_row,
    index_at,
    plain_step_macros,
    softmax_macros,
)

__all__ = [
    "COMBINE_THREADS",
    "KV_FORMATS",
    "KV_FORMAT_BF16",
    "KV_FORMAT_FP8",
    "KV_FORMAT_FP8_PAGED",
    "FP8_FORMATS",
    "FP8_ONLY_FIELDS",
    "MAX_REGISTERS",
    "V32_RESOURCES",
    "Config",
    "build",
    "build_combine",
    "check_config",
    "default_config",
    "fp8_views",
    "resources",
    "smem_bytes",
]

KV_FORMAT_BF16 = "bf16"
"""Cache rows are ``d_qk`` bfloat16 values."""
KV_FORMAT_FP8 = "fp8"
"""Cache rows are FlashMLA's FP8 bytes: ``d_nope`` e4m3 values, ``d_nope / tile`` float32 scales, ``d_rope`` bf16."""
KV_FORMAT_FP8_PAGED = "fp8_paged"
"""FP8 in split pages (FlashMLA's MODEL1): a page's value bytes, then its tokens' UE8M0 scale groups."""
KV_FORMATS = (KV_FORMAT_BF16, KV_FORMAT_FP8, KV_FORMAT_FP8_PAGED)
FP8_FORMATS = (KV_FORMAT_FP8, KV_FORMAT_FP8_PAGED)
FP8_ONLY_FIELDS = ("prefetch", "cluster")
"""Config fields that change only an FP8 cache's kernel: a bf16 cache's build ignores them (launchers clear them)."""
FP8_DTYPE = "float8_e4m3fn"
SCALE_BYTES = 4
ROPE_BYTES = 2
ROW_DTYPE = "int64"
SCALE_CODE_DTYPE = "uint8"
_UE8M0_NAN = 255
_F32_MANTISSA_BITS = 23
_F32_QUIET_NAN_BITS = 0x7FC00000
_F32_TWO_POW_MINUS_127_BITS = 0x00400000  # the subnormal 2^-127: UE8M0 byte 0, which has no normal float32
COMBINE_THREADS = 128
"""Threads of a combine block: 128 output columns at a time (V3.2: four per thread for ``d_v = 512``)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunable schedule of the decode attention kernel: the forward's default schedule (``pipeline="none"``).

    Attributes:
        block_h: query heads per thread block (the M of both GEMMs); 64 on sm_90a.
        block_k: cache rows gathered per step.
        threads: threads per block on CUDA (ignored by the C target).
        prefetch: FP8 caches only (a bf16 cache's gather is a cp.async either way): load step i+1's e4m3 and RoPE
            bytes into registers before step i's GEMMs, and dequantise them into the tile at the start of step i+1,
            so the global loads are in flight while the tensor cores work (``False``: load, convert and store in one
            go at the start of each step, the loads exposed).
        cluster: FP8 on sm_90a (bf16 builds without it): the two head blocks of a query token run as a 2-CTA cluster,
            each dequantises half of every step's rows into both blocks' tiles (``tl_kernels.decode_cluster_steps``):
            every cache row once per token, not once per head block. Needs an even number of head blocks.
    """

    block_h: int = forward.Config.block_h
    block_k: int = forward.Config.block_k
    threads: int = forward.Config.threads
    prefetch: bool = False
    cluster: bool = False


TUNING_SPACE: dict[str, tuple[Any, ...]] = {"block_h": (forward.WGMMA_M,), "block_k": (16, 32), "threads": (256,),
                                            "prefetch": (False, True), "cluster": (False, True)}  # fmt: skip
"""Candidate values per :class:`Config` field on sm_90a (``cluster``: where :func:`check_config` allows it)."""
PORTABLE_TUNING_SPACE: dict[str, tuple[Any, ...]] = {
    "block_h": (32, forward.WGMMA_M),
    "block_k": (16, 32),
    "threads": forward.PORTABLE_THREADS,
}
"""The candidates on the portable schedule (every CUDA architecture but sm_90a)."""


V32_RESOURCES: dict[tuple[str, int, int, int, bool], tuple[int, int]] = {
    (KV_FORMAT_FP8, 64, 32, 256, False): (184, 116992),
    (KV_FORMAT_FP8, 64, 32, 256, True): (198, 117760),
    (KV_FORMAT_BF16, 64, 32, 256, False): (218, 116736),
    # MODEL1 pages (DeepSeek-V4: 128 heads, 512/512, pages of 64). The 448 e4m3 values of 32 rows are 56 bytes per
    # thread, so the prefetch loads 8 bytes at a time (16 at V3.2's 512).
    (KV_FORMAT_FP8_PAGED, 64, 32, 256, True): (252, 106368),
}
"""``(kv_format, block_h, block_k, threads, prefetch) -> (registers per thread, shared memory bytes)`` of the sm_90a
attention kernel at V3.2 widths (128 heads, 576/512, the V3.2 FP8 row) and for MODEL1 pages, as ``ptxas -v``
reports them (the build tier checks every entry against its build), so that the launcher's split rule and the cost
model know the blocks per SM without compiling."""
V32_CLUSTER_RESOURCES: dict[tuple[str, int, int, int, bool], tuple[int, int]] = {
    (KV_FORMAT_FP8, 64, 32, 256, True): (201, 117760),
}  # the same figures for the cluster config (cluster=True), keyed as V32_RESOURCES
MAX_REGISTERS = 255


def resources(kv_format: str, config: Config) -> tuple[int, int]:
    """``(registers per thread, shared memory bytes)`` of the sm_90a attention kernel in ``config``: the build tier's
    figures at V3.2 widths (:data:`V32_RESOURCES`), else an upper bound (255 registers, :func:`smem_bytes`'s tiles at
    V3.2 widths), which never overstates how many blocks an SM holds."""
    key = (kv_format, config.block_h, config.block_k, config.threads, config.prefetch and kv_format in FP8_FORMATS)
    table = V32_CLUSTER_RESOURCES if config.cluster and kv_format in FP8_FORMATS else V32_RESOURCES
    if key in table:
        return table[key]
    static = {"heads": 128, "d_qk": 576, "d_v": 512, "kv_format": kv_format, "d_rope": 64, "tile": 128}
    return MAX_REGISTERS, smem_bytes(static, config)


def _check_pages(static: dict[str, Any], d_nope: int, d_rope: int, tile: int) -> None:
    """The paged FP8 layout's rules: a token's values (e4m3, then bf16 RoPE at an even byte) fit its value bytes, its
    scale bytes its scale group, a page's sections its ``page_bytes``, and the pages and their scale section start
    on whole value rows and scale groups (the views')."""
    page_size, page_bytes = int(static["page_size"]), int(static["page_bytes"])
    value_bytes, group_bytes = int(static["value_bytes"]), int(static["scale_group_bytes"])
    if (
        page_size < 1 or d_nope % ROPE_BYTES or value_bytes % ROPE_BYTES or page_bytes % ROPE_BYTES
        or value_bytes < d_nope + d_rope * ROPE_BYTES or group_bytes < d_nope // tile
        or page_bytes < page_size * (value_bytes + group_bytes) or page_bytes % value_bytes or page_bytes % group_bytes
        or page_size * value_bytes % group_bytes
    ):  # fmt: skip
        raise ValueError(
            f"a paged FP8 cache needs even byte offsets, its sections within a page and pages of whole value rows and "
            f"scale groups, got page_size {page_size}, "
            f"page_bytes {page_bytes}, value_bytes {value_bytes}, scale_group_bytes {group_bytes}"
        )


def _as_forward(config: Config) -> forward.Config:
    return forward.Config(block_h=config.block_h, block_k=config.block_k, threads=config.threads)


def check_config(static: dict[str, Any], config: Config) -> None:
    """Raise ``ValueError`` when ``config`` cannot serve ``static`` (``heads``, ``d_qk``, ``d_v``, ``kv_format``,
    ``d_rope``, ``tile``, for ``"fp8_paged"`` also ``page_size``, ``page_bytes``, ``value_bytes`` and
    ``scale_group_bytes``, optionally ``target``): the forward's rules for its default schedule, plus the FP8
    layout's."""
    kv_format = static.get("kv_format", KV_FORMAT_BF16)
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    if kv_format in FP8_FORMATS:
        d_qk, d_rope, tile = int(static["d_qk"]), int(static["d_rope"]), int(static["tile"])
        d_nope = d_qk - d_rope
        if not 0 <= d_rope < d_qk or tile < 1 or d_nope % tile:
            raise ValueError(f"an FP8 cache needs 0 <= d_rope < d_qk and tile | d_qk - d_rope, got {d_qk}, {d_rope}, {tile}")
    if kv_format == KV_FORMAT_FP8_PAGED:
        _check_pages(static, d_nope, d_rope, tile)
    if config.cluster and kv_format in FP8_FORMATS:
        cluster_steps.check(static, config.block_h, config.block_k)
    forward.check_config(static, _as_forward(config))


def default_config(static: dict[str, Any]) -> Config:
    """The forward's default config for the same target and widths (see ``tl_kernels.sparse_mla_fwd``), with the
    FP8 prefetch on sm_90a (until a GPU record decides, the rule is the generated code's: it issues step i+1's
    16-byte loads before step i's GEMMs, with one barrier fewer per step, no spills and the same blocks per SM;
    :data:`V32_RESOURCES`). The portable schedule keeps the plain gather (its builds are not checked for it)."""
    chosen = forward.default_config(static)
    prefetch = static.get("kv_format") in FP8_FORMATS and dsl.is_hopper(dsl.static_target(static))
    return Config(block_h=chosen.block_h, block_k=chosen.block_k, threads=chosen.threads, prefetch=prefetch)


def smem_bytes(static: dict[str, Any], config: Config) -> int:
    """Shared memory of the CUDA kernel: the forward's default schedule's tiles (an upper estimate), plus the FP8
    gather's int64 row numbers (two steps' with ``prefetch``) and, for paged FP8 with ``prefetch``, a step's decoded
    float32 scales."""
    rows = 0
    if static.get("kv_format") in FP8_FORMATS:
        rows = config.block_k * 8 * (2 if config.prefetch else 1)
    if static.get("kv_format") == KV_FORMAT_FP8_PAGED and config.prefetch:
        rows += config.block_k * (int(static["d_qk"]) - int(static["d_rope"])) // int(static["tile"]) * 4
    return forward.smem_bytes(static, _as_forward(config)) + rows


def fp8_views(d_qk: int, d_rope: int, tile: int) -> tuple[int, int, int]:
    """``(row_bytes, scale_col, rope_col)`` of an FP8 cache row: its size in bytes, the column of its first scale in
    the float32 view and of its first RoPE value in the bfloat16 view (``dsa.cache.FP8Layout``'s byte layout)."""
    d_nope = d_qk - d_rope
    scale_offset = d_nope
    rope_offset = scale_offset + (d_nope // tile) * SCALE_BYTES
    return rope_offset + d_rope * ROPE_BYTES, scale_offset // SCALE_BYTES, rope_offset // ROPE_BYTES


def build(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    kv_format: str = KV_FORMAT_BF16,
    d_rope: int = 0,
    tile: int = 1,
    page_size: int = 1,
    page_bytes: int = 0,
    value_bytes: int = 0,
    scale_group_bytes: int = 0,
    block_h: int = Config.block_h,
    block_k: int = Config.block_k,
    threads: int = Config.threads,
    prefetch: bool = Config.prefetch,
    cluster: bool = Config.cluster,
    direct: bool = False,
    target: dsl.Target = dsl.HOPPER_TARGET,
) -> Any:
    """The split decode attention kernel for ``heads`` query heads of width ``d_qk`` and value width ``d_v``; with
    ``direct``, the one-split kernel that writes the decode output itself.

    Kernel arguments (B, s_q, num_slots, k and Z symbolic; bf16 travels as ``uint16`` and e4m3 as ``uint8`` on the C
    target):
        q: ``[B, s_q, heads, d_qk]`` bfloat16;
        the cache: ``kv_format="bf16"``: ``kv [num_slots, d_qk]`` bfloat16; ``"fp8"``: three views of the same bytes,
        ``kv_fp8 [num_slots, row_bytes]`` float8_e4m3fn, ``kv_scale [num_slots, row_bytes / 4]`` float32,
        ``kv_rope [num_slots, row_bytes / 2]`` bfloat16 (:func:`fp8_views`); ``"fp8_paged"``: three views of the
        pages, ``[value_rows, value_bytes]`` float8_e4m3fn, ``[scale_rows, scale_group_bytes]`` uint8 (the scale
        codes), ``[value_rows, value_bytes / 2]`` bfloat16, with ``value_rows = num_pages * page_bytes /
        value_bytes``, ``scale_rows = num_pages * page_bytes / scale_group_bytes`` and ``num_slots = num_pages *
        page_size``;
        indices: ``[B, s_q, k]`` int32 slots; topk_length: ``[B, s_q]`` int32 (entries past it are invalid);
        sm_scale: float32;
        out_partial: ``[Z, B, s_q, heads, d_v]`` float32, each split's normalised output (written);
        lse_partial: ``[Z, B, s_q, heads]`` float32, each split's natural-log lse, ``-inf`` when empty (written).
        With ``direct`` (one split, one source: no partial round trip, no combine) the last two are instead
        attn_sink: ``[heads]`` float32 (``-inf`` for none: it then adds nothing to the denominator);
        out: ``[B, s_q, heads, d_v]`` bfloat16 and lse: ``[B, s_q, heads]`` float32, the sink excluded (written), as
        :func:`build_combine` writes them from one part.
    """
    static = {
        "heads": heads, "d_qk": d_qk, "d_v": d_v, "kv_format": kv_format, "d_rope": d_rope, "tile": tile,
        "page_size": page_size, "page_bytes": page_bytes, "value_bytes": value_bytes,
        "scale_group_bytes": scale_group_bytes, "target": target,
    }  # fmt: skip
    config = Config(block_h=block_h, block_k=block_k, threads=threads, prefetch=prefetch, cluster=cluster)
    check_config(static, config)
    cpu = dsl.is_cpu(target)
    alloc = dsl.allocators(target)
    data_storage = dsl.storage_dtype(DATA_DTYPE, target)
    fp8_storage = dsl.storage_dtype(FP8_DTYPE, target)
    tile_dtype = ACCUM_DTYPE if cpu else DATA_DTYPE
    neg_inf = -T.infinity(ACCUM_DTYPE)
    head_blocks = (heads + block_h - 1) // block_h
    d_nope = d_qk - d_rope
    row_bytes, scale_col, rope_col = fp8_views(d_qk, d_rope, tile) if kv_format == KV_FORMAT_FP8 else (1, 0, 0)
    paged = kv_format == KV_FORMAT_FP8_PAGED

    batch, seq_q = T.dynamic("batch"), T.dynamic("seq_len")
    if paged:
        value_rows, scale_rows = T.dynamic("value_rows"), T.dynamic("scale_rows")
        rows_per_page, groups_per_page = page_bytes // value_bytes, page_bytes // scale_group_bytes  # checked >= 1
        scales_first = page_size * value_bytes // scale_group_bytes  # the page's first scale group
        num_slots = value_rows // rows_per_page * page_size
    else:
        num_slots = T.dynamic("seq_len_kv")
    width = T.dynamic("topk")
    splits = 1 if direct else T.dynamic("splits")
    # The direct kernel's sink always joins (a -inf sink adds exp2(-inf) = 0): one kernel with and without a sink.
    online_softmax, finalize = softmax_macros(alloc.parallel, block_h, block_k, heads, direct)

    def load(value: Any) -> Any:
        return dsl.load_tile(value, DATA_DTYPE, target)

    def dequant(code: Any, scale: Any) -> Any:
        value = dsl.load_f32(code, FP8_DTYPE, target) * scale
        return value if cpu else T.Cast(DATA_DTYPE, value)

    # Where a cache row's bytes are (row: an int64 slot >= 0): in its own row of the views (V3.2), or in its page's
    # sections (paged). These are the only lines that know the byte layout; the gather and the prefetch share them.
    def nope_at(KVA: Any, row: Any, d: Any) -> Any:
        if paged:
            return KVA[row // page_size * rows_per_page + row % page_size, d]
        return KVA[row, d]

    def scale_at(KVB: Any, row: Any, d: Any) -> Any:
        if paged:
            return ue8m0_scale(KVB[row // page_size * groups_per_page + scales_first + row % page_size, d // tile])
        return KVB[row, scale_col + d // tile]

    def rope_at(KVC: Any, row: Any, d: Any) -> Any:
        if paged:
            return KVC[row // page_size * rows_per_page + row % page_size, d_nope // ROPE_BYTES + d]
        return KVC[row, rope_col + d]

    open_rows, attend_step = plain_step_macros(
        alloc, online_softmax, heads=heads, block_h=block_h, block_k=block_k, d_qk=d_qk, d_v=d_v,
        tile_dtype=tile_dtype, load=load,
    )  # fmt: skip

    fp8 = kv_format in FP8_FORMATS
    prefetched = fp8 and prefetch
    cl = cluster_steps.steps(block_k=block_k, d_qk=d_qk, enabled=fp8 and cluster)
    part_k, rows_from = cl.part_k, cl.first_row  # a block's rows of a step: half of them in a cluster

    @T.macro
    def gather(KVA, KVB, KVC, Indices, kv_s, rows_s, b, s, step, limit):  # noqa: ANN001, ANN202
        if fp8:
            # FP8 (KVA e4m3 bytes, KVB scales, KVC RoPE values): dequantise while gathering. The step's cache rows are
            # looked up once (int64, -1 for an invalid entry, which the selects never read), not once per element.
            r0 = rows_from()
            for j in alloc.parallel(part_k):
                rows_s[j] = gather_row(Indices, b, s, step * block_k + r0 + j, width, limit, num_slots)
            for j, d in alloc.parallel(part_k, d_nope):
                row = T.max(rows_s[j], 0)
                kv_s[r0 + j, d] = T.if_then_else(
                    rows_s[j] >= 0, dequant(nope_at(KVA, row, d), scale_at(KVB, row, d)), 0
                )
            for j, d in alloc.parallel(part_k, d_rope):
                kv_s[r0 + j, d_nope + d] = T.if_then_else(
                    rows_s[j] >= 0, load(rope_at(KVC, T.max(rows_s[j], 0), d)), 0
                )
        else:
            # bf16 rows in KVA: the forward's guarded copy, which zero-fills invalid rows (cp.async on CUDA).
            for j, d in alloc.parallel(block_k, d_qk):
                kv_s[j, d] = load(KVA[gather_row(Indices, b, s, step * block_k + j, width, limit, num_slots), d])

    @T.macro
    def fetch(KVA, KVC, Indices, raw_f, rope_f, rows_s, b, s, step, limit, slot):  # noqa: ANN001, ANN202
        # Prefetch (FP8): the step's cache rows into row buffer `slot`, then its e4m3 and RoPE bytes into registers
        # (zeros for an invalid entry, whose row is never read). Nothing reads the registers until the next unpack,
        # so the loads stay in flight through the GEMMs issued after this.
        for j in alloc.parallel(part_k):
            rows_s[slot, j] = gather_row(Indices, b, s, step * block_k + rows_from() + j, width, limit, num_slots)
        for j, d in alloc.parallel(part_k, d_nope):
            raw_f[j, d] = T.if_then_else(
                rows_s[slot, j] >= 0, nope_at(KVA, T.max(rows_s[slot, j], 0), d), T.Cast(fp8_storage, 0)
            )
        for j, d in alloc.parallel(part_k, d_rope):
            rope_f[j, d] = T.if_then_else(
                rows_s[slot, j] >= 0, rope_at(KVC, T.max(rows_s[slot, j], 0), d), T.Cast(data_storage, 0)
            )

    @T.macro
    def unpack(KVB, raw_f, rope_f, kv_s, rows_s, slot):  # noqa: ANN001, ANN202
        # The prefetched bytes into the bf16 tile: values times their tile's scale (one 4-byte load from the row's
        # own cache line), RoPE values as they are.
        r0 = rows_from()
        for j, d in alloc.parallel(part_k, d_nope):
            kv_s[r0 + j, d] = T.if_then_else(
                rows_s[slot, j] >= 0, dequant(raw_f[j, d], scale_at(KVB, T.max(rows_s[slot, j], 0), d)), 0
            )
        for j, d in alloc.parallel(part_k, d_rope):
            kv_s[r0 + j, d_nope + d] = load(rope_f[j, d])

    @T.macro
    def unpack_paged(KVB, raw_f, rope_f, kv_s, rows_s, slot):  # noqa: ANN001, ANN202
        # Paged FP8: the step's UE8M0 scales decoded once per row and tile into shared float32 first, so that the
        # values dequantise as V3.2's do (times a float32 scale: converted in pairs on sm_90a), not with a bit decode
        # per element (which TileLang 0.1.15 did not vectorise).
        r0 = rows_from()
        scale_s = alloc.shared([part_k, d_nope // tile], ACCUM_DTYPE)
        for j, t in alloc.parallel(part_k, d_nope // tile):
            scale_s[j, t] = scale_at(KVB, T.max(rows_s[slot, j], 0), t * tile)
        for j, d in alloc.parallel(part_k, d_nope):
            kv_s[r0 + j, d] = T.if_then_else(rows_s[slot, j] >= 0, dequant(raw_f[j, d], scale_s[j, d // tile]), 0)
        for j, d in alloc.parallel(part_k, d_rope):
            kv_s[r0 + j, d_nope + d] = load(rope_f[j, d])

    if paged:
        unpack = unpack_paged  # noqa: F811 (the prefetch's unpack for paged caches; V3.2's is generated unchanged)

    @T.macro
    def attend(Q, KVA, KVB, KVC, Indices, TopkLength, sm_scale, AttnSink, Out, Lse, bx, b, z):  # noqa: ANN001, ANN202
        s = bx // head_blocks
        h0 = (bx % head_blocks) * block_h
        scale_log2 = sm_scale * T.float32(LOG2E)
        limit = T.min(TopkLength[b, s], width)
        q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum = open_rows(Q, b, s, h0)
        rows_s = alloc.shared([part_k if fp8 else 1], ROW_DTYPE)  # the FP8 gather's cache rows of one step

        # This split's steps: the row's steps are dealt out by position (a short topk_length row leaves the last
        # splits empty), so every split's bounds follow from the row alone.
        per_split = T.ceildiv(T.ceildiv(width, block_k), splits)
        first = z * per_split
        last = T.min(first + per_split, T.ceildiv(limit, block_k))
        steps = T.max(last - first, 0)
        cl.open_exchange()
        if prefetched:
            # Two row buffers: step i's rows stay readable (its scales) while step i+1's are looked up.
            rows2_s = alloc.shared([2, part_k], ROW_DTYPE)
            raw_f = alloc.fragment([part_k, d_nope], fp8_storage)
            rope_f = alloc.fragment([part_k, d_rope], data_storage)
            if steps > 0:
                fetch(KVA, KVC, Indices, raw_f, rope_f, rows2_s, b, s, first, limit, 0)
        # One loop body for both gathers (`prefetched` is static): this step's rows into kv_s (and, prefetched, the
        # next step's bytes in flight), this block's half shared with the cluster peer, the step's attention.
        for i in T.serial(steps) if prefetched else T.Pipelined(steps, num_stages=1):
            if prefetched:
                unpack(KVB, raw_f, rope_f, kv_s, rows2_s, i % 2)
                if i + 1 < steps:
                    fetch(KVA, KVC, Indices, raw_f, rope_f, rows2_s, b, s, first + i + 1, limit, (i + 1) % 2)
            else:
                gather(KVA, KVB, KVC, Indices, kv_s, rows_s, b, s, first + i, limit)
            cl.share_half(kv_s)
            attend_step(
                q_s, kv_s, p_s, acc_s, acc_o, m_i, m_prev, m_safe, alpha, l_i, row_sum, Indices, b, s, first + i,
                width, limit, num_slots, scale_log2,
            )  # fmt: skip
            cl.release_tile()
        cl.close_exchange()

        # alpha: 1 / l (0 for an empty split, whose output is then 0); row_sum: the split's lse (-inf when empty).
        # Split kernels leave the sink to the combine (finalize's sink argument is never read); the direct kernel
        # adds it here, as the forward does.
        finalize(m_i, m_safe, l_i, alpha, row_sum, AttnSink if direct else l_i, h0)
        for h, d in alloc.parallel(block_h, d_v):
            if h0 + h < heads:
                if direct:
                    Out[b, s, h0 + h, d] = dsl.store_bf16(acc_o[h, d] * alpha[h], target)
                else:
                    Out[z, b, s, h0 + h, d] = acc_o[h, d] * alpha[h]
        for h in alloc.parallel(block_h):
            if h0 + h < heads:
                if direct:
                    Lse[b, s, h0 + h] = row_sum[h]
                else:
                    Lse[z, b, s, h0 + h] = row_sum[h]

    # The bf16 cache is one tensor (KV); the FP8 one three views of the same bytes (KVFp8, KVScale, KVRope).
    # Split kernels write OutPartial/LsePartial; the direct kernel reads AttnSink and writes Out/Lse.
    def main(
        Q=None, KV=None, KVFp8=None, KVScale=None, KVRope=None, Indices=None, TopkLength=None, sm_scale=None,
        AttnSink=None, OutPartial=None, LsePartial=None, Out=None, Lse=None,
    ):  # fmt: skip
        with T.Kernel(seq_q * head_blocks, batch, splits, threads=threads, **cl.launch) as (bx, by, bz):
            attend(
                Q, KVFp8 if fp8 else KV, KVScale if fp8 else KV, KVRope if fp8 else KV, Indices, TopkLength, sm_scale,
                AttnSink, Out if direct else OutPartial, Lse if direct else LsePartial, bx, by, bz,
            )  # fmt: skip

    if paged:
        fp8_view, scale_view = [value_rows, value_bytes], [scale_rows, scale_group_bytes]
        rope_view = [value_rows, value_bytes // ROPE_BYTES]
    else:
        fp8_view, scale_view = [num_slots, row_bytes], [num_slots, row_bytes // SCALE_BYTES]
        rope_view = [num_slots, row_bytes // ROPE_BYTES]
    main = dsl.prim_func(
        main,
        "main",
        Q=T.Tensor([batch, seq_q, heads, d_qk], data_storage),
        KV=None if fp8 else T.Tensor([num_slots, d_qk], data_storage),
        KVFp8=T.Tensor(fp8_view, fp8_storage) if fp8 else None,
        KVScale=T.Tensor(scale_view, SCALE_CODE_DTYPE if paged else ACCUM_DTYPE) if fp8 else None,
        KVRope=T.Tensor(rope_view, data_storage) if fp8 else None,
        Indices=T.Tensor([batch, seq_q, width], INDEX_DTYPE),
        TopkLength=T.Tensor([batch, seq_q], INDEX_DTYPE),
        sm_scale=T.float32,
        AttnSink=T.Tensor([heads], ACCUM_DTYPE) if direct else None,
        OutPartial=None if direct else T.Tensor([splits, batch, seq_q, heads, d_v], ACCUM_DTYPE),
        LsePartial=None if direct else T.Tensor([splits, batch, seq_q, heads], ACCUM_DTYPE),
        Out=T.Tensor([batch, seq_q, heads, d_v], data_storage) if direct else None,
        Lse=T.Tensor([batch, seq_q, heads], ACCUM_DTYPE) if direct else None,
    )
    return dsl.with_target_pass_configs(main, target, CUDA_PASS_CONFIGS)


def ue8m0_scale(code: Any) -> Any:
    """float32 ``2^(code - 127)`` of a UE8M0 scale byte (a ``uint8`` expression), bit for bit
    ``dsa.kv_format``'s decoding: the byte is the float32's exponent field; 255 is NaN and 0 the subnormal
    ``2^-127``."""
    bits = T.Cast("uint32", code)
    return T.reinterpret(
        T.if_then_else(
            bits == T.uint32(_UE8M0_NAN),
            T.uint32(_F32_QUIET_NAN_BITS),
            T.if_then_else(
                bits == T.uint32(0), T.uint32(_F32_TWO_POW_MINUS_127_BITS), T.shift_left(bits, T.uint32(_F32_MANTISSA_BITS))
            ),
        ),
        "float32",
    )


def build_combine(*, heads: int, d_v: int, has_sink: bool = False, target: dsl.Target = dsl.HOPPER_TARGET) -> Any:
    """The kernel that merges split (and extra-source) results into the decode output.

    Kernel arguments (P, B and s_q symbolic):
        out_partial: ``[P, B, s_q, heads, d_v]`` float32 normalised partial outputs;
        lse_partial: ``[P, B, s_q, heads]`` float32 natural-log partial lse (``-inf`` for an empty part);
        attn_sink: ``[heads]`` float32 with ``has_sink``, else a ``[1]`` placeholder;
        out: ``[B, s_q, heads, d_v]`` bfloat16 (written); lse: ``[B, s_q, heads]`` float32, the sink excluded
        (written).
    """
    if heads < 1 or d_v < 1:
        raise ValueError(f"heads and d_v must be >= 1, got {heads} and {d_v}")
    alloc = dsl.allocators(target)
    data_storage = dsl.storage_dtype(DATA_DTYPE, target)
    neg_inf = -T.infinity(ACCUM_DTYPE)
    pos_inf = T.infinity(ACCUM_DTYPE)
    parts, batch, seq_q = T.dynamic("parts"), T.dynamic("batch"), T.dynamic("seq_len")

    @T.prim_func
    def main(
        OutPartial: T.Tensor([parts, batch, seq_q, heads, d_v], ACCUM_DTYPE),  # type: ignore[valid-type]
        LsePartial: T.Tensor([parts, batch, seq_q, heads], ACCUM_DTYPE),  # type: ignore[valid-type]
        AttnSink: T.Tensor([heads] if has_sink else [1], ACCUM_DTYPE),  # type: ignore[valid-type]
        Out: T.Tensor([batch, seq_q, heads, d_v], data_storage),  # type: ignore[valid-type]
        Lse: T.Tensor([batch, seq_q, heads], ACCUM_DTYPE),  # type: ignore[valid-type]
    ):
        with T.Kernel(seq_q * heads, batch, threads=COMBINE_THREADS) as (bx, by):
            s = bx // heads
            h = bx % heads
            # stats: the shift (the maximum part lse, or 0 when that is +-inf: torch.logsumexp's rule), the sum of
            # weights, 1 / denominator. A part's lse is NaN (its output NaN) when it saw a NaN score and +inf (output
            # NaN) when it saw a +inf one; the union of the parts must give the same (the reference is one softmax
            # over every part's entries). The shift keeps them apart: a +inf part adds exp(inf - 0) = +inf to the
            # sum (not exp(inf - inf) = NaN), and a NaN part adds NaN whether or not T.max (fmaxf on CUDA, which drops
            # NaN) kept it. An empty part (-inf) weighs exp(-inf - shift) = 0.
            stats = alloc.local([3], ACCUM_DTYPE)
            stats[0] = neg_inf
            for p in T.serial(parts):
                stats[0] = T.max(stats[0], LsePartial[p, by, s, h])
            stats[0] = T.if_then_else(T.Or(stats[0] == neg_inf, stats[0] == pos_inf), T.float32(0), stats[0])
            stats[1] = 0
            for p in T.serial(parts):
                stats[1] = stats[1] + T.exp(LsePartial[p, by, s, h] - stats[0])
            if has_sink:
                stats[2] = stats[1] + T.exp(AttnSink[h] - stats[0])
            else:
                stats[2] = stats[1]
            # Only a zero denominator (nothing valid, no sink mass: output 0) is special; a NaN one (a NaN part or
            # sink) stays NaN, an infinite one gives 0 (times a NaN sum where a part was +inf).
            stats[2] = T.if_then_else(stats[2] == 0, T.float32(0), 1.0 / stats[2])
            acc = alloc.fragment([d_v], ACCUM_DTYPE)
            weight = alloc.local([1], ACCUM_DTYPE)
            for d in alloc.parallel(d_v):
                acc[d] = 0
            for p in T.serial(parts):
                weight[0] = T.exp(LsePartial[p, by, s, h] - stats[0])
                for d in alloc.parallel(d_v):
                    acc[d] = acc[d] + weight[0] * OutPartial[p, by, s, h, d]
            for d in alloc.parallel(d_v):
                Out[by, s, h, d] = dsl.store_bf16(acc[d] * stats[2], target)
            # A zero sum (every part empty) is -inf; NaN and +inf sums give NaN and +inf (log(sum) + 0).
            Lse[by, s, h] = T.if_then_else(stats[1] == 0, neg_inf, T.log(stats[1]) + stats[0])

    return main

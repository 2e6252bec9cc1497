"""A cost model of the decode kernels (and a roofline of the others), printed by ``dsa-bench`` beside every case.

No GPU has run these kernels, so this module says what a case *should* cost on a SKU and from what: FLOPs, the bytes
that move through DRAM, the cache rows dequantised, the thread blocks launched and how many waves they make, and two
times:

* the **roofline** ``max(DRAM bytes / bandwidth, FLOPs / peak bf16 tensor rate)`` from the datasheet
  (``autotune.lookup.sku.PERF_TABLE``);
* the **model**: per pass (the attention kernel, then the combine; the selection's split kernel, then each level
  of its merge), ``max(DRAM time, cycles of the busiest SM / sustained clock)``, the passes added. An SM's cycles
  are its tensor-core cycles (``block_h (d_qk + d_v) 2 / (FLOP per SM-cycle)`` per row and head block) **plus** its
  CUDA-core cycles (dequantisation, softmax, rescale, selection), at the per-value costs FlashMLA's FP8 deep dive
  gives for H800 (``docs/20250929-hopper-fp8-sparse-deep-dive.md``: 1/64 cycle to convert e4m3 to half, 1/64 half to
  float32, 1/16 float32 to bf16, 1/256 for the scale multiply, per value per SM). Adding rather than overlapping the
  two is what FlashMLA's own measurements support: with ``max(tensor, CUDA cores)`` these counts make both of its FP8
  decode kernels (410 and 250 TFLOP/s at the V3.2 point) 1.8x faster than it measured them; with the sum the model
  gives 403 and 300 TFLOP/s (``tests/test_cost_model.py``). The clock is the datasheet's scaled by
  :data:`SUSTAINED_CLOCK_SHARE` (FlashMLA saw its H800 throttle to about 1600 of 1830 MHz under load).

Blocks are spread evenly: the busiest SM holds ``ceil(blocks / SMs)`` of them, so a grid of 2.4 waves costs 3 waves
of work (a persistent schedule, FlashMLA's, has no tail). Blocks per SM come from the config's registers, threads and
shared memory (``autotune.lookup.sku.blocks_per_sm``).

Byte counts read the layouts from ``dsa.kv_format`` (656 bytes per V3.2 FP8 row, 132 per FP8 index key). Estimates
are ±30 %: launch latency, the prologue and epilogue of each block (but for the selection merge's top-k rows,
:data:`TOPK_ROW_CYCLES`) and L2 hits are left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from autotune.lookup import sku
from benchmarks import cases as case_data
from dsa import kv_format
from dsa.launch import index_topk as selection_launch
from dsa.launch import index_topk_split as selection_split
from dsa.launch import sparse_mla_decode as decode_launch
from tl_kernels import decode_cluster_steps as cluster_steps
from tl_kernels import dsl
from tl_kernels import index_topk as selection_kernels
from tl_kernels import indexer as indexer_kernels
from tl_kernels import sparse_mla_decode as decode_kernels

__all__ = [
    "CVT_FLOAT_TO_BF16",
    "CVT_FP8_TO_HALF",
    "CVT_HALF_TO_FLOAT",
    "DEFAULT_SKU",
    "MODELLED_PROVIDERS",
    "FP32_OP",
    "MUFU_OP",
    "SCALE_MULTIPLY",
    "SUSTAINED_CLOCK_SHARE",
    "DecodeSchedule",
    "Estimate",
    "case_estimate",
    "dsa_decode_schedule",
    "flashmla_decode_schedule",
    "key_row_memory_ops",
    "merge_estimate",
    "roofline",
    "selection_estimate",
    "sparse_mla_decode_estimate",
    "v4_flashmla_decode_estimate",
]

MODELLED_PROVIDERS: tuple[str, ...] = ("dsa", "flashmla")
"""Whose schedules the model knows: ours, and FlashMLA's sparse FP8 decode (to check the model against it)."""
DEFAULT_SKU = "h800"
"""The SKU a dry run estimates for (FlashMLA's published decode numbers are H800's)."""
SUSTAINED_CLOCK_SHARE = 1600.0 / 1830.0
"""The clock under sustained tensor load as a share of the datasheet's (FlashMLA's new-kernel deep dive: its H800
throttled to about 1600 MHz, 865 of 989 TFLOP/s)."""

# CUDA-core issue costs, SM-cycles per value (FlashMLA's FP8 deep dive, from NVIDIA's throughput table).
CVT_FP8_TO_HALF = 1 / 64
CVT_HALF_TO_FLOAT = 1 / 64
CVT_FLOAT_TO_BF16 = 1 / 16
SCALE_MULTIPLY = 1 / 256
FP32_OP = 1 / 128
"""An FP32 add, multiply or FMA (128 lanes per SM)."""
MUFU_OP = 1 / 16
"""An ``ex2`` on the special-function units (16 per SM per cycle)."""
LSU_OP = 1 / 32
"""A load or store of one thread (32 load/store lanes per SM), whatever its width: 1 or 16 bytes."""
DEQUANT_CHAIN = CVT_FP8_TO_HALF + CVT_HALF_TO_FLOAT + CVT_FLOAT_TO_BF16 + SCALE_MULTIPLY
"""e4m3 -> half -> float32 -> bf16 and the scale: ~0.098 cycles a value, 50 per V3.2 row (Hopper has no direct e4m3
to bf16 conversion)."""
SOFTMAX_FP32_OPS = 4
"""FP32 operations per score besides its ``ex2``: scale, running max, subtract, running sum."""
SELECT_OPS_PER_KEY = 8
"""CUDA-core operations the selection spends per scored key beyond its heads' ReLU and weighted sum (the radix
select's histogram and compaction passes); the split selection's merge (the top-k kernel) spends as many per
candidate."""
TOPK_ROW_CYCLES = 1500
"""Fixed cycles of one top-k row (``tl_kernels.topk``, a 1024-thread block): about three radix rounds, each clearing
2048 bins and scanning them in 11 barrier-separated steps. Counted for the merge only, whose rows are few and short
enough for it to matter; a guess until a GPU record."""
_BF16_BYTES, _F32_BYTES, _I32_BYTES = 2, 4, 4
_FP8_RATE = 2  # Hopper's FP8 tensor rate is twice its bf16 rate


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one call should cost on a SKU.

    Attributes:
        flops: useful floating-point operations.
        dram_bytes: bytes through DRAM, every pass (partials written and read back included).
        rows_dequantised: FP8 cache rows converted to bf16 (0 for bf16 caches and for the roofline-only kernels).
        blocks: thread blocks of the main kernel (0: not modelled). blocks_per_sm: of its config (0: not modelled).
        waves: ``blocks / (SMs * blocks_per_sm)`` (0: not modelled).
        roofline_s: ``max(dram_bytes / bandwidth, flops / peak bf16 rate)``.
        model_s: the passes' ``max(DRAM time, busiest SM's cycles / sustained clock)``, added.
        bound: what bounds the model's main pass: ``dram``, ``sm`` (tensor + CUDA cores) or ``roofline``.
    """

    flops: float
    dram_bytes: float
    rows_dequantised: int
    blocks: int
    blocks_per_sm: int
    waves: float
    roofline_s: float
    model_s: float
    bound: str


@dataclasses.dataclass(frozen=True)
class DecodeSchedule:
    """What the attention model needs of a decode schedule.

    Attributes:
        block_h: heads per block (the GEMMs' M). block_k: cache rows per step (the softmax rescales once a step).
        heads_per_dequant: heads that share one dequantised tile (``block_h``: every head block dequantises its rows;
            128: FlashMLA's two-CTA crossover).
        blocks_per_sm: from the config's registers, threads and shared memory.
        persistent: blocks loop over work (no wave tail).
        partials: every split, even a lone one, writes float32 partials that a combine pass reads back.
        dequant_cycles: CUDA-core cycles per dequantised value.
    """

    block_h: int
    block_k: int
    heads_per_dequant: int
    blocks_per_sm: int
    persistent: bool = False
    partials: bool = True
    dequant_cycles: float = DEQUANT_CHAIN


def flashmla_decode_schedule() -> DecodeSchedule:
    """FlashMLA's sparse FP8 decode on Hopper: 64 heads a CTA, 64 rows a step, one CTA per SM, each row dequantised
    once for both head halves (the crossover), a persistent tile scheduler."""
    return DecodeSchedule(block_h=64, block_k=64, heads_per_dequant=128, blocks_per_sm=1, persistent=True,
                          partials=False)  # fmt: skip


def dsa_decode_schedule(config: decode_kernels.Config | None = None, kv_format_name: str = "fp8") -> DecodeSchedule:
    """Our decode kernel in ``config`` (default: the default config) at V3.2 widths: its blocks per SM from the
    registers and shared memory the build tier measured (``tl_kernels.sparse_mla_decode.resources``); a lone split
    writes the output itself (no partials). With ``cluster`` the two head blocks of a token share each row's
    dequantisation (``tl_kernels.decode_cluster_steps``); the cluster barriers of each step are not modelled."""
    config = config or decode_kernels.default_config({"kv_format": kv_format_name})
    registers, smem = decode_kernels.resources(kv_format_name, config)
    per_sm = sku.blocks_per_sm(registers=registers, threads=config.threads, smem_bytes=smem)
    sharing = cluster_steps.CLUSTER_SIZE if config.cluster else 1
    return DecodeSchedule(block_h=config.block_h, block_k=config.block_k, heads_per_dequant=config.block_h * sharing,
                          blocks_per_sm=per_sm, partials=False)  # fmt: skip


def _sustained_hz(spec: sku.PerfSpec) -> float:
    return spec.clock_mhz * 1e6 * SUSTAINED_CLOCK_SHARE


def _dram_s(nbytes: float, spec: sku.PerfSpec) -> float:
    return nbytes / (spec.dram_gbps * 1e9)


def _busiest_sm_s(total_cycles: float, blocks: int, spec: sku.PerfSpec, persistent: bool) -> float:
    """Seconds of the busiest SM when ``blocks`` equal blocks share ``total_cycles``."""
    if blocks < 1:
        return 0.0
    share = 1 / spec.sm_count if persistent else math.ceil(blocks / spec.sm_count) / blocks
    return total_cycles * share / _sustained_hz(spec)


def roofline(flops: float, nbytes: float, spec: sku.PerfSpec, *, fp8: bool = False) -> float:
    """``max(bytes / bandwidth, flops / peak)`` in seconds (``fp8``: Hopper's doubled FP8 tensor rate)."""
    peak = spec.bf16_tflops * 1e12 * (_FP8_RATE if fp8 else 1)
    return max(_dram_s(nbytes, spec), flops / peak)


def sparse_mla_decode_estimate(
    *, batch: int, s_q: int, heads: int, topk: int, d_qk: int, d_v: int, layout: kv_format.FP8Layout | None,
    spec: sku.PerfSpec, schedule: DecodeSchedule, splits: int = 1,
) -> Estimate:  # fmt: skip
    """Sparse MLA decode of ``batch x s_q`` query tokens, ``heads`` heads, ``topk`` rows each, over a cache in
    ``layout`` (None: bf16 rows), split ``splits`` ways, on ``spec`` under ``schedule``.

    DRAM: each token's rows once (its other head blocks hit L2), ``q``, the indices, ``out`` and ``lse``; with
    partials, every split's float32 ``out`` and ``lse`` written, then read by the combine pass (which writes ``out``).
    """
    tokens = batch * s_q
    head_blocks = math.ceil(heads / schedule.block_h)
    row_bytes = layout.bytes_per_token if layout is not None else d_qk * _BF16_BYTES
    flops = 2.0 * tokens * heads * topk * (d_qk + d_v)
    rows_dequantised = tokens * topk * math.ceil(heads / schedule.heads_per_dequant) if layout is not None else 0
    d_nope = layout.d_nope if layout is not None else 0
    # Per (row, head block): both GEMMs on the padded heads, the softmax on every score, the rescale once a step.
    mma = schedule.block_h * (d_qk + d_v) * 2 / spec.mma_flops_per_cycle
    softmax = schedule.block_h * (MUFU_OP + SOFTMAX_FP32_OPS * FP32_OP + CVT_FLOAT_TO_BF16)
    rescale = schedule.block_h * d_v * FP32_OP / schedule.block_k
    dequant = rows_dequantised * d_nope * schedule.dequant_cycles
    cycles = tokens * topk * head_blocks * (mma + softmax + rescale) + dequant
    # A persistent schedule launches one block per slot and deals the work (split as it needs) out to them.
    blocks = spec.sm_count * schedule.blocks_per_sm if schedule.persistent else tokens * head_blocks * splits
    reads = tokens * (topk * (row_bytes + _I32_BYTES) + heads * d_qk * _BF16_BYTES)
    final = tokens * heads * (d_v * _BF16_BYTES + _F32_BYTES)
    partial = splits * tokens * heads * (d_v + 1) * _F32_BYTES if schedule.partials or splits > 1 else 0
    attention_dram = reads + (partial or final)
    dram_s = _dram_s(attention_dram, spec)
    sm_s = _busiest_sm_s(cycles, blocks, spec, schedule.persistent)
    combine_s = _dram_s(partial + final, spec) if partial else 0.0
    per_sm = schedule.blocks_per_sm
    return Estimate(
        flops=flops,
        dram_bytes=float(attention_dram + (partial + final if partial else 0)),
        rows_dequantised=rows_dequantised,
        blocks=blocks,
        blocks_per_sm=per_sm,
        waves=blocks / (spec.sm_count * per_sm) if per_sm else 0.0,
        roofline_s=roofline(flops, attention_dram, spec),
        model_s=max(dram_s, sm_s) + combine_s,
        bound="dram" if dram_s >= sm_s else "sm",
    )


def key_row_memory_ops(dim: int, key_layout: str) -> int:
    """Per-thread loads and shared-memory stores a selection block spends on one FP8 index key of ``dim`` values in
    ``key_layout`` (``dsa.kv_format.INDEX_KEY_LAYOUTS``), as the sm_90a code does it: the values of a key row (132
    bytes, 4-byte aligned) a byte at a time, per-page keys' values as 16-byte vectors; the scale as one float32. V3.2:
    258 and 18."""
    if key_layout not in kv_format.INDEX_KEY_LAYOUTS:
        raise ValueError(f"key_row_memory_ops: key_layout must be one of {kv_format.INDEX_KEY_LAYOUTS}, got "
                         f"{key_layout!r}")  # fmt: skip
    value_bytes_per_load = 16 if key_layout == "paged" else 1
    return 2 * (dim // value_bytes_per_load + 1)


def merge_estimate(
    *, batch: int, s_q: int, splits: int, width: int, topk: int, groups: int, spec: sku.PerfSpec, block_q: int = 1
) -> tuple[float, float]:  # fmt: skip
    """``(seconds, DRAM bytes)`` of the split selection's merge (``dsa.launch.index_topk_split.merge``) for ``batch x
    s_q`` queries of ``splits`` lists of ``width`` candidates in ``groups`` first-level groups (1: one level), the
    split launch's queries padded to whole blocks of ``block_q``.

    Per level, one keyed top-k launch (one 1024-thread block per row) reads its rows' candidates (position and
    score) and writes ``topk`` of them: ``max(DRAM time, busiest SM)``, a row costing :data:`TOPK_ROW_CYCLES` plus
    :data:`SELECT_OPS_PER_KEY` CUDA-core operations per candidate. Before it, the copy passes the code makes to lay
    the rows out (each reads and writes the level's candidates once): the first level pads missing lists when the
    groups are uneven, and lays the queries' rows side by side when ``s_q > 1`` (or drops padding queries when
    ``s_q`` is not a whole number of blocks, unless the padding copy already did); the second level lays them out
    when ``s_q > 1``. At ``s_q = 1`` with whole groups the split launch's output already is the rows."""
    rows = selection_split.merge_rows(splits=splits, width=width, topk=topk, groups=groups)
    queries = batch * s_q
    padded_queries = selection_split.padded_queries(s_q, block_q) > s_q
    per_group = -(-splits // groups)
    uneven = groups > 1 and per_group * groups != splits
    first_copies = int(uneven) + int(s_q > 1 or (padded_queries and not uneven))
    # (rows, copy passes) of each level: the first over each group's lists, the second over the groups' lists.
    levels = [(queries * groups, first_copies)] + ([(queries, int(s_q > 1))] if groups > 1 else [])
    seconds = nbytes = 0.0
    entry = _I32_BYTES + _F32_BYTES
    for (n_rows, copies), row in zip(levels, rows, strict=True):
        copy_bytes = copies * 2 * n_rows * row * entry
        topk_bytes = n_rows * (row + topk) * entry
        cycles = n_rows * (TOPK_ROW_CYCLES + row * SELECT_OPS_PER_KEY * FP32_OP)
        sm_s = _busiest_sm_s(cycles, n_rows, spec, persistent=False)
        seconds += _dram_s(copy_bytes, spec) + max(_dram_s(topk_bytes, spec), sm_s)
        nbytes += copy_bytes + topk_bytes
    return seconds, nbytes


def _key_blocks(context: int, page_size: int, block_n: int) -> int:
    """Key blocks a paged selection walks over ``context`` keys: whole pages, then whole ``block_n`` blocks."""
    return math.ceil(math.ceil(context / page_size) * page_size / block_n)


def selection_estimate(
    *, batch: int, s_q: int, context: int, heads: int, dim: int, topk: int, page_size: int, spec: sku.PerfSpec,
    splits: int = 1, block_q: int = 1, block_n: int = 128, blocks_per_sm: int = 1, groups: int = 1,
    key_layout: str = "rows",
) -> Estimate:  # fmt: skip
    """Decode selection (FP8 index keys, ``kv_format.index_key_layout``) of ``batch x s_q`` queries over ``context``
    keys each, ``block_q`` queries a block, every query's key blocks (``block_n`` keys) dealt out to ``splits``
    sub-ranges (1: one block walks them all), each keeping its best ``min(topk, keys it spans)`` candidates, merged
    in one level or two (``groups``, :func:`merge_estimate`; ``dsa.launch.index_topk_split``); each split's list is
    ``list_width`` entries (the split kernel is compiled for that many).

    SM: per (query, key) the FP8 GEMM, the heads' ReLU and weighted sum and the selection's share; per (block, key)
    the key's loads and shared-memory stores (:func:`key_row_memory_ops` in ``key_layout``), which ``block_q``
    queries of a block share (``block_q = 2``: both MTP queries of a token, ``q_rows = 128`` at 64 heads).

    DRAM: every key row and block-table entry once per sequence, the queries and weights, the indices written; split,
    every virtual query's ``list_width``-wide list (position and score; ``s_q`` padded to whole blocks of ``block_q``)
    written by the split kernel, then the merge's passes."""
    key_bytes = kv_format.index_key_layout(dim).bytes_per_token
    queries = batch * s_q
    key_blocks = _key_blocks(context, page_size, block_n)
    width = selection_split.list_width(topk=topk, splits=splits, key_blocks=key_blocks, block_N=block_n)
    virtual = batch * splits * selection_split.padded_queries(s_q, block_q)
    lists = virtual * width * (_I32_BYTES + _F32_BYTES) if splits > 1 else 0
    reads = batch * (context * key_bytes + math.ceil(context / page_size) * _I32_BYTES)
    reads += queries * heads * (dim + _F32_BYTES)
    out = queries * topk * _I32_BYTES
    flops = 2.0 * queries * heads * context * dim
    # Per (query, key): the FP8 GEMM, then per head a ReLU and a weighted add, then the selection's share.
    per_key = heads * dim * 2 / (spec.mma_flops_per_cycle * _FP8_RATE) + (heads * 2 + SELECT_OPS_PER_KEY) * FP32_OP
    blocks = selection_split.launched_blocks(batch=batch, s_q=s_q, block_Q=block_q, splits=splits)
    loads = batch * math.ceil(s_q / block_q) * context * key_row_memory_ops(dim, key_layout) * LSU_OP
    dram_s = _dram_s(reads + (lists or out), spec)
    sm_s = _busiest_sm_s(queries * context * per_key + loads, blocks, spec, persistent=False)
    merge_s, merge_bytes = (
        merge_estimate(batch=batch, s_q=s_q, splits=splits, width=width, topk=topk, groups=groups, spec=spec,
                       block_q=block_q)
        if lists else (0.0, 0.0)
    )  # fmt: skip
    return Estimate(
        flops=flops,
        dram_bytes=float(reads + (lists + merge_bytes if lists else out)),
        rows_dequantised=0,
        blocks=blocks,
        blocks_per_sm=blocks_per_sm,
        waves=blocks / (spec.sm_count * blocks_per_sm),
        roofline_s=roofline(flops, reads + out, spec, fp8=True),
        model_s=max(dram_s, sm_s) + merge_s,
        bound="dram" if dram_s >= sm_s else "sm",
    )


def _selection_schedule(static: dict[str, Any], sizes: dict[str, int], spec: sku.PerfSpec) -> dict[str, Any]:
    """The paged selection's schedule for a case as its launcher plans it on ``spec``: the untuned sm_90a config's
    queries and keys per block (with the launcher's MTP rule), the split count of
    ``dsa.launch.index_topk_split.num_splits``, the merge's groups of ``merge_groups`` and the case's key layout (rows
    unless it names one)."""
    dtype = getattr(torch, static["dtype"])
    batch, s_q = sizes["batch"], sizes["seq_len"]
    key_layout = static.get("key_layout", "rows")
    q = torch.empty(batch, s_q, static["heads"], static["dim"], dtype=dtype, device="meta")
    paged = selection_launch.paged_static_params(q, static["topk"], page_size=static["page_size"],
                                                 key_layout=key_layout)  # fmt: skip
    hopper = dict(dsl.HOPPER_TARGET)
    rule = selection_launch.mtp_default(paged, s_q, hopper)
    config = rule or selection_kernels.default_config({**paged, "target": hopper})
    block_q = indexer_kernels.block_queries(static["heads"], config.q_rows)
    key_blocks = _key_blocks(sizes["seq_len_kv"], static["page_size"], config.block_N)
    splits = selection_split.num_splits(batch=batch, s_q=s_q, block_Q=block_q, key_blocks=key_blocks,
                                        sms=spec.sm_count)  # fmt: skip
    width = selection_split.list_width(topk=static["topk"], splits=splits, key_blocks=key_blocks,
                                        block_N=config.block_N)  # fmt: skip
    groups = selection_split.merge_groups(batch=batch, s_q=s_q, splits=splits, width=width, topk=static["topk"],
                                          sms=spec.sm_count)  # fmt: skip
    return {"splits": splits, "block_q": block_q, "block_n": config.block_N, "groups": groups, "key_layout": key_layout}


def v4_flashmla_decode_estimate(case: case_data.Case, spec: sku.PerfSpec) -> Estimate | None:
    """FlashMLA's MODEL1 decode on a V4 decode case (FP8 only; None for bf16): its V3.2 schedule over each query's
    window and selected rows (``window + topk`` MODEL1 rows of ``kv_format.MODEL1_FP8_LAYOUT``). ``dsa`` gets the
    roofline of the case's counts: the model has our decode schedule at V3.2's widths only, not at MODEL1's."""
    static, sizes = case.static, case.sizes
    if static["kv_format"] != "fp8":
        return None
    return sparse_mla_decode_estimate(
        batch=sizes["batch"], s_q=sizes["seq_len"], heads=static["heads"], topk=static["window"] + sizes["topk"],
        d_qk=static["d_qk"], d_v=static["d_v"], layout=kv_format.MODEL1_FP8_LAYOUT, spec=spec,
        schedule=flashmla_decode_schedule(),
    )  # fmt: skip


def case_estimate(case: case_data.Case, sku_id: str = DEFAULT_SKU, *, provider: str = "dsa") -> Estimate | None:
    """The estimate of a ``benchmarks.cases`` case on ``sku_id`` for ``provider`` (one of
    :data:`MODELLED_PROVIDERS`); None for a SKU without datasheet figures, for the memory/selection cases (measured
    by peak memory) and for FlashMLA on anything but an FP8 decode case. ``dsa``: the decode kernels as they are
    scheduled today (default config, the launcher's split rule; the selection split as ``dsa.launch.index_topk``
    splits it), the other kernels by their roofline."""
    spec = sku.PERF_TABLE.get(sku_id)
    if spec is None or case.kernel in case_data.MEMORY_KINDS:
        return None
    static, sizes = case.static, case.sizes
    if case.kernel == case_data.V4_DECODE and provider == "flashmla":
        return v4_flashmla_decode_estimate(case, spec)
    if provider == "flashmla" and not (case.kernel == case_data.SPARSE_MLA_DECODE and static["kv_format"] == "fp8"):
        return None
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        fp8 = static["kv_format"] == "fp8"
        layout = kv_format.FP8Layout.for_width(static["d_qk"], static["d_rope"]) if fp8 else None
        config = decode_kernels.default_config({"kv_format": static["kv_format"]})
        if provider == "flashmla":
            schedule, splits = flashmla_decode_schedule(), 1
        else:
            schedule = dsa_decode_schedule(config, static["kv_format"])
            splits = decode_launch.split_count(
                batch=sizes["batch"], s_q=sizes["seq_len"], heads=static["heads"], topk=sizes["topk"], config=config,
                sms=spec.sm_count, blocks_per_sm=schedule.blocks_per_sm,
            )  # fmt: skip
        return sparse_mla_decode_estimate(
            batch=sizes["batch"], s_q=sizes["seq_len"], heads=static["heads"], topk=sizes["topk"], d_qk=static["d_qk"],
            d_v=static["d_v"], layout=layout, spec=spec, schedule=schedule, splits=splits,
        )  # fmt: skip
    if case.kernel == case_data.INDEX_TOPK_DECODE:
        return selection_estimate(
            batch=sizes["batch"], s_q=sizes["seq_len"], context=sizes["seq_len_kv"], heads=static["heads"],
            dim=static["dim"], topk=static["topk"], page_size=static["page_size"], spec=spec,
            **_selection_schedule(static, sizes, spec),
        )  # fmt: skip
    fp8 = static.get("dtype") == "float8_e4m3fn"
    time_s = roofline(case.flops, case.bytes, spec, fp8=fp8)
    return Estimate(case.flops, case.bytes, 0, 0, 0, 0.0, time_s, time_s, "roofline")


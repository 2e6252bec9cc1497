"""Input validation shared by the public ops and the reference (each call validates once).

Every check raises ``TypeError`` (wrong Python or tensor type, wrong dtype) or ``ValueError`` (wrong rank, shape,
device, layout or value), and the message names the op, the argument and what was expected, e.g.
``sparse_mla: q must have dtype bfloat16, got float16``. ``kernel=True`` applies the stricter dtype rules of the
TileLang kernels (bfloat16 / float8 inputs only); the reference also takes float16 (the kernels do not yet: float16
inputs run the reference on every device), float32 and float64 so that it can serve as an oracle and under
``torch.autograd.gradcheck``.

Strides are never an error, on any backend: the kernels read row-major tensors, and the ops hand them
:func:`kernel_layout` of each input (a copy only where a tensor is not already in that layout), once, after validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dsa import kv_format
from dsa.checks import (  # noqa: F401 (re-exported: callers use dsa.validation.kernel_layout and the require_* checks)
    KERNEL_ALIGNMENT_BYTES,
    dtype_names,
    kernel_layout,
    names_op,
    require_array,
    require_dtype,
    require_nonempty,
    require_positive_int,
    require_rank,
    require_same_device,
    require_scale,
    require_shape,
    require_tensor,
    shape_text,
)

OptTensor = Tensor | None

FP8_DTYPES = (torch.float8_e4m3fn,)
INDEXER_KERNEL_DTYPES = (torch.bfloat16, *FP8_DTYPES)
INDEXER_REFERENCE_DTYPES = (*INDEXER_KERNEL_DTYPES, torch.float16, torch.float32, torch.float64)
ATTENTION_KERNEL_DTYPES = (torch.bfloat16,)
ATTENTION_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPE = torch.int32


class SourceArgs(NamedTuple):
    """One key source of ``sparse_mla`` or ``sparse_mla_decode`` as the caller passes it, before validation: its rows
    and either an index list or ranges. The ops (and the reference's entry points) group each source's arguments in
    one of these for the checks; ``sparse_mla``'s second source is ``extra_kv`` with ``extra_indices``...

    Attributes:
        kv (Tensor | None): ``sparse_mla``'s ``kv [B, S_kv, d_qk]`` or ``sparse_mla_decode``'s ``kv_cache`` pages;
            None where a call has no second source.
        indices (Tensor | None): ``[B, S, k]`` int32 row numbers (slots for decode); None with ``ranges``.
        topk_length (Tensor | None): index lists only: how many leading entries of each row count.
        ranges (Tensor | None): ``[B, S, 2]`` int32 ``(start, end)`` per query instead of ``indices``.
        block_table (Tensor | None): ``sparse_mla_decode``'s ranged sources: ``[B, pages_per_sequence]`` int32, maps
            the ranges' positions to slots.
    """

    kv: OptTensor
    indices: OptTensor = None
    topk_length: OptTensor = None
    ranges: OptTensor = None
    block_table: OptTensor = None

    @property
    def ranged(self) -> bool:
        """Whether the entries are ranges (no index list given)."""
        return self.indices is None

    @property
    def entries(self) -> OptTensor:
        """The index list, or the ranges of a ranged source."""
        return self.ranges if self.indices is None else self.indices


NO_SOURCE = SourceArgs(None)
"""The absent second source."""


def _require_query_and_keys(
    q: torch.Tensor,
    q_dtypes: Sequence[torch.dtype],
    q_layout: str,
    keys: tuple[str, torch.Tensor, str, str],
    other: tuple[str, torch.Tensor, str | None, Sequence[torch.dtype] | None],
) -> None:
    """What the indexer and ``sparse_mla`` check first, in this order: ``q`` (rank 4, ``q_dtypes``), its keys (rank 3,
    q's dtype, q's batch and last dim) and a third input, each a tensor and none empty.

    Args:
        q (torch.Tensor): ``[B, S, H, D]``, any of ``q_dtypes``; ``q_layout`` names its dims in messages.
        keys: ``(name, t [B, S_kv, D], layout, width)``: ``width`` formats ``D`` for the last-dim message.
        other: ``(name, t, layout, dtypes)``: with a layout, a rank-3 non-empty tensor ``[B, S, ...]``; with dtypes,
            of those dtypes (checked after the keys' dtype, before their shape). Its shape is the caller's.
    """
    keys_name, keys_t, keys_layout, width = keys
    other_name, other_t, other_layout, other_dtypes = other
    require_tensor("q", q)
    require_tensor(keys_name, keys_t)
    require_tensor(other_name, other_t)
    require_dtype("q", q, q_dtypes)
    require_rank("q", q, 4, q_layout)
    require_rank(keys_name, keys_t, 3, keys_layout)
    if other_layout is not None:
        require_rank(other_name, other_t, 3, other_layout)
    require_nonempty("q", q, q_layout)
    require_nonempty(keys_name, keys_t, keys_layout)
    if other_layout is not None:
        require_nonempty(other_name, other_t, other_layout)
    if keys_t.dtype != q.dtype:
        raise TypeError(f"{keys_name} must have the same dtype as q ({q.dtype}), got {keys_t.dtype}")
    if other_dtypes is not None:
        require_dtype(other_name, other_t, other_dtypes)
    batch, dim = q.shape[0], q.shape[3]
    if keys_t.shape[0] != batch:
        raise ValueError(f"{keys_name} must have batch size {batch} like q, got shape {shape_text(keys_t.shape)}")
    if keys_t.shape[2] != dim:
        raise ValueError(f"{keys_name} must have {width.format(dim)} like q, got shape {shape_text(keys_t.shape)}")


def _check_indexer_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """The indexer's inputs, shared by ``index_scores`` and ``index_topk`` (each names itself in the message)."""
    _require_query_and_keys(
        q, INDEXER_KERNEL_DTYPES if kernel else INDEXER_REFERENCE_DTYPES, "[B, S, H_i, D_i]",
        ("k", k, "[B, S_kv, D_i]", "head dim D_i = {}"), ("weights", weights, None, None),
    )  # fmt: skip
    batch, seq, heads, _ = q.shape
    seq_kv = k.shape[1]
    weight_dtypes = (torch.float32,) if kernel or q.dtype != torch.float64 else (torch.float32, torch.float64)
    require_dtype("weights", weights, weight_dtypes)
    require_shape("weights", weights, (batch, seq, heads), "[B, S, H_i]")
    is_fp8 = q.dtype in FP8_DTYPES
    if is_fp8 and k_scale is None:
        raise ValueError("k_scale [B, S_kv] float32 is required when q and k are float8_e4m3fn")
    if not is_fp8 and k_scale is not None:
        raise ValueError(f"k_scale must be None when q and k are {str(q.dtype).removeprefix('torch.')} (FP8 only)")
    if k_scale is not None:
        require_tensor("k_scale", k_scale)
        require_dtype("k_scale", k_scale, (torch.float32,))
        require_shape("k_scale", k_scale, (batch, seq_kv), "[B, S_kv]")
    if (starts is None) != (ends is None):
        raise ValueError("starts and ends must be given together (both [B, S] int32) or both omitted for causal")
    for name, t in (("starts", starts), ("ends", ends)):
        if t is not None:
            _require_per_query_ints(name, t, (batch, seq), "[B, S]")
    require_same_device("q", q, k=k, weights=weights, k_scale=k_scale, starts=starts, ends=ends)


def _require_per_query_ints(name: str, t: object, shape: tuple[int, int], layout: str) -> None:
    """``t`` an int32 tensor of one value per query (``topk_length``, ``starts``, ``ends``) of ``shape``."""
    t = require_tensor(name, t)
    require_dtype(name, t, (INDEX_DTYPE,))
    require_shape(name, t, shape, layout)


check_index_scores = names_op("index_scores")(_check_indexer_inputs)
"""Validate the inputs of ``index_scores`` (see ``dsa.reference.index_scores``): the indexer's inputs, named
``index_scores: ...`` in every message."""


@names_op("index_topk")
def check_index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: object,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """Validate the inputs of ``index_topk`` (see ``dsa.reference.index_topk``)."""
    _check_indexer_inputs(q, k, weights, k_scale, starts, ends, kernel=kernel)
    require_positive_int("topk", topk)


@names_op("topk_indices")
def check_topk_indices(scores: torch.Tensor, k: object, *, kernel: bool = False) -> None:
    """Validate the inputs of ``topk_indices`` (see ``dsa.reference.topk_indices``)."""
    require_array("scores", scores, (torch.float32,) if kernel else (torch.float32, torch.float64), 3, "[B, S, S_kv]")
    require_positive_int("k", k)


@names_op("sparse_mla")
def check_sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor | None,
    sm_scale: object,
    d_v: object,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    *,
    kernel: bool = False,
    ranges: torch.Tensor | None = None,
    extra: SourceArgs = NO_SOURCE,
) -> None:
    """Validate the inputs of ``sparse_mla`` (see ``dsa.reference.sparse_mla``): one source (``kv`` with ``indices``
    or ``ranges``) and optionally a second, ``extra`` (``extra_kv`` with ``extra_indices`` or ``extra_ranges``, named
    so in messages)."""
    if indices is None or ranges is not None:  # (the common call, one index list, skips this)
        _check_exactly_one("indices", indices, "ranges", ranges)
    if indices is not None:
        entries = ("indices", indices, "[B, S, k]", (INDEX_DTYPE,))
    else:
        entries = ("ranges", ranges, "[B, S, 2]", (INDEX_DTYPE,))
    _require_query_and_keys(
        q, ATTENTION_KERNEL_DTYPES if kernel else ATTENTION_REFERENCE_DTYPES, "[B, S, H, d_qk]",
        ("kv", kv, "[B, S_kv, d_qk]", "d_qk = {} columns"), entries,
    )  # fmt: skip
    batch, seq = q.shape[0], q.shape[1]
    if indices is None:
        _check_ranges(q, "", ranges, topk_length)
    elif indices.shape[0] != batch or indices.shape[1] != seq:
        raise ValueError(
            f"indices must have shape [B, S, k] with B = {batch}, S = {seq} like q, got {shape_text(indices.shape)}"
        )
    _check_attention_args(q, sm_scale, d_v, attn_sink, "kv")
    if topk_length is not None:
        _require_per_query_ints("topk_length", topk_length, (batch, seq), "[B, S]")
    require_same_device("q", q, kv=kv, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    if extra.kv is not None:
        _check_extra_source(q, kv, extra)
        return
    for name, t in (("extra_indices", extra.indices), ("extra_topk_length", extra.topk_length),
                    ("extra_ranges", extra.ranges)):  # fmt: skip
        if t is not None:
            raise ValueError(f"{name} is given without extra_kv (the second source's rows)")


def _check_exactly_one(name: str, t: torch.Tensor | None, other_name: str, other: torch.Tensor | None) -> None:
    if (t is None) == (other is None):
        given = "both" if t is not None else "neither"
        raise ValueError(f"exactly one of {name} and {other_name} must be given, got {given}")


def _check_ranges(q: torch.Tensor, prefix: str, ranges: torch.Tensor, topk_length: torch.Tensor | None) -> None:
    """A source's ``ranges [B, S, 2]`` int32 (its tensor, dtype, rank and emptiness checked already) and the absence
    of its ``topk_length``; ``prefix`` names the second source's."""
    require_shape(prefix + "ranges", ranges, (q.shape[0], q.shape[1], 2), "[B, S, 2]")
    if topk_length is not None:
        raise ValueError(f"{prefix}topk_length applies to {prefix}indices only, not to {prefix}ranges")
    require_same_device("q", q, **{prefix + "ranges": ranges})


def _check_extra_source(q: torch.Tensor, kv: torch.Tensor, extra: SourceArgs) -> None:
    """``sparse_mla``'s second source: ``extra_kv [B, S_extra, d_qk]`` (kv's dtype, q's device) with
    ``extra_indices [B, S, k2]`` int32 (+ ``extra_topk_length [B, S]`` int32) or ``extra_ranges [B, S, 2]`` int32."""
    extra_kv, extra_indices, extra_topk_length, extra_ranges, _ = extra
    require_tensor("extra_kv", extra_kv)
    require_rank("extra_kv", extra_kv, 3, "[B, S_extra, d_qk]")
    require_nonempty("extra_kv", extra_kv, "[B, S_extra, d_qk]")
    if extra_kv.dtype != kv.dtype:
        raise TypeError(f"extra_kv must have the same dtype as kv ({kv.dtype}), got {extra_kv.dtype}")
    batch, seq = q.shape[0], q.shape[1]
    if extra_kv.shape[0] != batch or extra_kv.shape[2] != q.shape[3]:
        raise ValueError(
            f"extra_kv must have shape [B, S_extra, d_qk] with B = {batch}, d_qk = {q.shape[3]} like q, "
            f"got {shape_text(extra_kv.shape)}"
        )
    _check_exactly_one("extra_indices", extra_indices, "extra_ranges", extra_ranges)
    name, t, layout = ("extra_indices", extra_indices, "[B, S, k]") if extra_ranges is None else (
        "extra_ranges", extra_ranges, "[B, S, 2]")  # fmt: skip
    require_array(name, t, (INDEX_DTYPE,), 3, layout)
    if extra_ranges is not None:
        _check_ranges(q, "extra_", extra_ranges, extra_topk_length)
    elif extra_indices.shape[0] != batch or extra_indices.shape[1] != seq:
        raise ValueError(
            f"extra_indices must have shape [B, S, k] with B = {batch}, S = {seq} like q, "
            f"got {shape_text(extra_indices.shape)}"
        )
    if extra_topk_length is not None:
        _require_per_query_ints("extra_topk_length", extra_topk_length, (batch, seq), "[B, S]")
    require_same_device("q", q, extra_kv=extra_kv, extra_indices=extra_indices, extra_topk_length=extra_topk_length)


def _check_attention_args(
    q: torch.Tensor, sm_scale: object, d_v: object, attn_sink: torch.Tensor | None, rows: str
) -> None:
    """What ``sparse_mla`` and ``sparse_mla_decode`` share: ``sm_scale``, ``d_v <= d_qk`` (the value is the first
    ``d_v`` columns of ``rows``) and ``attn_sink [H]`` float32 (float64 too for float64 q) on q's device."""
    require_scale("sm_scale", sm_scale)
    d_v = require_positive_int("d_v", d_v)
    heads, d_qk = q.shape[2], q.shape[3]
    if d_v > d_qk:
        raise ValueError(f"d_v must be <= d_qk = {d_qk} (V is the first d_v columns of {rows}), got {d_v}")
    if attn_sink is not None:
        require_tensor("attn_sink", attn_sink)
        sink_dtypes = (torch.float32,) if q.dtype != torch.float64 else (torch.float32, torch.float64)
        require_dtype("attn_sink", attn_sink, sink_dtypes)
        require_shape("attn_sink", attn_sink, (heads,), "[H]")
        require_same_device("q", q, attn_sink=attn_sink)


@names_op("sparse_mla_decode")
def check_decode_attention_args(q: torch.Tensor, sm_scale: object, d_v: object, attn_sink: torch.Tensor | None) -> None:
    """``q``'s dtype (the reference's), ``sm_scale``, ``d_v`` and ``attn_sink`` of ``dsa.reference.sparse_mla_decode``,
    whose caches may hold another floating dtype than q (it checks their rows itself)."""
    require_dtype("q", q, ATTENTION_REFERENCE_DTYPES)
    _check_attention_args(q, sm_scale, d_v, attn_sink, "a cache row")


FP8_CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
"""Dtypes an FP8 paged cache may arrive in: its bytes (FlashMLA passes them as uint8, int8 or float8_e4m3fn)."""


def fp8_cache_layouts(d_qk: int, d_rope: int) -> tuple[kv_format.FP8Layout, ...]:
    """The FP8 layouts a ``sparse_mla_decode`` cache of ``d_qk``-wide rows with ``d_rope`` RoPE values may hold:
    FlashMLA's MODEL1 (:data:`dsa.kv_format.MODEL1_FP8_LAYOUT`, 584 bytes per token, split pages) for 512-wide rows
    with 64 RoPE values, and the row-per-token layout of the width (``dsa.kv_format.FP8Layout.for_width``: V3.2's 656
    bytes for 576; 604 for 512) where one exists. Their row sizes differ, so a cache's row size picks one
    (:func:`fp8_cache_layout`)."""
    model1 = kv_format.MODEL1_FP8_LAYOUT
    layouts = [model1] if (d_qk, d_rope) == (model1.width, model1.d_rope) else []
    try:
        if 0 <= d_rope < d_qk:
            layouts.append(kv_format.FP8Layout.for_width(d_qk, d_rope))
    except ValueError:
        pass  # no row-per-token layout for this split (d_nope not a multiple of 16)
    return tuple(layouts)


def fp8_cache_layout(d_qk: int, d_rope: int, row_bytes: int) -> kv_format.FP8Layout | None:
    """The layout of :func:`fp8_cache_layouts` whose rows are ``row_bytes`` long, ``None`` when none is."""
    return next((layout for layout in fp8_cache_layouts(d_qk, d_rope) if layout.bytes_per_token == row_bytes), None)


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a paged cache tensor holds FP8-layout bytes (else its rows are plain values)."""
    return kv_cache.dtype in FP8_CACHE_DTYPES


def _check_decode_source(prefix: str, q: Tensor, source: SourceArgs, d_rope: int) -> None:
    """One KV source of ``sparse_mla_decode``: the cache pages and either its slot indices (with their lengths) or
    its position ranges with the cache's block table; ``prefix`` (``""`` or ``"extra_"``) names its arguments."""
    kv_cache, indices, topk_length, ranges, block_table = source
    batch, s_q, _, d_qk = q.shape
    cache_name, indices_name, length_name = f"{prefix}kv_cache", f"{prefix}indices", f"{prefix}topk_length"
    require_tensor(cache_name, kv_cache)
    require_rank(cache_name, kv_cache, 3, "[num_pages, page_size, row]")
    require_nonempty(cache_name, kv_cache, "[num_pages, page_size, row]")
    if is_fp8_cache(kv_cache):
        layouts = fp8_cache_layouts(d_qk, d_rope)
        if not layouts:
            raise ValueError(
                f"{cache_name} holds FP8 bytes, but d_rope leaves no FP8 layout for {d_qk}-wide rows "
                f"(d_rope = {d_rope})"
            )
        if fp8_cache_layout(d_qk, d_rope, kv_cache.shape[-1]) is None:
            sizes = " or ".join(str(layout.bytes_per_token) for layout in layouts)
            raise ValueError(
                f"{cache_name} holds {kv_cache.shape[-1]}-byte rows; the FP8 layouts of a {d_qk}-wide row with "
                f"{d_rope} RoPE values take {sizes} bytes"
            )
    else:
        if kv_cache.dtype != q.dtype:
            raise TypeError(
                f"{cache_name} must have q's dtype ({str(q.dtype).removeprefix('torch.')}) or hold FP8 bytes "
                f"({dtype_names(FP8_CACHE_DTYPES)}), got {str(kv_cache.dtype).removeprefix('torch.')}"
            )
        if kv_cache.shape[-1] != d_qk:
            raise ValueError(f"{cache_name} rows must be d_qk = {d_qk} wide like q, got shape {shape_text(kv_cache.shape)}")
    _check_exactly_one(indices_name, indices, f"{prefix}ranges", ranges)
    if ranges is not None:
        _check_decode_ranges(prefix, q, topk_length, ranges, block_table)
        require_same_device("q", q, **{cache_name: kv_cache, f"{prefix}ranges": ranges,
                                       f"{prefix}block_table": block_table})  # fmt: skip
        return
    if block_table is not None:
        raise ValueError(f"{prefix}block_table maps {prefix}ranges to slots; {indices_name} are slots already")
    require_array(indices_name, indices, (INDEX_DTYPE,), 3, "[B, s_q, topk]")
    if tuple(indices.shape[:2]) != (batch, s_q):
        raise ValueError(
            f"{indices_name} must have shape [B, s_q, topk] with B = {batch}, s_q = {s_q} like q, got "
            f"{shape_text(indices.shape)}"
        )
    if topk_length is not None:
        require_tensor(length_name, topk_length)
        require_dtype(length_name, topk_length, (INDEX_DTYPE,))
        if tuple(topk_length.shape) not in ((batch,), (batch, s_q)):
            raise ValueError(
                f"{length_name} must have shape [B] = [{batch}] or [B, s_q] = [{batch}, {s_q}], got "
                f"{shape_text(topk_length.shape)}"
            )
    require_same_device("q", q, **{cache_name: kv_cache, indices_name: indices, length_name: topk_length})


def _check_decode_ranges(
    prefix: str, q: Tensor, topk_length: OptTensor, ranges: Tensor, block_table: OptTensor
) -> None:
    """A ranged source of ``sparse_mla_decode``: ``ranges [B, s_q, 2]`` int32 positions (no ``topk_length``) and
    the cache's ``block_table [B, pages_per_sequence]`` int32 that maps them to slots."""
    name = f"{prefix}ranges"
    require_tensor(name, ranges)
    require_dtype(name, ranges, (INDEX_DTYPE,))
    require_rank(name, ranges, 3, "[B, s_q, 2]")
    _check_ranges(q, prefix, ranges, topk_length)
    name = f"{prefix}block_table"
    if block_table is None:
        raise ValueError(f"{prefix}ranges need {name} [B, pages_per_sequence] int32 (positions are mapped to slots)")
    require_array(name, block_table, (INDEX_DTYPE,), 2, "[B, pages_per_sequence]")
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"{name} must have shape [B, pages_per_sequence] with B = {q.shape[0]} like q, got "
                         f"{shape_text(block_table.shape)}")  # fmt: skip


check_decode_ranges = names_op("sparse_mla_decode")(_check_decode_ranges)
"""A ranged source's checks for the reference's own entry point (``dsa.reference.sparse_mla_decode``)."""


@names_op("sparse_mla_decode")
def check_sparse_mla_decode(
    q: Tensor, source: SourceArgs, sm_scale: object, d_v: object, attn_sink: OptTensor, d_rope: int, *,
    kernel: bool = False, extra: SourceArgs = NO_SOURCE,
) -> None:  # fmt: skip
    """Validate the inputs of ``sparse_mla_decode`` (see ``dsa.reference.sparse_mla_decode``): the first ``source``
    (``kv_cache`` with ``indices`` and ``topk_length``, or ``ranges`` with ``block_table``) and the ``extra`` one.

    ``d_rope``: the RoPE width of FP8 rows; an FP8 cache's rows must be one of the layouts :func:`fp8_cache_layout`
    finds for q's width and ``d_rope`` (MODEL1's 584 bytes or the row-per-token size). Each source takes either
    slot ``indices`` or position ``ranges`` with its cache's ``block_table``.
    """
    require_array("q", q, ATTENTION_KERNEL_DTYPES if kernel else ATTENTION_REFERENCE_DTYPES, 4, "[B, s_q, H, d_qk]")
    _check_decode_source("", q, source, d_rope)
    if extra.kv is None:
        if extra.indices is not None:
            raise ValueError("extra_kv_cache and extra_indices go together (both or neither)")
        if extra.topk_length is not None:
            raise ValueError("extra_topk_length needs extra_kv_cache and extra_indices")
        if extra.ranges is not None or extra.block_table is not None:
            raise ValueError("extra_ranges and extra_block_table need extra_kv_cache")
    else:
        _check_decode_source("extra_", q, extra, d_rope)
    _check_attention_args(q, sm_scale, d_v, attn_sink, "a cache row")


@names_op("index_topk_decode")
def check_index_topk_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    topk: object,
    block_table: torch.Tensor,
    ends: torch.Tensor,
    starts: torch.Tensor | None,
    *,
    kernel: bool = False,
    key_layout: object = "rows",
) -> None:
    """Validate the inputs of ``index_topk_decode`` (see ``dsa.reference.index_topk_decode``): ``key_layout`` one of
    ``dsa.kv_format.INDEX_KEY_LAYOUTS`` (``"paged"`` for FP8 ``q`` only); an FP8 ``k_cache`` may carry vLLM's unit
    dim 2 (``[num_pages, page_size, 1, D_i + 4]``)."""
    require_array("q", q, INDEXER_KERNEL_DTYPES if kernel else INDEXER_REFERENCE_DTYPES, 4, "[B, s_q, H_i, D_i]")
    batch, s_q, heads, dim = q.shape
    fp8 = q.dtype in FP8_DTYPES
    if key_layout not in kv_format.INDEX_KEY_LAYOUTS or (key_layout != "rows" and not fp8):
        raise ValueError(
            f"key_layout must be one of {kv_format.INDEX_KEY_LAYOUTS} ('paged' only for FP8 keys), got {key_layout!r} "
            f"for a {str(q.dtype).removeprefix('torch.')} q"
        )
    require_tensor("k_cache", k_cache)
    if not (fp8 and k_cache.dim() == 4 and k_cache.shape[2] == 1):  # vLLM's [num_pages, page_size, 1, row]
        require_rank("k_cache", k_cache, 3, "[num_pages, page_size, row]")
    require_nonempty("k_cache", k_cache, "[num_pages, page_size, row]")
    if fp8:
        # One FP8 key row: D_i FP8 bytes and a float32 scale (dsa.cache.index_key_layout).
        row = dim + 4
        if k_cache.dtype not in FP8_CACHE_DTYPES or k_cache.shape[-1] != row:
            raise ValueError(
                f"k_cache must hold FP8 key rows of {row} bytes ({dim} FP8 values, one float32 scale) for float8 q, "
                f"got shape {shape_text(k_cache.shape)} {str(k_cache.dtype).removeprefix('torch.')}"
            )
    else:
        if k_cache.dtype != q.dtype:
            raise TypeError(f"k_cache must have q's dtype ({q.dtype}) for a {q.dtype} q, got {k_cache.dtype}")
        if k_cache.shape[-1] != dim:
            raise ValueError(f"k_cache rows must be D_i = {dim} wide like q, got shape {shape_text(k_cache.shape)}")
    require_tensor("weights", weights)
    weight_dtypes = (torch.float32,) if kernel or q.dtype != torch.float64 else (torch.float32, torch.float64)
    require_dtype("weights", weights, weight_dtypes)
    require_shape("weights", weights, (batch, s_q, heads), "[B, s_q, H_i]")
    require_positive_int("topk", topk)
    require_array("block_table", block_table, (INDEX_DTYPE,), 2, "[B, pages_per_sequence]")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have B = {batch} rows like q, got shape {shape_text(block_table.shape)}")
    for name, t in (("ends", ends), ("starts", starts)):
        if t is not None:
            _require_per_query_ints(name, t, (batch, s_q), "[B, s_q]")
    require_same_device(
        "q", q, k_cache=k_cache, weights=weights, block_table=block_table, ends=ends, starts=starts
    )


COMPRESS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
"""The row dtypes ``compress_kv`` takes (one torch implementation serves every backend)."""


@names_op("compress_kv")
def check_compress_kv(
    kv: Tensor, gate: Tensor, position_bias: Tensor, rate: object, overlap: object, prev_kv: OptTensor,
    prev_gate: OptTensor,
) -> None:  # fmt: skip
    """Validate the inputs of ``compress_kv`` (see ``dsa.reference.compress_kv``)."""
    layout = "[B, n * rate, W]"
    require_tensor("kv", kv)
    require_tensor("gate", gate)
    require_tensor("position_bias", position_bias)
    require_dtype("kv", kv, COMPRESS_DTYPES)
    require_dtype("gate", gate, COMPRESS_DTYPES)
    require_rank("kv", kv, 3, layout)
    rate = require_positive_int("rate", rate)
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {type(overlap).__name__}")
    batch, length, width = kv.shape
    if batch < 1 or width < 1:
        raise ValueError(f"kv must have B >= 1 and W >= 1 in {layout}, got {shape_text(kv.shape)}")
    if length % rate:
        raise ValueError(
            f"kv must hold whole windows: its length must be a multiple of rate = {rate} (buffer a partial window "
            f"until it is complete), got {shape_text(kv.shape)}"
        )
    if overlap and width % 2:
        raise ValueError(f"kv must have an even W = 2 d (Ca | Cb) with overlap=True, got {shape_text(kv.shape)}")
    require_shape("gate", gate, tuple(kv.shape), layout)
    bias_dtypes = (torch.float32,) if kv.dtype != torch.float64 else (torch.float32, torch.float64)
    require_dtype("position_bias", position_bias, bias_dtypes)
    require_shape("position_bias", position_bias, (rate, width), "[rate, W]")
    if (prev_kv is None) != (prev_gate is None):
        raise ValueError("prev_kv and prev_gate must be given together (the carried window's rows and gates)")
    if prev_kv is not None and prev_gate is not None:
        if not overlap:
            raise ValueError("prev_kv/prev_gate are the carried state of overlapping windows: pass them with overlap=True")
        require_tensor("prev_kv", prev_kv)
        require_tensor("prev_gate", prev_gate)
        carried = (batch, rate, width // 2)
        require_shape("prev_kv", prev_kv, carried, "[B, rate, d]")
        require_shape("prev_gate", prev_gate, carried, "[B, rate, d]")
        if prev_kv.dtype != kv.dtype:
            raise TypeError(f"prev_kv must have kv's dtype ({kv.dtype}), got {prev_kv.dtype}")
        if prev_gate.dtype != gate.dtype:
            raise TypeError(f"prev_gate must have gate's dtype ({gate.dtype}), got {prev_gate.dtype}")
    require_same_device(
        "kv", kv, gate=gate, position_bias=position_bias, prev_kv=prev_kv, prev_gate=prev_gate
    )

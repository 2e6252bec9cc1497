"""Decoding from paged caches: ``sparse_mla_decode`` and ``index_topk_decode`` gather the rows the slots or the
block table name (dequantising FP8 rows) and run the prefill references on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dsa import kv_format, validation
from dsa.reference.common import INVALID_INDEX, OptTensor, _chunk_rows, compute_dtype
from dsa.reference.indexer import index_scores_impl
from dsa.reference.mla import sparse_mla_impl
from dsa.reference.sources import Source, range_entries
from dsa.reference.topk import topk_indices_impl


def _cache_layout(kv_cache: Tensor, width: int, d_rope: int, name: str) -> kv_format.FP8Layout | None:
    """The FP8 layout of a paged cache tensor (``validation.fp8_cache_layout``; ``None`` for a plain cache of
    ``width``-wide rows), after checking that its rows fit ``width`` and ``d_rope``."""
    if kv_cache.dim() != 3:
        raise ValueError(f"sparse_mla_decode: {name} must be [num_pages, page_size, row], got {tuple(kv_cache.shape)}")
    if not validation.is_fp8_cache(kv_cache):
        if kv_cache.shape[-1] != width:
            raise ValueError(
                f"sparse_mla_decode: {name} rows must be {width} wide (q's last dim), got {kv_cache.shape[-1]}"
            )
        return None
    if not 0 <= d_rope < width:
        raise ValueError(f"sparse_mla_decode: d_rope must lie in [0, {width}) for {width}-wide rows, got {d_rope}")
    layouts = validation.fp8_cache_layouts(width, d_rope)
    layout = validation.fp8_cache_layout(width, d_rope, kv_cache.shape[-1])
    if layout is None:
        raise ValueError(
            f"sparse_mla_decode: {name} holds {kv_cache.shape[-1]}-byte FP8 rows; a {width}-wide row with {d_rope} "
            f"RoPE values takes {' or '.join(str(x.bytes_per_token) for x in layouts) or 'no FP8 layout'} "
            f"({', '.join(map(str, layouts))})"
        )
    return layout


def _per_query_lengths(topk_length: OptTensor, rows: int) -> OptTensor:
    """``topk_length`` (``[B]`` or ``[B, s_q]``) as ``[B * s_q]``: a ``[B]`` length applies to every query of its
    sequence."""
    if topk_length is None:
        return None
    if topk_length.dim() == 1:
        topk_length = topk_length.view(-1, 1).expand(-1, rows // topk_length.shape[0])
    return topk_length.reshape(rows)


def _stored_rows(kv_cache: Tensor, layout: kv_format.FP8Layout | None, slots: Tensor) -> Tensor:
    """The stored rows of in-range ``slots`` (``[n]`` int64): ``[n, row]`` in the cache dtype, a token's bytes in
    the order ``dsa.kv_format.dequantize_kv_fp8`` reads them.

    A row-per-token cache holds a slot's row at ``[page, offset]``. A split-layout cache (MODEL1) is FlashMLA's view
    of its pages, ``[num_pages, page_size, bytes_per_token]``: page ``p``'s bytes are ``kv_cache[p]`` in row-major
    order, token ``o``'s values at ``o * value_bytes`` and its scale group at ``page_size * value_bytes + o *
    scale_group_bytes`` of them (``dsa.kv_format.kv_page_sections``). When each page's rows lie back to back (as
    FlashMLA lays them out) the sections are views and only the named tokens' bytes are read; otherwise the pages
    the slots name are copied first (each once).
    """
    page_size = kv_cache.shape[1]
    page, offset = slots // page_size, slots % page_size
    if layout is None or not layout.scales_after_values:
        return kv_cache[page, offset]
    num_pages, _, row = kv_cache.shape
    if page_size == 1 or kv_cache.stride(1) == row * kv_cache.stride(2):
        pages = kv_cache.view(num_pages, page_size * row)
    else:
        named, page = torch.unique(page, return_inverse=True)
        pages = kv_cache[named].reshape(named.numel(), page_size * row)
    split = page_size * layout.value_bytes
    values = pages[:, :split].unflatten(1, (page_size, layout.value_bytes))
    scales = pages[:, split:].unflatten(1, (page_size, layout.scale_group_bytes))
    return torch.cat([values[page, offset], scales[page, offset]], dim=-1)


def _source_rows(
    kv_cache: Tensor, layout: kv_format.FP8Layout | None, slots: Tensor, topk_length: OptTensor, width: int
) -> tuple[Tensor, Tensor]:
    """The cache rows that the valid entries of ``slots`` name, and nothing else: gathered first, then (FP8)
    dequantised, so the work is O(entries), whatever the size of the cache.

    Args:
        kv_cache (Tensor): ``[num_pages, page_size, row]`` (any strides: rows are read by page and offset, the cache
            is never flattened or copied; only MODEL1 pages whose rows do not lie back to back are, the named ones).
        layout (FP8Layout | None): the FP8 layout (row per token, or MODEL1's split pages), None for a plain cache.
        slots (Tensor): ``[n, topk]`` integer slots; valid iff ``0 <= slot < num_pages * page_size`` and (with
            ``topk_length [n]``) the entry's position in its row is ``< topk_length``.

    Returns:
        rows ``[n, topk, width]`` (bfloat16 for FP8 caches, the cache dtype otherwise; zero at invalid entries, which
        are never read) and valid ``[n, topk]`` bool.
    """
    page_size = kv_cache.shape[1]
    valid = (slots >= 0) & (slots < kv_cache.shape[0] * page_size)
    if topk_length is not None:
        position = torch.arange(slots.shape[-1], device=slots.device).view(1, -1)
        valid &= position < topk_length.view(-1, 1).to(torch.int64)
    picked = slots[valid].to(torch.int64)  # the valid entries only, row-major; duplicates once per occurrence
    stored = _stored_rows(kv_cache, layout, picked)  # [n_valid, row]
    values = kv_format.dequantize_kv_fp8(stored, layout) if layout is not None else stored
    rows = values.new_zeros((*slots.shape, width))
    rows[valid] = values
    return rows, valid


def range_slots(ranges: Tensor, block_table: Tensor, kv_cache: Tensor) -> Tensor:
    """The slots of per-query position ranges (DeepSeek-V4's sliding window ``[t - 127, t + 1)``, or HCA's compressed
    entries ``[0, (t + 1) // 128)``) in a paged cache.

    Args:
        ranges (Tensor): ``[B, s_q, 2]`` int32 ``(start, end)``: query ``(b, t)`` attends positions ``start <= p <
            end`` of sequence ``b`` (an empty or negative range is empty; positions below 0 or past the block table
            are invalid).
        block_table (Tensor): ``[B, pages_per_sequence]`` int32, the cache's (``dsa.kv_format.positions_to_slots``).
        kv_cache (Tensor): ``[num_pages, page_size, row]``: its page size and slot count.

    Returns:
        Tensor: ``[B, s_q, L]`` int32 slots, ``L`` the longest range clipped to the table (at least 1): entry ``j`` of
        a row is the slot of position ``max(start, 0) + j``, ``-1`` past the range's end or where
        ``positions_to_slots`` finds no slot (a negative page, a slot past the cache).

    Memory is ``B * s_q * L`` int32, the entries the attention reads anyway; ``L`` is read from the ranges (one
    device-to-host copy).
    """
    num_pages, page_size = kv_cache.shape[:2]
    # The prefill's range expansion, over the positions the block table can hold.
    positions, valid = range_entries(ranges, block_table.shape[1] * page_size)
    positions = positions.masked_fill(~valid, INVALID_INDEX)
    batch, s_q, width = positions.shape
    num_slots = num_pages * page_size
    return kv_format.positions_to_slots(block_table, page_size, positions.view(batch, -1), num_slots=num_slots).view(
        batch, s_q, width
    )


def _source_slots(prefix: str, q: Tensor, source: validation.SourceArgs) -> OptTensor:
    """A source's slot indices for the reference's entry point: ``indices`` as given, or the slots of ``ranges``
    through ``block_table`` (checked first); ``prefix`` (``""`` or ``"extra_"``) names its arguments."""
    kv_cache, indices, topk_length, ranges, block_table = source
    if ranges is None and block_table is None:
        return indices
    if indices is not None or ranges is None:
        raise ValueError(f"sparse_mla_decode: exactly one of {prefix}indices and {prefix}ranges must be given, with "
                         f"{prefix}block_table for {prefix}ranges")  # fmt: skip
    if kv_cache is None:
        raise ValueError(f"sparse_mla_decode: {prefix}ranges need {prefix}kv_cache")
    validation.check_decode_ranges(prefix, q, topk_length, ranges, block_table)
    return range_slots(ranges, block_table, kv_cache)


def sparse_mla_decode(
    q: Tensor,
    kv_cache: Tensor,
    indices: OptTensor = None,
    *,
    sm_scale: float,
    d_v: int = 512,
    topk_length: OptTensor = None,
    attn_sink: OptTensor = None,
    extra_kv_cache: OptTensor = None,
    extra_indices: OptTensor = None,
    extra_topk_length: OptTensor = None,
    d_rope: int = 64,
    ranges: OptTensor = None,
    block_table: OptTensor = None,
    extra_ranges: OptTensor = None,
    extra_block_table: OptTensor = None,
) -> tuple[Tensor, Tensor]:
    """Sparse MLA for decoding: the ``s_q`` newest queries of each sequence attend to cache slots.

    Args:
        q (Tensor): ``[B, s_q, H, d_qk]`` (``s_q`` = 1 plus speculative tokens).
        kv_cache (Tensor): the pages of a ``dsa.serving.cache.PagedKVCache``: ``[num_pages, page_size, d_qk]`` in q's
            dtype (bf16 or float32), or ``[num_pages, page_size, bytes]`` uint8/int8/float8 bytes in an FP8 layout of a
            ``d_qk``-wide row with ``d_rope`` RoPE values (``dsa.validation.fp8_cache_layouts``; dequantised here,
            exactly as ``dsa.kv_format.dequantize_kv_fp8``): one row per token (V3.2's 656 bytes for 576 wide), or
            MODEL1's split pages (512 wide, 64 RoPE values, 584 bytes per token) as FlashMLA passes them,
            ``dsa.kv_format.flash_mla_kv_view(pages, MODEL1_FP8_LAYOUT, page_size).squeeze(2)``: page ``p``'s bytes
            are ``kv_cache[p]`` in row-major order, all its tokens' values, then all their scale groups.
        indices (Tensor | None): ``[B, s_q, topk]`` int32 slots (``page * page_size + offset``); ``-1`` or out of
            range is invalid and never read. None when ``ranges`` is given.
        sm_scale (float), d_v (int), attn_sink (Tensor | None ``[H]`` float32): as in :func:`sparse_mla`.
        topk_length (Tensor | None): ``[B]`` or ``[B, s_q]``: how many leading entries of each row count (index
            lists only).
        extra_kv_cache, extra_indices, extra_topk_length: a second source (e.g. a sliding window) with the same
            conventions, joining the same softmax.
        d_rope (int): the RoPE width of FP8 rows (64 for V3.2 and MODEL1).
        ranges, block_table (Tensor | None): the range form of the first source instead of ``indices``: ``[B, s_q,
            2]`` int32 ``(start, end)`` positions per query, mapped to slots through the cache's ``[B,
            pages_per_sequence]`` int32 block table (:func:`range_slots`; e.g. DeepSeek-V4's window ``[t - 127, t +
            1)``). extra_ranges, extra_block_table: the same for the second source (e.g. HCA's ``[0, (t + 1) //
            128)``).

    Returns:
        out ``[B, s_q, H, d_v]`` in q's dtype and lse ``[B, s_q, H]`` float32 (natural log, the sink excluded,
        ``-inf`` and ``out = 0`` for a query with nothing valid): :func:`sparse_mla` over the gathered rows.

    Cost: only the rows the valid entries name are read (and dequantised), so a call costs O(B * s_q * topk) rows
    whatever the cache holds; the caches may have any strides and are never copied (except the named pages of a
    MODEL1 cache whose page rows do not lie back to back; FlashMLA's layout keeps them so). Queries are processed in
    chunks whose gathered rows stay under ``CHUNK_ELEMENTS``.
    """
    if q.dim() != 4:
        raise ValueError(f"sparse_mla_decode: q must be [B, s_q, H, d_qk], got {tuple(q.shape)}")
    indices = _source_slots("", q, validation.SourceArgs(kv_cache, indices, topk_length, ranges, block_table))
    extra_indices = _source_slots("extra_", q, validation.SourceArgs(extra_kv_cache, extra_indices, extra_topk_length,
                                                                     extra_ranges, extra_block_table))  # fmt: skip
    if indices is None or indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(
            f"sparse_mla_decode: q must be [B, s_q, H, d_qk] and indices [B, s_q, topk], got {tuple(q.shape)} and "
            f"{None if indices is None else tuple(indices.shape)}"
        )
    if (extra_kv_cache is None) != (extra_indices is None):
        raise ValueError("sparse_mla_decode: extra_kv_cache and extra_indices go together")
    width = q.shape[-1]
    for name, c in (("kv_cache", kv_cache), ("extra_kv_cache", extra_kv_cache)):
        if c is not None:
            _cache_layout(c, width, d_rope, name)
    validation.check_decode_attention_args(q, sm_scale, d_v, attn_sink)
    sources = decode_sources(kv_cache, indices, topk_length, extra_kv_cache, extra_indices, extra_topk_length)
    return sparse_mla_decode_impl(q, sources, float(sm_scale), int(d_v), attn_sink, int(d_rope))


def decode_sources(
    kv_cache: Tensor, indices: Tensor, topk_length: OptTensor, extra_kv_cache: OptTensor, extra_indices: OptTensor,
    extra_topk_length: OptTensor,
) -> tuple[Source, ...]:  # fmt: skip
    """The one or two slot-list sources of a ``sparse_mla_decode`` call (ranges already turned into slots; the
    second one only with ``extra_kv_cache``)."""
    sources = [Source(kv_cache, indices, topk_length, False)]
    if extra_kv_cache is not None:
        sources.append(Source(extra_kv_cache, extra_indices, extra_topk_length, False))
    return tuple(sources)


def sparse_mla_decode_impl(
    q: Tensor, sources: Sequence[Source], sm_scale: float, d_v: int, attn_sink: OptTensor, d_rope: int
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_mla_decode` without validation, for callers that validated the inputs already (``dsa.ops``):
    ``sources`` are the one or two caches with their slot lists (``dsa.reference.sources.Source``: ``kv`` the cache
    pages, ``indices [B, s_q, topk]`` int32 slots, ``topk_length [B]`` or ``[B, s_q]`` int32 or None; never ranged)."""
    batch, s_q, heads, width = q.shape
    n = batch * s_q

    def layout(c: Tensor) -> kv_format.FP8Layout | None:
        return validation.fp8_cache_layout(width, d_rope, c.shape[-1]) if validation.is_fp8_cache(c) else None

    # One decode query is one row of every source: [B * s_q, topk] slots and [B * s_q] lengths.
    sources = [(s.kv, layout(s.kv), s.indices.reshape(n, -1), _per_query_lengths(s.topk_length, n)) for s in sources]
    entries = sum(s[2].shape[-1] for s in sources)
    q_rows = q.reshape(n, 1, heads, width)
    out = torch.empty((n, 1, heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, 1, heads), dtype=compute_dtype(q.dtype), device=q.device)
    step = _chunk_rows(entries * max(width, heads), n)
    for r0 in range(0, n, step):
        r = slice(r0, min(n, r0 + step))
        gathered = [_source_rows(c, layout, slots[r], None if length is None else length[r], width)
                    for c, layout, slots, length in sources]  # fmt: skip
        rows = torch.cat([g[0] for g in gathered], dim=1).to(q.dtype)  # [c, entries, width]
        valid = torch.cat([g[1] for g in gathered], dim=1)
        # Each query attends to its own gathered rows: position j of its row, -1 where the entry was invalid.
        local = torch.arange(entries, device=q.device).to(torch.int32).expand(valid.shape)
        local = torch.where(valid, local, INVALID_INDEX).unsqueeze(1)
        out[r], lse[r] = sparse_mla_impl(q_rows[r], rows, local, sm_scale, d_v, None, attn_sink)
    return out.view(batch, s_q, heads, d_v), lse.view(batch, s_q, heads)


def index_topk_decode(
    q: Tensor,
    k_cache: Tensor,
    weights: Tensor,
    topk: int,
    *,
    block_table: Tensor,
    ends: Tensor,
    starts: OptTensor = None,
    return_scores: bool = False,
    key_layout: str = "rows",
) -> Tensor | tuple[Tensor, Tensor]:
    """The indexer's top-k for decoding: the ``s_q`` new queries of each sequence against its keys in a paged cache.

    Args:
        q (Tensor): ``[B, s_q, H_i, D_i]``, as in :func:`index_scores` (FP8, bf16, float32/float64).
        k_cache (Tensor): ``[num_pages, page_size, D_i]`` in q's dtype, or for FP8 ``q`` the FP8 key rows
            ``[num_pages, page_size, D_i + 4]`` uint8 (``dsa.kv_format.index_key_layout``: the key's FP8 bytes, then its
            float32 scale); with ``key_layout="paged"`` the same bytes in DeepGEMM's and vLLM's per-page layout (a
            page's values, then its scales; vLLM's ``[num_pages, page_size, 1, D_i + 4]`` view is taken too).
        weights (Tensor): ``[B, s_q, H_i]`` float32.
        topk (int): ``>= 1``.
        block_table (Tensor): ``[B, pages_per_sequence]`` int32 (``dsa.serving.cache.PagedKVCache.block_table``).
        ends, starts (Tensor): ``[B, s_q]`` int32: query ``t`` of sequence ``b`` sees the key positions ``starts <= s
            < ends`` (``starts`` default 0; for the newest tokens of sequences of ``L`` cached tokens, ``ends = L -
            s_q + t + 1``). A position whose page entry is negative, or whose slot lies past the cache, is invisible.
            The op has no record of which rows were written: ``ends`` must not pass a sequence's written length,
            or the rows past it are scored as they are stored (a fresh ``PagedKVCache`` holds zero keys there,
            which score 0). ``dsa.serving.model_cache.select_from_cache`` clamps ``ends`` to the cache's ``seq_lens``.
        return_scores (bool): also return the selected positions' scores.
        key_layout (str): the FP8 key cache's byte layout, ``"rows"`` or ``"paged"``
            (``dsa.kv_format.INDEX_KEY_LAYOUTS``; both are ``page_size * (D_i + 4)`` bytes a page, so it is a keyword).

    Returns:
        indices ``[B, s_q, topk]`` int32 logical **positions** (map them with ``dsa.kv_format.positions_to_slots``), a set
        per row, ``-1`` padding, ties to the smaller position; with ``return_scores`` also their scores (float32,
        ``-inf`` at padding): :func:`index_topk` over the keys gathered through the block table.
    """
    validation.check_index_topk_decode(q, k_cache, weights, topk, block_table, ends, starts, key_layout=key_layout)
    keys = PagedKeys(k_cache, block_table, key_layout)
    indices, scores = index_topk_decode_impl(q, keys, weights, int(topk), ends, starts)
    return (indices, scores) if return_scores else indices


class PagedKeys(NamedTuple):
    """The indexer's keys in a paged cache, as ``index_topk_decode`` reads them (passed as one value from the op to
    the implementations).

    Attributes:
        cache (Tensor): ``k_cache``: ``[num_pages, page_size, D_i]`` in q's dtype, or FP8 key rows ``[num_pages,
            page_size, D_i + 4]`` bytes (vLLM's ``[num_pages, page_size, 1, D_i + 4]`` too).
        block_table (Tensor): ``[B, pages_per_sequence]`` int32: the pages of each sequence's positions.
        layout (str): the FP8 bytes' order, ``"rows"`` or ``"paged"`` (``dsa.kv_format.INDEX_KEY_LAYOUTS``).
    """

    cache: Tensor
    block_table: Tensor
    layout: str = "rows"


def index_topk_decode_impl(
    q: Tensor, keys: PagedKeys, weights: Tensor, topk: int, ends: Tensor, starts: OptTensor
) -> tuple[Tensor, Tensor]:
    """:func:`index_topk_decode` without validation (for callers that validated the inputs already, ``dsa.ops``):
    ``(positions, scores)``, each ``[B, s_q, topk]``."""
    k_cache, block_table, key_layout = keys
    batch = q.shape[0]
    page_size = k_cache.shape[1]
    # Keys at or past every query's end are invisible: read positions up to the largest end only, so the cost follows
    # the context, not the block table's (or the cache's) capacity.
    horizon = max(1, min(block_table.shape[1] * page_size, int(ends.max())))
    positions = torch.arange(horizon, device=q.device).expand(batch, -1)
    table = block_table[:, : -(-horizon // page_size)]  # the pages those positions lie on
    slots = kv_format.positions_to_slots(table, page_size, positions, num_slots=k_cache.shape[0] * page_size)
    # Read by page and offset (any strides; the cache is never flattened or copied). An invalid slot reads row 0 of
    # page 0, and its score is replaced by -inf below.
    safe = slots.clamp_min(0).to(torch.int64)
    page, offset = safe // page_size, safe % page_size
    k_scale = None
    if q.dtype in validation.FP8_DTYPES:
        # Either layout: the keys' FP8 bytes and scale bytes as [num_pages, page_size, *] views.
        values, scales = kv_format.index_key_sections(k_cache, q.shape[-1], key_layout)
        k = values[page, offset].view(torch.float8_e4m3fn)
        k_scale = scales[page, offset].view(torch.float32).squeeze(-1)
    else:
        k = k_cache[page, offset]
    if starts is None:
        starts = torch.zeros_like(ends)
    scores = index_scores_impl(q, k, weights, k_scale, starts, ends)
    scores = scores.masked_fill((slots < 0).unsqueeze(1), float("-inf"))
    indices = topk_indices_impl(scores, topk)
    picked = scores.gather(-1, indices.clamp_min(0).long()).masked_fill(indices < 0, float("-inf"))
    return indices, picked

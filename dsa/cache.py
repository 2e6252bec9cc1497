"""The paged KV caches and their byte layouts under their first public name (``dsa.cache.*``): re-exports of
``dsa.serving.cache`` (``PagedKVCache``) and ``dsa.kv_format`` (FP8 layouts, quantise/dequantise, index-key rows,
slots), where they live."""

from __future__ import annotations

from dsa import kv_format
from dsa.kv_format import (
    FP8_MAX,
    INDEX_KEY_LAYOUTS,
    INVALID_SLOT,
    MODEL1_FP8_LAYOUT,
    SCALE_FLOOR,
    V32_FP8_LAYOUT,
    FP8Layout,
    dequantize_kv_fp8,
    dequantize_kv_pages_fp8,
    flash_mla_kv_view,
    index_key_layout,
    index_key_sections,
    kv_page_sections,
    pack_index_key_pages_fp8,
    pack_index_keys_fp8,
    page_rows,
    positions_to_slots,
    quantize_kv_fp8,
    quantize_kv_pages_fp8,
    relayout_index_keys,
    unpack_index_key_pages_fp8,
    unpack_index_keys_fp8,
)
from dsa.serving.cache import PagedKVCache

# The public names are kv_format's own list (one place to add a layout or helper), less its FP8 internals, plus the
# cache class; the explicit import above keeps the names visible to readers and type checkers.
_KV_FORMAT_INTERNALS = frozenset({"FP8_AMAX_FLOOR", "FP8_DTYPE", "quantize_fp8_blockwise"})
__all__ = sorted([*(name for name in kv_format.__all__ if name not in _KV_FORMAT_INTERNALS), "PagedKVCache"])

"""The model cache under its first name (``dsa.generation.*``): a re-export of ``dsa.serving.model_cache``, where
``LayerCache``, ``ModelCache``, ``select_from_cache`` and the packed/padded batch helpers live."""

from __future__ import annotations

from dsa.serving.model_cache import (
    CacheDtype,
    LayerCache,
    ModelCache,
    compact_rows,
    mask_runs,
    packed_ranges,
    padded_ranges,
    restore_rows,
    select_from_cache,
)

__all__ = [
    "CacheDtype",
    "LayerCache",
    "ModelCache",
    "compact_rows",
    "mask_runs",
    "packed_ranges",
    "padded_ranges",
    "restore_rows",
    "select_from_cache",
]

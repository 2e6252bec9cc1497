"""FlashMLA-compatible entry points under their first public name (``dsa.compat.*``): re-exports of
``dsa.serving.flashmla`` (``flash_mla_sparse_fwd``) and ``dsa.serving.flashmla_decode`` (``get_mla_metadata``,
``flash_mla_with_kvcache``, ``FlashMLASchedMeta``), whose docstrings give the conventions."""

from __future__ import annotations

from dsa.serving.flashmla import LOG2_E, flash_mla_sparse_fwd
from dsa.serving.flashmla_decode import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

__all__ = ["LOG2_E", "FlashMLASchedMeta", "flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata"]

"""The DSA modules under their first name (``dsa.modules.*``): re-exports of the models room, ``dsa.models``
(``config``, ``rope``, ``indexer``, ``attention``, ``tiny``), where they live; ``quantize_fp8_blockwise`` lives in
``dsa.kv_format``."""

from __future__ import annotations

from dsa.kv_format import FP8_AMAX_FLOOR, FP8_DTYPE, FP8_MAX, quantize_fp8_blockwise
from dsa.models.attention import AttentionAux, DSAttention
from dsa.models.config import (
    DENSE,
    DENSE_SCORES,
    SELECTED_SCORES,
    SPARSE,
    AttentionMode,
    DSAConfig,
    IndexerScores,
)
from dsa.models.indexer import IndexerOutput, IndexerProjection, LightningIndexer, hadamard_transform
from dsa.models.rope import apply_rope, rope_cos_sin, rope_cos_sin_at, rope_inv_freq
from dsa.models.tiny import CHECKPOINT_FORMAT, TinyDSAModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "DENSE",
    "DENSE_SCORES",
    "FP8_AMAX_FLOOR",
    "FP8_DTYPE",
    "FP8_MAX",
    "SELECTED_SCORES",
    "SPARSE",
    "AttentionAux",
    "AttentionMode",
    "DSAConfig",
    "DSAttention",
    "IndexerOutput",
    "IndexerProjection",
    "IndexerScores",
    "LightningIndexer",
    "TinyDSAModel",
    "apply_rope",
    "hadamard_transform",
    "quantize_fp8_blockwise",
    "rope_cos_sin",
    "rope_cos_sin_at",
    "rope_inv_freq",
]

"""What every reference op shares: the compute dtype, the chunk budget, the invalid index and its mask."""

from __future__ import annotations

import torch
from torch import Tensor

OptTensor = Tensor | None

# Elements of the largest intermediate a chunk may hold (about 64 MB of float32), which bounds the reference's memory.
CHUNK_ELEMENTS = 1 << 24
INVALID_INDEX = -1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64 (gradcheck, oracles); everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(per_row_elements: int, rows: int) -> int:
    """How many query rows one chunk may hold so that it stays under ``CHUNK_ELEMENTS``."""
    return max(1, min(rows, CHUNK_ELEMENTS // max(1, per_row_elements)))


def valid_index_mask(indices: torch.Tensor, seq_kv: int, topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S, k]`` bool: ``0 <= idx < S_kv`` and, with ``topk_length [B, S]``, position in the row ``< topk_length``."""
    valid = (indices >= 0) & (indices < seq_kv)
    if topk_length is not None:
        position = torch.arange(indices.shape[-1], device=indices.device)
        valid = valid & (position.view(1, 1, -1) < topk_length.unsqueeze(-1).to(torch.int64))
    return valid

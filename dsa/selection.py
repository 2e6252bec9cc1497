"""``index_topk`` through the unfused kernels, chunked over queries under a memory budget.

The indexer kernel writes every score of a chunk of query rows (``[B, rows, S_kv]`` float32), the top-k kernel
selects from it, and the chunk is dropped before the next one: peak memory is one chunk, never ``[B, S, S_kv]``.
The budget is ``DSA_INDEXER_MEMORY_BYTES`` (default a quarter of the free device memory on GPU, 1 GiB on CPU); a
problem whose single query row is over budget raises instead of silently exceeding it.

Causal chunks keep the kernel's causal mode (it skips invisible key blocks): rows ``[t0, t1)`` of a causal problem
see exactly the keys ``[0, t1 + S_kv - S)``, and the kernel's bottom-right alignment over that prefix is the
original one. Ranged problems (``starts``/``ends``) pass each chunk's slice of the ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from dsa import env, reference

__all__ = ["CPU_DEFAULT_BUDGET_BYTES", "IndexerInputs", "chunk_rows", "chunked_index_topk", "memory_budget_bytes"]

CPU_DEFAULT_BUDGET_BYTES = 1 << 30
# Of the free GPU memory, the share one chunk of scores may take: the rest is the caller's (activations, caches).
GPU_FREE_MEMORY_SHARE = 4
SCORE_BYTES = 4  # float32

ScoresFn = Callable[..., torch.Tensor]
TopkFn = Callable[[torch.Tensor, int], torch.Tensor]


def memory_budget_bytes(device: torch.device) -> int:
    """The byte budget of one chunk of scores on ``device``: ``DSA_INDEXER_MEMORY_BYTES`` when set, else a quarter of
    the free memory of a CUDA device, else 1 GiB."""
    configured = env.indexer_memory_bytes()
    if configured is not None:
        return configured
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // GPU_FREE_MEMORY_SHARE)
    return CPU_DEFAULT_BUDGET_BYTES


def chunk_rows(batch: int, seq: int, seq_kv: int, budget_bytes: int) -> int:
    """Query rows per chunk so that ``[batch, rows, seq_kv]`` float32 scores fit in ``budget_bytes``.

    Raises:
        ValueError: one query row of scores alone is over the budget.
    """
    row_bytes = batch * seq_kv * SCORE_BYTES
    rows = budget_bytes // row_bytes
    if rows < 1:
        raise ValueError(
            f"index_topk: one query row of scores needs {row_bytes} bytes (B={batch}, S_kv={seq_kv}), over the "
            f"DSA_INDEXER_MEMORY_BYTES budget of {budget_bytes} bytes; raise the budget"
        )
    return min(seq, rows)


class IndexerInputs(NamedTuple):
    """The validated inputs of one indexer call (``index_scores``/``index_topk``), passed as one value.

    Attributes:
        q (Tensor): ``[B, S, H_i, D_i]``.
        k (Tensor): ``[B, S_kv, D_i]``, q's dtype.
        weights (Tensor): ``[B, S, H_i]`` float32.
        k_scale (Tensor | None): ``[B, S_kv]`` float32 (FP8 keys only).
        starts, ends (Tensor | None): ``[B, S]`` int32, together: query ``t`` sees ``starts <= s < ends``; None:
            causal, aligned bottom-right.
    """

    q: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor
    k_scale: torch.Tensor | None
    starts: torch.Tensor | None
    ends: torch.Tensor | None

    def rows(self, t0: int, t1: int) -> IndexerInputs | None:
        """The inputs of query rows ``t0 .. t1 - 1`` alone, contiguous: their ``q``, ``weights`` and ranges, and
        (causal) only the keys they can see, ``[0, t1 + S_kv - S)``, where the kernel's bottom-right alignment over
        that prefix is the original one. None when they see no key at all (causal, ``S_kv < S``)."""
        q, k, weights, k_scale, starts, ends = self
        q_c, w_c = q[:, t0:t1].contiguous(), weights[:, t0:t1].contiguous()
        if starts is None or ends is None:
            visible = min(k.shape[1], t1 + k.shape[1] - q.shape[1])
            if visible <= 0:
                return None
            ks_c = None if k_scale is None else k_scale[:, :visible].contiguous()
            return IndexerInputs(q_c, k[:, :visible].contiguous(), w_c, ks_c, None, None)
        return IndexerInputs(q_c, k, w_c, k_scale, starts[:, t0:t1].contiguous(), ends[:, t0:t1].contiguous())


def chunked_index_topk(
    inputs: IndexerInputs, topk: int, *, index_scores: ScoresFn, topk_indices: TopkFn, budget_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_indices(index_scores(q, k, weights, ...), topk)`` and the selected scores, one chunk of rows at a time.

    Args:
        inputs (IndexerInputs): validated inputs of ``index_topk``.
        topk (int): entries per row.
        index_scores: the scores primitive, called as ``index_scores(q, k, weights, k_scale=, starts=, ends=)`` with
            contiguous chunk tensors; returns ``[B, rows, n]`` float32.
        topk_indices: the selection primitive, ``topk_indices(scores, topk) -> [B, rows, topk]`` int32.
        budget_bytes (int): the most bytes of scores held at once.

    Returns:
        indices ``[B, S, topk]`` int32 (``-1`` padding) and scores ``[B, S, topk]`` float32 (``-inf`` at padding).
    """
    q = inputs.q
    batch, seq = q.shape[:2]
    step = chunk_rows(batch, seq, inputs.k.shape[1], budget_bytes)
    indices = torch.full((batch, seq, topk), reference.INVALID_INDEX, dtype=torch.int32, device=q.device)
    scores = torch.full((batch, seq, topk), float("-inf"), dtype=torch.float32, device=q.device)
    for t0 in range(0, seq, step):
        t1 = min(seq, t0 + step)
        chunk_inputs = inputs.rows(t0, t1)
        if chunk_inputs is None:  # S_kv < S: these rows see no key at all
            continue
        q_c, k_c, w_c, ks_c, st_c, en_c = chunk_inputs
        chunk = index_scores(q_c, k_c, w_c, k_scale=ks_c, starts=st_c, ends=en_c)
        picked = topk_indices(chunk, topk)
        indices[:, t0:t1] = picked
        scores[:, t0:t1] = reference.gather_scores(chunk, picked)
        del chunk
    return indices, scores

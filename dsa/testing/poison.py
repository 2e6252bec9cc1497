"""Poisoning: NaN (or a sentinel) in every output a kernel must write, and non-finite values in every row no valid
index selects, so that a kernel that skips a masked row or reads an invalid one fails the comparison."""

from __future__ import annotations

import torch

from dsa import reference

INT_POISON = -(2**31) + 7
"""What integer outputs are poisoned with: no kernel may legitimately write it (indices are >= -1)."""
_E4M3_NAN_BITS = 0x7F


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating dtypes) or :data:`INT_POISON` (integers) and return it.

    Kernel outputs are poisoned before every call so that an element the kernel forgot to write fails the check.
    """
    if t.dtype.is_floating_point:
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(_E4M3_NAN_BITS)  # e4m3fn's only NaN code
        else:
            t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        raise TypeError("cannot poison a bool tensor")
    else:
        t.fill_(max(INT_POISON, torch.iinfo(t.dtype).min))
    return t


def poisoned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A drop-in for ``dsa.launch.common.new_output``: a new tensor that starts poisoned (see :func:`poison`)."""
    return poison(torch.empty(shape, dtype=dtype, device=device))



def index_mask(indices: torch.Tensor, seq_kv: int, topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S, S_kv]`` bool mask of the valid entries of ``indices [B, S, k]`` (for unique indices: the dense
    oracle's mask); validity is ``dsa.reference.valid_index_mask``'s."""
    valid = reference.valid_index_mask(indices, seq_kv, topk_length)
    mask = torch.zeros((*indices.shape[:2], seq_kv + 1), dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(valid, indices.to(torch.int64), seq_kv), True)
    return mask[..., :seq_kv]


# Values an unwritten cache slot may hold: every non-finite kind, cycled over the poisoned rows.
_NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def poison_unreferenced_rows(
    kv: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``kv [B, S_kv, D]`` whose rows that no valid entry of ``indices [B, S, k]`` selects hold NaN/±inf.

    Invalid entries (out of range, negative, or past ``topk_length``) may still point at such rows, or be clamped
    onto them (row 0, row S_kv - 1): the contract is that they contribute nothing, whatever the memory holds.
    Returns ``(poisoned kv, unreferenced [B, S_kv] bool)``.
    """
    referenced = index_mask(indices, kv.shape[1], topk_length).any(dim=1)
    unreferenced = ~referenced
    poisoned = kv.detach().clone()
    for n, (b, r) in enumerate(unreferenced.nonzero().tolist()):
        poisoned[b, r] = _NON_FINITE[n % len(_NON_FINITE)]
    return poisoned, unreferenced

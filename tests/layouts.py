"""Memory layouts for stride tests: the same values (or, for ``broadcast``, values repeated along one dimension) in
tensors whose strides, alignment or storage differ from a fresh row-major tensor.

Every public op accepts any strides on every backend (``dsa.validation.kernel_layout``); these helpers make the
inputs that check it. ``padded`` is the layout FlashMLA's own tests pass (``tests/kernelkit/generate.py`` of
deepseek-ai/FlashMLA: a slice of a buffer one element larger in every dimension and 128 elements wider in the last,
written here from that description).
"""

from __future__ import annotations

import torch

LAYOUTS = ("row_major", "column_major", "padded", "stepped", "misaligned", "broadcast")
"""Every layout :func:`relaid` makes; ``broadcast`` repeats values (stride 0), the others keep them."""

VALUE_PRESERVING = tuple(kind for kind in LAYOUTS if kind != "broadcast")
"""The layouts that keep every value (for tensors whose values must not change, e.g. a poisoned cache)."""

_ALIGNMENT_BYTES = 16


def _padded(t: torch.Tensor) -> torch.Tensor:
    shape = [size + 128 if dim == t.dim() - 1 else size + 1 for dim, size in enumerate(t.shape)]
    buffer = torch.empty(shape, dtype=t.dtype, device=t.device)
    view = buffer[tuple(slice(0, size) for size in t.shape)]
    view.copy_(t)
    return view


def _stepped(t: torch.Tensor) -> torch.Tensor:
    """Every other element of a buffer twice as wide in the last dimension: last-dimension stride 2."""
    buffer = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    view = buffer[..., ::2]
    view.copy_(t)
    return view


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The dimensions stored in reverse order (a transposed tensor); a 1-D tensor gets stride 2 instead."""
    if t.dim() < 2:
        return _stepped(t)
    order = list(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A row-major view whose first element is not on a 16-byte boundary (one element into a larger buffer; for
    one-byte dtypes, one byte: the FP8 cache bytes a launcher would view as float32 scales)."""
    buffer = torch.empty(t.numel() + _ALIGNMENT_BYTES, dtype=t.dtype, device=t.device)
    start = next(i for i in range(1, _ALIGNMENT_BYTES + 1) if (buffer.data_ptr() + i * t.element_size()) % 16)
    view = buffer[start : start + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """The first slice along the first dimension longer than 1, expanded over it (stride 0); unchanged if none."""
    dim = next((d for d, size in enumerate(t.shape) if size > 1), None)
    if dim is None:
        return t.clone()
    return t.narrow(dim, 0, 1).expand(t.shape)


def relaid(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """``t`` in layout ``kind`` (one of :data:`LAYOUTS`); ``None`` stays ``None``. Every kind but ``broadcast`` holds
    exactly ``t``'s values; ``broadcast`` holds ``t``'s first slice repeated (compare ops on it against the same op
    on ``relaid(...).contiguous()``, not on ``t``)."""
    if t is None:
        return None
    make = {
        "row_major": lambda x: x.clone(),
        "column_major": _column_major,
        "padded": _padded,
        "stepped": _stepped,
        "misaligned": _misaligned,
        "broadcast": _broadcast,
    }[kind]
    return make(t)


def is_row_major_and_aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out as the kernels read it (what ``dsa.validation.kernel_layout`` leaves alone)."""
    return t.is_contiguous() and t.data_ptr() % _ALIGNMENT_BYTES == 0

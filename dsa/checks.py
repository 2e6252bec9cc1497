"""The primitives every input check is made of: each raises ``TypeError`` (wrong Python or tensor type, wrong dtype)
or ``ValueError`` (wrong rank, shape, device or value) with a message that names the argument and what was expected,
and :func:`names_op` prefixes the op's name. The op-level checks that compose them live in :mod:`dsa.validation`
(the one validator the ops call); :func:`kernel_layout` is the one place that lays a tensor out as the kernels read it.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

_Check = TypeVar("_Check", bound=Callable[..., Any])


def names_op(op: str) -> Callable[[_Check], _Check]:
    """Decorate a check so that every ``TypeError``/``ValueError`` it raises starts with ``"<op>: "``: two ops take a
    ``q``, and a user must see which one complained."""

    def decorate(check: _Check) -> _Check:
        @functools.wraps(check)
        def named(*args: Any, **kwargs: Any) -> Any:
            try:
                return check(*args, **kwargs)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{op}: {exc}") from None

        return named  # type: ignore[return-value]

    return decorate


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def require_tensor(name: str, t: object) -> torch.Tensor:
    """Return ``t`` if it is a tensor, else raise ``TypeError`` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")


def require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {shape_text(t.shape)}")


def require_shape(name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {shape_text(expected)}, got {shape_text(t.shape)}")


def require_nonempty(name: str, t: torch.Tensor, layout: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty: every dimension of {layout} must be >= 1, got {shape_text(t.shape)}")


def require_array(name: str, t: object, dtypes: Sequence[torch.dtype], rank: int, layout: str) -> torch.Tensor:
    """Return ``t`` if it is a non-empty tensor of one of ``dtypes`` with ``rank`` dimensions (``layout`` names them),
    checked in that order, else raise as :func:`require_tensor`, :func:`require_dtype`, :func:`require_rank` and
    :func:`require_nonempty` do."""
    t = require_tensor(name, t)
    require_dtype(name, t, dtypes)
    require_rank(name, t, rank, layout)
    require_nonempty(name, t, layout)
    return t


def require_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on the same device as {reference_name} ({reference.device}), got {t.device}")


KERNEL_ALIGNMENT_BYTES = 16
"""The byte boundary a kernel input must start on: the CUDA kernels load 16 bytes at a time (``cp.async``, vector
loads), and the launchers view FP8 cache bytes as float32 scales, which needs a 4-byte-aligned start."""


def kernel_layout(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as the kernels read it: row-major (``is_contiguous()``) and starting on a
    :data:`KERNEL_ALIGNMENT_BYTES` boundary. A tensor already laid out so is returned as it is (no copy); any other
    (transposed, sliced, expanded with stride 0, or a contiguous view starting mid-word) is copied once into a fresh
    row-major tensor. The copy is differentiable: gradients reach the strided original. ``None`` stays ``None``.

    Under ``torch.compile`` (fake tensors have no address) only row-major order is enforced.
    """
    if t is None:
        return None
    if torch.compiler.is_compiling():
        return t.contiguous()
    if t.is_contiguous() and t.data_ptr() % KERNEL_ALIGNMENT_BYTES == 0:
        return t
    # clone, not contiguous(): a contiguous view that starts mid-word must move too.
    return t.clone(memory_format=torch.contiguous_format)


def require_positive_int(name: str, value: object) -> int:
    # The exact-type test first: an ABC isinstance check costs most of a microsecond on every launch.
    if type(value) is int and value >= 1:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def require_scale(name: str, value: object) -> float:
    if type(value) is float and 0.0 < value < math.inf:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive float, got {value}")
    return float(value)

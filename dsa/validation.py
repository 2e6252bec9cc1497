"""Input validation shared by the public ops and the reference (each call validates once).

Every check raises ``TypeError`` (wrong Python or tensor type, wrong dtype) or ``ValueError`` (wrong rank, shape,
device, layout or value), and the message names the op, the argument and what was expected, e.g.
``sparse_mla: q must have dtype bfloat16, got float16``. ``kernel=True`` applies the stricter rules of the TileLang
kernels (bfloat16 / float8 inputs only, contiguous tensors); the reference also takes float16 (the kernels do not yet:
float16 inputs run the reference on every device), float32 and float64 so that it can serve as an oracle and under
``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)
INDEXER_KERNEL_DTYPES = (torch.bfloat16, *FP8_DTYPES)
INDEXER_REFERENCE_DTYPES = (*INDEXER_KERNEL_DTYPES, torch.float16, torch.float32, torch.float64)
ATTENTION_KERNEL_DTYPES = (torch.bfloat16,)
ATTENTION_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPE = torch.int32

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


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def require_tensor(name: str, t: object) -> torch.Tensor:
    """Return ``t`` if it is a tensor, else raise ``TypeError`` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")


def require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {_shape(t.shape)}")


def require_shape(name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {_shape(expected)}, got {_shape(t.shape)}")


def require_nonempty(name: str, t: torch.Tensor, layout: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty: every dimension of {layout} must be >= 1, got {_shape(t.shape)}")


def require_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on the same device as {reference_name} ({reference.device}), got {t.device}")


def require_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major) for the kernels; call .contiguous() first")


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


def _check_indexer_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """The indexer's inputs, shared by ``index_scores`` and ``index_topk`` (each names itself in the message)."""
    require_tensor("q", q)
    require_tensor("k", k)
    require_tensor("weights", weights)
    require_dtype("q", q, INDEXER_KERNEL_DTYPES if kernel else INDEXER_REFERENCE_DTYPES)
    require_rank("q", q, 4, "[B, S, H_i, D_i]")
    require_rank("k", k, 3, "[B, S_kv, D_i]")
    require_nonempty("q", q, "[B, S, H_i, D_i]")
    require_nonempty("k", k, "[B, S_kv, D_i]")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the same dtype as q ({q.dtype}), got {k.dtype}")
    batch, seq, heads, dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k must have batch size {batch} like q, got shape {_shape(k.shape)}")
    if k.shape[2] != dim:
        raise ValueError(f"k must have head dim D_i = {dim} like q, got shape {_shape(k.shape)}")
    seq_kv = k.shape[1]
    weight_dtypes = (torch.float32,) if kernel or q.dtype != torch.float64 else (torch.float32, torch.float64)
    require_dtype("weights", weights, weight_dtypes)
    require_shape("weights", weights, (batch, seq, heads), "[B, S, H_i]")
    is_fp8 = q.dtype in FP8_DTYPES
    if is_fp8 and k_scale is None:
        raise ValueError("k_scale [B, S_kv] float32 is required when q and k are float8_e4m3fn")
    if not is_fp8 and k_scale is not None:
        raise ValueError(f"k_scale must be None when q and k are {str(q.dtype).removeprefix('torch.')} (FP8 only)")
    if k_scale is not None:
        require_tensor("k_scale", k_scale)
        require_dtype("k_scale", k_scale, (torch.float32,))
        require_shape("k_scale", k_scale, (batch, seq_kv), "[B, S_kv]")
    if (starts is None) != (ends is None):
        raise ValueError("starts and ends must be given together (both [B, S] int32) or both omitted for causal")
    for name, t in (("starts", starts), ("ends", ends)):
        if t is not None:
            require_tensor(name, t)
            require_dtype(name, t, (INDEX_DTYPE,))
            require_shape(name, t, (batch, seq), "[B, S]")
    require_same_device("q", q, k=k, weights=weights, k_scale=k_scale, starts=starts, ends=ends)
    if kernel:
        for name, t in (("q", q), ("k", k), ("weights", weights), ("k_scale", k_scale), ("starts", starts), ("ends", ends)):
            if t is not None:
                require_contiguous(name, t)


@names_op("index_scores")
def check_index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """Validate the inputs of ``index_scores`` (see ``dsa.reference.index_scores`` for the contract)."""
    _check_indexer_inputs(q, k, weights, k_scale, starts, ends, kernel=kernel)


@names_op("index_topk")
def check_index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: object,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """Validate the inputs of ``index_topk`` (see ``dsa.reference.index_topk``)."""
    _check_indexer_inputs(q, k, weights, k_scale, starts, ends, kernel=kernel)
    require_positive_int("topk", topk)


@names_op("topk_indices")
def check_topk_indices(scores: torch.Tensor, k: object, *, kernel: bool = False) -> None:
    """Validate the inputs of ``topk_indices`` (see ``dsa.reference.topk_indices``)."""
    require_tensor("scores", scores)
    require_dtype("scores", scores, (torch.float32,) if kernel else (torch.float32, torch.float64))
    require_rank("scores", scores, 3, "[B, S, S_kv]")
    require_nonempty("scores", scores, "[B, S, S_kv]")
    require_positive_int("k", k)
    if kernel:
        require_contiguous("scores", scores)


@names_op("sparse_mla")
def check_sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: object,
    d_v: object,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    *,
    kernel: bool = False,
) -> None:
    """Validate the inputs of ``sparse_mla`` (see ``dsa.reference.sparse_mla``)."""
    require_tensor("q", q)
    require_tensor("kv", kv)
    require_tensor("indices", indices)
    require_dtype("q", q, ATTENTION_KERNEL_DTYPES if kernel else ATTENTION_REFERENCE_DTYPES)
    require_rank("q", q, 4, "[B, S, H, d_qk]")
    require_rank("kv", kv, 3, "[B, S_kv, d_qk]")
    require_rank("indices", indices, 3, "[B, S, k]")
    require_nonempty("q", q, "[B, S, H, d_qk]")
    require_nonempty("kv", kv, "[B, S_kv, d_qk]")
    require_nonempty("indices", indices, "[B, S, k]")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv must have the same dtype as q ({q.dtype}), got {kv.dtype}")
    require_dtype("indices", indices, (INDEX_DTYPE,))
    batch, seq, heads, d_qk = q.shape
    if kv.shape[0] != batch:
        raise ValueError(f"kv must have batch size {batch} like q, got shape {_shape(kv.shape)}")
    if kv.shape[2] != d_qk:
        raise ValueError(f"kv must have d_qk = {d_qk} columns like q, got shape {_shape(kv.shape)}")
    if indices.shape[0] != batch or indices.shape[1] != seq:
        raise ValueError(f"indices must have shape [B, S, k] with B = {batch}, S = {seq} like q, got {_shape(indices.shape)}")
    require_scale("sm_scale", sm_scale)
    d_v = require_positive_int("d_v", d_v)
    if d_v > d_qk:
        raise ValueError(f"d_v must be <= d_qk = {d_qk} (V is the first d_v columns of kv), got {d_v}")
    if topk_length is not None:
        require_tensor("topk_length", topk_length)
        require_dtype("topk_length", topk_length, (INDEX_DTYPE,))
        require_shape("topk_length", topk_length, (batch, seq), "[B, S]")
    if attn_sink is not None:
        require_tensor("attn_sink", attn_sink)
        sink_dtypes = (torch.float32,) if q.dtype != torch.float64 else (torch.float32, torch.float64)
        require_dtype("attn_sink", attn_sink, sink_dtypes)
        require_shape("attn_sink", attn_sink, (heads,), "[H]")
    require_same_device("q", q, kv=kv, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    if kernel:
        for name, t in (("q", q), ("kv", kv), ("indices", indices), ("topk_length", topk_length), ("attn_sink", attn_sink)):
            if t is not None:
                require_contiguous(name, t)

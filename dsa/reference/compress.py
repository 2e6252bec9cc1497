"""DeepSeek-V4's KV compression (``compress_kv``): learned gated pooling of raw token rows into compressed entries.

V4's compressed layers keep one KV entry per window of ``rate`` raw tokens. Each entry is a per-channel softmax-gated
sum of the window's rows: ``entry[c] = sum_j softmax_j(gate[j, c] + position_bias[j, c]) * kv[j, c]``.

- **HCA** (heavily compressed attention, ``overlap=False``, rate 128 in V4): disjoint windows; ``kv``/``gate`` have
  ``W = d`` columns.
- **CSA** (compressed sparse attention, ``overlap=True``, rate 4 in V4): each token projects to two series, ``Ca =
  [..., :d]`` and ``Cb = [..., d:]`` (``W = 2 d``). Entry ``w`` pools window ``w - 1``'s ``Ca`` rows together with
  window ``w``'s ``Cb`` rows in one softmax over ``2 * rate`` slots (width ``2 * rate``, stride ``rate``). Window
  0's ``Ca`` half comes from the caller's carried state (``prev_kv``/``prev_gate``: the previous call's last window)
  or, without it, is empty (weight 0).

The numerics are transformers' (``DeepseekV4HCACompressor``/``DeepseekV4CSACompressor``): the logits ``gate +
position_bias`` in the promoted dtype (float32 for a bfloat16 gate), the softmax in float32 (float64 for float64
inputs), the weights rounded to ``kv``'s dtype, then the product and the window sum in ``kv``'s dtype. RMSNorm and
RoPE of the entries are the caller's (they are per entry and cheap; V4 applies them after pooling).
"""

from __future__ import annotations

import torch

from dsa import validation
from dsa.reference.common import OptTensor, compute_dtype

__all__ = ["compress_kv", "compress_kv_impl"]


def compress_kv(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    *,
    rate: int,
    overlap: bool,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool every window of ``rate`` rows into one compressed entry (the module docstring's rule).

    Args:
        kv (torch.Tensor): ``[B, n * rate, W]``, bfloat16, float16, float32 or float64: the raw rows of ``n`` whole
            windows (a caller decoding token by token buffers a partial window until it is complete). ``W = d``
            (HCA) or ``2 d`` (CSA: ``Ca | Cb``). ``n = 0`` gives ``n = 0`` entries.
        gate (torch.Tensor): ``[B, n * rate, W]``, one of kv's dtypes: the gate logits of the same rows.
        position_bias (torch.Tensor): ``[rate, W]`` float32 (float32 or float64 for float64 kv): a learned logit per
            slot of the window and channel, added to ``gate``.
        rate (int): the window length (tokens per compressed entry), >= 1.
        overlap (bool): CSA's overlapping two-series windows (True) or HCA's disjoint ones (False).
        prev_kv (torch.Tensor | None): ``[B, rate, d]``, kv's dtype, overlap only: the ``Ca`` rows (``kv[..., :d]``)
            of the window just before this call's first (the carried state of a caller that compresses in pieces).
            None: window 0 has no earlier window (the start of the sequence).
        prev_gate (torch.Tensor | None): ``[B, rate, d]``, gate's dtype: the raw ``Ca`` gate logits of the same rows
            (``gate[..., :d]``, without ``position_bias``: the op adds ``position_bias[:, :d]`` as it does for every
            ``Ca`` slot). Given together with ``prev_kv`` or not at all.

    Returns:
        ``[B, n, d]`` in kv's dtype: entry ``w`` pools raw rows ``w * rate .. (w + 1) * rate - 1`` (and, with
        ``overlap``, the ``Ca`` series of the ``rate`` rows before them).

    Raises:
        TypeError, ValueError: bad input (named, e.g. ``compress_kv: kv must have ...``).

    This function is also the op ``dsa.ops.compress_kv``: one implementation runs on every backend, this PyTorch
    code (a few fused elementwise ops and one reduction per window), differentiable in ``kv``, ``gate``,
    ``position_bias`` and the carried state. The op is memory-bound (it reads each row once and writes ``1 / rate``
    of it) and no TileLang kernel has been measured against it yet, so ``DSA_BACKEND`` does not change what runs.
    """
    validation.check_compress_kv(kv, gate, position_bias, rate, overlap, prev_kv, prev_gate)
    return compress_kv_impl(kv, gate, position_bias, int(rate), bool(overlap), prev_kv, prev_gate)


def compress_kv_impl(
    kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, rate: int, overlap: bool, prev_kv: OptTensor,
    prev_gate: OptTensor,
) -> torch.Tensor:  # fmt: skip
    """``compress_kv`` on inputs already validated."""
    batch, length, width = kv.shape
    windows = length // rate
    dim = width // 2 if overlap else width
    if windows == 0:
        return kv.new_empty((batch, 0, dim))
    chunk_kv = kv.reshape(batch, windows, rate, width)
    logits = gate.reshape(batch, windows, rate, width) + position_bias
    if overlap:
        chunk_kv, logits = _overlapping_windows(chunk_kv, logits, position_bias, dim, prev_kv, prev_gate)
    # The slot axis is 2; the weights are rounded to kv's dtype before the product, as transformers does.
    weights = logits.softmax(dim=2, dtype=compute_dtype(logits.dtype)).to(kv.dtype)
    return (chunk_kv * weights).sum(dim=2)


def _overlapping_windows(
    chunk_kv: torch.Tensor, logits: torch.Tensor, position_bias: torch.Tensor, dim: int, prev_kv: OptTensor,
    prev_gate: OptTensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """CSA's windows ``[B, n, 2 * rate, d]``: slots ``0 .. rate-1`` hold the previous window's ``Ca`` rows and
    logits, slots ``rate .. 2 rate - 1`` this window's ``Cb``; window 0's first half is the carried state, or rows
    of zeros with logit ``-inf`` (softmax weight exactly 0) when there is none."""
    batch, windows, rate, _ = chunk_kv.shape
    pooled_kv = chunk_kv.new_zeros((batch, windows, 2 * rate, dim))
    pooled_logits = logits.new_full((batch, windows, 2 * rate, dim), float("-inf"))
    pooled_kv[:, :, rate:] = chunk_kv[..., dim:]
    pooled_logits[:, :, rate:] = logits[..., dim:]
    pooled_kv[:, 1:, :rate] = chunk_kv[:, :-1, :, :dim]
    pooled_logits[:, 1:, :rate] = logits[:, :-1, :, :dim]
    if prev_kv is not None and prev_gate is not None:
        pooled_kv[:, 0, :rate] = prev_kv.to(pooled_kv.dtype)
        pooled_logits[:, 0, :rate] = (prev_gate + position_bias[:, :dim]).to(pooled_logits.dtype)
    return pooled_kv, pooled_logits

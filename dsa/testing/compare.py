"""Comparison: the one helper behind tests, the tuner's correctness gate and the benchmark's check, the
``topk_indices`` contract checked as sets, and two selections compared as sets (:func:`same_selection`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

DEFAULT_MAX_DIFF = 1e-4
"""Largest accepted :func:`scale_sensitive_diff`: bf16 rounding gives about 1e-5; a 1.5 % scale error 1.1e-4."""


def scale_sensitive_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``1 - 2 <x, y> / (|x|^2 + |y|^2)`` in float64: 0 for equal tensors, ``|x - y|^2 / (|x|^2 + |y|^2)`` in
    general, so a global scale error counts (cosine similarity is blind to it). Both all-zero: 0."""
    x = actual.detach().to(torch.float64).flatten()
    y = expected.detach().to(torch.float64).flatten()
    denominator = float((x * x).sum() + (y * y).sum())
    if denominator == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


def _describe_mismatch(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> str:
    where = mask.nonzero()[:limit].tolist()
    pairs = [f"{tuple(w)}: got {actual[tuple(w)].item()!r}, expected {expected[tuple(w)].item()!r}" for w in where]
    return f"{int(mask.sum())} of {mask.numel()} elements, e.g. " + "; ".join(pairs)


def compare(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    max_diff: float | None = DEFAULT_MAX_DIFF,
    name: str = "out",
) -> str | None:
    """``None`` when ``actual`` matches ``expected``, else the first reason it does not.

    Checks, in order: the same shape; NaN, ``+inf`` and ``-inf`` at the same positions; every finite value within
    ``atol + rtol * |expected|``; :func:`scale_sensitive_diff` of the finite values at most ``max_diff`` (``None``
    skips it). The last check is skipped when the whole reference is within ``atol`` of zero: then the elementwise
    check already bounds the error, and the rounding noise of a zero result has no scale to compare.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    for label, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = fn(a) != fn(e)
        if differ.any():
            return f"{name}: {label} positions differ: {_describe_mismatch(differ, a, e)}"
    finite = torch.isfinite(e)
    af, ef = a[finite], e[finite]
    if af.numel() == 0:
        return None
    bad = (af - ef).abs() > atol + rtol * ef.abs()
    if bad.any():
        full_bad = torch.zeros_like(finite)
        full_bad[finite] = bad
        worst = float((af - ef).abs().max())
        return (
            f"{name}: values outside atol={atol:g}, rtol={rtol:g} (max abs error {worst:.3g}): "
            f"{_describe_mismatch(full_bad, a, e)}"
        )
    if max_diff is not None and float(ef.abs().max()) > atol:
        diff = scale_sensitive_diff(af, ef)
        if diff > max_diff:
            norm_ratio = float(af.norm() / ef.norm()) if float(ef.norm()) > 0 else float("inf")
            return (
                f"{name}: scale-sensitive difference {diff:.3g} > {max_diff:g} (norm ratio actual/expected "
                f"{norm_ratio:.6f})"
            )
    return None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerances: Any) -> None:
    """Raise ``AssertionError`` with :func:`compare`'s reason when ``actual`` does not match ``expected``;
    ``tolerances`` are :func:`compare`'s keyword arguments (``atol``, ``rtol``, ``max_diff``, ``name``)."""
    problem = compare(actual, expected, **tolerances)
    if problem is not None:
        raise AssertionError(problem)


def topk_error(scores: torch.Tensor, indices: torch.Tensor, k: int) -> str | None:
    """``None`` when ``indices [B, S, k]`` int32 satisfies the ``topk_indices`` contract for ``scores [B, S, S_kv]``,
    else why not.

    Set semantics (the order within a row is free): every index in range or ``-1``; no index twice in a row; ``-1``
    padding exactly when the row has fewer than ``k`` finite scores (then every finite position is selected); never a
    ``-inf``, ``+inf`` or NaN position; every selected score >= every unselected finite score; and the tie rule: of
    the positions holding the smallest selected score, the selected ones are the smallest. Together these fix the
    set itself: it equals the reference's.
    """
    if indices.dtype != torch.int32:
        return f"indices: dtype {indices.dtype} != torch.int32"
    batch, seq, seq_kv = scores.shape
    if tuple(indices.shape) != (batch, seq, k):
        return f"indices: shape {tuple(indices.shape)} != {(batch, seq, k)}"
    s = scores.detach().cpu()
    idx = indices.detach().cpu().to(torch.int64)
    out_of_range = (idx < -1) | (idx >= seq_kv)
    if out_of_range.any():
        return f"indices: out of range [-1, {seq_kv}): {idx[out_of_range][:5].tolist()}"
    finite = torch.isfinite(s)
    expected_count = finite.sum(-1).clamp(max=k)
    count = (idx >= 0).sum(-1)
    problem = _rows_error(
        count != expected_count, "the number of selected positions differs from min(k, finite scores)",
        lambda row: f"selected {int(count[row])}, expected {int(expected_count[row])}",
    )  # fmt: skip
    if problem is not None:
        return problem
    selected = torch.zeros((batch, seq, seq_kv + 1), dtype=torch.int64)
    selected.scatter_add_(-1, torch.where(idx >= 0, idx, seq_kv), torch.ones_like(idx))
    selected = selected[..., :seq_kv]
    if (selected > 1).any():
        return f"indices: {int((selected > 1).sum())} positions selected twice in a row"
    chosen = selected.bool()
    if (chosen & ~finite).any():
        return "indices: a -inf, +inf or NaN position was selected"
    min_chosen = torch.where(chosen, s, torch.tensor(float("inf"))).amin(-1)
    max_unchosen = torch.where(~chosen & finite, s, torch.tensor(float("-inf"))).amax(-1)
    problem = _rows_error(
        min_chosen < max_unchosen, "a selected score is below an unselected finite score",
        lambda row: f"min selected {float(min_chosen[row])} < max unselected {float(max_unchosen[row])}",
    )  # fmt: skip
    if problem is not None:
        return problem
    # The tie rule: a score equal to the smallest selected one may stay unselected only at a larger position than
    # every selected one of that value (among equal scores the smaller position wins).
    position = torch.arange(seq_kv).expand_as(s)
    at_threshold = finite & (s == min_chosen.unsqueeze(-1))
    last_chosen = torch.where(chosen & at_threshold, position, -1).amax(-1)
    first_skipped = torch.where(~chosen & at_threshold, position, seq_kv).amin(-1)
    return _rows_error(
        first_skipped < last_chosen, "the tie rule (among equal scores the smaller position wins) is broken",
        lambda row: f"position {int(first_skipped[row])} is skipped but position {int(last_chosen[row])} of the same "
        f"score {float(min_chosen[row])} is selected",
    )  # fmt: skip


def _rows_error(bad: torch.Tensor, what: str, detail: Callable[[tuple[int, ...]], str]) -> str | None:
    """``"indices: <what> in <n> rows, e.g. row [b, t]: <detail((b, t))>"`` for the rows set in ``bad [B, S]`` bool
    (the first one as the example), None when none is."""
    if not bad.any():
        return None
    row = bad.nonzero()[0].tolist()
    return f"indices: {what} in {int(bad.sum())} rows, e.g. row {row}: {detail(tuple(row))}"


def assert_topk_valid(scores: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Raise ``AssertionError`` with :func:`topk_error`'s reason when ``indices`` breaks the top-k contract."""
    problem = topk_error(scores, indices, k)
    if problem is not None:
        raise AssertionError(problem)


def same_selection(out: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> str | None:
    """``None`` when two selections ``(indices [..., k] int32, scores [..., k])`` hold the same positions per row
    (any order) with the same scores (compared as float32, exactly); else the first difference. ``out`` is the one
    checked (its indices must be int32), ``expected`` e.g. a reference's ``return_scores=True`` selection."""
    (indices, scores), (want, want_scores) = ((a.cpu(), b.cpu().float()) for a, b in (out, expected))
    if indices.dtype != torch.int32 or indices.shape != want.shape:
        return f"indices: {indices.dtype} {tuple(indices.shape)}, expected torch.int32 {tuple(want.shape)}"
    order, want_order = indices.argsort(-1), want.argsort(-1)
    differ = (indices.gather(-1, order) != want.gather(-1, want_order)).any(-1)
    if differ.any():
        return f"indices: another set of positions in {int(differ.sum())} of {differ.numel()} rows"
    if not torch.equal(scores.gather(-1, order), want_scores.gather(-1, want_order)):
        return "scores: not the exact index scores at the selected positions"
    return None

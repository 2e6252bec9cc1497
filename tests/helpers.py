"""Comparison, poisoning and top-k checking helpers shared by every test tier."""

from __future__ import annotations

import torch

# Integer outputs are poisoned with a value no kernel may legitimately write (indices are >= -1).
INT_POISON = -(2**31) + 7
DEFAULT_MIN_COS = 0.999


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating dtypes) or ``INT_POISON`` (integers) and return it.

    Kernel outputs are poisoned before every call so that an element the kernel forgot to write fails the test.
    """
    if t.dtype.is_floating_point:
        if t.dtype in (torch.float8_e4m3fn,):
            t.view(torch.uint8).fill_(0x7F)  # the e4m3fn NaN code
        else:
            t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        raise TypeError("cannot poison a bool tensor")
    else:
        t.fill_(max(INT_POISON, torch.iinfo(t.dtype).min))
    return t


def poisoned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A drop-in for the launchers' ``new_output`` hook: a new tensor that starts poisoned (see ``poison``)."""
    return poison(torch.empty(shape, dtype=dtype, device=device))


def _describe_mismatch(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> str:
    where = mask.nonzero()[:limit].tolist()
    pairs = [f"{tuple(w)}: got {actual[tuple(w)].item()!r}, expected {expected[tuple(w)].item()!r}" for w in where]
    return f"{int(mask.sum())} of {mask.numel()} elements, e.g. " + "; ".join(pairs)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    min_cos: float | None = DEFAULT_MIN_COS,
    name: str = "out",
) -> None:
    """Compare a kernel output with its reference.

    Checks, in order: same shape; NaN positions identical; +inf and -inf positions identical; the finite values
    within ``atol + rtol * |expected|``; the cosine similarity of the finite values at least ``min_cos`` (catches a
    global scale error that loose elementwise tolerances forgive). ``min_cos=None`` skips the last check.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    for label, fn in (("NaN", torch.isnan), ("+inf", lambda x: torch.isposinf(x)), ("-inf", torch.isneginf)):
        differ = fn(a) != fn(e)
        assert not differ.any(), f"{name}: {label} positions differ: {_describe_mismatch(differ, a, e)}"
    finite = torch.isfinite(e)
    af, ef = a[finite], e[finite]
    bad = (af - ef).abs() > atol + rtol * ef.abs()
    if bad.any():
        full_bad = torch.zeros_like(finite)
        full_bad[finite] = bad
        worst = (af - ef).abs().max().item()
        raise AssertionError(
            f"{name}: values outside atol={atol}, rtol={rtol} (max abs error {worst:.3g}): "
            f"{_describe_mismatch(full_bad, a, e)}"
        )
    # When the reference is within atol of zero the elementwise check already bounds the error; a cosine between
    # rounding noise and an exact zero means nothing.
    if min_cos is not None and af.numel() > 1 and ef.abs().max() > atol:
        norm = af.norm() * ef.norm()
        if norm > 0:
            cos = float((af * ef).sum() / norm)
            assert cos >= min_cos, f"{name}: cosine similarity {cos:.6f} < {min_cos}"
        else:
            assert af.norm() == ef.norm(), f"{name}: one side is all zeros, the other is not"


def assert_topk_valid(scores: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Check ``indices [B, S, k]`` int32 against the ``topk_indices`` contract for ``scores [B, S, S_kv]``.

    Set semantics: no duplicates; every index in range or ``-1``; ``-1`` padding exactly when the row has fewer than
    ``k`` finite scores (then every finite position is selected); never a ``-inf``/NaN position; every selected score
    >= every unselected finite score. The order within a row is not checked.
    """
    assert indices.dtype == torch.int32, f"indices dtype {indices.dtype} != int32"
    batch, seq, seq_kv = scores.shape
    assert tuple(indices.shape) == (batch, seq, k), f"indices shape {tuple(indices.shape)} != {(batch, seq, k)}"
    s = scores.detach().cpu()
    idx = indices.detach().cpu().to(torch.int64)
    assert ((idx >= -1) & (idx < seq_kv)).all(), f"indices out of range [-1, {seq_kv}): {idx[(idx < -1) | (idx >= seq_kv)][:5].tolist()}"
    finite = torch.isfinite(s)
    n_finite = finite.sum(-1)
    n_valid = (idx >= 0).sum(-1)
    expected_valid = n_finite.clamp(max=k)
    rows_bad = n_valid != expected_valid
    assert not rows_bad.any(), (
        f"number of selected positions differs from min(k, finite count) in {int(rows_bad.sum())} rows, e.g. row "
        f"{rows_bad.nonzero()[0].tolist()}: selected {n_valid[rows_bad][0].item()}, expected {expected_valid[rows_bad][0].item()}"
    )
    selected = torch.zeros((batch, seq, seq_kv + 1), dtype=torch.int64)
    selected.scatter_add_(-1, torch.where(idx >= 0, idx, seq_kv), torch.ones_like(idx))
    selected = selected[..., :seq_kv]
    assert (selected <= 1).all(), "an index appears twice in a row"
    chosen = selected.bool()
    assert not (chosen & ~finite).any(), "a -inf or NaN position was selected"
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype)
    pos_inf = torch.tensor(float("inf"), dtype=s.dtype)
    min_chosen = torch.where(chosen, s, pos_inf).amin(-1)
    max_unchosen = torch.where(~chosen & finite, s, neg_inf).amax(-1)
    bad = min_chosen < max_unchosen
    assert not bad.any(), (
        f"a selected score is below an unselected finite score in {int(bad.sum())} rows, e.g. row "
        f"{bad.nonzero()[0].tolist()}: min selected {min_chosen[bad][0].item()} < max unselected {max_unchosen[bad][0].item()}"
    )


def index_mask(indices: torch.Tensor, seq_kv: int, topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S, S_kv]`` bool mask of the valid entries of ``indices`` (for unique indices: the dense oracle's mask)."""
    from dsa.reference import valid_index_mask

    valid = valid_index_mask(indices, seq_kv, topk_length)
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
    rows = unreferenced.nonzero()
    for n, (b, r) in enumerate(rows.tolist()):
        poisoned[b, r] = _NON_FINITE[n % len(_NON_FINITE)]
    return poisoned, unreferenced

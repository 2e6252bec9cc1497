"""The testing library of the package: comparison, poisoning, the top-k contract check and one input maker per op.

The test suite, the tuner's correctness gate (``autotune.runners``) and the benchmark's check (``autotune.bench``) all
use these functions, so that "matches the reference" means the same thing everywhere:

* :func:`compare` / :func:`assert_close`: shapes equal, NaN / ``+inf`` / ``-inf`` positions identical, the finite
  values within ``atol + rtol * |expected|`` elementwise, and a **scale-sensitive** difference
  ``1 - 2 <x, y> / (|x|^2 + |y|^2)`` (DeepGEMM's ``calc_diff``) at most ``max_diff``. Unlike cosine similarity it
  sees a global scale error: ``x = (1 + e) y`` gives ``e^2 / (2 + 2e + e^2)``, about ``2e-4`` for a 2 % error;
* :func:`topk_error` / :func:`assert_topk_valid`: the ``topk_indices`` contract, as sets;
* :func:`poison` / :func:`poisoned_empty`: NaN (or a sentinel) in every output a kernel must write;
* input makers with random, never-zero values: :func:`make_indices` (the index patterns of FlashMLA's test groups),
  :func:`causal_indices`, :func:`make_scores`, :func:`causal_scores`, :func:`make_ranges`, :func:`indexer_inputs`,
  :func:`sparse_mla_inputs` and :func:`sparse_mla_bwd_inputs`.

Nothing here runs at import; torch is the only dependency besides ``dsa.reference``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dsa import reference

__all__ = [
    "DEFAULT_MAX_DIFF",
    "INDEX_PATTERNS",
    "INT_POISON",
    "RANGE_PATTERNS",
    "SCORE_PATTERNS",
    "UNIQUE_ROW_PATTERNS",
    "assert_close",
    "assert_topk_valid",
    "causal_indices",
    "causal_scores",
    "compare",
    "generator",
    "index_mask",
    "indexer_inputs",
    "make_indices",
    "make_ranges",
    "make_scores",
    "make_topk_length",
    "poison",
    "poison_unreferenced_rows",
    "poisoned_empty",
    "scale_sensitive_diff",
    "sparse_mla_bwd_inputs",
    "sparse_mla_inputs",
    "topk_error",
]

INT_POISON = -(2**31) + 7
"""What integer outputs are poisoned with: no kernel may legitimately write it (indices are >= -1)."""
DEFAULT_MAX_DIFF = 1e-4
"""Largest accepted :func:`scale_sensitive_diff`: bf16 rounding gives about 1e-5; a 1.5 % scale error 1.1e-4."""
_E4M3_NAN_BITS = 0x7F
# Rows generated at once by the chunked makers, bounded so that a [rows, S_kv] float32 scratch stays under 1 GiB.
_SCRATCH_ELEMENTS = 1 << 28

INDEX_PATTERNS = ("regular", "irregular", "more_than_available", "all_invalid", "duplicates", "causal", "mixed_rows")
"""Index patterns of :func:`make_indices` (FlashMLA's test groups plus causal rows and rows of mixed kinds)."""
UNIQUE_ROW_PATTERNS = ("regular", "irregular", "more_than_available", "all_invalid", "causal")
"""The patterns whose valid entries are unique in every row (the dense masked oracle applies to them)."""
SCORE_PATTERNS = (
    "random",
    "ties",
    "all_equal",
    "low_bits",
    "shared_high_bits",
    "neg_inf_rows",
    "few_finite",
    "nan",
    "k_boundary",
)
"""Score patterns of :func:`make_scores`, built to stress top-k selection."""
RANGE_PATTERNS = ("random", "packed", "empty", "full", "extreme")
"""Visibility patterns of :func:`make_ranges` (``starts``/``ends`` of the indexer)."""
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------------------------------------------------
# Poisoning
# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------------
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
    rows_bad = count != expected_count
    if rows_bad.any():
        row = rows_bad.nonzero()[0].tolist()
        return (
            f"indices: the number of selected positions differs from min(k, finite scores) in {int(rows_bad.sum())} "
            f"rows, e.g. row {row}: selected {int(count[tuple(row)])}, expected {int(expected_count[tuple(row)])}"
        )
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
    bad = min_chosen < max_unchosen
    if bad.any():
        row = bad.nonzero()[0].tolist()
        return (
            f"indices: a selected score is below an unselected finite score in {int(bad.sum())} rows, e.g. row {row}: "
            f"min selected {float(min_chosen[tuple(row)])} < max unselected {float(max_unchosen[tuple(row)])}"
        )
    # The tie rule: a score equal to the smallest selected one may stay unselected only at a larger position than
    # every selected one of that value (among equal scores the smaller position wins).
    position = torch.arange(seq_kv).expand_as(s)
    at_threshold = finite & (s == min_chosen.unsqueeze(-1))
    last_chosen = torch.where(chosen & at_threshold, position, -1).amax(-1)
    first_skipped = torch.where(~chosen & at_threshold, position, seq_kv).amin(-1)
    bad = first_skipped < last_chosen
    if bad.any():
        row = bad.nonzero()[0].tolist()
        return (
            f"indices: the tie rule (among equal scores the smaller position wins) is broken in {int(bad.sum())} rows, "
            f"e.g. row {row}: position {int(first_skipped[tuple(row)])} is skipped but position "
            f"{int(last_chosen[tuple(row)])} of the same score {float(min_chosen[tuple(row)])} is selected"
        )
    return None


def assert_topk_valid(scores: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Raise ``AssertionError`` with :func:`topk_error`'s reason when ``indices`` breaks the top-k contract."""
    problem = topk_error(scores, indices, k)
    if problem is not None:
        raise AssertionError(problem)


# ----------------------------------------------------------------------------------------------------------------------
# Index masks and unreferenced rows
# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# Input makers
# ----------------------------------------------------------------------------------------------------------------------
def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(
    shape: tuple[int, ...], g: torch.Generator, *, dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=g.device) * scale).to(dtype)


def causal_indices(
    batch: int, seq: int, seq_kv: int, topk: int, *, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[B, S, topk]`` int32: for query ``t``, ``min(topk, visible)`` distinct random positions it may see under
    bottom-right causality (``s <= t + S_kv - S``), then ``-1``: what a top-k selection returns. The random keys are
    drawn for a bounded number of rows at a time, so 64K-token prefill shapes stay within a GiB of scratch."""
    device = torch.device(device)
    g = generator(seed, device)
    out = torch.full((batch * seq, topk), -1, dtype=torch.int32, device=device)
    take = min(topk, seq_kv)
    positions = torch.arange(seq_kv, device=device)
    step = max(1, _SCRATCH_ELEMENTS // max(1, seq_kv))
    for r0 in range(0, batch * seq, step):
        r1 = min(batch * seq, r0 + step)
        t = torch.arange(r0, r1, device=device) % seq
        hidden = positions.view(1, -1) > (t + (seq_kv - seq)).view(-1, 1)
        # Visible positions draw keys in [0, 1); hidden ones sort last with -1 and become -1 below.
        keys = torch.rand((r1 - r0, seq_kv), generator=g, device=device).masked_fill_(hidden, -1.0)
        values, picked = keys.topk(take, dim=-1)
        out[r0:r1, :take] = torch.where(values >= 0, picked, -1).to(torch.int32)
    return out.view(batch, seq, topk)


def _unique_rows(g: torch.Generator, rows: int, seq_kv: int, count: int) -> torch.Tensor:
    """``[rows, count]`` int64: each row a random sample without replacement from ``range(seq_kv)``."""
    keys = torch.rand((rows, seq_kv), generator=g)
    return keys.argsort(dim=-1)[:, :count]


def _invalid_values(g: torch.Generator, shape: tuple[int, ...], seq_kv: int) -> torch.Tensor:
    """Invalid index values of every flavour: -1, other negatives, S_kv and far beyond it."""
    choices = torch.tensor([-1, -1, -2, _INT32_MIN, seq_kv, seq_kv + 1, _INT32_MAX], dtype=torch.int64)
    return choices[torch.randint(0, len(choices), shape, generator=g)]


def make_indices(kind: str, seed: int, batch: int, seq: int, seq_kv: int, topk: int) -> torch.Tensor:
    """``[B, S, topk]`` int32 indices (on the CPU) of one pattern of :data:`INDEX_PATTERNS`.

    Every kind but ``duplicates`` yields unique valid entries per row, so the dense masked oracle applies.
    """
    g = generator(seed)
    rows = batch * seq
    shape = (batch, seq, topk)
    if kind == "regular" and topk <= seq_kv:
        idx = _unique_rows(g, rows, seq_kv, topk)
    elif kind in ("regular", "more_than_available"):
        count = min(topk, seq_kv)
        idx = torch.cat([_unique_rows(g, rows, seq_kv, count), torch.full((rows, topk - count), -1)], dim=1)
    elif kind == "irregular":
        count = min(topk, seq_kv)
        idx = torch.cat([_unique_rows(g, rows, seq_kv, count), _invalid_values(g, (rows, topk - count), seq_kv)], 1)
        knock_out = torch.rand((rows, topk), generator=g) < 0.3
        idx = torch.where(knock_out, _invalid_values(g, (rows, topk), seq_kv), idx)
        idx = idx.gather(1, torch.rand((rows, topk), generator=g).argsort(dim=1))
    elif kind == "all_invalid":
        idx = _invalid_values(g, (rows, topk), seq_kv)
    elif kind == "duplicates":
        idx = torch.randint(0, max(1, min(seq_kv, 3)), (rows, topk), generator=g)
        spread = torch.randint(0, seq_kv, (rows, topk), generator=g)
        idx = torch.where(torch.rand((rows, topk), generator=g) < 0.5, idx, spread)
    elif kind == "causal":
        return causal_indices(batch, seq, seq_kv, topk, seed=seed)
    elif kind == "mixed_rows":
        # Every row its own unique pattern, so neighbouring queries of one block differ.
        row_kinds = torch.randint(0, len(UNIQUE_ROW_PATTERNS), (rows,), generator=g).tolist()
        per_row = [
            make_indices(UNIQUE_ROW_PATTERNS[c], seed + 1 + i, 1, 1, seq_kv, topk) for i, c in enumerate(row_kinds)
        ]
        return torch.cat(per_row, dim=1).view(shape)
    else:
        raise ValueError(f"unknown index pattern {kind!r}; choose from {INDEX_PATTERNS}")
    return idx.clamp(_INT32_MIN, _INT32_MAX).to(torch.int32).view(shape)


def make_topk_length(seed: int, batch: int, seq: int, topk: int) -> torch.Tensor:
    """``[B, S]`` int32 in ``0 .. topk + 1`` (0 makes an empty row; values above ``topk`` are allowed too)."""
    return torch.randint(0, topk + 2, (batch, seq), generator=generator(seed)).to(torch.int32)


def _float_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def make_scores(kind: str, seed: int, batch: int, seq: int, seq_kv: int, k: int) -> torch.Tensor:
    """``[B, S, S_kv]`` float32 scores (on the CPU) of one pattern of :data:`SCORE_PATTERNS`."""
    g = generator(seed)
    shape = (batch, seq, seq_kv)
    if kind == "random":
        s = torch.randn(shape, generator=g) * 10
    elif kind == "ties":
        s = torch.randint(-3, 4, shape, generator=g).float()
    elif kind == "all_equal":
        s = torch.full(shape, float(torch.randn((), generator=g)))
    elif kind == "low_bits":
        # Same sign, exponent and high mantissa bits: only the lowest 8 bits differ.
        base = torch.tensor(1.5, dtype=torch.float32).view(torch.int32)
        s = _float_bits(base + torch.randint(0, 256, shape, generator=g))
    elif kind == "shared_high_bits":
        # Many scores share their top 16 bits (one radix bin), a few are spread out.
        base = torch.tensor(-0.75, dtype=torch.float32).view(torch.int32)
        s = _float_bits(base + torch.randint(0, 1 << 16, shape, generator=g))
        spread = torch.rand(shape, generator=g) < 0.05
        s = torch.where(spread, torch.randn(shape, generator=g), s)
    elif kind == "neg_inf_rows":
        s = torch.randn(shape, generator=g)
        s[torch.rand((batch, seq), generator=g) < 0.4] = float("-inf")
        s = s.masked_fill(torch.rand(shape, generator=g) < 0.3, float("-inf"))
    elif kind == "few_finite":
        s = torch.full(shape, float("-inf"))
        keep = torch.rand(shape, generator=g) < min(1.0, max(1, k - 1) / max(1, seq_kv))
        s = torch.where(keep, torch.randn(shape, generator=g), s)
    elif kind == "nan":
        s = torch.randn(shape, generator=g)
        s = s.masked_fill(torch.rand(shape, generator=g) < 0.2, float("nan"))
        s = s.masked_fill(torch.rand(shape, generator=g) < 0.1, float("-inf"))
        s = s.masked_fill(torch.rand(shape, generator=g) < 0.05, float("inf"))
    elif kind == "k_boundary":
        # The threshold value is shared by between k and 2k entries (a known failure of radix top-k).
        s = torch.randn(shape, generator=g) - 10
        ties = torch.rand(shape, generator=g).argsort(dim=-1)[..., : min(seq_kv, k + max(1, k // 2))]
        s.scatter_(-1, ties, 5.0)
        top = torch.rand(shape, generator=g).argsort(dim=-1)[..., : max(0, k // 4)]
        s.scatter_(-1, top, 9.0)
    else:
        raise ValueError(f"unknown score pattern {kind!r}; choose from {SCORE_PATTERNS}")
    return s.contiguous()


def causal_scores(
    batch: int, seq: int, seq_kv: int, *, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[B, S, S_kv]`` float32 random scores, ``-inf`` where the query may not see the key (what the indexer
    produces under bottom-right causality). Masked a bounded number of rows at a time."""
    g = generator(seed, device)
    scores = torch.randn((batch, seq, seq_kv), generator=g, device=device)
    keys = torch.arange(seq_kv, device=device)
    step = max(1, _SCRATCH_ELEMENTS // max(seq_kv, 1))
    for lo in range(0, seq, step):
        t = torch.arange(lo, min(seq, lo + step), device=device)
        hidden = keys.view(1, -1) > (t + (seq_kv - seq)).view(-1, 1)
        scores[:, lo : lo + t.numel()].masked_fill_(hidden.unsqueeze(0), float("-inf"))
    return scores


def make_ranges(kind: str, seed: int, batch: int, seq: int, seq_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``starts, ends [B, S]`` int32 (on the CPU) of one visibility pattern of :data:`RANGE_PATTERNS`.

    random: arbitrary bounds around ``[0, S_kv]`` (many empty rows, bounds past either end);
    packed: variable-length sequences packed in the key axis, each query causal inside its own segment;
    empty: no row sees anything (``starts >= ends``); full: every row sees every key;
    extreme: random rows with some bounds at the int32 limits.
    """
    g = generator(seed)
    shape = (batch, seq)
    if kind == "random":
        starts = torch.randint(-3, seq_kv + 3, shape, generator=g)
        ends = starts + torch.randint(-3, seq_kv + 4, shape, generator=g)
    elif kind == "packed":
        starts = torch.empty(shape, dtype=torch.int64)
        ends = torch.empty(shape, dtype=torch.int64)
        for b in range(batch):
            cuts = torch.randint(0, seq_kv + 1, (3,), generator=g).sort().values.tolist()
            bounds = [0, *cuts, seq_kv]
            for t in range(seq):
                pos = (t * seq_kv) // seq  # the key position this query sits at
                seg = max(i for i in range(len(bounds) - 1) if bounds[i] <= pos)
                starts[b, t] = bounds[seg]
                ends[b, t] = min(pos + 1, bounds[seg + 1])
    elif kind == "empty":
        starts = torch.randint(0, seq_kv + 2, shape, generator=g)
        ends = starts - torch.randint(0, 3, shape, generator=g)
    elif kind == "full":
        starts = torch.zeros(shape, dtype=torch.int64)
        ends = torch.full(shape, seq_kv, dtype=torch.int64)
    elif kind == "extreme":
        starts = torch.randint(-3, seq_kv + 3, shape, generator=g)
        ends = starts + torch.randint(-3, seq_kv + 4, shape, generator=g)
        pick = torch.rand(shape, generator=g)
        starts = torch.where(pick < 0.3, torch.full_like(starts, _INT32_MIN), starts)
        ends = torch.where(pick > 0.7, torch.full_like(ends, _INT32_MAX), ends)
    else:
        raise ValueError(f"unknown range pattern {kind!r}; choose from {RANGE_PATTERNS}")
    return starts.to(torch.int32), ends.to(torch.int32)


def _moved(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


# Value ranges of integer-valued indexer inputs (exact in bfloat16 and float8_e4m3fn; sums far below 2**24).
INT_QK = 3
INT_WEIGHT = 2


def indexer_inputs(
    *,
    batch: int,
    seq: int,
    seq_kv: int,
    heads: int,
    dim: int,
    dtype: str,
    seed: int,
    device: torch.device | str = "cpu",
    mode: str = "causal",
    range_kind: str = "random",
    spread: float = 1.0,
    weight_scale: float = 1.0,
    integer_valued: bool = False,
) -> dict[str, Any]:
    """The arguments of ``index_scores`` as a dict (``q``, ``k``, ``weights``, ``k_scale``, ``starts``, ``ends``).

    ``q``/``k`` normal times ``spread`` in ``dtype`` (``"bfloat16"`` or ``"float8_e4m3fn"``: with a small spread
    FP8 gets many subnormals, with a large one many exponents), weights of both signs times ``weight_scale``, positive
    per-key scales for FP8 (``None`` for bf16), and in ``mode="range"`` ``starts``/``ends`` of pattern
    ``range_kind`` (``None`` for causal). Drawn on the CPU and moved to ``device``.

    ``integer_valued``: ``q``/``k`` integers in ``[-INT_QK, INT_QK]``, weights integers in ``[-INT_WEIGHT,
    INT_WEIGHT]`` and FP8 key scales powers of two (``spread`` and ``weight_scale`` ignored): every score is computed
    exactly in float32 by every implementation, and ReLU zeros and small values make many exact ties, so selections
    can be compared exactly, ties included.
    """
    g = generator(seed)
    torch_dtype = getattr(torch, dtype)
    if integer_valued:
        q = torch.randint(-INT_QK, INT_QK + 1, (batch, seq, heads, dim), generator=g).to(torch_dtype)
        k = torch.randint(-INT_QK, INT_QK + 1, (batch, seq_kv, dim), generator=g).to(torch_dtype)
        weights = torch.randint(-INT_WEIGHT, INT_WEIGHT + 1, (batch, seq, heads), generator=g).float()
    else:
        q = _randn((batch, seq, heads, dim), g, dtype=torch_dtype, scale=spread)
        k = _randn((batch, seq_kv, dim), g, dtype=torch_dtype, scale=spread)
        weights = _randn((batch, seq, heads), g, scale=weight_scale)
    inputs: dict[str, Any] = {"q": q, "k": k, "weights": weights, "k_scale": None, "starts": None, "ends": None}
    if torch_dtype == torch.float8_e4m3fn and integer_valued:
        inputs["k_scale"] = torch.exp2(torch.randint(-1, 2, (batch, seq_kv), generator=g).float())
    elif torch_dtype == torch.float8_e4m3fn:
        inputs["k_scale"] = torch.rand((batch, seq_kv), generator=g) * 2.0 + 0.01
    if mode == "range":
        inputs["starts"], inputs["ends"] = make_ranges(range_kind, seed + 1, batch, seq, seq_kv)
    return _moved(inputs, device)


def sparse_mla_inputs(
    *,
    batch: int,
    seq: int,
    seq_kv: int,
    heads: int,
    d_qk: int,
    d_v: int,
    topk: int,
    seed: int,
    sm_scale: float,
    device: torch.device | str = "cpu",
    kind: str = "causal",
    has_topk_length: bool = False,
    has_sink: bool = False,
    value_scale: float = 1.0,
    sink_scale: float = 2.0,
) -> dict[str, Any]:
    """The arguments of ``sparse_mla`` as a dict (``q``, ``kv``, ``indices``, ``sm_scale``, ``d_v``,
    ``topk_length``, ``attn_sink``).

    bf16 ``q``/``kv`` normal times ``value_scale``; indices of pattern ``kind`` (:data:`INDEX_PATTERNS`; ``causal``
    is drawn on ``device`` in bounded chunks, the others on the CPU); with ``has_topk_length`` a random
    ``topk_length``; with ``has_sink`` float32 sinks normal times ``sink_scale``.
    """
    g = generator(seed)
    inputs: dict[str, Any] = {
        "q": _randn((batch, seq, heads, d_qk), g, dtype=torch.bfloat16, scale=value_scale),
        "kv": _randn((batch, seq_kv, d_qk), g, dtype=torch.bfloat16, scale=value_scale),
        "sm_scale": sm_scale,
        "d_v": d_v,
        "topk_length": make_topk_length(seed + 2, batch, seq, topk) if has_topk_length else None,
        "attn_sink": _randn((heads,), g, scale=sink_scale) if has_sink else None,
    }
    inputs = _moved(inputs, device)
    if kind == "causal":
        inputs["indices"] = causal_indices(batch, seq, seq_kv, topk, seed=seed + 1, device=device)
    else:
        inputs["indices"] = make_indices(kind, seed + 1, batch, seq, seq_kv, topk).to(device)
    return inputs


def sparse_mla_bwd_inputs(**kwargs: Any) -> dict[str, Any]:
    """:func:`sparse_mla_inputs` plus what the backward takes: the forward's ``out`` (bf16) and ``lse`` from the
    reference, and a random bf16 ``d_out``."""
    inputs = sparse_mla_inputs(**kwargs)
    q = inputs["q"]
    with torch.no_grad():
        out, lse = reference.sparse_mla(
            q, inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"], d_v=inputs["d_v"],
            topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"],
        )  # fmt: skip
    g = generator(kwargs["seed"] + 3)
    d_out = _randn((*q.shape[:3], inputs["d_v"]), g, dtype=torch.bfloat16).to(q.device)
    return {**inputs, "out": out.to(torch.bfloat16).contiguous(), "lse": lse.float().contiguous(), "d_out": d_out}

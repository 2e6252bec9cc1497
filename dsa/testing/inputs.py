"""Input makers with random, never-zero values: index, score and visibility patterns that stress the contract's
edge cases (FlashMLA's test groups, ties, non-finite scores, empty and packed ranges)."""

from __future__ import annotations

import torch

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

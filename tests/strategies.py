"""Hypothesis strategies for DSA shapes, index patterns and scores.

Tensors are generated from a drawn seed with a ``torch.Generator`` (fast, reproducible, shrinks by seed), while the
shape of the problem and the *kind* of pattern are drawn directly so Hypothesis can shrink them and report them.
Index patterns follow FlashMLA's test groups: regular, irregular, more requested than available, all invalid,
single query, duplicates; plus causal top-k rows as the indexer would produce them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

INDEX_PATTERNS = ("regular", "irregular", "more_than_available", "all_invalid", "duplicates", "causal", "mixed_rows")
UNIQUE_ROW_PATTERNS = ("regular", "irregular", "more_than_available", "all_invalid", "causal")
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
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one sparse-MLA problem."""

    batch: int
    seq: int
    seq_kv: int
    heads: int
    d_qk: int
    d_v: int
    topk: int


@st.composite
def attention_shapes(
    draw: st.DrawFn,
    *,
    max_batch: int = 2,
    max_seq: int = 5,
    max_seq_kv: int = 48,
    max_heads: int = 6,
    d_qk_choices: tuple[int, ...] = (8, 16, 24),
    max_topk: int = 24,
) -> AttentionShape:
    """Small sparse-MLA shapes; ``d_v`` is drawn from ``1..d_qk``."""
    d_qk = draw(st.sampled_from(d_qk_choices))
    return AttentionShape(
        batch=draw(st.integers(1, max_batch)),
        seq=draw(st.integers(1, max_seq)),
        seq_kv=draw(st.integers(1, max_seq_kv)),
        heads=draw(st.integers(1, max_heads)),
        d_qk=d_qk,
        d_v=draw(st.integers(1, d_qk)),
        topk=draw(st.integers(1, max_topk)),
    )


def _unique_rows(g: torch.Generator, rows: int, seq_kv: int, count: int) -> torch.Tensor:
    """``[rows, count]`` int64: each row a random sample without replacement from ``range(seq_kv)``, count <= seq_kv."""
    keys = torch.rand((rows, seq_kv), generator=g)
    return keys.argsort(dim=-1)[:, :count]


def _invalid_values(g: torch.Generator, shape: tuple[int, ...], seq_kv: int) -> torch.Tensor:
    """Invalid index values of every flavour: -1, other negatives, S_kv and far beyond it."""
    choices = torch.tensor([-1, -1, -2, -(2**31), seq_kv, seq_kv + 1, 2**31 - 1], dtype=torch.int64)
    return choices[torch.randint(0, len(choices), shape, generator=g)]


def make_indices(kind: str, seed: int, batch: int, seq: int, seq_kv: int, topk: int) -> torch.Tensor:
    """``[B, S, topk]`` int32 indices of the given pattern kind (see ``INDEX_PATTERNS``).

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
        idx = torch.where(torch.rand((rows, topk), generator=g) < 0.5, idx, torch.randint(0, seq_kv, (rows, topk), generator=g))
    elif kind == "causal":
        t = torch.arange(seq).repeat(batch)
        limit = (t + (seq_kv - seq)).clamp(min=-1)
        keys = torch.rand((rows, seq_kv), generator=g)
        keys = keys.masked_fill(torch.arange(seq_kv)[None, :] > limit[:, None], 2.0)  # invisible sort last
        order = keys.argsort(dim=-1)
        count = min(topk, seq_kv)
        idx = torch.cat([order[:, :count], torch.full((rows, topk - count), -1)], dim=1)
        visible = (idx <= limit[:, None]) & (idx >= 0)
        idx = torch.where(visible, idx, -1)
    elif kind == "mixed_rows":
        # Every row its own unique pattern, so neighbouring queries of one block differ.
        row_kinds = torch.randint(0, len(UNIQUE_ROW_PATTERNS), (rows,), generator=g).tolist()
        per_row = [make_indices(UNIQUE_ROW_PATTERNS[c], seed + 1 + i, 1, 1, seq_kv, topk) for i, c in enumerate(row_kinds)]
        return torch.cat(per_row, dim=1).view(shape)
    else:
        raise ValueError(f"unknown index pattern {kind!r}")
    return idx.clamp(-(2**31), 2**31 - 1).to(torch.int32).view(shape)


@st.composite
def index_patterns(draw: st.DrawFn, batch: int, seq: int, seq_kv: int, topk: int, *, unique: bool = False):
    """``(kind, indices [B, S, topk] int32)``; with ``unique=True`` the ``duplicates`` kind is excluded."""
    kinds = [k for k in INDEX_PATTERNS if not (unique and k == "duplicates")]
    kind = draw(st.sampled_from(kinds))
    return kind, make_indices(kind, draw(SEEDS), batch, seq, seq_kv, topk)


def make_topk_length(seed: int, batch: int, seq: int, topk: int) -> torch.Tensor:
    """``[B, S]`` int32 in ``0..topk`` (0 makes an empty row; values above topk are allowed by the contract too)."""
    return torch.randint(0, topk + 2, (batch, seq), generator=generator(seed)).to(torch.int32)


def _float_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def make_scores(kind: str, seed: int, batch: int, seq: int, seq_kv: int, k: int) -> torch.Tensor:
    """``[B, S, S_kv]`` float32 scores of the given kind (see ``SCORE_PATTERNS``), built to stress top-k selection."""
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
        raise ValueError(f"unknown score pattern {kind!r}")
    return s.contiguous()


@st.composite
def score_patterns(draw: st.DrawFn, batch: int, seq: int, seq_kv: int, k: int):
    """``(kind, scores [B, S, S_kv] float32)`` for top-k tests."""
    kind = draw(st.sampled_from(SCORE_PATTERNS))
    return kind, make_scores(kind, draw(SEEDS), batch, seq, seq_kv, k)

"""Hypothesis strategies for DSA shapes, index patterns and scores.

Tensors are generated from a drawn seed by the input makers of ``dsa.testing`` (fast, reproducible, shrinks by seed;
the same makers serve the tuner and the benchmark), while the shape of the problem and the *kind* of pattern are drawn
directly so Hypothesis can shrink them and report them. Index patterns follow FlashMLA's test groups: regular,
irregular, more requested than available, all invalid, single query, duplicates; plus causal top-k rows as the
indexer would produce them.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st

from dsa.testing import (  # noqa: F401 - re-exported: the tests draw from these names
    INDEX_PATTERNS,
    SCORE_PATTERNS,
    UNIQUE_ROW_PATTERNS,
    generator,
    make_indices,
    make_scores,
    make_topk_length,
)

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


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


@st.composite
def index_patterns(draw: st.DrawFn, batch: int, seq: int, seq_kv: int, topk: int, *, unique: bool = False):
    """``(kind, indices [B, S, topk] int32)``; with ``unique=True`` the ``duplicates`` kind is excluded."""
    kinds = [k for k in INDEX_PATTERNS if not (unique and k == "duplicates")]
    kind = draw(st.sampled_from(kinds))
    return kind, make_indices(kind, draw(SEEDS), batch, seq, seq_kv, topk)


@st.composite
def score_patterns(draw: st.DrawFn, batch: int, seq: int, seq_kv: int, k: int):
    """``(kind, scores [B, S, S_kv] float32)`` for top-k tests."""
    kind = draw(st.sampled_from(SCORE_PATTERNS))
    return kind, make_scores(kind, draw(SEEDS), batch, seq, seq_kv, k)


def examples(share: float) -> settings:
    """``settings`` with ``share`` of the loaded profile's ``max_examples`` (at least one example).

    For properties that are expensive per example (V3.2 widths on the C target, CUDA kernels at V3.2 shapes): the
    ``ci`` profile runs ``100 * share`` examples, ``gpu`` and ``long`` proportionally more. Use as a decorator under
    ``@given``'s neighbours like ``@settings``.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))

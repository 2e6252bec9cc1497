"""Hypothesis strategies for DSA shapes, index patterns and scores.

Tensors are generated from a drawn seed by the input makers of ``dsa.testing`` (fast, reproducible, shrinks by seed;
the same makers serve the tuner and the benchmark), while the shape of the problem and the *kind* of pattern are drawn
directly so Hypothesis can shrink them and report them. Index patterns follow FlashMLA's test groups: regular,
irregular, more requested than available, all invalid, single query, duplicates; plus causal top-k rows as the
indexer would produce them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st

from benchmarks import problems
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



def sizes(**maxima: int) -> dict[str, st.SearchStrategy[int]]:
    """One strategy per problem size, each drawing from 1 to its maximum (``@given(**sizes(batch=2, seq=4))``): the
    sizes every property test draws, in one line."""
    return {name: st.integers(1, most) for name, most in maxima.items()}


NAN, POS_INF, NEG_INF = float("nan"), float("inf"), float("-inf")
NON_FINITE = (NAN, POS_INF, NEG_INF)
"""The values :func:`sprinkle` scatters into inputs. float8_e4m3fn has no infinity (torch saturates ``+-inf`` to
``+-448`` when converting), so FP8 tensors take NaN only."""


AttentionShape = problems.SparseMlaProblem
"""Sizes of one sparse-MLA problem: the forward's problem description (``benchmarks.problems``)."""


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


# ------------------------------------------------------------------------------------------ non-finite inputs


@dataclass(frozen=True)
class Sprinkle:
    """How :func:`sprinkle` spoils a tensor: ``rate`` is the share of its rows (``whole_rows``: every element of a
    row along the last dimension, e.g. ``k[b, s] = nan``) or of its elements that become one of ``values``."""

    rate: float
    values: tuple[float, ...]
    whole_rows: bool


@st.composite
def sprinkles(draw: st.DrawFn, values: tuple[float, ...] = NON_FINITE) -> Sprinkle:
    """A :class:`Sprinkle` over a non-empty subset of ``values`` (NaN alone, one infinity, every kind), at a rate
    from rare (a single entry in most small tensors) to a third of the tensor."""
    chosen = draw(st.lists(st.sampled_from(values), min_size=1, max_size=len(values), unique_by=repr))
    rate = draw(st.sampled_from((0.005, 0.03, 0.1, 0.3)))
    return Sprinkle(rate=rate, values=tuple(chosen), whole_rows=draw(st.booleans()))


def sprinkle(t: torch.Tensor, how: Sprinkle, seed: int) -> torch.Tensor:
    """A copy of ``t`` (floating, FP8 included) with ``how.rate`` of its rows or elements (at least one) set to values
    drawn from ``how.values``, positions and values from ``seed``.

    Raises:
        ValueError: an infinity for a float8_e4m3fn tensor (it would become a finite ``+-448``, not an infinity).
    """
    if t.dtype == torch.float8_e4m3fn and any(math.isinf(v) for v in how.values):
        raise ValueError("sprinkle: float8_e4m3fn has no infinity; sprinkle NaN only")
    out = t.clone(memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    g = generator(seed)
    flat = out.view(-1, t.shape[-1]) if how.whole_rows else out.view(-1, 1)
    count = max(1, round(how.rate * flat.shape[0]))
    picked = torch.randperm(flat.shape[0], generator=g)[:count]
    pool = torch.tensor(how.values, dtype=torch.float32)
    chosen = pool[torch.randint(0, len(how.values), (count,), generator=g)]
    flat[picked] = chosen.view(-1, 1).expand(-1, flat.shape[1]).to(t.dtype)
    return out

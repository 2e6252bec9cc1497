"""The testing library of the package: comparison, poisoning, the top-k contract check and one input maker per op.

The test suite, the tuner's correctness gate (``benchmarks.runners``) and the benchmark's check
(``benchmarks.inputs``) all use these functions, so that "matches the reference" means the same thing everywhere:

* :func:`compare` / :func:`assert_close`: shapes equal, NaN / ``+inf`` / ``-inf`` positions identical, the finite
  values within ``atol + rtol * |expected|`` elementwise, and a **scale-sensitive** difference
  ``1 - 2 <x, y> / (|x|^2 + |y|^2)`` (DeepGEMM's ``calc_diff``) at most ``max_diff``. Unlike cosine similarity it
  sees a global scale error: ``x = (1 + e) y`` gives ``e^2 / (2 + 2e + e^2)``, about ``2e-4`` for a 2 % error;
* :func:`topk_error` / :func:`assert_topk_valid`: the ``topk_indices`` contract, as sets; :func:`same_selection`:
  two selections (indices and scores) equal as sets per row;
* :func:`poison` / :func:`poisoned_empty`: NaN (or a sentinel) in every output a kernel must write;
* input makers with random, never-zero values: :func:`make_indices` (the index patterns of FlashMLA's test groups),
  :func:`causal_indices`, :func:`make_scores`, :func:`causal_scores`, :func:`make_ranges`, :func:`indexer_inputs`,
  :func:`sparse_mla_inputs` and :func:`sparse_mla_bwd_inputs`.

Modules: ``compare`` (comparison, the top-k contract), ``poison`` (poisoning), ``inputs`` (patterns and makers),
``problems`` (one input maker per op); every public name is re-exported here. Nothing here runs at import; torch is
the only dependency besides ``dsa.reference``.
"""

from __future__ import annotations

from dsa.testing.compare import (
    DEFAULT_MAX_DIFF,
    assert_close,
    assert_topk_valid,
    compare,
    same_selection,
    scale_sensitive_diff,
    topk_error,
)
from dsa.testing.inputs import (
    INDEX_PATTERNS,
    RANGE_PATTERNS,
    SCORE_PATTERNS,
    UNIQUE_ROW_PATTERNS,
    causal_indices,
    causal_scores,
    generator,
    make_indices,
    make_ranges,
    make_scores,
    make_topk_length,
)
from dsa.testing.poison import INT_POISON, index_mask, poison, poison_unreferenced_rows, poisoned_empty
from dsa.testing.problems import indexer_inputs, sparse_mla_bwd_inputs, sparse_mla_inputs

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
    "same_selection",
    "scale_sensitive_diff",
    "sparse_mla_bwd_inputs",
    "sparse_mla_inputs",
    "topk_error",
]

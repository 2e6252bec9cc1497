"""The normative PyTorch definition of every DSA op, one module per op family.

The docstrings here are the contract: a kernel is correct when it matches these functions. The math runs in float32
(float64 for float64 inputs). Nothing here materialises an ``[S, S_kv]`` matrix per head: ``index_scores`` and
``sparse_mla`` walk the queries in chunks, so the reference stays usable at a few thousand tokens on a CPU.

- ``common``: the compute dtype, the chunk budget, ``INVALID_INDEX`` and ``valid_index_mask``;
- ``indexer``: ``visibility_mask``, ``index_scores``;
- ``topk``: ``topk_indices``, ``index_topk`` (the bounded selection walk), ``gather_scores``, ``selected_scores``;
- ``mla``: ``sparse_mla`` (one index list, or ranges and two sources in one softmax) and ``sparse_mla_backward``;
- ``sources``: ``Source``, one key source of ``sparse_mla`` (an index list or per-query ranges, expanded one chunk of
  query rows at a time);
- ``decode``: ``sparse_mla_decode`` and ``index_topk_decode`` over paged caches;
- ``compress``: ``compress_kv``, DeepSeek-V4's gated pooling of raw rows into compressed entries;
- ``dense``: ``dense_masked_attention``, the deliberately obvious full-matrix version, an oracle for tests only.

Every public name (and the ``*_impl`` entry points ``dsa.ops`` calls after validating) is re-exported here, so
``from dsa import reference; reference.sparse_mla(...)`` is the way to call them.
"""

from __future__ import annotations

from dsa.reference.common import CHUNK_ELEMENTS, INVALID_INDEX, OptTensor, compute_dtype, valid_index_mask
from dsa.reference.compress import compress_kv, compress_kv_impl
from dsa.reference.decode import index_topk_decode, index_topk_decode_impl, sparse_mla_decode, sparse_mla_decode_impl
from dsa.reference.dense import dense_masked_attention
from dsa.reference.indexer import index_scores, index_scores_impl, visibility_mask
from dsa.reference.mla import (
    sparse_mla,
    sparse_mla_backward,
    sparse_mla_impl,
    sparse_mla_sources_backward,
    sparse_mla_sources_impl,
)
from dsa.reference.sources import Source
from dsa.reference.topk import (
    KEY_BLOCK,
    SELECT_CHUNK_ELEMENTS,
    gather_scores,
    index_topk,
    index_topk_impl,
    select_topk,
    selected_scores,
    topk_indices,
    topk_indices_impl,
)

__all__ = [
    "CHUNK_ELEMENTS", "INVALID_INDEX", "KEY_BLOCK", "OptTensor", "SELECT_CHUNK_ELEMENTS", "Source", "compress_kv",
    "compress_kv_impl", "compute_dtype", "dense_masked_attention", "gather_scores", "index_scores",
    "index_scores_impl", "index_topk", "index_topk_decode", "index_topk_decode_impl", "index_topk_impl",
    "select_topk", "selected_scores", "sparse_mla", "sparse_mla_backward", "sparse_mla_decode",
    "sparse_mla_decode_impl", "sparse_mla_impl", "sparse_mla_sources_backward", "sparse_mla_sources_impl",
    "topk_indices", "topk_indices_impl", "valid_index_mask", "visibility_mask",
]

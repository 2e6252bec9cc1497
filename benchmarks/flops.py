"""Useful work of one kernel call: floating-point operations and minimal device-memory traffic.

One definition serves the tuner (TFLOP/s of each candidate, :func:`call_flops`) and the benchmark cases
(``benchmarks/cases.py``). Counts are of useful work only, never of padding or invisible pairs:

* indexer: ``2 * H_i * D_i`` FLOPs per *visible* (query, key) pair (bottom-right causal); bytes: ``q``, ``k``,
  ``weights`` (and ``k_scale``) read once, the ``[B, S, S_kv]`` float32 scores written once;
* top-k: no FLOPs; bytes: one read of the float32 scores plus the int32 indices written;
* sparse MLA forward: ``2 * B * S * H * topk * (d_qk + d_v)`` (``Q K^T`` over ``d_qk``, ``P V`` over ``d_v``);
* sparse MLA backward: ``2 * B * S * H * topk * (3 * d_qk + 2 * d_v)`` (recomputed ``Q K^T``, ``dP = dO V^T``,
  ``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``);
* sparse MLA decode (paged cache): the forward's FLOPs; bytes: each query's ``topk`` gathered cache rows as stored
  (656 bytes per FP8 row for V3.2, ``2 * d_qk`` for bf16), ``q`` and ``out``;
* indexer top-k for decoding (paged keys): the indexer's FLOPs over the newest ``s_q`` queries of a context of ``L``
  keys (``2 * B * H_i * L * D_i`` at ``s_q = 1``); bytes: every key row of every sequence read once (``B * L`` rows of ``D_i + 4`` bytes for FP8 keys and their scales);
* DeepSeek-V4 attention (two sources, K = V): the forward's FLOPs over the entries each query really sees (the
  window's ``min(W, t + 1)`` rows plus CSA's ``min(topk, (t + 1) // m)`` selected or HCA's ``(t + 1) // m`` visible
  compressed entries); bytes: ``q``, each query's entries as stored (bf16 rows in prefill, the cache's bytes per
  token in decode), CSA's indices, ``out`` and ``lse``.

Plain arithmetic: nothing here imports torch or touches a device (:func:`call_flops` asks the kernel's problem
description, ``benchmarks.problems``, which does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "call_flops",
    "causal_pairs",
    "dense_attention_flops",
    "fp8_kv_row_bytes",
    "index_topk_decode_bytes",
    "indexer_bytes",
    "indexer_flops",
    "pairs_attention_flops",
    "sparse_mla_bwd_bytes",
    "sparse_mla_bwd_flops",
    "sparse_mla_decode_bytes",
    "sparse_mla_fwd_bytes",
    "sparse_mla_fwd_flops",
    "topk_bytes",
    "v4_compressed_pairs",
    "v4_decode_bytes",
    "v4_prefill_bytes",
    "v4_window_pairs",
]

FP8_BYTES = 1
BF16_BYTES = 2
F32_BYTES = 4
I32_BYTES = 4
_FP8_TILE = 128  # values per float32 scale of an FP8 cache row (dsa.cache: gcd(d_nope, 128))


def _clamped_prefix(n: int, limit: int) -> int:
    """``sum(min(limit, max(0, x)) for x <= n)`` over integers ``x``."""
    if n <= 0:
        return 0
    if n <= limit:
        return n * (n + 1) // 2
    return limit * (limit + 1) // 2 + (n - limit) * limit


def causal_pairs(seq: int, seq_kv: int) -> int:
    """Visible (query, key) pairs of one batch row under bottom-right causality (``s <= t + S_kv - S``).

    Query ``t`` sees ``min(S_kv, max(0, t + S_kv - S + 1))`` keys; the sum over ``t`` in closed form.
    """
    first = seq_kv - seq + 1  # keys seen by t = 0 before clamping
    return _clamped_prefix(first + seq - 1, seq_kv) - _clamped_prefix(first - 1, seq_kv)


def indexer_flops(batch: int, seq: int, seq_kv: int, heads: int, dim: int) -> float:
    """FLOPs of the causal indexer: one ``D_i``-dot per head per visible pair."""
    return 2.0 * heads * dim * batch * causal_pairs(seq, seq_kv)


def indexer_bytes(batch: int, seq: int, seq_kv: int, heads: int, dim: int, element_bytes: int) -> float:
    """Bytes read (``q``, ``k``, ``weights``, and ``k_scale`` for FP8) and written (the float32 scores)."""
    reads = batch * (seq * heads * dim * element_bytes + seq_kv * dim * element_bytes + seq * heads * F32_BYTES)
    if element_bytes == FP8_BYTES:
        reads += batch * seq_kv * F32_BYTES  # k_scale
    return float(reads + batch * seq * seq_kv * F32_BYTES)


def index_topk_bytes(batch: int, seq: int, seq_kv: int, heads: int, dim: int, element_bytes: int, topk: int) -> float:
    """The fused selection: the indexer's reads (no scores written) and the ``[B, S, topk]`` int32 indices and
    float32 scores written."""
    scores = batch * seq * seq_kv * F32_BYTES
    return indexer_bytes(batch, seq, seq_kv, heads, dim, element_bytes) - scores + batch * seq * topk * (I32_BYTES + F32_BYTES)


def topk_bytes(rows: int, length: int, k: int) -> float:
    """One read of the float32 scores and the int32 indices written."""
    return float(rows * length * F32_BYTES + rows * k * I32_BYTES)


def sparse_mla_fwd_flops(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    """``Q K^T`` over ``d_qk`` and ``P V`` over ``d_v`` for every selected entry of every head."""
    return 2.0 * batch * seq * heads * topk * (d_qk + d_v)


def sparse_mla_bwd_flops(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    """Recomputed ``Q K^T`` (d_qk), ``dP`` and ``dV`` (d_v each), ``dQ`` and ``dK`` (d_qk each)."""
    return 2.0 * batch * seq * heads * topk * (3 * d_qk + 2 * d_v)


def dense_attention_flops(batch: int, seq: int, seq_kv: int, heads: int, d_qk: int, d_v: int) -> float:
    """Dense causal attention's useful work: ``Q K^T`` and ``P V`` over every visible (query, key) pair."""
    return 2.0 * batch * heads * causal_pairs(seq, seq_kv) * (d_qk + d_v)


def sparse_mla_fwd_bytes(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    """``q``, the gathered kv rows (each query's rows read once, shared by its heads), indices, ``out``, ``lse``."""
    return float(
        batch * seq * (heads * d_qk * BF16_BYTES + topk * d_qk * BF16_BYTES + topk * I32_BYTES)
        + batch * seq * heads * (d_v * BF16_BYTES + F32_BYTES)
    )


def sparse_mla_bwd_bytes(batch: int, seq: int, seq_kv: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    """``q``, ``out``, ``d_out``, ``lse``, the gathered kv rows and indices read; ``dq`` and ``dkv`` written."""
    per_query = heads * (d_qk + 2 * d_v) * BF16_BYTES + heads * F32_BYTES
    per_query += topk * d_qk * BF16_BYTES + topk * I32_BYTES
    writes = batch * seq * heads * d_qk * BF16_BYTES + batch * seq_kv * d_qk * BF16_BYTES
    return float(batch * seq * per_query + writes)


def fp8_kv_row_bytes(d_qk: int, d_rope: int) -> int:
    """Bytes of one FP8 cache row (``dsa.cache.FP8Layout.for_width(d_qk, d_rope)``): ``d_nope`` e4m3 values, one
    float32 scale per tile of ``gcd(d_nope, 128)`` of them, ``d_rope`` bf16 values (656 for V3.2's 512 + 64)."""
    d_nope = d_qk - d_rope
    return d_nope + d_nope // math.gcd(d_nope, _FP8_TILE) * F32_BYTES + d_rope * BF16_BYTES


def sparse_mla_decode_bytes(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int, row_bytes: int) -> float:
    """The ``topk`` cache rows each query gathers (``row_bytes`` each as stored, read once per query and shared by
    its heads), ``q`` read and ``out`` written (the indices and ``lse``, under 1 %, are left out)."""
    rows = batch * seq * topk * row_bytes
    return float(rows + batch * seq * heads * (d_qk + d_v) * BF16_BYTES)


def index_topk_decode_bytes(batch: int, context: int, row_bytes: int) -> float:
    """Every cached key row of every sequence read once (the ``s_q`` queries of a sequence share them; ``q``,
    ``weights`` and the ``[B, s_q, topk]`` outputs are negligible beside the keys)."""
    return float(batch * context * row_bytes)


def v4_window_pairs(seq: int, window: int) -> int:
    """(query, row) pairs of a causal sliding window over ``seq`` tokens: query ``t`` sees ``min(W, t + 1)`` rows."""
    return _clamped_prefix(seq, window)


def _floor_prefix(n: int, rate: int) -> int:
    """``sum(u // rate for u in 1..n)`` in closed form: ``q = n // rate`` whole groups, then the partial one."""
    q = n // rate
    return rate * q * (q - 1) // 2 + q * (n - q * rate + 1)


def v4_compressed_pairs(seq: int, rate: int, topk: int | None) -> int:
    """(query, compressed entry) pairs of a V4 prefill over ``seq`` tokens: query ``t`` sees ``(t + 1) // rate``
    entries (HCA, ``topk=None``: all of them) or at most ``topk`` of them (CSA's selection)."""
    if seq <= 0:
        return 0
    if topk is None or seq // rate <= topk:
        return _floor_prefix(seq, rate)
    first = topk * rate  # the first u = t + 1 that sees topk entries
    return _floor_prefix(first - 1, rate) + topk * (seq - first + 1)


def pairs_attention_flops(pairs: int, heads: int, d_qk: int, d_v: int) -> float:
    """``Q K^T`` over ``d_qk`` and ``P V`` over ``d_v`` for every head of ``pairs`` (query, entry) pairs."""
    return 2.0 * heads * pairs * (d_qk + d_v)


def v4_prefill_bytes(seq: int, heads: int, d_qk: int, d_v: int, entry_pairs: int, indexed_pairs: int) -> float:
    """One V4 prefill attention of ``seq`` tokens (B = 1): ``q`` read, ``entry_pairs`` bf16 rows gathered (each
    query's rows once, shared by its heads), ``indexed_pairs`` int32 indices read (CSA's selection; ranges cost
    nothing per entry), ``out`` and ``lse`` written."""
    return float(
        seq * heads * d_qk * BF16_BYTES + entry_pairs * d_qk * BF16_BYTES + indexed_pairs * I32_BYTES
        + seq * heads * (d_v * BF16_BYTES + F32_BYTES)
    )  # fmt: skip


def v4_decode_bytes(batch: int, seq: int, heads: int, d_qk: int, d_v: int, rows: int, row_bytes: int,
                    indexed: int) -> float:  # fmt: skip
    """One V4 decode step: each of the ``batch * seq`` queries gathers ``rows`` cache rows of ``row_bytes`` (window
    and compressed entries), reads ``indexed`` int32 slots, and ``q`` is read and ``out`` and ``lse`` written."""
    tokens = batch * seq
    return float(tokens * (rows * row_bytes + indexed * I32_BYTES) + tokens * heads * (d_qk * BF16_BYTES
                 + d_v * BF16_BYTES + F32_BYTES))  # fmt: skip


def call_flops(kernel: str, static: Mapping[str, Any], sizes: Mapping[str, int]) -> float | None:
    """Useful FLOPs of one call of the tuner kernel ``kernel`` (a name of
    ``autotune.lookup.space.TUNED_KERNEL_NAMES``) at its static parameters and runtime sizes: its problem
    description's count (``benchmarks.problems.problem_for``);
    ``None`` where FLOP/s mean nothing (top-k) or the kernel is not a built-in one.

    The fused selection (``index_topk``) counts the indexer's FLOPs: its GEMMs are the work, the selection rides
    along."""
    # Imported here: the problems build on this module's counts (and on torch, which the counts themselves never need).
    from benchmarks import problems

    try:
        problems.family_for(kernel, static)
    except KeyError:
        return None
    return problems.problem_for(kernel, static, sizes).flops()

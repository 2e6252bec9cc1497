"""Top-k selection: the positions of the ``k`` largest finite scores of each row, as an exact radix select.

Contract: ``dsa.reference.topk_indices`` (``scores [B, S, S_kv]`` float32 -> ``indices [B, S, k]`` int32, a set:
among equal scores the smaller position wins (``-0.0`` equals ``+0.0``), ``-inf``/NaN (and ``+inf``, which is not
finite) never selected, ``-1`` padding when a row has fewer than ``k`` finite scores, no duplicates, order
unspecified).

Algorithm (one thread block per row; ideas from radix-select top-k kernels, written here from scratch):

* Every score becomes an order-preserving ``uint32`` key: the float's bits with every bit flipped for negatives and
  the sign bit set for non-negatives, so unsigned key order is float order. Finite floats map into
  ``[FINITE_KEY_MIN, FINITE_KEY_MAX]``; ``-inf``, ``+inf`` and every NaN fall outside and are skipped by an integer
  range test (a float ``x == x`` test would be folded away by the compiler).
* Round ``r`` builds a histogram of the next radix digit (``DIGIT_BITS`` = 11, 11, 10 bits) over the keys that match
  the prefix fixed so far, turns it into suffix sums and finds the one bin ``d`` with
  ``suffix[d] >= k_rem > suffix[d + 1]`` (the *threshold bin*): the ``suffix[d + 1]`` keys above it are selected,
  ``k_rem - suffix[d + 1]`` are still needed from inside it. The round stops early when the whole bin is needed.
* Ties (the tie rule): when more keys equal the final threshold than are still needed (``count > k_rem``), a second
  radix select of the same kind runs over the tied keys only, on the *tie key* ``~position`` (larger for smaller
  positions; unique, so it ends with exactly ``k_rem`` keys). Without it the choice among ties would follow the
  order in which threads win an atomic counter, which differs from run to run on a GPU.
* The final pass writes every key above the threshold (an atomic counter of exactly ``k - k_rem`` slots) and the
  ``k_rem`` tied keys the tie select kept (a second atomic counter fills their slots; it never exceeds ``k_rem``). A
  row with fewer than ``k`` finite keys selects all of them and is padded with ``-1``.
* Candidate buffer: after a round, if the threshold bin holds at most ``cand_capacity`` keys (known from the
  histogram *before* anything is written), one pass over the row writes the keys above the bin to the output and
  copies the bin's keys (index + key) into the buffer; later rounds and the final pass then read the buffer. When the
  bin is larger than the buffer, nothing is copied and the next round re-reads the row from global memory instead, so
  no input can overflow the buffer (the illegal-memory-access bug of some public radix top-k kernels), and the count
  of the threshold bin never needs to fall in a special range (the ``k < count < 2k`` bug).

Cost per row: two passes over the row when the first threshold bin fits the buffer (histogram, then collection),
at most four when bins overflow it (e.g. rows whose scores share their high bits: three histogram passes and the
final one), plus at most three tie rounds when more keys equal the threshold than are still needed (over the
candidate buffer when the tie group fits it, else over the row), and per round an 11-step scan over 2048 bins.
Rows of equal scores serialise the shared-memory atomics of one bin; that is slow, not wrong.

One builder, two targets. The selection logic (key transform, the rounds, threshold search, tie policy, candidate
buffer with its fallback, padding) is written once as macros. Only three things differ per target: how a loop over
``n`` items is spread (strided over ``threads`` threads on CUDA, a serial loop on the C target), barriers (no-ops on
the C target) and which one thread performs single-writer updates. The C target has no SIMT threads, so CPU runs
prove the selection logic, not the absence of races; the CUDA kernel's own correctness is proven by the GPU tier.
Counters use ``T.atomic_add(..., return_prev=True)`` bound to a local first (an atomic inside a store index was
evaluated several times on sm_90a).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

from dataclasses import dataclass
from typing import Any

import tilelang.language as T

from tl_kernels import dsl
from tl_kernels import radix_select as rs
from tl_kernels.radix_select import ALL_ONES, DIGIT_BITS, FINITE_KEY_MAX, FINITE_KEY_MIN, INVALID_INDEX, order_key

# The radix constants and order_key imported above are tl_kernels.radix_select's public names, not this module's.
__all__ = [
    "TUNING_SPACE",
    "Config",
    "build",
    "check_config",
    "default_config",
    "shared_memory_bytes",
]

SCORE_DTYPE = "float32"
INDEX_DTYPE = "int32"

_WARP = 32
_MAX_THREADS = 1024


@dataclass(frozen=True)
class Config:
    """Tunable parameters of the CUDA radix kernel (the C target ignores ``threads``).

    threads: threads per block (one block per row), a multiple of 32; every pass strides over the row with them.
    cand_capacity: candidate-buffer entries (8 bytes each in shared memory). A threshold bin that does not fit is
        refined by re-reading the row from global memory, so any value is correct; larger means fewer re-reads.
    """

    threads: int = 1024
    cand_capacity: int = 4096


TUNING_SPACE: dict[str, tuple] = {
    "threads": (512, 1024),
    "cand_capacity": (4096, 8192),
}


def shared_memory_bytes(config: Config) -> int:
    """Shared memory of one block: two ``RADIX + 1`` int32 histograms, the candidate buffer and the row state."""
    return rs.hist_bytes() + config.cand_capacity * (4 + 4) + rs.state_bytes()


def check_config(static: dict, config: Config) -> None:
    """Raise ``ValueError`` when ``config`` cannot serve the static parameters ``static`` (``{"k": int}``, and
    optionally ``target``: the shared-memory limit is that architecture's, sm_90a's by default)."""
    k = static.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if config.threads % _WARP != 0 or not _WARP <= config.threads <= _MAX_THREADS:
        raise ValueError(f"threads must be a multiple of {_WARP} in [{_WARP}, {_MAX_THREADS}], got {config.threads}")
    if config.cand_capacity < 1:
        raise ValueError(f"cand_capacity must be >= 1, got {config.cand_capacity}")
    smem, limit = shared_memory_bytes(config), dsl.smem_limit_bytes(dsl.static_target(static))
    if limit is not None and smem > limit:
        raise ValueError(f"shared memory {smem} B exceeds {limit} B (cand_capacity {config.cand_capacity})")


def default_config(static: dict) -> Config:
    """A config that serves every row width for ``static`` (``{"k": int}``): the dataclass defaults."""
    config = Config()
    check_config(static, config)
    return config


def build(
    *, k: int, threads: int = Config.threads, cand_capacity: int = Config.cand_capacity, keyed: bool = False,
    target: dsl.Target,
) -> Any:  # fmt: skip
    """The top-k prim_func; ``B``, ``S``, ``S_kv`` symbolic.

    ``keyed=False``: ``(scores [B, S, S_kv] float32, indices [B, S, k] int32)``, the contract above (a position is a
    column).

    ``keyed=True`` (candidate lists, e.g. the split selection's merge): ``(scores [B, S, S_kv] float32, positions
    [B, S, S_kv] int32, indices [B, S, k] int32, out_scores [B, S, k] float32)``. Column ``j`` of a row is the
    candidate at position ``positions[b, s, j]``, in any column order: ``indices`` holds the positions of the row's
    ``k`` best finite scores, ties to the smaller *position*, and ``out_scores`` their scores (``-1`` / ``-inf``
    padding). The finite scores' positions must be distinct and non-negative (the tie select's key); a column with
    a non-finite score is never read for its position (padding may hold anything there, e.g. ``-1``).

    Grid: one block per row (``S`` x ``B``). ``k`` is the only compile-time shape; any ``k >= 1`` works, also
    ``k > S_kv``. On the C target ``threads`` is ignored.
    """
    check_config({"k": k, "target": target}, Config(threads=threads, cand_capacity=cand_capacity))
    cpu = dsl.is_cpu(target)
    alloc = dsl.allocators(target)
    select = rs.select_macros(k=k, cand_capacity=cand_capacity, threads=threads, cpu=cpu)

    batch = T.dynamic("batch")
    seq = T.dynamic("seq")
    seq_kv = T.dynamic("seq_kv")

    @T.macro
    def select_rows(scores, positions, indices, out_scores):
        with T.Kernel(seq, batch, threads=threads) as (s, b):
            row = rs.new_row(
                alloc, cand_entries=cand_capacity, scores=scores, indices=indices, out_scores=out_scores, b=b, s=s,
                width=seq_kv, tx=None if cpu else T.get_thread_binding(), positions=positions,
            )  # fmt: skip
            select.select_row(row, 0)

    if keyed:

        @T.prim_func
        def topk_keyed(
            scores: T.Tensor((batch, seq, seq_kv), SCORE_DTYPE),
            positions: T.Tensor((batch, seq, seq_kv), INDEX_DTYPE),
            indices: T.Tensor((batch, seq, k), INDEX_DTYPE),
            out_scores: T.Tensor((batch, seq, k), SCORE_DTYPE),
        ):
            select_rows(scores, positions, indices, out_scores)

        func = topk_keyed
    else:

        @T.prim_func
        def topk_indices(
            scores: T.Tensor((batch, seq, seq_kv), SCORE_DTYPE),
            indices: T.Tensor((batch, seq, k), INDEX_DTYPE),
        ):
            select_rows(scores, None, indices, None)

        func = topk_indices
    if cpu:
        return dsl.with_pass_configs(func, rs.PASS_CONFIGS)
    return dsl.with_target_pass_configs(func, target, rs.PASS_CONFIGS)

"""Split-K selection's sub-ranges: each query's visible key range cut into ``splits`` contiguous sub-ranges on key-block
edges, in one small launch (``dsa.launch.index_topk_split.expand``; the rule is that module's step 1).

Per sequence ``b`` (one thread block each): clamp every query's ``[starts, ends)`` to ``[0, seq_kv)``; take the key
blocks (``block_N`` keys) that some query of the sequence sees, ``[first, last)``; deal them out evenly, split ``j``
getting blocks ``[first + blocks * j // splits, first + blocks * (j + 1) // splits)``; virtual query ``(j, t)`` is
query ``t``'s range restricted to split ``j``'s keys, ``[0, 0)`` where that is empty and for the padding queries
``t >= s_q``. So no key block is loaded by two splits, the MTP queries of a sequence walk the same key blocks in the
same split, and every split of a long row gets work.

Why a kernel: the same arithmetic in PyTorch is about twenty launches of tiny elementwise kernels, which at ``B = 1``
would cost more than the selection itself (about 9 us at 128K on H800, ``benchmarks.cost``).

Targets: the C target (serial loops) and CUDA (one block per sequence, its outputs strided over the threads; the
sequence's block range is recomputed by every thread from its ``s_q`` ranges, a handful of loads).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

from typing import Any

import tilelang.language as T

from tl_kernels import dsl

__all__ = ["THREADS", "build"]

THREADS = 128
"""Threads per block on CUDA (one block per sequence; a V3.2 sequence at 128K has 264 sub-ranges)."""
INDEX_DTYPE = "int32"
WIDE_DTYPE = "int64"  # block arithmetic: blocks * splits may pass 2^31 for long contexts and many splits


def build(*, block_N: int, has_starts: bool, target: dsl.Target) -> Any:
    """The sub-range prim_func for key blocks of ``block_N`` keys; ``B``, ``s_q``, ``splits`` and ``s_pad`` symbolic.

    Kernel arguments, in order: [starts ``[B, s_q]`` int32, only with ``has_starts``; without, every range starts at
    0], ends ``[B, s_q]`` int32, sub_starts and sub_ends ``[B, splits, s_pad]`` int32 (``s_pad >= s_q``; written
    completely), seq_kv (int32 scalar: the selection kernel's logical key length, positions past it are invisible).
    """
    if block_N < 1:
        raise ValueError(f"block_N must be positive, got {block_N}")
    cpu = dsl.is_cpu(target)
    batch, s_q, splits, s_pad = T.dynamic("batch, s_q, splits, s_pad")

    def clamped(Starts: Any, Ends: Any, b: Any, t: Any, seq_kv: Any) -> tuple[Any, Any]:
        """Query ``t``'s range clamped to ``[0, seq_kv]`` (int64), empty as ``lo == hi``."""
        lo = T.min(T.max(T.Cast(WIDE_DTYPE, Starts[b, t]), 0), seq_kv) if has_starts else T.int64(0)
        hi = T.max(T.min(T.max(T.Cast(WIDE_DTYPE, Ends[b, t]), 0), seq_kv), lo)
        return lo, hi

    @T.macro
    def body(Starts, Ends, SubStarts, SubEnds, seq_kv):
        with T.Kernel(batch, threads=1 if cpu else THREADS) as b:
            kv = T.Cast(WIDE_DTYPE, seq_kv)
            # [first, last): the sequence's key blocks; first starts past every block so a min can lower it.
            span = T.alloc_local([2], WIDE_DTYPE)
            span[0] = T.ceildiv(kv, block_N) + 1
            span[1] = T.int64(0)
            for t in T.serial(s_q):
                lo, hi = clamped(Starts, Ends, b, t, kv)
                if hi > lo:
                    span[0] = T.min(span[0], lo // block_N)
                    span[1] = T.max(span[1], T.ceildiv(hi, block_N))
            if span[1] <= span[0]:  # no query sees a key: every sub-range is empty
                span[0] = T.int64(0)
                span[1] = T.int64(0)
            count = splits * s_pad
            for step in T.serial(count if cpu else T.ceildiv(count, THREADS)):
                v = step if cpu else step * THREADS + T.get_thread_binding()
                if v < count:
                    j = v // s_pad
                    t = v % s_pad
                    blocks = span[1] - span[0]
                    edge_lo = (span[0] + blocks * j // splits) * block_N
                    edge_hi = (span[0] + blocks * (j + 1) // splits) * block_N
                    SubStarts[b, j, t] = 0
                    SubEnds[b, j, t] = 0
                    if t < s_q:
                        lo, hi = clamped(Starts, Ends, b, t, kv)
                        if T.min(hi, edge_hi) > T.max(lo, edge_lo):
                            SubStarts[b, j, t] = T.Cast(INDEX_DTYPE, T.max(lo, edge_lo))
                            SubEnds[b, j, t] = T.Cast(INDEX_DTYPE, T.min(hi, edge_hi))

    def split_ranges(Starts=None, Ends=None, SubStarts=None, SubEnds=None, seq_kv=None):
        body(Starts, Ends, SubStarts, SubEnds, seq_kv)

    # One annotation object per parameter: a shared one would make the parameters one buffer.
    def row() -> Any:
        return T.Tensor([batch, s_q], INDEX_DTYPE)

    def sub() -> Any:
        return T.Tensor([batch, splits, s_pad], INDEX_DTYPE)

    func = dsl.prim_func(split_ranges, f"split_ranges_{'ranged' if has_starts else 'ends'}",
                         Starts=row() if has_starts else None, Ends=row(), SubStarts=sub(), SubEnds=sub(),
                         seq_kv=T.int32)  # fmt: skip
    return func if cpu else dsl.with_target_pass_configs(func, target)

"""The two-CTA cluster of the sparse MLA decode kernel (``tl_kernels.sparse_mla_decode``, ``cluster=True``, sm_90a):
the two thread blocks of one query token (heads ``0..63`` and ``64..127`` at V3.2) share every step's dequantised
cache tile through distributed shared memory, so each cache row is dequantised once per query token instead of once
per 64-head block (FlashMLA's sparse FP8 decode shares its dequantisation between the two CTAs of a cluster the same
way).

Each block gathers and dequantises half of a step's ``block_k`` rows (block rank ``r`` of the cluster: rows ``r *
block_k / 2 ..``) into its own tile, then stores that half into the same rows of its peer's tile (16-byte
``st.shared::cluster`` stores at ``mapa``-translated addresses, :data:`PRELUDE`), so both tiles hold the whole step
before either block's GEMMs read it (each block's ``fence.proxy.async`` before its wgmma follows the barrier's
acquire). The hardware cluster barrier (``barrier.cluster.arrive`` is a release, ``barrier.cluster.wait`` an acquire)
orders the exchange, in one alternating arrive/wait sequence per thread:

* ``open_exchange`` (before the first step): arrive, so the first step's wait passes once both blocks have started
  (a block's shared memory may be written by its peer only once the peer runs);
* ``share_half`` (each step, after this block's half is in its own tile): wait until the peer has finished reading
  its tile of the previous step (its GEMMs; its arrival in ``release_tile``), store the half into the peer's tile,
  then arrive and wait: both halves are in both tiles;
* ``release_tile`` (each step, after the GEMMs): arrive: this block no longer reads its tile, the peer may write;
* ``close_exchange`` (after the last step): wait for the peer's last arrival, so that neither block exits while its
  peer may still store into its shared memory.

Both blocks of a cluster serve the same query token and split, so they run the same number of steps and every
barrier is reached by every thread of both (``.aligned``). The C target has no clusters (its grid is a serial loop,
where two blocks cannot wait for each other) and neither has the portable schedule (:func:`check`): their builds, and
every build without ``cluster``, take :func:`steps` with ``enabled=False`` (whole steps, empty macros), so their
generated code is what it was before the cluster existed.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import tilelang.language as T

from tl_kernels import dsl

__all__ = ["CLUSTER_SIZE", "PRELUDE", "STORE_PEER", "VECTOR", "Steps", "check", "column_parts", "steps"]

CLUSTER_SIZE = 2
"""Thread blocks per cluster: the two 64-head blocks of a 128-head query token."""
VECTOR = 8
"""bf16 values per store into the peer's tile: 16 bytes, which the wgmma tile's swizzle keeps contiguous."""
STORE_PEER = "dsa_copy_to_peer_16b"
"""Name of :data:`PRELUDE`'s device function."""
PRELUDE = f"""
// 16 bytes at p of this block's shared memory into the same offset of the shared memory of cluster block peer:
// mapa turns p's address into the peer's window, st.shared::cluster.v4 stores there.
__device__ __forceinline__ void {STORE_PEER}(const void* p, int peer) {{
  unsigned int local = static_cast<unsigned int>(__cvta_generic_to_shared(p));
  unsigned int remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(peer));
  uint4 v = *reinterpret_cast<const uint4*>(p);
  asm volatile("st.shared::cluster.v4.u32 [%0], {{%1, %2, %3, %4}};"
               :: "r"(remote), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}}
"""
"""CUDA source of the 16-byte store into the peer's shared memory, for the cluster kernel's ``prelude``. (TileLang
0.1.15's ``T.copy_cluster`` stores one bf16 at a time through ``cluster.map_shared_rank``, and its barrier placement,
which cannot see where that pointer points, put a ``__syncthreads`` into each of the 36 iterations of the loop.)"""


def column_parts(width: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` column ranges of power-of-two widths covering ``width``, widest first (576: 0-512, 512-576)."""
    parts, lo = [], 0
    for bit in reversed(range(width.bit_length())):
        if width >> bit & 1:
            parts.append((lo, lo + (1 << bit)))
            lo += 1 << bit
    return parts


def check(static: Mapping[str, Any], block_h: int, block_k: int) -> None:
    """Raise ``ValueError`` unless a cluster can serve a kernel of ``static`` (``heads``, ``d_qk``, optionally
    ``target``) with ``block_h`` heads and ``block_k`` rows per block: sm_90a (the C target and the portable schedule
    have no clusters), head blocks in whole clusters, a step's rows in whole halves, rows in whole 16-byte stores."""
    head_blocks, d_qk, target = -(-int(static["heads"]) // block_h), int(static["d_qk"]), dsl.static_target(static)
    if not dsl.is_hopper(target):
        raise ValueError(f"the cluster config builds for sm_90a only, got target {target!r}")
    if head_blocks % CLUSTER_SIZE or block_k % CLUSTER_SIZE or d_qk % VECTOR:
        raise ValueError(
            f"the cluster config needs head blocks and a step's rows in multiples of {CLUSTER_SIZE} and d_qk in "
            f"multiples of {VECTOR}, got {head_blocks} head blocks, block_k {block_k} and d_qk {d_qk}"
        )


@dataclasses.dataclass(frozen=True)
class Steps:
    """What a decode kernel runs of the cluster (see :func:`steps`)."""

    part_k: int
    first_row: Any
    open_exchange: Any
    share_half: Any
    release_tile: Any
    close_exchange: Any
    launch: dict[str, Any]


def steps(*, block_k: int, d_qk: int, enabled: bool) -> Steps:
    """The cluster's part of a decode kernel with tiles of ``block_k`` rows of ``d_qk`` values.

    ``part_k``: the rows of a step this block gathers (``block_k / 2``; ``block_k`` when not ``enabled``).
    ``first_row()``: the first of them (int32 ``rank * block_k / 2``; the int 0 when not ``enabled``, so that no
    cluster code is generated). ``share_half(kv_s)``: stores this block's rows of ``kv_s`` (``[block_k, d_qk]``
    bfloat16 in shared memory, ``d_qk`` a multiple of :data:`VECTOR`) into the peer's ``kv_s`` and waits until the
    peer's rows are in this block's; the other three macros are the barrier steps of the module docstring. When not
    ``enabled`` the four macros are empty (they generate no code: the kernel's source is the one without them).
    ``launch``: the ``T.Kernel`` keywords: two-block clusters along x (blocks ``2t, 2t + 1``, the head blocks of one
    query token when the grid's x is token-major) and :data:`PRELUDE`; none when not ``enabled``.
    """
    if not enabled:

        @T.macro
        def nothing():  # noqa: ANN202
            pass

        @T.macro
        def nothing_with(tile):  # noqa: ANN001, ANN202, ARG001
            pass

        return Steps(block_k, lambda: 0, nothing, nothing_with, nothing, nothing, {})
    half = block_k // CLUSTER_SIZE
    parts = column_parts(d_qk)

    def rank() -> Any:
        # %cluster_ctarank is blockIdx.x % 2 for clusters of (2, 1, 1) (clusters tile the grid along x). Written as
        # the block index, the tile indices stay affine expressions TileLang simplifies and analyses, not calls that
        # read a special register.
        return T.get_block_binding(0) % CLUSTER_SIZE

    def first_row() -> Any:
        return rank() * half

    @T.macro
    def open_exchange():  # noqa: ANN202
        T.cluster_arrive()

    @T.macro
    def share_half(kv_s):  # noqa: ANN001, ANN202
        # In column ranges of power-of-two widths: over all 576 columns TileLang's thread mapping divides by 9 and
        # its loops would not split into whole 16-byte vectors per thread. The barrier placement sees only reads
        # of kv_s here (the stores go to the peer): the __syncthreads it puts after the wait orders this block's
        # dequantising stores before these reads.
        r0 = first_row()
        T.cluster_wait()
        for lo, hi in parts:
            for j, c in T.Parallel(half, (hi - lo) // VECTOR):
                peer = CLUSTER_SIZE - 1 - rank()
                T.call_extern("handle", STORE_PEER, T.address_of(kv_s[r0 + j, lo + c * VECTOR]), peer)
        T.cluster_arrive()
        T.cluster_wait()

    @T.macro
    def release_tile():  # noqa: ANN202
        T.cluster_arrive()

    @T.macro
    def close_exchange():  # noqa: ANN202
        T.cluster_wait()

    launch = {"cluster_dims": CLUSTER_SIZE, "prelude": PRELUDE}
    return Steps(half, first_row, open_exchange, share_half, release_tile, close_exchange, launch)

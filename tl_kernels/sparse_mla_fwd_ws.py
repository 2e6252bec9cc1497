"""The warp-specialised schedule of the sparse MLA forward (``Config.pipeline = "ws"``), CUDA only.

A producer warpgroup gathers the selected KV rows into two mbarrier-guarded buffers while two consumer warpgroups do
the math (see :func:`build_ws`). The entry rules and the online softmax are the plain schedule's
(``tl_kernels.sparse_mla_fwd_steps``); ``tl_kernels.sparse_mla_fwd.build`` calls this builder for ``pipeline="ws"``
on CUDA, and checks its config. UNVERIFIED ON A GPU: no GPU has run this schedule yet; it stays opt-in.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel signature's annotations, which refer to
# closure variables (shapes, dtypes).
from typing import Any

import tilelang.language as T

from tl_kernels import dsl
from tl_kernels import sparse_mla_fwd_steps as steps

__all__ = ["WS_BLOCK_K", "WS_KV_BUFFERS", "WS_PASS_CONFIGS", "WS_SMEM_SLACK_BYTES", "WS_THREADS", "build_ws"]

WS_BLOCK_K = 64
"""The ``ws`` schedule's step (rows per KV buffer): the size that was compiled and checked (0 spills, 231,040 B of
shared memory at V3.2 widths, two buffers); other sizes are rejected rather than shipped unchecked."""
WS_THREADS = 3 * steps.WARPGROUP_THREADS
"""``pipeline="ws"``: consumer warpgroup 0 (scores, softmax, left half of the output), consumer warpgroup 1 (right
half of the output), producer warpgroup (the KV gather)."""
WS_KV_BUFFERS = 2
"""KV tiles in flight in the ``ws`` schedule: the producer fills one while the consumers work on the other."""
WS_ASYNC_COPY: dict[str, bool] = {"parallel_async_without_async_commit_wait": True}
"""Loop annotation: lower the producer's global -> shared copies to cp.async with no commit/wait groups."""
WS_CONSUMER0_REGS = 232
WS_CONSUMER1_REGS = 168
WS_PRODUCER_REGS = 88
"""Per-warpgroup register budgets (``setmaxnreg``): 128 * (232 + 168 + 88) <= 64 K registers of an SM. The producer's
predicated (zero-filling) gather needs 88: at 80 the build without topk_length spilled 176 bytes; consumer 0 peaked at
183 registers of its former 240, consumer 1 at 151 of 168 (SASS, before the predicated gather)."""

WS_PASS_CONFIGS: dict[str, bool] = dict(steps.CUDA_PASS_CONFIGS)
"""The ws kernel's pass configs: the plain schedule's (the gather is not a TMA tile, and the warp specialisation is
written out here rather than left to TileLang). TileLang's bound guard stays on: it is what turns the
producer's row number -1 for an invalid entry into a zero-filling predicated cp.async (see ``steps.gather_row``)."""
WS_SMEM_SLACK_BYTES = 2 * 1024
"""Room for the ``ws`` schedule's 1024-byte tile alignment and its mbarriers on top of the tiles and vectors."""


def build_ws(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool,
    has_sink: bool,
    block_k: int,
    ranged: bool = False,
) -> Any:
    """The warp-specialised CUDA kernel (``pipeline="ws"``); same arguments and semantics as :func:`build`
    (``ranged``: ``indices`` holds (start, end) per query, whose rows the producer gathers).

    Three warpgroups (``WS_THREADS``) share two KV buffers of ``block_k`` rows, each split into the left and right
    halves of the value columns and the key-only tail ``d_qk - d_v`` (none when K = V, ``d_qk == d_v``):

    * the producer (threads 256-383, ``setmaxnreg`` 88) gathers step ``i`` into buffer ``i % 2`` with 16-byte
      cp.async copies (zero-filling for invalid entries) and writes each row's validity byte, then arrives on
      ``ready`` twice per thread: once through ``cp.async.mbarrier.arrive.noinc`` (fires when its copies land) and
      once plainly (releases its validity stores);
    * consumer 0 (threads 0-127, 232 registers) waits for ``ready``, computes the masked scores (three wgmma into
      one cleared accumulator, then -inf selected where invalid), runs the online softmax, writes bf16 ``P`` and the
      rescale factors to shared memory, and accumulates the left half of ``P . V``;
    * consumer 1 (threads 128-255, 168 registers) rescales and accumulates the right half of ``P . V`` from them.

    Hand-offs are mbarriers with phase parities: ``ready``/``free`` per buffer (a buffer is refilled only after both
    consumers released it), ``p_ready``/``p_free`` for ``P`` and the factors (consumer 0 overwrites them only after
    consumer 1 read them), ``fin`` for the final normaliser. Step ``i`` uses buffer ``i % 2`` with phase parity
    ``(i // 2) & 1``, which holds for any step count (a row of ``limit <= 64`` entries runs one step). Every arrival is
    ordered after the previous phase completed (each side waits on the other before arriving again), so no phase can
    be completed by one side's repeated arrivals.

    An invalid entry's tile row is zero-filled by the producer's predicated cp.async (row number -1, see
    ``steps.gather_row``) and its score is selected to ``-inf`` after the MMA.

    Two static audits of the generated CUDA, PTX and SASS (barrier counts, phase parities over odd, even and zero step
    counts, proxy fences, ``setmaxnreg`` budgets, padded heads) found no hang or race; neither is a proof, and no model
    of the protocol is kept here: the GPU tier (``pytest -m "gpu and ws"``) is the only check that runs this code.
    """
    block_h = steps.WGMMA_M
    half_v = d_v // 2
    tail = d_qk - d_v
    neg_inf = -T.infinity(steps.ACCUM_DTYPE)
    consumers = 2 * steps.WARPGROUP_THREADS
    online_softmax, finalize = steps.softmax_macros(T.Parallel, block_h, block_k, heads, has_sink)
    dims = steps.kernel_dims(heads, has_topk_length, has_sink, ranged)
    width, seq_len_kv = dims.width, dims.seq_len_kv

    def row(indices: Any, b: Any, s: Any, pos: Any, limit: Any) -> Any:
        # The producer's gather row of an entry (steps.gather_row: -1 for an invalid one).
        return steps.gather_row(indices, b, s, pos, width, limit, seq_len_kv, ranged)

    # Macros take TileLang buffers and expressions (no Python annotations: the eager builder binds them itself).
    @T.macro
    def scores(q_l, q_r, q_t, kv_l, kv_r, k_t, valid, ready, parity, acc_s, scale_log2):  # noqa: ANN001, ANN202
        # Consumer 0: the masked, log2-scaled scores of one KV buffer. The mask is selected after the MMA (a masked
        # entry's zero row gives a score of 0 that must become -inf).
        T.barrier_wait(ready, parity)
        # The tiles were written by cp.async (generic proxy) and are read by wgmma (async proxy).
        T.fence_proxy_async()
        T.clear(acc_s)
        T.wgmma_gemm(q_l, kv_l, acc_s, transpose_B=True)
        T.wgmma_gemm(q_r, kv_r, acc_s, transpose_B=True)
        if tail:
            T.wgmma_gemm(q_t, k_t, acc_s, transpose_B=True)
        T.wait_wgmma(0)
        for h, j in T.Parallel(block_h, block_k):
            acc_s[h, j] = T.if_then_else(valid[j] != 0, acc_s[h, j] * scale_log2, neg_inf)

    @T.macro
    def produce(kv_src, indices, b, s, step, limit, kv_l, kv_r, k_t, valid):  # noqa: ANN001, ANN202
        # Producer: gather the rows of `step` into one KV buffer as cp.async copies without commit/wait groups (the
        # caller's cp.async mbarrier arrival tracks their completion), and record each row's validity. Each element
        # reads its index straight from global memory (cached), as the single-warpgroup schedule does; an invalid
        # entry's row number is -1, which the bound guard turns into a zero-filling predicated cp.async that reads
        # nothing (see steps.gather_row).
        for j in T.Parallel(block_k):
            valid[j] = T.Cast(
                "uint8",
                steps.entry_valid(
                    steps.index_at(indices, b, s, step * block_k + j, width, ranged, limit), step * block_k + j, limit,
                    seq_len_kv,
                ),
            )
        for j, d in T.Parallel(block_k, half_v, annotations=WS_ASYNC_COPY):
            kv_l[j, d] = kv_src[steps.wide(b), row(indices, b, s, step * block_k + j, limit), d]
        for j, d in T.Parallel(block_k, half_v, annotations=WS_ASYNC_COPY):
            kv_r[j, d] = kv_src[steps.wide(b), row(indices, b, s, step * block_k + j, limit), half_v + d]
        if tail:
            for j, d in T.Parallel(block_k, tail, annotations=WS_ASYNC_COPY):
                k_t[j, d] = kv_src[steps.wide(b), row(indices, b, s, step * block_k + j, limit), d_v + d]

    # Every role runs the same step count (steps.forward_kernel's num_steps, from the same value). Step i uses buffer
    # i % 2 with phase parity (i // 2) & 1, which holds for any count, odd included (no padding step).
    @T.macro
    def schedule(Q, KV, Indices, AttnSink, Out, Lse, b, s, h0, scale_log2, limit, num_steps):  # noqa: ANN001, ANN202
        q_l = T.alloc_shared([block_h, half_v], steps.DATA_DTYPE)
        q_r = T.alloc_shared([block_h, half_v], steps.DATA_DTYPE)
        # K = V (d_qk == d_v, DeepSeek-V4) has no key-only tail: its tiles stand in for the unused q_t / k_t.
        q_t = T.alloc_shared([block_h, tail], steps.DATA_DTYPE) if tail else q_l
        kv_l0 = T.alloc_shared([block_k, half_v], steps.DATA_DTYPE)
        kv_r0 = T.alloc_shared([block_k, half_v], steps.DATA_DTYPE)
        k_t0 = T.alloc_shared([block_k, tail], steps.DATA_DTYPE) if tail else kv_l0
        kv_l1 = T.alloc_shared([block_k, half_v], steps.DATA_DTYPE)
        kv_r1 = T.alloc_shared([block_k, half_v], steps.DATA_DTYPE)
        k_t1 = T.alloc_shared([block_k, tail], steps.DATA_DTYPE) if tail else kv_l1
        p_s = T.alloc_shared([block_h, block_k], steps.DATA_DTYPE)
        # Whether each gathered row takes part in the softmax, per KV buffer (written by the producer).
        valid0 = T.alloc_shared([block_k], "uint8")
        valid1 = T.alloc_shared([block_k], "uint8")
        alpha_s = T.alloc_shared([block_h], steps.ACCUM_DTYPE)
        inv_s = T.alloc_shared([block_h], steps.ACCUM_DTYPE)

        acc_s = T.alloc_fragment([block_h, block_k], steps.ACCUM_DTYPE)
        acc_o_l = T.alloc_fragment([block_h, half_v], steps.ACCUM_DTYPE)
        acc_o_r = T.alloc_fragment([block_h, half_v], steps.ACCUM_DTYPE)
        m_i = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)
        m_prev = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)
        m_safe = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)
        alpha = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)
        l_i = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)
        row_sum = T.alloc_fragment([block_h], steps.ACCUM_DTYPE)

        bar_q = T.alloc_barrier(WS_THREADS)
        # ready_i: the producer's 128 cp.async completions plus its 128 plain arrivals (which release its
        # valid_i stores); free_i: both consumer warpgroups are done with buffer i.
        ready0 = T.alloc_barrier(2 * steps.WARPGROUP_THREADS)
        ready1 = T.alloc_barrier(2 * steps.WARPGROUP_THREADS)
        free0 = T.alloc_barrier(consumers)
        free1 = T.alloc_barrier(consumers)
        # p_ready: p_s and alpha_s hold this step's values; p_free: both consumers are done reading them.
        p_ready = T.alloc_barrier(consumers)
        p_free = T.alloc_barrier(consumers)
        # fin: consumer 0 wrote the final normaliser into inv_s.
        fin = T.alloc_barrier(steps.WARPGROUP_THREADS)

        tx = T.get_thread_binding()

        # Heads past `heads` (last head block) load zeros; they are never stored.
        for h, d in T.Parallel(block_h, half_v):
            q_l[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), d], 0)
            q_r[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), half_v + d], 0)
        if tail:
            for h, d in T.Parallel(block_h, tail):
                q_t[h, d] = T.if_then_else(h0 + h < heads, Q[b, s, T.min(h0 + h, heads - 1), d_v + d], 0)
        # Each writer makes its Q stores visible to wgmma (async proxy) before releasing them.
        T.fence_proxy_async()
        T.barrier_arrive(bar_q)

        if tx < steps.WARPGROUP_THREADS:
            T.set_max_nreg(WS_CONSUMER0_REGS, 1)
            T.fill(acc_o_l, 0)
            T.fill(l_i, 0)
            T.fill(m_i, neg_inf)
            T.barrier_wait(bar_q, 0)
            for step in T.serial(num_steps):
                pair = step // WS_KV_BUFFERS
                if step % WS_KV_BUFFERS == 0:
                    scores(q_l, q_r, q_t, kv_l0, kv_r0, k_t0, valid0, ready0, pair & 1, acc_s, scale_log2)
                else:
                    scores(q_l, q_r, q_t, kv_l1, kv_r1, k_t1, valid1, ready1, pair & 1, acc_s, scale_log2)
                if step > 0:
                    # Consumer 1 must have read the previous step's p_s and alpha_s.
                    T.barrier_arrive(p_free)
                    T.barrier_wait(p_free, (step - 1) & 1)
                online_softmax(acc_s, m_i, m_prev, m_safe, alpha, l_i, row_sum)
                for h, d in T.Parallel(block_h, half_v):
                    acc_o_l[h, d] = acc_o_l[h, d] * alpha[h]
                T.copy(alpha, alpha_s)
                T.copy(acc_s, p_s)
                # Release P and alpha before this warpgroup's own P . V, so both halves run concurrently. Each
                # thread fences its P stores for consumer 1's wgmma (async proxy) before arriving.
                T.fence_proxy_async()
                T.barrier_arrive(p_ready)
                if step % WS_KV_BUFFERS == 0:
                    T.gemm(p_s, kv_l0, acc_o_l)
                    T.barrier_arrive(free0)
                else:
                    T.gemm(p_s, kv_l1, acc_o_l)
                    T.barrier_arrive(free1)
            # alpha: the output's normaliser (0 for an empty row: out 0), row_sum: lse (-inf for an empty row).
            finalize(m_i, m_safe, l_i, alpha, row_sum, AttnSink, h0)
            T.copy(alpha, inv_s)
            T.barrier_arrive(fin)
            for h, d in T.Parallel(block_h, half_v):
                if h0 + h < heads:
                    Out[b, s, h0 + h, d] = T.Cast(steps.DATA_DTYPE, acc_o_l[h, d] * alpha[h])
            for h in T.Parallel(block_h):
                if h0 + h < heads:
                    Lse[b, s, h0 + h] = row_sum[h]
        elif tx < consumers:
            T.set_max_nreg(WS_CONSUMER1_REGS, 1)
            T.fill(acc_o_r, 0)
            for step in T.serial(num_steps):
                T.barrier_arrive(p_ready)
                T.barrier_wait(p_ready, step & 1)
                # kv_r came from the producer's cp.async (generic proxy); wgmma reads it through the async proxy.
                T.fence_proxy_async()
                for h, d in T.Parallel(block_h, half_v):
                    acc_o_r[h, d] = acc_o_r[h, d] * alpha_s[h]
                if step % WS_KV_BUFFERS == 0:
                    T.gemm(p_s, kv_r0, acc_o_r)
                    T.barrier_arrive(free0)
                else:
                    T.gemm(p_s, kv_r1, acc_o_r)
                    T.barrier_arrive(free1)
                T.barrier_arrive(p_free)
            T.barrier_wait(fin, 0)
            for h, d in T.Parallel(block_h, half_v):
                if h0 + h < heads:
                    Out[b, s, h0 + h, half_v + d] = T.Cast(steps.DATA_DTYPE, acc_o_r[h, d] * inv_s[h])
        else:
            T.set_max_nreg(WS_PRODUCER_REGS, 0)
            for step in T.serial(num_steps):
                pair = step // WS_KV_BUFFERS
                # Parity trick: waiting for the phase before the first completes at once (buffers start free).
                if step % WS_KV_BUFFERS == 0:
                    T.barrier_wait(free0, (pair & 1) ^ 1)
                    produce(KV, Indices, b, s, step, limit, kv_l0, kv_r0, k_t0, valid0)
                    T.cp_async_barrier_noinc(ready0)
                    T.barrier_arrive(ready0)
                else:
                    T.barrier_wait(free1, (pair & 1) ^ 1)
                    produce(KV, Indices, b, s, step, limit, kv_l1, kv_r1, k_t1, valid1)
                    T.cp_async_barrier_noinc(ready1)
                    T.barrier_arrive(ready1)

    main = steps.forward_kernel(
        dims, heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, block_h=block_h, block_k=block_k,
        threads=WS_THREADS, data_dtype=steps.DATA_DTYPE, body=schedule, ranged=ranged,
    )  # fmt: skip
    return dsl.with_pass_configs(main, WS_PASS_CONFIGS)

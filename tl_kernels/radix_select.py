"""Exact radix select of the ``k`` best keys of one row, as TileLang macros shared by the top-k kernel
(``tl_kernels.topk``: rows of a score matrix) and the fused selection kernel (``tl_kernels.index_topk``: candidate
buffers filled while scores are computed).

The algorithm (the order-preserving keys, the rounds, the threshold bin, the tie select on ``~position``, the
candidate buffer with its fallback to re-reading the row) is described in ``tl_kernels.topk``; this module holds it
once. :func:`select_macros` returns the macros for one compile-time ``k``; a kernel allocates the buffers, fills a
:class:`Row` and calls ``select_row(row, n_buffered)``.

Sources and sinks a caller chooses through the :class:`Row`:

* ``scores`` (``[B, S, W]`` float32) is the row in global memory; ``None`` when the keys already sit in the
  candidate buffer (``cand_idx``/``cand_key`` from ``cand_base``), which the select then never leaves;
* ``positions`` (``[B, S, W]`` int32, optional, with ``scores``): element ``j``'s position is ``positions[b, s, j]``
  instead of ``j``, both for what is written to ``indices`` and for the tie rule (distinct non-negative positions
  among the finite scores make the tie select exact);
* the selected positions go to ``indices[b, s, :k]``, and, when ``out_scores`` is given, their scores (decoded from
  the keys) to ``out_scores[b, s, :k]``; padding is ``-1`` and ``-inf``.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations (closure shapes) eagerly.

from typing import Any, NamedTuple

import tilelang.language as T

__all__ = [
    "ALL_ONES",
    "DIGIT_BITS",
    "FINITE_KEY_MAX",
    "FINITE_KEY_MIN",
    "INVALID_INDEX",
    "KEY_DTYPE",
    "N_KEY_STATE",
    "N_STATE",
    "PASS_CONFIGS",
    "RADIX",
    "Row",
    "SelectMacros",
    "exclusive_threshold",
    "hist_bytes",
    "is_finite_key",
    "key_score",
    "new_row",
    "order_key",
    "rounds",
    "select_macros",
    "state_bytes",
    "tie_key",
]

SCORE_DTYPE = "float32"
INDEX_DTYPE = "int32"
KEY_DTYPE = "uint32"
COUNT_DTYPE = "int32"
INVALID_INDEX = -1

KEY_BITS = 32
# Radix digits, most significant first. An 11-bit first digit is sign + exponent + 2 mantissa bits, so the threshold
# bin of typical score rows is a quarter binade: small enough for the candidate buffer.
DIGIT_BITS: tuple[int, ...] = (11, 11, 10)
RADIX = 1 << max(DIGIT_BITS)
_SCAN_STEPS = RADIX.bit_length() - 1  # log2(RADIX) doubling steps of the suffix scan

SIGN_BIT = 0x80000000
ALL_ONES = 0xFFFFFFFF
FINITE_KEY_MIN = 0x00800000  # order_key(-FLT_MAX); -inf is 0x007FFFFF, negative NaNs are lower still
FINITE_KEY_MAX = 0xFF7FFFFF  # order_key(+FLT_MAX); +inf is 0xFF800000, positive NaNs are higher still
# The final comparison key & mask == prefix with mask = ALL_ONES and prefix = 0 matches no finite key (all are >
# FINITE_KEY_MIN > 0): the "select every finite key" state of a row with fewer than k finite scores.
_NO_TIE_PREFIX = 0

# Slots of the per-row int32 state (shared memory on CUDA).
_ST_K_REM = 0  # keys still needed from the current threshold bin
_ST_COUNT = 1  # keys in the current threshold bin
_ST_DONE = 2  # 1 once the threshold (prefix, mask) is final
_ST_IN_BUF = 3  # 1 once the threshold bin's keys live in the candidate buffer
_ST_N_BUF = 4  # candidate-buffer fill counter (then: candidates in the buffer)
_ST_N_OUT = 5  # output slots used by keys above the threshold
_ST_N_TIE = 6  # keys equal to the threshold seen in the final pass
_ST_TIE_K_REM = 7  # the tie select's k_rem, count and done (the same roles as above, over tie keys)
_ST_TIE_COUNT = 8
_ST_TIE_DONE = 9
N_STATE = 10
# Slots of the per-row uint32 key state.
_KS_PREFIX = 0  # the threshold's fixed high bits (low bits zero)
_KS_MASK = 1  # which bits of a key the final pass compares with the prefix
_KS_TIE_PREFIX = 2  # the tie select's prefix and mask; (0, 0) keeps every tied key
_KS_TIE_MASK = 3
N_KEY_STATE = 4
# order_key(-0.0) and order_key(+0.0): equal scores, so -0.0 takes +0.0's key (the tie rule then sees one value).
_NEG_ZERO_KEY = 0x7FFFFFFF
_POS_ZERO_KEY = 0x80000000


# Barriers are explicit (every pass is separated by one); TileLang's automatic storage sync would add more of them,
# some inside loops, without making anything more correct.
# The buffer-initialisation check reports the candidate buffer as read before written: it cannot see that reads stop
# at the count an earlier pass wrote.
PASS_CONFIGS: dict[str, Any] = {"tl.disable_thread_storage_sync": True, "tl.disable_buffer_init_check": True}


class _Select(NamedTuple):
    """Where one radix select keeps its state (compile-time slot numbers) and which keys it ranks."""

    k_rem: int
    count: int
    done: int
    prefix: int
    mask: int
    ties: bool  # False: the score keys; True: the tie keys (``~position``) of the keys equal to the score threshold


_SCORE_SELECT = _Select(_ST_K_REM, _ST_COUNT, _ST_DONE, _KS_PREFIX, _KS_MASK, ties=False)
_TIE_SELECT = _Select(_ST_TIE_K_REM, _ST_TIE_COUNT, _ST_TIE_DONE, _KS_TIE_PREFIX, _KS_TIE_MASK, ties=True)


class _Round(NamedTuple):
    """Compile-time description of one radix round (Python ints)."""

    match_mask: int  # bits fixed by earlier rounds (a key takes part iff key & match_mask == prefix)
    shift: int  # the digit is (key >> shift) & digit_mask
    digit_mask: int
    level_mask: int  # bits fixed once this round's digit is known


def rounds() -> list[_Round]:
    """The radix rounds of ``DIGIT_BITS`` (most significant digit first)."""
    if sum(DIGIT_BITS) != KEY_BITS:
        raise AssertionError(f"DIGIT_BITS {DIGIT_BITS} must cover {KEY_BITS} bits")
    result = []
    fixed = 0
    for width in DIGIT_BITS:
        match_mask = (ALL_ONES << (KEY_BITS - fixed)) & ALL_ONES
        fixed += width
        level_mask = (ALL_ONES << (KEY_BITS - fixed)) & ALL_ONES
        result.append(_Round(match_mask, KEY_BITS - fixed, (1 << width) - 1, level_mask))
    return result


def _per_round(r: Any, values: list[int]) -> Any:
    """``values[r]`` as a uint32 expression of the runtime round number ``r`` (a chain of selects)."""
    expr = T.uint32(values[-1])
    for position in range(len(values) - 2, -1, -1):
        expr = T.if_then_else(r == position, T.uint32(values[position]), expr)
    return expr


def order_key(x: Any) -> Any:
    """The order-preserving ``uint32`` key of a float32 expression: unsigned key order equals float order.

    Negative floats (sign bit set) flip every bit, non-negative ones set the sign bit. ``-0.0`` gets the key of
    ``+0.0``: they are equal scores, and the tie rule must see them as one value.
    """
    bits = T.reinterpret(x, KEY_DTYPE)
    # Arithmetic shift of the signed bits: all ones for negatives, zero otherwise (a select without a branch).
    sign_fill = T.Cast(KEY_DTYPE, T.shift_right(T.reinterpret(x, "int32"), KEY_BITS - 1))
    key = T.bitwise_xor(bits, T.bitwise_or(sign_fill, T.uint32(SIGN_BIT)))
    return T.if_then_else(key == T.uint32(_NEG_ZERO_KEY), T.uint32(_POS_ZERO_KEY), key)


def tie_key(index: Any) -> Any:
    """The tie key of a position (int32 expression, ``>= 0``): ``~index`` as uint32, larger for smaller positions."""
    return T.bitwise_xor(T.Cast(KEY_DTYPE, index), T.uint32(ALL_ONES))


def is_finite_key(key: Any) -> Any:
    """Whether ``key`` (from :func:`order_key`) is a finite float; infinities and NaNs lie outside the range."""
    return T.And(key >= T.uint32(FINITE_KEY_MIN), key <= T.uint32(FINITE_KEY_MAX))


def key_score(key: Any) -> Any:
    """The float32 score of a finite key (the inverse of :func:`order_key`; ``-0.0`` comes back as ``+0.0``)."""
    bits = T.if_then_else(
        T.bitwise_and(key, T.uint32(SIGN_BIT)) != T.uint32(0),
        T.bitwise_xor(key, T.uint32(SIGN_BIT)),
        T.bitwise_xor(key, T.uint32(ALL_ONES)),
    )
    return T.reinterpret(bits, SCORE_DTYPE)


def hist_bytes() -> int:
    """Shared memory of the two ``RADIX + 1`` int32 histogram halves."""
    return 2 * (RADIX + 1) * 4


def state_bytes() -> int:
    """Shared memory of one row's int32 and uint32 select state."""
    return N_STATE * 4 + N_KEY_STATE * 4


def exclusive_threshold(key_state: Any) -> Any:
    """After ``select_row`` over more than ``k`` finite keys: a key ``T`` such that every key ``<= T`` at a position
    after all the selected ones loses to at least ``k`` selected keys (it is smaller, or equal and later).

    The prefix: every selected key is ``>= prefix`` (its high bits are the threshold bin's, or higher), whether the
    select ran all its rounds (then the prefix is the ``k``-th key itself) or stopped early with the whole bin
    selected. ``key_state`` is the kernel's ``[N_KEY_STATE]`` uint32 state buffer.
    """
    return key_state[_KS_PREFIX]


class Row(NamedTuple):
    """Everything the macros need for one row (a Python object passed through macro arguments)."""

    scores: Any  # [B, S, W] float32 in global memory, or None: the keys are in the candidate buffer already
    indices: Any  # [B, S, k] int32: the output
    out_scores: Any  # [B, S, k] float32 (the selected scores, -inf at padding) or None
    b: Any
    s: Any
    width: Any  # W (symbolic); unused when ``scores`` is None
    tx: Any  # thread index on CUDA, None on the C target
    state: Any  # [N_STATE] int32
    key_state: Any  # [N_KEY_STATE] uint32
    hist: Any  # [2, RADIX + 1] int32: the histogram (half 0) and the double-buffered suffix scan
    cand_idx: Any  # [>= cand_base + cand_capacity] int32
    cand_key: Any  # [>= cand_base + cand_capacity] uint32
    cand_base: Any  # where this row's candidates start in cand_idx/cand_key
    local_count: Any  # [1] int32 local: an atomic's previous value
    local_key: Any  # [1] uint32 local: one element's key
    local_tie: Any  # [1] uint32 local: one element's tie key
    positions: Any = None  # [B, S, W] int32: each score's position (its index and tie key); None: its column


def new_row(alloc: Any, *, cand_entries: int, **sources: Any) -> Row:
    """A :class:`Row` with its state, histogram and ``cand_entries`` candidate slots allocated through ``alloc``
    (``tl_kernels.dsl.Allocators``: shared memory on CUDA, local arrays on the C target), called inside a kernel.

    ``sources`` gives the remaining fields: ``scores``, ``indices``, ``out_scores``, ``b``, ``s``, ``width``, ``tx``
    and optionally ``positions``.
    """
    return Row(
        **sources,
        state=alloc.shared([N_STATE], COUNT_DTYPE),
        key_state=alloc.shared([N_KEY_STATE], KEY_DTYPE),
        hist=alloc.shared([2, RADIX + 1], COUNT_DTYPE),
        cand_idx=alloc.shared([cand_entries], INDEX_DTYPE),
        cand_key=alloc.shared([cand_entries], KEY_DTYPE),
        cand_base=0,
        local_count=T.alloc_local([1], COUNT_DTYPE),
        local_key=T.alloc_local([1], KEY_DTYPE),
        local_tie=T.alloc_local([1], KEY_DTYPE),
    )


class SelectMacros(NamedTuple):
    """The macros of :func:`select_macros` that kernels call."""

    select_row: Any  # select_row(row, n_buffered): the k best keys of the row into indices (and out_scores)
    for_range: Any  # for_range(row, n, fn, payload): fn(row, j, payload) for j in [0, n), spread over the threads
    barrier: Any  # barrier(): __syncthreads on CUDA, nothing on the C target
    single: Any  # single(row, fn, payload): fn(row, payload) by one thread


def select_macros(*, k: int, cand_capacity: int, threads: int, cpu: bool) -> SelectMacros:
    """The radix-select macros for ``k`` selected keys per row, a candidate buffer of ``cand_capacity`` entries per
    row, ``threads`` threads per block (ignored on the C target: ``cpu``)."""
    all_rounds = rounds()
    n_rounds = len(all_rounds)
    # After an odd number of doubling steps the suffix sums sit in half 1 of the histogram buffer.
    suffix_half = _SCAN_STEPS % 2

    # ---- the per-target pieces: loops over n items, barriers, the single writer --------------------------------

    @T.macro
    def for_range(row, n, fn, payload):
        """``fn(row, j, payload)`` for every ``j`` in ``[0, n)``: strided over the block's threads on CUDA."""
        if cpu:
            for j in T.serial(n):
                fn(row, j, payload)
        else:
            for step in T.serial(T.ceildiv(n, threads)):
                j = step * threads + row.tx
                if j < n:
                    fn(row, j, payload)

    @T.macro
    def barrier():
        if not cpu:
            T.sync_threads()

    @T.macro
    def single(row, fn, payload):
        """``fn(row, payload)`` once per block (thread 0 on CUDA)."""
        if cpu:
            fn(row, payload)
        else:
            if row.tx == 0:
                fn(row, payload)

    # ---- element sources: the row in global memory or the candidate buffer -------------------------------------

    @T.macro
    def visit_global(row, j, body):
        row.local_key[0] = order_key(row.scores[row.b, row.s, j])
        if is_finite_key(row.local_key[0]):
            if row.positions is None:
                body[0](row, j, row.local_key[0], body[1])
            else:  # a keyed row: the element's position is its index (written out, and its tie key)
                body[0](row, row.positions[row.b, row.s, j], row.local_key[0], body[1])

    @T.macro
    def visit_buffer(row, j, body):
        body[0](row, row.cand_idx[row.cand_base + j], row.cand_key[row.cand_base + j], body[1])

    @T.macro
    def for_each_candidate(row, in_buffer, n_buffer, body):
        """``body[0](row, index, key, body[1])`` for every finite key of the current source (a uniform branch)."""
        if row.scores is None:  # a Python test: rows without a global source only ever read the buffer
            for_range(row, n_buffer, visit_buffer, body)
        elif in_buffer == 0:
            for_range(row, row.width, visit_global, body)
        else:
            for_range(row, n_buffer, visit_buffer, body)

    # ---- counting and the threshold search ---------------------------------------------------------------------

    @T.macro
    def zero_bin(row, j, _):
        row.hist[0, j] = 0

    @T.macro
    def count_digit(row, index, key, rnd):
        prefix, match_mask, shift, digit_mask = rnd
        if T.bitwise_and(key, match_mask) == prefix:
            digit = T.Cast(COUNT_DTYPE, T.bitwise_and(T.shift_right(key, shift), digit_mask))
            T.atomic_add(row.hist[0, digit], 1)

    @T.macro
    def count_tie_digit(row, index, key, args):
        """``count_digit`` over the tie keys of the keys equal to the score threshold."""
        threshold, rnd = args
        # A xor, not ==: TVM's bound solver turns ``key == threshold`` into a uint inequality with a negative
        # coefficient and fails ("cannot make uint from negative value -1").
        if T.bitwise_xor(key, threshold) == T.uint32(0):
            row.local_tie[0] = tie_key(index)
            count_digit(row, index, row.local_tie[0], rnd)

    @T.macro
    def scan_step(row, d, args):
        """One doubling step of the suffix sum: ``dst[d] = src[d] + src[d + offset]``."""
        src, offset = args
        if d + offset < RADIX:
            row.hist[1 - src, d] = row.hist[src, d] + row.hist[src, d + offset]
        else:
            row.hist[1 - src, d] = row.hist[src, d]

    @T.macro
    def pick_bin(row, d, args):
        """The one bin with ``suffix[d] >= k_rem > suffix[d + 1]`` fixes the next digit (a single writer)."""
        k_rem, r, shift, level_mask, sel = args
        if row.hist[suffix_half, d] >= k_rem and row.hist[suffix_half, d + 1] < k_rem:
            new_rem = k_rem - row.hist[suffix_half, d + 1]
            count = row.hist[suffix_half, d] - row.hist[suffix_half, d + 1]
            row.state[sel.k_rem] = new_rem
            row.state[sel.count] = count
            row.key_state[sel.prefix] = T.bitwise_or(row.key_state[sel.prefix], T.shift_left(T.Cast(KEY_DTYPE, d), shift))
            # Done after the last digit, or early when the whole bin is needed.
            if r == n_rounds - 1 or count == new_rem:
                row.state[sel.done] = 1
                row.key_state[sel.mask] = level_mask

    @T.macro
    def select_all_finite(row, k_rem):
        """Fewer than ``k`` finite keys: select them all (mask/prefix that every finite key exceeds), pad the rest."""
        if row.hist[suffix_half, 0] < k_rem:
            row.state[_ST_K_REM] = k_rem - row.hist[suffix_half, 0]
            row.state[_ST_DONE] = 1
            row.key_state[_KS_PREFIX] = T.uint32(_NO_TIE_PREFIX)
            row.key_state[_KS_MASK] = T.uint32(ALL_ONES)

    # ---- writing: keys above the threshold, the tie policy, the candidate buffer, padding -----------------------

    @T.macro
    def write_out(row, slot, index, key):
        row.indices[row.b, row.s, slot] = index
        if row.out_scores is not None:
            row.out_scores[row.b, row.s, slot] = key_score(key)

    @T.macro
    def emit_above(row, index, key, above_slots):
        """Write ``index`` into the next of the ``above_slots`` slots reserved for keys above the threshold."""
        row.local_count[0] = T.atomic_add(row.state[_ST_N_OUT], 1, return_prev=True)
        if row.local_count[0] < above_slots:
            write_out(row, row.local_count[0], index, key)

    @T.macro
    def collect(row, index, key, args):
        """After a round: keys above the threshold bin go to the output, the bin's keys to the candidate buffer."""
        prefix, level_mask, k_rem = args
        if T.bitwise_and(key, level_mask) > prefix:
            emit_above(row, index, key, k - k_rem)
        elif T.bitwise_and(key, level_mask) == prefix:
            row.local_count[0] = T.atomic_add(row.state[_ST_N_BUF], 1, return_prev=True)
            if row.local_count[0] < cand_capacity:
                row.cand_idx[row.cand_base + row.local_count[0]] = index
                row.cand_key[row.cand_base + row.local_count[0]] = key

    @T.macro
    def emit_final(row, index, key, args):
        """Every key above the threshold, and the ``k_rem`` keys equal to it that the tie select kept (all of them
        when no tie select ran: its prefix and mask are 0)."""
        prefix, mask, k_rem, tie_prefix, tie_mask = args
        if T.bitwise_and(key, mask) > prefix:
            emit_above(row, index, key, k - k_rem)
        elif T.bitwise_and(key, mask) == prefix:
            row.local_tie[0] = tie_key(index)
            if T.bitwise_and(row.local_tie[0], tie_mask) >= tie_prefix:
                row.local_count[0] = T.atomic_add(row.state[_ST_N_TIE], 1, return_prev=True)
                if row.local_count[0] < k_rem:
                    write_out(row, k - k_rem + row.local_count[0], index, key)

    @T.macro
    def pad(row, j, written):
        if j >= written:
            row.indices[row.b, row.s, j] = INVALID_INDEX
            if row.out_scores is not None:
                row.out_scores[row.b, row.s, j] = -T.infinity(SCORE_DTYPE)

    @T.macro
    def init_state(row, n_buffered):
        row.state[_ST_K_REM] = k
        row.state[_ST_COUNT] = 0
        row.state[_ST_DONE] = 0
        if row.scores is None:
            row.state[_ST_IN_BUF] = 1
            row.state[_ST_N_BUF] = n_buffered
        else:
            row.state[_ST_IN_BUF] = 0
            row.state[_ST_N_BUF] = 0
        row.state[_ST_N_OUT] = 0
        row.state[_ST_N_TIE] = 0
        row.key_state[_KS_PREFIX] = T.uint32(0)
        row.key_state[_KS_MASK] = T.uint32(0)
        row.state[_ST_TIE_K_REM] = 0
        row.state[_ST_TIE_COUNT] = 0
        row.state[_ST_TIE_DONE] = 1  # until start_ties finds that the ties must be ranked
        row.key_state[_KS_TIE_PREFIX] = T.uint32(0)
        row.key_state[_KS_TIE_MASK] = T.uint32(0)
        row.hist[1, RADIX] = 0  # the scan never writes the sentinel bin (RADIX) of either half

    @T.macro
    def start_ties(row, _):
        row.state[_ST_TIE_K_REM] = row.state[_ST_K_REM]
        row.state[_ST_TIE_DONE] = 0

    @T.macro
    def mark_in_buffer(row, _):
        row.state[_ST_IN_BUF] = 1

    # ---- the row ------------------------------------------------------------------------------------------------

    @T.macro
    def fill_buffer(row, r, level_mask, in_buffer):
        """After a score round: copy the threshold bin into the candidate buffer when it is known to fit (and write
        the keys above it); otherwise the next round re-reads the row."""
        if r < n_rounds - 1 and row.state[_ST_DONE] == 0 and in_buffer == 0 and row.state[_ST_COUNT] <= cand_capacity:
            k_rem = row.state[_ST_K_REM]
            prefix = row.key_state[_KS_PREFIX]
            for_each_candidate(row, 0, 0, (collect, (prefix, level_mask, k_rem)))
            barrier()
            single(row, mark_in_buffer, None)

    @T.macro
    def radix_round(row, r, sel):
        """Round ``r`` of the select ``sel``: histogram of the next digit, suffix sums, threshold bin; then (score
        select only) maybe fill the candidate buffer."""
        # This round's constants, selected once into registers (not re-selected per element).
        match_mask = T.alloc_var(KEY_DTYPE)
        shift = T.alloc_var(KEY_DTYPE)
        digit_mask = T.alloc_var(KEY_DTYPE)
        level_mask = T.alloc_var(KEY_DTYPE)
        match_mask = _per_round(r, [rnd.match_mask for rnd in all_rounds])
        shift = _per_round(r, [rnd.shift for rnd in all_rounds])
        digit_mask = _per_round(r, [rnd.digit_mask for rnd in all_rounds])
        level_mask = _per_round(r, [rnd.level_mask for rnd in all_rounds])
        # Uniform values read once into registers (every thread reads the same shared word after a barrier).
        k_rem = T.alloc_var(COUNT_DTYPE)
        in_buffer = T.alloc_var(COUNT_DTYPE)
        n_buffer = T.alloc_var(COUNT_DTYPE)
        prefix = T.alloc_var(KEY_DTYPE)
        threshold = T.alloc_var(KEY_DTYPE)
        k_rem = row.state[sel.k_rem]
        in_buffer = row.state[_ST_IN_BUF]
        n_buffer = row.state[_ST_N_BUF]
        prefix = row.key_state[sel.prefix]
        threshold = row.key_state[_KS_PREFIX]
        for_range(row, RADIX + 1, zero_bin, None)
        barrier()
        rnd = (prefix, match_mask, shift, digit_mask)
        if sel.ties:
            for_each_candidate(row, in_buffer, n_buffer, (count_tie_digit, (threshold, rnd)))
        else:
            for_each_candidate(row, in_buffer, n_buffer, (count_digit, rnd))
        barrier()
        # Double-buffered doubling scan: after step i each bin holds the sum of itself and the next 2^(i+1) - 1.
        for step in T.serial(_SCAN_STEPS):
            for_range(row, RADIX, scan_step, (step % 2, T.shift_left(1, step)))
            barrier()
        for_range(row, RADIX, pick_bin, (k_rem, r, shift, level_mask, sel))
        # Nested: `sel.ties` is a Python constant (the branch is chosen at trace time), `r == 0` a TIR condition.
        if not sel.ties:  # noqa: SIM102
            if r == 0:
                single(row, select_all_finite, k_rem)
        barrier()
        if not sel.ties:
            fill_buffer(row, r, level_mask, in_buffer)
        barrier()

    @T.macro
    def select_row(row, n_buffered):
        """The ``k`` best keys of the row into ``indices`` (and ``out_scores``): from ``row.scores``, or, when it is
        None, from the ``n_buffered`` candidates at ``row.cand_base`` (at most ``cand_capacity``). Ends with a
        barrier; afterwards :func:`exclusive_threshold` bounds the selected keys from below."""
        single(row, init_state, n_buffered)
        barrier()
        for r in T.serial(n_rounds):
            if row.state[_ST_DONE] == 0:
                radix_round(row, r, _SCORE_SELECT)
        # The tie rule: more keys equal the threshold than are still needed, so rank them by position.
        if row.state[_ST_COUNT] > row.state[_ST_K_REM]:
            single(row, start_ties, None)
            barrier()
            for r in T.serial(n_rounds):
                if row.state[_ST_TIE_DONE] == 0:
                    radix_round(row, r, _TIE_SELECT)
        k_rem = T.alloc_var(COUNT_DTYPE)
        prefix = T.alloc_var(KEY_DTYPE)
        mask = T.alloc_var(KEY_DTYPE)
        tie_prefix = T.alloc_var(KEY_DTYPE)
        tie_mask = T.alloc_var(KEY_DTYPE)
        k_rem = row.state[_ST_K_REM]
        prefix = row.key_state[_KS_PREFIX]
        mask = row.key_state[_KS_MASK]
        tie_prefix = row.key_state[_KS_TIE_PREFIX]
        tie_mask = row.key_state[_KS_TIE_MASK]
        emit = (emit_final, (prefix, mask, k_rem, tie_prefix, tie_mask))
        for_each_candidate(row, row.state[_ST_IN_BUF], row.state[_ST_N_BUF], emit)
        barrier()
        written = T.alloc_var(COUNT_DTYPE)
        written = k - k_rem + T.min(row.state[_ST_N_TIE], k_rem)
        for_range(row, k, pad, written)
        barrier()

    return SelectMacros(select_row, for_range, barrier, single)

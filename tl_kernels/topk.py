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
from typing import Any, NamedTuple

import tilelang.language as T

from tl_kernels import dsl

__all__ = [
    "DIGIT_BITS",
    "FINITE_KEY_MAX",
    "FINITE_KEY_MIN",
    "INVALID_INDEX",
    "Config",
    "TUNING_SPACE",
    "build",
    "check_config",
    "default_config",
    "order_key",
    "shared_memory_bytes",
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
_N_STATE = 10
# Slots of the per-row uint32 key state.
_KS_PREFIX = 0  # the threshold's fixed high bits (low bits zero)
_KS_MASK = 1  # which bits of a key the final pass compares with the prefix
_KS_TIE_PREFIX = 2  # the tie select's prefix and mask; (0, 0) keeps every tied key
_KS_TIE_MASK = 3
_N_KEY_STATE = 4
# order_key(-0.0) and order_key(+0.0): equal scores, so -0.0 takes +0.0's key (the tie rule then sees one value).
_NEG_ZERO_KEY = 0x7FFFFFFF
_POS_ZERO_KEY = 0x80000000

_WARP = 32
_MAX_THREADS = 1024

# Barriers are explicit (every pass is separated by one); TileLang's automatic storage sync would add more of them,
# some inside loops, without making anything more correct.
# The buffer-initialisation check reports the candidate buffer as read before written: it cannot see that reads stop
# at the count an earlier pass wrote.
_PASS_CONFIGS: dict[str, Any] = {"tl.disable_thread_storage_sync": True, "tl.disable_buffer_init_check": True}


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
    histograms = 2 * (RADIX + 1) * 4
    candidates = config.cand_capacity * (4 + 4)
    state = _N_STATE * 4 + _N_KEY_STATE * 4
    return histograms + candidates + state


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


def _rounds() -> list[_Round]:
    """The radix rounds of ``DIGIT_BITS`` (most significant digit first)."""
    if sum(DIGIT_BITS) != KEY_BITS:
        raise AssertionError(f"DIGIT_BITS {DIGIT_BITS} must cover {KEY_BITS} bits")
    rounds = []
    fixed = 0
    for width in DIGIT_BITS:
        match_mask = (ALL_ONES << (KEY_BITS - fixed)) & ALL_ONES
        fixed += width
        level_mask = (ALL_ONES << (KEY_BITS - fixed)) & ALL_ONES
        rounds.append(_Round(match_mask, KEY_BITS - fixed, (1 << width) - 1, level_mask))
    return rounds


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


class _Row(NamedTuple):
    """Everything the macros need for one row (a Python object passed through macro arguments)."""

    scores: Any  # [B, S, S_kv] float32
    indices: Any  # [B, S, k] int32
    b: Any
    s: Any
    width: Any  # S_kv (symbolic)
    tx: Any  # thread index on CUDA, None on the C target
    state: Any  # [_N_STATE] int32
    key_state: Any  # [_N_KEY_STATE] uint32
    hist: Any  # [2, RADIX + 1] int32: the histogram (half 0) and the double-buffered suffix scan
    cand_idx: Any  # [cand_capacity] int32
    cand_key: Any  # [cand_capacity] uint32
    local_count: Any  # [1] int32 local: an atomic's previous value
    local_key: Any  # [1] uint32 local: one element's key
    local_tie: Any  # [1] uint32 local: one element's tie key


def build(*, k: int, threads: int = Config.threads, cand_capacity: int = Config.cand_capacity, target: dsl.Target) -> Any:
    """The top-k prim_func ``(scores [B, S, S_kv] float32, indices [B, S, k] int32)``; ``B``, ``S``, ``S_kv`` symbolic.

    Grid: one block per row (``S`` x ``B``). ``k`` is the only compile-time shape; any ``k >= 1`` works, also
    ``k > S_kv``. On the C target ``threads`` is ignored.
    """
    check_config({"k": k, "target": target}, Config(threads=threads, cand_capacity=cand_capacity))
    cpu = dsl.is_cpu(target)
    alloc = dsl.allocators(target)
    rounds = _rounds()
    n_rounds = len(rounds)
    # After an odd number of doubling steps the suffix sums sit in half 1 of the histogram buffer.
    suffix_half = _SCAN_STEPS % 2

    batch = T.dynamic("batch")
    seq = T.dynamic("seq")
    seq_kv = T.dynamic("seq_kv")

    # Macro parameters carry no annotations on purpose: TileLang gives annotated macro parameters meaning (T.Ref).
    # Loop bodies are passed as (macro, payload) pairs and called as ``fn(row, j, payload)``.

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
            body[0](row, j, row.local_key[0], body[1])

    @T.macro
    def visit_buffer(row, j, body):
        body[0](row, row.cand_idx[j], row.cand_key[j], body[1])

    @T.macro
    def for_each_candidate(row, in_buffer, n_buffer, body):
        """``body[0](row, index, key, body[1])`` for every finite key of the current source (a uniform branch)."""
        if in_buffer == 0:
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
    def emit_above(row, index, above_slots):
        """Write ``index`` into the next of the ``above_slots`` slots reserved for keys above the threshold."""
        row.local_count[0] = T.atomic_add(row.state[_ST_N_OUT], 1, return_prev=True)
        if row.local_count[0] < above_slots:
            row.indices[row.b, row.s, row.local_count[0]] = index

    @T.macro
    def collect(row, index, key, args):
        """After a round: keys above the threshold bin go to the output, the bin's keys to the candidate buffer."""
        prefix, level_mask, k_rem = args
        if T.bitwise_and(key, level_mask) > prefix:
            emit_above(row, index, k - k_rem)
        elif T.bitwise_and(key, level_mask) == prefix:
            row.local_count[0] = T.atomic_add(row.state[_ST_N_BUF], 1, return_prev=True)
            if row.local_count[0] < cand_capacity:
                row.cand_idx[row.local_count[0]] = index
                row.cand_key[row.local_count[0]] = key

    @T.macro
    def emit_final(row, index, key, args):
        """Every key above the threshold, and the ``k_rem`` keys equal to it that the tie select kept (all of them
        when no tie select ran: its prefix and mask are 0)."""
        prefix, mask, k_rem, tie_prefix, tie_mask = args
        if T.bitwise_and(key, mask) > prefix:
            emit_above(row, index, k - k_rem)
        elif T.bitwise_and(key, mask) == prefix:
            row.local_tie[0] = tie_key(index)
            if T.bitwise_and(row.local_tie[0], tie_mask) >= tie_prefix:
                row.local_count[0] = T.atomic_add(row.state[_ST_N_TIE], 1, return_prev=True)
                if row.local_count[0] < k_rem:
                    row.indices[row.b, row.s, k - k_rem + row.local_count[0]] = index

    @T.macro
    def pad(row, j, written):
        if j >= written:
            row.indices[row.b, row.s, j] = INVALID_INDEX

    @T.macro
    def init_state(row, _):
        row.state[_ST_K_REM] = k
        row.state[_ST_COUNT] = 0
        row.state[_ST_DONE] = 0
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
        match_mask = _per_round(r, [rnd.match_mask for rnd in rounds])
        shift = _per_round(r, [rnd.shift for rnd in rounds])
        digit_mask = _per_round(r, [rnd.digit_mask for rnd in rounds])
        level_mask = _per_round(r, [rnd.level_mask for rnd in rounds])
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
    def select_row(row):
        single(row, init_state, None)
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

    @T.prim_func
    def topk_indices(
        scores: T.Tensor((batch, seq, seq_kv), SCORE_DTYPE),
        indices: T.Tensor((batch, seq, k), INDEX_DTYPE),
    ):
        with T.Kernel(seq, batch, threads=threads) as (s, b):
            state = alloc.shared([_N_STATE], COUNT_DTYPE)
            key_state = alloc.shared([_N_KEY_STATE], KEY_DTYPE)
            hist = alloc.shared([2, RADIX + 1], COUNT_DTYPE)
            cand_idx = alloc.shared([cand_capacity], INDEX_DTYPE)
            cand_key = alloc.shared([cand_capacity], KEY_DTYPE)
            local_count = T.alloc_local([1], COUNT_DTYPE)
            local_key = T.alloc_local([1], KEY_DTYPE)
            local_tie = T.alloc_local([1], KEY_DTYPE)
            row = _Row(
                scores,
                indices,
                b,
                s,
                seq_kv,
                None if cpu else T.get_thread_binding(),
                state,
                key_state,
                hist,
                cand_idx,
                cand_key,
                local_count,
                local_key,
                local_tie,
            )
            select_row(row)

    if cpu:
        return dsl.with_pass_configs(topk_indices, _PASS_CONFIGS)
    return dsl.with_target_pass_configs(topk_indices, target, _PASS_CONFIGS)

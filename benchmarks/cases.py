"""The standard benchmark cases, declared once as data, with their FLOP and byte counts.

``dsa-bench`` (``benchmarks.bench``) runs these (``--dry-run`` lists them); the one-shot GPU check runs them all. A case
names its kernel as the tuner does (``indexer``, ``topk``, ``sparse_mla_fwd``, ``sparse_mla_bwd``) and holds the
kernel's static parameters and runtime sizes in the tuner's vocabulary (``batch``, ``seq_len``, ``seq_len_kv``,
``topk``), so that its inputs come from the same makers as the tuner's (``benchmarks.runners``). The ``memory`` cases
are not a kernel: they measure the peak device memory of the whole DSA path (FP8 indexer, top-k, sparse MLA forward)
against dense attention. The ``selection`` cases measure time and peak device memory of long-context selection:
``dsa.ops.index_topk`` (never the ``S x S_kv`` scores) against the materialised scores with our top-k and with
``torch.topk``. The ``sparse_mla_decode`` and ``index_topk_decode`` cases are decoding over paged caches
(``dsa.cache.PagedKVCache``: FP8 latent rows in FlashMLA's V3.2 layout, FP8 indexer keys), B sequences of one
context length with ``s_q`` new queries each (the attention is the ``sparse_mla_decode`` tuner kernel, the selection
the ``index_topk`` kernel's paged problem). A kernel case's FLOP and byte counts are its problem description's
(``benchmarks.problems``, on top of ``benchmarks.flops``: useful work only); the V4 cases count with
``benchmarks.flops`` directly.

The ``v4_prefill`` and ``v4_decode`` cases are DeepSeek-V4's attention (V4-Flash: 64 heads, top-512; V4-Pro: 128
heads, top-1024; ``d_qk = d_v = 512``, K = V, a sink per head, a 128-token window): prefill of one sequence over two
sources (the window as one row range per query, plus CSA's selected compressed entries, rate 4, or HCA's range of
visible entries, rate 128), and CSA decoding over paged caches (MODEL1 FP8, ``dsa.kv_format.MODEL1_FP8_LAYOUT``, or
bf16: the window as a range through its block table, the selected entries as slots of a second cache). Their inputs
and check are in ``benchmarks.inputs`` too. None is in the default run (``quick=False``): the one-shot GPU check's
bench stage (85 s for the V3.2 cases) has no time left for their 512-wide kernel builds (17-55 s each on sm_90a);
``--cases v4`` or ``--full`` runs them.

A case marked ``quick=False`` is left out of the default run (``dsa-bench`` without ``--full``, hence the one-shot
GPU check, whose bench stage has a fixed time budget); ``--full`` runs it, and so does naming it with ``--cases``.

Targets are fractions of the host's measured ceilings (``fp8_tflops``, ``bf16_tflops``, ``copy_gbps``) or absolute
TFLOP/s, and ``min_speedup`` against another provider; the harness evaluates them into result rows.

Nothing here touches a device: the module is data and arithmetic (the dry run and the CPU tests import it on any
machine); the V4 decode cases read their cache's bytes per token from ``dsa.kv_format`` when they are built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autotune.lookup import space
from benchmarks import flops, problems
from dsa import kv_format as formats

# DeepSeek-V3.2 dimensions.
INDEX_HEADS = 64
INDEX_DIM = 128
MLA_HEADS = 128
D_QK = 576
D_V = 512
TOPK = 2048

INDEXER_SEQ_LENS: tuple[int, ...] = (4096, 16384, 65536)
TOPK_ROW_LENGTHS: tuple[int, ...] = (8192, 32768, 131072)
TOPK_ROWS = 4096
MLA_PREFILL_SEQ = 4096
MLA_PREFILL_KV_LENS: tuple[int, ...] = (8192, 32768, 65536)
MLA_DECODE_BATCH = 128
MLA_DECODE_SEQ = 2
MLA_DECODE_KV = 32768
MEMORY_SEQ_LENS: tuple[int, ...] = (32768, 65536)
SELECTION_SEQ_LENS: tuple[int, ...] = (8192, 32768, 65536, 131072)
D_ROPE = 64
PAGE_SIZE = 64
DECODE_BATCHES: tuple[int, ...] = (1, 32, 128)
DECODE_SEQS: tuple[int, ...] = (1, 2)
DECODE_CONTEXTS: tuple[int, ...] = (8192, 32768, 131072)
DECODE_BF16_SHAPE = (128, 2, 32768)
"""(batch, s_q, context) of the one bf16-cache decode case: the FP8 quick case's shape (and the forward's decode
case's)."""
INDEX_DECODE_BATCHES: tuple[int, ...] = (1, 32)
INDEX_DECODE_SEQ = 1
QUICK_DECODE: tuple[str, ...] = ("sparse_mla_decode-fp8-b128-s2-kv32768", "index_topk_decode-fp8-b32-s1-kv32768")
"""The decode cases in the default run; every other decode case runs with ``--full`` (or named by ``--cases``)."""

# DeepSeek-V4 (FlashMLA's MODEL1 configurations): heads and CSA's top-k per model.
V4_MODELS: dict[str, tuple[int, int]] = dict(zip(("flash", "pro"), space.V4_MODELS))
V4_D = 512
V4_D_ROPE = 64
V4_WINDOW = 128
V4_RATES: dict[str, int] = {"csa": space.V4_CSA_RATE, "hca": space.V4_HCA_RATE}
V4_PREFILL_SEQS: tuple[int, ...] = (8192, 32768, 65536, 131072)
V4_DECODE_CONTEXT = 32768
"""Tokens of context per sequence in the V4 decode cases (8192 compressed entries per sequence, CSA)."""

MEMORY = "memory"
SELECTION = "selection"
MEMORY_KINDS: tuple[str, ...] = (MEMORY, SELECTION)
"""The cases measured by peak device memory and one call's wall time (``benchmarks.harness.run_memory_case``)."""
SPARSE_MLA_DECODE = "sparse_mla_decode"
INDEX_TOPK_DECODE = "index_topk_decode"
DECODE_KINDS: tuple[str, ...] = (SPARSE_MLA_DECODE, INDEX_TOPK_DECODE)
"""The decode cases over paged caches (``index_topk_decode`` runs the ``index_topk`` kernel's runner)."""
V4_PREFILL = "v4_prefill"
V4_DECODE = "v4_decode"
V4_KINDS: tuple[str, ...] = (V4_PREFILL, V4_DECODE)
"""DeepSeek-V4's two-source attention: inputs and check in ``benchmarks.inputs`` (no tuner runner)."""
KERNELS: tuple[str, ...] = (
    "indexer", "topk", "index_topk", "sparse_mla_fwd", "sparse_mla_bwd", MEMORY, SELECTION, *DECODE_KINDS,
    *V4_KINDS,
)  # fmt: skip
_NO_OPTIONS = {"has_topk_length": False, "has_sink": False}


@dataclass(frozen=True)
class Target:
    """A performance goal of a case for the ``dsa`` provider.

    Attributes:
        metric: ``"tflops"``, ``"gbps"`` or ``"speedup"``.
        value: an absolute value (TFLOP/s, GB/s, ratio) or, with ``of``, a fraction of a measured ceiling.
        of: ``None`` or the ceiling the value is a fraction of (``"fp8_tflops"``, ``"bf16_tflops"``, ``"copy_gbps"``).
        against: for ``speedup``, the provider the ``dsa`` latency is compared with.
    """

    metric: str
    value: float
    of: str | None = None
    against: str | None = None

    def describe(self) -> str:
        if self.metric == "speedup":
            return f">= {self.value:g}x {self.against}"
        if self.of:
            return f">= {self.value:.0%} of {self.of}"
        return f">= {self.value:g} {'TFLOP/s' if self.metric == 'tflops' else 'GB/s'}"


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        kernel: one of :data:`KERNELS`.
        name: unique id, e.g. ``"indexer-fp8-s4096"``.
        static: the kernel's static parameters (``build``'s non-config keyword arguments); for ``memory`` those of
            both stages (``index_heads``, ``index_dim`` and the attention's).
        sizes: the runtime sizes (``batch``, ``seq_len``, ``seq_len_kv``, and ``topk`` where it is one).
        flops: useful floating-point operations of one call (0 when FLOP/s means nothing).
        bytes: minimal device-memory traffic of one call.
        targets: goals for the ``dsa`` provider.
        context: the context length the plot puts this case at (keys per query).
        quick: in the default run (``dsa-bench`` without ``--full``, and the one-shot GPU check).
    """

    kernel: str
    name: str
    static: dict[str, Any]
    sizes: dict[str, int]
    flops: float
    bytes: float
    targets: tuple[Target, ...] = field(default_factory=tuple)
    context: int = 0
    quick: bool = True


def _sizes(batch: int, seq: int, seq_kv: int, **extra: int) -> dict[str, int]:
    return {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv, **extra}


def _kernel_case(kernel: str, name: str, static: dict[str, Any], sizes: dict[str, int], targets: tuple = (), *,
                 context: int, quick: bool = True) -> Case:  # fmt: skip
    """A case of a kernel with a problem description (``benchmarks.problems``): its FLOPs and bytes are the
    problem's."""
    problem = problems.problem_for(kernel, static, sizes)
    work = problem.flops()
    return Case(kernel, name, static, sizes, 0.0 if work is None else work, problem.bytes(), targets, context=context,
                quick=quick)  # fmt: skip


def _indexer_case(name: str, seq: int, seq_kv: int, heads: int, dim: int, dtype: str, targets: tuple) -> Case:
    static = {"heads": heads, "dim": dim, "dtype": dtype, "mode": "causal"}
    return _kernel_case("indexer", name, static, _sizes(1, seq, seq_kv), targets, context=seq_kv)


def _index_topk_case(name: str, seq: int, heads: int, dim: int, dtype: str, topk: int, targets: tuple) -> Case:
    static = {"heads": heads, "dim": dim, "dtype": dtype, "mode": "causal", "topk": topk}
    return _kernel_case("index_topk", name, static, _sizes(1, seq, seq), targets, context=seq)


def _topk_case(name: str, rows: int, length: int, k: int, targets: tuple) -> Case:
    return _kernel_case("topk", name, {"k": k}, _sizes(1, rows, length), targets, context=length)


def _mla_case(kernel: str, name: str, batch: int, seq: int, seq_kv: int, heads: int, d_qk: int, d_v: int,
              topk: int, targets: tuple) -> Case:  # fmt: skip
    if kernel == "sparse_mla_fwd":
        static = {"heads": heads, "d_qk": d_qk, "d_v": d_v, **_NO_OPTIONS}
        sizes = _sizes(batch, seq, seq_kv, topk=topk)
    else:
        static = {"heads": heads, "d_qk": d_qk, "d_v": d_v, "topk": topk, **_NO_OPTIONS}
        sizes = _sizes(batch, seq, seq_kv)
    return _kernel_case(kernel, name, static, sizes, targets, context=seq_kv)


def _memory_case(name: str, seq: int, index_heads: int, index_dim: int, heads: int, d_qk: int, d_v: int,
                 topk: int) -> Case:  # fmt: skip
    static = {"index_heads": index_heads, "index_dim": index_dim, "heads": heads, "d_qk": d_qk, "d_v": d_v, "topk": topk}
    return Case(MEMORY, name, static, _sizes(1, seq, seq), 0.0, 0.0, context=seq)


def _selection_case(name: str, seq: int, index_heads: int, index_dim: int, topk: int) -> Case:
    static = {"index_heads": index_heads, "index_dim": index_dim, "topk": topk}
    indexer = problems.IndexerProblem(1, seq, seq, index_heads, index_dim, problems.FP8)
    return Case(SELECTION, name, static, _sizes(1, seq, seq), indexer.flops(), indexer.bytes(), context=seq)


def _sparse_mla_decode_case(name: str, batch: int, seq: int, context: int, heads: int, d_qk: int, d_v: int,
                            d_rope: int, topk: int, kv_format: str, page_size: int, targets: tuple,
                            quick: bool = True) -> Case:  # fmt: skip
    static = {
        "heads": heads, "d_qk": d_qk, "d_v": d_v, "d_rope": d_rope, "kv_format": kv_format, "page_size": page_size
    }  # fmt: skip
    sizes = _sizes(batch, seq, context, topk=topk)
    return _kernel_case(SPARSE_MLA_DECODE, name, static, sizes, targets, context=context, quick=quick)


def _index_topk_decode_case(name: str, batch: int, seq: int, context: int, heads: int, dim: int, dtype: str,
                            topk: int, page_size: int, quick: bool = True) -> Case:  # fmt: skip
    static = {"heads": heads, "dim": dim, "dtype": dtype, "topk": topk, "page_size": page_size}
    return _kernel_case(INDEX_TOPK_DECODE, name, static, _sizes(batch, seq, context), context=context, quick=quick)


def _v4_prefill_case(name: str, seq: int, heads: int, d: int, window: int, layer: str, rate: int, topk: int,
                     quick: bool = False) -> Case:  # fmt: skip
    """One sequence of ``seq`` tokens (B = 1): the window range plus CSA's ``topk`` selected entries (``layer="csa"``)
    or HCA's range of visible entries (``"hca"``, ``topk`` unused: 0)."""
    static = {"heads": heads, "d_qk": d, "d_v": d, "window": window, "layer": layer, "rate": rate}
    csa = layer == "csa"
    window_pairs = flops.v4_window_pairs(seq, window)
    entry_pairs = flops.v4_compressed_pairs(seq, rate, topk if csa else None)
    pairs = window_pairs + entry_pairs
    return Case(
        V4_PREFILL,
        name,
        static,
        _sizes(1, seq, seq, topk=topk if csa else 0),
        flops.pairs_attention_flops(pairs, heads, d, d),
        flops.v4_prefill_bytes(seq, heads, d, d, pairs, entry_pairs if csa else 0),
        context=seq,
        quick=quick,
    )


def _v4_decode_case(name: str, batch: int, seq: int, context: int, heads: int, d: int, d_rope: int, window: int,
                    rate: int, topk: int, kv_format: str, page_size: int, quick: bool = False) -> Case:  # fmt: skip
    """CSA decoding: each query's window (``window`` rows, a range) and ``topk`` selected compressed entries (slots of
    the compressed cache, ``context // rate`` entries per sequence), over MODEL1 FP8 or bf16 caches; its FLOPs are
    the forward's over those ``window + topk`` rows."""
    static = {"heads": heads, "d_qk": d, "d_v": d, "d_rope": d_rope, "window": window, "rate": rate,
              "kv_format": kv_format, "page_size": page_size}  # fmt: skip
    row_bytes = formats.MODEL1_FP8_LAYOUT.bytes_per_token if kv_format == "fp8" else d * flops.BF16_BYTES
    rows = window + topk
    work = flops.sparse_mla_fwd_flops(batch, seq, heads, rows, d, d)
    traffic = flops.v4_decode_bytes(batch, seq, heads, d, d, rows, row_bytes, topk)
    return Case(V4_DECODE, name, static, _sizes(batch, seq, context, topk=topk), work, traffic, context=context,
                quick=quick)  # fmt: skip


def _v4_prefill_cases() -> list[Case]:
    out = []
    for model, (heads, topk) in V4_MODELS.items():
        for layer, rate in V4_RATES.items():
            for seq in V4_PREFILL_SEQS:
                name = f"{V4_PREFILL}-{model}-{layer}-s{seq}"
                out.append(_v4_prefill_case(name, seq, heads, V4_D, V4_WINDOW, layer, rate, topk if layer == "csa" else 0))
    return out


def _v4_decode_cases() -> list[Case]:
    out = []
    for model, (heads, topk) in V4_MODELS.items():
        for fmt in ("fp8", "bf16"):
            for batch in DECODE_BATCHES:
                for seq in DECODE_SEQS:
                    name = f"{V4_DECODE}-{model}-{fmt}-b{batch}-s{seq}-kv{V4_DECODE_CONTEXT}"
                    out.append(_v4_decode_case(name, batch, seq, V4_DECODE_CONTEXT, heads, V4_D, V4_D_ROPE, V4_WINDOW,
                                               V4_RATES["csa"], topk, fmt, PAGE_SIZE))  # fmt: skip
    return out


def _indexer_cases() -> list[Case]:
    cases = []
    for dtype, short, target in (
        ("float8_e4m3fn", "fp8", Target("tflops", 0.60, of="fp8_tflops")),
        ("bfloat16", "bf16", Target("tflops", 0.60, of="bf16_tflops")),
    ):
        for n in INDEXER_SEQ_LENS:
            cases.append(_indexer_case(f"indexer-{short}-s{n}", n, n, INDEX_HEADS, INDEX_DIM, dtype, (target,)))
    return cases


def _topk_cases() -> list[Case]:
    targets = (Target("gbps", 0.50, of="copy_gbps"), Target("speedup", 10.0, against="torch.topk"))
    return [_topk_case(f"topk-rows{TOPK_ROWS}-len{n}", TOPK_ROWS, n, TOPK, targets) for n in TOPK_ROW_LENGTHS]


def _index_topk_cases() -> list[Case]:
    # The fused selection should cost little more than the indexer it contains: half the FP8 matrix rate.
    target = Target("tflops", 0.50, of="fp8_tflops")
    return [
        _index_topk_case(f"index_topk-fp8-s{n}", n, INDEX_HEADS, INDEX_DIM, "float8_e4m3fn", TOPK, (target,))
        for n in INDEXER_SEQ_LENS
    ]


def _mla_shapes() -> list[tuple[str, int, int, int]]:
    prefill = [(f"prefill-s{MLA_PREFILL_SEQ}-kv{n}", 1, MLA_PREFILL_SEQ, n) for n in MLA_PREFILL_KV_LENS]
    decode = (f"decode-b{MLA_DECODE_BATCH}-s{MLA_DECODE_SEQ}-kv{MLA_DECODE_KV}", MLA_DECODE_BATCH, MLA_DECODE_SEQ,
              MLA_DECODE_KV)  # fmt: skip
    return [*prefill, decode]


def _sparse_mla_cases(kernel: str, target_tflops: float) -> list[Case]:
    return [
        _mla_case(kernel, f"{kernel}-{tag}", batch, seq, seq_kv, MLA_HEADS, D_QK, D_V, TOPK,
                  (Target("tflops", target_tflops),))  # fmt: skip
        for tag, batch, seq, seq_kv in _mla_shapes()
    ]


def _memory_cases() -> list[Case]:
    return [
        _memory_case(f"memory-s{n}", n, INDEX_HEADS, INDEX_DIM, MLA_HEADS, D_QK, D_V, TOPK) for n in MEMORY_SEQ_LENS
    ]


def _selection_cases() -> list[Case]:
    return [_selection_case(f"selection-fp8-s{n}", n, INDEX_HEADS, INDEX_DIM, TOPK) for n in SELECTION_SEQ_LENS]


def _sparse_mla_decode_cases() -> list[Case]:
    # FlashMLA's sparse decode is the baseline (evaluated only where it is importable; it takes FP8 caches only).
    flashmla = (Target("speedup", 1.0, against="flashmla"),)
    shapes = [("fp8", b, s, n) for b in DECODE_BATCHES for s in DECODE_SEQS for n in DECODE_CONTEXTS]
    shapes.append(("bf16", *DECODE_BF16_SHAPE))
    out = []
    for fmt, batch, seq, context in shapes:
        name = f"{SPARSE_MLA_DECODE}-{fmt}-b{batch}-s{seq}-kv{context}"
        dims = (batch, seq, context, MLA_HEADS, D_QK, D_V, D_ROPE, TOPK, fmt, PAGE_SIZE)
        targets = flashmla if fmt == "fp8" else ()
        out.append(_sparse_mla_decode_case(name, *dims, targets, quick=name in QUICK_DECODE))
    return out


def _index_topk_decode_cases() -> list[Case]:
    out = []
    for batch in INDEX_DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            name = f"{INDEX_TOPK_DECODE}-fp8-b{batch}-s{INDEX_DECODE_SEQ}-kv{context}"
            dims = (batch, INDEX_DECODE_SEQ, context, INDEX_HEADS, INDEX_DIM, "float8_e4m3fn", TOPK, PAGE_SIZE)
            out.append(_index_topk_decode_case(name, *dims, quick=name in QUICK_DECODE))
    return out


_BUILDERS: dict[str, Callable[[], list[Case]]] = {
    "indexer": _indexer_cases,
    "topk": _topk_cases,
    "index_topk": _index_topk_cases,
    "sparse_mla_fwd": lambda: _sparse_mla_cases("sparse_mla_fwd", 600.0),
    "sparse_mla_bwd": lambda: _sparse_mla_cases("sparse_mla_bwd", 250.0),
    MEMORY: _memory_cases,
    SELECTION: _selection_cases,
    SPARSE_MLA_DECODE: _sparse_mla_decode_cases,
    INDEX_TOPK_DECODE: _index_topk_decode_cases,
    V4_PREFILL: _v4_prefill_cases,
    V4_DECODE: _v4_decode_cases,
}


def tiny_cases(kernels: tuple[str, ...] = KERNELS) -> list[Case]:
    """Miniature versions of the standard cases (small heads, dims, lengths) that run on a CPU in seconds; used to
    test the harness itself (``dsa-bench --tiny``), never reported as benchmarks."""
    out: list[Case] = []
    if "indexer" in kernels:
        for dtype, short in (("float8_e4m3fn", "fp8"), ("bfloat16", "bf16")):
            out.append(_indexer_case(f"tiny-indexer-{short}", 96, 96, 4, 64, dtype, ()))
    if "topk" in kernels:
        out.append(_topk_case("tiny-topk", 32, 256, 16, (Target("speedup", 10.0, against="torch.topk"),)))
    if "index_topk" in kernels:
        out.append(_index_topk_case("tiny-index_topk", 96, 4, 64, "bfloat16", 16, ()))
    for kernel in ("sparse_mla_fwd", "sparse_mla_bwd"):
        if kernel in kernels:
            out.append(_mla_case(kernel, f"tiny-{kernel}", 2, 8, 128, 16, 128, 64, 32, (Target("tflops", 600.0),)))
    if MEMORY in kernels:
        out.append(_memory_case("tiny-memory", 64, 4, 64, 16, 128, 64, 16))
    if SELECTION in kernels:
        out.append(_selection_case("tiny-selection", 128, 4, 64, 16))
    if SPARSE_MLA_DECODE in kernels:
        # d_rope 64 as FlashMLA's FP8 rows have (dsa.compat's flash_mla_with_kvcache takes these), 16-token pages.
        out.append(_sparse_mla_decode_case("tiny-sparse_mla_decode", 2, 2, 96, 16, 128, 64, 64, 32, "fp8", 16, ()))
    if INDEX_TOPK_DECODE in kernels:
        out.append(_index_topk_decode_case("tiny-index_topk_decode", 2, 1, 96, 4, 32, "float8_e4m3fn", 16, 16))
    # V4 with few heads and tokens, window 8: prefill at 64-wide rows, decode at MODEL1's 512-wide FP8 rows.
    if V4_PREFILL in kernels:
        out.append(_v4_prefill_case("tiny-v4_prefill-csa", 96, 4, 64, 8, "csa", 4, 8, quick=True))
        out.append(_v4_prefill_case("tiny-v4_prefill-hca", 96, 4, 64, 8, "hca", 16, 0, quick=True))
    if V4_DECODE in kernels:
        out.append(_v4_decode_case("tiny-v4_decode", 2, 2, 96, 4, V4_D, V4_D_ROPE, 8, 4, 8, "fp8", 16, quick=True))
    return out


def standard_cases(kernels: tuple[str, ...] = KERNELS, *, full: bool = False) -> list[Case]:
    """The standard cases of ``kernels`` in a fixed order: those of the default run (``quick``), or with ``full``
    every one."""
    unknown = set(kernels) - set(_BUILDERS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    return [case for kernel in kernels for case in _BUILDERS[kernel]() if full or case.quick]

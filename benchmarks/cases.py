"""The standard benchmark cases, declared once as data, with their FLOP and byte counts.

``scripts/bench.py`` runs these (``--dry-run`` lists them); ``scripts/gpu_check.py`` runs them all. Counts are of
useful work only:

* indexer: ``2 * H_i * D_i`` FLOPs per *visible* (query, key) pair (bottom-right causal); bytes: ``q``, ``k``,
  ``weights`` (and ``k_scale``) read once, the ``[B, S, S_kv]`` float32 scores written once;
* top-k: no FLOPs; bytes: one read of the float32 scores plus the int32 indices written;
* sparse MLA forward: ``2 * B * S * H * topk * (d_qk + d_v)`` (QK^T over d_qk, PV over d_v);
* sparse MLA backward: ``2 * B * S * H * topk * (3 * d_qk + 2 * d_v)`` (recomputed QK^T, dP = dO V^T, dV = P^T dO,
  dQ = dS K, dK = dS^T Q);
* memory: peak device memory of the DSA path (FP8 indexer, top-k, sparse MLA forward) against dense attention.

Targets are fractions of the host's measured ceilings (``fp8_tflops``, ``bf16_tflops``, ``copy_gbps``) or absolute
TFLOP/s, and ``min_speedup`` against another provider; ``scripts/bench.py`` evaluates them into result rows.

Nothing here touches torch or a device: the module is plain data and arithmetic (the dry run and the CPU tests
import it on any machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FP8_BYTES = 1
BF16_BYTES = 2
F32_BYTES = 4
I32_BYTES = 4

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

KERNELS: tuple[str, ...] = ("indexer", "topk", "sparse_mla_fwd", "sparse_mla_bwd", "memory")


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
        params: the sizes and dtypes (keys depend on the kernel; see the builders below).
        flops: useful floating-point operations of one call (0 when FLOP/s means nothing).
        bytes: minimal device-memory traffic of one call.
        targets: goals for the ``dsa`` provider.
        context: the context length the plot puts this case at (keys per query).
    """

    kernel: str
    name: str
    params: dict[str, Any]
    flops: float
    bytes: float
    targets: tuple[Target, ...] = field(default_factory=tuple)
    context: int = 0


def _clamped_prefix(n: int, limit: int) -> int:
    """``sum(min(limit, max(0, x)) for x <= n)`` over integers x."""
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
    return 2.0 * heads * dim * batch * causal_pairs(seq, seq_kv)


def indexer_bytes(batch: int, seq: int, seq_kv: int, heads: int, dim: int, elt: int) -> float:
    reads = batch * (seq * heads * dim * elt + seq_kv * dim * elt + seq * heads * F32_BYTES)
    if elt == FP8_BYTES:
        reads += batch * seq_kv * F32_BYTES  # k_scale
    return float(reads + batch * seq * seq_kv * F32_BYTES)


def topk_bytes(rows: int, length: int, k: int) -> float:
    return float(rows * length * F32_BYTES + rows * k * I32_BYTES)


def sparse_mla_fwd_flops(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    return 2.0 * batch * seq * heads * topk * (d_qk + d_v)


def sparse_mla_bwd_flops(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    return 2.0 * batch * seq * heads * topk * (3 * d_qk + 2 * d_v)


def sparse_mla_fwd_bytes(batch: int, seq: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    # q, the gathered kv rows (each query row's topk rows read once, shared by its heads), indices, out, lse.
    return float(
        batch * seq * (heads * d_qk * BF16_BYTES + topk * d_qk * BF16_BYTES + topk * I32_BYTES)
        + batch * seq * heads * (d_v * BF16_BYTES + F32_BYTES)
    )


def sparse_mla_bwd_bytes(batch: int, seq: int, seq_kv: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    per_query = heads * (d_qk + 2 * d_v) * BF16_BYTES + heads * F32_BYTES  # q, out, d_out, lse
    per_query += topk * d_qk * BF16_BYTES + topk * I32_BYTES  # gathered kv, indices
    writes = batch * seq * heads * d_qk * BF16_BYTES + batch * seq_kv * d_qk * BF16_BYTES  # dq, dkv
    return float(batch * seq * per_query + writes)


def _indexer_cases() -> list[Case]:
    cases = []
    for dtype, elt, target in (
        ("float8_e4m3fn", FP8_BYTES, Target("tflops", 0.60, of="fp8_tflops")),
        ("bfloat16", BF16_BYTES, Target("tflops", 0.60, of="bf16_tflops")),
    ):
        short = "fp8" if elt == FP8_BYTES else "bf16"
        for n in INDEXER_SEQ_LENS:
            params = {"batch": 1, "seq": n, "seq_kv": n, "heads": INDEX_HEADS, "dim": INDEX_DIM, "dtype": dtype}
            cases.append(
                Case(
                    "indexer",
                    f"indexer-{short}-s{n}",
                    params,
                    indexer_flops(1, n, n, INDEX_HEADS, INDEX_DIM),
                    indexer_bytes(1, n, n, INDEX_HEADS, INDEX_DIM, elt),
                    (target,),
                    context=n,
                )
            )
    return cases


def _topk_cases() -> list[Case]:
    return [
        Case(
            "topk",
            f"topk-rows{TOPK_ROWS}-len{n}",
            {"batch": 1, "rows": TOPK_ROWS, "length": n, "k": TOPK},
            0.0,
            topk_bytes(TOPK_ROWS, n, TOPK),
            (Target("gbps", 0.50, of="copy_gbps"), Target("speedup", 10.0, against="torch.topk")),
            context=n,
        )
        for n in TOPK_ROW_LENGTHS
    ]


def _mla_params(batch: int, seq: int, seq_kv: int) -> dict[str, Any]:
    return {"batch": batch, "seq": seq, "seq_kv": seq_kv, "heads": MLA_HEADS, "d_qk": D_QK, "d_v": D_V, "topk": TOPK}


def _mla_shapes() -> list[tuple[str, int, int, int]]:
    prefill = [(f"prefill-s{MLA_PREFILL_SEQ}-kv{n}", 1, MLA_PREFILL_SEQ, n) for n in MLA_PREFILL_KV_LENS]
    decode = [
        (
            f"decode-b{MLA_DECODE_BATCH}-s{MLA_DECODE_SEQ}-kv{MLA_DECODE_KV}",
            MLA_DECODE_BATCH,
            MLA_DECODE_SEQ,
            MLA_DECODE_KV,
        )
    ]
    return prefill + decode


def _sparse_mla_cases() -> list[Case]:
    cases = []
    for tag, batch, seq, seq_kv in _mla_shapes():
        args = (batch, seq, MLA_HEADS, TOPK, D_QK, D_V)
        cases.append(
            Case(
                "sparse_mla_fwd",
                f"sparse_mla_fwd-{tag}",
                _mla_params(batch, seq, seq_kv),
                sparse_mla_fwd_flops(*args),
                sparse_mla_fwd_bytes(*args),
                (Target("tflops", 600.0),),
                context=seq_kv,
            )
        )
    for tag, batch, seq, seq_kv in _mla_shapes():
        args = (batch, seq, MLA_HEADS, TOPK, D_QK, D_V)
        cases.append(
            Case(
                "sparse_mla_bwd",
                f"sparse_mla_bwd-{tag}",
                _mla_params(batch, seq, seq_kv),
                sparse_mla_bwd_flops(*args),
                sparse_mla_bwd_bytes(batch, seq, seq_kv, MLA_HEADS, TOPK, D_QK, D_V),
                (Target("tflops", 250.0),),
                context=seq_kv,
            )
        )
    return cases


def _memory_cases() -> list[Case]:
    return [
        Case(
            "memory",
            f"memory-s{n}",
            {
                "batch": 1,
                "seq": n,
                "seq_kv": n,
                "index_heads": INDEX_HEADS,
                "index_dim": INDEX_DIM,
                **_mla_params(1, n, n),
            },
            0.0,
            0.0,
            context=n,
        )
        for n in MEMORY_SEQ_LENS
    ]


_BUILDERS: dict[str, Callable[[], list[Case]]] = {
    "indexer": _indexer_cases,
    "topk": _topk_cases,
    "sparse_mla_fwd": lambda: [c for c in _sparse_mla_cases() if c.kernel == "sparse_mla_fwd"],
    "sparse_mla_bwd": lambda: [c for c in _sparse_mla_cases() if c.kernel == "sparse_mla_bwd"],
    "memory": _memory_cases,
}


def tiny_cases(kernels: tuple[str, ...] = KERNELS) -> list[Case]:
    """Miniature versions of the standard cases (small heads, dims, lengths) that run on a CPU in seconds; used to
    test the harness itself (``scripts/bench.py --device cpu --tiny``), never reported as benchmarks."""
    out: list[Case] = []
    if "indexer" in kernels:
        for dtype, elt in (("float8_e4m3fn", FP8_BYTES), ("bfloat16", BF16_BYTES)):
            n, h, d = 96, 4, 64
            params = {"batch": 1, "seq": n, "seq_kv": n, "heads": h, "dim": d, "dtype": dtype}
            short = "fp8" if elt == FP8_BYTES else "bf16"
            out.append(
                Case(
                    "indexer",
                    f"tiny-indexer-{short}",
                    params,
                    indexer_flops(1, n, n, h, d),
                    indexer_bytes(1, n, n, h, d, elt),
                    context=n,
                )
            )
    if "topk" in kernels:
        out.append(
            Case(
                "topk",
                "tiny-topk",
                {"batch": 1, "rows": 32, "length": 256, "k": 16},
                0.0,
                topk_bytes(32, 256, 16),
                (Target("speedup", 10.0, against="torch.topk"),),
                context=256,
            )
        )
    for kernel, flops_fn in (("sparse_mla_fwd", sparse_mla_fwd_flops), ("sparse_mla_bwd", sparse_mla_bwd_flops)):
        if kernel in kernels:
            params = {"batch": 2, "seq": 8, "seq_kv": 128, "heads": 16, "d_qk": 128, "d_v": 64, "topk": 32}
            flops = flops_fn(2, 8, 16, 32, 128, 64)
            out.append(Case(kernel, f"tiny-{kernel}", params, flops, 0.0, (Target("tflops", 600.0),), context=128))
    if "memory" in kernels:
        out.append(
            Case(
                "memory",
                "tiny-memory",
                {
                    "batch": 1,
                    "seq": 64,
                    "seq_kv": 64,
                    "index_heads": 4,
                    "index_dim": 64,
                    "heads": 16,
                    "d_qk": 128,
                    "d_v": 64,
                    "topk": 16,
                },
                0.0,
                0.0,
                context=64,
            )
        )
    return out


def standard_cases(kernels: tuple[str, ...] = KERNELS) -> list[Case]:
    """Every standard case of ``kernels``, in a fixed order."""
    unknown = set(kernels) - set(_BUILDERS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    return [case for kernel in kernels for case in _BUILDERS[kernel]()]

"""Peak host memory of one DeepSeek-V4 attention layer's prefill on a CPU (the reference path), per sequence length.

One layer's attention core as ``dsa.integrations.deepseek_v4`` runs it, B = 1, float32 (so every op takes
``dsa.reference``; ``DSA_BACKEND=reference`` is set in the measuring process as well):

- **CSA** (rate 4, overlapping windows): ``ops.compress_kv`` pools the compressor's ``[S, 2 d]`` rows into ``S / 4``
  entries and the indexer's ``[S, 2 d_i]`` rows into its ``S / 4`` keys; ``ops.index_topk`` selects ``topk`` of them
  per query with ranged visibility (``starts = 0``, ``ends = (t + 1) // 4``: the reference walks key blocks, never
  the ``S x S / 4`` scores); ``integrations.deepseek_v4.attend`` runs ``ops.sparse_mla`` over the sliding window
  (one row range ``[t - 127, t]`` per query) and the selected entries in one softmax with the sink.
- **HCA** (rate 128, disjoint windows): ``ops.compress_kv`` and ``attend`` over the window range and the range of
  visible entries ``[0, (t + 1) // 128)``: no index tensor at all.

The per-entry RMSNorm and RoPE of the real layer (elementwise over ``S / m`` entries) and the projections are left
out: they are the model's, not the attention's. Inputs (``q``, the window rows, the compressor's and indexer's raw
rows and gates) are made before the measurement starts; the peak RSS increase of the call
(``dsa.memory.peak_increase_bytes``, after a warm-up call at ``WARMUP_SEQ`` tokens) therefore counts the output
``[S, H, d]`` and every intermediate. Each length runs in a fresh process (:func:`isolated_record`), so memory the
allocator kept from another length is not reused unseen.

``python scripts/memory_v4.py --seq-lens 8192,16384,32768,65536`` prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ["KINDS", "V4Layer", "isolated_record", "layer_attention", "layer_inputs", "main", "memory_record",
           "memory_table"]  # fmt: skip

log = logging.getLogger(__name__)

KINDS = ("csa", "hca")
WARMUP_SEQ = 1024
"""Tokens of the warm-up call (a few windows and entries, every code path) before the measured one."""
_MIB = 1 << 20


@dataclass(frozen=True)
class V4Layer:
    """One V4 attention layer's shape (V4-Flash's widths; ``heads`` and ``index_heads`` small by default so 64K
    tokens run in minutes on two cores; the memory's dependence on S is the claim, not its constant).

    Attributes:
        kind: ``"csa"`` or ``"hca"``.
        heads: attention heads (V4-Flash 64, V4-Pro 128).
        head_dim: ``d_qk = d_v`` (512: 448 NoPE + 64 RoPE).
        window: the sliding window (128).
        rate: tokens per compressed entry (CSA 4, HCA 128).
        index_heads, index_dim: the CSA indexer's heads and width (V4: 64 x 128).
        topk: entries CSA selects per query (V4-Flash 512, V4-Pro 1024).
    """

    kind: str = "csa"
    heads: int = 4
    head_dim: int = 512
    window: int = 128
    rate: int = 4
    index_heads: int = 4
    index_dim: int = 128
    topk: int = 512

    @classmethod
    def of(cls, kind: str, **overrides: int) -> V4Layer:
        """V4's layer of ``kind`` (rate 4 for CSA, 128 for HCA) with ``overrides``."""
        if kind not in KINDS:
            raise ValueError(f"memory_v4: kind must be one of {KINDS}, got {kind!r}")
        from benchmarks.cases import V4_RATES  # the cases' rates (imported here: this module stays light)

        return cls(kind=kind, **{"rate": V4_RATES[kind], **overrides})


def layer_inputs(layer: V4Layer, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 inputs (never zeros) of one layer's attention at ``seq`` tokens, B = 1.

    Returns:
        ``q [1, S, H, d]``, ``window [1, S, d]`` (K = V rows), ``kv``/``gate`` ``[1, S, W]`` (the compressor's raw
        rows and gate logits; ``W = 2 d`` for CSA, ``d`` for HCA), ``bias [rate, W]``, ``sinks [H]``; for CSA also
        the indexer's ``index_kv``/``index_gate`` ``[1, S, 2 d_i]``, ``index_bias [rate, 2 d_i]``, ``index_q
        [1, S, H_i, d_i]`` and ``index_weights [1, S, H_i]``.
    """
    g = torch.Generator().manual_seed(seed)
    d, width = layer.head_dim, (2 if layer.kind == "csa" else 1) * layer.head_dim

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    inputs = {
        "q": randn(1, seq, layer.heads, d), "window": randn(1, seq, d), "kv": randn(1, seq, width),
        "gate": randn(1, seq, width), "bias": randn(layer.rate, width, scale=0.1), "sinks": randn(layer.heads),
    }  # fmt: skip
    if layer.kind == "csa":
        index_width = 2 * layer.index_dim
        inputs.update(
            index_kv=randn(1, seq, index_width), index_gate=randn(1, seq, index_width),
            index_bias=randn(layer.rate, index_width, scale=0.1), index_q=randn(1, seq, layer.index_heads, layer.index_dim),
            index_weights=randn(1, seq, layer.index_heads, scale=(layer.index_heads * layer.index_dim) ** -0.5),
        )  # fmt: skip
    return inputs


def layer_attention(layer: V4Layer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer's attention (the module docstring's steps) through the ops.

    Returns:
        ``[1, S, H, d]`` in q's dtype.
    """
    from dsa import ops
    from dsa.integrations.deepseek_v4 import attend

    q = inputs["q"]
    seq, csa = q.shape[1], layer.kind == "csa"
    entries = ops.compress_kv(inputs["kv"], inputs["gate"], inputs["bias"], rate=layer.rate, overlap=csa)
    t = torch.arange(seq, dtype=torch.int32).view(1, seq)
    entry_ends = ((t + 1) // layer.rate).clamp(max=entries.shape[1])
    selected = None
    if csa:
        keys = ops.compress_kv(
            inputs["index_kv"], inputs["index_gate"], inputs["index_bias"], rate=layer.rate, overlap=True
        )
        selected = ops.index_topk(inputs["index_q"], keys, inputs["index_weights"], layer.topk,
                                  starts=torch.zeros_like(entry_ends), ends=entry_ends)  # fmt: skip
    window_starts = (t - (layer.window - 1)).clamp(min=0)
    return attend(q, inputs["window"], window_starts, t + 1, entries, selected, entry_ends, inputs["sinks"],
                  layer.head_dim**-0.5)  # fmt: skip


def memory_record(layer: V4Layer, seq: int) -> dict[str, object]:
    """The peak RSS increase of :func:`layer_attention` at ``seq`` tokens in this process (run it in a fresh one:
    :func:`isolated_record`), after a warm-up call at :data:`WARMUP_SEQ` tokens.

    Returns:
        ``{"layer": asdict(layer), "seq_len", "input_bytes", "output_bytes", "peak_increase_bytes", "seconds"}``.
    """
    import time

    from dsa import memory

    with torch.no_grad():
        layer_attention(layer, layer_inputs(layer, min(seq, WARMUP_SEQ), seed=1))
        inputs = layer_inputs(layer, seq)
        outputs: list[torch.Tensor] = []
        start = time.perf_counter()
        peak = memory.peak_increase_bytes(lambda: outputs.append(layer_attention(layer, inputs)))
        seconds = time.perf_counter() - start
    return {
        "layer": asdict(layer), "seq_len": seq, "input_bytes": sum(v.numel() * v.element_size() for v in inputs.values()),
        "output_bytes": outputs[0].numel() * outputs[0].element_size(), "peak_increase_bytes": peak, "seconds": seconds,
    }  # fmt: skip


def isolated_record(layer: V4Layer, seq: int, *, timeout_s: float = 1800.0) -> dict[str, object]:
    """:func:`memory_record` in a fresh Python process (``DSA_BACKEND=reference``); returns its record."""
    cmd = [sys.executable, "-m", "benchmarks.memory_v4", "--child", json.dumps(asdict(layer)), "--seq-lens", str(seq)]
    env = {**os.environ, "DSA_BACKEND": "reference"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory_v4: the {layer.kind} measurement at S={seq} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(records: Sequence[dict[str, object]]) -> str:
    """A Markdown table of records: per layer kind and length the inputs, the output and the peak increase in MiB,
    the increase beyond the output (the working memory) per token, and its growth from the previous length (2.0
    per doubling is linear; a term in ``S^2`` would push it towards 4)."""
    lines = [
        "| layer | S | inputs (MiB) | output (MiB) | peak increase (MiB) | beyond output (MiB) | per token (KiB) "
        "| growth | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous: dict[str, tuple[int, int]] = {}
    for r in sorted(records, key=lambda r: (r["layer"]["kind"], r["seq_len"])):  # type: ignore[index]
        kind, seq = str(r["layer"]["kind"]), int(r["seq_len"])  # type: ignore[index]
        working = int(r["peak_increase_bytes"]) - int(r["output_bytes"])
        growth = ""
        if kind in previous:
            seq0, working0 = previous[kind]
            growth = f"{working / max(working0, 1):.2f}x for {seq / seq0:g}x S"
        previous[kind] = (seq, working)
        lines.append(
            f"| {kind.upper()} | {seq} | {int(r['input_bytes']) / _MIB:.0f} | {int(r['output_bytes']) / _MIB:.0f} "
            f"| {int(r['peak_increase_bytes']) / _MIB:.0f} | {working / _MIB:.0f} | {working / seq / 1024:.1f} "
            f"| {growth} | {float(r['seconds']):.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.memory_v4``: the table over ``--seq-lens`` for ``--kinds`` (each in its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="8192,16384,32768,65536", help="comma-separated sequence lengths")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated layer kinds (csa, hca)")
    parser.add_argument("--heads", type=int, default=V4Layer.heads, help="attention heads")
    parser.add_argument("--index-heads", type=int, default=V4Layer.index_heads, help="the CSA indexer's heads")
    parser.add_argument("--topk", type=int, default=V4Layer.topk, help="entries CSA selects per query")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a V4Layer as JSON: measure in this process, print JSON
    args = parser.parse_args(argv)
    seqs = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    if args.child:
        sys.stdout.write(json.dumps(memory_record(V4Layer(**json.loads(args.child)), seqs[0])) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = []
    for kind in (k.strip() for k in args.kinds.split(",") if k.strip()):
        layer = V4Layer.of(kind, heads=args.heads, index_heads=args.index_heads, topk=args.topk)
        for seq in seqs:
            records.append(isolated_record(layer, seq))
            log.info("%s S=%d: %.0f MiB in %.0f s", kind, seq, records[-1]["peak_increase_bytes"] / _MIB,
                     records[-1]["seconds"])  # fmt: skip
            if args.json:  # rewritten after every length, so an interrupted sweep keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(records, f, indent=1)
    sys.stdout.write(memory_table(records) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak host memory of one call, measured in the calling process (Linux): what a user without a GPU can check.

The peak resident set size (``VmHWM``) is reset through ``/proc/self/clear_refs`` before the call, so import-time
peaks do not hide the call's own, and the same call runs once at ``WARMUP_SEQ`` tokens first, so that one-time costs
(the thread pool, lazily mapped library code, allocator arenas: 10-15 MB that differ from machine to machine) are not
counted as the call's memory. Each measurement belongs in a fresh process (``python -m dsa.memory``): memory the
allocator kept from earlier calls would otherwise be reused and not counted.

``python -m dsa.memory --seq-lens 2048,4096,8192`` prints, per length, the peak RSS increase of one forward of
:class:`dsa.modules.DSAttention` (the tiny configuration: 4 heads, indexer 4 x 32, top-k 16), of ``dsa.ops.index_topk``
alone (on a CPU: the reference's bounded walk) and of the fused selection kernel's C-target build (``fused_kernel``),
each in its own subprocess, as a Markdown table (the README's memory table).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["MEASURES", "WARMUP_SEQ", "measure", "peak_increase_bytes", "run_isolated"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"  # clear_refs: reset the peak RSS (VmHWM) to the current RSS
_KIB = 1024
MIB = 1 << 20
WARMUP_SEQ = 256
"""Sequence length of the warm-up call that runs the same code before the measured one."""


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line")


def peak_increase_bytes(fn: Callable[[], object]) -> int:
    """How far the peak RSS rose above the RSS before ``fn()`` ran, in bytes (Linux only).

    Raises:
        RuntimeError: the peak cannot be reset (no ``/proc/self/clear_refs``).
    """
    gc.collect()
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK)
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak RSS through {_CLEAR_REFS}: {exc}") from exc
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * _KIB


def _tiny_attention(seq: int) -> tuple[Callable[[], object], str]:
    from dsa.modules import DSAConfig, DSAttention

    torch.manual_seed(0)
    attn = DSAttention(DSAConfig.tiny()).eval()
    x = torch.randn(1, seq, attn.config.dim)
    return (lambda: attn(x)), "DSAttention forward (tiny config, B=1)"


def _tiny_indexer_inputs(seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(q, k, weights, topk)`` of the tiny config's indexer (4 heads x 32, top-k 16) at ``seq`` tokens, B = 1."""
    from dsa.modules import DSAConfig

    config = DSAConfig.tiny()
    torch.manual_seed(0)
    q = torch.randn(1, seq, config.index_n_heads, config.index_head_dim).to(dtype)
    k = torch.randn(1, seq, config.index_head_dim).to(dtype)
    weights = torch.randn(1, seq, config.index_n_heads)
    return q, k, weights, config.index_topk


def _index_topk(seq: int) -> tuple[Callable[[], object], str]:
    from dsa import ops

    q, k, weights, topk = _tiny_indexer_inputs(seq, torch.float32)
    return (lambda: ops.index_topk(q, k, weights, topk)), "dsa.ops.index_topk (H_i=4, D_i=32, k=16)"


def _fused_kernel(seq: int) -> tuple[Callable[[], object], str]:
    from dsa.launch import index_topk as launch

    q, k, weights, topk = _tiny_indexer_inputs(seq, torch.bfloat16)
    what = "the fused selection kernel, C target (bf16, H_i=4, D_i=32, k=16)"
    return (lambda: launch.index_topk(q, k, weights, topk)), what


MEASURES: dict[str, Callable[[int], tuple[Callable[[], object], str]]] = {
    "attention": _tiny_attention,
    "index_topk": _index_topk,
    "fused_kernel": _fused_kernel,
}
"""What ``measure`` can run: name -> (sequence length -> (the call, its description))."""


def measure(name: str, seq: int) -> dict[str, object]:
    """Peak RSS increase of one call of ``MEASURES[name]`` at ``seq`` tokens, in this process, under no_grad, after one
    warm-up call of the same op at ``WARMUP_SEQ`` tokens."""
    warmup, _ = MEASURES[name](WARMUP_SEQ)
    call, what = MEASURES[name](seq)
    with torch.no_grad():
        warmup()
        peak = peak_increase_bytes(call)
    return {"measure": name, "what": what, "seq_len": seq, "peak_increase_bytes": peak}


def run_isolated(name: str, seq: int, *, timeout_s: float = 600.0) -> dict[str, object]:
    """:func:`measure` in a fresh Python process (nothing cached from earlier calls); returns its record."""
    cmd = [sys.executable, "-m", "dsa.memory", "--one", name, "--seq-lens", str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(records: Sequence[dict[str, object]]) -> str:
    names = list(dict.fromkeys(str(r["measure"]) for r in records))
    lines = ["| S | " + " | ".join(f"{n} peak (MB)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for seq in sorted({int(r["seq_len"]) for r in records}):
        row = {str(r["measure"]): int(r["peak_increase_bytes"]) for r in records if r["seq_len"] == seq}
        lines.append(f"| {seq} | " + " | ".join(f"{row[n] / MIB:.0f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsa.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--measures", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)}")
    parser.add_argument("--one", choices=sorted(MEASURES), help="measure in this process and print one JSON line")
    args = parser.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    if args.one:
        for seq in seq_lens:
            print(json.dumps(measure(args.one, seq)))
        return 0
    records = [run_isolated(name, seq) for name in args.measures.split(",") if name for seq in seq_lens]
    print(_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

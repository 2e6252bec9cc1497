"""transformers' DeepSeek-V3.2 with and without ``apply_dsa`` on a CPU: peak memory of one layer, generate tokens/s.

- ``memory_record(mode, seq)``: the peak RSS increase of one forward of a one-layer model (the tiny config of
  ``dsa.integrations.transformers.tiny_config``: 4 heads, latent 32 + 8, an indexer of 16 heads x 32, top-k 16;
  B = 1, float32, no cache) at ``seq`` tokens, after a warm-up forward at ``dsa.memory.WARMUP_SEQ`` tokens, measured
  with ``dsa.memory.peak_increase_bytes``. ``mode`` is ``"eager"`` (transformers' own: the indexer's ``[B, S, H_i,
  T]`` float32 scores, 256 MiB at 2K, the ``[B, S, T]`` index scores and dense masks, MHA over the expanded keys) or
  ``"dsa"`` (the same model after ``apply_dsa``). ``isolated_memory_record`` runs it in a fresh process, as memory the
  allocator kept from an earlier call would otherwise be reused and not counted.
- ``generate_record(mode, ...)``: greedy ``generate`` tokens/s of the three-layer tiny model (float32, the CPU
  reference backend of the ops, one thread), the prompt's prefill included.

``python scripts/hf_bench.py`` prints both tables (the README's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from dsa import memory

__all__ = ["MODES", "generate_record", "isolated_memory_record", "memory_record", "memory_table", "rate_table"]

MODES = ("eager", "dsa")
"""transformers' own forward, and the same model after ``apply_dsa``."""


def _model(mode: str, layers: int, seed: int = 0) -> torch.nn.Module:
    """The tiny DeepSeek-V3.2 causal LM with ``layers`` layers, served per ``mode``."""
    from dsa.integrations import transformers as hf

    if mode not in MODES:
        raise ValueError(f"benchmarks.hf: mode must be one of {MODES}, got {mode!r}")
    config = hf.tiny_config("deepseek_v32", num_hidden_layers=layers, max_position_embeddings=65536)
    torch.manual_seed(seed)
    model = hf.transformers.DeepseekV32ForCausalLM(config).eval()
    return hf.apply_dsa(model) if mode == "dsa" else model


def memory_record(mode: str, seq: int) -> dict[str, object]:
    """Peak RSS increase of one forward of the one-layer model at ``seq`` tokens, in this process (the module
    docstring); run it in a fresh process (``isolated_memory_record``)."""
    model = _model(mode, layers=1)
    ids = torch.randint(3, model.config.vocab_size, (1, seq))
    warm = torch.randint(3, model.config.vocab_size, (1, memory.WARMUP_SEQ))
    with torch.no_grad():
        model(warm, use_cache=False)
        peak = memory.peak_increase_bytes(lambda: model(ids, use_cache=False))
    return {"mode": mode, "seq_len": seq, "peak_increase_bytes": peak}


def isolated_memory_record(mode: str, seq: int, *, timeout_s: float = 900.0) -> dict[str, object]:
    """``memory_record(mode, seq)`` in a fresh Python process; returns its record."""
    code = (
        "import json, sys; from benchmarks.hf import memory_record; "
        "print(json.dumps(memory_record(sys.argv[1], int(sys.argv[2]))))"
    )
    cmd = [sys.executable, "-c", code, mode, str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.hf: the {mode} measurement at S={seq} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(records: Sequence[dict[str, object]]) -> str:
    """A Markdown table of ``memory_record``s: one row per length, eager and DSA peaks in MiB and their ratio."""
    by_key = {(r["mode"], r["seq_len"]): int(r["peak_increase_bytes"]) for r in records}
    lines = ["| S | eager peak (MiB) | `apply_dsa` peak (MiB) | DSA / eager |", "|---|---|---|---|"]
    for seq in sorted({int(r["seq_len"]) for r in records}):
        eager, dsa = by_key[("eager", seq)], by_key[("dsa", seq)]
        lines.append(f"| {seq} | {eager / memory.MIB:.0f} | {dsa / memory.MIB:.0f} | {dsa / max(eager, 1):.3f} |")
    return "\n".join(lines)


def generate_record(
    mode: str, *, prompt: int = 64, new_tokens: int = 64, batch: int = 1, threads: int = 1
) -> dict[str, object]:
    """Greedy ``generate`` speed of the three-layer tiny model (float32, the ops' CPU reference backend).

    Returns:
        ``{"mode", "batch", "prompt", "new_tokens", "seconds", "tokens_per_s"}``; tokens/s counts the new tokens of
        every sequence over the whole call (prefill included), after one warm-up call.
    """
    torch.set_num_threads(threads)
    model = _model(mode, layers=3)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    made = (out.shape[1] - prompt) * batch
    return {"mode": mode, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": made / seconds}  # fmt: skip


def rate_table(records: Sequence[dict[str, object]]) -> str:
    """A Markdown table of ``generate_record``s."""
    lines = ["| mode | batch | prompt | new tokens | tokens/s |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {float(r['tokens_per_s']):.0f} |"
        )
    return "\n".join(lines)

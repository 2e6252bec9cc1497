"""A benchmark case's inputs and the check of its ``dsa`` provider (``dsa-bench``'s correctness gate).

For a tuner kernel's case the inputs are its runner's (:mod:`benchmarks.runners`, on top of ``dsa.testing``: the same
makers as the tuner and the property tests); for the ``memory`` and ``selection`` cases the FP8 indexer's and the
attention's; for the decode cases (``sparse_mla_decode``, ``index_topk_decode``: paged caches, not tuner kernels)
this module builds the caches itself. :func:`check_dsa` runs the ``dsa`` kernel once with every launcher output
poisoned (NaN) and compares a slice of the problem with ``dsa.reference`` by the tuner's comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks import cases as case_data
from benchmarks import runners, v4
from dsa import cache, reference, testing
from dsa.launch import common

__all__ = ["check_dsa", "decode_inputs", "make_inputs", "poisoned_outputs", "tensor_bytes"]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and the dsa check
# ----------------------------------------------------------------------------------------------------------------------
def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor or a dict of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


def make_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of ``case`` on ``device`` (random, never zeros): the runner's inputs of its kernel; for the
    ``memory`` and ``selection`` cases the FP8 indexer's (``iq``, ``ik``, ``iw``, ``iscale``, and ``topk``) and for
    ``memory`` also the attention's (``q``, ``kv``); for the decode cases :func:`decode_inputs`; for DeepSeek-V4's
    ``benchmarks.v4.inputs``."""
    if case.kernel in case_data.DECODE_KINDS:
        return decode_inputs(case, device, seed)
    if case.kernel in case_data.V4_KINDS:
        return v4.inputs(case, device, seed)
    if case.kernel not in case_data.MEMORY_KINDS:
        return runners.runner_for(case.kernel).make_inputs(case.static, case.sizes, device, seed)
    s = case.static
    dims = {"batch": case.sizes["batch"], "seq": case.sizes["seq_len"], "seq_kv": case.sizes["seq_len_kv"]}
    index = testing.indexer_inputs(
        **dims, heads=s["index_heads"], dim=s["index_dim"], dtype="float8_e4m3fn", seed=seed, device=device,
        weight_scale=(s["index_heads"] * s["index_dim"]) ** -0.5,
    )  # fmt: skip
    if case.kernel == case_data.SELECTION:
        return {"iq": index["q"], "ik": index["k"], "iw": index["weights"], "iscale": index["k_scale"], "topk": s["topk"]}
    attention = testing.sparse_mla_inputs(
        **dims, heads=s["heads"], d_qk=s["d_qk"], d_v=s["d_v"], topk=1, seed=seed + 1, device=device,
        sm_scale=s["d_qk"] ** -0.5,
    )  # fmt: skip
    return {
        "iq": index["q"], "ik": index["k"], "iw": index["weights"], "iscale": index["k_scale"],
        "q": attention["q"], "kv": attention["kv"], "sm_scale": attention["sm_scale"], "d_v": s["d_v"],
        "topk": s["topk"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Decode cases: paged caches (dsa.cache), their inputs, launch, narrowing and check
# ----------------------------------------------------------------------------------------------------------------------
FILL_ELEMENTS = 1 << 26
"""A cache is written in chunks of at most this many values (bounds the FP8 quantisation's float32 temporaries)."""


def _chunks(batch: int, length: int, width: int) -> Iterator[int]:
    """Token counts per append that cover ``length`` tokens of ``batch`` sequences, ``FILL_ELEMENTS`` values each."""
    step = max(1, FILL_ELEMENTS // (batch * width))
    for start in range(0, length, step):
        yield min(step, length - start)


def _sparse_mla_decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """A paged cache of ``context`` random latent rows per sequence (FP8 in FlashMLA's layout, or bf16; each
    sequence on its own run of pages, ``PagedKVCache``'s allocation), bf16 queries, and for each query ``topk``
    distinct random positions among those it sees, as slots."""
    s, z = case.static, case.sizes
    batch, s_q, context, topk, d_qk = z["batch"], z["seq_len"], z["seq_len_kv"], z["topk"], s["d_qk"]
    g = testing.generator(seed, device)
    kv = cache.PagedKVCache(
        batch, context, d_qk, page_size=s["page_size"], dtype="fp8" if s["kv_format"] == "fp8" else torch.bfloat16,
        d_rope=s["d_rope"], device=device,
    )  # fmt: skip
    for n in _chunks(batch, context, d_qk):
        kv.append(torch.randn((batch, n, d_qk), generator=g, device=device).to(torch.bfloat16))
    ends = runners.newest_ends(batch, s_q, context, device)
    keys = torch.rand((batch, s_q, context), generator=g, device=device)
    keys.masked_fill_(torch.arange(context, device=device).view(1, 1, -1) >= ends.unsqueeze(-1), -1.0)
    positions = keys.topk(topk, dim=-1).indices  # distinct; all visible while topk <= context - s_q + 1
    del keys
    return {
        "q": torch.randn((batch, s_q, s["heads"], d_qk), generator=g, device=device).to(torch.bfloat16),
        "kv_cache": kv.pages,
        "indices": kv.slots(positions.view(batch, s_q * topk)).view(batch, s_q, topk),
        "block_table": kv.block_table,
        "cache_seqlens": kv.seq_lens,
        "sm_scale": d_qk**-0.5,
        "d_v": s["d_v"],
        "d_rope": s["d_rope"],
    }


def _index_topk_decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """A paged key cache of ``context`` keys per sequence behind a shuffled block table (pages in any order, as a
    serving allocator leaves them), FP8 key rows (``dsa.cache.pack_index_keys_fp8``) or bf16 keys, and the newest
    ``s_q`` queries of each sequence. Integer-valued, as the ``index_topk`` runner's (power-of-two key scales): every
    implementation computes the scores exactly, so the check compares the selections exactly."""
    s, z = case.static, case.sizes
    batch, s_q, context, heads, dim = z["batch"], z["seq_len"], z["seq_len_kv"], s["heads"], s["dim"]
    fp8 = s["dtype"] == "float8_e4m3fn"
    g = testing.generator(seed, device)
    keys = cache.PagedKVCache(
        batch, context, dim, page_size=s["page_size"], dtype="fp8" if fp8 else torch.bfloat16, d_rope=0, device=device
    )
    table = torch.randperm(keys.block_table.numel(), generator=g, device=device)
    keys.block_table = table.to(torch.int32).view_as(keys.block_table)

    def small_integers(shape: tuple[int, ...], bound: int) -> torch.Tensor:
        return torch.randint(-bound, bound + 1, shape, generator=g, device=device).float()

    for n in _chunks(batch, context, dim):
        values = small_integers((batch, n, dim), 3)
        if fp8:
            scale = torch.exp2(small_integers((batch, n), 2))
            keys.append_rows(cache.pack_index_keys_fp8(values.to(torch.float8_e4m3fn), scale))
        else:
            keys.append(values.to(torch.bfloat16))
    return {
        "q": small_integers((batch, s_q, heads, dim), 3).to(torch.float8_e4m3fn if fp8 else torch.bfloat16),
        "k_cache": keys.pages,
        "weights": small_integers((batch, s_q, heads), 2),
        "block_table": keys.block_table,
        "ends": runners.newest_ends(batch, s_q, context, device),
        "starts": None,
        "topk": s["topk"],
    }


def decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of a decode case: the keyword arguments its providers take (see the makers above)."""
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        return _sparse_mla_decode_inputs(case, device, seed)
    return _index_topk_decode_inputs(case, device, seed)


def _decode_launch(case: case_data.Case, i: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The decode kernel through its launcher (the ops' call path on the kernel backend; the C-target builds on a
    CPU)."""
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        from dsa.launch import sparse_mla_decode

        return sparse_mla_decode.sparse_mla_decode(
            i["q"], i["kv_cache"], i["indices"], sm_scale=i["sm_scale"], d_v=i["d_v"], d_rope=i["d_rope"]
        )
    from dsa.launch import index_topk

    return index_topk.index_topk_paged(
        i["q"], i["k_cache"], i["weights"], i["topk"], block_table=i["block_table"], ends=i["ends"], starts=i["starts"]
    )


def _decode_narrow(
    case: case_data.Case, i: dict[str, Any], out: tuple[torch.Tensor, ...]
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """The first ``runners.CHECK_BATCHES`` sequences of a decode problem and of its outputs. The attention's cache is
    cut to the pages those sequences use (its reference dequantises the whole cache it is given); the indexer's
    reference reads only through the narrowed block table."""
    n = runners.CHECK_BATCHES
    caches = ("kv_cache", "k_cache")
    narrowed = {k: (v[:n] if isinstance(v, torch.Tensor) and k not in caches else v) for k, v in i.items()}
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        narrowed["kv_cache"] = i["kv_cache"][: int(i["block_table"][:n].max()) + 1]
    return narrowed, tuple(t[:n] for t in out)


def _decode_reference(case: case_data.Case, i: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    if case.kernel == case_data.SPARSE_MLA_DECODE:
        return reference.sparse_mla_decode(
            i["q"], i["kv_cache"], i["indices"], sm_scale=i["sm_scale"], d_v=i["d_v"], d_rope=i["d_rope"]
        )
    return reference.index_topk_decode(
        i["q"], i["k_cache"], i["weights"], i["topk"], block_table=i["block_table"], ends=i["ends"],
        starts=i["starts"], return_scores=True,
    )  # fmt: skip


def _check_decode(case: case_data.Case, inputs: dict[str, Any]) -> str | None:
    """:func:`check_dsa` for a decode case: the launcher on the whole input set, its outputs narrowed, the reference
    on the narrowed problem; attention compared as the forward's runner compares, the selection exactly."""
    outputs = _decode_launch(case, inputs)
    narrowed, narrowed_outputs = _decode_narrow(case, inputs, outputs)
    expected = _decode_reference(case, narrowed)
    if case.kernel == case_data.INDEX_TOPK_DECODE:
        return runners.same_selection(narrowed_outputs, expected)
    problems = [
        testing.compare(narrowed_outputs[0], expected[0], **runners.BF16_TOL, name="out"),
        testing.compare(narrowed_outputs[1], expected[1], **runners.LSE_TOL, max_diff=None, name="lse"),
    ]
    return next((p for p in problems if p is not None), None)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every launcher output starts NaN-/sentinel-filled for the duration (``dsa.launch.common.new_output``)."""
    original = common.new_output
    common.new_output = testing.poisoned_empty
    try:
        yield
    finally:
        common.new_output = original


def check_dsa(case: case_data.Case, inputs: dict[str, Any]) -> str | None:
    """``None`` when the ``dsa`` kernel matches the reference on a slice of ``case``'s problem (else the reason).

    The kernel runs on the whole input set with poisoned outputs; the runner narrows inputs and outputs to a slice of
    the queries small enough for the reference (a kernel whose outputs sum over queries runs again on the slice) and
    compares them with the tuner's comparison.
    """
    if case.kernel in case_data.MEMORY_KINDS:
        return None  # whole paths, not one kernel: the kernels' own cases and the GPU tier check them
    try:
        with poisoned_outputs(), torch.no_grad():
            if case.kernel in case_data.DECODE_KINDS:
                problem = _check_decode(case, inputs)
            elif case.kernel in case_data.V4_KINDS:
                        problem = v4.check(case, inputs)
            else:
                runner = runners.runner_for(case.kernel)
                outputs = runner.launch(None, case.static, inputs)
                narrowed, narrowed_outputs = runner.narrow(inputs, outputs) if runner.narrow else (inputs, outputs)
                if narrowed_outputs is None:
                    narrowed_outputs = runner.launch(None, case.static, narrowed)
                problem = runner.compare(narrowed_outputs, runner.reference(case.static, narrowed))
    except Exception as exc:  # noqa: BLE001 - recorded; the harness goes on with the next case
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None if problem is None else f"mismatch: {problem[:300]}"

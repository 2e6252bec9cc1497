"""A benchmark case's inputs and the check of its ``dsa`` provider (``dsa-bench``'s correctness gate).

Every kernel case's inputs are its problem description's (:mod:`benchmarks.problems`, on top of ``dsa.testing``: the
same makers as the tuner and the property tests), the decode cases' too (``sparse_mla_decode`` is a tuner kernel;
``index_topk_decode`` is the ``index_topk`` kernel's paged problem); the ``memory`` and ``selection`` cases take the
FP8 indexer's and the attention's problems' inputs. :func:`check_dsa` runs the kernel's runner
(:mod:`benchmarks.runners`) once with every launcher output poisoned (NaN) and compares a slice of the problem with
``dsa.reference`` by the problem's comparison. DeepSeek-V4's cases are ``benchmarks.v4``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks import cases as case_data
from benchmarks import problems, runners, v4
from dsa import testing
from dsa.launch import common

__all__ = ["check_dsa", "make_inputs", "poisoned_outputs", "tensor_bytes"]

_RUNNER_KERNEL = {case_data.INDEX_TOPK_DECODE: "index_topk"}
"""The tuner kernel that runs a case kind of another name (the decode selection is ``index_topk`` with pages)."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor or a dict of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


def make_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of ``case`` on ``device`` (random, never zeros): its problem's inputs; for the ``memory`` and
    ``selection`` cases the FP8 indexer's (``iq``, ``ik``, ``iw``, ``iscale``, and ``topk``) and for ``memory`` also
    the attention's (``q``, ``kv``); for DeepSeek-V4's ``benchmarks.v4.inputs``."""
    if case.kernel in case_data.V4_KINDS:
        return v4.inputs(case, device, seed)
    if case.kernel not in case_data.MEMORY_KINDS:
        return problems.problem_for(case.kernel, case.static, case.sizes).inputs(device, seed)
    s, z = case.static, case.sizes
    dims = (z["batch"], z["seq_len"], z["seq_len_kv"])
    index = problems.IndexerProblem(*dims, s["index_heads"], s["index_dim"], problems.FP8).inputs(device, seed)
    selection = {"iq": index["q"], "ik": index["k"], "iw": index["weights"], "iscale": index["k_scale"],
                 "topk": s["topk"]}  # fmt: skip
    if case.kernel == case_data.SELECTION:
        return selection
    attention = problems.SparseMlaProblem(*dims, s["heads"], s["d_qk"], s["d_v"], topk=1).inputs(device, seed + 1)
    return {**selection, "q": attention["q"], "kv": attention["kv"], "sm_scale": attention["sm_scale"], "d_v": s["d_v"]}


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
            if case.kernel in case_data.V4_KINDS:
                problem = v4.check(case, inputs)
            else:
                runner = runners.runner_for(_RUNNER_KERNEL.get(case.kernel, case.kernel))
                outputs = runner.launch(None, case.static, inputs)
                narrowed, narrowed_outputs = runner.narrow(inputs, outputs) if runner.narrow else (inputs, outputs)
                if narrowed_outputs is None:
                    narrowed_outputs = runner.launch(None, case.static, narrowed)
                problem = runner.compare(narrowed_outputs, runner.reference(case.static, narrowed))
    except Exception as exc:  # noqa: BLE001 - recorded; the harness goes on with the next case
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None if problem is None else f"mismatch: {problem[:300]}"

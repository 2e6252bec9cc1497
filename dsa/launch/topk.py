"""Launcher of the top-k selector: plan (target, config, compiled kernel) once per shape, run per call.

Inputs are assumed validated (``dsa.validation.check_topk_indices(..., kernel=True)``): ``scores [B, S, S_kv]``
float32, contiguous, non-empty, on CPU or CUDA, and ``k >= 1``. On CPU the kernel is TileLang's C-target build of
``tl_kernels.topk`` (the same selection logic, serial loops); on CUDA the sm_90a radix-select kernel. ``k`` is the
only static parameter; ``B``, ``S`` and ``S_kv`` are symbolic, so one compiled kernel serves every shape.
"""

import dataclasses
from typing import Any

import torch

from dsa.launch import common
from tl_kernels import topk as kernels

__all__ = ["KERNEL_NAME", "Plan", "plan", "run", "run_keyed", "static_params", "topk_indices", "topk_of_candidates"]

KERNEL_NAME = "topk"
"""Name of the kernel in the tuner, the config cache and the benchmark."""


def static_params(k: int, *, keyed: bool = False) -> dict[str, Any]:
    """The kernel's static parameters: ``{"k": k}``, plus ``"keyed": True`` for the candidate-list form
    (``tl_kernels.topk.build``), so the plain kernel's tuned configs and cache entries keep their key."""
    return {"k": int(k), "keyed": True} if keyed else {"k": int(k)}


@dataclasses.dataclass(frozen=True)
class Plan(common.KernelPlan):
    """What a top-k launch of one shape runs: the target, config and compiled kernel, and ``k``."""

    k: int


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)


def plan(scores: torch.Tensor, k: int, *, config: kernels.Config | None = None, keyed: bool = False) -> Plan:
    """The plan for ``scores [B, S, S_kv]`` float32 and ``k`` (``config`` overrides the selection: tests, tuner;
    ``keyed``: the candidate-list kernel of :func:`topk_of_candidates`)."""
    batch, seq, seq_kv = scores.shape
    device = scores.device
    static = static_params(k, keyed=keyed)

    def make() -> Plan:
        sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
        compiled = common.compile_plan(KERNEL_NAME, kernels, static, sizes, device, config)
        return Plan(compiled.target, compiled.config, compiled.kernel, static["k"])

    return _PLANS.get(device, (batch, seq, seq_kv, static["k"], keyed, config), make)


def run(p: Plan, scores: torch.Tensor) -> torch.Tensor:
    """``indices [B, S, k]`` int32 of ``scores`` under plan ``p`` (a set per row, ``-1`` padding)."""
    indices = common.new_output((*scores.shape[:2], p.k), torch.int32, scores.device)
    p.kernel(scores, indices)
    return indices


def run_keyed(p: Plan, scores: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [B, S, k] int32, scores [B, S, k] float32)`` of the candidates under keyed plan ``p``."""
    out_positions = common.new_output((*scores.shape[:2], p.k), torch.int32, scores.device)
    out_scores = common.new_output((*scores.shape[:2], p.k), torch.float32, scores.device)
    p.kernel(scores, positions, out_positions, out_scores)
    return out_positions, out_scores


def topk_of_candidates(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row's candidates: :func:`run_keyed` of the keyed :func:`plan`.

    Args:
        scores (torch.Tensor): ``[B, S, L]`` float32, contiguous: the candidates' scores (non-finite: no candidate).
        positions (torch.Tensor): ``[B, S, L]`` int32, contiguous: their positions, distinct and non-negative where
            the score is finite (read nowhere else), in any column order.
        k (int): ``>= 1``; may exceed ``L``.

    Returns:
        positions ``[B, S, k]`` int32 (``-1`` padding) and scores ``[B, S, k]`` float32 (``-inf`` there): the ``k``
        largest finite scores, ties to the smaller position (the contract's tie rule, in positions, not columns).
    """
    return run_keyed(plan(scores, k, keyed=True), scores, positions)


def topk_indices(scores: torch.Tensor, k: int, *, config: kernels.Config | None = None) -> torch.Tensor:
    """``topk_indices`` (contract: ``dsa.reference.topk_indices``) on the kernel: :func:`run` of :func:`plan`.

    Args:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32, contiguous, CPU or CUDA.
        k (int): ``>= 1``; may exceed ``S_kv``.
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        indices (torch.Tensor): ``[B, S, k]``, int32.
    """
    return run(plan(scores, k, config=config), scores)

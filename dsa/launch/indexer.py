"""Launcher of the lightning indexer: plan (target, config, compiled kernel) once per shape, run per call.

Inputs are assumed validated (``dsa.validation.check_index_scores(..., kernel=True)``): right dtypes, shapes,
contiguity, one device (CPU or CUDA), ``k_scale`` exactly for FP8, ``starts``/``ends`` together. On CPU the kernel is
TileLang's C-target build (bf16 travels as uint16 bits, e4m3 as uint8); on CUDA the sm_90a build.
"""

from typing import Any

import torch
from torch import Tensor

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import indexer as kernels

OptTensor = Tensor | None

__all__ = ["KERNEL_NAME", "Plan", "index_scores", "kernel_inputs", "plan", "run", "static_params"]

KERNEL_NAME = "indexer"
"""Name of the kernel in the tuner, the config cache and the benchmark."""

_DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}


def static_params(q: torch.Tensor, *, ranged: bool) -> dict[str, Any]:
    """The kernel's static parameters for ``q [B, S, H_i, D_i]`` (``ranged``: starts/ends given)."""
    return {
        "heads": int(q.shape[2]),
        "dim": int(q.shape[3]),
        "dtype": _DTYPE_NAMES[q.dtype],
        "mode": "range" if ranged else "causal",
    }


Plan = common.KernelPlan
"""What an indexer launch of one shape runs: its target, config and compiled kernel."""


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)


def plan(q: torch.Tensor, seq_kv: int, *, ranged: bool, config: kernels.Config | None = None) -> Plan:
    """The plan for ``q [B, S, H_i, D_i]`` against ``seq_kv`` keys (``ranged``: starts/ends given; ``config``
    overrides the selection: tests and the tuner)."""
    batch, seq = q.shape[:2]
    device = q.device
    static = static_params(q, ranged=ranged)

    def make() -> Plan:
        sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
        return common.compile_plan(KERNEL_NAME, kernels, static, sizes, device, config)

    return _PLANS.get(device, (tuple(q.shape), q.dtype, seq_kv, ranged, config), make)


def run(
    p: Plan, q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor
) -> Tensor:
    """``scores [B, S, S_kv]`` float32 under plan ``p`` (inputs as :func:`index_scores` takes them)."""
    scores = common.new_output((q.shape[0], q.shape[1], k.shape[1]), torch.float32, q.device)
    p.kernel(*kernel_inputs(q, k, weights, k_scale, starts, ends, p.target), scores)
    return scores


def index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> torch.Tensor:
    """``index_scores`` (contract: ``dsa.reference.index_scores``) on the kernel: :func:`run` of :func:`plan`.

    Args:
        q, k, weights, k_scale, starts, ends: as the contract says, laid out by the op (row-major).
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32.
    """
    p = plan(q, k.shape[1], ranged=starts is not None, config=config)
    return run(p, q, k, weights, k_scale, starts, ends)


def kernel_inputs(
    q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor, target: Any
) -> list[Tensor]:
    """The input arguments of an indexer-family kernel (the indexer, the fused selection) in their order: q and k as
    the target carries them (bits on the C target), weights, then k_scale for FP8 and starts/ends when given."""
    args = [tl_build.to_kernel_arg(q, target), tl_build.to_kernel_arg(k, target), weights]
    if k_scale is not None:
        args.append(k_scale)
    if starts is not None:
        args += [starts, ends]
    return args

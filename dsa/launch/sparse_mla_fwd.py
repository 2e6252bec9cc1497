"""Launcher of the sparse MLA attention forward: plan (target, config, kernel) once per shape, run per call.

Inputs are assumed validated (``dsa.validation.check_sparse_mla(..., kernel=True)``): bfloat16 ``q``/``kv``, int32
``indices``/``topk_length``, float32 ``attn_sink``, contiguous, non-empty, on one CPU or CUDA device. On CPU the
kernel is TileLang's C-target build of ``tl_kernels.sparse_mla_fwd`` (serial loops, float32 tiles); on CUDA the
sm_90a build (cp.async gather, wgmma). Static parameters: ``heads``, ``d_qk``, ``d_v``, ``has_topk_length``,
``has_sink``; ``B``, ``S``, ``S_kv`` and the top-k width are symbolic, so one compiled kernel serves every shape.

The config decides the CUDA schedule (``Config.pipeline``): the default ``"none"`` unless the tuning cache (or the
caller) picks the opt-in warp-specialised ``"ws"`` schedule, whose GPU correctness rests on the GPU tier and the
tuner's reference check. A cached config whose fields do not match the module's ``Config`` (one written before a
field existed, say) is reported once and ignored: the default config runs.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_fwd as kernels

OptTensor = Tensor | None

__all__ = ["KERNEL_NAME", "Plan", "plan", "run", "sparse_mla_fwd", "static_params"]

KERNEL_NAME = "sparse_mla_fwd"
"""Name of the kernel in the tuner, the config cache and the benchmark."""


def static_params(*, heads: int, d_qk: int, d_v: int, has_topk_length: bool, has_sink: bool) -> dict[str, Any]:
    """The kernel's static parameters (the top-k width is a runtime size, not one of them)."""
    return {
        "heads": int(heads),
        "d_qk": int(d_qk),
        "d_v": int(d_v),
        "has_topk_length": bool(has_topk_length),
        "has_sink": bool(has_sink),
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a forward launch of one shape runs: target, config, compiled kernel, and the placeholders of absent
    optional inputs (one-element tensors the kernel never reads)."""

    target: Any
    config: kernels.Config
    kernel: Any
    d_v: int
    no_topk_length: torch.Tensor
    no_sink: torch.Tensor


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)


def plan(
    q: torch.Tensor,
    seq_kv: int,
    topk: int,
    *,
    d_v: int,
    has_topk_length: bool,
    has_sink: bool,
    config: kernels.Config | None = None,
) -> Plan:
    """The plan for ``q [B, S, H, d_qk]`` over ``seq_kv`` rows and ``topk`` indices per query (``config`` overrides
    the selection: tests and the tuner)."""
    batch, seq, heads, d_qk = q.shape
    device = q.device

    def make() -> Plan:
        target = common.target_for(device)
        static = static_params(heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink)
        sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv, "topk": topk}
        chosen = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, target, config)
        kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(chosen))
        no_topk_length = common.placeholder(torch.int32, device, (1, 1))
        return Plan(target, chosen, kernel, int(d_v), no_topk_length, common.placeholder(torch.float32, device))

    key = (tuple(q.shape), seq_kv, topk, int(d_v), has_topk_length, has_sink, config)
    return _PLANS.get(device, key, make)


def run(
    p: Plan, q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, topk_length: OptTensor, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """``(out [B, S, H, d_v] bfloat16, lse [B, S, H] float32)`` under plan ``p``."""
    batch, seq, heads, _ = q.shape
    out = common.new_output((batch, seq, heads, p.d_v), torch.bfloat16, q.device)
    lse = common.new_output((batch, seq, heads), torch.float32, q.device)
    p.kernel(
        tl_build.to_kernel_arg(q, p.target),
        tl_build.to_kernel_arg(kv, p.target),
        indices,
        p.no_topk_length if topk_length is None else topk_length,
        p.no_sink if attn_sink is None else attn_sink,
        float(sm_scale),
        tl_build.to_kernel_arg(out, p.target),
        lse,
    )
    return out, lse


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla``'s forward (contract: ``dsa.reference.sparse_mla``) on the kernel: :func:`run` of :func:`plan`.

    Args:
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink: as the contract says, bfloat16/int32/float32, laid out
            by the op (row-major).
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        out ``[B, S, H, d_v]`` bfloat16 and lse ``[B, S, H]`` float32.
    """
    p = plan(q, kv.shape[1], indices.shape[-1], d_v=d_v, has_topk_length=topk_length is not None,
             has_sink=attn_sink is not None, config=config)  # fmt: skip
    return run(p, q, kv, indices, sm_scale, topk_length, attn_sink)

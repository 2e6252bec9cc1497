"""Launcher of the sparse MLA attention forward: picks the config, compiles through the cache, allocates, runs.

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

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_fwd as kernels

__all__ = ["KERNEL_NAME", "sparse_mla_fwd", "static_params"]

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
    """Sparse MLA attention forward (contract: ``dsa.reference.sparse_mla``).

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16.
        kv (torch.Tensor): ``[B, S_kv, d_qk]``, bfloat16; the value is ``kv[..., :d_v]``.
        indices (torch.Tensor): ``[B, S, k]``, int32; entries outside ``[0, S_kv)`` are ignored.
        sm_scale (float): softmax scale (> 0).
        d_v (int): value width, ``1 <= d_v <= d_qk``.
        topk_length (torch.Tensor | None): ``[B, S]``, int32: only the leading ``topk_length[b, t]`` entries count.
        attn_sink (torch.Tensor | None): ``[H]``, float32: an extra logit per head in the denominator only.
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        out (torch.Tensor): ``[B, S, H, d_v]``, bfloat16; 0 for a query with no valid entry.
        lse (torch.Tensor): ``[B, S, H]``, float32, natural log, the sink excluded; ``-inf`` for a query with no
        valid entry.
    """
    batch, seq, heads, d_qk = q.shape
    seq_kv = kv.shape[1]
    topk = indices.shape[-1]
    device = q.device
    target = common.target_for(device)
    static = static_params(
        heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=topk_length is not None, has_sink=attn_sink is not None
    )
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv, "topk": topk}
    config = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, config)
    kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(config))

    # Absent optional inputs travel as one-element placeholders the kernel never reads.
    if topk_length is None:
        topk_length = torch.zeros((1, 1), dtype=torch.int32, device=device)
    if attn_sink is None:
        attn_sink = torch.zeros((1,), dtype=torch.float32, device=device)
    out = common.new_output((batch, seq, heads, d_v), torch.bfloat16, device)
    lse = common.new_output((batch, seq, heads), torch.float32, device)
    kernel(
        tl_build.to_kernel_arg(q, target),
        tl_build.to_kernel_arg(kv, target),
        indices,
        topk_length,
        attn_sink,
        float(sm_scale),
        tl_build.to_kernel_arg(out, target),
        lse,
    )
    return out, lse

"""Launcher of the sparse MLA backward: picks the config, compiles through the cache, allocates and runs 3 kernels.

Inputs are assumed validated (``dsa.validation``): right dtypes, shapes, contiguity, one device (CPU or CUDA).
On CPU the kernels are TileLang's C-target build (bf16 travels as uint16 bits); on CUDA the sm_90a build.
"""

from typing import Any

import torch

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_bwd as kernels

__all__ = ["KERNEL_NAME", "padded_topk", "sparse_mla_bwd", "static_params"]

KERNEL_NAME = "sparse_mla_bwd"
"""Name of the main kernel in the tuner, the config cache and the benchmark."""

_INVALID_INDEX = -1


def padded_topk(k: int) -> int:
    """``k`` rounded up to :data:`tl_kernels.sparse_mla_bwd.TOPK_ALIGN` (the static ``topk`` of the main kernel)."""
    return -(-k // kernels.TOPK_ALIGN) * kernels.TOPK_ALIGN


def static_params(
    *, heads: int, d_qk: int, d_v: int, k: int, has_topk_length: bool, has_sink: bool
) -> dict[str, Any]:
    """The main kernel's static parameters for ``k`` index columns (compiled in, padded by :func:`padded_topk`)."""
    return {
        "heads": int(heads),
        "d_qk": int(d_qk),
        "d_v": int(d_v),
        "topk": padded_topk(k),
        "has_topk_length": bool(has_topk_length),
        "has_sink": bool(has_sink),
    }


def sparse_mla_bwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    indices: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    d_lse: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``dsa.reference.sparse_mla`` with respect to ``q`` and ``kv``.

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16.
        kv (torch.Tensor): ``[B, S_kv, d_qk]``, bfloat16.
        out (torch.Tensor): ``[B, S, H, d_v]``, bfloat16, the forward's output.
        lse (torch.Tensor): ``[B, S, H]``, float32, the forward's natural-log lse (``-inf`` for empty rows; the sink
            excluded).
        d_out (torch.Tensor): ``[B, S, H, d_v]``, bfloat16.
        indices (torch.Tensor): ``[B, S, k]``, int32; invalid entries (out of range, or beyond ``topk_length``) are
            skipped and never read.
        sm_scale (float): the forward's softmax scale.
        d_v (int): value width (``kv[..., :d_v]`` is the value).
        topk_length (torch.Tensor | None): ``[B, S]``, int32.
        attn_sink (torch.Tensor | None): ``[H]``, float32.
        d_lse (torch.Tensor | None): ``[B, S, H]``, float32, the gradient arriving through ``lse`` (None: zero).
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        dq (torch.Tensor): ``[B, S, H, d_qk]``, bfloat16.
        dkv (torch.Tensor): ``[B, S_kv, d_qk]``, bfloat16, summed over every query and duplicate that used a row.
    """
    batch, seq, heads, d_qk = q.shape
    seq_kv = kv.shape[1]
    k = indices.shape[-1]
    device = q.device
    target = common.target_for(device)
    static = static_params(
        heads=heads, d_qk=d_qk, d_v=d_v, k=k, has_topk_length=topk_length is not None, has_sink=attn_sink is not None
    )
    topk = static["topk"]
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
    config = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, config)

    if topk != k:
        # Pad with invalid entries (-1): the kernel gives them probability 0 and never uses them as addresses.
        pad = torch.full((batch, seq, topk - k), _INVALID_INDEX, dtype=indices.dtype, device=device)
        indices = torch.cat([indices, pad], dim=-1)
    indices = indices.contiguous()

    preprocess = common.get_kernel(kernels.build_preprocess, target, d_v=d_v)
    main = common.get_kernel(kernels.build, target, **static, **kernels.config_params(config))
    postprocess = common.get_kernel(kernels.build_postprocess, target, d_qk=d_qk)

    def arg(t: torch.Tensor) -> torch.Tensor:
        return tl_build.to_kernel_arg(t, target)

    delta = common.new_output((batch, seq, heads), torch.float32, device)
    preprocess(arg(out.reshape(-1, d_v)), arg(d_out.reshape(-1, d_v)), delta.view(-1))

    # Absent optional inputs travel as 1-element placeholders (the kernel never reads them).
    if topk_length is not None:
        topk_length_arg = topk_length.to(torch.int32).contiguous()
    else:
        topk_length_arg = torch.zeros(1, dtype=torch.int32, device=device)
    if attn_sink is not None:
        sink_arg = attn_sink.to(torch.float32).contiguous()
    else:
        sink_arg = torch.zeros(1, dtype=torch.float32, device=device)
    if d_lse is not None:
        d_lse_arg = d_lse.to(torch.float32).contiguous()
    else:
        d_lse_arg = torch.zeros((batch, seq, heads), dtype=torch.float32, device=device)
    dq = common.new_output(tuple(q.shape), q.dtype, device)
    dkv_acc = torch.zeros((batch, seq_kv, d_qk), dtype=torch.float32, device=device)
    main(
        arg(q),
        arg(kv),
        arg(d_out),
        indices,
        lse.contiguous(),
        delta,
        d_lse_arg,
        topk_length_arg,
        sink_arg,
        float(sm_scale),
        arg(dq),
        dkv_acc,
    )
    dkv = common.new_output((batch, seq_kv, d_qk), kv.dtype, device)
    postprocess(dkv_acc, arg(dkv))
    return dq, dkv

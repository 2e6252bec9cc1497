"""Launcher of the sparse MLA backward: picks the config, compiles through the cache, allocates and runs 3 kernels.

Inputs are assumed validated (``dsa.validation``): right dtypes, shapes, contiguity, one device (CPU or CUDA).
On CPU the kernels are TileLang's C-target build (bf16 travels as uint16 bits); on CUDA the sm_90a build.
"""

from typing import Any

import torch

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_bwd as kernels


__all__ = ["KERNEL_NAME", "new_output", "padded_topk", "select_config", "sparse_mla_bwd"]

KERNEL_NAME = "sparse_mla_bwd"
"""Name of the main kernel in the tuned-config cache."""

_INVALID_INDEX = -1


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a tensor the kernels fully overwrite (uninitialised; tests replace this to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_topk(k: int) -> int:
    """``k`` rounded up to :data:`tl_kernels.sparse_mla_bwd.TOPK_ALIGN` (the static ``topk`` of the main kernel)."""
    return -(-k // kernels.TOPK_ALIGN) * kernels.TOPK_ALIGN


def select_config(static: dict[str, Any], sizes: dict[str, int], device: torch.device) -> kernels.Config:
    """The tuned config for this launch when the tuning cache has a valid one, else the kernel's default config.

    ``static`` holds the main kernel's static parameters (without the target); ``sizes`` the runtime sizes
    (``batch``, ``seq_len``, ``seq_len_kv``). A missing, failing or invalid tuned entry is logged and ignored.
    """
    return common.select_config(KERNEL_NAME, kernels, static, sizes, device)


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
    topk = padded_topk(k)
    static = {
        "heads": heads,
        "d_qk": d_qk,
        "d_v": d_v,
        "topk": topk,
        "has_topk_length": topk_length is not None,
        "has_sink": attn_sink is not None,
    }
    if config is None:
        config = select_config(static, {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}, device)
    else:
        kernels.check_config({**static, "target": target}, config)

    if topk != k:
        # Pad with invalid entries (-1): the kernel gives them probability 0 and never uses them as addresses.
        pad = torch.full((batch, seq, topk - k), _INVALID_INDEX, dtype=indices.dtype, device=device)
        indices = torch.cat([indices, pad], dim=-1)
    indices = indices.contiguous()

    preprocess = tl_build.get_kernel(kernels.build_preprocess, target=target, d_v=d_v)
    main = tl_build.get_kernel(kernels.build, target=target, **static, **kernels.config_params(config))
    postprocess = tl_build.get_kernel(kernels.build_postprocess, target=target, d_qk=d_qk)

    def arg(t: torch.Tensor) -> torch.Tensor:
        return tl_build.to_kernel_arg(t, target)

    delta = new_output((batch, seq, heads), torch.float32, device)
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
    dq = new_output(tuple(q.shape), q.dtype, device)
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
    dkv = new_output((batch, seq_kv, d_qk), kv.dtype, device)
    postprocess(dkv_acc, arg(dkv))
    return dq, dkv

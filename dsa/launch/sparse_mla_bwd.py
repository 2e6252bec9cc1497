"""Launcher of the sparse MLA backward: plan (target, config, 3 kernels) once per shape, run per call.

Inputs are assumed validated (``dsa.validation``): right dtypes, shapes, contiguity, one device (CPU or CUDA).
On CPU the kernels are TileLang's C-target build (bf16 travels as uint16 bits); on CUDA the sm_90a build.

``ranged=True`` plans the main kernel whose entries are a contiguous row range per query: ``run``'s ``indices`` is
then ``ranges [B, S, 2]`` int32, (start, end) per query (as in ``dsa.launch.sparse_mla_fwd``), never padded, and
``topk_length`` must be ``None``.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from dsa.launch import common
from dsa.launch import sparse_mla_fwd as fwd_launch
from dsa.reference.sources import Source
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_bwd as kernels

__all__ = ["KERNEL_NAME", "Plan", "padded_topk", "plan", "run", "sparse_mla_bwd", "static_params"]

KERNEL_NAME = "sparse_mla_bwd"
"""Name of the main kernel in the tuner, the config cache and the benchmark."""

_INVALID_INDEX = -1
OptTensor = Tensor | None


def padded_topk(k: int) -> int:
    """``k`` rounded up to :data:`tl_kernels.sparse_mla_bwd.TOPK_ALIGN` (the static ``topk`` of the main kernel)."""
    return -(-k // kernels.TOPK_ALIGN) * kernels.TOPK_ALIGN


def static_params(
    *, heads: int, d_qk: int, d_v: int, k: int, has_topk_length: bool, has_sink: bool, ranged: bool = False
) -> dict[str, Any]:
    """The main kernel's static parameters: the forward's, and ``k`` index columns (compiled in, padded by
    :func:`padded_topk`); a ranged kernel (``ranged`` in the forward's parameters) has no index columns (``k`` is
    ignored: the range sets the steps at run time)."""
    static = fwd_launch.static_params(
        heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink, ranged=ranged
    )
    return static if ranged else {**static, "topk": padded_topk(k)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a backward launch of one shape runs: target, config, its three compiled kernels (preprocess, main,
    postprocess), the main kernel's padded ``topk`` (0 when ``ranged``), placeholders of absent optional inputs
    (never read), and whether ``indices`` are ranges."""

    target: Any
    config: kernels.Config
    preprocess: Any
    main: Any
    postprocess: Any
    topk: int
    no_topk_length: torch.Tensor
    no_sink: torch.Tensor
    ranged: bool = False


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)


def plan(
    q: torch.Tensor,
    seq_kv: int,
    k: int,
    *,
    d_v: int,
    has_topk_length: bool,
    has_sink: bool,
    config: kernels.Config | None = None,
    ranged: bool = False,
) -> Plan:
    """The plan for ``q [B, S, H, d_qk]`` over ``seq_kv`` rows and ``k`` indices per query (``config`` overrides the
    selection: tests and the tuner). With ``ranged`` the entries are a row range per query (``run`` then takes
    ``ranges [B, S, 2]`` as its ``indices``; ``k`` is not used)."""
    batch, seq, heads, d_qk = q.shape
    device = q.device

    def make() -> Plan:
        target = common.target_for(device)
        static = static_params(
            heads=heads, d_qk=d_qk, d_v=d_v, k=k, has_topk_length=has_topk_length, has_sink=has_sink, ranged=ranged
        )
        sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
        chosen = common.select_config(KERNEL_NAME, kernels, static, sizes, device, target, config=config)
        return Plan(
            target, chosen,
            common.get_kernel(kernels.build_preprocess, target, d_v=d_v),
            common.get_kernel(kernels.build, target, **static, **kernels.config_params(chosen)),
            common.get_kernel(kernels.build_postprocess, target, d_qk=d_qk),
            static.get("topk", 0), common.placeholder(torch.int32, device),
            common.placeholder(torch.float32, device), bool(ranged),
        )  # fmt: skip

    key = (tuple(q.shape), seq_kv, 0 if ranged else k, int(d_v), has_topk_length, has_sink, config, bool(ranged))
    return _PLANS.get(device, key, make)


def run(
    p: Plan, q: Tensor, source: Source, sm_scale: float, attn_sink: OptTensor, out: Tensor, lse: Tensor, d_out: Tensor,
    d_lse: OptTensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(dq [B, S, H, d_qk], dkv [B, S_kv, d_qk])`` bfloat16 under plan ``p`` for one key ``source``
    (``dsa.reference.sources.Source``: ``kv``, its ``indices`` or, when ``p`` was planned ``ranged``, its ranges
    ``[B, S, 2]`` int32, and ``topk_length``); the rest as :func:`sparse_mla_bwd` takes them."""
    kv, indices, topk_length = source.kv, source.indices, source.topk_length
    batch, seq, heads, d_qk = q.shape
    seq_kv, k, d_v = kv.shape[1], indices.shape[-1], out.shape[-1]
    device = q.device
    if not p.ranged and p.topk != k:
        # Pad with invalid entries (-1): the kernel gives them probability 0 and never uses them as addresses.
        pad = torch.full((batch, seq, p.topk - k), _INVALID_INDEX, dtype=indices.dtype, device=device)
        indices = torch.cat([indices, pad], dim=-1)
    indices = indices.contiguous()

    def arg(t: torch.Tensor) -> torch.Tensor:
        return tl_build.to_kernel_arg(t, p.target)

    delta = common.new_output((batch, seq, heads), torch.float32, device)
    p.preprocess(arg(out.reshape(-1, d_v)), arg(d_out.reshape(-1, d_v)), delta.view(-1))
    topk_length_arg = p.no_topk_length if topk_length is None else topk_length.to(torch.int32).contiguous()
    sink_arg = p.no_sink if attn_sink is None else attn_sink.to(torch.float32).contiguous()
    if d_lse is not None:
        d_lse_arg = d_lse.to(torch.float32).contiguous()
    else:
        d_lse_arg = torch.zeros((batch, seq, heads), dtype=torch.float32, device=device)
    dq = common.new_output(tuple(q.shape), q.dtype, device)
    dkv_acc = torch.zeros((batch, seq_kv, d_qk), dtype=torch.float32, device=device)
    p.main(
        arg(q), arg(kv), arg(d_out), indices, lse.contiguous(), delta, d_lse_arg, topk_length_arg, sink_arg,
        float(sm_scale), arg(dq), dkv_acc,
    )  # fmt: skip
    dkv = common.new_output((batch, seq_kv, d_qk), kv.dtype, device)
    p.postprocess(dkv_acc, arg(dkv))
    return dq, dkv


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
    ranged: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``dsa.reference.sparse_mla`` with respect to ``q`` and ``kv``: :func:`run` of :func:`plan`.

    Args:
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink: the forward's inputs (bfloat16/int32/float32).
        out (torch.Tensor): ``[B, S, H, d_v]``, bfloat16, the forward's output.
        lse (torch.Tensor): ``[B, S, H]``, float32, the forward's natural-log lse (sink excluded).
        d_out (torch.Tensor): ``[B, S, H, d_v]``, bfloat16.
        d_lse (torch.Tensor | None): ``[B, S, H]``, float32, the gradient arriving through ``lse`` (None: zero).
        config (Config | None): overrides the config selection (tests and the tuner).
        ranged (bool): ``indices`` is ``ranges [B, S, 2]`` int32, (start, end) per query (see the module docstring).

    Returns:
        dq ``[B, S, H, d_qk]`` and dkv ``[B, S_kv, d_qk]`` (bfloat16; dkv summed over every query and duplicate).
    """
    p = plan(q, kv.shape[1], indices.shape[-1], d_v=d_v, has_topk_length=topk_length is not None,
             has_sink=attn_sink is not None, config=config, ranged=ranged)  # fmt: skip
    return run(p, q, Source(kv, indices, topk_length, ranged), sm_scale, attn_sink, out, lse, d_out, d_lse)

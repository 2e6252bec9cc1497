"""Launcher of the sparse MLA attention forward: plan (target, config, kernel) once per shape, run per call.

Inputs are assumed validated (``dsa.validation.check_sparse_mla(..., kernel=True)``): bfloat16 ``q``/``kv``, int32
``indices``/``topk_length``, float32 ``attn_sink``, contiguous, non-empty, on one CPU or CUDA device. On CPU the
kernel is TileLang's C-target build of ``tl_kernels.sparse_mla_fwd`` (serial loops, float32 tiles); on CUDA the
sm_90a build (cp.async gather, wgmma). Static parameters: ``heads``, ``d_qk``, ``d_v``, ``has_topk_length``,
``has_sink`` and ``ranged``; ``B``, ``S``, ``S_kv`` and the top-k width are symbolic, so one compiled kernel serves
every shape.

``ranged=True`` plans the kernel whose entries are a contiguous row range per query (DeepSeek-V4's sliding window and
HCA entries): ``run``'s ``indices`` is then ``ranges [B, S, 2]`` int32, (start, end) per query, entry ``j`` being row
``start + j``, valid iff ``start + j < end`` and ``0 <= start + j < S_kv`` (any int32 values; an empty or inverted
range gives ``out = 0``, ``lse = -inf``), and ``topk_length`` must be ``None``.

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
from dsa.reference.sources import Source
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_fwd as kernels

OptTensor = Tensor | None

__all__ = ["KERNEL_NAME", "Plan", "plan", "run", "sparse_mla_fwd", "static_params"]

KERNEL_NAME = "sparse_mla_fwd"
"""Name of the kernel in the tuner, the config cache and the benchmark."""


def static_params(
    *, heads: int, d_qk: int, d_v: int, has_topk_length: bool, has_sink: bool, ranged: bool = False
) -> dict[str, Any]:
    """The kernel's static parameters (the top-k width is a runtime size, not one of them). ``ranged`` appears only
    when set, so the index-list kernels keep the keys (and tuned-cache entries) they had before ranges existed."""
    static = {
        "heads": int(heads),
        "d_qk": int(d_qk),
        "d_v": int(d_v),
        "has_topk_length": bool(has_topk_length),
        "has_sink": bool(has_sink),
    }
    if ranged:
        if has_topk_length:
            raise ValueError("sparse_mla_fwd: a ranged kernel takes no topk_length (the range's end bounds it)")
        static["ranged"] = True
    return static


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
    ranged: bool = False,
) -> Plan:
    """The plan for ``q [B, S, H, d_qk]`` over ``seq_kv`` rows and ``topk`` indices per query (``config`` overrides
    the selection: tests and the tuner). With ``ranged`` the entries are a row range per query (``run`` then takes
    ``ranges [B, S, 2]`` as its ``indices``) and ``topk`` is only the expected range length, the size that picks the
    tuned config's bucket (a window's width, say); the kernel reads no width."""
    batch, seq, heads, d_qk = q.shape
    device = q.device

    def make() -> Plan:
        static = static_params(
            heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink, ranged=ranged
        )
        sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv, "topk": topk}
        compiled = common.compile_plan(KERNEL_NAME, kernels, static, sizes, device, config)
        no_topk_length = common.placeholder(torch.int32, device, (1, 1))
        return Plan(
            compiled.target, compiled.config, compiled.kernel, int(d_v), no_topk_length,
            common.placeholder(torch.float32, device),
        )  # fmt: skip

    key = (tuple(q.shape), seq_kv, topk, int(d_v), has_topk_length, has_sink, config, bool(ranged))
    return _PLANS.get(device, key, make)


def run(p: Plan, q: Tensor, source: Source, sm_scale: float, attn_sink: OptTensor) -> tuple[Tensor, Tensor]:
    """``(out [B, S, H, d_v] bfloat16, lse [B, S, H] float32)`` under plan ``p`` over one key ``source``
    (``dsa.reference.sources.Source``: ``kv``, its ``indices [B, S, k]`` int32 or, when ``p`` was planned ``ranged``,
    its ranges ``[B, S, 2]`` int32 (then ``topk_length`` is ``None``), and ``topk_length``)."""
    kv, indices, topk_length = source.kv, source.indices, source.topk_length
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
    ranged: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla``'s forward (contract: ``dsa.reference.sparse_mla``) on the kernel: :func:`run` of :func:`plan`.

    Args:
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink: as the contract says, bfloat16/int32/float32, laid out
            by the op (row-major).
        config (Config | None): overrides the config selection (tests and the tuner).
        ranged (bool): ``indices`` is ``ranges [B, S, 2]`` int32, (start, end) per query (see the module docstring);
            the config is chosen for ranges as long as ``kv`` (the longest possible).

    Returns:
        out ``[B, S, H, d_v]`` bfloat16 and lse ``[B, S, H]`` float32.
    """
    width = kv.shape[1] if ranged else indices.shape[-1]
    p = plan(q, kv.shape[1], width, d_v=d_v, has_topk_length=topk_length is not None,
             has_sink=attn_sink is not None, config=config, ranged=ranged)  # fmt: skip
    return run(p, q, Source(kv, indices, topk_length, ranged), sm_scale, attn_sink)

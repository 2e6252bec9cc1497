"""Launcher of the fused selection kernel: plan (target, config, compiled kernel) once per shape, run per call.

Inputs are assumed validated (``dsa.validation.check_index_topk(..., kernel=True)``, or ``check_index_topk_decode``
for the paged variant): the indexer's dtypes, shapes, contiguity and device rules, ``topk >= 1``. On CPU the kernel is
TileLang's C-target build of ``tl_kernels.index_topk``; on CUDA the build for the device's architecture. ``B``, ``S``
and ``S_kv`` are symbolic: one compiled kernel serves every length for the static parameters (heads, dim, dtype,
mode, topk; the paged variant adds the page size, the FP8 scale column and, for DeepGEMM's per-page key layout,
``key_layout="paged"``).

:func:`plan` and :func:`plan_paged` return ``None`` where no config fits (the candidate buffers of a very large
``topk`` exceed shared memory): the caller runs another path.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from dsa import kv_format
from dsa.launch import common
from dsa.launch import index_topk_split as split
from dsa.launch import indexer as indexer_launch
from tl_kernels import build as tl_build
from tl_kernels import index_topk as kernels
from tl_kernels import indexer as indexer_kernels

OptTensor = Tensor | None

__all__ = [
    "KERNEL_NAME", "MTP_QUERIES", "Plan", "index_topk", "index_topk_paged", "mtp_default", "paged_splits",
    "paged_static_params", "plan", "plan_paged", "run", "run_paged", "static_params",
]  # fmt: skip

KERNEL_NAME = "index_topk"
"""Name of the kernel in the tuner, the config cache and the benchmark."""
_SCALE_BYTES = 4  # a float32 scale
MTP_QUERIES = 2
"""Queries of one sequence a decode selection block holds by default over key rows (:func:`mtp_default`)."""


def static_params(q: torch.Tensor, topk: int, *, ranged: bool) -> dict[str, Any]:
    """The kernel's static parameters: the indexer's (heads, dim, dtype, mode) and ``topk``."""
    return {**indexer_launch.static_params(q, ranged=ranged), "topk": int(topk)}


def paged_static_params(q: torch.Tensor, topk: int, *, page_size: int, key_layout: str = "rows") -> dict[str, Any]:
    """The static parameters of the paged (decode) variant: the ranged indexer's, ``topk``, the page size and, for
    FP8 keys, the float32 column of a key row's scale (``dsa.kv_format.index_key_layout``: after its ``D_i`` bytes;
    0 for ``key_layout="paged"``, whose scales follow the page's values, and then ``key_layout`` is a parameter too:
    the row layout's parameters stay what they were, so its builds and caches are unchanged). Whether the key tile is
    double-buffered is the config's ``prefetch`` (its default: ``tl_kernels.index_topk.prefetch_by_default``, on for
    the per-page layout: 96 registers instead of 80 on sm_90a at V3.2, no spills, no more shared memory)."""
    static = {**static_params(q, topk, ranged=True), "page_size": int(page_size)}
    fp8 = q.dtype == torch.float8_e4m3fn
    rows = key_layout == "rows"
    # The scale's column when a key row is viewed as float32 words.
    scale_offset = kv_format.index_key_layout(int(q.shape[-1])).scale_offset
    static["scale_col"] = scale_offset // _SCALE_BYTES if fp8 and rows else 0
    if not rows:
        static["key_layout"] = key_layout
    return static


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a fused selection of one shape runs: its target, config, compiled kernel, ``topk`` and (paged FP8 keys)
    the key cache's layout."""

    target: Any
    config: kernels.Config
    kernel: Any
    topk: int
    key_layout: str = "rows"


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)
_PAGED_PLANS: common.PlanCache[Plan] = common.PlanCache(f"{KERNEL_NAME}_paged")


def mtp_default(static: dict[str, Any], s_q: int, target: Any) -> kernels.Config | None:
    """The paged selection's default for ``s_q >= 2`` queries a sequence over key rows (``key_layout="rows"``), until
    a GPU record decides: the default config with ``q_rows`` doubled, so that a block holds :data:`MTP_QUERIES`
    queries of one sequence (both MTP queries of a decode step) and each key tile it loads serves both. ``None``
    where the rule does not apply: one query a step, key pages, a default block that already holds them (small
    ``H_i``, the C target's tests), or a doubled tile that does not fit the target.

    Why key rows only (``benchmarks.cost``, H800, V3.2: 64 heads x 128 FP8, top-2048, s_q 2): a 132-byte key row
    loads a byte at a time, so a block is bound by its key loads (about 8 cycles a key against 3 for one query's
    scores) and sharing them makes B 8-128 model 25-50 % faster (20-27 % at B 1); per-page keys load as 16-byte
    vectors and gain little, not at every batch (B 8: 5-9 % faster, B 32: 4-10 % slower; the doubled block needs
    twice the splits at small batches and one block per SM: about 117 KB of shared memory, 110-128 registers)."""
    if s_q < 2 or static.get("key_layout", "rows") != "rows":
        return None
    default = kernels.default_config({**static, "target": target})
    wanted = min(s_q, MTP_QUERIES)
    if indexer_kernels.block_queries(static["heads"], default.q_rows) >= wanted:
        return None
    doubled = dataclasses.replace(default, q_rows=default.q_rows * wanted)
    try:
        kernels.check_config({**static, "target": target}, doubled)
    except ValueError:
        return None
    return doubled


def _make(
    static: dict[str, Any], sizes: dict[str, int] | None, device: torch.device, config: kernels.Config | None,
    s_q: int | None = None,
) -> Plan | None:  # fmt: skip
    """A plan for ``static`` (``sizes=None``: untuned, the default config), ``None`` where no default config fits;
    ``s_q``: a decode selection's queries a sequence, whose untuned default follows :func:`mtp_default`."""
    target = common.target_for(device)
    try:
        name = KERNEL_NAME if sizes else None
        rule = mtp_default(static, s_q, target) if s_q is not None and config is None else None
        chosen = common.select_config(name, kernels, static, sizes or {}, device, target, rule, config)
    except ValueError:
        if config is not None:
            raise  # a caller's config that does not suit the target is an error, not a fallback
        return None
    kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(chosen))
    return Plan(target, chosen, kernel, static["topk"], static.get("key_layout", "rows"))


def plan(
    q: torch.Tensor, seq_kv: int, topk: int, *, ranged: bool, config: kernels.Config | None = None
) -> Plan | None:
    """The plan of ``index_topk`` for ``q [B, S, H_i, D_i]`` against ``seq_kv`` keys, or ``None`` where no config
    fits (``config`` overrides the selection: tests and the tuner)."""
    batch, seq = q.shape[:2]
    static = static_params(q, topk, ranged=ranged)
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
    return _PLANS.get(q.device, (tuple(q.shape), q.dtype, seq_kv, int(topk), ranged, config),
                      lambda: _make(static, sizes, q.device, config))  # fmt: skip


def run(
    p: Plan, q: Tensor, k: Tensor, weights: Tensor, k_scale: OptTensor, starts: OptTensor, ends: OptTensor
) -> tuple[Tensor, Tensor]:
    """``(indices, scores)``, each ``[B, S, topk]``, under plan ``p``."""
    shape = (q.shape[0], q.shape[1], p.topk)
    indices = common.new_output(shape, torch.int32, q.device)
    scores = common.new_output(shape, torch.float32, q.device)
    p.kernel(*indexer_launch.kernel_inputs(q, k, weights, k_scale, starts, ends, p.target), indices, scores)
    return indices, scores


def index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    config: kernels.Config | None = None,
    planned: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_topk`` (contract: ``dsa.reference.index_topk``) by the fused kernel: no ``[B, S, S_kv]`` buffer.

    Args:
        q, k, weights, k_scale, starts, ends, topk: as the contract says, laid out by the op (row-major).
        config (Config | None): overrides the config selection (tests and the tuner).
        planned (Plan | None): the caller's plan (``dsa.library`` planned to learn whether the kernel fits); default
            :func:`plan` (``ValueError`` where none fits).

    Returns:
        indices ``[B, S, topk]`` int32 (``-1`` padding) and scores ``[B, S, topk]`` float32 (``-inf`` at padding).
    """
    p = planned or plan(q, k.shape[1], topk, ranged=starts is not None, config=config)
    if p is None:
        raise ValueError(f"index_topk: no fused config fits topk={topk} for q {tuple(q.shape)} on {q.device}")
    return run(p, q, k, weights, k_scale, starts, ends)


def plan_paged(
    q: torch.Tensor,
    topk: int,
    *,
    page_size: int,
    config: kernels.Config | None = None,
    key_layout: str = "rows",
    max_pages: int | None = None,
) -> Plan | None:
    """The plan of the paged variant for ``q [B, s_q, H_i, D_i]`` over pages of ``page_size`` keys (FP8 keys in
    ``key_layout``, ``dsa.kv_format.INDEX_KEY_LAYOUTS``), or ``None`` where no config fits. With ``max_pages`` (the
    block table's width) the config is the tuned one for ``(batch, s_q, max_pages * page_size)`` where the user's
    cache has one (the tuner's paged ``index_topk`` cases, ``autotune.lookup.decode``), else the default; without it
    the default config runs; either way, untuned, :func:`mtp_default` applies (``config`` overrides all)."""
    static = paged_static_params(q, topk, page_size=page_size, key_layout=key_layout)
    s_q = q.shape[1]
    sizes = None
    if max_pages is not None:
        sizes = {"batch": q.shape[0], "seq_len": s_q, "seq_len_kv": int(max_pages) * int(page_size)}
    shape = (s_q,) if sizes is None else tuple(sizes.values())
    key = (q.dtype, q.shape[2], q.shape[3], int(topk), int(page_size), config, key_layout, shape)
    return _PAGED_PLANS.get(q.device, key, lambda: _make(static, sizes, q.device, config, s_q))


def _launch_paged(
    p: Plan, q: Tensor, k_cache: Tensor, weights: Tensor, block_table: Tensor, ends: Tensor, starts: Tensor
) -> tuple[Tensor, Tensor]:
    """One launch of the paged kernel: ``(positions, scores)``, each ``[B, S, topk]``, for ``ends [B, S]`` and ``q
    [B, Q, H_i, D_i]`` (``Q = S``, or a split launch's padded queries, which its ``S`` virtual queries share)."""
    # Key rows, or whole pages for the per-page layout (its values and scales are addressed by page).
    rows = k_cache.view(k_cache.shape[0], -1) if p.key_layout != "rows" else k_cache.view(-1, k_cache.shape[-1])
    if q.dtype == torch.float8_e4m3fn:
        raw = rows.view(torch.uint8)
        keys = [tl_build.to_kernel_arg(raw.view(torch.float8_e4m3fn), p.target), weights, raw.view(torch.float32)]
    else:
        keys = [tl_build.to_kernel_arg(rows, p.target), weights]
    shape = (*ends.shape, p.topk)  # one row per (virtual) query: q may hold fewer rows (a split launch)
    indices = common.new_output(shape, torch.int32, q.device)
    scores = common.new_output(shape, torch.float32, q.device)
    p.kernel(tl_build.to_kernel_arg(q, p.target), *keys, block_table, starts, ends, indices, scores)
    return indices, scores


def _split_shape(p: Plan, q: Tensor, block_table: Tensor, page_size: int) -> tuple[int, int, int]:
    """``(block_Q, block_N, key_blocks)`` of a paged launch: the kernel's queries and keys per block, and the key
    blocks of its logical key length ``max_pages * page_size``."""
    block_N = p.config.block_N
    key_blocks = -(-block_table.shape[1] * page_size // block_N)
    return indexer_kernels.block_queries(q.shape[2], p.config.q_rows), block_N, key_blocks


def paged_splits(p: Plan, q: Tensor, block_table: Tensor, page_size: int) -> int:
    """The split count :func:`run_paged` uses by default (``dsa.launch.index_topk_split.num_splits``: two waves of
    the device's SMs; one on the C target)."""
    sms = split.device_sms(q.device)
    block_Q, _, key_blocks = _split_shape(p, q, block_table, page_size)
    return split.num_splits(batch=q.shape[0], s_q=q.shape[1], block_Q=block_Q, key_blocks=key_blocks, sms=sms)


def run_paged(
    p: Plan, q: Tensor, k_cache: Tensor, weights: Tensor, block_table: Tensor, ends: Tensor, starts: OptTensor,
    splits: int | None = None, warm_lists: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(positions, scores)``, each ``[B, s_q, topk]``, under paged plan ``p``: one launch, or with ``splits > 1``
    (default :func:`paged_splits`) each query's key range cut into ``splits`` sub-ranges, each on its own thread
    blocks, and their candidates merged (``dsa.launch.index_topk_split``; the same result). ``warm_lists``: a GPU's
    first narrow list plans every width (:func:`_list_plan`); off, only the width launched (a caller's one-off
    config, e.g. a tuning candidate)."""
    page_size = k_cache.shape[1]
    splits = paged_splits(p, q, block_table, page_size) if splits is None else splits
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"index_topk_decode: splits must be a positive int, got {splits!r}")
    if splits == 1:
        starts = torch.zeros_like(ends) if starts is None else starts
        return _launch_paged(p, q, k_cache, weights, block_table, ends, starts)
    block_Q, block_N, key_blocks = _split_shape(p, q, block_table, page_size)
    v_q, v_w, v_starts, v_ends = split.expand(q, weights, starts, ends, splits=splits, block_Q=block_Q,
                                              block_N=block_N, seq_kv=block_table.shape[1] * page_size)  # fmt: skip
    width = split.list_width(topk=p.topk, splits=splits, key_blocks=key_blocks, block_N=block_N)
    positions, scores = _launch_paged(_list_plan(p, q, page_size, width, warm_lists), v_q, k_cache, v_w, block_table,
                                      v_ends, v_starts)  # fmt: skip
    return split.merge(positions, scores, s_q=q.shape[1], splits=splits, topk=p.topk)


def _list_plan(p: Plan, q: Tensor, page_size: int, width: int, warm: bool = True) -> Plan:
    """The split launch's plan: ``p`` itself, or for lists narrower than ``p.topk`` the kernel compiled for
    ``width`` entries with ``p``'s config (the same blocks and key tiles; its candidate buffers are smaller).

    On a GPU the first narrow list of ``p`` plans (compiles) every width the rule can pick
    (``index_topk_split.list_widths``, at most ``log2(topk / block_N)``): a context that grows into another width
    later finds its kernel built, so a serving step does not stall on a compile mid-stream (with TileLang's disk
    cache, later processes only load them). The C target, whose default never splits, and ``warm=False`` (a caller's
    one-off config: a tuning candidate) compile what they launch."""
    if width == p.topk:
        return p
    family = (q.device, common.plan_settings(q.device), q.dtype, tuple(q.shape[2:]), p.topk, p.config, p.key_layout,
              page_size)  # fmt: skip
    if warm and family not in _WARMED_LISTS and split.device_sms(q.device) is not None:
        for other in split.list_widths(topk=p.topk, block_N=p.config.block_N):
            plan_paged(q, other, page_size=page_size, config=p.config, key_layout=p.key_layout)
        _WARMED_LISTS.add(family)
    narrow = plan_paged(q, width, page_size=page_size, config=p.config, key_layout=p.key_layout)
    assert narrow is not None  # a config that fits topk fits fewer entries: smaller buffers, the same tiles
    return narrow


_WARMED_LISTS: set[tuple[Any, ...]] = set()
"""The (device and its plan settings, q dtype and head shape, topk, config, key layout, page size) families whose
narrow list kernels are all planned (a GPU's first narrow list plans every width, :func:`_list_plan`)."""


def index_topk_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    block_table: torch.Tensor,
    ends: torch.Tensor,
    starts: torch.Tensor | None = None,
    config: kernels.Config | None = None,
    planned: Plan | None = None,
    splits: int | None = None,
    key_layout: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_topk_decode`` (contract: ``dsa.reference.index_topk_decode``) by the fused kernel reading the keys
    through the block table.

    Args:
        q, k_cache, weights, topk, block_table, ends, starts: as the contract says, laid out by the op (row-major).
        config (Config | None): overrides the default config (tests, tuning candidates; a split launch then plans
            only the list width it runs, :func:`_list_plan`).
        planned (Plan | None): the caller's plan; default :func:`plan_paged` (``ValueError`` where none fits).
        splits (int | None): sub-ranges per query's keys (split-K selection; tests force 1..7); default
            :func:`paged_splits` (two waves of the GPU's SMs, one on the C target).
        key_layout (str): FP8 keys' byte layout (``dsa.kv_format.INDEX_KEY_LAYOUTS``; a ``planned`` plan has its own).

    Returns:
        positions ``[B, s_q, topk]`` int32 (``-1`` padding) and their scores ``[B, s_q, topk]`` float32.
    """
    p = planned or plan_paged(q, topk, page_size=k_cache.shape[1], config=config, key_layout=key_layout,
                              max_pages=block_table.shape[1])  # fmt: skip
    if p is None:
        raise ValueError(f"index_topk_decode: no fused config fits topk={topk} for q {tuple(q.shape)} on {q.device}")
    return run_paged(p, q, k_cache, weights, block_table, ends, starts, splits, warm_lists=config is None)

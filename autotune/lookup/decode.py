"""The decode kernels in the tuner: their tuning presets and the static screen of the decode attention's candidates.

Two kernels run a decode step, and both are tuner kernels:

* ``sparse_mla_decode`` (``tl_kernels.sparse_mla_decode``, launched by ``dsa.launch.sparse_mla_decode``): the
  attention over a paged cache. Its static parameters are the launcher's ``static_params`` (``heads``, ``d_qk``,
  ``d_v``, ``d_rope``, ``tile``, the cache format ``kv_format``: ``"bf16"``, ``"fp8"`` (V3.2's 656-byte rows) or
  ``"fp8_paged"`` (MODEL1's pages, with ``page_size``, ``page_bytes``, ``value_bytes``, ``scale_group_bytes``)). Its
  size names are ``batch``, ``s_q`` (queries per sequence, MTP) and ``topk`` (entries per query).
  The cache length is not one: the launcher sees the cache pool, not a sequence's length, and the kernel gathers
  ``topk`` rows per query whatever the context (the runner fills :data:`CONTEXT_PER_TOPK` tokens per ``topk``).
  **The split count is not a tuning axis**: it is the launcher's whole-wave rule (``split_count``), which already
  follows the config (its ``block_h``, ``block_k`` and blocks per SM); each candidate is timed with the splits the
  launcher gives it, and one split writes the output itself (``direct``), so a config is compiled as both kernels it
  may launch (the spec's ``variants``: the static report is the worse of the two).
* the decode selection is the fused ``index_topk`` kernel's paged variant (``page_size`` > 0, ``mode="range"``: the
  same builder and ``Config``), so its decode shapes are ``index_topk`` cases (:func:`cases`): ``seq_len`` is ``s_q``
  and ``seq_len_kv`` the keys a sequence holds (its pages times ``page_size``), FP8 keys in both key layouts (ours,
  one 132-byte row per key, and DeepGEMM's/vLLM's per-page layout).

Nothing here imports ``dsa`` (this room sits below it): the static parameters are written out, and the tests check
them against the launchers' ``static_params``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autotune.lookup.space import V4_MODELS, Case

__all__ = [
    "CONTEXT_PER_TOPK",
    "KERNEL",
    "V32_MLA_FP8",
    "cases",
    "model1_static",
    "paged_index_static",
    "screen",
]

KERNEL = "sparse_mla_decode"
CONTEXT_PER_TOPK = 4
"""Tokens per sequence in the runner's caches, per selected entry: the gathered rows lie scattered over a cache four
times the selection (V3.2: 8192 tokens, 5.4 MB a sequence in FP8)."""

V32_MLA_FP8: dict[str, Any] = {"heads": 128, "d_qk": 576, "d_v": 512, "d_rope": 64, "tile": 128, "kv_format": "fp8"}
"""V3.2's decode attention over FlashMLA's FP8 cache (656-byte rows: 512 e4m3, 4 float32 scales, 64 bf16)."""
_MODEL1_PAGE = 64
_MODEL1_VALUE_BYTES = 576  # 448 e4m3 + 64 bf16 RoPE values
_MODEL1_SCALE_GROUP_BYTES = 8  # 7 UE8M0 scales (tiles of 64) and a pad byte
_MODEL1_PAGE_ALIGN = 576  # FlashMLA pads each page to a multiple of 576 bytes
DECODE_BATCHES: tuple[int, ...] = (1, 8, 32, 64, 128)
DECODE_S_Q: tuple[int, ...] = (1, 2)
V32_TOPK = 2048
V32_INDEX = {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "range", "topk": V32_TOPK}
INDEX_PAGE = 64
INDEX_BATCHES: tuple[int, ...] = (1, 32, 128)
INDEX_CONTEXTS: tuple[int, ...] = (65536, 131072)
_SCALE_BYTES = 4


def model1_static(heads: int, page_size: int = _MODEL1_PAGE) -> dict[str, Any]:
    """The decode attention's static parameters for DeepSeek-V4 (512/512, 64 RoPE) over MODEL1 pages of
    ``page_size`` tokens in FlashMLA's padded pages."""
    used = page_size * (_MODEL1_VALUE_BYTES + _MODEL1_SCALE_GROUP_BYTES)
    return {
        "heads": heads, "d_qk": 512, "d_v": 512, "d_rope": 64, "tile": 64, "kv_format": "fp8_paged",
        "page_size": page_size, "page_bytes": -(-used // _MODEL1_PAGE_ALIGN) * _MODEL1_PAGE_ALIGN,
        "value_bytes": _MODEL1_VALUE_BYTES, "scale_group_bytes": _MODEL1_SCALE_GROUP_BYTES,
    }  # fmt: skip


def paged_index_static(key_layout: str, *, page_size: int = INDEX_PAGE, **index: Any) -> dict[str, Any]:
    """The paged (decode) ``index_topk`` kernel's static parameters for FP8 keys (default: V3.2's 64 heads x 128,
    top-2048): ``dsa.launch.index_topk.paged_static_params`` less its config fields. ``"rows"`` keys carry their
    float32 scale after their ``dim`` bytes (``scale_col``); ``"paged"`` pages hold their values, then their scales."""
    static = {**V32_INDEX, **index, "page_size": page_size}
    if key_layout == "rows":
        return {**static, "scale_col": static["dim"] // _SCALE_BYTES}
    return {**static, "scale_col": 0, "key_layout": key_layout}


def _decode_points(batches: tuple[int, ...], topk: int) -> tuple[dict[str, int], ...]:
    return tuple({"batch": b, "s_q": s, "topk": topk} for b in batches for s in DECODE_S_Q)


def cases(preset: str) -> dict[str, list[Case]]:
    """The decode cases of a built-in preset, by kernel (``index_topk``'s extend the preset's prefill ones).

    ``deepseek-v3.2``: the attention over FP8 rows at B 1-128, ``s_q`` 1 and 2, top-2048 (checked at B 2, s_q 2: many
    splits and the combine); the paged selection over 64K and 128K keys per sequence, B 1, 32 and 128, ``s_q`` 1 and
    2, both FP8 key layouts (checked over 8K keys). ``deepseek-v4``: the attention over MODEL1 pages for V4-Flash (64
    heads, top-512) and V4-Pro (128 heads, top-1024), the compressed CSA entries each query selects (the sliding
    window is a second source at run time, planned with the same config). ``tiny``: a 16-head, 128/64 FP8 attention
    (196-byte rows), the smallest widths the sm_90a kernel takes.
    """
    if preset == "deepseek-v3.2":
        attention = [Case(KERNEL, dict(V32_MLA_FP8), _decode_points(DECODE_BATCHES, V32_TOPK),
                          {"batch": 2, "s_q": 2, "topk": V32_TOPK})]  # fmt: skip
        points = tuple({"batch": b, "seq_len": s, "seq_len_kv": n}
                       for b in INDEX_BATCHES for s in DECODE_S_Q for n in INDEX_CONTEXTS)  # fmt: skip
        check = {"batch": 2, "seq_len": 2, "seq_len_kv": 8192}
        selection = [Case("index_topk", paged_index_static(layout), points, check) for layout in ("rows", "paged")]
        return {KERNEL: attention, "index_topk": selection}
    if preset == "deepseek-v4":
        return {
            KERNEL: [
                Case(KERNEL, model1_static(heads), _decode_points(DECODE_BATCHES, topk),
                     {"batch": 2, "s_q": 2, "topk": topk})
                for heads, topk in V4_MODELS
            ]  # fmt: skip
        }
    if preset == "tiny":
        static = {"heads": 16, "d_qk": 128, "d_v": 64, "d_rope": 64, "tile": 64, "kv_format": "fp8"}
        return {KERNEL: [Case(KERNEL, static, _decode_points((1, 4), 64), {"batch": 2, "s_q": 2, "topk": 64})]}
    return {}


def screen(static: Mapping[str, Any], config: Mapping[str, Any], target: Mapping[str, Any] | None) -> None:
    """Raise ``ValueError`` for a decode attention candidate the tuner need not compile (beyond ``check_config``):

    * an FP8-only field (``tl_kernels.sparse_mla_decode.FP8_ONLY_FIELDS``: the FP8 gather's prefetch, the two-CTA
      cluster that shares a step's dequantised rows) set on a bf16 cache: the launcher builds a bf16 source without it
      (its gather is a cp.async either way), so the candidate would repeat the one without;
    * a candidate no SM can hold one block of, by the kernel's shared memory estimate (``smem_bytes``: the forward's
      tiles plus the FP8 gather's row numbers and decoded scales, which ``check_config`` leaves out) and, on sm_90a,
      the registers of the build tier's resources table (``resources``; 255, the most, for a config it lacks).
    """
    from autotune.lookup import sku
    from tl_kernels import dsl
    from tl_kernels import sparse_mla_decode as kernels

    kv_format = static.get("kv_format", kernels.KV_FORMAT_BF16)
    fp8_only = [name for name in kernels.FP8_ONLY_FIELDS if config.get(name)]
    if fp8_only and kv_format not in kernels.FP8_FORMATS:
        raise ValueError(f"{fp8_only} mean nothing to a bf16 cache (the launcher builds the candidate without them)")
    target = target or dsl.HOPPER_TARGET
    if dsl.is_cpu(target):
        return
    cfg = kernels.Config(**config)
    smem = kernels.smem_bytes({**static, "target": target}, cfg)
    registers = kernels.resources(kv_format, cfg)[0] if dsl.is_hopper(target) else kernels.MAX_REGISTERS
    limit = dsl.arch_of(target).smem_bytes
    if smem > limit or not sku.blocks_per_sm(registers=registers, threads=cfg.threads, smem_bytes=smem):
        raise ValueError(
            f"no SM holds a block: {smem} bytes of shared memory (limit {limit}), {registers} registers x "
            f"{cfg.threads} threads"
        )

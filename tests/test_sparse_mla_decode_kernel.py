"""Sparse MLA decode kernels (``tl_kernels.sparse_mla_decode`` through ``dsa.launch.sparse_mla_decode`` and
``dsa.ops.sparse_mla_decode``) against ``dsa.reference.sparse_mla_decode``.

Outputs are NaN-poisoned before every launch (tests/conftest.py), so an element or split the kernels forgot fails.
Each problem holds a paged cache (bf16 rows, or FlashMLA's FP8 bytes, dequantised inside the kernel), slot indices of
every pattern of ``tests.strategies`` (in the slot space: ``-1``, negatives, out-of-range slots and duplicates
included), ``topk_length`` per sequence or per query, a sink (finite, ±inf), an extra source in either format, and
NaN/±inf in every cache row that no valid entry selects (an unwritten slot may hold anything).

Tiers:
- ``cpu_kernel``: the C-target builds over random problems and split counts 1-4 (the combine merges them), s_q 1-4,
  and the V3.2 FP8 row (656 bytes: 512 e4m3 values, 4 scales, 64 bf16 RoPE values); one split writing the output
  itself and the FP8 prefetch, each bit for bit against the path it replaces.
- ``build``: the sm_90a builds at V3.2 widths (128 heads, 576/512) for both cache formats (split and direct) and the
  combine, and the default build for MODEL1 pages (DeepSeek-V4: 128 heads, 512/512, pages of 64): wgmma, no spills,
  shared memory within the estimate and equal to the launcher's table, a cp.async gather for bf16 rows, int64 slot
  addressing; the FP8 cluster config (two CTAs per token share each step's dequantised rows) gathers half a step per
  block and stores it into the peer's tile. (The MODEL1 kernel's C-target tier is in tests/test_compat_model1.py.)
- ``gpu``: V3.2 shapes (topk 2048, B = 1 and 8, s_q 1 and 2, both formats, automatic splits) and DeepSeek-V4's over
  MODEL1 pages (a 128-entry window and 512 selected entries), and the FP8 cluster config, against the reference.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsa import cache, ops, reference, testing
from dsa.launch import common
from dsa.launch import sparse_mla_decode as launch
from dsa.testing import assert_close
from tests import strategies, support
from tl_kernels import build as tl_build
from tl_kernels import decode_cluster_steps as cluster_steps
from tl_kernels import dsl
from tl_kernels import sparse_mla_decode as kernels

# The C-target widths: a 40-wide latent row of 32 NoPE + 8 RoPE values (FP8 tile 32, 52 bytes per token), 24-wide
# values; 5 heads, so no head block is full. Each (heads, format) pair is one compile (~10-15 s).
CPU_HEADS, CPU_D_QK, CPU_D_V, CPU_D_ROPE = 5, 40, 24, 8
V32 = {"heads": 128, "d_qk": 576, "d_v": 512, "d_rope": 64}
V32_TOPK = 2048
FORMATS = ("bf16", "fp8")

# out is rounded to bf16 once (relative step 2^-8) after a float32 combine of float32 partials, as the reference
# rounds once: the scale-sensitive difference stays at bf16 rounding (~4e-6); a 1 % scale error gives ~5e-5.
OUT_TOL = {"atol": 1e-2, "rtol": 1e-2, "max_diff": 2e-5}
LSE_TOL = {"atol": 1e-4, "rtol": 1e-4}
GPU_OUT_TOL = {"atol": 2e-2, "rtol": 2e-2}
GPU_LSE_TOL = {"atol": 2e-3, "rtol": 1e-3}

# Every byte 0xFF: an e4m3 NaN, a NaN scale and a NaN bf16 RoPE value.
_FP8_POISON_BYTE = 0xFF


def _new_cache(fmt: str, batch: int, max_len: int, d_qk: int, d_rope: int, page_size: int, device: Any) -> Any:
    """``fmt``: ``"bf16"``, ``"fp8"`` (the row-per-token layout of the width) or ``"model1"`` (MODEL1's pages)."""
    if fmt == "model1":
        kind: dict[str, Any] = {"dtype": "fp8", "layout": cache.MODEL1_FP8_LAYOUT}
    else:
        kind = {"dtype": "fp8" if fmt == "fp8" else torch.bfloat16, "d_rope": d_rope}
    return cache.PagedKVCache(batch, max_len, d_qk, page_size=page_size, device=device, **kind)


def cache_arg(kv_cache: cache.PagedKVCache) -> torch.Tensor:
    """What sparse_mla_decode takes: the pages, MODEL1's in FlashMLA's view ``[num_pages, page_size, 584]``."""
    layout = kv_cache.layout
    if layout is None or not layout.scales_after_values:
        return kv_cache.pages
    return cache.flash_mla_kv_view(kv_cache.pages, layout, kv_cache.page_size).squeeze(2)


def poison_model1_pages(pages: torch.Tensor, page_size: int, referenced: torch.Tensor) -> None:
    """0xFF (e4m3 NaN, bf16 NaN, UE8M0 NaN) in place in every byte of MODEL1 ``pages [num_pages, page_bytes]`` that
    no slot marked in ``referenced [num_slots]`` owns: other tokens' values and scale groups, and the page padding."""
    layout = cache.MODEL1_FP8_LAYOUT
    values, scales = cache.kv_page_sections(pages, layout, page_size)
    unused = (~referenced).nonzero().squeeze(1)
    for section in (values, scales):  # indexed as [page, offset]: the sections are views of the pages
        section[unused // page_size, unused % page_size] = _FP8_POISON_BYTE
    pages[:, page_size * layout.bytes_per_token :] = _FP8_POISON_BYTE


def _filled_cache(
    fmt: str, seed: int, batch: int, lengths: list[int], d_qk: int, d_rope: int, page_size: int, device: Any = "cpu"
) -> cache.PagedKVCache:
    """A cache with ``lengths[b]`` random tokens per sequence, its block table shuffled (pages out of order)."""
    kv_cache = _new_cache(fmt, batch, max(max(lengths), 1), d_qk, d_rope, page_size, device)
    g = testing.generator(seed)
    order = torch.randperm(kv_cache.block_table.numel(), generator=g).to(torch.int32)
    kv_cache.block_table = order.view_as(kv_cache.block_table).to(device)
    rows = torch.randn(batch, max(max(lengths), 1), d_qk, generator=g).to(torch.bfloat16).to(device)
    kv_cache.append(rows, torch.tensor(lengths, dtype=torch.int64))
    return kv_cache


def _poison_unreferenced(kv_cache: cache.PagedKVCache, indices: torch.Tensor, lengths: torch.Tensor) -> None:
    """NaN/±inf (bf16) or 0xFF bytes (FP8) in every slot that no valid entry selects, in place."""
    batch, s_q, width = indices.shape
    per_query = lengths.view(batch, 1).expand(batch, s_q) if lengths.dim() == 1 else lengths
    referenced = testing.index_mask(indices.reshape(1, batch * s_q, width), kv_cache.num_slots,
                                    per_query.reshape(1, batch * s_q)).any(dim=1)[0]  # fmt: skip
    if kv_cache.layout is not None and kv_cache.layout.scales_after_values:
        poison_model1_pages(kv_cache.pages, kv_cache.page_size, referenced)
        return
    flat = kv_cache.pages.view(kv_cache.num_slots, -1)
    if kv_cache.layout is not None:
        flat[~referenced] = _FP8_POISON_BYTE
        return
    poisoned, _ = testing.poison_unreferenced_rows(flat.unsqueeze(0), indices.reshape(1, batch * s_q, width),
                                                   per_query.reshape(1, batch * s_q))  # fmt: skip
    flat.copy_(poisoned[0])


def make_problem(
    *,
    seed: int,
    heads: int = CPU_HEADS,
    d_qk: int = CPU_D_QK,
    d_v: int = CPU_D_V,
    d_rope: int = CPU_D_ROPE,
    fmt: str = "bf16",
    batch: int = 2,
    s_q: int = 1,
    context: int = 60,
    topk: int = 40,
    page_size: int = 16,
    kind: str = "irregular",
    length_kind: str | None = None,
    sink: str | None = None,
    extra_fmt: str | None = None,
    extra_topk: int = 8,
    extra_page_size: int | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """The keyword arguments of one ``sparse_mla_decode`` call (plus ``kv_cache`` objects for poisoning)."""
    g = testing.generator(seed)
    lengths = torch.randint(1, context + 1, (batch,), generator=g).tolist()
    main = _filled_cache(fmt, seed + 1, batch, lengths, d_qk, d_rope, page_size, device)
    indices = testing.make_indices(kind, seed + 2, batch, s_q, main.num_slots, topk).to(device)
    if length_kind == "per_sequence":
        topk_length = torch.randint(-1, topk + 2, (batch,), generator=g).to(torch.int32).to(device)
    elif length_kind == "per_query":
        topk_length = testing.make_topk_length(seed + 3, batch, s_q, topk).to(device)
    else:
        topk_length = None
    args: dict[str, Any] = {
        "q": (torch.randn(batch, s_q, heads, d_qk, generator=g) * 0.5).to(torch.bfloat16).to(device),
        "kv_cache": cache_arg(main),
        "indices": indices,
        "sm_scale": d_qk**-0.5,
        "d_v": d_v,
        "topk_length": topk_length,
        "d_rope": d_rope,
    }
    full = torch.full((batch,), topk, dtype=torch.int32, device=device)
    _poison_unreferenced(main, indices, full if topk_length is None else topk_length)
    if sink is not None:
        values = torch.randn(heads, generator=g)
        if sink == "extremes":
            values[0::3], values[1::3] = math.inf, -math.inf
        args["attn_sink"] = values.to(device)
    if extra_fmt is not None:
        window = _filled_cache(extra_fmt, seed + 4, batch, lengths, d_qk, d_rope, extra_page_size or page_size // 2 or 1,
                               device)  # fmt: skip
        extra = testing.make_indices("irregular", seed + 5, batch, s_q, window.num_slots, extra_topk).to(device)
        args["extra_kv_cache"], args["extra_indices"] = cache_arg(window), extra
        if length_kind is not None:
            args["extra_topk_length"] = testing.make_topk_length(seed + 6, batch, s_q, extra_topk).to(device)
        extra_len = args.get("extra_topk_length", torch.full((batch,), extra_topk, dtype=torch.int32, device=device))
        _poison_unreferenced(window, extra, extra_len)
    return args


def _reference_args(args: dict[str, Any]) -> dict[str, Any]:
    """The same call for the reference in float32 (plain caches widened; FP8 bytes as they are), on the CPU."""
    out = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out["q"] = out["q"].float()
    for name in ("kv_cache", "extra_kv_cache"):
        if name in out and out[name].dtype == torch.bfloat16:
            out[name] = out[name].float()
    return out


def check(args: dict[str, Any], out: torch.Tensor, lse: torch.Tensor, out_tol: dict, lse_tol: dict) -> None:
    batch, s_q, heads, _ = args["q"].shape
    assert out.shape == (batch, s_q, heads, args["d_v"]) and out.dtype == torch.bfloat16
    assert lse.shape == (batch, s_q, heads) and lse.dtype == torch.float32
    ref = _reference_args(args)
    want_out, want_lse = reference.sparse_mla_decode(ref.pop("q"), ref.pop("kv_cache"), ref.pop("indices"), **ref)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the kernels' outputs"
    assert_close(lse, want_lse, name="lse", **lse_tol)
    assert_close(out.float(), want_out.float(), name="out", **out_tol)
    assert (out.float()[torch.isneginf(want_lse)] == 0).all(), "a query with nothing valid must have out == 0"


def run(args: dict[str, Any], **launch_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    call = {k: v for k, v in args.items() if k not in ("q", "kv_cache", "indices")}
    return launch.sparse_mla_decode(args["q"], args["kv_cache"], args["indices"], **call, **launch_kwargs)


# --------------------------------------------------------------------------------------------- pure Python checks


def test_fp8_views_match_the_cache_layout() -> None:
    """The kernel's three views of an FP8 row land on ``dsa.cache.FP8Layout``'s bytes (V3.2 and the tiny row)."""
    for d_qk, d_rope in ((576, 64), (40, 8)):
        layout = cache.FP8Layout.for_width(d_qk, d_rope)
        row_bytes, scale_col, rope_col = kernels.fp8_views(d_qk, d_rope, layout.tile)
        assert row_bytes == layout.bytes_per_token
        assert scale_col * kernels.SCALE_BYTES == layout.scale_offset
        assert rope_col * kernels.ROPE_BYTES == layout.rope_offset


def test_model1_pages_are_read_in_place_with_the_layouts_numbers() -> None:
    """The paged-FP8 kernel's static parameters are ``dsa.kv_format.MODEL1_FP8_LAYOUT``'s (576 value bytes, 8-byte
    scale groups, tiles of 64, pages padded to 576 bytes); FlashMLA's view of the pages (page stride past the rows)
    is read in place; a view whose pages the kernel cannot address in place (rows not back to back, a misaligned
    start, pages of ``page_size * 584`` bytes: not whole 576-byte value rows) is copied."""
    layout = cache.MODEL1_FP8_LAYOUT
    for page_size in (3, 16, 64):
        static = launch.static_params(heads=4, d_qk=512, d_v=512, fp8_layout=layout, page_size=page_size)
        assert static["kv_format"] == kernels.KV_FORMAT_FP8_PAGED and static["page_bytes"] == layout.page_bytes(page_size)
        assert (static["value_bytes"], static["scale_group_bytes"], static["tile"]) == (576, 8, 64)
        kernels.check_config({**static, "target": dsl.CPU_TARGET}, kernels.Config())
        blob = torch.zeros(5, layout.page_bytes(page_size), dtype=torch.uint8)
        view = cache.flash_mla_kv_view(blob, layout, page_size).squeeze(2)
        assert launch.page_stride(view, layout) == layout.page_bytes(page_size)
        assert launch.page_stride(view.transpose(0, 1).contiguous().transpose(0, 1), layout) is None
        assert launch.page_stride(view.contiguous(), layout) is None
        shifted = torch.zeros(blob.numel() + 1, dtype=torch.uint8)[1:].view(blob.shape)
        assert launch.page_stride(cache.flash_mla_kv_view(shifted, layout, page_size).squeeze(2), layout) is None
    with pytest.raises(ValueError, match="paged FP8 cache needs"):
        kernels.check_config({**static, "page_bytes": 64 * 584, "target": dsl.CPU_TARGET}, kernels.Config())


def test_split_counts_fill_the_gpu_without_tiny_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 132-SM GPU with the default config's one block per SM (the build tier's registers and shared memory): one
    query of 128 heads at topk 2048 takes 32 splits (the floor of 2 steps of 32 rows each); B = 32 takes 2 (one wave),
    not 5 (2.4 waves); B = 128 and more none; the CPU never splits."""

    class _Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    cuda = torch.device("cuda")
    config = kernels.Config()
    for fmt in FORMATS:
        count = lambda batch, s_q=1, topk=2048, device=cuda: launch.num_splits(  # noqa: E731
            batch=batch, s_q=s_q, heads=128, topk=topk, config=config, device=device, kv_format_name=fmt
        )
        assert count(1) == 32
        assert count(1, topk=100) == 2
        assert count(32) == 2
        assert count(128) == 1 and count(256, s_q=2) == 1
        assert count(1, device=torch.device("cpu")) == 1


def _waves(blocks: int, slots: int) -> int:
    return -(-blocks // slots)


@given(batch=st.integers(1, 300), s_q=st.integers(1, 4), heads=st.sampled_from([16, 64, 128]),
       topk=st.integers(1, 4096), sms=st.sampled_from([78, 114, 132]), per_sm=st.integers(1, 3))  # fmt: skip
def test_split_rule_picks_the_fewest_splits_with_the_least_wave_time(
    batch: int, s_q: int, heads: int, topk: int, sms: int, per_sm: int
) -> None:
    """Against every split count the rule may pick: waves of ``batch * s_q * head_blocks * Z`` blocks on ``sms *
    per_sm`` slots, each ``ceil(steps / Z)`` steps plus the split overhead long; no fewer splits does as well, no
    other does better, and no split is shorter than the floor."""
    config = kernels.Config()
    z = launch.split_count(batch=batch, s_q=s_q, heads=heads, topk=topk, config=config, sms=sms,
                           blocks_per_sm=per_sm)  # fmt: skip
    blocks = batch * s_q * -(-heads // config.block_h)
    steps = -(-topk // config.block_k)
    most = max(1, steps // launch.MIN_STEPS_PER_SPLIT)
    assert 1 <= z <= most

    def cost(n: int) -> int:
        return _waves(blocks * n, sms * per_sm) * (-(-steps // n) + launch.SPLIT_OVERHEAD_STEPS)

    assert all(cost(z) <= cost(n) for n in range(1, most + 1))
    assert all(cost(n) > cost(z) for n in range(1, z))


def test_widths_the_cuda_kernels_cannot_take_get_no_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """On sm_90a the kernels take 64-aligned widths only: the tiny config's 40-wide rows get no plan (the op then runs
    the reference, so one model serves everywhere), V3.2's 576/512 do, for both cache formats."""
    monkeypatch.setattr(common, "target_for", lambda device: dsl.HOPPER_TARGET)
    # Plans are cached per process: the faked target must neither see nor leave a plan of the real one.
    common.clear_plans()
    monkeypatch.setattr(common, "get_kernel", lambda builder, target, **params: (builder, params))  # no compile
    try:
        tiny_q = torch.zeros(1, 1, 4, CPU_D_QK, dtype=torch.bfloat16)
        tiny_cache = torch.zeros(1, 4, CPU_D_QK, dtype=torch.bfloat16)
        assert launch.plan(tiny_q, [tiny_cache], [8], d_v=CPU_D_V, d_rope=CPU_D_ROPE, has_sink=False) is None
        v32_q = torch.zeros(1, 1, 128, V32["d_qk"], dtype=torch.bfloat16)
        fp8_cache = torch.zeros(1, 4, cache.V32_FP8_LAYOUT.bytes_per_token, dtype=torch.uint8)
        caches = [fp8_cache, torch.zeros(1, 4, V32["d_qk"], dtype=torch.bfloat16)]
        planned = launch.plan(v32_q, caches, [2048, 128], d_v=V32["d_v"], d_rope=64, has_sink=True)
        assert planned is not None and planned.layouts == (cache.V32_FP8_LAYOUT, None)
    finally:
        common.clear_plans()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices": torch.zeros(2, 1, 4, dtype=torch.int64)}, "indices must have dtype int32"),
        ({"topk_length": torch.zeros(3, dtype=torch.int32)}, r"topk_length must have shape \[B\] = \[2\]"),
        ({"kv_cache": torch.zeros(4, 16, 52, dtype=torch.int16)}, "kv_cache must have q's dtype"),
        ({"kv_cache": torch.zeros(4, 16, 53, dtype=torch.uint8)}, "kv_cache holds 53-byte rows; the FP8 layout"),
        ({"extra_indices": torch.zeros(2, 1, 3, dtype=torch.int32)}, "extra_kv_cache and extra_indices go together"),
        ({"d_v": 41}, "d_v must be <= d_qk = 40"),
        ({"attn_sink": torch.zeros(4)}, r"attn_sink must have shape \[H\] = \[5\]"),
        ({"d_rope": 40}, "kv_cache holds FP8 bytes, but d_rope leaves no FP8 layout"),
    ],
)
def test_bad_input_names_the_argument(change: dict[str, Any], message: str) -> None:
    args = make_problem(seed=1, fmt="fp8", batch=2, s_q=1, context=20, topk=4)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=f"^sparse_mla_decode: {message}"):
        ops.sparse_mla_decode(args.pop("q"), args.pop("kv_cache"), args.pop("indices"), **args)


# ------------------------------------------------------------------------------------------------------- CPU tier


@pytest.mark.cpu_kernel
@given(
    fmt=st.sampled_from(FORMATS),
    **strategies.sizes(batch=3, s_q=4, context=90, topk=120),
    page_size=st.sampled_from([1, 16, 64]),
    kind=st.sampled_from(strategies.INDEX_PATTERNS),
    length_kind=st.sampled_from([None, "per_sequence", "per_query"]),
    sink=st.sampled_from([None, "random", "extremes"]),
    extra_fmt=st.sampled_from([None, *FORMATS]),
    splits=st.integers(1, 4),
    seed=strategies.SEEDS,
)
@example(fmt="fp8", batch=2, s_q=2, context=80, topk=100, page_size=16, kind="irregular", length_kind="per_query",
         sink="random", extra_fmt="bf16", splits=3, seed=1)  # fmt: skip
@example(fmt="bf16", batch=1, s_q=4, context=50, topk=70, page_size=64, kind="all_invalid", length_kind=None,
         sink="extremes", extra_fmt=None, splits=4, seed=2)  # fmt: skip
@example(fmt="fp8", batch=3, s_q=1, context=90, topk=97, page_size=1, kind="duplicates", length_kind="per_sequence",
         sink=None, extra_fmt="fp8", splits=2, seed=3)  # fmt: skip
def test_cpu_matches_reference(
    fmt: str, batch: int, s_q: int, context: int, topk: int, page_size: int, kind: str, length_kind: str | None,
    sink: str | None, extra_fmt: str | None, splits: int, seed: int,
) -> None:
    """The C-target kernels match the reference: every slot pattern, both cache formats (the extra source's on its
    own), lengths per sequence and per query, sinks, 1-4 splits, poisoned unreferenced slots."""
    args = make_problem(
        seed=seed, fmt=fmt, batch=batch, s_q=s_q, context=context, topk=topk, page_size=page_size, kind=kind,
        length_kind=length_kind, sink=sink, extra_fmt=extra_fmt,
    )  # fmt: skip
    out, lse = run(args, splits=splits)
    check(args, out, lse, OUT_TOL, LSE_TOL)


_E4M3_NAN = 0x7F
_NAN_COLUMN = 2
"""A value column (NoPE in an FP8 row): a NaN there reaches every score and the value."""
_KEY_COLUMN = CPU_D_QK - CPU_D_ROPE + 1
"""A key-only column (past ``d_v``; a bf16 RoPE value in an FP8 row): an infinity there reaches the scores only."""
_SPLITS = 3
_SECOND_SPLIT_ENTRY = 70
"""With 100-entry rows, 32-row steps (the C target's default ``block_k``) and 3 splits, split 1 holds entries 64-99
(split 0 holds 0-63, split 2 none): a poisoned entry here leaves split 0 finite and split 2 empty."""


def _poison_slot(pages: torch.Tensor, slot: int, column: int, value: float) -> torch.Tensor:
    """A copy of a cache ``[num_pages, page_size, row]`` with ``value`` in column ``column`` of ``slot``: the element
    itself in bf16 rows; in FP8 rows NaN as an e4m3 NaN byte of a NoPE column, an infinity as a bf16 RoPE value."""
    out = pages.clone()
    row = out.view(-1, out.shape[-1])[slot]
    if out.dtype == torch.bfloat16:
        row[column] = value
        return out
    layout = cache.FP8Layout.for_width(CPU_D_QK, CPU_D_ROPE)
    if math.isnan(value):
        assert column < layout.d_nope
        row.view(torch.uint8)[column] = _E4M3_NAN
    else:
        assert column >= layout.d_nope
        row.view(torch.uint8)[layout.rope_offset :].view(torch.bfloat16)[column - layout.d_nope] = value
    return out


def _signed_key_column(q: torch.Tensor) -> torch.Tensor:
    """``q`` with the key column of query (0, 0) positive on even heads and negative on odd ones: a ``+inf`` there
    makes even heads' score ``+inf`` (lse ``+inf``, out NaN) and odd heads' ``-inf`` (the entry drops out)."""
    q = q.clone()
    q[0, 0, :, _KEY_COLUMN] = q[0, 0, :, _KEY_COLUMN].abs() + 0.5
    q[0, 0, 1::2, _KEY_COLUMN] = -q[0, 0, 1::2, _KEY_COLUMN]
    return q


def _decode_non_finite_case(fmt: str, case: str) -> tuple[dict[str, Any], Any]:
    """One decode problem (2 sequences x 2 queries, 100 entries in 3 splits, an extra bf16 source, random sinks, the
    last query's rows empty) with the non-finite values of ``case``, and a predicate on the reference's ``(out,
    lse)`` that says the case produced what it is about."""
    args = make_problem(seed=51, fmt=fmt, batch=2, s_q=2, context=120, topk=100, kind="regular", sink="random",
                        extra_fmt="bf16")  # fmt: skip
    args["indices"], args["extra_indices"] = args["indices"].clone(), args["extra_indices"].clone()
    args["indices"][-1, -1], args["extra_indices"][-1, -1] = -1, -1
    slot = int(args["indices"][0, 0, _SECOND_SPLIT_ENTRY])
    assert 0 <= slot < args["kv_cache"].shape[0] * args["kv_cache"].shape[1]
    h = CPU_HEADS - 1
    if case == "nan_slot_in_one_split":
        args["kv_cache"] = _poison_slot(args["kv_cache"], slot, _NAN_COLUMN, math.nan)
        expect = lambda out, lse: bool(torch.isnan(lse[0, 0]).all() and torch.isnan(out[0, 0]).all())  # noqa: E731
    elif case == "inf_key_in_one_split":
        args["kv_cache"] = _poison_slot(args["kv_cache"], slot, _KEY_COLUMN, math.inf)
        args["q"] = _signed_key_column(args["q"])
        expect = lambda out, lse: bool(  # noqa: E731
            torch.isposinf(lse[0, 0, 0::2]).all() and torch.isnan(out[0, 0, 0::2]).all()
            and torch.isfinite(lse[0, 0, 1::2]).all() and torch.isfinite(out[0, 0, 1::2]).all()
        )
    elif case == "inf_key_in_extra_source":
        extra_slot = int(args["extra_indices"][0, 0, 0])
        args["extra_kv_cache"] = _poison_slot(args["extra_kv_cache"], extra_slot, _KEY_COLUMN, math.inf)
        args["q"] = _signed_key_column(args["q"])
        expect = lambda out, lse: bool(torch.isposinf(lse[0, 0, 0::2]).all() and torch.isfinite(lse[0, 0, 1::2]).all())  # noqa: E731
    elif case == "nan_query":
        args["q"] = args["q"].clone()
        args["q"][0, 0, h, 3] = math.nan
        expect = lambda out, lse: bool(torch.isnan(lse[0, 0, h]) and torch.isfinite(lse[0, 0, :h]).all())  # noqa: E731
    elif case == "nan_sink":
        args["attn_sink"] = args["attn_sink"].clone()
        args["attn_sink"][h] = math.nan
        expect = lambda out, lse: bool(  # noqa: E731
            torch.isnan(out[:, :, h]).all() and torch.isneginf(lse[-1, -1]).all() and not torch.isnan(lse).any()
        )
    else:
        raise AssertionError(case)
    return args, expect


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "case", ["nan_slot_in_one_split", "inf_key_in_one_split", "inf_key_in_extra_source", "nan_query", "nan_sink"]
)
def test_cpu_non_finite_slots_queries_and_sinks_give_the_references_nan_and_inf(fmt: str, case: str) -> None:
    """NaN/+inf in a referenced slot of one split (the others finite or empty), in the extra source, in ``q`` or in
    the sink: out and lse hold NaN and infinities exactly where the reference (one softmax over every entry) does,
    the finite rest within tolerance.

    Issue 18: before the fix a split that saw a NaN or +inf score wrote lse -inf, which the combine weighs 0, so the
    output was finite where the reference's is NaN; the combine turned a NaN sink into out = 0."""
    args, expect = _decode_non_finite_case(fmt, case)
    out, lse = run(args, splits=_SPLITS)
    ref = _reference_args(args)
    want_out, want_lse = reference.sparse_mla_decode(ref.pop("q"), ref.pop("kv_cache"), ref.pop("indices"), **ref)
    assert expect(want_out.float(), want_lse), f"the problem does not exercise {case}"
    assert_close(lse, want_lse, name="lse", **LSE_TOL)
    assert_close(out.float(), want_out.float(), name="out", **OUT_TOL)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [None, "nan_slot_in_one_split", "inf_key_in_one_split", "nan_query", "nan_sink"])
def test_cpu_one_split_writes_the_output_itself_as_the_combine_would(fmt: str, case: str | None) -> None:
    """One source in one split: the plan has no combine and the attention kernel writes bf16 ``out`` and ``lse``
    (sink included) itself; they equal the float32-partials-and-combine path's (``direct=False``) bit for bit, NaN
    and infinities included, and the reference's."""
    if case is None:
        args = make_problem(seed=12, fmt=fmt, batch=2, s_q=4, context=90, topk=70, length_kind="per_query",
                            sink="extremes")  # fmt: skip
    else:
        args, _ = _decode_non_finite_case(fmt, case)
        for name in ("extra_kv_cache", "extra_indices", "extra_topk_length"):
            args.pop(name, None)
    call = {k: v for k, v in args.items() if k not in ("q", "kv_cache", "indices")}
    planned = launch.plan(args["q"], [args["kv_cache"]], [args["indices"].shape[-1]], d_v=args["d_v"],
                          d_rope=args["d_rope"], has_sink="attn_sink" in args)  # fmt: skip
    assert planned is not None and planned.direct and planned.combine is None and planned.splits == (1,)
    out, lse = run(args)
    want_out, want_lse = run(args, direct=False)
    assert torch.equal(lse.isnan(), want_lse.isnan()) and torch.equal(out.isnan(), want_out.isnan())
    assert torch.equal(lse.nan_to_num(), want_lse.nan_to_num()) and torch.equal(out.nan_to_num(), want_out.nan_to_num())
    ref = _reference_args(args)
    ref_out, ref_lse = reference.sparse_mla_decode(ref.pop("q"), ref.pop("kv_cache"), ref.pop("indices"), **ref)
    assert_close(lse, ref_lse, name="lse", **LSE_TOL)
    assert_close(out.float(), ref_out.float(), name="out", **OUT_TOL)
    with pytest.raises(ValueError, match="direct output needs one source and one split"):
        launch.sparse_mla_decode(args["q"], args["kv_cache"], args["indices"], **call, splits=2, direct=True)


@pytest.mark.cpu_kernel
def test_cpu_fp8_prefetch_matches_the_plain_gather() -> None:
    """The FP8 prefetch (step i+1's bytes loaded before step i's GEMMs, two row buffers) gives the plain gather's
    output bit for bit, and the reference's: one split (the direct kernel; the prefetch is the same code whatever
    writes the output, and each CPU compile costs ~20 s of CI), s_q 4, per-query lengths that end rows mid-step,
    duplicates and invalid slots (poisoned bytes never read), a sink."""
    args = make_problem(seed=13, fmt="fp8", batch=2, s_q=4, context=200, topk=150, kind="duplicates",
                        length_kind="per_query", sink="random")  # fmt: skip
    out, lse = run(args, splits=1, config=kernels.Config(prefetch=True))
    plain_out, plain_lse = run(args, splits=1, config=kernels.Config(prefetch=False))
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    check(args, out, lse, OUT_TOL, LSE_TOL)


@pytest.mark.cpu_kernel
def test_cpu_splits_change_nothing_but_rounding() -> None:
    """1, 2, 3 and 7 splits of 200-entry rows give the same output (float32 partials: only the combine's sums move)."""
    args = make_problem(seed=7, fmt="fp8", batch=2, s_q=3, context=250, topk=200, length_kind="per_query", sink="random")
    outs = [run(args, splits=splits) for splits in (1, 2, 3, 7)]
    for out, lse in outs[1:]:
        assert_close(lse, outs[0][1], name="lse", atol=1e-5, rtol=1e-5)
        assert_close(out.float(), outs[0][0].float(), name="out", atol=8e-3, rtol=8e-3)
    check(args, *outs[-1], OUT_TOL, LSE_TOL)


@pytest.mark.cpu_kernel
def test_cpu_v32_fp8_row() -> None:
    """The V3.2 FP8 row (656 bytes, tile 128) and widths 576/512 with 2 heads, 3 splits, an extra bf16 source."""
    args = make_problem(
        seed=8, fmt="fp8", heads=2, d_qk=V32["d_qk"], d_v=V32["d_v"], d_rope=V32["d_rope"], batch=1, s_q=2,
        context=300, topk=150, page_size=64, length_kind="per_query", sink="random", extra_fmt="bf16",
    )  # fmt: skip
    assert args["kv_cache"].shape[-1] == 656
    out, lse = run(args, splits=3)
    check(args, out, lse, OUT_TOL, LSE_TOL)


@pytest.mark.cpu_kernel
def test_cpu_op_dispatches_to_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ops.sparse_mla_decode`` with ``DSA_BACKEND=tilelang`` runs the launcher (a spy counts the calls) and matches
    the reference."""
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    calls = []
    real = launch.sparse_mla_decode
    monkeypatch.setattr(launch, "sparse_mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = make_problem(seed=9, fmt="bf16", batch=2, s_q=2, context=40, topk=30, sink="random", extra_fmt="fp8")
    call = dict(args)
    out, lse = ops.sparse_mla_decode(call.pop("q"), call.pop("kv_cache"), call.pop("indices"), **call)
    assert calls == [1]
    check(args, out, lse, OUT_TOL, LSE_TOL)


# ------------------------------------------------------------------------------------------------------- build tier

_V32_BF16 = launch.static_params(heads=128, d_qk=576, d_v=512, fp8_layout=None)
_V32_FP8 = launch.static_params(heads=128, d_qk=576, d_v=512, fp8_layout=cache.V32_FP8_LAYOUT)
V32_BUILDS: tuple[tuple[Any, dict[str, Any]], ...] = (
    (kernels.build, _V32_BF16),
    (kernels.build, _V32_FP8),
    (kernels.build_combine, {"heads": 128, "d_v": 512, "has_sink": True}),
    # One source in one split: the attention kernel writes out and lse itself.
    (kernels.build, {**_V32_BF16, "direct": True}),
    # The FP8 default on sm_90a: the next step's bytes prefetched into registers (split and direct).
    (kernels.build, {**_V32_FP8, "prefetch": True}),
    (kernels.build, {**_V32_FP8, "prefetch": True, "direct": True}),
    # The two head blocks of a token as a two-CTA cluster sharing each step's dequantised rows (not the default).
    (kernels.build, {**_V32_FP8, "prefetch": True, "cluster": True}),
)
_MODEL1 = launch.static_params(heads=128, d_qk=512, d_v=512, fp8_layout=cache.MODEL1_FP8_LAYOUT, page_size=64)
MODEL1_BUILDS: tuple[tuple[Any, dict[str, Any]], ...] = (
    # DeepSeek-V4's MODEL1 pages (FlashMLA's compressed-cache pages of 64) in the sm_90a default config (prefetch).
    (kernels.build, {**_MODEL1, "prefetch": True}),
)
BUILDS = V32_BUILDS + MODEL1_BUILDS


hopper_prebuilt = support.prebuilt_fixture(
    lambda: list(BUILDS),
    "The V3.2 and MODEL1 builds compiled in parallel first: the build tier's, which are also the GPU tier's kernels.",
)


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(
    "case",
    range(len(BUILDS)),
    ids=[
        "bf16", "fp8", "combine", "bf16-direct", "fp8-prefetch", "fp8-prefetch-direct", "fp8-prefetch-cluster",
        "model1-prefetch",
    ],  # fmt: skip
)
def test_hopper_build_is_clean(case: int) -> None:
    """At V3.2 widths and for MODEL1 pages: wgmma for both GEMMs, no spills, shared memory within the estimate; the
    bf16 gather is a predicated cp.async; slot addresses are int64; the FP8 prefetch loads 16 bytes at a time."""
    builder, params = BUILDS[case]
    kernel, report = support.hopper_build(f"sparse_mla_decode {case}", builder, **params)
    source = kernel.get_kernel_source()
    support.assert_wide_addressing(source)
    if builder is kernels.build_combine:
        assert report.spill_bytes == 0, report.ptxas_log
        return
    assert not report.problems(mma=tl_build.MMA_WGMMA), report.problems(mma=tl_build.MMA_WGMMA)
    config = kernels.Config(prefetch=params.get("prefetch", False), cluster=params.get("cluster", False))
    assert report.smem_bytes <= kernels.smem_bytes({**params, "target": dsl.HOPPER_TARGET}, config)
    # The launcher's split rule and the cost model read the split kernels' figures instead of compiling.
    if not params.get("direct"):
        assert kernels.resources(params["kv_format"], config) == (report.registers, report.smem_bytes)
    if params["kv_format"] == kernels.KV_FORMAT_BF16:
        assert "cp_async" in source, "the bf16 gather is not asynchronous"
    elif params["kv_format"] == kernels.KV_FORMAT_FP8:
        assert "__tl_cvt_fp8x2_to_float2" in source, "the FP8 gather does not convert pairs"
    if params.get("prefetch"):
        # MODEL1's 448 values of 32 rows are 56 bytes per thread: 8-byte vectors.
        vector = "fp8_e4_8_t" if params["kv_format"] == kernels.KV_FORMAT_FP8_PAGED else "fp8_e4_16_t"
        assert vector in source, f"the prefetched FP8 values are not loaded as {vector}"


_CLUSTER_CASE = BUILDS.index((kernels.build, {**_V32_FP8, "prefetch": True, "cluster": True}))


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
def test_hopper_cluster_build_dequantises_each_row_once_per_token() -> None:
    """The cluster config at V3.2 widths: each block of the pair gathers its half of a step's 32 rows (rows from
    ``(blockIdx.x & 1) * 16``), stores them into its peer's tile with 16-byte
    ``st.shared::cluster`` stores (one loop per column range: 512 and 64 columns) and waits at the cluster barrier:
    one arrival before the loop, wait / arrive / wait / arrive per step, one wait after it."""
    builder, params = BUILDS[_CLUSTER_CASE]
    kernel, _ = support.hopper_build(f"sparse_mla_decode {_CLUSTER_CASE}", builder, **params)
    source = kernel.get_kernel_source()
    assert "((int)blockIdx.x) & 1) * 16)" in source, "a block does not gather from its half of the step"
    assert "st.shared::cluster.v4.u32" in source and "mapa.shared::cluster" in source
    assert source.count(f"{cluster_steps.STORE_PEER}((&") == len(cluster_steps.column_parts(V32["d_qk"])) == 2
    assert (source.count("tl::cluster_arrive();"), source.count("tl::cluster_wait();")) == (3, 3)
    assert "map_shared_rank" not in source, "a one-element cluster copy (a __syncthreads per element) came back"


def test_cluster_config_needs_sm90a_and_whole_pairs_of_head_blocks() -> None:
    """The C target and the portable schedule have no clusters, and a cluster pairs head blocks; a bf16 cache
    builds without the cluster (as without the prefetch)."""
    static = {**_V32_FP8, "target": dsl.HOPPER_TARGET}
    kernels.check_config(static, kernels.Config(cluster=True))
    kernels.check_config({**_V32_BF16, "target": dsl.CPU_TARGET}, kernels.Config(cluster=True))
    for target in (dsl.CPU_TARGET, dsl.cuda_target("sm_80")):
        with pytest.raises(ValueError, match="sm_90a only"):
            kernels.check_config({**static, "target": target}, kernels.Config(cluster=True))
    with pytest.raises(ValueError, match="multiples of 2 .*, got 1 head blocks"):
        kernels.check_config({**static, "heads": 64}, kernels.Config(cluster=True))
    assert cluster_steps.column_parts(576) == [(0, 512), (512, 576)]
    assert cluster_steps.column_parts(512) == [(0, 512)]


# ------------------------------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("batch", "s_q"), [(1, 1), (1, 2), (8, 1)])
def test_gpu_matches_reference(cuda_device: torch.device, fmt: str, batch: int, s_q: int) -> None:
    """V3.2 shapes with the automatic split count (many splits for a batch of 1), lengths per query, a sink and an
    extra bf16 source, poisoned unreferenced slots."""
    args = make_problem(
        seed=11 + batch + s_q, fmt=fmt, heads=V32["heads"], d_qk=V32["d_qk"], d_v=V32["d_v"], d_rope=V32["d_rope"],
        batch=batch, s_q=s_q, context=4096, topk=V32_TOPK, page_size=64, kind="irregular", length_kind="per_query",
        sink="random", extra_fmt="bf16", extra_topk=128, device=cuda_device,
    )  # fmt: skip
    out, lse = run(args)
    check(args, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_one_split_writes_the_output_itself(cuda_device: torch.device, fmt: str) -> None:
    """V3.2 shapes, one source in one split: the direct kernel (bf16 out and lse, sink included, no combine)."""
    args = make_problem(
        seed=21, fmt=fmt, heads=V32["heads"], d_qk=V32["d_qk"], d_v=V32["d_v"], d_rope=V32["d_rope"], batch=8, s_q=2,
        context=4096, topk=V32_TOPK, page_size=64, kind="irregular", length_kind="per_query", sink="random",
        device=cuda_device,
    )  # fmt: skip
    out, lse = run(args, splits=1, direct=True)
    check(args, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
def test_gpu_fp8_plain_gather_matches_reference(cuda_device: torch.device) -> None:
    """The FP8 gather without the prefetch (the sm_90a default prefetches), split, against the reference."""
    args = make_problem(
        seed=23, fmt="fp8", heads=V32["heads"], d_qk=V32["d_qk"], d_v=V32["d_v"], d_rope=V32["d_rope"], batch=1,
        s_q=2, context=4096, topk=V32_TOPK, page_size=64, kind="irregular", length_kind="per_query", sink="random",
        device=cuda_device,
    )  # fmt: skip
    out, lse = run(args, config=kernels.Config(prefetch=False))
    check(args, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(("batch", "s_q", "splits"), [(1, 2, None), (8, 2, 1)])
def test_gpu_fp8_cluster_matches_reference(cuda_device: torch.device, batch: int, s_q: int, splits: int | None) -> None:
    """The cluster config at V3.2 shapes (two CTAs per token exchange their halves of each step through distributed
    shared memory): the build tier's split kernel with automatic splits, and one split (the direct kernel, built
    here), lengths per query (the two halves of a step differ in validity), against the reference."""
    args = make_problem(
        seed=41 + batch + s_q, fmt="fp8", heads=V32["heads"], d_qk=V32["d_qk"], d_v=V32["d_v"], d_rope=V32["d_rope"],
        batch=batch, s_q=s_q, context=4096, topk=V32_TOPK, page_size=64, kind="irregular", length_kind="per_query",
        sink="random", device=cuda_device,
    )  # fmt: skip
    out, lse = run(args, config=kernels.Config(prefetch=True, cluster=True), splits=splits)
    check(args, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(("batch", "s_q"), [(1, 1), (8, 2)])
def test_gpu_model1_pages_match_reference(cuda_device: torch.device, batch: int, s_q: int) -> None:
    """DeepSeek-V4 shapes over MODEL1 pages of 64 (the build tier's kernel): 128 heads, d_qk = d_v = 512, a 128-entry
    window source and 512 selected compressed entries, lengths per query, a sink, the automatic split count, every
    unreferenced byte 0xFF."""
    args = make_problem(
        seed=31 + batch + s_q, fmt="model1", heads=128, d_qk=512, d_v=512, d_rope=64, batch=batch, s_q=s_q,
        context=2048, topk=128, page_size=64, kind="irregular", length_kind="per_query", sink="random",
        extra_fmt="model1", extra_topk=512, extra_page_size=64, device=cuda_device,
    )  # fmt: skip
    out, lse = run(args)
    check(args, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)

"""The indexer's selection for decoding over a paged key cache: ``dsa.ops.index_topk_decode``, its reference
(``dsa.reference.index_topk_decode``) and the fused selection kernel's paged variant (``tl_kernels.index_topk`` with
``page_size > 0``, through ``dsa.launch.index_topk.index_topk_paged``).

Every check is exact: integer-valued q, keys and weights (and power-of-two FP8 scales) make every score an exact
float32 on every path, so sets (tie rule included: the smaller position wins) and scores must be equal. Block tables
are shuffled and some of their entries unallocated (``-1``); such pages are invisible. Outputs are poisoned before
every launch (tests/conftest.py).

FP8 keys come in both byte layouts (``dsa.kv_format.INDEX_KEY_LAYOUTS``): format ``"fp8"`` is one 36-byte row per key,
``"fp8-pages"`` DeepGEMM's and vLLM's per-page layout (a page's values, then its scales), passed with
``key_layout="paged"``.

Tiers: the reference against ``dsa.reference.index_topk`` over keys gathered through the block table (pure PyTorch);
``cpu_kernel``: the C-target paged kernels (bf16 keys, FP8 key rows, FP8 key pages) against the reference; ``build``:
the V3.2 FP8 paged kernels (both layouts) for sm_90a; ``gpu``: V3.2 shapes at 8K-64K contexts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsa import cache, kv_format, ops, reference, testing
from dsa.launch import index_topk as launch
from dsa.launch import index_topk_split as split
from tests import strategies, support
from tl_kernels import build as tl_build
from tl_kernels import dsl
from tl_kernels import index_topk as kernels
from tl_kernels import split_ranges as range_kernels
from tl_kernels import topk as topk_kernels

CPU_HEADS, CPU_DIM, CPU_TOPK, CPU_PAGE = 4, 32, 16, 16
V32 = {"heads": 64, "dim": 128, "topk": 2048, "page_size": 64}
FORMATS = ("bf16", "fp8", "fp8-pages")
"""Key formats: bf16 keys, FP8 keys in rows (``key_layout="rows"``) and in DeepGEMM's per-page layout (``"paged"``)."""


def is_fp8(fmt: str) -> bool:
    return fmt.startswith("fp8")


def key_layout(fmt: str) -> str:
    """The ``key_layout`` argument of format ``fmt``."""
    return "paged" if fmt == "fp8-pages" else "rows"


def make_problem(
    *,
    fmt: str,
    seed: int,
    batch: int,
    s_q: int,
    lengths: list[int],
    heads: int = CPU_HEADS,
    dim: int = CPU_DIM,
    page_size: int = CPU_PAGE,
    ranges: str = "decode",
    unallocated: bool = False,
    pattern: str = "random",
    device: Any = "cpu",
) -> dict[str, Any]:
    """One call's arguments: a cache holding ``lengths[b]`` integer-valued keys per sequence behind a shuffled block
    table (with ``unallocated``, the table's last entries of some sequences are ``-1``), queries at the sequence's
    end (``ranges="decode"``: query ``t`` sees ``[0, L - s_q + t + 1)``) or random ``[starts, ends)``. ``pattern``
    (one of :data:`PATTERNS`) shapes the scores along a row: random small integers, or all equal (``"tied"``), or
    non-decreasing (``"ordered"``) or non-increasing (``"reversed"``) with position, in runs of equal scores. FP8
    keys are stored by a ``PagedKVCache`` in the format's layout (``"fp8-pages"``: its ``key_layout`` is in the
    arguments, and ``k_cache`` is the pages viewed as ``[num_pages, page_size, D + 4]``)."""
    g = testing.generator(seed)
    longest = max(max(lengths), 1)
    fp8 = is_fp8(fmt)
    dtype = "fp8" if fp8 else torch.bfloat16
    layout = kv_format.index_key_layout(dim, key_layout(fmt)) if fp8 else None
    keys = cache.PagedKVCache(batch, longest + page_size, dim, page_size=page_size, dtype=dtype, d_rope=0,
                              layout=layout)  # fmt: skip
    table = torch.randperm(keys.block_table.numel(), generator=g).to(torch.int32).view_as(keys.block_table)
    if unallocated:
        # Pages past each sequence's last token are not allocated (as a serving allocator leaves them).
        used = torch.tensor([-(-max(n, 1) // page_size) for n in lengths]).view(-1, 1)
        table = torch.where(torch.arange(table.shape[1]).view(1, -1) < used, table, -1).to(torch.int32)
    keys.block_table = table
    values, scale, q, weights = _pattern_values(
        pattern, g, fp8, batch=batch, s_q=s_q, heads=heads, dim=dim, longest=longest
    )
    if fp8:
        rows = cache.pack_index_keys_fp8(values.to(torch.float8_e4m3fn), scale)
        keys.append_rows(rows, torch.tensor(lengths))
        q = q.to(torch.float8_e4m3fn)
    else:
        keys.append(values.to(torch.bfloat16), torch.tensor(lengths))
        q = q.to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32).view(-1, 1)
    if ranges == "decode":
        starts = None
        ends = (lens - s_q + 1 + torch.arange(s_q, dtype=torch.int32).view(1, -1)).clamp_min(0).to(torch.int32)
    else:
        capacity = keys.capacity
        starts = torch.randint(-2, capacity, (batch, s_q), generator=g).to(torch.int32)
        ends = (starts + torch.randint(-3, capacity, (batch, s_q), generator=g)).clamp(-1, capacity + 3)
        ends = ends.to(torch.int32)
    k_cache = keys.pages.view(keys.pages.shape[0], page_size, -1)
    args = {"q": q, "k_cache": k_cache, "weights": weights, "block_table": keys.block_table, "ends": ends,
            "starts": starts}  # fmt: skip
    if fmt == "fp8-pages":
        args["key_layout"] = "paged"
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


PATTERNS = ("random", "tied", "ordered", "reversed")


def _pattern_values(
    pattern: str, g: torch.Generator, fp8: bool, *, batch: int, s_q: int, heads: int, dim: int, longest: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Float32 integer values of :func:`make_problem`'s ``pattern`` (exact in bf16 and e4m3): keys ``[B, L, D]``, key
    scales ``[B, L]`` (powers of two; drawn for ``fp8`` only, so bf16 problems keep their draws), q ``[B, s_q, H,
    D]`` and weights ``[B, s_q, H]``."""
    if pattern == "random":
        values = torch.randint(-3, 4, (batch, longest, dim), generator=g).float()
        scale = torch.exp2(torch.randint(-2, 3, (batch, longest), generator=g).float()) if fp8 else None
        q = torch.randint(-3, 4, (batch, s_q, heads, dim), generator=g).float()
        return values, scale, q, torch.randint(-2, 3, (batch, s_q, heads), generator=g).float()
    scale = torch.ones(batch, longest)
    q = torch.randint(1, 3, (batch, s_q, heads, dim), generator=g).float()
    weights = torch.randint(1, 3, (batch, s_q, heads), generator=g).float()
    if pattern == "tied":  # one key row everywhere: every visible score of a query is the same
        return torch.randint(-3, 4, (batch, 1, dim), generator=g).float().expand(-1, longest, -1), scale, q, weights
    # Key s has its first m(s) entries 1 (the rest 0), m rising with position: positive q and weights give scores
    # that rise with m, equal within a run of the same m.
    rising = 1 + torch.arange(longest) * (dim - 1) // longest
    m = rising if pattern == "ordered" else rising.flip(0)
    values = (torch.arange(dim).view(1, 1, -1) < m.view(1, -1, 1)).float().expand(batch, -1, -1)
    return values, scale, q, weights


def _assert_same_selection(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Equal sets per row and equal scores at them (any order): ``dsa.testing.same_selection``."""
    error = testing.same_selection(got, want)
    assert error is None, error


def _reference(args: dict[str, Any], topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    call = dict(args)
    return reference.index_topk_decode(call.pop("q"), call.pop("k_cache"), call.pop("weights"), topk, **call,
                                       return_scores=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------- reference


@given(
    fmt=st.sampled_from(FORMATS),
    **strategies.sizes(batch=3, s_q=4),
    length=st.integers(0, 120),
    topk=st.integers(1, 40),
    ranges=st.sampled_from(["decode", "random"]),
    unallocated=st.booleans(),
    seed=strategies.SEEDS,
)
def test_reference_is_index_topk_over_the_gathered_keys(
    fmt: str, batch: int, s_q: int, length: int, topk: int, ranges: str, unallocated: bool, seed: int
) -> None:
    """The paged reference equals ``reference.index_topk`` over the keys gathered into ``[B, L, D]`` (FP8 rows
    unpacked into values and scales; FP8 pages converted to rows), with the positions past each sequence's pages made
    invisible by ``ends``."""
    lengths = [max(0, length - 7 * b) for b in range(batch)]
    args = make_problem(fmt=fmt, seed=seed, batch=batch, s_q=s_q, lengths=lengths, ranges=ranges,
                        unallocated=unallocated)  # fmt: skip
    got = _reference(args, topk)
    page_size = args["k_cache"].shape[1]
    capacity = args["block_table"].shape[1] * page_size
    slots = cache.positions_to_slots(args["block_table"], page_size, torch.arange(capacity).expand(batch, -1))
    # The keys written out row by row (FP8 pages converted to rows first).
    k_cache = args["k_cache"]
    if fmt == "fp8-pages":
        k_cache = kv_format.relayout_index_keys(k_cache, CPU_DIM, src="paged", dst="rows")
    rows = k_cache.reshape(-1, k_cache.shape[-1])[slots.clamp_min(0).long()]
    k, k_scale = cache.unpack_index_keys_fp8(rows, CPU_DIM) if is_fp8(fmt) else (rows, None)
    starts = args["starts"] if args["starts"] is not None else torch.zeros_like(args["ends"])
    # Unallocated pages only ever follow a sequence's allocated ones here, so clamping ends to them is exact.
    allocated = (slots >= 0).sum(dim=1, dtype=torch.int32).view(-1, 1)
    want = reference.index_topk(args["q"], k, args["weights"], topk, k_scale=k_scale, starts=starts,
                                ends=torch.minimum(args["ends"], allocated), return_scores=True)  # fmt: skip
    _assert_same_selection(got, want)


def test_positions_to_slots_follows_the_block_table() -> None:
    """Slot = page * page_size + offset through the table; -1 for negative positions, positions past the table,
    unallocated pages and slots past the cache; PagedKVCache.slots is the same helper."""
    table = torch.tensor([[3, 0, -1], [1, 2, 5]], dtype=torch.int32)
    positions = torch.tensor([[0, 5, 4, 9, -1, 12], [3, 4, 8, 11, 12, 2]])
    slots = cache.positions_to_slots(table, 4, positions, num_slots=20)
    assert slots.tolist() == [[12, 1, 0, -1, -1, -1], [7, 8, -1, -1, -1, 6]]
    kv_cache = cache.PagedKVCache(2, 12, 8, page_size=4, dtype=torch.float32)
    kv_cache.block_table = table
    assert torch.equal(kv_cache.slots(positions), cache.positions_to_slots(table, 4, positions, num_slots=24))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k_cache": torch.zeros(4, 16, 32, dtype=torch.uint8)}, "k_cache must hold FP8 key rows of 36 bytes"),
        ({"block_table": torch.zeros(3, 4, dtype=torch.int32)}, "block_table must have B = 2 rows"),
        ({"ends": torch.zeros(2, 2, dtype=torch.int64)}, "ends must have dtype int32"),
        ({"weights": torch.zeros(2, 1, 3)}, r"weights must have shape \[B, s_q, H_i\]"),
        ({"key_layout": "pages"}, r"key_layout must be one of \('rows', 'paged'\)"),
        ({"q": torch.zeros(2, 1, 4, 32, dtype=torch.bfloat16), "key_layout": "paged"},
         r"key_layout must be one of .* \('paged' only for FP8 keys\)"),
    ],
)
def test_bad_input_names_the_argument(change: dict[str, Any], message: str) -> None:
    args = make_problem(fmt="fp8", seed=1, batch=2, s_q=1, lengths=[20, 5])
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=f"^index_topk_decode: {message}"):
        ops.index_topk_decode(args.pop("q"), args.pop("k_cache"), args.pop("weights"), 4, **args)


# ------------------------------------------------------------------------------------------------------- CPU tier


def _paged_draws(shortest: int) -> dict[str, st.SearchStrategy[Any]]:
    """The CPU paged tests' draws: format, batch, queries per sequence, the first sequence's length (from
    ``shortest`` to 300; see :func:`_paged_problem`), ranges, unallocated pages, seed."""
    return {
        "fmt": st.sampled_from(FORMATS),
        **strategies.sizes(batch=3, s_q=4),
        "length": st.integers(shortest, 300),
        "ranges": st.sampled_from(["decode", "random"]),
        "unallocated": st.booleans(),
        "seed": strategies.SEEDS,
    }


def _paged_problem(
    fmt: str, batch: int, s_q: int, length: int, ranges: str, unallocated: bool, seed: int, *, shortest: int,
    pattern: str = "random",
) -> dict[str, Any]:  # fmt: skip
    """:func:`make_problem` with sequence ``b`` holding ``length - 31 * b`` keys (at least ``shortest``)."""
    lengths = [max(shortest, length - 31 * b) for b in range(batch)]
    return make_problem(fmt=fmt, seed=seed, batch=batch, s_q=s_q, lengths=lengths, ranges=ranges,
                        unallocated=unallocated, pattern=pattern)  # fmt: skip


def _run_paged(args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged launcher on a :func:`make_problem` problem, at :data:`CPU_TOPK`."""
    call = dict(args)
    return launch.index_topk_paged(call.pop("q"), call.pop("k_cache"), call.pop("weights"), CPU_TOPK, **call)


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(**_paged_draws(0))
@example(fmt="fp8", batch=2, s_q=2, length=300, ranges="decode", unallocated=True, seed=1)
@example(fmt="bf16", batch=3, s_q=4, length=250, ranges="random", unallocated=False, seed=2)
@example(fmt="fp8", batch=1, s_q=1, length=5, ranges="decode", unallocated=True, seed=3)
@example(fmt="fp8-pages", batch=3, s_q=2, length=300, ranges="random", unallocated=True, seed=4)
def test_cpu_paged_kernel_matches_reference(
    fmt: str, batch: int, s_q: int, length: int, ranges: str, unallocated: bool, seed: int
) -> None:
    """The C-target paged kernel (64-key blocks, so rows of up to 300 keys compact the candidate buffer several times)
    selects exactly the reference's sets and scores."""
    args = _paged_problem(fmt, batch, s_q, length, ranges, unallocated, seed, shortest=0)
    _assert_same_selection(_run_paged(args), _reference(args, CPU_TOPK))


def _spoil_cache(k_cache: torch.Tensor, fmt: str, names: list[str], data: st.DataObject, seed: int) -> torch.Tensor:
    """A copy of the paged cache (every row: written, past a sequence's end and in unallocated pages) with non-finite
    values sprinkled into the parts ``names`` lists: ``"keys"`` (bf16: NaN and ``+-inf``; FP8 bytes: NaN, e4m3fn has
    no infinity) and, for FP8 rows, ``"key_scales"`` (their float32 scale: NaN and ``+-inf``)."""
    pages = k_cache.clone()
    if fmt == "bf16":
        if "keys" in names:
            pages = strategies.sprinkle(pages, data.draw(strategies.sprinkles()), seed)
        return pages
    # Views of the copy's FP8 bytes and scale bytes, in the format's layout.
    values, scales = kv_format.index_key_sections(pages, CPU_DIM, key_layout(fmt))
    if "keys" in names:
        how = data.draw(strategies.sprinkles((strategies.NAN,)))
        values.copy_(strategies.sprinkle(values.contiguous().view(torch.float8_e4m3fn), how, seed).view(torch.uint8))
    if "key_scales" in names:
        how = data.draw(strategies.sprinkles())
        spoiled = strategies.sprinkle(scales.contiguous().view(torch.float32), how, seed + 1)
        scales.copy_(spoiled.view(torch.uint8))
    return pages


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(**_paged_draws(1), data=st.data())
def test_cpu_paged_kernel_with_non_finite_inputs_matches_reference(
    fmt: str, batch: int, s_q: int, length: int, ranges: str, unallocated: bool, seed: int, data: st.DataObject
) -> None:
    """NaN and ``+-inf`` in the queries, the weights and anywhere in the paged cache (key values, FP8 key scales,
    rows no query sees): the C-target paged kernel selects exactly the reference's sets and scores, never a NaN or
    infinite score (FP8 q and key bytes take NaN only: e4m3fn has no infinity)."""
    args = _paged_problem(fmt, batch, s_q, length, ranges, unallocated, seed, shortest=1)
    parts = ["q", "weights", "keys"] + (["key_scales"] if is_fp8(fmt) else [])
    spoiled = data.draw(st.lists(st.sampled_from(parts), min_size=1, max_size=len(parts), unique=True))
    args["k_cache"] = _spoil_cache(args["k_cache"], fmt, spoiled, data, seed)
    if "q" in spoiled:
        values = (strategies.NAN,) if is_fp8(fmt) else strategies.NON_FINITE
        args["q"] = strategies.sprinkle(args["q"], data.draw(strategies.sprinkles(values)), seed + 2)
    if "weights" in spoiled:
        args["weights"] = strategies.sprinkle(args["weights"], data.draw(strategies.sprinkles()), seed + 3)
    indices, scores = _run_paged(args)
    _assert_same_selection((indices, scores), _reference(args, CPU_TOPK))
    assert torch.isfinite(scores[indices >= 0]).all(), "a non-finite score was selected"


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("fmt", ["fp8", "fp8-pages"])
def test_cpu_op_runs_the_paged_kernel(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """``ops.index_topk_decode`` on the kernel backend calls the paged launcher (a spy counts) with the same result;
    FP8 key pages go in as vLLM passes them (``[num_pages, page_size, 1, D + 4]`` uint8, ``key_layout="paged"``)."""
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    calls = []
    real = launch.index_topk_paged
    monkeypatch.setattr(launch, "index_topk_paged", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = make_problem(fmt=fmt, seed=4, batch=2, s_q=2, lengths=[90, 40], unallocated=True)
    call = dict(args)
    if fmt == "fp8-pages":
        call["k_cache"] = call["k_cache"].unsqueeze(2)
    got = ops.index_topk_decode(call.pop("q"), call.pop("k_cache"), call.pop("weights"), CPU_TOPK, **call,
                                return_scores=True)  # fmt: skip
    assert calls == [1]
    _assert_same_selection(got, _reference(args, CPU_TOPK))


# ------------------------------------------------------------------------------------------------------- build tier

V32_PAGED_STATIC = {"heads": V32["heads"], "dim": V32["dim"], "dtype": "float8_e4m3fn", "mode": "range",
                    "topk": V32["topk"], "page_size": V32["page_size"], "scale_col": V32["dim"] // 4}  # fmt: skip


V32_PAGES_STATIC = {**V32_PAGED_STATIC, "scale_col": 0, "key_layout": "paged"}
"""The same kernel over FP8 key pages in DeepGEMM's per-page layout (its default config double-buffers the key tile
through registers: ``kernels.prefetch_by_default``)."""


def _paged_builds() -> list[tuple[Any, dict[str, Any]]]:
    """The V3.2 paged kernels the build and GPU tiers use (FP8 key rows and pages, bf16 keys), with their default
    Hopper configs, then (GPU tier only) the configs of the launcher's MTP rule that its ``s_q = 2`` cases run over
    key rows (``dsa.launch.index_topk.mtp_default``: two queries a block), then (GPU tier only) what a GPU's split
    selection launches besides: each config's narrow list kernels (every width its first split plans,
    ``dsa.launch.index_topk._list_plan``), the keyed top-k merge and the sub-range kernels. One parallel prebuild, so
    the decode stage's tests do not compile them one after another."""
    statics = (V32_PAGED_STATIC, V32_PAGES_STATIC, {**V32_PAGED_STATIC, "dtype": "bfloat16", "scale_col": 0})
    configs = [(s, kernels.default_config({**s, "target": dsl.HOPPER_TARGET})) for s in statics]
    configs += [(s, rule) for s in statics if (rule := launch.mtp_default(s, 2, dsl.HOPPER_TARGET)) is not None]
    builds = [(kernels.build, {**static, **dataclasses.asdict(config)}) for static, config in configs]
    builds += [
        (kernels.build, {**static, **dataclasses.asdict(config), "topk": width})
        for static, config in configs
        for width in split.list_widths(topk=static["topk"], block_N=config.block_N)
    ]
    merge = topk_kernels.default_config({"k": V32["topk"]})
    builds.append((topk_kernels.build, {"k": V32["topk"], "keyed": True, **dataclasses.asdict(merge)}))
    block_N = configs[0][1].block_N
    builds += [(range_kernels.build, {"block_N": block_N, "has_starts": starts}) for starts in (False, True)]
    return builds


hopper_prebuilt = support.prebuilt_fixture(
    _paged_builds,
    "The paged kernels of the GPU tier compiled in parallel first (the build tier needs only the FP8 ones: CI does not "
    "pay for the bf16 build).",
)


@pytest.fixture(scope="module")
def hopper_fp8_prebuilt() -> None:
    """The build tier's two kernels (FP8 key rows and pages) compiled in parallel first, or by the session's pool."""
    support.prebuild_hopper(_paged_builds()[:2])


hopper_fp8_prebuilt.dsa_builds = lambda: _paged_builds()[:2]  # for the session's build pool, read at collection


@pytest.mark.build
@pytest.mark.usefixtures("hopper_fp8_prebuilt")
def test_hopper_paged_build_is_clean() -> None:
    """The V3.2 FP8 paged variant (64 heads, 128-wide keys in 132-byte rows, topk 2048, 64-token pages) compiles for
    sm_90a with wgmma, without spills, within the shared-memory estimate, with int64 row addressing."""
    config = kernels.default_config({**V32_PAGED_STATIC, "target": dsl.HOPPER_TARGET})
    kernel, report = support.hopper_build("index_topk paged fp8", kernels.build, **V32_PAGED_STATIC,
                                          **dataclasses.asdict(config))  # fmt: skip
    assert not report.problems(mma=tl_build.MMA_WGMMA), report.problems(mma=tl_build.MMA_WGMMA)
    assert report.smem_bytes <= kernels.smem_bytes(V32_PAGED_STATIC, config)
    support.assert_wide_addressing(kernel.get_kernel_source())


# A 16-byte vector of FP8 values read from the key cache K (TileLang's CUDA: `*(fp8_e4_16_t*)(K + ...)`), and of four
# float32 scales from its float32 view KScale (`*(float4*)(KScale + ...)`); element reads of either.
_K_VECTOR_LOAD = re.compile(r"\*\(fp8_e4_16_t\*\)\(K \+")
_K_BYTE_LOAD = re.compile(r"= K\[")
_SCALE_VECTOR_LOAD = re.compile(r"\*\(float4\*\)\(KScale \+")
_SCALE_ELEMENT_LOAD = re.compile(r"KScale\[")


@pytest.mark.build
@pytest.mark.usefixtures("hopper_fp8_prebuilt")
def test_hopper_paged_build_over_key_pages_loads_16_byte_vectors() -> None:
    """Over FP8 key pages in DeepGEMM's per-page layout (each key's 128 bytes 16-byte aligned, a page's 64 scales
    after its values), with the key tile double-buffered through registers (the default), the V3.2 paged variant
    compiles for sm_90a without spills and reads the key tile from global memory as 16-byte vectors only
    (``fp8_e4_16_t``; the 132-byte rows are read a byte at a time) and the key block's scales as 16-byte vectors only
    (``float4``, once per key block; they were one scalar load per score), with int64 row addressing."""
    config = kernels.default_config({**V32_PAGES_STATIC, "target": dsl.HOPPER_TARGET})
    kernel, report = support.hopper_build("index_topk paged fp8 pages", kernels.build, **V32_PAGES_STATIC,
                                          **dataclasses.asdict(config))  # fmt: skip
    assert not report.problems(mma=tl_build.MMA_WGMMA), report.problems(mma=tl_build.MMA_WGMMA)
    assert report.smem_bytes <= kernels.smem_bytes(V32_PAGES_STATIC, config)
    source = kernel.get_kernel_source()
    assert config.prefetch
    assert _K_VECTOR_LOAD.search(source) and not _K_BYTE_LOAD.search(source)
    assert _SCALE_VECTOR_LOAD.search(source) and not _SCALE_ELEMENT_LOAD.search(source)
    support.assert_wide_addressing(source)


# ------------------------------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.decode
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("batch", "s_q", "context"), [(1, 1, 65_536), (4, 2, 8_192)])
def test_gpu_paged_selection_matches_reference(
    cuda_device: torch.device, fmt: str, batch: int, s_q: int, context: int
) -> None:
    """V3.2 shapes (64 heads, 128-wide keys, topk 2048, 64-token pages) at 8K and 64K contexts, exact."""
    lengths = [context - 1000 * b for b in range(batch)]
    args = make_problem(fmt=fmt, seed=5, batch=batch, s_q=s_q, lengths=lengths, heads=V32["heads"], dim=V32["dim"],
                        page_size=V32["page_size"], unallocated=True, device=cuda_device)  # fmt: skip
    call = dict(args)
    got = ops.index_topk_decode(call.pop("q"), call.pop("k_cache"), call.pop("weights"), V32["topk"], **call,
                                return_scores=True)  # fmt: skip
    _assert_same_selection(got, _reference(args, V32["topk"]))

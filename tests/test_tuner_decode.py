"""The decode kernels as tuner kernels (``autotune.lookup.decode``): ``sparse_mla_decode`` registered, its presets and
spaces valid on sm_90a and the portable schedule, the static screen, the launcher reading a stored config, the
compile phase building the one-split variant beside each candidate, the runners' checks and the GPU phase's check,
timing and store on the C target (marker ``cpu_kernel``: the kernels ``tests/test_sparse_mla_decode_kernel.py`` and
``tests/test_index_topk_decode.py`` compile, so a full session compiles nothing more), and a compile-only run of
``dsa-autotune`` that lists the decode attention (marker ``build``: the two sm_90a builds the decode build tier makes
too)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune import cli, tuner
from autotune.lookup import cache as tuned_cache
from autotune.lookup import decode, select, space, sku
from benchmarks import runners
from dsa import kv_format, testing
from dsa.launch import index_topk as index_launch
from dsa.launch import sparse_mla_decode as launch
from tests import fake_kernel as fake
from tests import support
from tl_kernels import dsl
from tl_kernels import index_topk as index_kernels
from tl_kernels import sparse_mla_decode as kernels

KERNEL = decode.KERNEL
SM80 = dsl.cuda_target("sm_80")
SCALE_ERROR = 1.02
# tests/test_sparse_mla_decode_kernel.py's C-target widths (5 heads, 40/24, 8 RoPE, FP8 tile 32): its kernels serve.
CPU_DECODE = launch.static_params(heads=5, d_qk=40, d_v=24, fp8_layout=kv_format.FP8Layout.for_width(40, 8))
# tests/test_index_topk_decode.py's C-target paged selection (4 heads x 32, top-16, pages of 16, FP8 key rows).
CPU_SELECTION = decode.paged_index_static("rows", heads=4, dim=32, topk=16, page_size=16)


def _decode_cases(preset: str) -> list[space.Case]:
    """The decode cases of ``preset``: the attention's and the paged selection's."""
    cases = space.preset_cases(preset, space.TUNED_KERNEL_NAMES)
    return [c for c in cases if c.kernel == KERNEL or "page_size" in c.static]


def test_decode_attention_is_a_tuner_kernel() -> None:
    """One name: the builder module, the launcher's ``KERNEL_NAME``, the runner; ``--kernels all`` tunes it."""
    assert KERNEL in space.known_kernels() and KERNEL in space.DECODE_KERNEL_NAMES
    assert space.spec(KERNEL).module == "tl_kernels.sparse_mla_decode" and launch.KERNEL_NAME == KERNEL
    assert space.size_names(KERNEL) == ("batch", "s_q", "topk")
    assert runners.runner_for(KERNEL) is not None
    assert cli._parse_kernels("all") == space.TUNED_KERNEL_NAMES


@pytest.mark.parametrize("preset", space.PRESETS)
def test_decode_presets_and_spaces_are_valid(preset: str) -> None:
    """Every decode case: static parameters ``build`` takes, size points with exactly the size names, the default
    first in both spaces, the pruned space within the full one, every candidate checked for sm_90a, and the portable
    space's for sm_80."""
    found = _decode_cases(preset)
    assert KERNEL in {c.kernel for c in found}
    for case in found:
        space.check_static(case.kernel, case.static)
        names = set(space.size_names(case.kernel))
        assert all(set(s) == names for s in case.sizes) and set(case.check_sizes) == names
        default = space.default_config(case.kernel, case.static)
        pruned, full = space.candidates(case.kernel, case.static), space.candidates(case.kernel, case.static, full=True)
        assert pruned[0] == default == full[0] and len(pruned) <= 1 + space.PRUNED_NEIGHBOURS
        assert all(c in full for c in pruned)
        for config in full:
            space.make_config(case.kernel, case.static, config)
        portable = space.full_space(case.kernel, case.static, target=SM80)
        assert portable[0] == space.default_config(case.kernel, case.static, target=SM80)
        for config in portable:
            space.make_config(case.kernel, case.static, config, target=SM80)


def test_preset_statics_are_what_the_launchers_look_up() -> None:
    """The presets' static parameters are the launchers' (the lookup room cannot import ``dsa``): V3.2's FP8 rows,
    MODEL1's pages of 64 for both V4 models, and the paged selection's for both key layouts (less the fields that are
    the config's)."""
    assert decode.V32_MLA_FP8 == launch.static_params(heads=128, d_qk=576, d_v=512, fp8_layout=kv_format.V32_FP8_LAYOUT)
    for heads, _ in space.V4_MODELS:
        assert decode.model1_static(heads) == launch.static_params(
            heads=heads, d_qk=512, d_v=512, fp8_layout=kv_format.MODEL1_FP8_LAYOUT, page_size=64
        )
    q = torch.zeros(1, 1, 64, 128, dtype=torch.float8_e4m3fn)
    fields = set(space.config_fields("index_topk"))
    for layout in kv_format.INDEX_KEY_LAYOUTS:
        wanted = index_launch.paged_static_params(q, 2048, page_size=64, key_layout=layout)
        assert decode.paged_index_static(layout) == {k: v for k, v in wanted.items() if k not in fields}
    v32 = {c.static.get("key_layout", "rows") for c in space.preset_cases("deepseek-v3.2", ("index_topk",))
           if "page_size" in c.static}  # fmt: skip
    assert v32 == set(kv_format.INDEX_KEY_LAYOUTS)


def test_screen_drops_repeats_and_candidates_no_sm_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 cache gets no ``prefetch`` or ``cluster`` candidate (the launcher builds it without), an FP8 cache gets
    both values of each (``cluster`` only with whole pairs of head blocks); a
    candidate whose shared memory (the kernel's estimate, row numbers included) or registers leave no block on an SM
    is dropped before compiling, while the default stays first (the compile phase then says why it fails)."""
    bf16 = launch.static_params(heads=128, d_qk=576, d_v=512, fp8_layout=None)
    for field in ("prefetch", "cluster"):
        assert {c[field] for c in space.full_space(KERNEL, bf16)} == {False}
        assert {c[field] for c in space.full_space(KERNEL, decode.V32_MLA_FP8)} == {False, True}
    # V4-Flash's 64 heads are one head block: no cluster pair.
    assert {c["cluster"] for c in space.full_space(KERNEL, decode.model1_static(64))} == {False}
    monkeypatch.setattr(kernels, "smem_bytes", lambda static, config: 200_000 + 40_000 * (config.block_k == 32))
    # The default (block_k 32) first, then the four block_k 16 candidates (prefetch x cluster).
    assert [c["block_k"] for c in space.full_space(KERNEL, decode.V32_MLA_FP8)] == [32, 16, 16, 16, 16]
    with pytest.raises(ValueError, match="no SM holds a block"):
        space.screen_candidate(KERNEL, decode.V32_MLA_FP8, space.default_config(KERNEL, decode.V32_MLA_FP8))
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "resources", lambda kv_format, config: (512, 1024))
    with pytest.raises(ValueError, match="512 registers"):
        space.screen_candidate(KERNEL, decode.V32_MLA_FP8, space.default_config(KERNEL, decode.V32_MLA_FP8))
    space.screen_candidate(KERNEL, CPU_DECODE, dataclasses.asdict(kernels.Config()), target=dsl.CPU_TARGET)


def test_a_stored_config_is_the_launchers_choice(
    monkeypatch: pytest.MonkeyPatch, cache_dirs: tuple[Path, Path]
) -> None:
    """A config the tuner stored for this SKU, static parameters and bucket is what the launcher chooses on a CUDA
    device (a faked device key: no GPU needed); another bucket gets the nearest tuned one, another cache format the
    default; the C target never looks one up. Fresh user and shipped config folders (``cache_dirs``)."""
    user, _ = cache_dirs
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h100-sxm")
    tuned = {**dataclasses.asdict(kernels.Config()), "block_k": 16, "prefetch": False}
    tuned_cache.store(KERNEL, decode.V32_MLA_FP8, {"batch": 8, "s_q": 1, "topk": 2048}, tuned, sku="h100-sxm",
                      cache_dir=user)  # fmt: skip
    cuda, target = torch.device("cuda", 0), dsl.HOPPER_TARGET
    bf16 = launch.static_params(heads=128, d_qk=576, d_v=512, fp8_layout=None)
    try:
        for batch in (8, 128):  # the exact bucket, then the nearest
            sizes = {"batch": batch, "s_q": 1, "topk": 2048}
            chosen = launch._choose_config([decode.V32_MLA_FP8], sizes, cuda, target)
            assert chosen == kernels.Config(**tuned)
            assert launch._choose_config([decode.V32_MLA_FP8, bf16], sizes, cuda, target) == kernels.Config(**tuned)
        default = kernels.default_config({**bf16, "target": target})
        assert launch._choose_config([bf16], {"batch": 8, "s_q": 1, "topk": 2048}, cuda, target) == default
        cpu_default = kernels.default_config({**CPU_DECODE, "target": dsl.CPU_TARGET})
        cpu = launch._choose_config([CPU_DECODE], {"batch": 8, "s_q": 1, "topk": 2048}, torch.device("cpu"),
                                    dsl.CPU_TARGET)  # fmt: skip
        assert cpu == cpu_default
    finally:
        select._checked.clear()


def test_a_stored_paged_selection_config_is_the_paged_plans_choice(
    monkeypatch: pytest.MonkeyPatch, cache_dirs: tuple[Path, Path]
) -> None:
    """The decode selection's plan asks for ``(batch, s_q, block-table width x page size)``: a config the tuner stored
    for that bucket (a paged ``index_topk`` case of ``autotune.lookup.decode``) is what its plan runs on a CUDA device
    (faked key, kernel build stubbed); without a block-table width the plan keeps the default."""
    user, _ = cache_dirs
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h100-sxm")
    monkeypatch.setattr(index_launch.common, "get_kernel", lambda *args, **kwargs: "kernel")
    q = torch.zeros(2, 1, 64, 128, dtype=torch.float8_e4m3fn)
    static = index_launch.paged_static_params(q, 2048, page_size=64, key_layout="paged")
    default = index_kernels.default_config({**static, "target": dsl.HOPPER_TARGET})
    tuned = {**dataclasses.asdict(default), "prefetch": not default.prefetch}
    sizes = {"batch": 2, "seq_len": 1, "seq_len_kv": 65536}
    tuned_cache.store("index_topk", static, sizes, tuned, sku="h100-sxm", cache_dir=user)
    made: list[dict[str, int] | None] = []
    real_make = index_launch._make

    def spy(static: dict[str, Any], sizes: dict[str, int] | None, device: torch.device, config: Any,
            s_q: int | None = None) -> Any:  # fmt: skip
        made.append(sizes)
        return real_make(static, sizes, torch.device("cuda", 0), config, s_q)

    monkeypatch.setattr(index_launch, "_make", spy)
    monkeypatch.setattr(index_launch.common, "target_for", lambda device: dsl.HOPPER_TARGET)
    try:
        p = index_launch.plan_paged(q, 2048, page_size=64, key_layout="paged", max_pages=65536 // 64)
        assert made == [sizes] and p.config == index_kernels.Config(**tuned)
        assert index_launch.plan_paged(q, 2048, page_size=64, key_layout="paged").config == default
        # Key rows, two MTP queries and nothing tuned: the launcher's rule (both queries in one block).
        mtp = torch.zeros(2, 2, 64, 128, dtype=torch.float8_e4m3fn)
        rows = index_launch.plan_paged(mtp, 2048, page_size=64, max_pages=1024).config
        assert rows == dataclasses.replace(index_kernels.default_config({**index_launch.paged_static_params(
            mtp, 2048, page_size=64), "target": dsl.HOPPER_TARGET}), q_rows=128)  # fmt: skip
    finally:
        select._checked.clear()
        index_launch._PAGED_PLANS.clear()


def test_mtp_rule_puts_both_queries_of_a_step_in_one_block_over_key_rows() -> None:
    """``mtp_default``: on sm_90a at V3.2 (64 heads x 128 FP8 key rows, top-2048) two or more queries a sequence get
    ``q_rows`` 128 (two queries a block, about 117 KB: it fits); one query, key pages, or a default block that already
    holds two queries (the C target's 4 heads) keep the default (``None``)."""
    hopper = dsl.HOPPER_TARGET
    for s_q in (2, 3, 4):
        q = torch.zeros(1, s_q, 64, 128, dtype=torch.float8_e4m3fn)
        static = index_launch.paged_static_params(q, 2048, page_size=64)
        got = index_launch.mtp_default(static, s_q, hopper)
        assert got is not None and got.q_rows == 128
        assert index_kernels.smem_bytes(static, got) <= dsl.smem_limit_bytes(hopper)
    q = torch.zeros(1, 2, 64, 128, dtype=torch.float8_e4m3fn)
    assert index_launch.mtp_default(index_launch.paged_static_params(q, 2048, page_size=64), 1, hopper) is None
    pages = index_launch.paged_static_params(q, 2048, page_size=64, key_layout="paged")
    assert index_launch.mtp_default(pages, 2, hopper) is None
    small = index_launch.paged_static_params(torch.zeros(1, 2, 4, 32, dtype=torch.float8_e4m3fn), 16, page_size=16)
    assert index_launch.mtp_default(small, 2, dsl.CPU_TARGET) is None


@pytest.mark.parametrize("widths", [(24, 8), (8, 24)])
def test_the_plan_asks_for_its_shape_key_and_runs_the_answer(monkeypatch: pytest.MonkeyPatch, widths: tuple) -> None:
    """A decode plan asks ``common.select_config`` once, for the widest source's static parameters (DeepSeek-V4's
    selected entries beside its window) and the sizes ``batch``, ``s_q`` and that source's width, and builds both
    sources' kernels with the answer (nothing compiled: the kernel getter is faked)."""
    from dsa.launch import common

    asked: list[tuple[Any, ...]] = []
    answer = dataclasses.replace(kernels.default_config({**CPU_DECODE, "target": dsl.CPU_TARGET}), block_k=16)

    def select_config(name: str, module: Any, static: dict, sizes: dict, device: Any, target: Any = None) -> Any:
        asked.append((name, static, sizes))
        return answer

    monkeypatch.setattr(common, "select_config", select_config)
    monkeypatch.setattr(common, "get_kernel", lambda builder, target, **params: (builder.__name__, params))
    common.clear_plans()
    try:
        q = torch.zeros(3, 2, 5, 40, dtype=torch.bfloat16)
        fp8 = torch.zeros(4, 16, kv_format.FP8Layout.for_width(40, 8).bytes_per_token, dtype=torch.uint8)
        bf16 = torch.zeros(4, 16, 40, dtype=torch.bfloat16)
        planned = launch.plan(q, [fp8, bf16], list(widths), d_v=24, d_rope=8, has_sink=False)
    finally:
        common.clear_plans()
    widest = CPU_DECODE if widths[0] > widths[1] else launch.static_params(heads=5, d_qk=40, d_v=24, fp8_layout=None)
    assert asked == [(KERNEL, widest, {"batch": 3, "s_q": 2, "topk": 24})]
    assert planned is not None and planned.config == answer
    assert all(params["block_k"] == 16 for _, params in planned.attention)


# ----------------------------------------------------------------------------------------------------------------------
# The compile phase: each candidate with its variants
# ----------------------------------------------------------------------------------------------------------------------
COMPILED: list[dict[str, Any]] = []


def recording_compile(builder: Any, *, target: Any, report_cache_dir: Any = None, **params: Any) -> tuple[Any, Any]:
    """The fake kernel's compile, recorded; its ``width=16`` variant spills."""
    COMPILED.append(dict(params))
    prim, report = fake.fake_compile(builder, target=target, **params)
    report.registers += params["width"]
    report.spill_bytes += 8 * (params["width"] == 16)
    return prim, report


def test_each_candidate_compiles_with_its_variants(fake_kernel: Any, tmp_path: Path) -> None:
    """A spec's ``variants`` compile beside every candidate: the record shows the worst figures among them and the
    variant's problems, labelled, reject the candidate (the decode attention's ``direct`` kernel is one)."""
    spec = dataclasses.replace(space.spec(fake.KERNEL), compile_fn=f"{__name__}:recording_compile",
                               variants=({"width": 16},))  # fmt: skip
    space.register_kernel(spec)
    COMPILED.clear()
    result = tuner.tune(fake.options(tmp_path, defaults_only=True))
    (record,) = result.records
    assert [c["width"] for c in COMPILED] == [fake.STATIC["width"], 16]
    assert record.registers == 64 + 16 and record.spill_bytes == 8
    assert not record.ok and record.error.startswith("width=16: ")
    assert space.spec(KERNEL).variants == ({"direct": True},)


# ----------------------------------------------------------------------------------------------------------------------
# The runners on the C target
# ----------------------------------------------------------------------------------------------------------------------
def _run(kernel: str, static: dict[str, Any], sizes: dict[str, int]) -> tuple[runners.Runner, Any, Any, Any]:
    runner = runners.runner_for(kernel)
    inputs = runner.make_inputs(static, sizes, torch.device("cpu"), runners.SEED)
    config = space.kernel_module(kernel).default_config({**static, "target": dsl.CPU_TARGET})
    return runner, inputs, runner.launch(config, static, inputs), config


@pytest.mark.cpu_kernel
def test_decode_runner_accepts_the_kernel_and_rejects_planted_errors() -> None:
    """The tuner's gate for the decode attention (the default config, C target): the kernel passes, a 2 % scale error
    and an unwritten output do not, and the narrowed check (the first sequences, the cache cut to their pages)
    matches the full one."""
    sizes = {"batch": runners.CHECK_BATCHES + 1, "s_q": 2, "topk": 24}
    runner, inputs, out, _ = _run(KERNEL, CPU_DECODE, sizes)
    assert inputs["kv_cache"].shape[0] * inputs["kv_cache"].shape[1] >= sizes["batch"] * decode.CONTEXT_PER_TOPK * 24
    expected = runner.reference(CPU_DECODE, inputs)
    assert runner.compare(out, expected) is None
    assert runner.compare((out[0] * SCALE_ERROR, out[1]), expected) is not None
    assert runner.compare((testing.poison(out[0].clone()), out[1]), expected) is not None
    narrowed, narrowed_out = runner.narrow(inputs, out)
    assert narrowed["q"].shape[0] == runners.CHECK_BATCHES
    assert runner.compare(narrowed_out, runner.reference(CPU_DECODE, narrowed)) is None


@pytest.mark.cpu_kernel
def test_paged_selection_runner_accepts_the_kernel_and_rejects_planted_errors() -> None:
    """The ``index_topk`` runner on a paged (decode) case: the kernel's sets and scores equal the reference's, other
    rows' positions and a wrong score are rejected, the narrowed check matches."""
    sizes = {"batch": runners.CHECK_BATCHES + 1, "seq_len": 2, "seq_len_kv": 90}
    runner, inputs, out, _ = _run("index_topk", CPU_SELECTION, sizes)
    expected = runner.reference(CPU_SELECTION, inputs)
    assert runner.compare(out, expected) is None
    assert runner.compare((out[0].roll(1, dims=0), out[1]), expected) is not None
    assert runner.compare((out[0], out[1] + 1), expected) is not None
    narrowed, narrowed_out = runner.narrow(inputs, out)
    assert runner.compare(narrowed_out, runner.reference(CPU_SELECTION, narrowed)) is None


@pytest.mark.cpu_kernel
def test_gpu_phase_checks_times_and_stores_the_winner_the_launcher_reads(
    monkeypatch: pytest.MonkeyPatch, cache_dirs: tuple[Path, Path]
) -> None:
    """The tuner's GPU phase on a decode case, run on the C target with a fake clock (the prefetch candidate is the
    faster): both candidates pass the runner's check against the reference, the faster one is stored at every size
    point, and the launcher's lookup (a faked CUDA device key, configs checked for the C target) returns it. The
    candidates are the kernels ``test_cpu_fp8_prefetch_matches_the_plain_gather`` compiles."""
    from autotune import gpu_phase

    configs = [dataclasses.asdict(kernels.Config(prefetch=prefetch)) for prefetch in (False, True)]
    points = ({"batch": 2, "s_q": 1, "topk": 24}, {"batch": 8, "s_q": 2, "topk": 24})
    case = space.Case(KERNEL, dict(CPU_DECODE), points, {"batch": 3, "s_q": 2, "topk": 24})
    candidates = [
        tuner._Candidate(
            tuner.CompileJob(KERNEL, space.spec(KERNEL).module, space.spec(KERNEL).compile_fn,
                             tuned_cache.canonical(case.static), tuned_cache.canonical(config)),  # fmt: skip
            tuner.CompileResult(ok=True),
        )
        for config in configs
    ]
    real = runners.runner_for(KERNEL)
    launched: list[Any] = []

    def launch_and_record(config: Any, static: dict[str, Any], inputs: Any) -> Any:
        launched.append(config)
        return real.launch(config, static, inputs)

    def measure(call: Any, input_sets: list[Any], *, warmup: int, reps: int) -> float:
        call(input_sets[0])
        return 1.0 if launched[-1].prefetch else 2.0

    user, _ = cache_dirs
    options = tuner.TuneOptions(kernels=(KERNEL,), target=dsl.CPU_TARGET, progress=False, cache_dir=user)
    records, written, ok = gpu_phase.time_case(
        case, candidates, options, sku="h100-sxm", device=torch.device("cpu"),
        runner=dataclasses.replace(real, launch=launch_and_record), measure=measure,
    )  # fmt: skip
    assert ok and len(written) == 1 and all(r.error is None for r in records)
    assert [r.config["prefetch"] for r in records if r.chosen] == [True, True]
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h100-sxm")
    tuned_cache.clear_memory_cache()  # the store above went through the in-process cache too: read the files
    try:
        chosen = launch._choose_config([CPU_DECODE], {"batch": 4, "s_q": 2, "topk": 24}, torch.device("cuda", 0),
                                       dsl.CPU_TARGET)  # fmt: skip
    finally:
        select._checked.clear()
    assert chosen == kernels.Config(**configs[1])


# ----------------------------------------------------------------------------------------------------------------------
# The compile-only report (sm_90a)
# ----------------------------------------------------------------------------------------------------------------------
_V32_DEFAULT = dataclasses.asdict(kernels.default_config(decode.V32_MLA_FP8))
hopper_prebuilt = support.prebuilt_fixture(
    lambda: [(kernels.build, {**decode.V32_MLA_FP8, "prefetch": True, **direct}) for direct in ({}, {"direct": True})],
    "V3.2's default FP8 decode kernels, split and direct: the decode build tier's, so a session builds them once.",
)


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
def test_compile_only_report_lists_the_decode_attention(tmp_path: Path) -> None:
    """``dsa-autotune --compile-only --defaults-only --kernels sparse_mla_decode``: one record for V3.2's FP8 case, its
    default config compiled clean as both the split and the direct kernel (registers the larger of the two, within
    the table's), no times, nothing stored."""
    report = tmp_path / "report.json"
    out = io.StringIO()
    status = cli.main(["--compile-only", "--defaults-only", "--kernels", KERNEL, "--jobs", "1", "--no-progress",
                       "--report", str(report)], out=out)  # fmt: skip
    assert status == cli.EXIT_OK, out.getvalue()
    (record,) = json.loads(report.read_text())
    assert record["kernel"] == KERNEL and record["params"] == decode.V32_MLA_FP8 and record["config"] == _V32_DEFAULT
    assert record["ok"] and record["spill_bytes"] == 0 and record["mma"] == "wgmma" and record["latency_ms"] is None
    split_registers, smem = kernels.resources(kernels.KV_FORMAT_FP8, kernels.Config(**_V32_DEFAULT))
    assert record["registers"] >= split_registers and record["smem_bytes"] >= smem
    assert f"\n{KERNEL} on sm_90a  [" in "\n" + out.getvalue()

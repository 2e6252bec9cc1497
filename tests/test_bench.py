"""The benchmark (``dsa-bench``: ``benchmarks.bench`` over ``benchmarks.harness`` and ``benchmarks.inputs``) on a CPU:
a clear exit without a GPU, the cases' FLOP and byte counts, the harness itself on tiny cases (host clock, C-target
kernels), its check, and target evaluation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import bench, flops, harness, inputs
from benchmarks import cases as case_data
from dsa.launch import common
from tests.support import ROOT, SCRIPTS
from tests.support import run_python as _run

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("script", ["gpu_check.py", "bench.py"])
def test_without_gpu_exits_nonzero_with_one_line(script: str) -> None:
    proc = _run(str(SCRIPTS / script))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr
    assert proc.stdout.strip() == ""


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark cases and the dry run
# ----------------------------------------------------------------------------------------------------------------------
def test_causal_pairs_closed_form_matches_the_sum() -> None:
    for seq in range(0, 13):
        for seq_kv in range(0, 13):
            brute = sum(min(seq_kv, max(0, t + seq_kv - seq + 1)) for t in range(seq))
            assert flops.causal_pairs(seq, seq_kv) == brute, (seq, seq_kv)
    assert flops.causal_pairs(4096, 4096) == 4096 * 4097 // 2


def test_dry_run_lists_every_standard_case_with_hand_checked_counts(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    proc = _run(str(SCRIPTS / "bench.py"), "--dry-run", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    names = [c.name for c in case_data.standard_cases()]
    assert len(names) == 28 and len(set(names)) == len(names)  # 26 + the two quick decode cases
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s", proc.stdout, re.M), f"{name} missing from the dry-run table"
    rows = json.loads(out.read_text())["rows"]
    work = {r["case"]: r["value"] for r in rows if r["metric"] == "flops"}
    nbytes = {r["case"]: r["value"] for r in rows if r["metric"] == "bytes"}
    assert set(work) == set(names)
    # Worked by hand: 2 * H_i * D_i per visible pair, S(S+1)/2 visible pairs at S = S_kv.
    assert work["indexer-fp8-s4096"] == 2 * 64 * 128 * (4096 * 4097 // 2) == 137_472_507_904
    assert work["indexer-bf16-s65536"] == 2 * 64 * 128 * (65536 * 65537 // 2)
    # 2 * B * S * H * topk * (d_qk + d_v) forward, (3 d_qk + 2 d_v) backward.
    assert work["sparse_mla_fwd-prefill-s4096-kv8192"] == 2 * 1 * 4096 * 128 * 2048 * (576 + 512) == 2_336_462_209_024
    assert work["sparse_mla_fwd-prefill-s4096-kv65536"] == work["sparse_mla_fwd-prefill-s4096-kv8192"]
    assert work["sparse_mla_bwd-decode-b128-s2-kv32768"] == 2 * 128 * 2 * 128 * 2048 * (3 * 576 + 2 * 512)
    assert work["topk-rows4096-len8192"] == 0
    # Selection scores every causal pair like the indexer (the top-k adds no FLOP).
    assert work["selection-fp8-s131072"] == 2 * 64 * 128 * (131072 * 131073 // 2)
    # One read of the scores plus the indices written.
    assert nbytes["topk-rows4096-len131072"] == 4096 * 131072 * 4 + 4096 * 2048 * 4
    # The fused selection: the indexer's FLOPs; its reads (q, k, weights, k_scale) and the indices and scores written.
    assert work["index_topk-fp8-s4096"] == work["indexer-fp8-s4096"]
    reads = 4096 * 64 * 128 + 4096 * 128 + 4096 * 64 * 4 + 4096 * 4
    assert nbytes["index_topk-fp8-s4096"] == reads + 4096 * 2048 * (4 + 4)
    # The cost model (benchmarks.cost, H800 by default) beside every timed case: the table's columns and the rows.
    assert re.search(r"model us \(h800\)\s+roofline us\s+bound\s+waves\s+deq rows\s+flashmla model us", proc.stdout)
    model = {r["case"] for r in rows if r["metric"] == "model_ms" and r["provider"] == "-"}
    assert model == {c.name for c in case_data.standard_cases() if c.kernel not in case_data.MEMORY_KINDS}
    waves = {r["case"]: r["value"] for r in rows if r["metric"] == "model_waves"}
    assert set(waves) == {n for n in names if n.startswith(case_data.DECODE_KINDS)}


def test_tune_small_shapes_are_valid_for_the_tuner() -> None:
    from autotune.lookup import space

    shapes = ROOT / "benchmarks" / "tune_small.json"
    found = space.preset_cases(shapes)
    assert {c.kernel for c in found} == set(space.KERNEL_NAMES)
    for case in found:
        assert space.candidates(case.kernel, case.static), f"no candidate configs for {case.kernel} {case.static}"


# ----------------------------------------------------------------------------------------------------------------------
# The harness on a CPU (tiny cases, host clock, the reference or C-target kernels behind dsa.ops)
# ----------------------------------------------------------------------------------------------------------------------
def test_harness_runs_tiny_cases_on_cpu(tmp_path: Path) -> None:
    """``scripts/bench.py`` (a thin entry point of ``dsa-bench``) on the C-target kernels: timings, checks, rows."""
    out = tmp_path / "tiny.json"
    proc = _run(
        str(SCRIPTS / "bench.py"),
        "--device",
        "cpu",
        "--tiny",
        "--kernels",
        "topk,sparse_mla_fwd,sparse_mla_bwd",
        "--reps",
        "2",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    checks = {r["case"]: r["value"] for r in rows if r["metric"] == "check"}
    # The checks run the C-target kernels (DSA_BACKEND=tilelang) against the reference.
    assert checks == {"tiny-topk": True, "tiny-sparse_mla_fwd": True, "tiny-sparse_mla_bwd": True}
    timed = {(r["case"], r["provider"]) for r in rows if r["metric"] == "latency_ms"}
    assert {("tiny-topk", "dsa"), ("tiny-topk", "torch.topk"), ("tiny-sparse_mla_fwd", "dense-matmul")} <= timed
    for r in rows:
        assert {"kernel", "provider", "case", "metric", "value", "unit", "gpu", "versions", "commit"} <= set(r)
    assert any(r["metric"] == "speedup_vs_torch.topk" for r in rows)
    assert "tiny-sparse_mla_fwd" in proc.stdout  # the summary table


def _unwritten_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, **kw: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse_mla (forward or decode) launcher that returns its outputs unwritten (poisoned): the benchmark's
    correctness check must catch it. ``q [B, S, H, D]``; ``out [B, S, H, d_v]`` in q's dtype, ``lse [B, S, H]``
    float32."""
    b, s, h, _ = q.shape
    out = common.new_output((b, s, h, int(kw["d_v"])), q.dtype, q.device)
    return out, common.new_output((b, s, h), torch.float32, q.device)


def test_check_catches_unwritten_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs the launcher with poisoned outputs: a launcher that writes nothing fails it."""
    from dsa.launch import sparse_mla_fwd, topk

    by_kernel = {c.kernel: c for c in case_data.tiny_cases()}
    topk_case, fwd_case = by_kernel["topk"], by_kernel["sparse_mla_fwd"]
    topk_inp = inputs.make_inputs(topk_case, torch.device("cpu"), seed=1)
    fwd_inp = inputs.make_inputs(fwd_case, torch.device("cpu"), seed=1)
    assert inputs.check_dsa(topk_case, topk_inp) is None
    assert inputs.check_dsa(fwd_case, fwd_inp) is None

    def unwritten_topk(scores: torch.Tensor, k: int, **kw: object) -> torch.Tensor:
        return common.new_output((*scores.shape[:-1], k), torch.int32, scores.device)

    monkeypatch.setattr(topk, "topk_indices", unwritten_topk)
    monkeypatch.setattr(sparse_mla_fwd, "sparse_mla_fwd", _unwritten_mla)
    assert inputs.check_dsa(topk_case, topk_inp) is not None
    problem = inputs.check_dsa(fwd_case, fwd_inp)
    assert problem is not None and "mismatch" in problem


def test_targets_are_evaluated_against_ceilings() -> None:
    case = case_data.Case(
        "indexer", "x", {}, {}, flops=7e11, bytes=1e9, targets=(case_data.Target("tflops", 0.6, of="fp8_tflops"),)
    )
    met = harness.target_rows(case, {"dsa": 1.0}, {"fp8_tflops": 1000.0})  # 700 TFLOP/s = 70 %
    assert met[0]["value"] == pytest.approx(0.7) and met[0]["note"].endswith("met")
    missed = harness.target_rows(case, {"dsa": 2.0}, {"fp8_tflops": 1000.0})
    assert missed[0]["note"].endswith("missed")
    absent = harness.target_rows(case, {"dsa": 1.0}, {})
    assert absent[0]["value"] is None and "not evaluated" in absent[0]["note"]
    speed = case_data.Case("topk", "y", {}, {}, 0.0, 1e9, (case_data.Target("speedup", 10.0, against="torch.topk"),))
    assert harness.target_rows(speed, {"dsa": 1.0, "torch.topk": 12.0}, {})[0]["note"].endswith("met")


# ----------------------------------------------------------------------------------------------------------------------
# Decode cases (paged caches): counts, the default run, inputs, providers and the check on a CPU
# ----------------------------------------------------------------------------------------------------------------------
def test_decode_cases_are_well_formed_with_hand_checked_counts() -> None:
    from dsa import cache

    found = {c.name: c for c in case_data.standard_cases(case_data.DECODE_KINDS, full=True)}
    # FP8: B in (1, 32, 128) x s_q in (1, 2) x 8K/32K/128K, one bf16 case; the indexer: B in (1, 32) x 3 contexts.
    assert len(found) == 18 + 1 + 6
    assert {n for n, c in found.items() if c.quick} == set(case_data.QUICK_DECODE)
    for case in found.values():
        assert case.context == case.sizes["seq_len_kv"] and case.flops > 0 and case.bytes > 0
        if case.kernel == case_data.SPARSE_MLA_DECODE:
            assert case.static == {"heads": 128, "d_qk": 576, "d_v": 512, "d_rope": 64, "page_size": 64,
                                   "kv_format": case.static["kv_format"]}  # fmt: skip
            assert case.sizes["topk"] == 2048
        else:
            assert case.static == {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "topk": 2048, "page_size": 64}
    # Row bytes as stored: FlashMLA's V3.2 FP8 row, the indexer's FP8 key row (128 bytes and a float32 scale).
    assert flops.fp8_kv_row_bytes(576, 64) == cache.V32_FP8_LAYOUT.bytes_per_token == 656
    assert flops.fp8_kv_row_bytes(128, 64) == cache.FP8Layout.for_width(128, 64).bytes_per_token
    assert cache.index_key_layout(128).bytes_per_token == 132
    # FLOPs 2 B s_q H topk (d_qk + d_v); bytes: B s_q topk gathered rows + q + out.
    fp8 = found["sparse_mla_decode-fp8-b128-s2-kv32768"]
    assert fp8.flops == 2 * 128 * 2 * 128 * 2048 * (576 + 512)
    assert fp8.bytes == 128 * 2 * 2048 * 656 + 128 * 2 * 128 * 576 * 2 + 128 * 2 * 128 * 512 * 2
    bf16 = found["sparse_mla_decode-bf16-b128-s2-kv32768"]
    assert bf16.flops == fp8.flops and bf16.bytes == 128 * 2 * 2048 * 576 * 2 + 128 * 2 * 128 * (576 + 512) * 2
    assert found["sparse_mla_decode-fp8-b1-s1-kv8192"].bytes == 2048 * 656 + 128 * (576 + 512) * 2
    # The context changes neither: only topk rows are read.
    assert found["sparse_mla_decode-fp8-b1-s1-kv131072"].flops == found["sparse_mla_decode-fp8-b1-s1-kv8192"].flops
    # The indexer: 2 B s_q H L D FLOPs, every key row (132 bytes) of every sequence read once.
    index = found["index_topk_decode-fp8-b32-s1-kv131072"]
    assert index.flops == 2 * 32 * 1 * 64 * 131072 * 128
    assert index.bytes == 131072 * 132 * 32


def test_default_run_leaves_out_the_decode_sweep() -> None:
    default = {c.name for c in bench.select_cases("all", None)}
    full = {c.name for c in bench.select_cases("all", None, full=True)}
    assert set(case_data.QUICK_DECODE) <= default < full
    assert len({n for n in full - default if not n.startswith("v4_")}) == 25 - len(case_data.QUICK_DECODE)
    # Naming a case runs it without --full.
    named = bench.select_cases("sparse_mla_decode", "sparse_mla_decode-fp8-b1-s1-kv8192")
    assert [c.name for c in named] == ["sparse_mla_decode-fp8-b1-s1-kv8192"]
    assert {c.name for c in bench.select_cases("index_topk_decode", None)} == {"index_topk_decode-fp8-b32-s1-kv32768"}


def test_decode_inputs_and_providers_on_cpu() -> None:
    """The tiny decode cases' inputs: distinct visible positions as slots of each sequence's own pages, integer
    indexer inputs; every provider that runs on a CPU agrees with the reference (FlashMLA's call through the
    ``dsa.compat`` entry points, which take the same arguments)."""
    from benchmarks import providers as bench_providers
    from dsa import cache, compat, reference

    by_kernel = {c.kernel: c for c in case_data.tiny_cases(case_data.DECODE_KINDS)}
    mla = by_kernel[case_data.SPARSE_MLA_DECODE]
    inp = inputs.make_inputs(mla, torch.device("cpu"), seed=3)
    batch, s_q, context, topk = (mla.sizes[k] for k in ("batch", "seq_len", "seq_len_kv", "topk"))
    assert inp["kv_cache"].dtype == torch.uint8 and inp["kv_cache"].shape[-1] == flops.fp8_kv_row_bytes(128, 64)
    assert inp["indices"].shape == (batch, s_q, topk) and inp["indices"].dtype == torch.int32
    page = mla.static["page_size"]
    for b in range(batch):
        pages = inp["block_table"][b].tolist()
        for t in range(s_q):
            slots = inp["indices"][b, t].tolist()
            assert len(set(slots)) == topk and all(s // page in pages for s in slots)  # distinct, the sequence's own
            positions = [pages.index(s // page) * page + s % page for s in slots]
            assert max(positions) < context - s_q + t + 1  # only what query t sees
    assert inp["cache_seqlens"].tolist() == [context] * batch
    want_out, want_lse = reference.sparse_mla_decode(
        inp["q"], inp["kv_cache"], inp["indices"], sm_scale=inp["sm_scale"], d_v=inp["d_v"], d_rope=inp["d_rope"]
    )
    providers = {p.name: p for p in bench_providers.providers_for(mla)}
    assert list(providers) == ["dsa", "reference", "flashmla"]
    for name in ("dsa", "reference"):
        out, lse = providers[name].fn(inp)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse), name
    out, lse = bench_providers.flashmla_decode(inp, compat)
    assert torch.equal(out, want_out) and torch.equal(lse.transpose(1, 2), want_lse)
    bf16 = next(c for c in case_data.standard_cases((case_data.SPARSE_MLA_DECODE,), full=True) if "bf16" in c.name)
    assert "FP8" in next(p for p in bench_providers.providers_for(bf16) if p.name == "flashmla").skip

    index = by_kernel[case_data.INDEX_TOPK_DECODE]
    inp = inputs.make_inputs(index, torch.device("cpu"), seed=3)
    assert inp["k_cache"].dtype == torch.uint8 and inp["k_cache"].shape[-1] == index.static["dim"] + 4
    keys, scale = cache.unpack_index_keys_fp8(inp["k_cache"], index.static["dim"])
    assert torch.equal(keys.float(), keys.float().round()) and torch.equal(scale, torch.exp2(scale.log2().round()))
    assert sorted(inp["block_table"].flatten().tolist()) == list(range(inp["k_cache"].shape[0]))
    assert inp["ends"].tolist() == [[index.sizes["seq_len_kv"]]] * index.sizes["batch"]
    results = [p.fn(inp) for p in bench_providers.providers_for(index)]
    assert [p.name for p in bench_providers.providers_for(index)] == ["dsa", "reference"]
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results)


def test_decode_check_catches_unwritten_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode check runs the launchers (the C-target kernels here) with poisoned outputs: a launcher that writes
    nothing fails it, and so does a selection that is off by one position."""
    from dsa.launch import index_topk, sparse_mla_decode

    by_kernel = {c.kernel: c for c in case_data.tiny_cases(case_data.DECODE_KINDS)}
    mla, index = by_kernel[case_data.SPARSE_MLA_DECODE], by_kernel[case_data.INDEX_TOPK_DECODE]
    mla_inp = inputs.make_inputs(mla, torch.device("cpu"), seed=1)
    index_inp = inputs.make_inputs(index, torch.device("cpu"), seed=1)
    assert inputs.check_dsa(mla, mla_inp) is None
    assert inputs.check_dsa(index, index_inp) is None
    real_paged = index_topk.index_topk_paged

    def shifted(*args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        positions, scores = real_paged(*args, **kw)
        return torch.where(positions > 0, positions - 1, positions), scores

    monkeypatch.setattr(sparse_mla_decode, "sparse_mla_decode", _unwritten_mla)
    monkeypatch.setattr(index_topk, "index_topk_paged", shifted)
    problem = inputs.check_dsa(mla, mla_inp)
    assert problem is not None and "mismatch" in problem
    problem = inputs.check_dsa(index, index_inp)
    assert problem is not None and "mismatch" in problem


def test_harness_runs_tiny_decode_cases_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny-decode.json"
    proc = _run(
        str(SCRIPTS / "bench.py"), "--device", "cpu", "--tiny", "--kernels", "sparse_mla_decode,index_topk_decode",
        "--reps", "2", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    checks = {r["case"]: r["value"] for r in rows if r["metric"] == "check"}
    assert checks == {"tiny-sparse_mla_decode": True, "tiny-index_topk_decode": True}
    timed = {(r["case"], r["provider"]) for r in rows if r["metric"] == "latency_ms"}
    assert {("tiny-sparse_mla_decode", "dsa"), ("tiny-sparse_mla_decode", "reference"),
            ("tiny-index_topk_decode", "dsa"), ("tiny-index_topk_decode", "reference")} <= timed  # fmt: skip
    flashmla = [r for r in rows if r["case"] == "tiny-sparse_mla_decode" and r["provider"] == "flashmla"
                and not r["metric"].startswith(("model_", "roofline_"))]  # fmt: skip
    assert flashmla and flashmla[0]["metric"] in ("skipped", "latency_ms")
    # The cost model beside each timed case (H800's figures on a CPU host): dsa's time as a multiple of it.
    modelled = {(r["case"], r["provider"]) for r in rows if r["metric"] == "model_ms"}
    assert {("tiny-sparse_mla_decode", "-"), ("tiny-sparse_mla_decode", "flashmla"),
            ("tiny-index_topk_decode", "-")} <= modelled  # fmt: skip
    assert {r["case"] for r in rows if r["metric"] == "time_vs_model" and r["provider"] == "dsa"} == set(checks)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSeek-V4 cases (benchmarks.v4) and the memory of one layer's CPU prefill (benchmarks.memory_v4)
# ----------------------------------------------------------------------------------------------------------------------
def test_v4_pair_counts_match_the_loops() -> None:
    for seq in range(0, 70):
        for window in (1, 3, 8):
            assert flops.v4_window_pairs(seq, window) == sum(min(window, t + 1) for t in range(seq))
        for rate, topk in ((1, 3), (4, 2), (4, 5), (7, 1), (4, None), (16, None)):
            want = sum(min(topk, (t + 1) // rate) if topk else (t + 1) // rate for t in range(seq))
            assert flops.v4_compressed_pairs(seq, rate, topk) == want, (seq, rate, topk)


def test_v4_cases_exist_with_hand_checked_counts() -> None:
    """V4-Flash and V4-Pro prefill (CSA and HCA, 8K-128K) and CSA decode (B 1/32/128, s_q 1/2, MODEL1 FP8 and bf16)
    cases, none in the default run; counts worked by hand at 8K and B = 128, s_q = 2."""
    from dsa import kv_format

    v4 = {c.name: c for c in case_data.standard_cases(case_data.V4_KINDS, full=True)}
    assert len(v4) == 2 * 2 * 4 + 2 * 2 * 3 * 2
    assert not {c.name for c in bench.select_cases("all", None)} & set(v4)
    assert {c.name for c in bench.select_cases("all", "v4_")} == set(v4)  # naming them runs them
    hca = v4["v4_prefill-flash-hca-s8192"]
    # Window: 128 * 129 / 2 pairs for the first 128 queries, 128 each after; HCA: sum of (t + 1) // 128.
    window_pairs = 128 * 129 // 2 + (8192 - 128) * 128
    entry_pairs = sum((t + 1) // 128 for t in range(8192))
    assert hca.flops == 2 * 64 * (window_pairs + entry_pairs) * (512 + 512)
    rows = (window_pairs + entry_pairs) * 512 * 2
    assert hca.bytes == 8192 * 64 * 512 * 2 + rows + 8192 * 64 * (512 * 2 + 4)  # q, rows, out + lse; no indices
    csa = v4["v4_prefill-pro-csa-s8192"]
    csa_pairs = sum(min(1024, (t + 1) // 4) for t in range(8192))
    assert csa.flops == 2 * 128 * (window_pairs + csa_pairs) * 1024 and csa.static["heads"] == 128
    decode = v4["v4_decode-pro-fp8-b128-s2-kv32768"]
    assert kv_format.MODEL1_FP8_LAYOUT.bytes_per_token == 584
    assert decode.flops == 2 * 128 * 2 * 128 * (128 + 1024) * 1024
    assert decode.bytes == 256 * ((128 + 1024) * 584 + 1024 * 4) + 256 * 128 * (512 * 2 * 2 + 4)
    bf16 = v4["v4_decode-pro-bf16-b128-s2-kv32768"]
    assert bf16.bytes - decode.bytes == 256 * (128 + 1024) * (1024 - 584)


def test_v4_dry_run_lists_the_cases_with_the_cost_model() -> None:
    selected = bench.select_cases("all", "v4_prefill-flash-csa-s8192,v4_decode-flash-fp8-b32")
    lines = {line.split()[0]: line.split() for line in bench.format_dry_run(selected).splitlines()[1:]}
    assert set(lines) == {"v4_prefill-flash-csa-s8192", "v4_decode-flash-fp8-b32-s1-kv32768",
                          "v4_decode-flash-fp8-b32-s2-kv32768"}  # fmt: skip
    # GFLOP, MB, FLOP/B, the model's time (dsa: the roofline of the counts), ..., FlashMLA's modelled MODEL1 decode.
    assert float(lines["v4_decode-flash-fp8-b32-s1-kv32768"][4]) > 0
    assert float(lines["v4_decode-flash-fp8-b32-s1-kv32768"][9]) > 0
    assert lines["v4_prefill-flash-csa-s8192"][9] == "-"
    rows = bench.dry_run_rows(selected)
    assert {r["case"] for r in rows if r["metric"] == "flops"} == set(lines)


@pytest.fixture
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ops on the reference: the tiny V4 cases check the inputs, providers and check plumbing without building
    the 64- and 512-wide two-source kernels on the CPU (the GPU tier runs those)."""
    monkeypatch.setenv("DSA_BACKEND", "reference")


def test_v4_spread_selection_is_distinct_visible_and_padded() -> None:
    from benchmarks import v4

    g = torch.Generator().manual_seed(0)
    visible = torch.tensor([0, 1, 5, 8, 9, 100, 4096])
    picks = v4.spread_selection(visible, 8, g)
    for row, v in zip(picks.tolist(), visible.tolist(), strict=True):
        valid = [p for p in row if p >= 0]
        assert len(valid) == min(8, v) == len(set(valid)) and all(p < v for p in valid)
        assert row[len(valid):] == [-1] * (8 - len(valid))  # fmt: skip
    assert int(picks[-1].max()) > 4096 * 7 // 8  # spread over the whole visible range


def test_v4_tiny_prefill_inputs_providers_and_check(reference_backend: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny V4 prefill cases: window ranges ``[t - W + 1, t + 1)``, CSA's selection among the visible entries,
    HCA's entry range; the CPU providers agree; the check passes, and fails when the op writes nothing."""
    from benchmarks import providers as bench_providers
    from benchmarks import v4

    by_name = {c.name: c for c in case_data.tiny_cases(case_data.V4_KINDS)}
    csa, hca = by_name["tiny-v4_prefill-csa"], by_name["tiny-v4_prefill-hca"]
    for case in (csa, hca):
        inp = inputs.make_inputs(case, torch.device("cpu"), seed=2)
        seq, window, rate = case.sizes["seq_len"], case.static["window"], case.static["rate"]
        t = torch.arange(seq)
        assert torch.equal(inp["ranges"][0, :, 0], (t - window + 1).clamp_min(0).int())
        assert torch.equal(inp["ranges"][0, :, 1], (t + 1).int())
        if case is csa:
            sel = inp["extra_indices"][0]
            assert bool(((sel < ((t + 1) // rate).view(-1, 1)) | (sel == -1)).all())
        else:
            assert torch.equal(inp["extra_ranges"][0, :, 1], ((t + 1) // rate).int())
        results = {p.name: p.fn(inp) for p in bench_providers.providers_for(case) if not p.skip}
        assert set(results) == {"dsa", "reference"}
        assert torch.equal(results["dsa"][0], results["reference"][0])
        assert inputs.check_dsa(case, inp) is None
    monkeypatch.setattr(v4.ops, "sparse_mla", lambda q, kv, **kw: (torch.full_like(q, float("nan")),
                                                                   torch.zeros(q.shape[:3])))  # fmt: skip
    problem = inputs.check_dsa(csa, inputs.make_inputs(csa, torch.device("cpu"), seed=2))
    assert problem is not None and "mismatch" in problem


def test_v4_tiny_decode_inputs_providers_and_check(reference_backend: None) -> None:
    """The tiny V4 decode case: MODEL1 FP8 pages, the window as a range, the entries as slots; ``dsa``, the reference
    and FlashMLA's call (through ``dsa.compat``) agree, and the check passes."""
    from benchmarks import providers as bench_providers
    from benchmarks import v4
    from dsa import compat

    decode = next(c for c in case_data.tiny_cases(case_data.V4_KINDS) if c.name == "tiny-v4_decode")
    inp = inputs.make_inputs(decode, torch.device("cpu"), seed=2)
    assert inp["kv_cache"].dtype == torch.uint8 and inp["kv_cache"].shape[-1] == 584
    results = {p.name: p.fn(inp) for p in bench_providers.providers_for(decode) if not p.skip}
    out, lse = v4.flashmla_decode(inp, compat)
    assert torch.equal(out, results["reference"][0]) and torch.equal(results["dsa"][0], results["reference"][0])
    assert inputs.check_dsa(decode, inp) is None


def test_v4_layer_memory_record_and_table_at_tiny_sizes() -> None:
    """benchmarks.memory_v4 at a hundred tokens (narrow heads, window 8): both layer kinds run through the ops, each
    record counts its inputs and output; the table reports the working memory's growth between lengths."""
    from benchmarks import memory_v4

    records = []
    for kind in memory_v4.KINDS:
        layer = memory_v4.V4Layer.of(kind, heads=2, head_dim=64, window=8, index_heads=2, index_dim=32, topk=8,
                                     **({"rate": 16} if kind == "hca" else {}))  # fmt: skip
        record = memory_v4.memory_record(layer, 128)
        assert record["output_bytes"] == 128 * 2 * 64 * 4 and record["peak_increase_bytes"] >= 0
        assert record["input_bytes"] > record["output_bytes"]
        records.append(record)
    mib = 1 << 20
    hca = [{**records[1], "seq_len": n, "output_bytes": n * mib // 64, "peak_increase_bytes": n * mib // 32}
           for n in (1024, 2048)]  # fmt: skip
    table = memory_v4.memory_table([records[0], *hca])
    assert "| CSA | 128 |" in table and "| HCA | 2048 | " in table and "2.00x for 2x S" in table

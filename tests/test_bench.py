"""The benchmark (``dsa-bench``, ``autotune.bench``) on a CPU: a clear exit without a GPU, the cases' FLOP and byte
counts, the harness itself on tiny cases (host clock, C-target kernels), its check, and target evaluation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from autotune import bench, flops
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
    assert len(names) == 26 and len(set(names)) == len(names)
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


def test_tune_small_shapes_are_valid_for_the_tuner() -> None:
    from autotune import space

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


def test_check_catches_unwritten_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs the launcher with poisoned outputs: a launcher that writes nothing fails it."""
    from dsa.launch import sparse_mla_fwd, topk

    by_kernel = {c.kernel: c for c in case_data.tiny_cases()}
    topk_case, fwd_case = by_kernel["topk"], by_kernel["sparse_mla_fwd"]
    topk_inp = bench.make_inputs(topk_case, torch.device("cpu"), seed=1)
    fwd_inp = bench.make_inputs(fwd_case, torch.device("cpu"), seed=1)
    assert bench.check_dsa(topk_case, topk_inp) is None
    assert bench.check_dsa(fwd_case, fwd_inp) is None

    def unwritten_topk(scores: torch.Tensor, k: int, **kw: object) -> torch.Tensor:
        return common.new_output((*scores.shape[:-1], k), torch.int32, scores.device)

    def unwritten_mla(
        q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, **kw: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h, _ = q.shape
        out = common.new_output((b, s, h, int(kw["d_v"])), q.dtype, q.device)
        return out, common.new_output((b, s, h), torch.float32, q.device)

    monkeypatch.setattr(topk, "topk_indices", unwritten_topk)
    monkeypatch.setattr(sparse_mla_fwd, "sparse_mla_fwd", unwritten_mla)
    assert bench.check_dsa(topk_case, topk_inp) is not None
    problem = bench.check_dsa(fwd_case, fwd_inp)
    assert problem is not None and "mismatch" in problem


def test_targets_are_evaluated_against_ceilings() -> None:
    case = case_data.Case(
        "indexer", "x", {}, {}, flops=7e11, bytes=1e9, targets=(case_data.Target("tflops", 0.6, of="fp8_tflops"),)
    )
    met = bench.target_rows(case, {"dsa": 1.0}, {"fp8_tflops": 1000.0})  # 700 TFLOP/s = 70 %
    assert met[0]["value"] == pytest.approx(0.7) and met[0]["note"].endswith("met")
    missed = bench.target_rows(case, {"dsa": 2.0}, {"fp8_tflops": 1000.0})
    assert missed[0]["note"].endswith("missed")
    absent = bench.target_rows(case, {"dsa": 1.0}, {})
    assert absent[0]["value"] is None and "not evaluated" in absent[0]["note"]
    speed = case_data.Case("topk", "y", {}, {}, 0.0, 1e9, (case_data.Target("speedup", 10.0, against="torch.topk"),))
    assert bench.target_rows(speed, {"dsa": 1.0, "torch.topk": 12.0}, {})[0]["note"].endswith("met")

"""The command-line scripts on a CPU: gpu_check and bench degrade clearly without a GPU, the benchmark cases carry the
right FLOP and byte counts, the harness itself runs (tiny cases, host clock), and fuzz.py runs, counts examples and
keeps failures."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cases() -> ModuleType:
    return _load("dsa_benchmark_cases", ROOT / "benchmarks" / "cases.py")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("dsa_script_bench", SCRIPTS / "bench.py")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _load("dsa_script_gpu_check", SCRIPTS / "gpu_check.py")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------------
# No GPU: a clear one-line message and a non-zero exit
# ----------------------------------------------------------------------------------------------------------------------
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
def test_causal_pairs_matches_brute_force(cases: ModuleType) -> None:
    for seq in range(0, 13):
        for seq_kv in range(0, 13):
            brute = sum(min(seq_kv, max(0, t + seq_kv - seq + 1)) for t in range(seq))
            assert cases.causal_pairs(seq, seq_kv) == brute, (seq, seq_kv)
    assert cases.causal_pairs(4096, 4096) == 4096 * 4097 // 2


def test_dry_run_lists_every_standard_case_with_hand_checked_counts(cases: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    proc = _run(str(SCRIPTS / "bench.py"), "--dry-run", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    names = [c.name for c in cases.standard_cases()]
    assert len(names) == 19 and len(set(names)) == len(names)
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s", proc.stdout, re.M), f"{name} missing from the dry-run table"
    rows = json.loads(out.read_text())["rows"]
    flops = {r["case"]: r["value"] for r in rows if r["metric"] == "flops"}
    nbytes = {r["case"]: r["value"] for r in rows if r["metric"] == "bytes"}
    assert set(flops) == set(names)
    # Worked by hand: 2 * H_i * D_i per visible pair, S(S+1)/2 visible pairs at S = S_kv.
    assert flops["indexer-fp8-s4096"] == 2 * 64 * 128 * (4096 * 4097 // 2) == 137_472_507_904
    assert flops["indexer-bf16-s65536"] == 2 * 64 * 128 * (65536 * 65537 // 2)
    # 2 * B * S * H * topk * (d_qk + d_v) forward, (3 d_qk + 2 d_v) backward.
    assert flops["sparse_mla_fwd-prefill-s4096-kv8192"] == 2 * 1 * 4096 * 128 * 2048 * (576 + 512) == 2_336_462_209_024
    assert flops["sparse_mla_fwd-prefill-s4096-kv65536"] == flops["sparse_mla_fwd-prefill-s4096-kv8192"]
    assert flops["sparse_mla_bwd-decode-b128-s2-kv32768"] == 2 * 128 * 2 * 128 * 2048 * (3 * 576 + 2 * 512)
    assert flops["topk-rows4096-len8192"] == 0
    # One read of the scores plus the indices written.
    assert nbytes["topk-rows4096-len131072"] == 4096 * 131072 * 4 + 4096 * 2048 * 4


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
    # The backward's check runs the C-target kernels against the reference (the bench calls them positionally).
    assert checks == {"tiny-topk": True, "tiny-sparse_mla_fwd": True, "tiny-sparse_mla_bwd": True}
    timed = {(r["case"], r["provider"]) for r in rows if r["metric"] == "latency_ms"}
    assert {("tiny-topk", "dsa"), ("tiny-topk", "torch.topk"), ("tiny-sparse_mla_fwd", "dense-matmul")} <= timed
    for r in rows:
        assert {"kernel", "provider", "case", "metric", "value", "unit", "gpu", "versions", "commit"} <= set(r)
    assert any(r["metric"] == "speedup_vs_torch.topk" for r in rows)
    assert "tiny-sparse_mla_fwd" in proc.stdout  # the summary table


def test_check_catches_unwritten_outputs(bench: ModuleType, cases: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsa import ops
    from tests.helpers import poison

    monkeypatch.setitem(bench._DEVICE, "type", "cpu")
    by_kernel = {c.kernel: c for c in cases.tiny_cases()}
    topk_case, fwd_case = by_kernel["topk"], by_kernel["sparse_mla_fwd"]
    topk_inp = bench.make_inputs(topk_case, torch.device("cpu"), seed=1)
    fwd_inp = bench.make_inputs(fwd_case, torch.device("cpu"), seed=1)
    assert bench.check_dsa(topk_case, topk_inp) is None
    assert bench.check_dsa(fwd_case, fwd_inp) is None

    def unwritten_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
        return poison(torch.empty(*scores.shape[:-1], k, dtype=torch.int32))

    def unwritten_mla(
        q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, **kw: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h, _ = q.shape
        return poison(torch.empty(b, s, h, int(kw["d_v"]), dtype=q.dtype)), poison(torch.empty(b, s, h))

    monkeypatch.setattr(ops, "topk_indices", unwritten_topk)
    monkeypatch.setattr(ops, "sparse_mla", unwritten_mla)
    assert bench.check_dsa(topk_case, topk_inp) is not None
    problem = bench.check_dsa(fwd_case, fwd_inp)
    assert problem is not None and "mismatch" in problem


def test_targets_are_evaluated_against_ceilings(bench: ModuleType, cases: ModuleType) -> None:
    case = cases.Case(
        "indexer", "x", {}, flops=7e11, bytes=1e9, targets=(cases.Target("tflops", 0.6, of="fp8_tflops"),)
    )
    met = bench.target_rows(case, {"dsa": 1.0}, {"fp8_tflops": 1000.0})  # 700 TFLOP/s = 70 %
    assert met[0]["value"] == pytest.approx(0.7) and met[0]["note"].endswith("met")
    missed = bench.target_rows(case, {"dsa": 2.0}, {"fp8_tflops": 1000.0})
    assert missed[0]["note"].endswith("missed")
    absent = bench.target_rows(case, {"dsa": 1.0}, {})
    assert absent[0]["value"] is None and "not evaluated" in absent[0]["note"]
    speed = cases.Case("topk", "y", {}, 0.0, 1e9, (cases.Target("speedup", 10.0, against="torch.topk"),))
    assert bench.target_rows(speed, {"dsa": 1.0, "torch.topk": 12.0}, {})[0]["note"].endswith("met")


# ----------------------------------------------------------------------------------------------------------------------
# gpu_check machinery
# ----------------------------------------------------------------------------------------------------------------------
def test_stage_is_killed_at_its_budget(gpu_check: ModuleType, tmp_path: Path) -> None:
    start = time.perf_counter()
    run = gpu_check.run_stage_process(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
        budget_s=2, env={"PATH": "/usr/bin:/bin"}, log=tmp_path / "s.log",
    )  # fmt: skip
    assert run.timed_out and run.rc is None
    assert time.perf_counter() - start < 60
    assert gpu_check.stage_record("x", run, 2)["status"] == "timeout"


def test_junit_counts(gpu_check: ModuleType, tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase><testcase classname="t" name="d"/>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(xml)
    assert counts["passed"] == 2 and counts["failures"] == 1 and counts["skipped"] == 1
    assert counts["failing"] == ["t::b"]


def test_failing_stages_are_recorded_and_later_stages_still_run(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend CUDA is there: the host and bench stages then fail in their subprocesses (no device), and the check
    # must record both, write the record, and report.
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--skip", "compile", "--skip", "tests",
         "--skip", "tests_ws", "--skip", "tune", "--bench-args", "--kernels topk"]
    )  # fmt: skip
    assert rc == 1
    records = list(tmp_path.glob("unknown-gpu-*.json"))
    assert len(records) == 1
    doc = json.loads(records[0].read_text())
    assert [(s["stage"], s["status"], s["rc"]) for s in doc["stages"]] == [
        ("host", "failed", 2),
        ("bench", "failed", 2),
    ]
    assert "no CUDA device" in doc["stages"][1]["log_tail"]
    assert doc["ok"] is False and doc["plot"] is None and doc["plot_note"]
    last = capsys.readouterr().out.strip().splitlines()
    assert last[-1].startswith("gpu_check: stages not ok: host, bench")


def _selection(cmd: list[str]) -> str:
    """The ``-m`` expression of a ``python -m pytest -m EXPR ...`` command."""
    return cmd[cmd.index("-m", 2) + 1]


def _passing_test_stage(gpu_check: ModuleType, cmd: list[str]) -> Any:
    """What a faked test stage that passes leaves: its JUnit file (2 passed, 1 skipped) and its StageRun."""
    junit = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--junitxml="))
    Path(junit).write_text('<testsuite tests="3" failures="0" errors="0" skipped="1"></testsuite>')
    return gpu_check.StageRun(0, 1.0, False, "2 passed, 1 skipped")


def test_gpu_tests_run_in_two_stages_with_the_ws_schedule_apart(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main test stage deselects the ws tests, a stage of their own runs them after it; both dump a hanging
    test's traceback before their budget; a ws stage killed at its budget leaves the main stage's counts."""
    assert gpu_check.STAGES.index("tests") < gpu_check.STAGES.index("tests_ws")
    assert set(gpu_check.DEFAULT_BUDGETS) == set(gpu_check.STAGES)
    assert sum(gpu_check.DEFAULT_BUDGETS.values()) <= 470
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    calls: list[tuple[list[str], float, dict[str, str], str]] = []

    def fake_stage(cmd: list[str], *, budget_s: float, env: dict[str, str], log: Path) -> Any:
        calls.append((list(cmd), budget_s, env, log.name))
        if _selection(cmd) == "gpu and ws":  # the ws kernel deadlocks: killed at the budget, no JUnit file
            return gpu_check.StageRun(None, budget_s, True, "Timeout (0:00:20)!\nThread 0x1 (most recent call first):")
        return _passing_test_stage(gpu_check, cmd)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--skip", "host", "--skip", "compile",
         "--skip", "bench", "--skip", "tune", "--pytest-args", "-x --maxfail 1"]
    )  # fmt: skip
    assert rc == 1
    (main, main_budget, main_env, main_log), (ws, ws_budget, ws_env, ws_log) = calls
    assert (_selection(main), _selection(ws)) == ("gpu and not ws", "gpu and ws")
    assert (main_budget, ws_budget) == (gpu_check.DEFAULT_BUDGETS["tests"], gpu_check.DEFAULT_BUDGETS["tests_ws"])
    assert (main_log, ws_log) == ("tests.log", "tests_ws.log")
    for cmd, budget in ((main, main_budget), (ws, ws_budget)):
        dump_after = int(cmd[cmd.index("-o") + 1].removeprefix("faulthandler_timeout="))
        assert 0 < dump_after < budget
        assert cmd[-3:] == ["-x", "--maxfail", "1"]
    assert main_env["HYPOTHESIS_PROFILE"] == ws_env["HYPOTHESIS_PROFILE"] == "gpu"
    doc = json.loads(next(tmp_path.glob("unknown-gpu-*.json")).read_text())
    assert [(s["stage"], s["status"]) for s in doc["stages"]] == [("tests", "ok"), ("tests_ws", "timeout")]
    assert doc["tests"]["passed"] == 2 and doc["tests_ws"] == {}
    assert "Timeout" in doc["stages"][1]["log_tail"]
    out = capsys.readouterr().out
    assert "gpu tests: 2 passed, 0 failed, 0 errors, 1 skipped" in out and "tests_ws timeout" in out
    assert out.strip().splitlines()[-1] == "gpu_check: stages not ok: tests_ws"


@pytest.mark.parametrize("outcome", ["timeout", "failed"])
def test_compile_stage_runs_before_the_tests_and_its_failure_does_not_stop_them(
    gpu_check: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    outcome: str,
) -> None:
    """The compile stage runs right after host: the tuner in compile-only mode over the whole tuning space of every
    kernel in gpu_test_kernels.json, on every usable CPU, its tuning cache in the work directory (shared with the
    tune stage). Killed at its budget (no report) or failing (a kernel with no valid config), it is recorded as such
    and the test stages still run."""
    stages = gpu_check.STAGES
    assert stages[:3] == ("host", "compile", "tests")
    assert set(gpu_check.DEFAULT_BUDGETS) == set(stages)
    assert sum(gpu_check.DEFAULT_BUDGETS.values()) <= 470
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(gpu_check, "compile_jobs", lambda: 16)
    calls: list[tuple[list[str], float, dict[str, str], str]] = []

    def fake_stage(cmd: list[str], *, budget_s: float, env: dict[str, str], log: Path) -> Any:
        calls.append((list(cmd), budget_s, env, log.name))
        if log.name == "compile.log":
            if outcome == "timeout":
                return gpu_check.StageRun(None, budget_s, True, "compiling ...")
            report = Path(cmd[cmd.index("--report") + 1])
            records = [{"kernel": "topk_indices", "ok": True}, {"kernel": "topk_indices", "ok": False}]
            report.write_text(json.dumps(records))
            return gpu_check.StageRun(1, 5.0, False, "NO VALID CONFIG: topk_indices k=64")
        if log.name == "tune.log":
            return gpu_check.StageRun(0, 1.0, False, "")
        return _passing_test_stage(gpu_check, cmd)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    work = tmp_path / "work"
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(work), "--skip", "host", "--skip", "tests_ws", "--skip", "bench"]
    )
    assert rc == 1
    assert [log for *_, log in calls] == ["compile.log", "tests.log", "tune.log"]
    (cmd, budget, env, _), (tests_cmd, _, tests_env, _), (_, _, tune_env, _) = calls
    assert cmd == [
        sys.executable, str(SCRIPTS / "autotune.py"), "--compile-only", "--full",
        "--shapes", str(ROOT / "benchmarks" / "gpu_test_kernels.json"), "--jobs", "16", "--no-progress",
        "--report", str(work / "compile-report.json"),
    ]  # fmt: skip
    assert budget == gpu_check.DEFAULT_BUDGETS["compile"]
    # Nothing leaks into the user's tuning cache; the tune stage finds the compile stage's ptxas reports; the tests
    # read the user's cache as any other process would.
    assert env["DSA_CACHE_DIR"] == tune_env["DSA_CACHE_DIR"] == str(work / "dsa-cache")
    assert tests_env.get("DSA_CACHE_DIR") == os.environ.get("DSA_CACHE_DIR")
    assert _selection(tests_cmd) == "gpu and not ws"
    doc = json.loads(next(tmp_path.glob("unknown-gpu-*.json")).read_text())
    assert [(s["stage"], s["status"]) for s in doc["stages"]] == [("compile", outcome), ("tests", "ok"), ("tune", "ok")]
    compiled = doc["stages"][0]
    assert compiled["jobs"] == 16
    out = capsys.readouterr().out
    if outcome == "timeout":
        assert "kernels" not in compiled and doc["compile"]["status"] == "timeout"
        assert "compile: timeout; no report" in out
    else:
        assert (compiled["kernels"], compiled["ok"]) == (2, 1)
        assert doc["compile"] == {"status": "failed", "summary": "2 kernels, 1 ok, 16 jobs", "kernels": 2, "ok": 1}
        assert "compile: failed; 2 kernels, 1 ok, 16 jobs" in out
    assert doc["tests"]["passed"] == 2
    assert out.strip().splitlines()[-1] == "gpu_check: stages not ok: compile"


def test_compile_jobs_follow_the_usable_cpus(gpu_check: ModuleType, tmp_path: Path) -> None:
    """Affinity mask first, then a cgroup v2 quota below it; an unlimited or unreadable quota changes nothing."""
    usable = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert gpu_check.compile_jobs(cpu_max) == usable  # no file
    cpu_max.write_text("max 100000\n")
    assert gpu_check.compile_jobs(cpu_max) == usable
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one job
    assert gpu_check.compile_jobs(cpu_max) == 1
    cpu_max.write_text(f"{100000 * (usable + 8)} 100000\n")
    assert gpu_check.compile_jobs(cpu_max) == usable
    cpu_max.write_text("garbage\n")
    assert gpu_check.compile_jobs(cpu_max) == usable


# The test modules whose gpu-marked tests compile sm_90a kernels; each names the static parameter sets its GPU tests
# compile (GPU_KERNEL_STATICS) and the configs they pass explicitly (GPU_CONFIGS).
GPU_TEST_MODULES: tuple[str, ...] = (
    "tests.test_indexer_kernel",
    "tests.test_topk_kernel",
    "tests.test_sparse_mla_fwd_kernel",
    "tests.test_sparse_mla_bwd_kernel",
)


def _canonical(static: dict[str, Any]) -> str:
    """A static parameter set as sorted JSON: True and 1 differ, as they do in a generated kernel's source."""
    return json.dumps(static, sort_keys=True)


@pytest.mark.parametrize("module_name", GPU_TEST_MODULES)
def test_gpu_test_kernels_json_matches_the_gpu_tests(gpu_check: ModuleType, module_name: str) -> None:
    """gpu_check's compile stage builds exactly what the GPU tests load: every static parameter set a test module's
    GPU tests compile is a case of gpu_test_kernels.json (and no other case is there, which would only cost compile
    time), and every config those tests use, explicit or the launcher's default, is in the whole tuning space that
    the stage compiles for each of them (``--full``)."""
    from autotune import space

    module = importlib.import_module(module_name)
    kernel = module.launch.KERNEL_NAME
    cases = space.preset_cases(gpu_check.COMPILE_SHAPES, (kernel,))
    listed = [_canonical(case.static) for case in cases]
    used = [_canonical(static) for static in module.GPU_KERNEL_STATICS]
    assert len(set(listed)) == len(listed), f"{kernel}: a static parameter set is listed twice"
    assert sorted(set(used)) == sorted(listed), (
        f"{kernel}: the GPU tests compile {sorted(set(used) - set(listed))} that gpu_test_kernels.json lacks, "
        f"and it lists {sorted(set(listed) - set(used))} that no GPU test uses"
    )
    assert "--full" in gpu_check.compile_command("python", jobs=1, report=Path("r.json"))
    for static in module.GPU_KERNEL_STATICS:
        compiled = space.full_space(kernel, static)
        assert space.default_config(kernel, static) in compiled
        for config in module.GPU_CONFIGS:
            assert dataclasses.asdict(config) in compiled, f"{kernel} {static}: {config} is not compiled"


def test_the_ws_marker_selects_the_ws_gpu_tests() -> None:
    """``-m "gpu and ws"`` picks sparse_mla_fwd's ws GPU tests (the main stage's ``gpu and not ws`` the rest)."""
    proc = _run(
        "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu and ws",
        "tests/test_sparse_mla_fwd_kernel.py", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = {line.strip() for line in proc.stdout.splitlines() if "::" in line}
    assert selected == {
        "tests/test_sparse_mla_fwd_kernel.py::test_gpu_ws_matches_reference",
        "tests/test_sparse_mla_fwd_kernel.py::test_gpu_non_finite_rows_behind_invalid_entries_change_nothing[ws]",
        "tests/test_sparse_mla_fwd_kernel.py::test_gpu_v32_causal_prefill[ws]",
    }


def test_a_hanging_test_is_dumped_into_the_stage_log(gpu_check: ModuleType, tmp_path: Path) -> None:
    """pytest's built-in ``faulthandler_timeout`` (the GPU host has no pytest plugins) writes where a test hangs."""
    planted = tmp_path / "test_planted_hang.py"
    planted.write_text("import time\nimport pytest\n\n@pytest.mark.gpu\ndef test_hangs():\n    time.sleep(3)\n")
    junit = tmp_path / "j.xml"
    cmd = gpu_check.pytest_command(sys.executable, "tests", budget_s=2, junit=junit, extra_args=[str(planted)])
    run = gpu_check.run_stage_process(cmd, budget_s=60, env=dict(os.environ), log=tmp_path / "tests.log")
    assert run.rc == 0, run.output[-3000:]
    assert "Timeout" in run.output and "in test_hangs" in run.output, run.output[-3000:]
    assert gpu_check.junit_counts(junit)["passed"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# fuzz.py
# ----------------------------------------------------------------------------------------------------------------------
def test_fuzz_reference_runs_and_reports_examples(tmp_path: Path) -> None:
    proc = _run(
        str(SCRIPTS / "fuzz.py"), "--backend", "reference", "--minutes", "0.4", "--chunk", "3",
        "--db", str(tmp_path / "db"), "--tests", "tests/test_reference.py",
        "-k", "test_sparse_mla_matches_dense_masked_attention",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"examples run: (\d+)", proc.stdout)
    assert match and int(match.group(1)) > 0, proc.stdout
    assert "failures: 0" in proc.stdout


def test_fuzz_finds_and_keeps_a_planted_failure(tmp_path: Path) -> None:
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "from hypothesis import given, strategies as st\n\n"
        "@given(st.integers(min_value=0, max_value=10**6))\n"
        "def test_small(x):\n    assert x < 1000\n"
    )
    db = tmp_path / "db"
    proc = _run(
        str(SCRIPTS / "fuzz.py"),
        "--backend",
        "reference",
        "--minutes",
        "0.3",
        "--chunk",
        "50",
        "--db",
        str(db),
        "--tests",
        str(planted),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fuzz: FAILED" in proc.stdout and "test_planted.py::test_small" in proc.stdout
    assert "x=1000" in proc.stdout, "the shrunk falsifying example must be printed"
    assert any(p.is_file() for p in (db / "examples").rglob("*")), "the failing example must be saved for replay"

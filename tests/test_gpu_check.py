"""The one-shot GPU check (``autotune.gpu_check``) on a CPU: stages with budgets, their records, the order of the
stages, the compile list written from the GPU test modules at run time, and the ws tests in a stage of their own."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune import gpu_check, space
from tests.support import ROOT
from tests.support import run_python as _run

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def test_stage_is_killed_at_its_budget(tmp_path: Path) -> None:
    start = time.perf_counter()
    run = gpu_check.run_stage_process(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
        budget_s=2, env={"PATH": "/usr/bin:/bin"}, log=tmp_path / "s.log",
    )  # fmt: skip
    assert run.timed_out and run.rc is None
    assert time.perf_counter() - start < 60
    assert gpu_check.stage_record("x", run, 2)["status"] == "timeout"


def test_junit_counts(tmp_path: Path) -> None:
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend CUDA is there: the host and bench stages then fail in their subprocesses (no device), and the check
    # must record both, write the record, and report.
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--skip", "compile", "--skip", "tests",
         "--skip", "tests_ws", "--skip", "tests_portable", "--skip", "tests_decode", "--skip", "tune", "--bench-args", "--kernels topk"]
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


def _collected(shapes_doc: dict[str, Any], cmd: list[str]) -> Any:
    """What a faked collect step leaves: ``shapes_doc`` in the shapes file its command names, and its StageRun."""
    shapes = Path(next(a for a in cmd if a.startswith("--dsa-gpu-kernels=")).split("=", 1)[1])
    shapes.write_text(json.dumps(shapes_doc))
    return gpu_check.StageRun(0, 3.0, False, "")


def _selection(cmd: list[str]) -> str:
    """The ``-m`` expression of a ``python -m pytest -m EXPR ...`` command."""
    return cmd[cmd.index("-m", 2) + 1]


def _passing_test_stage(cmd: list[str]) -> Any:
    """What a faked test stage that passes leaves: its JUnit file (2 passed, 1 skipped) and its StageRun."""
    junit = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--junitxml="))
    Path(junit).write_text('<testsuite tests="3" failures="0" errors="0" skipped="1"></testsuite>')
    return gpu_check.StageRun(0, 1.0, False, "2 passed, 1 skipped")


def _fake_stages(
    calls: list[tuple[list[str], float, dict[str, str], str]],
    shapes_doc: dict[str, Any],
    compile_stage: Callable[[list[str], float, Path], Any],
) -> Callable[..., Any]:
    """A fake ``run_stage_process`` that records each call in ``calls``: the collect step writes ``shapes_doc``,
    compile stages answer through ``compile_stage(cmd, budget_s, log)``, the tune stage passes and test stages pass
    with their JUnit file."""

    def fake_stage(cmd: list[str], *, budget_s: float, env: dict[str, str], log: Path) -> Any:
        calls.append((list(cmd), budget_s, env, log.name))
        if log.name == "collect.log":
            return _collected(shapes_doc, cmd)
        if log.name.startswith("compile"):
            return compile_stage(cmd, budget_s, log)
        if log.name == "tune.log":
            return gpu_check.StageRun(0, 1.0, False, "")
        return _passing_test_stage(cmd)

    return fake_stage


def test_gpu_tests_run_in_four_stages_with_the_ws_portable_and_decode_tests_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main test stage deselects the ws, portable and decode tests, stages of their own run them after it; each
    dumps a hanging test's traceback before its budget; a ws stage killed at its budget leaves the other stages'
    counts."""
    order = [gpu_check.STAGES.index(stage) for stage in ("tests", "tests_ws", "tests_portable", "tests_decode")]
    assert order == sorted(order)
    assert set(gpu_check.DEFAULT_BUDGETS) == set(gpu_check.STAGES)
    assert sum(gpu_check.DEFAULT_BUDGETS.values()) <= 540
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    calls: list[tuple[list[str], float, dict[str, str], str]] = []

    def fake_stage(cmd: list[str], *, budget_s: float, env: dict[str, str], log: Path) -> Any:
        calls.append((list(cmd), budget_s, env, log.name))
        if _selection(cmd) == "gpu and ws":  # the ws kernel deadlocks: killed at the budget, no JUnit file
            return gpu_check.StageRun(None, budget_s, True, "Timeout (0:00:20)!\nThread 0x1 (most recent call first):")
        return _passing_test_stage(cmd)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--skip", "host", "--skip", "compile",
         "--skip", "bench", "--skip", "tune", "--pytest-args", "-x --maxfail 1"]
    )  # fmt: skip
    assert rc == 1
    (main, main_budget, main_env, main_log), (ws, ws_budget, ws_env, ws_log), portable, decode = calls
    assert (_selection(main), _selection(ws)) == ("gpu and not ws and not portable and not decode", "gpu and ws")
    assert (_selection(portable[0]), portable[3]) == ("gpu and portable", "tests_portable.log")
    assert (_selection(decode[0]), decode[3]) == ("gpu and decode", "tests_decode.log")
    assert (main_budget, ws_budget) == (gpu_check.DEFAULT_BUDGETS["tests"], gpu_check.DEFAULT_BUDGETS["tests_ws"])
    assert (main_log, ws_log) == ("tests.log", "tests_ws.log")
    for cmd, budget in ((main, main_budget), (ws, ws_budget), portable[:2], decode[:2]):
        dump_after = int(cmd[cmd.index("-o") + 1].removeprefix("faulthandler_timeout="))
        assert 0 < dump_after < budget
        assert cmd[-3:] == ["-x", "--maxfail", "1"]
    assert main_env["HYPOTHESIS_PROFILE"] == ws_env["HYPOTHESIS_PROFILE"] == "gpu"
    doc = json.loads(next(tmp_path.glob("unknown-gpu-*.json")).read_text())
    assert [(s["stage"], s["status"]) for s in doc["stages"]] == [
        ("tests", "ok"), ("tests_ws", "timeout"), ("tests_portable", "ok"), ("tests_decode", "ok")
    ]  # fmt: skip
    assert doc["tests"]["passed"] == 2 and doc["tests_ws"] == {}
    assert "Timeout" in doc["stages"][1]["log_tail"]
    out = capsys.readouterr().out
    assert "gpu tests: 2 passed, 0 failed, 0 errors, 1 skipped" in out and "tests_ws timeout" in out
    assert out.strip().splitlines()[-1] == "gpu_check: stages not ok: tests_ws"


@pytest.mark.parametrize("outcome", ["timeout", "failed"])
def test_compile_stage_runs_before_the_tests_and_its_failure_does_not_stop_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    outcome: str,
) -> None:
    """The compile stage runs right after host: it collects the GPU tests' kernel list (written at run time from the
    test modules), then runs the tuner in compile-only mode over the whole tuning space of every kernel in it, on
    every usable CPU, its tuning cache in the work directory (shared with the tune stage), within the stage's one
    budget. Killed at its budget (no report) or failing (a kernel with no valid config), it is recorded as such and
    the test stages still run."""
    stages = gpu_check.STAGES
    assert stages[:3] == ("host", "compile", "tests")
    assert set(gpu_check.DEFAULT_BUDGETS) == set(stages)
    assert sum(gpu_check.DEFAULT_BUDGETS.values()) <= 540
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(gpu_check, "compile_jobs", lambda: 16)
    calls: list[tuple[list[str], float, dict[str, str], str]] = []

    def compile_stage(cmd: list[str], budget_s: float, log: Path) -> Any:
        if outcome == "timeout":
            return gpu_check.StageRun(None, budget_s, True, "compiling ...")
        report = Path(cmd[cmd.index("--report") + 1])
        report.write_text(json.dumps([{"kernel": "topk", "ok": True}, {"kernel": "topk", "ok": False}]))
        return gpu_check.StageRun(1, 5.0, False, "NO VALID CONFIG: topk k=64")

    shapes_doc = {"topk": [{"static": {"k": 64}, "sizes": [{"batch": 1, "seq_len": 1, "seq_len_kv": 1}]}]}
    fake_stage = _fake_stages(calls, shapes_doc, compile_stage)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    work = tmp_path / "work"
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(work), "--skip", "host", "--skip", "tests_ws", "--skip", "bench",
         "--skip", "tests_portable", "--skip", "tests_decode"]
    )  # fmt: skip
    assert rc == 1
    assert [log for *_, log in calls] == ["collect.log", "compile.log", "tests.log", "tune.log"]
    (collect, collect_budget, _, _), (cmd, budget, env, _), (tests_cmd, _, tests_env, _), (_, _, tune_env, _) = calls
    shapes = work / gpu_check.COMPILE_SHAPES_NAME
    assert collect[:3] == [sys.executable, "-m", "pytest"] and "--collect-only" in collect
    assert _selection(collect) == "gpu" and f"--dsa-gpu-kernels={shapes}" in collect
    assert cmd == [
        sys.executable, "-m", "autotune.cli", "--compile-only", "--full", "--shapes", str(shapes),
        "--jobs", "16", "--no-progress", "--report", str(work / "compile-report.json"),
    ]  # fmt: skip
    # Collecting and compiling share the stage's budget.
    assert collect_budget == gpu_check.DEFAULT_BUDGETS["compile"] and budget <= gpu_check.DEFAULT_BUDGETS["compile"]
    # Nothing leaks into the user's tuning cache; the tune stage finds the compile stage's ptxas reports; the tests
    # read the user's cache as any other process would.
    assert env["DSA_CACHE_DIR"] == tune_env["DSA_CACHE_DIR"] == str(work / "dsa-cache")
    assert tests_env.get("DSA_CACHE_DIR") == os.environ.get("DSA_CACHE_DIR")
    assert _selection(tests_cmd) == "gpu and not ws and not portable and not decode"
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


def test_compile_jobs_follow_the_usable_cpus(tmp_path: Path) -> None:
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


def test_a_hanging_test_is_dumped_into_the_stage_log(tmp_path: Path) -> None:
    """pytest's built-in ``faulthandler_timeout`` (the GPU host has no pytest plugins) writes where a test hangs."""
    planted = tmp_path / "test_planted_hang.py"
    planted.write_text("import time\nimport pytest\n\n@pytest.mark.gpu\ndef test_hangs():\n    time.sleep(3)\n")
    junit = tmp_path / "j.xml"
    cmd = gpu_check.pytest_command(sys.executable, "tests", budget_s=2, junit=junit, extra_args=[str(planted)])
    run = gpu_check.run_stage_process(cmd, budget_s=60, env=dict(os.environ), log=tmp_path / "tests.log")
    assert run.rc == 0, run.output[-3000:]
    assert "Timeout" in run.output and "in test_hangs" in run.output, run.output[-3000:]
    assert gpu_check.junit_counts(junit)["passed"] == 1


# The test modules whose gpu-marked tests compile sm_90a kernels; each lists them in GPU_KERNELS and names the configs
# its tests pass explicitly in GPU_CONFIGS.
GPU_TEST_MODULES: tuple[str, ...] = (
    "tests.test_indexer_kernel",
    "tests.test_topk_kernel",
    "tests.test_sparse_mla_fwd_kernel",
    "tests.test_sparse_mla_bwd_kernel",
    "tests.test_index_topk",
    "tests.test_index_topk_kernel",
)


def test_the_compile_list_is_written_from_the_gpu_test_modules(tmp_path: Path) -> None:
    """The compile stage's collect command writes every (kernel, static parameters) the GPU test modules list, as a
    valid tuner shapes file, and the whole tuning space it compiles for each (``--full``) holds every config those
    tests use: the default and the explicit ones."""
    shapes = tmp_path / "gpu-kernels.json"
    collect = gpu_check.collect_command(sys.executable, shapes=shapes)
    proc = subprocess.run(collect, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(shapes.read_text())
    listed = {(case.kernel, json.dumps(case.static, sort_keys=True)) for case in space.preset_cases(shapes)}
    assert len(listed) == sum(len(items) for items in doc.values()), "a static parameter set is listed twice"
    wanted = set()
    for module_name in GPU_TEST_MODULES:
        module = importlib.import_module(module_name)
        for kernel, statics in module.GPU_KERNELS.items():
            for static in statics:
                wanted.add((kernel, json.dumps(static, sort_keys=True)))
                compiled = space.full_space(kernel, static)
                assert space.default_config(kernel, static) in compiled
                for config in module.GPU_CONFIGS:
                    assert dataclasses.asdict(config) in compiled, f"{kernel} {static}: {config} is not compiled"
    assert listed == wanted
    assert "--full" in gpu_check.compile_command("python", jobs=1, report=Path("r.json"), shapes=shapes)


def test_compile_stage_also_builds_the_portable_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the Hopper compile, the compile stage builds each case's default config of the portable schedule
    (``DSA_PORTABLE=1``: sm_90 on Hopper) for the portable test stage, in the same budget; the stage's counts cover
    both reports."""
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(gpu_check, "compile_jobs", lambda: 16)
    calls: list[tuple[list[str], float, dict[str, str], str]] = []

    def compile_stage(cmd: list[str], budget_s: float, log: Path) -> Any:
        report = Path(cmd[cmd.index("--report") + 1])
        report.write_text(json.dumps([{"kernel": "topk", "ok": True}]))
        return gpu_check.StageRun(0, 5.0, False, "")

    fake_stage = _fake_stages(calls, {}, compile_stage)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    work = tmp_path / "work"
    argv = ["--out-dir", str(tmp_path), "--work-dir", str(work), "--skip", "host", "--skip", "bench", "--skip", "tune"]
    assert gpu_check.main(argv) == 0
    logs = [log for *_, log in calls]
    assert logs == ["collect.log", "compile.log", "compile-portable.log", "tests.log", "tests_ws.log",
                    "tests_portable.log", "tests_decode.log"]  # fmt: skip
    hopper, portable = calls[1], calls[2]
    assert "--full" in hopper[0] and "DSA_PORTABLE" not in hopper[2]
    assert "--defaults-only" in portable[0] and "--full" not in portable[0] and portable[2]["DSA_PORTABLE"] == "1"
    assert portable[2]["DSA_CACHE_DIR"] == hopper[2]["DSA_CACHE_DIR"]
    doc = json.loads(next(tmp_path.glob("unknown-gpu-*.json")).read_text())
    assert doc["compile"]["kernels"] == 2 and doc["compile"]["ok"] == 2

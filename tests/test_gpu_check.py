"""The one-shot GPU check (``benchmarks.gpu_check``, ``gpu_collect`` and ``gpu_record``) on a CPU: stages with budgets,
their records, the order of the stages, the compile list written from the GPU test modules at run time, and the ws
tests in a stage of their own."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune.lookup import space
from benchmarks import gpu_check, gpu_collect, gpu_record
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


def test_the_overall_deadline_cuts_stage_budgets_and_skips_stages_it_cannot_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--deadline-s``, each stage gets at most the time left less the stop grace, and a stage with under
    MIN_STAGE_S left is recorded as a timeout without starting; the record is still written (the device call returns
    nothing of a command it had to kill, so the check must end itself in time)."""
    clock = [1000.0]
    fake_time = types.SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time, strftime=time.strftime, gmtime=time.gmtime
    )
    monkeypatch.setattr(gpu_check, "time", fake_time)
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: (True, ""))
    budgets: list[tuple[str, float]] = []

    def fake_stage(cmd: list[str], *, budget_s: float, env: dict[str, str], log: Path) -> Any:
        budgets.append((log.name, budget_s))
        clock[0] += budget_s  # every stage runs to its (cut) budget
        return _passing_test_stage(cmd)

    monkeypatch.setattr(gpu_check, "run_stage_process", fake_stage)
    deadline = 200.0
    rc = gpu_check.main(
        ["--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--skip", "host", "--skip", "compile",
         "--skip", "bench", "--skip", "tune", "--deadline-s", str(deadline)]
    )  # fmt: skip
    grace = gpu_check.process.STOP_GRACE_S
    tests_budget = gpu_check.DEFAULT_BUDGETS["tests"]
    ws_budget = min(gpu_check.DEFAULT_BUDGETS["tests_ws"], deadline - tests_budget - grace)
    assert budgets[:2] == [("tests.log", tests_budget), ("tests_ws.log", ws_budget)]
    assert all(b <= deadline - grace for _, b in budgets)
    assert sum(b for _, b in budgets) <= deadline
    doc = json.loads(next(tmp_path.glob("unknown-gpu-*.json")).read_text())
    statuses = {s["stage"]: s for s in doc["stages"]}
    assert [s["stage"] for s in doc["stages"]] == ["tests", "tests_ws", "tests_portable", "tests_decode"]
    not_started = [s for s in doc["stages"] if s["seconds"] == 0.0]
    assert not_started and all(s["status"] == "timeout" and "deadline" in s["first_error"] for s in not_started)
    assert statuses["tests"]["status"] == "ok" and rc == 1


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
# its tests pass explicitly in GPU_CONFIGS (absent where they run the defaults only).
GPU_TEST_MODULES: tuple[str, ...] = (
    "tests.test_indexer_kernel",
    "tests.test_topk_kernel",
    "tests.test_sparse_mla_fwd_kernel",
    "tests.test_sparse_mla_bwd_kernel",
    "tests.test_index_topk",
    "tests.test_index_topk_kernel",
    "tests.test_sparse_mla_two_source",
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
                for config in getattr(module, "GPU_CONFIGS", ()):  # modules whose tests run defaults only have none
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


# ----------------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh: the bundle unpacked with or without xz, one import check, at most 8 files back in $OUT
# ----------------------------------------------------------------------------------------------------------------------
SCRIPT_SH = ROOT / "scripts" / "gpu_check.sh"
XZ_TOOLS = frozenset({"xz", "unxz", "xzcat", "xzdec", "lzma", "unlzma", "lzcat"})
RECORD_STEM = "h200-20990101"
STUB_LOGS: tuple[str, ...] = (
    "host", "collect", "compile", "compile-portable", "tests", "tests_ws", "tests_portable", "tests_decode", "bench",
    "tune", "extra-1", "extra-2",
)  # fmt: skip
# A stand-in for scripts/gpu_check.py (DSA_GPU_CHECK_RUNNER): the files a failing run leaves, in milliseconds, and
# what it saw (its arguments, the caches' environment, where the bundle's module came from) in runner.json.
STUB_RUNNER = r'''
import json, os, pathlib, sys

args = sys.argv[1:]
work = pathlib.Path(args[args.index("--work-dir") + 1])
results = pathlib.Path(args[args.index("--out-dir") + 1])
seen = {"argv": args, "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in (
    "PYTHONPATH", "TILELANG_CACHE_DIR", "DSA_CACHE_DIR", "TVM_FFI_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR")}}
import dsa_fake_bundle
seen["bundle_module"] = dsa_fake_bundle.__file__
seen["bundle_alias"] = pathlib.Path(dsa_fake_bundle.__file__).with_name("alias.py").resolve().name
(work / "runner.json").write_text(json.dumps(seen))
for name in LOGS:
    (work / f"{name}.log").write_text(f"{name} output\n" * 200)
(work / "tests.xml").write_text("<testsuite tests='3' failures='1' errors='0' skipped='0'/>")
(work / "compile-report.json").write_text(json.dumps([{"kernel": "topk", "ok": True}]))
(work / "compile-portable-report.json").write_text("[]")
(work / "tune-cache").mkdir()  # a folder in the work dir is not packed
(work / "tune-cache" / "x.json").write_text("{}")
results.mkdir(parents=True, exist_ok=True)
stages = [
    {"stage": "host", "status": "ok", "seconds": 12.3, "budget_s": 20},
    {"stage": "compile", "status": "ok", "seconds": 130.0, "budget_s": 145, "kernels": 57, "ok": 57},
    {"stage": "tests", "status": "failed", "seconds": 118.0, "budget_s": 125, "tests": 44, "passed": 40,
     "failures": 1, "errors": 0, "skipped": 3,
     "first_error": "tests.test_topk_kernel::test_gpu_x: AssertionError: ties"},
    {"stage": "tests_ws", "status": "timeout", "seconds": 40.0, "budget_s": 40, "first_error": "Timeout (0:00:20)!"},
    {"stage": "tests_decode", "status": "ok", "seconds": 50.0, "budget_s": 60, "tests": 9, "passed": 9,
     "failures": 0, "errors": 0, "skipped": 0},
    {"stage": "bench", "status": "ok", "seconds": 80.0, "budget_s": 85, "rows": 19},
]
doc = {"format": "dsa-gpu-check/1", "ok": False, "skipped": ["tests_portable"], "stages": stages,
       "host": {"gpu": "NVIDIA H200", "sku": "h200"}, "record_path": str(results / "RECORD.json")}
(results / "RECORD.json").write_text(json.dumps(doc))
(results / "RECORD.png").write_bytes(b"\x89PNG fake")
print("stub runner done", flush=True)
sys.exit(1)
'''


def _write_fake_bundle(archive: Path, extra: dict[str, str] | None = None) -> None:
    """A small ``.tar.xz`` laid out like the real bundle: a package (with a relative symlink, as the deduplicated
    z3 libraries are) and ``extra`` files (path -> text), written by Python (no xz needed)."""
    tree = archive.parent / "fake-tree"
    package = tree / "dsa_fake_bundle"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("FROM_BUNDLE = True\n")
    (package / "alias.py").symlink_to("__init__.py")
    for rel, text in (extra or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    (tree / "DSA_BUNDLE.json").write_text("{}")
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    shutil.rmtree(tree)


def _tool_path(bin_dir: Path, *, hide_xz: bool) -> str:
    """A PATH whose ``python3`` is this interpreter; with ``hide_xz``, a folder of links to every program on PATH but
    xz (tar is there, as on a host image without xz)."""
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    if not hide_xz:
        return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/bin"]:
        if not folder or not Path(folder).is_dir():
            continue
        for tool in Path(folder).iterdir():
            link = bin_dir / tool.name
            if tool.name in XZ_TOOLS or link.exists() or link.is_symlink() or not os.access(tool, os.X_OK):
                continue
            link.symlink_to(tool)
    return str(bin_dir)


def _checkout(tmp_path: Path, *, bundle_extra: dict[str, str] | None = None) -> Path:
    """A checkout holding what gpu_check.sh touches: the script, a fake bundle, and ``benchmarks/results`` with an old
    record that must not come back (the packages themselves come from this repository through PYTHONPATH)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT_SH, repo / "scripts" / "gpu_check.sh")
    (repo / ".bundle").mkdir()
    _write_fake_bundle(repo / ".bundle" / "dsa-bundle.tar.xz", bundle_extra)
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    old = results / "h100-sxm-20000101.json"
    old.write_text("{}")
    os.utime(old, (946684800, 946684800))
    return repo


def _run_sh(
    repo: Path, tmp_path: Path, *, hide_xz: bool = False, runner: bool = True, work: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Path]]:
    """Run the checkout's gpu_check.sh as the device tool would (``$OUT`` set, an empty HOME), with the stub runner."""
    paths = {"out": tmp_path / "out", "work": work or tmp_path / "work", "home": tmp_path / "home"}
    paths["home"].mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSA_", "TILELANG_", "PYTHON", "OUT"))}
    env.update(OUT=str(paths["out"]), HOME=str(paths["home"]), DSA_GPU_CHECK_WORK=str(paths["work"]))
    env.update(PYTHONPATH=str(ROOT), PATH=_tool_path(tmp_path / "bin", hide_xz=hide_xz))
    if runner:
        stub = tmp_path / "stub_runner"
        logs = repr(STUB_LOGS)
        stub.write_text(f"#!{sys.executable}\nLOGS = {logs}\n" + STUB_RUNNER.replace("RECORD", RECORD_STEM))
        stub.chmod(0o755)
        env["DSA_GPU_CHECK_RUNNER"] = str(stub)
    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run(
        [bash, str(repo / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=300
    )
    return proc, paths


@pytest.mark.parametrize("unpack", ["xz", "python"])
def test_gpu_check_sh_returns_at_most_eight_files(tmp_path: Path, unpack: str) -> None:
    """With a stub stage runner that leaves twelve logs, JUnit and report files and a record, gpu_check.sh unpacks
    the bundle (``tar -xJf``, or Python's tarfile with xz hidden from PATH), passes the import check, runs the stub
    with every cache in the work folder, and leaves at most 8 files in ``$OUT``, none in a folder, each named in
    ``[A-Za-z0-9._-]``: the record, its PNG, the compile report, every log in logs.tar.gz, and summary.txt stage by
    stage. Its exit status is the runner's. Nothing is written to HOME."""
    if unpack == "xz" and shutil.which("xz") is None:
        pytest.skip("no xz program on this machine: only the tarfile path can run")
    repo = _checkout(tmp_path)
    proc, paths = _run_sh(repo, tmp_path, hide_xz=unpack == "python")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    work, out = paths["work"], paths["out"]
    how = "tar -xJf" if unpack == "xz" else "Python's tarfile (no xz on PATH)"
    assert f"bundle unpacked into {work / 'site'} with {how} in " in proc.stdout, output[-4000:]
    assert "imports ok in " in proc.stdout and "the check exited 1 after " in proc.stdout
    assert "gpu_check.sh: total " in proc.stdout.strip().splitlines()[-1]
    # What the device tool returns: at most 8 files, at most two folders deep, plain names, at most 16 MiB each.
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(returned) <= 8, returned
    for path in returned:
        rel = path.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert path.stat().st_size <= 16 * 1024 * 1024
    assert {p.name for p in returned} == {
        f"{RECORD_STEM}.json", f"{RECORD_STEM}.png", "compile-report.json", "logs.tar.gz", "summary.txt"
    }  # the old record in benchmarks/results stays behind
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = set(tar.getnames())
    packed = {f"{name}.log" for name in STUB_LOGS} | {"imports.log", "gpu_check.log", "tests.xml", "runner.json"}
    assert packed <= members
    assert "compile-portable-report.json" in members and "compile-report.json" not in members
    assert all("/" not in m for m in members)
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu check: FAILED (not passed: tests, tests_ws) (the check exited 1)")
    rows = {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}
    assert rows["host"].split()[1:4] == ["passed", "12.3", "20"]
    assert "57 kernels, 57 ok" in rows["compile"]
    assert "40 passed, 1 failed, 0 errors, 3 skipped; first error: tests.test_topk_kernel::test_gpu_x" in rows["tests"]
    assert rows["tests_ws"].split()[1] == "timeout" and "first error: Timeout (0:00:20)!" in rows["tests_ws"]
    assert rows["tests_portable"].split()[1:] == ["skipped"] and rows["tune"].split()[1:] == ["not", "run"]
    # The runner ran in the checkout with the stages' PYTHONPATH, the bundle first, and every cache in the work folder.
    seen = json.loads((work / "runner.json").read_text())
    assert seen["argv"][:5] == ["--work-dir", str(work), "--out-dir", "benchmarks/results", "--deadline-s"]
    # The check gets what is left of the script's 555 s (the device call's 570 less collection), minus the reserve.
    assert 500 < int(seen["argv"][5]) <= 555 - 10
    assert Path(seen["cwd"]) == repo
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[:2] == [str(work / "site"), str(repo)]
    assert seen["bundle_module"] == str(work / "site" / "dsa_fake_bundle" / "__init__.py")
    assert (work / "site" / "dsa_fake_bundle" / "alias.py").is_symlink() and seen["bundle_alias"] == "__init__.py"
    for key, value in seen["env"].items():
        if key != "PYTHONPATH":
            assert value and Path(value).is_relative_to(work), (key, value)
    assert seen["env"]["DSA_CACHE_DIR"] == str(work / gpu_check.DSA_CACHE_SUBDIR)
    assert not list(paths["home"].iterdir()), "nothing may be written to the home directory"


@pytest.mark.parametrize(
    ("hidden", "failing"),
    [("psutil", "tilelang"), ("tvm_ffi", "tilelang, tvm_ffi"), ("benchmarks", "benchmarks")],
)
def test_gpu_check_sh_stops_when_a_module_cannot_be_imported(tmp_path: Path, hidden: str, failing: str) -> None:
    """A required module (or one tilelang imports, as psutil on a host without it) that cannot be imported stops the
    script after the import check with exit 2 and a message naming it and why; no stage runs, and summary.txt says
    so. The bundle's first place on PYTHONPATH stands in for the missing module: a package that fails as a missing
    one does."""
    shadow = f"raise ModuleNotFoundError(\"No module named '{hidden}'\", name={hidden!r})\n"
    repo = _checkout(tmp_path, bundle_extra={f"{hidden}/__init__.py": shadow})
    proc, paths = _run_sh(repo, tmp_path)
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    for module in failing.split(", "):
        assert f"cannot import {module}: ModuleNotFoundError: No module named '{hidden}'" in proc.stdout
    assert f"import check failed: cannot import {failing}" in proc.stdout
    assert "no stage was run" in proc.stderr
    assert not (paths["work"] / "runner.json").exists(), "the stages must not run"
    assert [p.name for p in paths["out"].iterdir()] == ["summary.txt"]
    assert f"import check failed: cannot import {failing}" in (paths["out"] / "summary.txt").read_text()


def test_gpu_check_sh_refuses_to_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    proc, _ = _run_sh(_checkout(tmp_path), tmp_path, work=precious)
    assert proc.returncode == 2 and "not removing it" in proc.stderr
    assert (precious / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# What comes back: the collector, the first error, summary.txt
# ----------------------------------------------------------------------------------------------------------------------
def test_collect_outputs_picks_this_runs_record_and_packs_every_log(tmp_path: Path) -> None:
    work, results, out = tmp_path / "work", tmp_path / "results", tmp_path / "out"
    work.mkdir()
    results.mkdir()
    old = results / "h100-sxm-20000101.json"
    old.write_text("{}")
    (results / "h100-sxm-20000101.png").write_bytes(b"old")
    os.utime(old, (946684800, 946684800))
    os.utime(results / "h100-sxm-20000101.png", (946684800, 946684800))
    since = time.time() - 1
    for i in range(20):
        (work / f"stage-{i}.log").write_text(f"log {i}\n")
    (work / "odd name.log").write_text("spaces")
    (work / "site").mkdir()
    (work / "site" / "big.log").write_text("not packed")
    (work / "gpu_check.log").write_text("[gpu_check] stage host\nTraceback ...\nKeyError: 'sku'\n")
    written = gpu_collect.collect_outputs(out, work=work, results=results, since=since, runner_rc=3)
    assert [p.name for p in written] == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = tar.getnames()
    assert len(members) == 22 and "odd_name.log" in members and "big.log" not in members
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[:2] == ["gpu check: no record was written (the check exited 3); see logs.tar.gz",
                           "first error: KeyError: 'sku'"]  # fmt: skip
    # The newest record written since the stamp is the one that comes back, with the PNG beside it.
    new = results / "h200-20990101.json"
    write_doc = {"stages": [{"stage": "host", "status": "ok", "seconds": 1.0, "budget_s": 20}], "ok": True}
    new.write_text(json.dumps(write_doc))
    (results / "h200-20990101.png").write_bytes(b"png")
    shutil.rmtree(out)
    written = gpu_collect.collect_outputs(out, work=work, results=results, since=since)
    assert sorted(p.name for p in written) == ["h200-20990101.json", "h200-20990101.png", "logs.tar.gz", "summary.txt"]
    assert (out / "summary.txt").read_text().startswith("gpu check: passed\n")


def test_pack_logs_cuts_large_logs_until_the_archive_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log too large for one returned file keeps its head and its end, cut until the archive fits."""
    monkeypatch.setattr(gpu_collect, "MAX_OUT_FILE_BYTES", 200_000)
    monkeypatch.setattr(gpu_collect, "LOG_MEMBER_BYTES", 1_000_000)
    work = tmp_path / "work"
    work.mkdir()
    noise = os.urandom(600_000)  # does not compress
    (work / "big.log").write_bytes(b"FIRST LINE\n" + noise + b"\nLAST LINE\n")
    (work / "small.log").write_text("small\n")
    archive = tmp_path / "logs.tar.gz"
    assert gpu_collect.pack_logs(work, archive) == ["big.log", "small.log"]
    assert archive.stat().st_size <= 200_000
    with tarfile.open(archive) as tar:
        big = tar.extractfile("big.log").read()  # type: ignore[union-attr]
        assert tar.extractfile("small.log").read() == b"small\n"  # type: ignore[union-attr]
    assert big.startswith(b"FIRST LINE") and big.endswith(b"LAST LINE\n") and b"bytes of" in big


def test_first_error_of_a_stage() -> None:
    traceback = (
        "collecting ...\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
        "    raise ValueError('bad')\nValueError: bad\nlater line\n"
    )
    assert gpu_record.first_error(traceback) == "ValueError: bad"
    fatal = "Fatal Python error: Segmentation fault"
    assert gpu_record.first_error(f"ok\n{fatal}\n") == fatal
    assert gpu_record.first_error("Timeout (0:00:30)!\nThread 0x1") == "Timeout (0:00:30)!"
    assert gpu_record.first_error("usage: dsa-bench\ndsa-bench: error: unrecognized arguments: --x\n") == (
        "dsa-bench: error: unrecognized arguments: --x"
    )
    assert gpu_record.first_error("all good\n3 rows\n") == "3 rows"
    assert gpu_record.first_error("") is None
    run = gpu_check.StageRun(1, 2.0, False, "x\nRuntimeError: CUDA error: an illegal memory access\n")
    assert gpu_check.stage_record("bench", run, 85)["first_error"].startswith("RuntimeError: CUDA error")
    assert "first_error" not in gpu_check.stage_record("bench", gpu_check.StageRun(0, 1.0, False, "Error: x"), 85)


def test_junit_counts_give_the_first_failure(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuite tests="3" failures="1" errors="1" skipped="0">'
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="AssertionError: 1 != 2&#10;more">trace</failure></testcase>'
        '<testcase classname="t" name="c"><error message="RuntimeError: x"/></testcase></testsuite>'
    )
    counts = gpu_check.junit_counts(xml)
    assert counts["failing"] == ["t::b", "t::c"] and counts["first_error"] == "t::b: AssertionError: 1 != 2"


def test_out_names_are_plain() -> None:
    assert gpu_collect.out_name("h200-20990101.json") == "h200-20990101.json"
    assert gpu_collect.out_name("a b/c:d.log") == "a_b_c_d.log"
    assert all(gpu_collect.OUT_NAME_RE.match(gpu_collect.out_name(n)) for n in ("é.log", "", "x y"))

"""Fuzz the ops with the Hypothesis property suite for a fixed time, keeping failures so that they replay.

    python scripts/fuzz.py --backend reference --minutes 10     # or: python -m dsa.fuzz ...
    python scripts/fuzz.py --backend tilelang --minutes 30      # C-target kernels on a CPU, CUDA kernels on a GPU

It runs the property tests of a checkout of the repository (``tests/``): every op and form that has one, found by
``@given`` (no list to keep up to date), DeepSeek-V4's included (two-source and ranged ``sparse_mla``, the decode
range form and MODEL1 pages, paged index keys, ``compress_kv``); with ``--backend tilelang`` the agreement properties
(``tests/test_backend_agreement*.py``) compare the kernels with the reference on the same inputs.

How it runs:

* the property tests (every ``tests/test_*.py`` with ``@given``, or ``--tests``) run under the ``long`` Hypothesis
  profile registered in ``tests/conftest.py`` (``HYPOTHESIS_PROFILE=long``), with ``DSA_BACKEND`` set to the chosen
  backend. With ``--backend reference`` the kernel tiers (``cpu_kernel``, ``gpu``) are deselected; with ``tilelang``
  the GPU tier runs where CUDA is present. The ``build`` tier (nvcc compiles, no properties) never runs here;
* the run is cut into chunks: each chunk is one pytest process with the ``long`` profile's settings but
  ``--chunk`` examples per test (each process draws its own random seed; no ``--hypothesis-seed``, which would
  switch the example database off), so every test gets its turn and statistics come back regularly;
  chunks repeat until the deadline, and the last one is stopped there (its process group is killed);
* Hypothesis's example database lives in ``--db`` (default ``.hypothesis-fuzz/``, through Hypothesis's own
  ``HYPOTHESIS_STORAGE_DIRECTORY``): a failing example is saved there and is replayed first by every later run,
  fuzz or plain pytest with the same variable;
* at the end it prints the examples run (from ``--hypothesis-show-statistics``) and every failure found, with its
  falsifying example.

Exit status: 0 when no failure was found, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsa import process

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
DEFAULT_DB = ROOT / ".hypothesis-fuzz"
DEFAULT_CHUNK = 50
LONG_PROFILE = "long"
CHUNK_PROFILE = "dsa-fuzz-chunk"
# Test files that must never run inside a fuzz run (they download wheels, or start fuzz runs, GPU checks or benchmark
# processes themselves).
NEVER_FUZZ = ("test_bundle.py", "test_fuzz.py", "test_gpu_check.py", "test_bench.py")
_EXAMPLES_RE = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing")
_FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


@dataclass
class ChunkResult:
    """One pytest process: examples run, failing tests, whether it was cut at the deadline."""

    examples: int
    failing_examples: int
    failed_tests: list[str]
    stopped: bool
    rc: int | None
    seconds: float
    output: str


@dataclass
class FuzzReport:
    chunks: list[ChunkResult] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return sum(c.examples + c.failing_examples for c in self.chunks)

    @property
    def failures(self) -> list[str]:
        return list(dict.fromkeys(t for c in self.chunks for t in c.failed_tests))


def property_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold Hypothesis properties (``@given``), except the ones that must not run here."""
    files = []
    for path in sorted((root / "tests").glob("test_*.py")):
        if path.name in NEVER_FUZZ:
            continue
        if "@given" in path.read_text(encoding="utf-8", errors="replace"):
            files.append(str(path.relative_to(root)))
    return files


def marker_expression(backend: str, cuda: bool) -> str:
    """Which tiers run: the reference backend deselects the kernel tiers; nothing here runs the build tier."""
    if backend == "reference":
        return "not cpu_kernel and not gpu and not build"
    return "not build" if cuda else "not gpu and not build"


def count_examples(output: str) -> tuple[int, int]:
    """Passing and failing examples summed over every test and phase of a ``--hypothesis-show-statistics`` output."""
    passing = failing = 0
    for p, f in _EXAMPLES_RE.findall(output):
        passing += int(p)
        failing += int(f)
    return passing, failing


def failure_excerpts(output: str, limit: int = 4000) -> str:
    """The falsifying examples and assertion lines of a pytest output (what to read first)."""
    keep = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("E ") or "@reproduce_failure" in line:
            keep.append(line)
        elif "Falsifying example" in line:  # older Hypothesis prints the example outside the E lines
            keep.extend(lines[i : i + 6])
    text = "\n".join(dict.fromkeys(keep))
    return text[-limit:]


def run_chunk(cmd: Sequence[str], env: dict[str, str], timeout_s: float) -> ChunkResult:
    """Run one chunk in its own process group; stop the group when ``timeout_s`` passes."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as sink:
        finished = process.run_with_deadline(cmd, timeout_s=timeout_s, cwd=ROOT, env=env, stdout=sink)
        sink.seek(0)
        output = sink.read()
    passing, failing = count_examples(output)
    stopped = finished.timed_out
    failed = [] if stopped else _FAILED_RE.findall(output)
    return ChunkResult(passing, failing, failed, stopped, finished.rc, finished.seconds, output)


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one pytest process with the chunk profile (runs inside the subprocess)
# ----------------------------------------------------------------------------------------------------------------------
class _ChunkProfilePlugin:
    """Loads a profile derived from the conftest's ``long`` profile with ``max_examples`` set to the chunk size."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def pytest_configure(self, config: Any) -> None:  # noqa: ARG002 - pytest hook signature
        from hypothesis import settings

        try:
            parent = settings.get_profile(LONG_PROFILE)
        except Exception:  # noqa: BLE001 - the conftest did not register it: Hypothesis defaults
            parent = settings.default
        settings.register_profile(CHUNK_PROFILE, parent=parent, max_examples=self.chunk)
        settings.load_profile(CHUNK_PROFILE)


def worker(chunk: int, pytest_args: list[str]) -> int:
    """Run pytest in this process with the chunk profile."""
    import pytest

    return int(pytest.main(pytest_args, plugins=[_ChunkProfilePlugin(chunk)]))


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="fuzz", description="Fuzz the DSA ops with the Hypothesis property suite for N minutes.")
    p.add_argument("--backend", choices=("reference", "tilelang"), required=True, help="DSA_BACKEND for the run")
    p.add_argument("--minutes", type=float, required=True, help="stop after this many minutes (fractions allowed)")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help="Hypothesis storage folder (default %(default)s)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="examples per test per pytest run")
    p.add_argument("--tests", nargs="*", default=None, help="test files or ids (default: every property test file)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fuzzer (or, with ``--worker``, one chunk of it); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        # Inside the chunk subprocess: --worker <chunk> <pytest args...>
        return worker(int(argv[1]), argv[2:])
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.chunk < 1:
        print("fuzz: --minutes must be > 0 and --chunk >= 1", file=sys.stderr)
        return EXIT_USAGE
    tests = args.tests if args.tests else property_test_files()
    if not tests:
        print("fuzz: no property tests found", file=sys.stderr)
        return EXIT_USAGE
    cuda = _cuda_available()
    db = args.db.resolve()
    db.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HYPOTHESIS_PROFILE=LONG_PROFILE,
        HYPOTHESIS_STORAGE_DIRECTORY=str(db),
        DSA_BACKEND=args.backend,
        PYTHONUNBUFFERED="1",
    )
    env.pop("CI", None)  # the ci profile is derandomised: every chunk would replay the same examples
    marks = marker_expression(args.backend, cuda)
    deadline = time.monotonic() + args.minutes * 60
    print(
        f"fuzz: backend={args.backend} ({'CUDA' if cuda else 'CPU'}), {args.minutes:g} min, -m '{marks}', "
        f"{args.chunk} examples per test per run, database {db}",
        flush=True,
    )
    report = FuzzReport()
    shown: set[str] = set()  # failing tests whose falsifying example was printed already
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 1.0:
            break
        pytest_args = [*tests, "-m", marks, "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
        if args.keyword:
            pytest_args += ["-k", args.keyword]
        cmd = [sys.executable, "-m", "dsa.fuzz", "--worker", str(args.chunk), *pytest_args]
        result = run_chunk(cmd, env, remaining)
        report.chunks.append(result)
        state = "stopped at the deadline" if result.stopped else f"exit {result.rc}"
        print(
            f"fuzz: run {len(report.chunks)}: {result.examples} passing, {result.failing_examples} "
            f"failing examples in {result.seconds:.1f} s ({state})",
            flush=True,
        )
        new_failures = [t for t in result.failed_tests if t not in shown]
        if new_failures:
            shown.update(new_failures)
            print(failure_excerpts(result.output), flush=True)
        if not result.stopped and result.rc not in (0, 1):
            # 2-4: interrupted, internal or usage error, 5: nothing collected; running again would not help.
            print(result.output[-3000:], flush=True)
            print(f"fuzz: pytest exited {result.rc}; stopping", file=sys.stderr)
            report.chunks[-1].failed_tests.append(f"<pytest exit {result.rc}>")
            break
    failures = report.failures
    print(f"fuzz: examples run: {report.examples} in {len(report.chunks)} run(s); failures: {len(failures)}")
    for name in failures:
        print(f"fuzz: FAILED {name}")
    if failures:
        print(f"fuzz: the failing examples are saved in {db}; rerun with HYPOTHESIS_STORAGE_DIRECTORY={db} to replay")
    return EXIT_FOUND if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""CPU threads: the benchmark prints and records the torch thread count it ran with (issue 18, item 6).

On a shared 2-core machine torch's default threads made CPU decoding 10-60x slower than ``OMP_NUM_THREADS=1`` under
load, so a CPU timing means nothing without the thread count beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import bench


@pytest.fixture
def three_torch_threads() -> Iterator[int]:
    """torch set to a thread count no default gives on this machine, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(threads)


def test_bench_prints_and_records_the_torch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], three_torch_threads: int
) -> None:
    """``dsa-bench --device cpu``: the thread count is printed before the first case and stored in the JSON record's
    host block (``torch_threads``, with ``OMP_NUM_THREADS`` as set). The cases themselves are stubbed out: this
    checks the harness, not a kernel."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(bench, "run_case", lambda case, options, ceilings: bench.CaseResult())
    out = tmp_path / "threads.json"
    status = bench.main(["--device", "cpu", "--tiny", "--kernels", "topk", "--json", str(out)])
    assert status == bench.EXIT_OK
    printed = capsys.readouterr().out
    assert f"[bench] torch CPU threads: {three_torch_threads} (OMP_NUM_THREADS=3;" in printed
    assert printed.index("torch CPU threads") < printed.index("[bench] tiny-topk")
    host = json.loads(out.read_text())["host"]
    assert host["torch_threads"] == three_torch_threads and host["omp_num_threads"] == "3"

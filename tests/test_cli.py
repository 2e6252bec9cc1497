"""The ``dsa-autotune`` command line (``autotune.cli``): the fake kernel's compile-only table and report, bad
arguments, and one real compile-only run of ``scripts/autotune.py`` for sm_90a (marker ``build``)."""

from __future__ import annotations

import contextlib

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from autotune import cli, tuner
from autotune.lookup import space
from tests import fake_kernel as fake

REPO = Path(__file__).resolve().parents[1]


REPORT_KEYS = {
    "kernel", "params", "config", "ok", "error", "registers", "spill_bytes", "smem_bytes", "mma",
    "compile_s", "latency_ms", "tflops", "chosen", "arch",
}


def test_cli_fake_compile_only(
    fake_kernel: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    report = tmp_path / "report.json"
    argv = ["--kernels", fake.KERNEL, "--shapes", fake.PRESET, "--jobs", "1", "--full", "--no-progress"]
    argv += ["--report", str(report)]
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("No CUDA device")
    assert "fake on sm_90a  [width=8 limit=256]" in out and "rejected: 64 B of register spills" in out
    records = json.loads(report.read_text())
    assert records and all(set(r) == REPORT_KEYS and r["arch"] == "sm_90a" for r in records)
    assert all(r["latency_ms"] is None and r["tflops"] is None and r["chosen"] is False for r in records)
    # With a limit that no config meets, the case has no valid config and the exit status says so.
    space.register_kernel(
        space.spec(fake.KERNEL), {fake.PRESET: [space.Case(fake.KERNEL, {"width": 8, "limit": 1}, fake.SIZES, fake.CHECK)]}
    )
    assert cli.main(argv) == cli.EXIT_NO_VALID_CONFIG
    assert "NO VALID CONFIG: fake width=8 limit=1" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, reason in (
        (["--kernels", "nope"], "unknown kernel"),
        (["--shapes", "no-such-preset"], "neither a preset"),
        (["--sku", "H100!"], "is not a SKU id"),
        (["--sku", "sm75-nvidia-tesla-t4"], "no kernels are built for compute capability 7.5"),
        (["--sku", "no-such-board"], "unknown SKU id"),
        (["--jobs", "0"], "--jobs"),
        (["--candidate-timeout", "0"], "--candidate-timeout"),
        (["--full", "--defaults-only"], "not allowed with"),
    ):
        with contextlib.suppress(SystemExit):  # argparse exits for its own conflicts
            assert cli.main(argv) == cli.EXIT_USAGE, argv
        assert reason in capsys.readouterr().err, argv


@pytest.mark.build
def test_script_compile_only_tiny(tmp_path: Path) -> None:
    """``scripts/autotune.py`` compile-only for sm_90a on the tiny preset: the report lists every candidate of the
    pruned space with its static report, no times, and TileLang leaves no ``autotuner.log`` in the working dir."""
    kernels = ("sparse_mla_fwd",)
    report = tmp_path / "report.json"
    env = {**os.environ, "DSA_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "autotune.py"), "--shapes", "tiny", "--kernels", ",".join(kernels),
         "--jobs", "2", "--no-progress", "--report", str(report)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode in (cli.EXIT_OK, cli.EXIT_NO_VALID_CONFIG), proc.stderr[-3000:]
    assert proc.stdout.startswith("No CUDA device"), proc.stdout
    records = json.loads(report.read_text())
    assert all(set(r) == REPORT_KEYS for r in records)
    for case in space.preset_cases("tiny", kernels):
        expected = space.candidates(case.kernel, case.static)
        mine = [r for r in records if r["kernel"] == case.kernel and r["params"] == case.static]
        assert [r["config"] for r in mine] == expected
    for r in records:
        assert r["latency_ms"] is None and r["tflops"] is None and r["chosen"] is False
        assert r["compile_s"] is not None and r["compile_s"] > 0
        if r["ok"]:
            assert r["error"] is None and r["spill_bytes"] == 0 and r["mma"] == "wgmma"
            assert 0 < r["registers"] <= 255 and 0 < r["smem_bytes"] <= 227 * 1024
        else:
            assert r["error"]
    any_ok = any(r["ok"] for r in records)
    assert proc.returncode == (cli.EXIT_OK if any_ok else cli.EXIT_NO_VALID_CONFIG)
    assert not (tmp_path / "autotuner.log").exists()
    assert not list((tmp_path / "cache").glob("**/*.json")), "compile-only must not write tuned configs"


def test_readme_sample_table_is_the_cli_output_format() -> None:
    """The README shows a real compile-only run: its column headers and its rows are what ``render_table`` prints
    for untimed records (a changed table format must change the README with it)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("$ python scripts/autotune.py --compile-only") :]
    block = block[: block.index("```")]
    headers = [line.strip() for line in block.splitlines() if line.strip().startswith("config ")]
    assert headers and all(h.split() == ["config", "regs", "spill", "B", "smem", "KiB", "mma", "compile", "s", "status"]
                            for h in headers), headers  # fmt: skip
    record = tuner.Record("k", {"x": 1}, {"a": 1}, True, None, 96, 0, 83968, "wgmma", 0.1, arch="sm_90a")
    rendered = cli.render_table([record], timed=False).splitlines()
    assert rendered[0] == "k on sm_90a  [x=1]"
    assert rendered[1].split() == headers[0].split()
    assert rendered[2].split() == ["a=1", "96", "0", "82.0", "wgmma", "0.1", "ok"]
    for kernel in space.KERNEL_NAMES:
        assert f"\n{kernel} on sm_90a  [" in block, f"the README's sample lacks {kernel}"

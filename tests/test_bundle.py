"""``scripts/bundle_offline.py``: the offline TileLang bundle builds, stays under its bound, and works.

The tests marked ``network`` download wheels from the package index pip is configured with (about 85 MB, once per
session: the wheel cache and the built archive are session fixtures); the others read the script only. The archive is built at ``xz -1`` here to keep the session near
two minutes on 2 cores; the default ``-6`` only makes it smaller (about 39 MB against 46 MB).

The shipped bundle is for CPython 3.12, and TileLang imports torch, which the ``python3.12`` on a CI machine lacks.
So the bundle's import-and-lower check runs in a fresh process of the running interpreter (which has torch) against
a bundle built by the same script for that interpreter's version; the 3.12 bundle is checked for its layout, its
size, and (where a ``python3.12`` exists) for importing its torch-free part (z3) there.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

network = pytest.mark.network  # downloads about 85 MB of wheels: never in CI (run with --network)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bundle_offline.py"
BOUND_MB = 60.0
TEST_XZ_LEVEL = 1
# TileLang's closure less what the host has; psutil, tqdm and cloudpickle because `import tilelang` needs them and a
# host with torch may lack them.
EXPECTED_PACKAGES = {"tilelang", "apache-tvm-ffi", "torch-c-dlpack-ext", "z3-solver", "psutil", "tqdm", "cloudpickle"}
RUNNING_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

# Lowered in a fresh interpreter whose PYTHONPATH holds only the bundle: a 128x128x128 GEMM for sm_90a (lowering
# needs no nvcc and no GPU), and every bundled module must come from the bundle, not from an installed copy.
LOWER_PROBE = """
import sys
import tilelang, tvm_ffi, z3, torch_c_dlpack_ext, psutil, tqdm, cloudpickle
import tilelang.language as T
from tilelang import tvm

tree = sys.argv[1]
for module in (tilelang, tvm_ffi, z3, torch_c_dlpack_ext, psutil, tqdm, cloudpickle):
    assert module.__file__.startswith(tree), (module.__name__, module.__file__)
M = N = K = 128

@T.prim_func
def gemm(A: T.Tensor((M, K), "float16"), B: T.Tensor((K, N), "float16"), C: T.Tensor((M, N), "float32")):
    with T.Kernel(1, 1, threads=128) as (bx, by):
        a = T.alloc_shared((M, K), "float16")
        b = T.alloc_shared((K, N), "float16")
        c = T.alloc_fragment((M, N), "float32")
        T.clear(c)
        T.copy(A, a)
        T.copy(B, b)
        T.gemm(a, b, c)
        T.copy(c, C)

target = {"kind": "cuda", "arch": "sm_90a"}
with tvm.target.Target(target):
    artifact = tilelang.lower(gemm, target=target)
assert "wgmma" in artifact.kernel_source
print("LOWERED", tilelang.__version__)
"""


def _load_script() -> Any:
    """``scripts/bundle_offline.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("bundle_offline", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _fresh_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYENV_VERSION"))}
    env["PYTHONPATH"] = str(site)
    return env


def _find_python312() -> str | None:
    """A working ``python3.12`` (the pyenv shim may exist and still fail), or None."""
    candidates = [
        shutil.which("python3.12"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
    ]
    for exe in filter(None, candidates):
        proc = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() == "(3, 12)":
            return exe
    return None


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle-wheels")


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory, wheel_dir: Path) -> dict:
    """The default bundle (CPython 3.12, manylinux x86_64), built once, and its archive unpacked."""
    out_dir = tmp_path_factory.mktemp("bundle")
    archive = out_dir / "dsa-bundle.tar.xz"
    start = time.perf_counter()
    proc = _run_script("--wheel-dir", str(wheel_dir), "--out", str(archive), "--xz-level", str(TEST_XZ_LEVEL))
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = out_dir / "site"
    site.mkdir()
    with tarfile.open(archive, "r:xz") as tar:  # as scripts/gpu_check.sh does on a host without the xz program
        tar.extractall(site, filter="data")
    return {"archive": archive, "site": site, "stdout": proc.stdout, "elapsed": elapsed}


@pytest.fixture(scope="session")
def running_site(tmp_path_factory: pytest.TempPathFactory, wheel_dir: Path, default_bundle: dict) -> Path:
    """A bundle tree for the running interpreter: the default archive when it is CPython 3.12, else a tree built for
    this version (tilelang and z3 wheels are shared with the default bundle through the wheel cache)."""
    if RUNNING_VERSION == "3.12":
        return default_bundle["site"]
    tree = tmp_path_factory.mktemp("bundle-running") / "site"
    proc = _run_script(
        "--wheel-dir", str(wheel_dir), "--python-version", RUNNING_VERSION, "--tree", str(tree), "--no-archive"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tree


@network
def test_archive_builds_under_the_bound(default_bundle: dict) -> None:
    size_mb = default_bundle["archive"].stat().st_size / 1e6
    assert size_mb <= BOUND_MB, f"archive is {size_mb:.1f} MB at xz -{TEST_XZ_LEVEL}"
    assert f"archive: {default_bundle['archive']}" in default_bundle["stdout"]
    install = (default_bundle["archive"].parent / "INSTALL.txt").read_text().strip()
    assert "\n" not in install and "tar -xJf" in install and "PYTHONPATH=" in install


@network
def test_bundle_holds_exactly_the_missing_packages(default_bundle: dict) -> None:
    site: Path = default_bundle["site"]
    manifest = json.loads((site / "DSA_BUNDLE.json").read_text())
    assert set(manifest["packages"]) == EXPECTED_PACKAGES
    assert manifest["packages"]["tilelang"]["version"] == "0.1.15"
    assert manifest["python"] == "cp3.12"
    # Nothing the host already has, torch above all, is in the tree.
    for absent in ("torch", "numpy", "ml_dtypes", "typing_extensions.py"):
        assert not (site / absent).exists(), absent
    # The CPython-specific wheel is the 3.12 one.
    assert "cp312" in manifest["packages"]["torch-c-dlpack-ext"]["wheel"]


@network
def test_z3_duplicates_dropped(default_bundle: dict) -> None:
    site: Path = default_bundle["site"]
    assert not list(site.glob("z3_solver-*.data")), "z3's command-line binary must not be bundled"
    libs = sorted((site / "z3" / "lib").glob("libz3.so*"))
    real = [p for p in libs if not p.is_symlink()]
    links = [p for p in libs if p.is_symlink()]
    assert len(real) == 1 and len(links) >= 1, libs
    for link in links:
        assert link.resolve() == real[0].resolve()


@network
def test_python312_imports_the_torch_free_part(default_bundle: dict) -> None:
    exe = _find_python312()
    if exe is None:
        pytest.skip("no working python3.12 on this machine")
    code = (
        "import z3, psutil, tqdm, cloudpickle; s = z3.Solver(); x = z3.Int('x'); s.add(x > 3, x < 5); "
        "assert str(s.check()) == 'sat'; assert psutil.cpu_count() >= 1; "
        "assert cloudpickle.loads(cloudpickle.dumps(lambda: 3))() == 3; "
        "print(z3.__file__, psutil.__file__, tqdm.__file__, cloudpickle.__file__)"
    )
    proc = subprocess.run(
        [exe, "-s", "-c", code], capture_output=True, text=True, env=_fresh_env(default_bundle["site"]), cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    for path in proc.stdout.split():
        assert path.startswith(str(default_bundle["site"])), path


@network
def test_fresh_interpreter_imports_tilelang_and_lowers_for_sm90a(running_site: Path, tmp_path: Path) -> None:
    probe = tmp_path / "lower_probe.py"  # a file, not -c: TileLang's parser reads the kernel's source text
    probe.write_text(LOWER_PROBE)
    proc = subprocess.run(
        [sys.executable, "-s", str(probe), str(running_site)],
        capture_output=True,
        text=True,
        env=_fresh_env(running_site),
        cwd="/",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LOWERED 0.1.15" in proc.stdout


def test_tilelangs_import_dependencies_are_bundled_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """psutil, tqdm and cloudpickle (``import tilelang`` fails without them) are never in the default exclude list;
    excluding one by hand warns (no download: resolution is stubbed out)."""
    bundle_offline = _load_script()
    assert set(bundle_offline.ALWAYS_BUNDLED) == {"psutil", "tqdm", "cloudpickle"}
    assert not set(bundle_offline.ALWAYS_BUNDLED) & set(bundle_offline.DEFAULT_EXCLUDE)
    assert {"torch", "numpy"} <= set(bundle_offline.DEFAULT_EXCLUDE)

    def no_resolve(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("not resolving in this test")

    monkeypatch.setattr(bundle_offline, "resolve", no_resolve)
    argv = ["--exclude", "torch,PSUtil", "--wheel-dir", str(tmp_path), "--out", str(tmp_path / "b.tar.xz")]
    with caplog.at_level("WARNING", logger="bundle_offline"):
        assert bundle_offline.main(argv) == bundle_offline.EXIT_FAILED
    assert "psutil is excluded" in caplog.text

#!/usr/bin/env python3
"""Build an offline bundle of TileLang and its dependencies for a host that cannot reach a package index.

The GPU host this project is checked on has PyTorch, numpy and the usual scientific stack but no TileLang and no
network. This script downloads the wheels of ``tilelang==0.1.15`` and its dependency closure for a chosen Python
version and platform (default: CPython 3.12, manylinux x86_64), skipping what the host already has (torch, numpy,
ml-dtypes and torch's own dependencies; ``psutil``, ``tqdm`` and ``cloudpickle``, which ``import tilelang`` needs, are
bundled, since a host with torch may lack them), unpacks them into one site tree, drops duplicate files, and writes an
xz-compressed tar archive plus a one-line install command::

    python scripts/bundle_offline.py                      # -> .bundle/dsa-bundle.tar.xz (+ .bundle/INSTALL.txt)
    mkdir -p /tmp/dsa-site && tar -xJf .bundle/dsa-bundle.tar.xz -C /tmp/dsa-site && export PYTHONPATH=/tmp/dsa-site

Resolution is done here, not by pip: each wheel is fetched with ``pip download --no-deps --only-binary=:all:`` for the
target interpreter and platform, and its ``METADATA`` ``Requires-Dist`` lines are evaluated for that target (extras
are skipped; excluded names are skipped). One version of each package is kept; a later requirement that the chosen
version does not satisfy is an error.

Deduplication: files under ``<name>.data/`` other than ``purelib``/``platlib`` are dropped (z3-solver ships its
``z3`` command-line binary there, 22 MB, which the Python bindings never use), and byte-identical large files inside
the tree are replaced by relative symbolic links (z3-solver carries ``libz3.so`` and ``libz3.so.4.15`` as two copies).

Wheels are cached in ``--wheel-dir`` (default ``.bundle/wheels``): a wheel already there that fits the target and the
requirement is not downloaded again. The pip that downloads is the running interpreter's (``--pip-python`` to change
it); it uses the index pip is configured with.

Exit status: 0 on success, 1 when a download or resolution fails, 3 when the archive exceeds ``--max-mb``.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:  # packaging is a dependency of nearly every environment; pip vendors a copy otherwise.
    from packaging.requirements import Requirement
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - depends on the environment
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import Tag, compatible_tags, cpython_tags  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]

logger = logging.getLogger("bundle_offline")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOTS: tuple[str, ...] = ("tilelang==0.1.15",)
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORMS: tuple[str, ...] = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
# Tried one after another when pip finds no wheel for the default tags (pip matches manylinux_2_N tags exactly).
FALLBACK_PLATFORMS: tuple[str, ...] = tuple(f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35, 39))
# What the GPU host already has (its image ships PyTorch and the scientific stack: torch itself requires
# typing-extensions, setuptools, filelock, sympy, networkx, jinja2 and fsspec). TileLang's own closure beyond these is
# exactly: tilelang, apache-tvm-ffi, torch-c-dlpack-ext, z3-solver, and the small dependencies below.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "torch",
    "numpy",
    "ml-dtypes",
    "typing-extensions",
    "setuptools",
    "packaging",
    "importlib-resources",
    "filelock",
    "sympy",
    "networkx",
    "jinja2",
    "fsspec",
)
# TileLang imports these at `import tilelang`, and a host with torch need not have them: they are always bundled
# (about 0.5 MB; psutil's wheel is a CPython-ABI-stable binary, the others pure Python).
ALWAYS_BUNDLED: tuple[str, ...] = ("psutil", "tqdm", "cloudpickle")
DEFAULT_OUT = Path(".bundle") / "dsa-bundle.tar.xz"
DEFAULT_WHEEL_DIR = Path(".bundle") / "wheels"
DEFAULT_MAX_MB = 60.0
DEFAULT_XZ_LEVEL = 6
DEFAULT_INSTALL_DIR = "/tmp/dsa-site"
# Only files at least this large are deduplicated: linking tiny identical files (empty __init__.py) saves nothing.
DEDUPE_MIN_BYTES = 64 * 1024
MANIFEST_NAME = "DSA_BUNDLE.json"
EXIT_OK, EXIT_FAILED, EXIT_TOO_LARGE = 0, 1, 3
_MB = 1_000_000


@dataclass
class Target:
    """The interpreter and platform the bundle is for.

    Attributes:
        python_version: ``"3.12"``.
        implementation: ``"cp"`` (CPython).
        platforms: wheel platform tags passed to pip (each also admits older manylinux tags, as pip does).
    """

    python_version: str
    implementation: str
    platforms: tuple[str, ...]

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.python_version.split(".")[:2]
        return int(major), int(minor)

    def marker_env(self) -> dict[str, str]:
        """The environment PEP 508 markers are evaluated in (Linux x86-64, the target CPython)."""
        major, minor = self.version_tuple
        return {
            "python_version": f"{major}.{minor}",
            "python_full_version": f"{major}.{minor}.0",
            "implementation_name": "cpython",
            "implementation_version": f"{major}.{minor}.0",
            "platform_python_implementation": "CPython",
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "platform_machine": "x86_64",
            "platform_release": "",
            "platform_version": "",
            "extra": "",
        }

    def expanded_platforms(self) -> list[str]:
        """Every platform tag a wheel may carry to fit (manylinux_2_N admits 2_M for M <= N and the legacy aliases)."""
        legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
        out: list[str] = []
        for plat in self.platforms:
            arch = plat.split("_", 3)[-1] if plat.startswith("manylinux_") else plat.split("_", 1)[-1]
            glibc: tuple[int, int] | None = None
            if plat.startswith("manylinux_"):
                _, major, minor, _ = plat.split("_", 3)
                glibc = (int(major), int(minor))
            elif plat.split("_", 1)[0] in legacy:
                glibc = legacy[plat.split("_", 1)[0]]
            out.append(plat)
            if glibc is None:
                continue
            for minor in range(glibc[1], 4, -1):
                out.append(f"manylinux_2_{minor}_{arch}")
            for name, (_, lminor) in legacy.items():
                if lminor <= glibc[1]:
                    out.append(f"{name}_{arch}")
        return list(dict.fromkeys(out))

    def tags(self) -> set[Tag]:
        """Wheel tags installable on the target, most specific first (as a set: only membership matters)."""
        plats = self.expanded_platforms()
        return set(cpython_tags(self.version_tuple, platforms=plats)) | set(
            compatible_tags(self.version_tuple, f"cp{self.version_tuple[0]}{self.version_tuple[1]}", plats)
        )


@dataclass
class Resolved:
    """One package of the closure: its wheel and why it is there."""

    name: str
    version: str
    wheel: Path
    required_by: list[str] = field(default_factory=list)


def wheel_requirements(wheel: Path, env: dict[str, str]) -> list[Requirement]:
    """The ``Requires-Dist`` requirements of ``wheel`` that apply in ``env`` (extras are never selected)."""
    with zipfile.ZipFile(wheel) as zf:
        meta_names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not meta_names:
            raise RuntimeError(f"{wheel.name}: no .dist-info/METADATA")
        text = zf.read(meta_names[0]).decode("utf-8")
    message = email.parser.Parser().parsestr(text, headersonly=True)
    out = []
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        out.append(req)
    return out


def _wheel_fits(path: Path, req: Requirement, target_tags: set[Tag]) -> bool:
    name, version, _, tags = parse_wheel_filename(path.name)
    return (
        name == canonicalize_name(req.name)
        and req.specifier.contains(version, prereleases=True)
        and bool(tags & target_tags)
    )


def find_cached(wheel_dir: Path, req: Requirement, target_tags: set[Tag]) -> Path | None:
    """The newest wheel in ``wheel_dir`` that satisfies ``req`` and installs on the target, if any."""
    hits = [p for p in wheel_dir.glob("*.whl") if _wheel_fits(p, req, target_tags)]
    return max(hits, key=lambda p: parse_wheel_filename(p.name)[1], default=None)


def pip_download(req: Requirement, target: Target, wheel_dir: Path, pip_python: str) -> None:
    """Download one wheel for ``req`` (no dependencies) into ``wheel_dir``, trying more manylinux tags if needed."""
    base = [
        pip_python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--python-version", target.python_version, "--implementation", target.implementation,
        "-d", str(wheel_dir),
    ]  # fmt: skip
    spec = f"{req.name}{req.specifier}"
    platforms = list(target.platforms)
    tried: list[str] = []
    for extra in (None, *FALLBACK_PLATFORMS):
        if extra is not None:
            platforms.append(extra)
        cmd = base + [arg for plat in platforms for arg in ("--platform", plat)] + [spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        tried.append(extra or "default tags")
        if "No matching distribution" not in proc.stderr and "Could not find a version" not in proc.stderr:
            raise RuntimeError(f"pip download {spec} failed:\n{proc.stderr.strip()[-2000:]}")
    raise RuntimeError(f"pip found no wheel for {spec} (tried {', '.join(tried)})")


def resolve(
    roots: Sequence[str], target: Target, wheel_dir: Path, exclude: Iterable[str], pip_python: str
) -> list[Resolved]:
    """Download the dependency closure of ``roots`` (less ``exclude``) and return one wheel per package."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    excluded = {canonicalize_name(n) for n in exclude}
    env = target.marker_env()
    target_tags = target.tags()
    chosen: dict[str, Resolved] = {}
    queue: list[tuple[Requirement, str]] = [(Requirement(r), "<root>") for r in roots]
    while queue:
        req, parent = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in excluded:
            logger.info("skip %s (required by %s): excluded", req, parent)
            continue
        if name in chosen:
            have = chosen[name]
            if not req.specifier.contains(have.version, prereleases=True):
                raise RuntimeError(f"{parent} needs {req} but {have.name} {have.version} was already chosen")
            have.required_by.append(parent)
            continue
        wheel = find_cached(wheel_dir, req, target_tags)
        if wheel is None:
            logger.info("download %s", req)
            pip_download(req, target, wheel_dir, pip_python)
            wheel = find_cached(wheel_dir, req, target_tags)
            if wheel is None:
                raise RuntimeError(f"pip downloaded nothing usable for {req} into {wheel_dir}")
        else:
            logger.info("cached %s", wheel.name)
        _, version, _, _ = parse_wheel_filename(wheel.name)
        chosen[name] = Resolved(name, str(version), wheel, [parent])
        for dep in wheel_requirements(wheel, env):
            queue.append((dep, f"{name}=={version}"))
    return list(chosen.values())


def _extract(wheel: Path, tree: Path) -> list[str]:
    """Unpack ``wheel`` into ``tree`` as pip would for a plain ``--target`` install of library code.

    ``<name>.data/purelib`` and ``platlib`` are merged into the tree; every other ``.data`` folder (scripts, headers,
    data: z3-solver's command-line binary) is dropped. Returns the dropped member names.
    """
    dropped: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    rel = "/".join(parts[2:])
                else:
                    dropped.append(info.filename)
                    continue
            else:
                rel = info.filename
            dest = tree / rel
            if not dest.resolve().is_relative_to(tree.resolve()):
                raise RuntimeError(f"{wheel.name}: member {info.filename!r} escapes the tree")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode & stat.S_IXUSR:
                dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dropped


def dedupe(tree: Path, min_bytes: int = DEDUPE_MIN_BYTES) -> list[tuple[str, str]]:
    """Replace byte-identical files of at least ``min_bytes`` by relative symlinks to one kept copy.

    The kept copy of a group is the one with the shortest path (then alphabetical). Returns ``(link, kept)`` pairs
    relative to ``tree``.
    """
    by_size: dict[int, list[Path]] = {}
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            if size >= min_bytes:
                by_size.setdefault(size, []).append(path)
    links: list[tuple[str, str]] = []
    for paths in by_size.values():
        if len(paths) < 2:
            continue
        by_hash: dict[str, list[Path]] = {}
        for path in paths:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            by_hash.setdefault(digest, []).append(path)
        for group in by_hash.values():
            if len(group) < 2:
                continue
            keep, *dups = sorted(group, key=lambda p: (len(str(p)), str(p)))
            for dup in dups:
                dup.unlink()
                dup.symlink_to(os.path.relpath(keep, dup.parent))
                links.append((str(dup.relative_to(tree)), str(keep.relative_to(tree))))
    return links


def build_tree(resolved: Sequence[Resolved], tree: Path, target: Target) -> dict[str, object]:
    """Unpack every wheel into ``tree``, drop duplicates, write the manifest; returns the manifest."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    dropped: list[str] = []
    for item in resolved:
        dropped += _extract(item.wheel, tree)
    links = dedupe(tree)
    manifest: dict[str, object] = {
        "python": f"{target.implementation}{target.python_version}",
        "platforms": list(target.platforms),
        "packages": {
            r.name: {"version": r.version, "wheel": r.wheel.name, "required_by": r.required_by} for r in resolved
        },
        "dropped": dropped,
        "linked": [{"link": link, "target": kept} for link, kept in links],
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tree / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def tree_bytes(tree: Path) -> int:
    """Bytes of the regular files under ``tree`` (symlinks count as nothing)."""
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def write_archive(tree: Path, out: Path, level: int) -> None:
    """Write ``tree``'s contents as an xz-compressed tar at ``out`` (paths relative to the tree, sorted).

    Uses the ``xz`` program with all cores when it is on PATH (several times faster than Python's single-threaded
    ``lzma``), else ``tarfile``'s xz mode at the same preset.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    members = sorted(p.relative_to(tree) for p in tree.rglob("*"))

    def add_all(tar: tarfile.TarFile) -> None:
        for rel in members:
            tar.add(tree / rel, arcname=str(rel), recursive=False)

    xz = shutil.which("xz")
    if xz:
        with open(tmp, "wb") as sink:
            proc = subprocess.Popen([xz, f"-{level}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=sink)
            assert proc.stdin is not None
            try:
                with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    add_all(tar)
            finally:
                proc.stdin.close()
                rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"xz exited with status {rc}")
    else:
        with tarfile.open(tmp, mode="w:xz", preset=level, format=tarfile.PAX_FORMAT) as tar:
            add_all(tar)
    tmp.replace(out)


def install_command(archive: Path, install_dir: str = DEFAULT_INSTALL_DIR) -> str:
    """The one-line command that unpacks ``archive`` and puts it on ``PYTHONPATH``."""
    return (
        f"mkdir -p {install_dir} && tar -xJf {archive} -C {install_dir} && "
        f"export PYTHONPATH={install_dir}${{PYTHONPATH:+:$PYTHONPATH}}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--package", action="append", default=None, help=f"root requirement(s) (default: {DEFAULT_ROOTS})")
    p.add_argument("--python-version", default=DEFAULT_PYTHON, help="target CPython version (default %(default)s)")
    p.add_argument("--implementation", default="cp", help="target implementation tag (default %(default)s)")
    p.add_argument(
        "--platform",
        action="append",
        default=None,
        help=f"wheel platform tag(s) (default: {' '.join(DEFAULT_PLATFORMS)})",
    )
    p.add_argument(
        "--exclude",
        default=",".join(DEFAULT_EXCLUDE),
        help="comma-separated distributions the host already has, skipped with their dependencies "
        "(default: %(default)s); pass '' to bundle everything",
    )
    p.add_argument("--wheel-dir", type=Path, default=None, help=f"wheel cache (default: <repo>/{DEFAULT_WHEEL_DIR})")
    p.add_argument("--out", type=Path, default=None, help=f"archive to write (default: <repo>/{DEFAULT_OUT})")
    p.add_argument("--tree", type=Path, default=None, help="also keep the unpacked site tree here")
    p.add_argument("--no-archive", action="store_true", help="build the tree only (needs --tree)")
    p.add_argument("--xz-level", type=int, default=DEFAULT_XZ_LEVEL, choices=range(10), help="xz preset (default 6)")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, help="fail when the archive is larger (MB)")
    p.add_argument("--install-dir", default=DEFAULT_INSTALL_DIR, help="where the install command unpacks")
    p.add_argument("--pip-python", default=sys.executable, help="interpreter whose pip downloads (default: this one)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the bundle; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.no_archive and args.tree is None:
        print("bundle_offline: --no-archive needs --tree", file=sys.stderr)
        return EXIT_FAILED
    target = Target(args.python_version, args.implementation, tuple(args.platform or DEFAULT_PLATFORMS))
    wheel_dir = (args.wheel_dir or ROOT / DEFAULT_WHEEL_DIR).resolve()
    out = (args.out or ROOT / DEFAULT_OUT).resolve()
    exclude = [n.strip() for n in args.exclude.split(",") if n.strip()]
    for name in sorted({canonicalize_name(n) for n in exclude} & set(ALWAYS_BUNDLED)):
        logger.warning("bundle_offline: %s is excluded: `import tilelang` fails on a host without it", name)
    start = time.perf_counter()
    try:
        resolved = resolve(args.package or DEFAULT_ROOTS, target, wheel_dir, exclude, args.pip_python)
    except RuntimeError as exc:
        print(f"bundle_offline: {exc}", file=sys.stderr)
        return EXIT_FAILED
    wheel_bytes = sum(r.wheel.stat().st_size for r in resolved)
    elapsed = time.perf_counter() - start
    print(f"resolved {len(resolved)} packages ({wheel_bytes / _MB:.1f} MB of wheels) in {elapsed:.1f} s:")
    for r in resolved:
        print(f"  {r.name}=={r.version}  {r.wheel.name}")
    tree = (args.tree or out.with_name(out.name + ".tree")).resolve()
    manifest = build_tree(resolved, tree, target)
    for link in manifest["linked"]:  # type: ignore[union-attr]
        print(f"  linked {link['link']} -> {link['target']}")  # type: ignore[index]
    print(f"  dropped {len(manifest['dropped'])} file(s) outside purelib/platlib")  # type: ignore[arg-type]
    print(f"site tree: {tree_bytes(tree) / _MB:.1f} MB at {tree}")
    if args.no_archive:
        print(f"export PYTHONPATH={tree}${{PYTHONPATH:+:$PYTHONPATH}}")
        return EXIT_OK
    t0 = time.perf_counter()
    write_archive(tree, out, args.xz_level)
    if args.tree is None:
        shutil.rmtree(tree)
    size_mb = out.stat().st_size / _MB
    print(f"archive: {out} {size_mb:.1f} MB (xz -{args.xz_level}, {time.perf_counter() - t0:.1f} s)")
    command = install_command(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out, args.install_dir)
    (out.parent / "INSTALL.txt").write_text(command + "\n", encoding="utf-8")
    print(f"install: {command}")
    if size_mb > args.max_mb:
        print(f"bundle_offline: archive is {size_mb:.1f} MB, over the {args.max_mb:g} MB bound", file=sys.stderr)
        return EXIT_TOO_LARGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

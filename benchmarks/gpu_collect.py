"""``gpu_check --collect-into DIR``: pack what a GPU check left into the few files the device tool returns.

The newest record in ``--out-dir`` written since ``--since FILE``'s mtime and its PNG, the compile report and the logs
of ``--work-dir`` go into at most :data:`MAX_OUT_FILES` files in ``DIR``, each named in ``[A-Za-z0-9._-]`` and at
most :data:`MAX_OUT_FILE_BYTES`: the record, the PNG, ``compile-report.json``, ``logs.tar.gz`` (every log, JUnit file
and intermediate JSON of the work folder) and ``summary.txt`` (stage by stage: passed, failed, timeout or skipped,
with counts and the first error; :func:`benchmarks.gpu_record.brief`). ``scripts/gpu_check.sh`` runs it for the device
tool's ``$OUT``, which returns at most 8 files of at most 16 MiB each.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import gpu_record
from benchmarks.gpu_record import STAGES, first_error

__all__ = ["collect_outputs", "out_name", "pack_logs"]

logger = logging.getLogger(__name__)

# What the device tool returns from $OUT: at most 8 files, each at most 16 MiB, named in [A-Za-z0-9._-].
MAX_OUT_FILES = 8
MAX_OUT_FILE_BYTES = 16 * 1024 * 1024
OUT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SUMMARY_NAME = "summary.txt"
LOGS_ARCHIVE_NAME = "logs.tar.gz"
COMPILE_REPORT_NAME = "compile-report.json"
# The check's own output, as scripts/gpu_check.sh keeps it in the work folder.
RUNNER_LOG_NAME = "gpu_check.log"
# The work folder's files that go into logs.tar.gz (its folders, the bundle's site tree and the caches, do not).
LOG_SUFFIXES: tuple[str, ...] = (".log", ".xml", ".json", ".txt")
# A file larger than this goes into logs.tar.gz as its first eighth and its end (text logs compress 5-10x, so the
# archive stays far below MAX_OUT_FILE_BYTES); halved until the archive fits.
LOG_MEMBER_BYTES = 8 * 1024 * 1024


def _newest(paths: Sequence[Path], since: float | None) -> Path | None:
    """The most recently modified of ``paths`` modified at or after ``since`` (any when None), or None."""
    fresh = [(p.stat().st_mtime, p) for p in paths if p.is_file() and (since is None or p.stat().st_mtime >= since)]
    return max(fresh, key=lambda item: item[0])[1] if fresh else None


def out_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (what the device tool returns)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _member_bytes(path: Path, cap: int) -> bytes:
    """The bytes of ``path``; one larger than ``cap`` as its first eighth, a marker line, and its end."""
    size = path.stat().st_size
    with open(path, "rb") as src:
        if size <= cap:
            return src.read()
        head = src.read(cap // 8)
        src.seek(size - (cap - cap // 8))
        tail = src.read()
    marker = f"\n[gpu_check: {size - len(head) - len(tail)} bytes of {size} left out here]\n".encode()
    return head + marker + tail


def pack_logs(work: Path, archive: Path, *, exclude: Sequence[str] = ()) -> list[str]:
    """Write ``archive`` (gzip tar) with every top-level ``.log``/``.xml``/``.json``/``.txt`` file of ``work`` but
    ``exclude``; a large file keeps its head and end, cut harder until the archive is at most
    ``MAX_OUT_FILE_BYTES``. Returns the member names."""
    files = sorted(
        p for p in work.iterdir() if p.is_file() and p.suffix in LOG_SUFFIXES and p.name not in exclude
    ) if work.is_dir() else []
    cap = LOG_MEMBER_BYTES
    while True:
        with tarfile.open(archive, "w:gz") as tar:
            for path in files:
                data = _member_bytes(path, cap)
                info = tarfile.TarInfo(out_name(path.name))
                info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
        if archive.stat().st_size <= MAX_OUT_FILE_BYTES or cap <= 64 * 1024:
            return [out_name(p.name) for p in files]
        cap //= 2


def _read_record(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("could not read the record %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def collect_outputs(
    out: Path, *, work: Path, results: Path, since: float | None = None, runner_rc: int | None = None
) -> list[Path]:
    """Pack what a run left into at most ``MAX_OUT_FILES`` files in ``out``, each named in ``[A-Za-z0-9._-]``, none in
    a folder, each at most ``MAX_OUT_FILE_BYTES``: the newest record ``results/*.json`` modified at or after ``since``
    (a Unix time) and its PNG, the compile report, ``logs.tar.gz`` (every log, JUnit file and JSON of ``work``) and
    ``summary.txt`` (:func:`benchmarks.gpu_record.brief`). A file over the size limit is left out and said so in the
    summary. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []

    def copy(src: Path | None) -> None:
        if src is None or not src.is_file():
            return
        size = src.stat().st_size
        if size > MAX_OUT_FILE_BYTES:
            notes.append(f"{src.name} left out: {size} bytes, over the {MAX_OUT_FILE_BYTES} a returned file may hold")
            return
        dest = out / out_name(src.name)
        shutil.copyfile(src, dest)
        written.append(dest)

    record = _newest(sorted(results.glob("*.json")), since) if results.is_dir() else None
    doc = _read_record(record)
    copy(record)
    png = record.with_suffix(".png") if record is not None else None
    if png is None or not png.is_file() or (since is not None and png.stat().st_mtime < since):
        png = _newest(sorted(results.glob("*.png")), since) if results.is_dir() else None
    copy(png)
    copy(work / COMPILE_REPORT_NAME)
    archive = out / LOGS_ARCHIVE_NAME
    try:
        members = pack_logs(work, archive, exclude=(COMPILE_REPORT_NAME,))
        written.append(archive)
    except OSError as exc:
        notes.append(f"{LOGS_ARCHIVE_NAME} not written: {exc}")
        members = []
    runner_log = work / RUNNER_LOG_NAME
    runner_error = first_error(runner_log.read_text(errors="replace")) if runner_log.is_file() else None
    text = gpu_record.brief(doc, STAGES, runner_rc=runner_rc, record=record, runner_error=runner_error)
    text += f"returned: {', '.join(p.name for p in written + [out / SUMMARY_NAME])}\n"
    text += f"{LOGS_ARCHIVE_NAME}: {', '.join(members) or 'nothing'}\n"
    text += "".join(f"note: {note}\n" for note in notes)
    summary = out / SUMMARY_NAME
    summary.write_text(text, encoding="utf-8")
    written.append(summary)
    assert len(written) <= MAX_OUT_FILES, written
    return written

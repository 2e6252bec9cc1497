"""Running a command in its own process group with a time limit, and stopping the whole group.

The one-shot GPU check (``benchmarks.gpu_check``) runs each stage this way and the fuzzer (``dsa.fuzz``) each chunk of
examples: a stage or chunk that hangs (a deadlocked kernel, a compile that never ends) is stopped together with
everything it started, without touching the caller's own process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Finished", "run_with_deadline", "stop_group"]

STOP_GRACE_S = 10.0
"""How long a group asked to stop (SIGTERM) may take before it is killed (SIGKILL)."""


@dataclass
class Finished:
    """How a command ended: its exit code (``None`` when it was stopped at the deadline) and how long it ran."""

    rc: int | None
    timed_out: bool
    seconds: float


def stop_group(proc: subprocess.Popen, *, grace_s: float = STOP_GRACE_S) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``) and everything in its process group: SIGTERM, then
    SIGKILL when the group leader has not exited after ``grace_s`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_with_deadline(
    cmd: Sequence[str],
    *,
    timeout_s: float,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: IO[str] | int | None = None,
) -> Finished:
    """Run ``cmd`` in a new process group (stderr joins ``stdout``) and stop the group after ``timeout_s`` seconds.

    Returns:
        :class:`Finished` with the exit code, or ``rc=None, timed_out=True`` when the deadline stopped it.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return Finished(None, True, time.perf_counter() - start)
    return Finished(proc.returncode, False, time.perf_counter() - start)

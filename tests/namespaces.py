"""Run a command in PID, network and mount namespaces of its own (``unshare``).

For tests that start a Ray head the way a user does (``ray start --head`` on the default ports,
``ray stop`` at the end, the address in /tmp/ray/ray_current_cluster): inside the namespaces
``ray stop`` sees only their processes, the ports are their own loopback's, and /tmp/ray is a
private folder bind-mounted over the machine's, so nothing reaches the test session's Ray and no
address file is left for a later ``ray.init()`` to join.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# --kill-child: when unshare dies (a timeout kills it), the namespace's first process and with it
# every process inside (a Ray head) is killed too, rather than left running.
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net"]
PRELUDE = 'ip link set lo up && mkdir -p /tmp/ray && mount --bind "$0" /tmp/ray && exec "$@"'


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can); fails under CI, which must run
    these checks."""
    private = tempfile.mkdtemp(prefix="ray-ns-")
    try:  # the whole prelude, so a missing `ip` or a refused bind mount shows here, by name
        probe = subprocess.run([*UNSHARE, "bash", "-c", PRELUDE, private, "true"], capture_output=True, text=True,
                               timeout=60)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if probe.returncode == 0:
        return None
    reason = f"no private PID / network / mount namespace here ({probe.stderr.strip()[:300]!r})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run this check")
    return reason


def require_namespaces() -> None:
    """Skip (fail under CI) where namespaces cannot be made."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def run_isolated(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``command`` in its own namespaces, stdout and stderr together in ``.stdout`` (call
    ``require_namespaces`` or ``unavailable`` first)."""
    private = tempfile.mkdtemp(prefix="ray-ns-")
    try:
        return subprocess.run([*UNSHARE, "bash", "-c", PRELUDE, private, *command], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    finally:
        shutil.rmtree(private, ignore_errors=True)

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

UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--net"]
PRELUDE = 'ip link set lo up && mkdir -p /tmp/ray && mount --bind "$0" /tmp/ray && exec "$@"'


def require_namespaces() -> None:
    """Skip (fail under CI, which must run these checks) where namespaces cannot be made."""
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    if probe.returncode != 0 or shutil.which("ip") is None:
        reason = f"no private PID / network namespace here (unshare: {probe.stderr.strip()[:200]!r})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run this check")
        pytest.skip(reason)


def run_isolated(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``command`` in its own namespaces, stdout and stderr together in ``.stdout``."""
    require_namespaces()
    private = tempfile.mkdtemp(prefix="ray-ns-")
    try:
        return subprocess.run([*UNSHARE, "bash", "-c", PRELUDE, private, *command], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    finally:
        shutil.rmtree(private, ignore_errors=True)

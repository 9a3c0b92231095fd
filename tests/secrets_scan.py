"""Look for the test credentials in everything a run left behind: every object under a results
root, every file of a log directory, captured output. Shared by the tests that assert a run
stores and logs no credential (tests/stages/test_extract.py, tests/stages/test_train_sae.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from scope_ray.storage import ResultsRoot
from tests.conftest import TEST_AWS_SECRET


def credentials() -> dict[str, bytes]:
    """The fake AWS credentials every test process (Ray workers included) has in its environment
    (tests/conftest.py sets both when it is imported, which the import above guarantees)."""
    return {"AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET.encode(),
            "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"].encode()}


def find_credentials(blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """``"<where>: <credential name>"`` for each credential found in each ``(where, bytes)``."""
    found = []
    for where, data in blobs:
        found += [f"{where}: {name}" for name, value in credentials().items() if value in data]
    return found


def root_objects(root: ResultsRoot) -> list[str]:
    return root.fs.find(root.path)


def scan_root(root: ResultsRoot) -> list[str]:
    """Every object under the root, read whole."""
    return find_credentials((obj, root.fs.cat_file(obj)) for obj in root_objects(root))


def dir_files(path: str | Path) -> list[Path]:
    return [p for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink()]


def scan_dir(path: str | Path) -> list[str]:
    """Every regular file below ``path``, read whole (logs are a few MB in a test session)."""
    return find_credentials((str(p), p.read_bytes()) for p in dir_files(path))


def ray_logs_dir(ray) -> Path:
    """The log directory of the Ray session this process is connected to, through Ray's API
    (other Ray instances run on the same machine, so /tmp/ray/session_latest may be another's)."""
    ctx = ray.get_runtime_context()
    logs = Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs"
    if not logs.is_dir():
        raise FileNotFoundError(f"no Ray log directory at {logs}")
    return logs


def plant(data: bytes) -> bytes:
    """``data`` with both credentials inside it: what a leak would look like, for proving a scan fails."""
    half = len(data) // 2
    return data[:half] + b"".join(credentials().values()) + data[half:]

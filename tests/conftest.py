"""Shared fixtures: one local Ray instance for the whole session, and a real S3-protocol server.

Ray start-up dominates small tests (≈5 s), so every test that needs Ray shares one instance.
S3 tests talk HTTP to moto's server on loopback through the same s3fs/pyarrow code users run.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Fake credentials for the loopback S3 server. Set before Ray starts so its workers inherit them;
# the real AWS chain is never consulted in tests.
TEST_AWS_SECRET = "testing-secret-do-not-log-0c7f"
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_DEDUP_LOGS": "0",
    }
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)


# CI draws the same examples on every run (a failure there reproduces), and no example is failed
# for being slow: a busy 2-core machine is not a bug.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test in the session (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    # Left running on purpose: other session fixtures may still use it; Ray stops at interpreter exit.


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (a real HTTP S3 protocol peer)."""
    from moto.server import ThreadedMotoServer

    # Port 0: the OS picks a free port as the server binds it (no probe-then-bind race with
    # another process taking the port in between).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback server; yields ``(s3://bucket, endpoint_url)``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}", s3_server

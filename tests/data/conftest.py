"""Fixtures for the data tests, named apart from tests/conftest.py's (``ray_local``, ``s3_server``).

Both are session-scoped: Ray start-up and a moto server cost seconds, and the data tests only
read. Ray is reused if another fixture started it first, and never shut down here.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Fake credentials for the loopback S3 server, set at import (before any ray.init) so Ray's
# workers inherit them; setdefault keeps whatever the top-level conftest already chose.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def _ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def _moto():
    """``(s3://bucket, endpoint_url)`` on a moto server bound to 127.0.0.1 at a free port."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"data-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}", endpoint
    server.stop()

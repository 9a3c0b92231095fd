"""Data-test fixtures on top of tests/conftest.py's shared Ray instance and S3 server."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def _moto(s3_server):
    """``(s3://bucket, endpoint_url)``: one bucket for the whole data-test session (they only read)."""
    import boto3

    bucket = f"data-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}", s3_server

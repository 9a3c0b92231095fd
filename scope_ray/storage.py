"""The results root and every dataset URI: one code path for local paths and ``s3://``.

Layout (docs/storage.md is the reference): ``ROOT/<model>/<stage>/`` holds a stage's tables as
Parquet part files and, written last, ``manifest.json``. A stage is complete exactly when its
manifest exists and names the config hash the caller expects; readers only read the part files
a manifest lists, so a half-written stage is never visible.

Credentials come from the standard AWS chain (environment, profile, instance role) and are never
logged or written; only the endpoint URL may come from the job config (for S3-compatible stores).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` with scheme ``file`` or ``s3``; a bare path is ``file``."""
    if uri.startswith("s3://"):
        return "s3", uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    return "file", str(Path(uri).expanduser().absolute())


def fsspec_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for ``uri``."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        import s3fs

        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # skip_instance_cache: tests start and stop S3 servers; a cached client would point at a dead one.
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True,
                               config_kwargs={"retries": {"max_attempts": 5, "mode": "standard"}})
        return fs, path
    return fsspec.filesystem("file"), path


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (what Ray Data and pyarrow.parquet take) and the path inside it."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    fs, path = fsspec_filesystem(uri, endpoint_url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join_uri(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)

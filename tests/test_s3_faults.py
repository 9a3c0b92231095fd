"""S3 failing part-way: the real s3fs/botocore client, over HTTP on loopback, through a proxy that
cuts, refuses and drops exactly the requests a test names (tests/s3_fault_proxy.py says why a
proxy rather than stopping moto). Properties: a transient cut is retried and the result is whole;
a lasting one fails with an error naming the root and leaves nothing visible (no part, no
manifest); a re-run after recovery gives exact rows; a stage is never complete without its whole
manifest, and a committed table is never read half-written."""

from __future__ import annotations

import uuid

import boto3
import pyarrow as pa
import pytest

from scope_ray.storage import ResultsRoot, StageIncomplete, StorageUnreachable
from tests.s3_fault_proxy import FaultProxy

MODEL, STAGE = "demo-vit-tiny", "extract"


@pytest.fixture
def store(s3_server):
    """``(proxy, bucket)``: a fresh bucket on moto, reached through a fault proxy."""
    bucket = f"fault-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    proxy = FaultProxy(int(s3_server.rsplit(":", 1)[1]))
    yield proxy, bucket
    proxy.close()


def _root(store) -> ResultsRoot:
    proxy, bucket = store
    return ResultsRoot(f"s3://{bucket}/results", endpoint_url=proxy.endpoint)


@pytest.fixture
def few_attempts(monkeypatch):
    """A lasting fault is reported after 2 attempts instead of 5 (each costs a jittered backoff
    of up to seconds); the code path is the same, through the standard AWS variable."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


SCHEMA = pa.schema([("row", pa.int64()), ("payload", pa.string())])


def _part(lo: int, hi: int) -> pa.Table:
    # Big enough (≈30 kB of Parquet) that a cut after 1 kB of body really is part-way.
    return pa.table({"row": range(lo, hi), "payload": [f"value-{i:06d}" * 4 for i in range(lo, hi)]}, schema=SCHEMA)


def _put(bucket: str, key: str) -> bytes:
    """The request line of the PUT that writes ``key`` (path-style, as s3fs sends to an endpoint;
    the key percent-encoded as botocore does: "model=" goes as "model%3D")."""
    from urllib.parse import quote

    return f"PUT /{bucket}/results/{quote(key, safe='/~')} HTTP/1.1".encode()


def _rows(stage, table="tokens") -> list[int]:
    return sorted(stage.read_table(table).column("row").to_pylist())


def test_part_write_cut_part_way_is_retried_and_whole(store):
    proxy, bucket = store
    stage = _root(store).stage(MODEL, STAGE)
    rule = proxy.cut(_put(bucket, f"tables/tokens/model={MODEL}/stage={STAGE}/p0.parquet"), after_body_bytes=1024, times=2)
    stage.write_part("tokens", "p0", _part(0, 1000))
    assert rule.hits == 2  # two uploads were cut after 1 kB; the third went through
    stage.write_part("tokens", "p1", _part(1000, 1500))
    stage.commit("h", {}, {"tokens": 1500})
    assert _rows(stage) == list(range(1500))


def test_part_write_lasting_failure_is_clear_leaves_no_part_and_a_rerun_is_exact(store, few_attempts):
    proxy, bucket = store
    root = _root(store)
    stage = root.stage(MODEL, STAGE)
    stage.write_part("tokens", "p0", _part(0, 1000))
    # Every upload of p1 is cut part-way: the write fails, naming the root and the part.
    rule = proxy.cut(_put(bucket, f"tables/tokens/model={MODEL}/stage={STAGE}/p1.parquet"), after_body_bytes=1024, times=10**6)
    with pytest.raises(StorageUnreachable, match=rf"results root {root.uri}: writing .*tokens/p1\.parquet failed"):
        stage.write_part("tokens", "p1", _part(1000, 2000))
    assert rule.hits >= 2  # retried before giving up
    proxy.clear()
    assert not root.fs.exists(f"{stage.table_path('tokens')}/p1.parquet")  # no truncated object
    assert stage.written_table("tokens", SCHEMA).num_rows == 1000
    assert not stage.is_complete()
    # The endpoint going away altogether (server stopped): refused, same clear error.
    proxy.down()
    with pytest.raises(StorageUnreachable, match=f"results root {root.uri}"):
        stage.write_part("tokens", "p1", _part(1000, 2000))
    proxy.up()  # back on the same port: the re-run of the part and the commit are exact
    stage.write_part("tokens", "p1", _part(1000, 2000))
    stage.commit("h", {}, {"tokens": 2000})
    assert _rows(stage) == list(range(2000))


def test_commit_cut_part_way_or_answer_lost_is_retried_and_the_manifest_whole(store):
    proxy, bucket = store
    stage = _root(store).stage(MODEL, STAGE)
    stage.write_part("tokens", "p0", _part(0, 100))
    manifest_put = _put(bucket, f"{MODEL}/{STAGE}/manifest.json")
    cut = proxy.cut(manifest_put, after_body_bytes=40, times=1)
    # Then the PUT that does reach the server loses its answer: the client cannot know it
    # landed, retries, and the second identical PUT is harmless.
    lost = proxy.cut(manifest_put, after_body_bytes=None, times=1)
    written = stage.commit("h", {"source": "here"}, {"tokens": 100})
    assert (cut.hits, lost.hits) == (1, 1)
    assert stage.manifest() == written and stage.is_complete("h")
    assert _rows(stage) == list(range(100))


def test_commit_lasting_failure_leaves_the_stage_incomplete_until_a_rerun(store, few_attempts):
    proxy, bucket = store
    root = _root(store)
    stage = root.stage(MODEL, STAGE)
    stage.write_part("tokens", "p0", _part(0, 100))
    rule = proxy.cut(_put(bucket, f"{MODEL}/{STAGE}/manifest.json"), after_body_bytes=40, times=10**6)
    with pytest.raises(StorageUnreachable, match=rf"results root {root.uri}: committing {MODEL}/{STAGE} failed"):
        stage.commit("h", {}, {"tokens": 100})
    assert rule.hits >= 2
    proxy.clear()
    # The server got only truncated manifests and kept none of them.
    assert stage.manifest() is None and not stage.is_complete()
    with pytest.raises(StageIncomplete):
        stage.read_table("tokens")
    stage.commit("h", {}, {"tokens": 100})
    assert stage.is_complete("h") and _rows(stage) == list(range(100))


def test_an_unreachable_store_never_reads_as_complete_or_incomplete(store, few_attempts):
    """A failed manifest read must raise: "incomplete" would make the next run delete and redo a
    complete stage, "complete" would trust what was never checked."""
    proxy, bucket = store
    root = _root(store)
    stage = root.stage(MODEL, STAGE)
    stage.write_part("tokens", "p0", _part(0, 100))
    stage.commit("h", {}, {"tokens": 100})
    # One lost answer to the manifest read is retried.
    rule = proxy.cut(f"GET /{bucket}/results/{MODEL}/{STAGE}/manifest.json".encode(), after_body_bytes=None)
    assert stage.is_complete("h") and rule.hits == 1
    proxy.down()
    with pytest.raises(StorageUnreachable, match=f"reading {MODEL}/{STAGE}/manifest.json"):
        stage.is_complete("h")
    proxy.up()
    assert stage.is_complete("h")


def test_a_committed_table_is_never_read_half_rewritten(store, few_attempts):
    """A late writer (a zombie task) overwriting a committed part and cut part-way leaves the
    committed object as it was: readers see the old whole file, not a truncated new one."""
    proxy, bucket = store
    root = _root(store)
    stage = root.stage(MODEL, STAGE)
    stage.write_part("tokens", "p0", _part(0, 1000))
    stage.commit("h", {}, {"tokens": 1000})
    proxy.cut(_put(bucket, f"tables/tokens/model={MODEL}/stage={STAGE}/p0.parquet"), after_body_bytes=2048, times=10**6)
    with pytest.raises(StorageUnreachable):
        stage.write_part("tokens", "p0", _part(5000, 7000))
    proxy.clear()
    assert _rows(stage) == list(range(1000))

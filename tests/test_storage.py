"""Results root: one code path for local and s3:// (a real S3 server on loopback)."""

import pyarrow as pa
import pytest

from scope_ray.storage import ResultsRoot, StageIncomplete, split_uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return ResultsRoot(str(tmp_path / "results"))
    bucket, endpoint = request.getfixturevalue("s3_bucket")
    return ResultsRoot(f"{bucket}/runs/one", endpoint_url=endpoint)


def test_split_uri():
    assert split_uri("s3://b/p/") == ("s3", "b/p")
    assert split_uri("file:///tmp/x")[1] == "/tmp/x"
    with pytest.raises(ValueError, match="unsupported"):
        split_uri("gs://bucket")


def test_uncommitted_stage_is_invisible(root):
    stage = root.stage("demo-vit-tiny", "extract")
    stage.write_part("tokens", "p0", pa.table({"x": [1, 2, 3]}))
    assert not stage.is_complete()
    with pytest.raises(StageIncomplete):
        stage.read_table("tokens")


def test_commit_then_read_lists_only_manifest_files(root):
    stage = root.stage("m", "extract")
    stage.write_part("tokens", "p0", pa.table({"x": [1, 2]}))
    stage.write_part("tokens", "p1", pa.table({"x": [3]}))
    manifest = stage.commit("abc", {"source": "here"}, {"tokens": 3})
    assert manifest["tables"]["tokens"] == ["p0.parquet", "p1.parquet"]
    # A stray file written after the commit (e.g. by a zombie task) is not read.
    stage.write_part("tokens", "p2", pa.table({"x": [99]}))
    assert sorted(stage.read_table("tokens").column("x").to_pylist()) == [1, 2, 3]
    assert stage.is_complete("abc") and not stage.is_complete("other")
    assert ResultsRoot(root.uri, root.endpoint_url).stage("m", "extract").manifest()["rows"] == {"tokens": 3}


def test_rewriting_a_part_overwrites(root):
    stage = root.stage("m", "s")
    stage.write_part("t", "same", pa.table({"x": [1]}))
    stage.write_part("t", "same", pa.table({"x": [1]}))
    stage.commit("h", {}, {"t": 1})
    assert stage.read_table("t").num_rows == 1


def test_a_part_cut_off_mid_write_is_never_listed(tmp_path):
    """Locally a part is written as ``<name>.parquet.tmp`` then renamed: a crash mid-write leaves at
    most a half ``.tmp`` file, which neither the commit nor the stage's own verification reads."""
    root = ResultsRoot(str(tmp_path))
    stage = root.stage("m", "s")
    whole = stage.write_part("t", "a", pa.table({"x": [1, 2]}))
    with open(whole, "rb") as f:
        half = f.read()[:40]
    (tmp_path / "m" / "s" / "t" / "b.parquet.tmp").write_bytes(half)  # what a killed writer leaves
    assert stage.written_table("t", pa.schema([("x", pa.int64())])).column("x").to_pylist() == [1, 2]
    assert stage.commit("h", {}, {"t": 2})["tables"]["t"] == ["a.parquet"]
    assert stage.read_table("t").num_rows == 2


def test_reset_removes_everything(root):
    stage = root.stage("m", "s")
    stage.write_part("t", "a", pa.table({"x": [1]}))
    stage.commit("h", {}, {"t": 1})
    stage.reset()
    assert stage.manifest() is None and not root.fs.exists(stage.path)


def test_check_writable(root, tmp_path):
    root.check_writable()
    # A root below a regular file cannot be created, even by root (CI runs as root).
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        ResultsRoot(str(blocker / "results")).check_writable()


def test_damaged_manifest_means_incomplete(tmp_path):
    root = ResultsRoot(str(tmp_path))
    stage = root.stage("m", "s")
    stage.write_part("t", "a", pa.table({"x": [1]}))
    stage.commit("h", {}, {"t": 1})
    (tmp_path / "m" / "s" / "manifest.json").write_bytes(b"{not json")
    assert not stage.is_complete()


def test_local_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ResultsRoot("results").uri == str(tmp_path / "results")


def test_unwritable_s3_bucket_fails_early(s3_server):
    with pytest.raises(PermissionError, match="not writable"):
        ResultsRoot("s3://no-such-bucket-here/x", endpoint_url=s3_server).check_writable()



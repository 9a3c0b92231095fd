"""Results root: one code path for local and s3:// (a real S3 server on loopback)."""

import pyarrow as pa
import pytest

from scope_ray.storage import ResultsRoot, StageIncomplete, file_tag, split_uri


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


def test_a_table_with_no_rows_is_stored_with_its_columns(root):
    # A clean run rejects nothing: readers (the report, pandas) still find the table's columns.
    import pyarrow.dataset as pads

    from scope_ray.tokens import REJECTS_SCHEMA

    stage = root.stage("m", "extract")
    stage.write_part("tokens", "p0", pa.table({"x": [1]}))
    other = pa.schema([pa.field("task", pa.string())])
    manifest = stage.commit("abc", {}, {"tokens": 1, "rejects": 0, "notes": 0, "untyped": 0},
                            empty_schemas={"notes": other})
    assert manifest["tables"]["rejects"] == ["empty.parquet"] and manifest["tables"]["untyped"] == []
    rejects = stage.read_table("rejects")
    assert rejects.num_rows == 0 and rejects.schema == REJECTS_SCHEMA
    assert stage.read_table("notes").schema == other
    files = [root.path + "/tables/rejects/model=m/stage=extract/empty.parquet"]
    frame = pads.dataset(files, filesystem=root.arrow_fs, format="parquet").to_table().to_pandas()
    assert list(frame.columns) == REJECTS_SCHEMA.names and frame.empty


def test_rewriting_a_part_overwrites(root):
    stage = root.stage("m", "s")
    stage.write_part("t", "same", pa.table({"x": [1]}))
    stage.write_part("t", "same", pa.table({"x": [1]}))
    stage.commit("h", {}, {"t": 1})
    assert stage.read_table("t").num_rows == 1


def test_a_part_cut_off_mid_write_is_never_listed(tmp_path, monkeypatch):
    """A local write that fails part-way (the writer dies after some bytes) leaves no file under
    the part's name, and nothing a stage's verification or commit would read."""
    import scope_ray.storage as storage

    root = ResultsRoot(str(tmp_path))
    stage = root.stage("m", "s")
    stage.write_part("t", "a", pa.table({"x": [1, 2]}))
    real_write = storage.pq.write_table

    def dies_part_way(table, where, filesystem=None):
        real_write(table, where, filesystem=filesystem)
        with open(where, "r+b") as f:
            f.truncate(40)  # what is on disk when a writer stops 40 bytes in
        raise OSError("writer killed part-way")

    monkeypatch.setattr(storage.pq, "write_table", dies_part_way)
    with pytest.raises(OSError, match="killed part-way"):
        stage.write_part("t", "b", pa.table({"x": [3]}))
    monkeypatch.undo()
    table_dir = tmp_path / "tables" / "t" / "model=m" / "stage=s"
    assert sorted(p.name for p in table_dir.iterdir()) == ["a.parquet"]  # no b.parquet, no temp file left
    assert stage.written_table("t", pa.schema([("x", pa.int64())])).column("x").to_pylist() == [1, 2]
    assert stage.commit("h", {}, {"t": 2})["tables"]["t"] == ["a.parquet"]


def test_two_writers_of_one_part_never_share_a_temporary_file(tmp_path):
    """A zombie task and its retry writing the same part at once: each writes its own temporary
    file, so whichever rename lands last publishes a whole file."""
    from scope_ray.storage import temp_name

    path = str(tmp_path / "t" / "p.parquet")
    names = {temp_name(path) for _ in range(100)}
    assert len(names) == 100 and all(n.endswith(".tmp") and not n.endswith(".parquet") for n in names)


def test_reset_removes_everything(root):
    stage = root.stage("m", "s")
    stage.write_part("t", "a", pa.table({"x": [1]}))
    stage.commit("h", {}, {"t": 1})
    stage.reset()
    assert stage.manifest() is None and not root.fs.exists(stage.path) and _snapshot(root, stage) == {}
    assert not root.fs.exists(stage.table_path("t"))


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




# --- replacing a committed stage (StageDir.writing) -------------------------------------------
def _snapshot(root, stage) -> dict[str, bytes]:
    """Every file of the stage, by its path under the root: its folder and its tables' partitions."""
    base = root.path.rstrip("/") + "/"
    root.fs.invalidate_cache()
    files = [p for p in root.fs.find(root.path) if p.startswith(stage.path.rstrip("/") + "/")
             or f"/model={stage.model}/stage={stage.stage}/" in p]
    return {p[len(base):]: root.fs.cat_file(p) for p in files}


def _commit_run(stage, chash: str, values: list[int]) -> None:
    with stage.writing(chash):
        stage.write_part("t", "a", pa.table({"x": values}))
        stage.commit(chash, {}, {"t": len(values)})


def test_a_run_that_fails_leaves_the_committed_stage_byte_identical(root, tmp_path):
    stage = root.stage("m", "s")
    _commit_run(stage, "a" * 16, [1, 2])
    fig = tmp_path / "fig.png"
    fig.write_bytes(b"png-a")
    before = _snapshot(root, stage)
    with pytest.raises(RuntimeError, match="typo"):
        with stage.writing("b" * 16):
            stage.write_part("t", "a", pa.table({"x": [9]}))
            stage.write_figure(fig)
            raise RuntimeError("a typo in a data path")
    after = _snapshot(root, stage)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing committed changed
    assert stage.is_complete("a" * 16) and stage.read_table("t").column("x").to_pylist() == [1, 2]
    # The next run clears the failed attempt's files and, once its manifest lands, the old run's.
    _commit_run(stage, "c" * 16, [3])
    assert stage.read_table("t").column("x").to_pylist() == [3]
    assert sorted(_snapshot(root, stage)) == ["m/s/manifest.json", f"tables/t/model=m/stage=s/{file_tag('c' * 16)}-a.parquet"]
    assert root.fs.exists(stage.path) and not root.fs.exists(lease_file(root))


def lease_file(root):
    from scope_ray.lease import lease_path

    return lease_path(root, "m", "s")


def test_a_run_only_commits_its_own_parts_and_resume_keeps_them(root):
    stage = root.stage("m", "s")
    with pytest.raises(KeyboardInterrupt):
        with stage.writing("a" * 16):
            stage.write_part("t", "p0", pa.table({"x": [1]}))
            raise KeyboardInterrupt  # interrupted
    with stage.writing("a" * 16, resume=True):
        tag = file_tag("a" * 16)
        assert [p.rsplit("/", 1)[1] for p in stage.run_files("t")] == [f"{tag}-p0.parquet"]
        stage.write_part("t", "p1", pa.table({"x": [2]}))
        assert stage.commit("a" * 16, {}, {"t": 2})["tables"]["t"] == [f"{tag}-p0.parquet", f"{tag}-p1.parquet"]
    with stage.writing("b" * 16):  # another config: nothing of run a is resumed
        assert stage.run_files("t") == []
        assert stage.read_table("t").num_rows == 2  # the committed stage still reads


def test_a_stage_committed_before_runs_named_their_files_is_kept_until_replaced(root):
    stage = root.stage("m", "s")
    stage.write_part("t", "old", pa.table({"x": [7]}))
    stage.commit("o" * 16, {}, {"t": 1})  # no run: plain names, no file_tag
    with pytest.raises(RuntimeError):
        with stage.writing("b" * 16):
            raise RuntimeError("failed")
    assert stage.read_table("t").column("x").to_pylist() == [7]
    _commit_run(stage, "b" * 16, [8])
    assert sorted(_snapshot(root, stage)) == ["m/s/manifest.json", f"tables/t/model=m/stage=s/{file_tag('b' * 16)}-a.parquet"]


def test_a_second_run_on_the_same_stage_is_refused_and_deletes_nothing(root):
    from scope_ray.lease import StageBusy

    stage = root.stage("m", "s")
    _commit_run(stage, "a" * 16, [1])
    with stage.writing("b" * 16):
        stage.write_part("t", "a", pa.table({"x": [2]}))
        before = _snapshot(root, stage)
        other = root.stage("m", "s")
        with pytest.raises(StageBusy, match="being written by another run"):
            with other.writing("c" * 16):
                pass
        assert _snapshot(root, stage) == before
        stage.commit("b" * 16, {}, {"t": 1})
    assert stage.read_table("t").column("x").to_pylist() == [2]


def test_a_full_disk_at_commit_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import os

    import scope_ray.storage as storage

    root = ResultsRoot(str(tmp_path / "r"))
    stage = root.stage("m", "s")
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        _commit_run(stage, "a" * 16, [1])
    assert not [p for p in root.fs.find(str(tmp_path)) if p.endswith(".tmp")]
    assert not stage.is_complete()

    def no_space(path, data, **k):
        open(path, "wb").close()  # the file is created, its data does not fit
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(root.fs, "pipe_file", no_space)
    with pytest.raises(PermissionError, match="not writable"):
        root.check_writable()
    assert not [p for p in os.listdir(tmp_path / "r") if p.startswith(".write-probe")]


def test_code_version_names_the_commit_with_or_without_a_checkout(tmp_path, monkeypatch):
    """A Ray job's uploaded working dir has no .git: the commit then comes from SCOPE_RAY_COMMIT,
    which the sweep sets from the submitting checkout."""
    import subprocess

    import scope_ray.storage as storage
    from scope_ray import __version__

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=30)
    (repo / "f").write_text("1")
    subprocess.run(git + ["add", "f"], check=True, timeout=30)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True, timeout=30)
    sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    assert storage.git_commit(repo) == sha
    (repo / "f").write_text("2")
    assert storage.git_commit(repo) == f"{sha}-dirty"
    assert storage.git_commit(tmp_path) == ""  # no checkout
    monkeypatch.setattr(storage, "git_commit", lambda cwd=None: "")  # as in an uploaded working dir
    monkeypatch.setenv("SCOPE_RAY_COMMIT", "abc1234")
    assert storage.code_version() == f"{__version__}+abc1234"
    monkeypatch.delenv("SCOPE_RAY_COMMIT")
    assert storage.code_version() == __version__


def test_the_sweep_ships_the_submitting_checkouts_commit(monkeypatch):
    import scope_ray.sweep.runner as runner

    monkeypatch.setattr(runner, "git_commit", lambda cwd=None: "abc1234")
    sweep = type("S", (), {"runtime_env": {"working_dir": "."}})()
    assert runner.shipped_runtime_env(sweep)["env_vars"] == {"SCOPE_RAY_COMMIT": "abc1234"}
    sweep.runtime_env = {"working_dir": ".", "env_vars": {"SCOPE_RAY_COMMIT": "given"}}
    assert runner.shipped_runtime_env(sweep)["env_vars"] == {"SCOPE_RAY_COMMIT": "given"}


def test_parts_written_by_a_workers_own_client_are_committed_and_nothing_old_is_lost(root):
    """A worker writes through its own client; the driver's listing cache (s3fs keeps one per
    folder) must not hide those parts at commit, or the stage would commit an empty table and then
    delete the committed one's files."""
    stage = root.stage("m", "s")
    _commit_run(stage, "a" * 16, [1, 2])
    with stage.writing("b" * 16):
        ResultsRoot(root.uri, root.endpoint_url).stage("m", "s", run="b" * 16).write_part(
            "t", "w0", pa.table({"x": [5, 6, 7]}))
        assert len(stage.run_files("t")) == 1
        stage.commit("b" * 16, {}, {"t": 3})
    assert stage.read_table("t").column("x").to_pylist() == [5, 6, 7]


def test_a_run_of_a_config_committed_meanwhile_stops_and_overwrites_nothing(root):
    from scope_ray.storage import StageCompletedMeanwhile

    stage = root.stage("m", "s")
    _commit_run(stage, "a" * 16, [1, 2])
    before = _snapshot(root, stage)
    with pytest.raises(StageCompletedMeanwhile, match="run the same command again"):
        with stage.writing("a" * 16):
            stage.write_part("t", "a", pa.table({"x": [9]}))
    assert _snapshot(root, stage) == before


def _old_layout_stage(root, model: str, stage: str, tables: dict[str, list[int]], tag: str | None = "0123456789ab"):
    """A stage committed before the hive layout, as that code wrote it: part files in
    ROOT/<model>/<stage>/<table>/ and a manifest without "table_layout"."""
    import json
    import posixpath

    from scope_ray.storage import write_parquet

    d = root.stage(model, stage)
    listed = {}
    for table, values in tables.items():
        name = f"{tag}-part-0.parquet" if tag else "part-0.parquet"
        folder = posixpath.join(d.path, table)
        root.ensure_dir(folder)
        write_parquet(pa.table({"x": values}), posixpath.join(folder, name), root)
        listed[table] = [name]
    manifest = {"manifest_version": 1, "model": model, "stage": stage, "config_hash": "old" * 4,
                **({"file_tag": tag} if tag else {}), "inputs": {}, "rows": {t: len(v) for t, v in tables.items()},
                "tables": listed}
    root.ensure_dir(d.path)
    root.fs.pipe_file(posixpath.join(d.path, "manifest.json"), json.dumps(manifest).encode())
    return d


def test_a_stage_in_the_old_layout_reads_migrates_and_is_replaced(root):
    from scope_ray.results import stages_in_old_layout, uncommitted_files
    from scope_ray.storage import migrate_root

    old = _old_layout_stage(root, "m", "s", {"t": [1, 2], "u": [3]})
    plain = _old_layout_stage(root, "m", "q", {"t": [4]}, tag=None)
    assert old.read_table("t").column("x").to_pylist() == [1, 2]  # read where it was written
    assert old.part_files("t")[0].startswith(old.path + "/t/")
    before = old.manifest()
    assert stages_in_old_layout(root) == ["m/q", "m/s"]
    assert migrate_root(root).moved == {"m/q": 1, "m/s": 2}
    assert stages_in_old_layout(root) == []
    assert old.read_table("t").column("x").to_pylist() == [1, 2] and old.read_table("u").num_rows == 1
    assert plain.read_table("t").column("x").to_pylist() == [4]
    after = old.manifest()
    assert after == {**before, "table_layout": "hive"}  # the same manifest, switched
    assert old.part_files("t") == [old.table_path("t") + "/0123456789ab-part-0.parquet"]
    root.fs.invalidate_cache()
    assert not root.fs.exists(old.path + "/t") and not root.fs.exists(old.path + "/u")
    assert uncommitted_files(root) == [] and migrate_root(root).moved == {}  # done, and idempotent
    # A new run of the stage replaces it as any committed stage: the migrated files go after its commit.
    _commit_run(old, "c" * 16, [5])
    assert sorted(_snapshot(root, old)) == ["m/s/manifest.json", f"tables/t/model=m/stage=s/{file_tag('c' * 16)}-a.parquet"]


def test_a_migration_cut_off_before_its_switch_leaves_the_stage_complete_and_finishes_on_rerun(root, monkeypatch):
    from scope_ray.storage import StageDir, migrate_root

    old = _old_layout_stage(root, "m", "s", {"t": [1, 2]})
    before = old.manifest()

    def cut(self, manifest):
        raise ConnectionError("the store went away")

    with monkeypatch.context() as m:
        m.setattr(StageDir, "_write_manifest", cut)
        with pytest.raises(ConnectionError):
            migrate_root(root)
    # Copied but not switched: the old manifest, its files, the stage complete; no lease left.
    assert old.manifest() == before and old.read_table("t").column("x").to_pylist() == [1, 2]
    assert not root.fs.exists(lease_file(root))
    # A run of the old config that failed meanwhile clears nothing the migration needs.
    assert migrate_root(root).moved == {"m/s": 1}
    assert old.manifest()["table_layout"] == "hive" and old.read_table("t").column("x").to_pylist() == [1, 2]


def test_a_migration_cut_off_after_its_switch_finishes_on_rerun(root, monkeypatch):
    from scope_ray.storage import migrate_root

    old = _old_layout_stage(root, "m", "s", {"t": [1, 2]})
    real_rm = root.fs.rm

    def cut(path, *args, **kwargs):
        if path.endswith("/m/s/t"):
            raise ConnectionError("the store went away")
        return real_rm(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(root.fs, "rm", cut)  # the instance's: s3fs's sync methods are set per instance
        with pytest.raises(ConnectionError):
            migrate_root(root)
    assert old.manifest()["table_layout"] == "hive" and old.read_table("t").column("x").to_pylist() == [1, 2]
    root.fs.invalidate_cache()
    assert root.fs.exists(old.path + "/t")  # switched, old folder still there
    assert migrate_root(root).moved == {}  # nothing left to copy ...
    root.fs.invalidate_cache()
    assert not root.fs.exists(old.path + "/t")  # ... but the old folder is gone
    assert old.read_table("t").column("x").to_pylist() == [1, 2]


def test_migrated_parts_get_the_columns_new_parts_have(tmp_path):
    """An old sae_eval part with a model column (the folders are that column now) and an old rejects
    part without task are rewritten; the tables then read as one dataset each."""
    import json

    import pandas as pd

    from scope_ray.storage import migrate_root, write_parquet

    root = ResultsRoot(str(tmp_path / "results"))
    for stage, table, data in (("eval-sae", "sae_eval", pa.table({"model": ["m"], "fvu_all": [0.25]})),
                               ("extract", "rejects", pa.table({"split": ["val"], "image_id": ["a"], "reason": ["x"]}))):
        d = root.stage("m", stage)
        (tmp_path / "results" / "m" / stage / table).mkdir(parents=True)
        write_parquet(data, f"{d.path}/{table}/part-0.parquet", root)
        (tmp_path / "results" / "m" / stage / "manifest.json").write_text(json.dumps(
            {"config_hash": "h", "tables": {table: ["part-0.parquet"]}, "rows": {table: 1}}))
    root.stage("m", "probe-features").commit("h", {}, {"rejects": 0})  # a new stage's (empty) rejects
    from scope_ray.results import read_results

    assert read_results(root, "eval-sae", "sae_eval").column_names == ["model", "fvu_all"]  # one model column
    assert sorted(migrate_root(root).moved) == ["m/eval-sae", "m/extract"]
    sae_eval = pd.read_parquet(tmp_path / "results" / "tables" / "sae_eval")
    assert sae_eval[["model", "fvu_all"]].values.tolist() == [["m", 0.25]]
    assert root.stage("m", "eval-sae").read_table("sae_eval").column_names == ["fvu_all"]
    rejects = pd.read_parquet(tmp_path / "results" / "tables" / "rejects")
    assert "task" in rejects.columns and rejects["image_id"].tolist() == ["a"]


def test_a_stored_table_cannot_have_a_partition_column(tmp_path):
    stage = ResultsRoot(str(tmp_path / "results")).stage("m", "s")
    with pytest.raises(ValueError, match=r"cannot have the column\(s\) \['model'\]"):
        stage.write_part("t", "p", pa.table({"model": ["m"], "x": [1]}))


def test_a_new_run_over_an_old_layout_stage_keeps_it_until_its_commit(root):
    old = _old_layout_stage(root, "m", "s", {"t": [1, 2]})
    with pytest.raises(RuntimeError):
        with old.writing("b" * 16):
            old.write_part("t", "a", pa.table({"x": [9]}))
            raise RuntimeError("a typo in a data path")
    assert old.read_table("t").column("x").to_pylist() == [1, 2]
    _commit_run(old, "c" * 16, [5])
    assert old.read_table("t").column("x").to_pylist() == [5]
    assert sorted(_snapshot(root, old)) == ["m/s/manifest.json", f"tables/t/model=m/stage=s/{file_tag('c' * 16)}-a.parquet"]


def test_the_migrate_command(tmp_path, capsys):
    from scope_ray.cli import main

    root = ResultsRoot(str(tmp_path / "results"))
    _old_layout_stage(root, "m", "s", {"t": [1]})
    assert main(["migrate", root.uri]) == 0
    assert "m/s: 1 part files moved" in capsys.readouterr().out
    assert main(["migrate", root.uri]) == 0
    assert "nothing moved" in capsys.readouterr().out
    assert root.models() == ["m"]  # the tables' tree is not a model


def test_migrate_skips_a_stage_a_run_is_writing_and_moves_it_later(tmp_path):
    from scope_ray.lease import acquire
    from scope_ray.storage import migrate_root

    root = ResultsRoot(str(tmp_path / "results"))
    old = _old_layout_stage(root, "m", "s", {"t": [1]})
    lines: list[str] = []
    lease = acquire(root, "m", "s", "x" * 16)  # a run of another config is writing the stage
    try:
        done = migrate_root(root, log=lines.append)
        assert done.moved == {} and list(done.busy) == ["m/s"]
        from scope_ray.cli import main

        assert main(["migrate", root.uri]) == 1  # the command says so, and fails
    finally:
        lease.release()
    assert "m/s: not moved, a run is writing it" in lines[0], lines
    assert "table_layout" not in old.manifest() and old.read_table("t").num_rows == 1
    assert migrate_root(root).moved == {"m/s": 1}

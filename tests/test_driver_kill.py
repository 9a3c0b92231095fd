"""The driver killed (SIGKILL) mid-stage, then the same command run again.

``scope-ray run JOB --stages extract,instability`` runs as a subprocess, the way a user runs it,
and joins the test session's shared Ray instance (``ray_local``) through RAY_ADDRESS, so no
second Ray start-up is paid. Once extraction has committed and the instability stage's EMD tasks
have put a ``tokens`` part file on storage, the driver gets SIGKILL: no handler, no ``finally``,
exactly what an OOM kill or a lost head-node process does. The tests then check what the commit
protocol (docs/storage.md) promises: the committed stage stays committed, no reader can see the
killed stage's partial output, and the same command run again skips the first stage untouched and
redoes the second from scratch, with exact row counts and every key once.

The three tests share one kill and one re-run (module fixtures) and run in file order: the
first looks at storage as the kill left it, the other two after the re-run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from scope_ray.config import load_config
from scope_ray.data.synthetic import write_synthetic
from scope_ray.report.content import INCOMPLETE, collect
from scope_ray.stages.extract import config_hash as extract_hash
from scope_ray.instability import tokens_per_image
from scope_ray.stages.instability import EMD_BATCH_TOKENS, TOKENS_SCHEMA
from scope_ray.storage import ResultsRoot, StageIncomplete

pytestmark = pytest.mark.slow

MODEL = "demo-vit-tiny"
STAGES = "extract,instability"
N_TRAIN, N_VAL, N_CLASSES = 8, 12, 6
# Instability images (one per class) x their overlap tokens at every shift the 7x7 grid allows
# must span several EMD tasks of 256 token rows, each writing one tokens part file: the kill lands
# after the first, with most of the stage still to do.
N_INSTABILITY = 6


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> dict:
    """A job spec on synthetic data with its results root in a temp dir; the images the
    instability stage must select (the first of each label in source order)."""
    work = tmp_path_factory.mktemp("driver-kill")
    src = write_synthetic(str(work / "data"), n_train=N_TRAIN, n_val=N_VAL, num_classes=N_CLASSES, seed=0,
                          formats=("parquet",))["imagenet"]["parquet"]
    # Extraction of the train split only, and tau given: one actor pool fewer than extracting the
    # val split too for tau 'auto' (a pool's start-up is most of a stage's time here).
    spec = {"name": "driver-kill", "model": {"name": MODEL, "weights": "none", "tau": 4.0},
            "data": {"imagenet": {"train": src["train"], "val": src["val"]}, "synthetic": True},
            "extract": {"batch_size": 8, "val_split": None},
            "scope": {"batch_size": 2, "instability_images": N_INSTABILITY},
            "ray": {"gpus_per_actor": 0}, "storage": {"root": str(work / "results")}}
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    val = pq.read_table(src["val"]["path"], columns=["key", "label"])
    first_of_class: dict[int, str] = {}  # the stage's selection rule: first image of each label, source order
    for key, label in zip(val.column("key").to_pylist(), val.column("label").to_pylist()):
        if len(first_of_class) < N_INSTABILITY:
            first_of_class.setdefault(label, key)
    job = load_config(str(path))
    tokens = len(first_of_class) * sum(tokens_per_image(job.model.spec.grid, s, None) for s in job.instability_shifts)
    assert tokens > 2 * EMD_BATCH_TOKENS, "too little instability work for the kill to land mid-stage"
    return {"path": path, "job": job, "root": ResultsRoot(spec["storage"]["root"]),
            "selected": set(first_of_class.values()), "tokens": tokens, "work": work}


def _driver_cmd(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "scope_ray.cli", "run", str(job_path), "--stages", STAGES]


def _driver_env(ray) -> dict[str, str]:
    # The session's Ray set RAY_AUTH_MODE=token in this process when it started; the child finds
    # the token where this process did. Unbuffered: a SIGKILLed driver's log keeps every line.
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def _stage_files(root, stage: str) -> list[Path]:
    """Every file of one stage of MODEL: its folder (manifest, figures, checkpoints) and its
    tables' partitions ROOT/tables/<table>/model=MODEL/stage=<stage>/."""
    base = Path(root.path)
    folders = [base / MODEL / stage, *(base / "tables").glob(f"*/model={MODEL}/stage={stage}")]
    return sorted(p for d in folders for p in d.rglob("*") if p.is_file())


def _snapshot(root, stage: str) -> dict[str, tuple[int, int, str]]:
    """Every file of the stage: (size, mtime in ns, SHA-256)."""
    return {str(p.relative_to(root.path)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in _stage_files(root, stage)}


@pytest.fixture(scope="module")
def killed(ray_local, job_file) -> dict:
    """Run the driver until instability has a tokens part file on storage, then SIGKILL it."""
    root = job_file["root"]
    tokens_dir = Path(root.stage(MODEL, "instability").table_path("tokens"))
    log_path = job_file["work"] / "killed-driver.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_driver_cmd(job_file["path"]), env=_driver_env(ray_local), stdout=log,
                                stderr=subprocess.STDOUT)
        # Storage, not the log, says when: a part file is the partial output the kill must leave behind.
        while proc.poll() is None and not any(tokens_dir.glob("*.parquet")):
            time.sleep(0.05)
        running = proc.poll() is None
        if running:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    log_text = log_path.read_text()
    assert running, f"the driver ended (exit {proc.returncode}) before instability wrote a part file:\n{log_text}"
    assert proc.returncode == -signal.SIGKILL
    job_id = max((j for j in _jobs() if j["DriverPid"] == proc.pid), key=lambda j: j["StartTime"])["JobID"]
    return {"seconds": time.time() - t0, "log": log_text, "job_id": job_id,
            "extract_files": _snapshot(root, "extract"),
            "partial_parts": sorted(p.name for p in tokens_dir.glob("*.parquet")),
            # Reading each footer: a part file under its final name is never a truncated one.
            "partial_rows": sum(pq.read_metadata(p).num_rows for p in tokens_dir.glob("*.parquet"))}


def _jobs() -> list[dict]:
    # The session's Ray runs without a dashboard, so ray.util.state (served by it) is not there:
    # read the GCS's own job and actor tables.
    from ray._private import state

    return state.jobs()


@pytest.fixture(scope="module")
def rerun(ray_local, job_file, killed) -> dict:
    """The same command again, after the kill."""
    killed["rerun_started"] = True
    t0, start_ns = time.time(), time.time_ns()
    proc = subprocess.run(_driver_cmd(job_file["path"]), env=_driver_env(ray_local), capture_output=True, text=True,
                          timeout=400)
    (job_file["work"] / "rerun-driver.log").write_text(proc.stdout + proc.stderr)
    return {"proc": proc, "out": proc.stdout + proc.stderr, "seconds": time.time() - t0, "start_ns": start_ns}


def test_driver_sigkill_mid_stage_leaves_the_committed_stage_and_hides_the_partial_one(job_file, killed):
    assert "rerun_started" not in killed, "this test reads storage as the kill left it: run it before the re-run"
    job, root = job_file["job"], job_file["root"]
    extract, instability = root.stage(MODEL, "extract"), root.stage(MODEL, "instability")
    assert "[instability]" in killed["log"] and "[extract] committed train_tokens" in killed["log"]
    assert extract.is_complete(extract_hash(job))
    # Partial output is physically there ...
    assert killed["partial_parts"]
    written = instability.written_table("tokens", TOKENS_SCHEMA, ["image_id"]).num_rows
    # Usually fewer rows than the stage writes; EMD tasks already running when the driver died
    # may still finish their parts before Ray reaps the job's workers, so all of them is possible.
    # Either way the commit never happened (next lines): that is what the kill must not break.
    assert 0 < written <= job_file["tokens"]
    # ... and no reader sees it: no manifest, the table readers refuse, the report lists the stage
    # as incomplete and opens none of its files.
    assert instability.manifest() is None and not instability.is_complete()
    for table in ("tokens", "images", "summary"):
        with pytest.raises(StageIncomplete):
            instability.part_files(table)
        with pytest.raises(StageIncomplete):
            instability.read_table(table)
    (run,) = collect(root)
    assert run.status("extract") == "complete" and run.status("instability") == INCOMPLETE
    # The committed stage lists only finished part files: no temporary names, every one readable.
    manifest = extract.manifest()
    for table, rows in manifest["rows"].items():
        names = manifest["tables"][table]
        assert all(n.endswith(".parquet") for n in names)
        assert sum(pq.read_metadata(Path(extract.table_path(table)) / n).num_rows for n in names) == rows


def test_rerun_skips_the_committed_stage_and_redoes_the_killed_one_from_scratch(job_file, killed, rerun):
    proc, out = rerun["proc"], rerun["out"]
    assert proc.returncode == 0, out
    job, root = job_file["job"], job_file["root"]
    assert f"[extract] {MODEL}: already complete" in out
    assert f"[extract] {MODEL} layer" not in out and "[extract] committed" not in out  # no plan, no commit
    assert f"[instability] {MODEL} layer" in out and f"[instability] {MODEL}: already complete" not in out
    # The skipped stage was not touched: same files, same bytes, same modification times.
    assert _snapshot(root, "extract") == killed["extract_files"]
    # The killed stage was redone from scratch: nothing the killed attempt wrote is left.
    inst = _stage_files(root, "instability")
    assert inst and all(p.stat().st_mtime_ns >= rerun["start_ns"] for p in inst)
    assert not [p for p in inst if p.name.endswith(".tmp")]
    instability = root.stage(MODEL, "instability")
    manifest = instability.manifest()
    n_images = len(job_file["selected"])
    assert manifest["rows"] == {"images": n_images, "tokens": job_file["tokens"],
                                "summary": len(job.instability_shifts), "rejects": 0}
    for table, rows in manifest["rows"].items():
        names = manifest["tables"][table]
        assert all(n.endswith(".parquet") for n in names)
        assert instability.read_table(table).num_rows == rows
    tokens = instability.read_table("tokens", columns=["image_id", "shift", "token1"])
    keys = tokens.group_by(["image_id", "shift", "token1"]).aggregate([]).num_rows
    assert keys == tokens.num_rows  # every (image, shift, token) once
    assert set(pc.unique(tokens.column("image_id")).to_pylist()) == job_file["selected"]
    images = instability.read_table("images").column("image_id").to_pylist()
    assert sorted(images) == sorted(job_file["selected"])
    print(f"\nkilled driver ran {killed['seconds']:.1f} s, left {killed['partial_rows']} of {job_file['tokens']} "
          f"token rows in {len(killed['partial_parts'])} part file(s); re-run {rerun['seconds']:.1f} s: "
          f"{n_images} images, {tokens.num_rows} token rows; extract {root.stage(MODEL, 'extract').manifest()['rows']}")


def test_the_killed_drivers_actors_and_workers_are_gone(ray_local, killed, rerun):
    """Ray ends a dead driver's job: its actors are dead and their processes gone, so nothing it
    started holds the shared 2-CPU instance's resources (the re-run finishing needed them too)."""
    from ray._private import state

    assert rerun["proc"].returncode == 0
    (job,) = [j for j in _jobs() if j["JobID"] == killed["job_id"]]
    assert job["IsDead"]
    # Ray Data's bookkeeping actors (stats, autoscaling coordinator, ...) are detached cluster-wide
    # singletons that every later job reuses and that hold no CPU: not the killed job's to end.
    actors = [a for a in state.actors().values() if a["JobID"] == killed["job_id"] and not a["IsDetached"]]
    assert any("AttentionRows" in a["ActorClassName"] for a in actors), [a["ActorClassName"] for a in actors]
    assert all(a["State"] == "DEAD" for a in actors), [(a["ActorClassName"], a["State"]) for a in actors]
    # Pid 0: an actor that never got a process (its creation was cancelled with the job).
    alive = {a["Pid"]: a["ActorClassName"] for a in actors if a["Pid"] and _cmdline(a["Pid"])}
    assert not alive, {pid: (name, _cmdline(pid)) for pid, name in alive.items()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_typo_in_a_data_path_leaves_the_committed_extraction_byte_identical(ray_local, job_file, killed, rerun):
    """The same job with one letter of the training data path wrong (its config hash changes, so
    extract would be redone): the run fails naming the path, before anything committed is deleted."""
    typo = str(job_file["job"].data.imagenet.train.path).replace("train", "trian")
    assert typo != str(job_file["job"].data.imagenet.train.path)
    before = _snapshot(job_file["root"], "extract")
    proc = subprocess.run(_driver_cmd(job_file["path"])[:-2] + ["--stages", "extract", "--set",
                                                                f"data.imagenet.train.path={typo}"],
                          env=_driver_env(ray_local), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and typo in out and "does not exist" in out, out
    assert _snapshot(job_file["root"], "extract") == before
    assert job_file["root"].stage(MODEL, "extract").is_complete(extract_hash(job_file["job"]))


def test_a_second_run_on_a_stage_being_written_is_refused_and_the_first_commits(ray_local, job_file, killed, rerun):
    """Two runs on one results root (the SAE of one config being trained; a second job, another
    learning rate, started on the same stage): the second stops at once with an error naming the
    first, deletes and writes nothing; the first, frozen meanwhile (SIGSTOP) so the second surely
    meets it mid-stage, then commits normally."""
    from scope_ray.stages.train_sae import config_hash as train_hash

    root = job_file["root"]
    lease = Path(root.path) / MODEL / ".leases" / "train-sae.json"
    cmd = _driver_cmd(job_file["path"])[:-2] + ["--stages", "train-sae", "--set", "sae.batch_size=8"]
    log_path = job_file["work"] / "first-writer.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(cmd, env=_driver_env(ray_local), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while first.poll() is None and not lease.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.poll() is None and lease.exists(), log_path.read_text()
            os.kill(first.pid, signal.SIGSTOP)
            before = _snapshot(root, "train-sae")
            second = subprocess.run(cmd + ["--set", "sae.lr=0.001"], env=_driver_env(ray_local),
                                    capture_output=True, text=True, timeout=240)
            out = second.stdout + second.stderr
            assert second.returncode != 0 and "is being written by another run" in out, out
            assert f"pid {first.pid}" in out and "Traceback" not in out, out
            assert _snapshot(root, "train-sae") == before  # the second run deleted and wrote nothing
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=300)
    assert first.returncode == 0, log_path.read_text()
    job = load_config(str(job_file["path"]), overrides=["sae.batch_size=8"])
    assert root.stage(MODEL, "train-sae").is_complete(train_hash(job))
    assert not lease.exists()  # released at the end

"""``scope-ray sweep``: the spec, the skip rule and the table (fast), and the issue's acceptance
test against a real Ray head with token authentication on (slow).

For the slow tests, one head per module, started with ``ray start --head --block`` in its own process group, on
free ports and its own temp dir, so that tearing it down touches nothing else on the machine
(never a bare ``ray stop``: that would kill every Ray here, the test session's included). The
sweep runs as a subprocess, as a user runs it; RAY_ADDRESS and the token never enter this
process's environment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from scope_ray.data.synthetic import write_synthetic
from scope_ray.storage import ResultsRoot
from scope_ray.sweep.plan import read_state

REPO = Path(__file__).resolve().parents[1]
MODELS = ("demo-vit-tiny", "demo-vit-reg")
STAGES = ["extract", "train-sae"]
FIRST_STAGES = ["extract"]
HEAD_PORTS = ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "min-worker-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
        return False


def _our_processes(temp_dir: str, token: str) -> list[int]:
    """Pids of our head's processes: those whose command line names its temp dir (GCS, raylet,
    workers) or whose environment holds its token, which is unique to it (job drivers run in
    sessions of their own, and whatever they start inherits the token too)."""
    marks = (("cmdline", temp_dir.encode()), ("environ", f"RAY_AUTH_TOKEN={token}".encode()))
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if any(mark in (entry / name).read_bytes() for name, mark in marks):
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return pids


class RayHead:
    """A private Ray head with token auth: its dashboard URL, and the env a client needs."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.token = secrets.token_hex(16)
        ports = dict(zip(HEAD_PORTS, _free_ports(len(HEAD_PORTS))))
        ports["max-worker-port"] = ports["min-worker-port"] + 40  # a small private worker range
        self.ports = ports
        self.url = f"http://127.0.0.1:{ports['dashboard-port']}"
        # Short: Ray's Unix socket paths live under it and must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="srsw-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_DEDUP_LOGS="0",
                   PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
        self.client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               "--disable-usage-stats", "--include-log-monitor=false", f"--object-store-memory={200 * 2**20}",
               *(f"--{k}={v}" for k, v in ports.items())]
        self.log = open(workdir / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        while True:  # ends when the dashboard answers, or fails when the head exits
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{(self.workdir / 'head.log').read_text()}")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # 401 without a token: the dashboard is up
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop this head only: SIGTERM to `ray start --block` (it shuts its node down), then
        SIGKILL whatever of ours is left, found by its process group or our temp dir."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass  # a loaded machine: what is left is killed below
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _our_processes(self.temp_dir, self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = RayHead(tmp_path_factory.mktemp("head"))
    yield h
    h.stop()
    busy = [p for p in (h.ports["port"], h.ports["dashboard-port"]) if _port_in_use(p)]
    assert not busy, f"ports still held after stopping the test head: {busy}"
    assert not _our_processes(h.temp_dir, h.token)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return write_sweep(tmp_path_factory.mktemp("sweep"))


def write_sweep(d: Path) -> Path:
    """Two tiny job specs on synthetic data and a sweep over them (results root set per run)."""
    src = write_synthetic(str(d / "data"), n_train=12, n_val=4, size=112, num_classes=4, seed=0,
                          formats=("folder",))["imagenet"]["folder"]
    for model in MODELS:
        spec = {"name": model, "model": {"name": model, "weights": "none"},
                "data": {"imagenet": {"train": src["train"]}},
                "extract": {"tokens_per_image": 4, "batch_size": 8, "val_split": None},
                "sae": {"expansion": 2, "k": 4, "batch_size": 16, "epochs": 1, "log_every": 1,
                        "checkpoint_every": 100, "shuffle_buffer": 0, "scale_sample": 48},
                "ray": {"num_actors": 1, "cpus_per_actor": 0.5, "decode_cpus": 0.25, "read_cpus": 0.25,
                        "torch_threads": 1}}
        (d / f"{model}.yaml").write_text(yaml.safe_dump(spec))
    sweep = {"name": "t", "jobs": [f"{m}.yaml" for m in MODELS], "stages": STAGES, "max_concurrent": 2,
             "poll_seconds": 0.5, "entrypoint": f"{sys.executable} {REPO / 'jobs' / 'entrypoint.py'}"}
    (d / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    # The first sweep runs extraction only (no Ray Train start-up: the suite's time budget); the
    # kill-and-rerun test then asks for train-sae as well.
    (d / "sweep-extract.yaml").write_text(yaml.safe_dump({**sweep, "stages": FIRST_STAGES}))
    return d


def _sweep_cmd(sweep_dir: Path, head: RayHead, root: Path, spec: str = "sweep.yaml") -> list[str]:
    return [sys.executable, "-m", "scope_ray.cli", "sweep", str(sweep_dir / spec), "--address", head.url,
            "--set", f"storage.root={root}"]


def _sweep(sweep_dir, head, root, env=None, spec: str = "sweep.yaml") -> subprocess.CompletedProcess:
    return subprocess.run(_sweep_cmd(sweep_dir, head, root, spec), env=env or head.client_env, capture_output=True,
                          text=True)


def _complete(root: Path, model: str, stages=STAGES) -> bool:
    r = ResultsRoot(str(root))
    return all(r.stage(model, s).is_complete() for s in stages)


def _last_record(root: Path) -> dict:
    return json.loads(sorted((root / ".sweeps" / "t").glob("*.json"))[-1].read_text())


def _logs(root: Path, model: str) -> list[Path]:
    return sorted((root / model / "logs").glob("*.log"))


@pytest.fixture(scope="module")
def first_sweep(head, sweep_dir, tmp_path_factory):
    """Both models through extract: (results root, the sweep's result)."""
    root = tmp_path_factory.mktemp("results") / "root"
    return root, _sweep(sweep_dir, head, root, spec="sweep-extract.yaml")


@pytest.mark.slow
def test_sweep_runs_both_models_then_skips_them(head, sweep_dir, first_sweep):
    root, first = first_sweep
    assert first.returncode == 0, first.stdout + first.stderr
    for model in MODELS:
        assert _complete(root, model, FIRST_STAGES)
        (log,) = _logs(root, model)  # one job, its log saved under ROOT/<model>/logs/<job id>.log
        assert "[extract]" in log.read_text()
        assert read_state(ResultsRoot(str(root)), model)["complete"]["stages"] == FIRST_STAGES
    assert {m["status"] for m in _last_record(root)["models"]} == {"SUCCEEDED"}
    assert "done" in first.stdout and "SUCCEEDED" in first.stdout  # the live table

    again = _sweep(sweep_dir, head, root, spec="sweep-extract.yaml")
    assert again.returncode == 0, again.stdout + again.stderr
    record = _last_record(root)
    assert [(m["status"], m["job_id"]) for m in record["models"]] == [("skipped", None)] * 2
    assert all(len(_logs(root, m)) == 1 for m in MODELS)  # no job was submitted


@pytest.mark.slow
def test_more_stages_and_a_new_config_rerun_a_stopped_job_fails_only_its_model_and_a_rerun_completes_it(
        head, sweep_dir, first_sweep):
    root, first = first_sweep
    assert first.returncode == 0, first.stdout + first.stderr
    victim, other = MODELS[1], MODELS[0]
    r = ResultsRoot(str(root))
    # Asking for train-sae too (never run) and a new SAE K: neither model may be skipped (inside
    # the jobs extract skips itself, its config being unchanged).
    changed = ["--set", "sae.k=3"]
    proc = subprocess.Popen(_sweep_cmd(sweep_dir, head, root) + changed, env=head.client_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Stop the victim once its train-sae has started: the stage prints its plan just before Ray
    # Train starts, and Train's start-up alone then takes seconds, so no manifest can be there
    # yet (asserted after the stop).
    ray_cli = str(Path(sys.executable).parent / "ray")

    def victim_training() -> bool:
        job = (read_state(r, victim) or {}).get("last_job") or {}
        if not job.get("id"):
            return False
        logs = subprocess.run([ray_cli, "job", "logs", "--address", head.url, job["id"]], env=head.client_env,
                              capture_output=True, text=True)
        return f"[train-sae] {victim}:" in logs.stdout

    while proc.poll() is None and not victim_training():
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    job_id = read_state(r, victim)["last_job"]["id"]
    subprocess.run([ray_cli, "job", "stop", "--address", head.url, job_id], env=head.client_env, check=True,
                   capture_output=True)
    out, _ = proc.communicate()
    assert proc.returncode == 1, out
    assert not r.stage(victim, "train-sae").is_complete()  # it was stopped mid-way
    assert _complete(root, other) and r.stage(other, "train-sae").manifest()["k"] == 3
    statuses = {m["model"]: m["status"] for m in _last_record(root)["models"]}
    assert statuses == {victim: "STOPPED", other: "SUCCEEDED"}
    assert f"not complete: {victim}" in out

    rerun = subprocess.run(_sweep_cmd(sweep_dir, head, root) + changed, env=head.client_env, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    statuses = {m["model"]: m["status"] for m in _last_record(root)["models"]}
    assert statuses == {victim: "SUCCEEDED", other: "skipped"}
    assert _complete(root, victim) and r.stage(victim, "train-sae").manifest()["k"] == 3
    assert len(_logs(root, other)) == 2 and len(_logs(root, victim)) == 3


@pytest.mark.slow
def test_wrong_or_missing_token_is_a_clear_error(head, sweep_dir, tmp_path):
    root = tmp_path / "results"
    wrong = _sweep(sweep_dir, head, root, env={**head.client_env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2
    assert "rejected the authentication token" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "not-the-token" not in wrong.stderr + wrong.stdout  # a token is never printed
    no_mode = {k: v for k, v in head.client_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    missing = _sweep(sweep_dir, head, root, env={**no_mode, "HOME": str(tmp_path)})
    assert missing.returncode == 2
    assert "requires token authentication" in missing.stderr and "RAY_AUTH_MODE=token" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (root / MODELS[0] / "logs").exists()  # nothing was submitted


@pytest.mark.slow
def test_ctrl_c_stops_the_sweeps_jobs_and_keeps_their_logs(head, sweep_dir, tmp_path):
    root = tmp_path / "results"
    # A job that would run for minutes: the sweep appends its arguments after the ';'.
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    spec.update(name="slow", jobs=[str(sweep_dir / f"{MODELS[0]}.yaml")], entrypoint="echo started; sleep 600; true")
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "scope_ray.cli", "sweep", str(path), "--address", head.url,
           "--set", f"storage.root={root}"]
    # SIGINT back to its default in the child: a pytest started in the background by a
    # non-interactive shell has it ignored, which Python would inherit and never raise Ctrl-C.
    proc = subprocess.Popen(cmd, env=head.client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Wait until Ray has the job: the table shows it PENDING or RUNNING (the sweep state names
    # the job already before it is submitted, so the state alone does not say it was).
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(MODELS[0]) and ("PENDING" in line or "RUNNING" in line):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "interrupted: stopping 1 running job(s)" in out
    record = json.loads(sorted((root / ".sweeps" / "slow").glob("*.json"))[-1].read_text())
    assert [m["status"] for m in record["models"]] == ["STOPPED"] and record["exit_code"] == 130
    (log,) = _logs(root, MODELS[0])
    assert record["models"][0]["job_id"] in log.name


# ----------------------------------------------------------------------------- fast unit tests
from scope_ray.config import load_config  # noqa: E402
from scope_ray.sweep import ClusterAccessError, SweepSpecError, load_sweep, run_sweep  # noqa: E402
from scope_ray.sweep.plan import completed_state, decide, manifest_hashes, stage_dirs, write_state  # noqa: E402
from scope_ray.sweep.spec import job_hash  # noqa: E402
from scope_ray.sweep.table import Row, render  # noqa: E402


def _spec_files(d: Path, sweep: dict, jobs: dict[str, dict] | None = None) -> Path:
    for name, spec in (jobs or {"a.yaml": {"model": {"name": "demo-vit-tiny"}},
                                "b.yaml": {"model": {"name": "demo-vit-reg"}}}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(yaml.safe_dump(spec))
    path = d / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "jobs": ["a.yaml", "b.yaml"], **sweep}, sort_keys=False))
    return path


def test_sweep_spec_errors_name_the_key_and_what_is_allowed(tmp_path):
    with pytest.raises(SweepSpecError, match=r"max_concurent: unknown key; allowed keys here: name, jobs"):
        load_sweep(_spec_files(tmp_path, {"max_concurent": 2}))
    with pytest.raises(SweepSpecError, match=r"runtime_env.workdir: unknown key; allowed keys here: working_dir"):
        load_sweep(_spec_files(tmp_path, {"runtime_env": {"workdir": "."}}))
    with pytest.raises(SweepSpecError, match=r"stages: unknown stage\(s\) \['train'\]; allowed: extract, train-sae"):
        load_sweep(_spec_files(tmp_path, {"stages": ["extract", "train"]}))
    with pytest.raises(SweepSpecError, match=r"max_concurrent: .*greater than or equal to 1"):
        load_sweep(_spec_files(tmp_path, {}), max_concurrent=0)
    with pytest.raises(SweepSpecError, match="AWS_SECRET_ACCESS_KEY looks like a credential"):
        load_sweep(_spec_files(tmp_path, {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}}))
    with pytest.raises(SweepSpecError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_every_job_spec_is_validated_before_anything_is_submitted(tmp_path):
    bad = {"a.yaml": {"model": {"name": "demo-vit-tiny"}, "sae": {"k": 10**6}},
           "b.yaml": {"model": {"name": "no-such-model"}}}
    with pytest.raises(SweepSpecError) as err:
        load_sweep(_spec_files(tmp_path, {}, bad))
    text = str(err.value)
    assert "2 of 2 job spec(s) cannot run; nothing was submitted" in text
    assert "a.yaml" in text and "sae.k: 1000000 is larger than the dictionary" in text
    assert "b.yaml" in text and "unknown model 'no-such-model'" in text
    # The sweep's overrides are part of what is validated.
    with pytest.raises(SweepSpecError, match="sae.k"):
        load_sweep(_spec_files(tmp_path, {"overrides": {"sae.k": 0}}))
    # Two jobs writing the same model's directories under the same root.
    same = {"a.yaml": {"model": {"name": "demo-vit-tiny"}}, "b.yaml": {"model": {"name": "demo-vit-tiny"}}}
    with pytest.raises(SweepSpecError, match="two jobs would write the same stage directories"):
        load_sweep(_spec_files(tmp_path, {}, same))
    # ... also when the root is spelled two ways ("/r" and "/r/", "s3://b/x" and "s3://b//x/").
    for roots in ((str(tmp_path / "r"), str(tmp_path / "r") + "/"), ("s3://b/x", "s3://b//x/")):
        spelled = {"a.yaml": {"model": {"name": "demo-vit-tiny"}, "storage": {"root": roots[0]}},
                   "b.yaml": {"model": {"name": "demo-vit-tiny"}, "storage": {"root": roots[1]}}}
        with pytest.raises(SweepSpecError, match="two jobs would write the same stage directories"):
            load_sweep(_spec_files(tmp_path, {}, spelled))
    # With a working_dir the job reads its spec there, so the spec must lie inside it.
    (tmp_path / "wd").mkdir()
    with pytest.raises(SweepSpecError, match="lies outside runtime_env.working_dir"):
        load_sweep(_spec_files(tmp_path, {"runtime_env": {"working_dir": "wd"}}))


def test_overrides_reach_the_job_config_and_its_command_line(tmp_path):
    jobs = {"jobs/a.yaml": {"model": {"name": "demo-vit-tiny"}}, "jobs/b.yaml": {"model": {"name": "demo-vit-reg"}}}
    path = _spec_files(tmp_path, {"jobs": ["jobs/a.yaml", "jobs/b.yaml"], "stages": ["train-sae", "extract"],
                                  "overrides": {"storage.root": "s3://bucket/x", "sae.k": 5, "scope.shifts": [1, 2]},
                                  "runtime_env": {"working_dir": "."}}, jobs)
    sweep = load_sweep(path, overrides=["sae.k=6"])
    assert sweep.spec.stages == ("extract", "train-sae")  # pipeline order
    a = sweep.jobs[0]
    assert (a.config.storage.root, a.config.sae.k, a.config.scope.shifts) == ("s3://bucket/x", 6, (1, 2))
    assert a.entrypoint == ("python jobs/entrypoint.py jobs/a.yaml --stages extract,train-sae "
                            "--set storage.root=s3://bucket/x --set 'scope.shifts=[1, 2]' --set sae.k=6")
    # What the job on the cluster resolves from that command line is what the sweep validated.
    assert load_config(tmp_path / "jobs/a.yaml", list(a.overrides)) == a.config
    assert sweep.runtime_env == {"working_dir": str(tmp_path.resolve())}


def test_job_hash_tracks_results_not_where_they_run():
    base = load_config(None)
    assert job_hash(base) == job_hash(load_config(None, ["ray.num_actors=4", "name=other"]))
    assert job_hash(base) == job_hash(load_config(None, [f"model.layer={base.model.resolved_layer}"]))
    assert job_hash(base) != job_hash(load_config(None, ["sae.k=7"]))
    assert job_hash(base) != job_hash(load_config(None, ["storage.root=elsewhere"]))


def _commit(root: ResultsRoot, model: str, stage: str, chash: str) -> None:
    root.stage(model, stage).commit(chash, inputs={}, rows={})


def test_skip_only_when_the_same_config_completed_every_requested_stage(tmp_path):
    root, model = ResultsRoot(str(tmp_path)), "demo-vit-tiny"
    dirs_of = {s: stage_dirs(s, has_text_tower=False) for s in ("extract", "train-sae", "cds", "zeroshot")}
    assert dirs_of["cds"] == ("cds-topk", "cds", "partition") and dirs_of["zeroshot"] == ()
    stages = ("extract", "train-sae")
    now = lambda: manifest_hashes(root, model, ["extract", "train-sae"])  # noqa: E731

    assert not decide(None, "H", stages, now(), dirs_of).skip
    _commit(root, model, "extract", "e1")
    _commit(root, model, "train-sae", "t1")
    state = completed_state(None, job_id="j1", job_hash="H", stages=stages, manifests=now(), when="t")
    write_state(root, model, state)
    assert read_state(root, model) == state
    assert decide(state, "H", stages, now(), dirs_of) == decide(state, "H", ("extract",), now(), dirs_of)
    assert decide(state, "H", stages, now(), dirs_of).skip
    # Stale: the job's config changed since.
    d = decide(state, "H2", stages, now(), dirs_of)
    assert not d.skip and "config changed" in d.reason
    # More stages than were completed.
    d = decide(state, "H", (*stages, "cds"), {**now(), "cds-topk": None}, dirs_of)
    assert not d.skip and "cds not yet run" in d.reason
    # A stage redone by hand with other settings, or removed (e.g. an interrupted redo).
    _commit(root, model, "train-sae", "t2")
    d = decide(state, "H", stages, now(), dirs_of)
    assert not d.skip and "train-sae was redone with another config" in d.reason
    root.fs.rm(str(tmp_path / model / "train-sae"), recursive=True)
    d = decide(state, "H", stages, now(), dirs_of)
    assert not d.skip and "train-sae was removed or interrupted" in d.reason


def test_completed_stages_add_up_under_one_config_and_start_over_under_another():
    s1 = completed_state(None, job_id="j1", job_hash="H", stages=("extract",), manifests={"extract": "e"}, when="t")
    s2 = completed_state(s1, job_id="j2", job_hash="H", stages=("train-sae",), manifests={"train-sae": "t"}, when="t")
    assert s2["complete"]["stages"] == ["extract", "train-sae"]
    assert s2["complete"]["manifests"] == {"extract": "e", "train-sae": "t"}
    s3 = completed_state(s2, job_id="j3", job_hash="H2", stages=("train-sae",), manifests={"train-sae": "u"}, when="t")
    assert s3["complete"]["stages"] == ["train-sae"] and s3["complete"]["manifests"] == {"train-sae": "u"}
    # A stage recorded without a manifest (a job that exited 0 without committing it) is never complete.
    dirs_of = {"extract": ("extract",)}
    hollow = completed_state(None, job_id="j", job_hash="H", stages=("extract",), manifests={"extract": None}, when="t")
    assert not decide(hollow, "H", ("extract",), {"extract": None}, dirs_of).skip


def test_table_marks_done_running_and_not_applicable_stages():
    stages = ("extract", "train-sae", "eval-sae", "zeroshot")
    rows = [Row("clip-vit-b16", "RUNNING", {"extract": True, "train-sae": False, "eval-sae": False,
                                             "zeroshot": False}, "job-1"),
            Row("dinov2-b", "skipped", {s: True for s in stages[:3]} | {"zeroshot": None}, note="complete"),
            Row("deit3-b", "queued")]
    lines = render(rows, stages).splitlines()
    assert lines[0].split() == ["model", "job", *stages, "job", "id", "/", "note"]
    assert lines[1].split() == ["clip-vit-b16", "RUNNING", "done", "run", ".", ".", "job-1"]
    assert lines[2].split() == ["dinov2-b", "skipped", "done", "done", "done", "n/a", "complete"]
    assert lines[3].split() == ["deit3-b", "queued", ".", ".", ".", "."]
    assert len({line.index(" done") if " done" in line else -1 for line in lines[1:3]}) == 1  # aligned columns


def test_dry_run_reports_the_plan_and_submits_nothing(tmp_path, capsys):
    path = _spec_files(tmp_path, {"stages": ["extract"], "overrides": {"storage.root": str(tmp_path / "r")}})
    sweep = load_sweep(path)
    a = sweep.jobs[0]
    root = ResultsRoot(str(tmp_path / "r"))
    _commit(root, a.model, "extract", "e")
    write_state(root, a.model, completed_state(None, job_id="j", job_hash=a.job_hash, stages=("extract",),
                                               manifests={"extract": "e"}, when="t"))
    assert run_sweep(str(path), dry_run=True) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "would run" in out and "no completed sweep job on record" in out
    assert "demo-vit-reg: python jobs/entrypoint.py" in out and "nothing submitted" in out
    assert not (tmp_path / "r" / ".sweeps").exists()


def test_no_cluster_address_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = _spec_files(tmp_path, {"overrides": {"storage.root": str(tmp_path / "r")}})
    with pytest.raises(ClusterAccessError, match="no Ray cluster given: pass --address"):
        run_sweep(str(path))


# --------------------------------------------- the runner's state, skip and exit-code logic
# Against an in-memory Jobs API (FakeJobs) standing in for JobSubmissionClient: what is tested is
# the sweep's own code (its retries, its sweep state on a real results root, its skip rule, its
# exit code); the real Jobs API is exercised by the slow tests above.
import io  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import requests  # noqa: E402
from ray.job_submission import JobStatus  # noqa: E402

from scope_ray.sweep import runner  # noqa: E402


class _Died(BaseException):
    """The sweep process dying at a chosen point (what kill -9 would do, as seen by the code after)."""


class FakeJobs:
    """A cluster that runs each job for ``polls`` status queries, then does its work (commits the
    manifests of the stages ``commits`` names for its model) and succeeds.

    Trouble on demand: ``down`` (models whose jobs' status queries fail with ``down_error``),
    ``flaky`` (errors raised by the next status queries, whatever the job), ``after_submit``
    (model -> error raised once Ray has accepted that model's job: a lost answer, or a dying sweep)."""

    def __init__(self, root: ResultsRoot, polls: int = 1):
        self.root, self.polls = root, polls
        self.commits: dict[str, tuple[str, ...]] = {m: tuple(STAGES) for m in MODELS}
        self.jobs: dict[str, dict] = {}
        self.submitted: list[tuple[str, str]] = []  # (model, submission id)
        self.state_at_submit: dict[str, str] = {}   # submission id -> last_job id in the state then
        self.down: set[str] = set()
        self.down_error = lambda: RuntimeError("Request failed with status code 503: Service Unavailable.")
        self.flaky: list[Exception] = []
        self.after_submit: dict[str, BaseException] = {}
        self.status_calls: dict[str, int] = {}

    def add_running(self, job_id: str, model: str) -> None:
        self.jobs[job_id] = {"model": model, "status": "RUNNING", "left": self.polls}

    def _job(self, job_id: str) -> dict:
        if job_id not in self.jobs:  # what the dashboard answers, through JobSubmissionClient
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]

    def submit_job(self, *, entrypoint, submission_id, metadata, **_):
        model = metadata["model"]
        state = read_state(self.root, model) or {}
        self.state_at_submit[submission_id] = (state.get("last_job") or {}).get("id")
        self.jobs[submission_id] = {"model": model, "status": "PENDING", "left": self.polls}
        self.submitted.append((model, submission_id))
        if model in self.after_submit:
            raise self.after_submit.pop(model)
        return submission_id

    def get_job_status(self, job_id):
        self.status_calls[job_id] = self.status_calls.get(job_id, 0) + 1
        if self.flaky:
            raise self.flaky.pop(0)
        job = self._job(job_id)
        if job["model"] in self.down:
            raise self.down_error()
        if job["status"] in ("PENDING", "RUNNING"):
            if job["left"] == 0:
                for stage in self.commits[job["model"]]:
                    self.root.stage(job["model"], stage).commit(f"{stage}-hash", inputs={}, rows={})
                job["status"] = "SUCCEEDED"
            else:
                job["left"] -= 1
                job["status"] = "RUNNING"
        return JobStatus(job["status"])

    def get_job_info(self, job_id):
        self._job(job_id)
        return SimpleNamespace(start_time=1_000, end_time=2_500, message="")

    def get_job_logs(self, job_id):
        self._job(job_id)
        return f"log of {job_id}\n"

    def stop_job(self, job_id):
        self._job(job_id)["status"] = "STOPPED"
        return True


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(run the sweep -> (exit code, its output, its record), the fake cluster, the results root,
    the sweep file)."""
    path = _spec_files(tmp_path, {"stages": STAGES, "poll_seconds": 0.001,
                                  "overrides": {"storage.root": str(tmp_path / "r")}})
    root = ResultsRoot(str(tmp_path / "r"))
    jobs = FakeJobs(root)
    monkeypatch.setattr(runner, "_make_client", lambda address: jobs)
    monkeypatch.setattr(runner, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))

    def sweep():
        out = io.StringIO()
        code = run_sweep(str(path), address="http://head:8265", out=out)
        text = out.getvalue()
        (uri,) = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("sweep record: ")]
        return code, text, json.loads(Path(uri).read_text())

    return sweep, jobs, root, path


def _statuses(record: dict) -> dict[str, str]:
    return {m["model"]: m["status"] for m in record["models"]}


def test_a_job_that_exits_0_without_a_stage_manifest_fails_its_model(fake):
    sweep, jobs, root, _ = fake
    a, b = MODELS
    jobs.commits[b] = ("extract",)  # an entrypoint that succeeds without committing train-sae
    code, out, record = sweep()
    assert code == 1 and record["exit_code"] == 1
    assert _statuses(record) == {a: "SUCCEEDED", b: "INCOMPLETE"}
    assert f"not complete: {b}" in out and "left no manifest for train-sae" in out
    assert read_state(root, b)["complete"]["stages"] == ["extract"]  # what it did do is recorded
    jobs.commits[b] = tuple(STAGES)
    code, _, record = sweep()
    assert code == 0 and _statuses(record) == {a: "skipped", b: "SUCCEEDED"}
    assert [m for m, _ in jobs.submitted] == [a, b, b]


def test_transient_errors_while_polling_are_retried(fake):
    sweep, jobs, _, _ = fake
    jobs.flaky = [requests.ConnectionError("connection reset"),
                  RuntimeError("Request failed with status code 503: busy."), requests.ReadTimeout("timed out")]
    code, out, record = sweep()
    assert code == 0, out
    assert _statuses(record) == {m: "SUCCEEDED" for m in MODELS} and not jobs.flaky


def test_a_lasting_outage_fails_only_that_model_and_a_rerun_tracks_its_job(fake):
    sweep, jobs, root, _ = fake
    a, b = MODELS
    jobs.down = {b}
    jobs.down_error = lambda: requests.ConnectionError("connection refused")
    code, out, record = sweep()
    assert code == 1 and record["exit_code"] == 1
    assert _statuses(record) == {a: "SUCCEEDED", b: "LOST"}
    (b_job,) = [sid for m, sid in jobs.submitted if m == b]
    assert jobs.status_calls[b_job] == 1 + len(runner.RETRY_DELAYS_S)  # retried, then given up
    assert f"ray job status {b_job}" in out and "Traceback" not in out
    # The cluster answers again; b's job still runs there: the re-run tracks it, never a second one.
    jobs.down = set()
    code, _, record = sweep()
    assert code == 0 and _statuses(record) == {a: "skipped", b: "SUCCEEDED"}
    assert [m for m, _ in jobs.submitted] == [a, b]
    assert read_state(root, b)["complete"]["job_id"] == b_job


def test_an_earlier_job_whose_status_cannot_be_read_is_never_doubled(fake):
    sweep, jobs, root, path = fake
    a, b = MODELS
    ha = load_sweep(path).jobs[0].job_hash
    write_state(root, a, {"last_job": {"id": "earlier", "job_hash": ha, "stages": STAGES}})
    jobs.add_running("earlier", a)
    jobs.down = {a}  # HTTP 503 for it, every time
    code, out, record = sweep()
    assert code == 1 and _statuses(record) == {a: "LOST", b: "SUCCEEDED"}
    assert "not submitting a second one" in out
    assert [m for m, _ in jobs.submitted] == [b]
    # A job Ray does not know (404: a restarted cluster) is nothing to wait for: a is submitted.
    write_state(root, a, {"last_job": {"id": "unknown-to-ray", "job_hash": ha, "stages": STAGES}})
    jobs.down = set()
    code, _, record = sweep()
    assert code == 0 and _statuses(record) == {a: "SUCCEEDED", b: "skipped"}
    assert [m for m, _ in jobs.submitted] == [b, a]


def test_the_state_names_each_job_before_it_is_submitted(fake):
    sweep, jobs, root, _ = fake
    a, b = MODELS
    # The sweep dies just after Ray accepted a's job: the next sweep tracks that job.
    jobs.after_submit[a] = _Died()
    with pytest.raises(_Died):
        sweep()
    (a_job,) = [sid for m, sid in jobs.submitted if m == a]
    assert jobs.state_at_submit[a_job] == a_job
    code, _, record = sweep()
    assert code == 0 and _statuses(record) == {a: "SUCCEEDED", b: "SUCCEEDED"}
    assert [m for m, _ in jobs.submitted] == [a, b]
    # An answer lost on the way back from a submission that went through: Ray is asked, the job
    # tracked, no second one submitted. (b must run again: its train-sae result is removed.)
    root.fs.rm(str(Path(root.path) / b / "train-sae"), recursive=True)
    jobs.after_submit[b] = requests.ReadTimeout("read timed out")
    code, _, record = sweep()
    assert code == 0 and _statuses(record) == {a: "skipped", b: "SUCCEEDED"}
    assert [m for m, _ in jobs.submitted] == [a, b, b]


def test_auth_token_source_names_where_the_token_comes_from_never_the_token(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runner.auth_token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret-1")
    assert runner.auth_token_source() == "~/.ray/auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert str(tmp_path / "tok") in runner.auth_token_source()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-2")
    assert runner.auth_token_source() == "the RAY_AUTH_TOKEN environment variable"


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    import threading

    from scope_ray.sweep.plan import write_text

    root, errors = ResultsRoot(str(tmp_path)), []

    def writer(tag: str) -> None:
        try:
            for i in range(150):
                write_text(root, "m/logs/sweep-state.json", f"{tag}{i}")
        except Exception as exc:  # noqa: BLE001 - collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (tmp_path / "m/logs/sweep-state.json").read_text() in ("a149", "b149")
    assert [p.name for p in (tmp_path / "m/logs").iterdir()] == ["sweep-state.json"]  # no temporary file left


def test_a_shipped_sweep_with_placeholders_is_refused_before_anything_runs(tmp_path, capsys):
    from scope_ray.cli import main

    shipped = Path(__file__).resolve().parents[1] / "jobs" / "sweeps" / "clip.yaml"
    # Only the results root pointed somewhere real: the job specs' data paths are still PLACEHOLDER.
    code = main(["sweep", str(shipped), "--dry-run", "--address", "http://127.0.0.1:1",
                 "--set", f"storage.root={tmp_path / 'r'}"])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 2 and "PLACEHOLDER values left" in err and "nothing submitted" in err
    # One line for the keys every job leaves open (not the same list once per job), the root not among them.
    (common,) = [ln for ln in err.splitlines() if ln.strip().startswith("every job (3): ")]
    assert "data.imagenet.train.path" in common and "storage.root" not in err
    assert err.count("data.imagenet.train.path") == 1
    # The dry run still shows the plan: each job, what it would run, its command.
    for model in ("clip-vit-b16", "clip-vit-l14", "clip-vit-l14-336"):
        assert f"{model}: python jobs/entrypoint.py jobs/{model}.yaml" in out
    assert out.count("would run") == 3
    assert not (tmp_path / "r").exists()


def test_saved_job_logs_hold_no_colour_codes_and_one_line_per_progress_bar():
    from scope_ray.sweep.plan import clean_log

    raw = ("\x1b[36m(RayTrainWorker pid=1)\x1b[0m [train-sae] step 10/20 loss 0.5\n"
           "extract train: 0img [00:00, ?img/s]\rextract train: 8img [00:01, 6img/s]\rextract train: 16img [00:02]\n"
           "\x1b[2K\x1b[1Adone\n")
    assert clean_log(raw) == ("(RayTrainWorker pid=1) [train-sae] step 10/20 loss 0.5\n"
                              "extract train: 16img [00:02]\ndone\n")

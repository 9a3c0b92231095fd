"""scope_ray/sweep/runner.py: retries, the sweep state, the skip rule and the exit code.

Against an in-memory Jobs API (FakeJobs) standing in for JobSubmissionClient: what is tested is
the sweep's own code (its retries, its sweep state on a real results root, its skip rule, its
exit code); the real Jobs API is exercised by tests/sweep/test_cluster.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from ray.job_submission import JobStatus

from scope_ray.storage import ResultsRoot
from scope_ray.sweep import ClusterAccessError, load_sweep, run_sweep, runner
from scope_ray.sweep.plan import read_state, write_state
from tests.sweep.helpers import MODELS, STAGES, spec_files


def test_no_cluster_address_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = spec_files(tmp_path, {"overrides": {"storage.root": str(tmp_path / "r")}})
    with pytest.raises(ClusterAccessError, match="no Ray cluster given: pass --address"):
        run_sweep(str(path))


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
    path = spec_files(tmp_path, {"stages": STAGES, "poll_seconds": 0.001,
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

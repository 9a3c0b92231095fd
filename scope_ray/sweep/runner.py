"""``scope-ray sweep``: one Ray job per model through the Ray Jobs API, tracked and resumable.

The Ray shell around spec.py (what to run), plan.py (what to skip) and table.py (what to
print): submit at most ``max_concurrent`` jobs, poll them, reprint the model x stage table when
it changes, save each job's log under ``ROOT/<model>/logs/<job id>.log`` and a sweep record
under ``ROOT/.sweeps/<sweep>/``. Reference: docs/sweep.md.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from scope_ray.storage import ResultsRoot
from scope_ray.sweep.plan import (LOGS_DIR, Decision, completed_state, decide, manifest_hashes, read_state,
                                  stage_dirs, write_state, write_text)
from scope_ray.sweep.spec import Sweep, SweepJob, load_sweep
from scope_ray.sweep.table import Row, render

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
OK = ("SUCCEEDED", "skipped")
EXIT_INTERRUPTED = 130
# How long a Ctrl-C waits for the stopped jobs to end before it saves their logs anyway.
STOP_WAIT_S = 30.0


class ClusterAccessError(RuntimeError):
    """The Ray cluster cannot be used: no address, unreachable, or token authentication failed."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------ token authentication
def _token_source() -> str | None:
    """Where Ray's client would take the token from, in its own order (never the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file RAY_AUTH_TOKEN_PATH names ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    if (Path.home() / ".ray" / "auth_token").exists():
        return "~/.ray/auth_token"
    return None


_WHERE_TOKEN = ("the cluster's token (on the head node: `ray get-auth-token`) in RAY_AUTH_TOKEN, in a file named by "
                "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (docs/sweep.md, 'Token authentication')")


def auth_error_message(address: str, ray_message: str) -> str:
    """One clear paragraph for Ray's AuthenticationError (401: no token sent; 403: wrong token)."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if ray_message.startswith("Authentication failed"):  # HTTP 403
        return (f"the Ray cluster at {address} rejected the authentication token taken from "
                f"{_token_source() or 'the environment'}: it is not this cluster's token. Provide {_WHERE_TOKEN}.")
    if mode.lower() != "token":
        return (f"the Ray cluster at {address} requires token authentication, and RAY_AUTH_MODE is "
                f"{mode or 'unset'}: set RAY_AUTH_MODE=token and provide {_WHERE_TOKEN}.")
    return f"RAY_AUTH_MODE=token but no authentication token was found: provide {_WHERE_TOKEN}."


class _Client:
    """JobSubmissionClient with Ray's authentication errors turned into ClusterAccessError."""

    def __init__(self, address: str | None):
        if not address:
            raise ClusterAccessError("no Ray cluster given: pass --address, set address in the sweep spec, or set "
                                     "RAY_ADDRESS to the dashboard URL (e.g. http://head-node:8265)")
        self.address = address
        self._client = self._call(_make_client, address)

    def _call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            raise ClusterAccessError(auth_error_message(self.address, str(exc))) from None
        except ConnectionError as exc:
            raise ClusterAccessError(f"cannot reach the Ray dashboard at {self.address}: {exc}") from None

    def __getattr__(self, name):
        method = getattr(self._client, name)
        return lambda *a, **kw: self._call(method, *a, **kw)


def _make_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


# ------------------------------------------------------------------------------ per-model work
@dataclass
class _Model:
    job: SweepJob
    root: ResultsRoot
    dirs_of: dict[str, tuple[str, ...]]
    row: Row
    state: dict | None = None
    decision: Decision | None = None
    job_id: str | None = None
    log_uri: str | None = None
    seconds: float | None = None
    attached: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.job.model

    def all_dirs(self) -> list[str]:
        return [d for dirs in self.dirs_of.values() for d in dirs]

    def refresh_stages(self) -> dict[str, str | None]:
        current = manifest_hashes(self.root, self.name, self.all_dirs())
        self.row.stages_done = {s: (None if not dirs else all(current[d] is not None for d in dirs))
                                for s, dirs in self.dirs_of.items()}
        return current


def _plan(sweep: Sweep, dry_run: bool) -> list[_Model]:
    """Decide per model: skip or run (reads each model's manifests and sweep state)."""
    roots: dict[tuple[str, str | None], ResultsRoot] = {}
    models = []
    for job in sweep.jobs:
        key = (job.config.storage.root, job.config.storage.endpoint_url)
        root = roots.setdefault(key, ResultsRoot(*key))
        has_text = job.config.model.spec.has_text_tower
        m = _Model(job=job, root=root, row=Row(job.model),
                   dirs_of={s: stage_dirs(s, has_text) for s in sweep.spec.stages})
        try:
            current = m.refresh_stages()
            m.state = read_state(root, m.name)
        except Exception as exc:  # noqa: BLE001 - credentials, network, bucket: all mean "cannot read the root"
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if not dry_run:
                raise PermissionError(f"results root {root.uri} cannot be read from here ({why}); the sweep reads "
                                      "it to skip completed models and writes logs there") from None
            m.decision = Decision(False, f"results root not readable from here ({why})")
            models.append(m)
            continue
        m.decision = decide(m.state, job.job_hash, sweep.spec.stages, current, m.dirs_of)
        if m.decision.skip:
            m.row.status, m.row.note = "skipped", m.decision.reason
        models.append(m)
    return models


class _Run:
    def __init__(self, sweep: Sweep, models: list[_Model], client: _Client, out: TextIO, poll_seconds: float):
        self.sweep, self.models, self.client, self.out, self.poll = sweep, models, client, out, poll_seconds
        self.stages = sweep.spec.stages
        self._last_table = ""

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def show(self) -> None:
        """Reprint the table when something in it changed (not on every poll)."""
        table = render([m.row for m in self.models], self.stages)
        if table != self._last_table:
            self._last_table = table
            self.say(f"[{time.strftime('%H:%M:%S')}]\n{table}")

    # --- a job from an earlier sweep that is still running -----------------------------------
    def adopt_running(self, m: _Model) -> bool:
        """True when an earlier sweep's job for this model is still live: track it, never submit a
        second one beside it (two jobs would write the same stage directories)."""
        last = (m.state or {}).get("last_job") or {}
        if not last.get("id"):
            return False
        try:
            status = self.client.get_job_status(last["id"]).value
        except RuntimeError:
            return False  # unknown to this cluster (restarted, or another cluster): nothing to wait for
        if status in TERMINAL:
            return False
        if last.get("job_hash") == m.job.job_hash and set(self.stages) <= set(last.get("stages", ())):
            m.job_id, m.attached, m.row.status = last["id"], True, status
            m.row.job_id, m.row.note = last["id"], "(started by an earlier sweep; tracking it)"
        else:
            m.row.status = "FAILED"
            m.row.note = (f"job {last['id']} from an earlier sweep still runs this model with another config or "
                          f"stages: wait for it or stop it (ray job stop {last['id']})")
        return True

    def submit(self, m: _Model) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        sid = f"{self.sweep.spec.name}-{m.name}-{stamp}-{secrets.token_hex(2)}"
        res = self.sweep.spec.entrypoint_resources
        try:
            m.job_id = self.client.submit_job(
                entrypoint=m.job.entrypoint, submission_id=sid, runtime_env=self.sweep.runtime_env or None,
                metadata={"scope_ray_sweep": self.sweep.spec.name, "model": m.name, "job_hash": m.job.job_hash},
                entrypoint_num_cpus=res.num_cpus or None, entrypoint_num_gpus=res.num_gpus or None)
        except (RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, ClusterAccessError):
                raise
            # A rejected submission (runtime_env upload, bad entrypoint resources...) fails this
            # model only; the others still run.
            m.row.status, m.row.note = "FAILED", f"submission failed: {str(exc).splitlines()[0][:200]}"
            return
        m.row.status, m.row.job_id = "PENDING", m.job_id
        state = dict(m.state or {})
        state["last_job"] = {"id": m.job_id, "job_hash": m.job.job_hash, "stages": list(self.stages),
                             "submitted_at": _now(), "address": self.client.address}
        m.state = state
        write_state(m.root, m.name, state)

    def finish(self, m: _Model) -> None:
        """A job ended: save its log, and on success record what it completed."""
        info = self.client.get_job_info(m.job_id)
        if info.start_time and info.end_time:
            m.seconds = round((info.end_time - info.start_time) / 1000, 1)
        try:
            logs = self.client.get_job_logs(m.job_id)
            m.log_uri = write_text(m.root, posixpath.join(m.name, LOGS_DIR, f"{m.job_id}.log"), logs)
        except Exception as exc:  # noqa: BLE001 - a log that cannot be saved must not lose the sweep
            m.row.note = f"log not saved: {type(exc).__name__}: {exc}"
        current = m.refresh_stages()
        if m.row.status == "SUCCEEDED":
            # Only stages whose every manifest is there count as complete: a job that exits 0
            # without committing a stage (an entrypoint that is not `run`) must not be skipped later.
            done = tuple(s for s in self.stages if all(current[d] is not None for d in m.dirs_of[s]))
            if done != self.stages:
                m.row.note = f"exited 0 but left no manifest for {', '.join(s for s in self.stages if s not in done)}"
            m.state = completed_state(m.state, job_id=m.job_id, job_hash=m.job.job_hash, stages=done,
                                      manifests={d: current[d] for s in done for d in m.dirs_of[s]}, when=_now())
            write_state(m.root, m.name, m.state)
        elif not m.row.note:
            m.row.note = (info.message or "").splitlines()[0][:120] if info.message else ""
        if m.log_uri:
            m.extra["log"] = m.log_uri

    def loop(self) -> None:
        queued = [m for m in self.models if not m.decision.skip and not self.adopt_running(m)]
        active = [m for m in self.models if m.job_id and m.row.status not in TERMINAL]
        self.show()
        while queued or active:
            while queued and len(active) < self.sweep.spec.max_concurrent:
                m = queued.pop(0)
                self.submit(m)
                if m.job_id:
                    active.append(m)
            for m in list(active):
                m.row.status = self.client.get_job_status(m.job_id).value
                if m.row.status in TERMINAL:
                    self.finish(m)
                    active.remove(m)
                else:
                    m.refresh_stages()
            self.show()
            if queued or active:
                time.sleep(self.poll)

    def stop_active(self) -> list[_Model]:
        """Ctrl-C: ask Ray to stop every job this sweep is tracking, wait for them, keep their logs."""
        active = [m for m in self.models if m.job_id and m.row.status not in TERMINAL]
        for m in self.models:
            if m.row.status == "queued":
                m.row.status, m.row.note = "not run", "sweep interrupted before submission"
        if not active:
            return []
        self.say(f"\ninterrupted: stopping {len(active)} running job(s): {', '.join(m.job_id for m in active)}")
        for m in active:
            self.client.stop_job(m.job_id)
        deadline = time.monotonic() + STOP_WAIT_S
        while active and time.monotonic() < deadline:
            for m in list(active):
                m.row.status = self.client.get_job_status(m.job_id).value
                if m.row.status in TERMINAL:
                    self.finish(m)
                    active.remove(m)
            if active:
                time.sleep(1)
        for m in active:  # still stopping: say so rather than wait forever
            m.row.note = f"stop requested; check with: ray job status {m.job_id}"
        return active

    def record(self, started: str, exit_code: int) -> list[str]:
        """One JSON record of this sweep per results root it wrote to."""
        by_root: dict[str, list[_Model]] = {}
        for m in self.models:
            by_root.setdefault(m.root.uri, []).append(m)
        uris = []
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for models in by_root.values():
            rec = {"sweep": self.sweep.spec.name, "file": str(self.sweep.path), "address": self.client.address,
                   "stages": list(self.stages), "started_at": started, "ended_at": _now(), "exit_code": exit_code,
                   "models": [{"model": m.name, "status": m.row.status, "job_id": m.job_id, "job_hash": m.job.job_hash,
                               "spec": str(m.job.spec_path), "note": m.row.note, "seconds": m.seconds,
                               "log": m.log_uri} for m in models]}
            root = models[0].root
            uris.append(write_text(root, posixpath.join(".sweeps", self.sweep.spec.name, f"{stamp}.json"),
                                   json.dumps(rec, indent=2)))
        return uris


# ------------------------------------------------------------------------------------ entry
def _dry_run(sweep: Sweep, models: list[_Model], out: TextIO) -> int:
    for m in models:
        if not m.decision.skip:
            m.row.status, m.row.note = "would run", m.decision.reason
    print(render([m.row for m in models], sweep.spec.stages), file=out)
    print(f"\ncluster: {sweep.address or '(none: set RAY_ADDRESS or --address)'}", file=out)
    print(f"runtime_env: {json.dumps(sweep.runtime_env)}", file=out)
    for m in models:
        if not m.decision.skip:
            print(f"{m.name}: {m.job.entrypoint}", file=out)
    print("dry run: nothing submitted (a job an earlier sweep left running is not looked up)", file=out)
    return 0


def run_sweep(sweep_path: str, *, address: str | None = None, max_concurrent: int | None = None,
              overrides: list[str] | tuple[str, ...] = (), dry_run: bool = False, out: TextIO | None = None,
              poll_seconds: float | None = None) -> int:
    """Run a sweep; the exit code is 0 when every model succeeded or was skipped, 1 when any
    failed or was stopped, 130 after Ctrl-C. Spec and cluster-access errors raise (exit 2 in the CLI)."""
    out = out or sys.stdout
    started = _now()
    sweep = load_sweep(sweep_path, address=address, max_concurrent=max_concurrent, overrides=overrides)
    models = _plan(sweep, dry_run)
    if dry_run:
        return _dry_run(sweep, models, out)
    for root in {m.root.uri: m.root for m in models}.values():
        root.check_writable()  # logs and the sweep record go there: fail before submitting anything
    client = _Client(sweep.address)
    run = _Run(sweep, models, client, out, poll_seconds or sweep.spec.poll_seconds)
    run.say(f"sweep {sweep.spec.name}: {len(models)} model(s), stages {','.join(sweep.spec.stages)}, "
            f"at most {sweep.spec.max_concurrent} at once, cluster {client.address}")
    still_running: list[_Model] = []
    try:
        run.loop()
        exit_code = 0 if all(m.row.status in OK for m in models) else 1
    except KeyboardInterrupt:
        still_running = run.stop_active()
        exit_code = EXIT_INTERRUPTED
    run.show()
    for uri in run.record(started, exit_code):
        run.say(f"sweep record: {uri}")
    for m in models:
        if m.log_uri:
            run.say(f"{m.name}: {m.row.status}, log {m.log_uri}")
    if still_running:
        run.say("still stopping: " + ", ".join(m.job_id for m in still_running))
    bad = [m.name for m in models if m.row.status not in OK]
    run.say(f"sweep {sweep.spec.name}: " + ("all models complete" if not bad else f"not complete: {', '.join(bad)}"))
    return exit_code

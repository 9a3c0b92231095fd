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
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from scope_ray.config import placeholders
from scope_ray.shiplist import with_secret_excludes
from scope_ray.storage import COMMIT_ENV, ResultsRoot, git_commit
from scope_ray.sweep.plan import (LOGS_DIR, Decision, clean_log, completed_state, decide, manifest_hashes, read_state,
                                  stage_dirs, write_state, write_text)
from scope_ray.sweep.spec import Sweep, SweepJob, SweepSpecError, load_sweep
from scope_ray.sweep.table import Row, render

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # Ray's final job statuses
# Sweep statuses beyond Ray's, both failures of the model (exit code 1):
INCOMPLETE = "INCOMPLETE"  # the job exited 0 but some requested stage left no manifest
LOST = "LOST"  # the cluster could not tell the sweep about this model's job, even after retries
OK = ("SUCCEEDED", "skipped")
EXIT_INTERRUPTED = 130
# How long a Ctrl-C waits for the stopped jobs to end before it saves their logs anyway.
STOP_WAIT_S = 30.0
# Pauses between attempts of a Jobs API read that failed on a transient error (network, HTTP 5xx):
# about half a minute of dashboard trouble (a dropped connection, a busy head) is ridden out
# before the model is given up as LOST.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)


class ClusterAccessError(RuntimeError):
    """The Ray cluster cannot be used: no address, unreachable, or token authentication failed.
    Raised only before anything is submitted (exit code 2)."""


class JobsApiError(Exception):
    """A Jobs API call that failed for good: an error not worth retrying (authentication, HTTP 4xx),
    or a transient one still there after every retry. ``not_found``: Ray does not know the job."""

    def __init__(self, message: str, *, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


# ------------------------------------------------------------------------ token authentication
def auth_token_source() -> str | None:
    """Where Ray's Jobs API client would take the authentication token from, in its own order,
    as words for a message; None when there is none. Never the token itself."""
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
                f"{auth_token_source() or 'the environment'}: it is not this cluster's token. Provide {_WHERE_TOKEN}.")
    if mode.lower() != "token":
        return (f"the Ray cluster at {address} requires token authentication, and RAY_AUTH_MODE is "
                f"{mode or 'unset'}: set RAY_AUTH_MODE=token and provide {_WHERE_TOKEN}.")
    return f"RAY_AUTH_MODE=token but no authentication token was found: provide {_WHERE_TOKEN}."


# ------------------------------------------------------------------------------ Jobs API client
def _http_status(exc: BaseException) -> int | None:
    # JobSubmissionClient turns an HTTP error answer into
    # RuntimeError("Request failed with status code N: <body>.") (dashboard_sdk._raise_error).
    found = re.search(r"status code (\d{3})", str(exc)) if isinstance(exc, RuntimeError) else None
    return int(found.group(1)) if found else None


def _is_not_found(exc: BaseException) -> bool:
    # The dashboard answers 404 "Job <id> does not exist" for a job it does not know.
    return _http_status(exc) == 404 or (isinstance(exc, RuntimeError) and "does not exist" in str(exc))


def _is_transient(exc: BaseException) -> bool:
    # requests' errors (refused or reset connection, timeout, a cut-off answer) are OSErrors, as is
    # the builtin ConnectionError; an HTTP 5xx is the dashboard failing, not the request being wrong.
    status = _http_status(exc)
    return isinstance(exc, OSError) or (status is not None and status >= 500)


class _Client:
    """JobSubmissionClient for the sweep: Ray's errors become ClusterAccessError while connecting
    (nothing submitted yet) and JobsApiError afterwards, with reads retried on transient errors."""

    def __init__(self, address: str | None):
        from ray.exceptions import AuthenticationError

        if not address:
            raise ClusterAccessError("no Ray cluster given: pass --address, set address in the sweep spec, or set "
                                     "RAY_ADDRESS to the dashboard URL (e.g. http://head-node:8265)")
        self.address = address
        try:
            self._client = _make_client(address)  # asks the dashboard for its version: a first contact
        except AuthenticationError as exc:
            raise ClusterAccessError(auth_error_message(address, str(exc))) from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise ClusterAccessError(f"cannot reach the Ray dashboard at {address}: {_first_line(exc)}") from None

    def _once(self, method: str, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return getattr(self._client, method)(*args, **kwargs)
        except AuthenticationError as exc:  # e.g. the cluster's token was changed mid-sweep: no retry helps
            raise JobsApiError(auth_error_message(self.address, str(exc))) from None

    def _read(self, method: str, *args):
        """A call that is safe to repeat, retried with growing pauses while the error is transient."""
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
            try:
                return self._once(method, *args)
            except (OSError, RuntimeError, ValueError) as exc:
                if _is_not_found(exc):
                    raise JobsApiError(_first_line(exc), not_found=True) from None
                if delay is None or not _is_transient(exc):
                    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise JobsApiError(f"{method} failed{tries}: {_first_line(exc)}") from None
                time.sleep(delay)

    def status(self, job_id: str) -> str:
        return self._read("get_job_status", job_id).value

    def info(self, job_id: str):
        return self._read("get_job_info", job_id)

    def logs(self, job_id: str) -> str:
        return self._read("get_job_logs", job_id)

    def stop(self, job_id: str) -> None:
        self._read("stop_job", job_id)  # stopping twice is harmless: retried like a read

    def submit(self, **kwargs) -> str:
        """One attempt: a repeated submission could not tell whether the first one went through
        (the caller asks Ray for the submission id instead)."""
        try:
            return self._once("submit_job", **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            raise JobsApiError(_first_line(exc)) from None


def shipped_runtime_env(sweep: Sweep) -> dict:
    """The runtime_env each job is submitted with: the sweep's, with the secret-file patterns
    (scope_ray/shiplist.py) added to its excludes whenever it uploads a working dir or modules,
    so a ``.env`` or key file beside the job specs never reaches the cluster."""
    env = with_secret_excludes(sweep.runtime_env)
    # The uploaded working dir has no .git: the jobs' manifests name the commit through this.
    commit = git_commit(sweep.runtime_env.get("working_dir") or None) if sweep.runtime_env.get("working_dir") \
        else git_commit()
    if commit and COMMIT_ENV not in (env.get("env_vars") or {}):
        env = {**env, "env_vars": {**(env.get("env_vars") or {}), COMMIT_ENV: commit}}
    return env


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


def placeholder_summary(left: dict[str, list[str]]) -> str:
    """The keys still PLACEHOLDER, one line per group: those every job shares first, then each
    job's own (a shipped sweep leaves the same data paths open in every job)."""
    jobs = [m for m, keys in left.items() if keys]
    common = [k for k in left[jobs[0]] if all(k in left[m] for m in jobs)] if jobs else []
    lines = [f"  every job ({len(jobs)}): {', '.join(common)}"] if len(jobs) > 1 and common else []
    for m in jobs:
        own = [k for k in left[m] if k not in common or len(jobs) == 1]
        if own:
            lines.append(f"  {m}: {', '.join(own)}")
    return "\n".join(lines)


def _plan(sweep: Sweep, dry_run: bool, read_roots: bool = True) -> list[_Model]:
    """Decide per model: skip or run (reads each model's manifests and sweep state; not when
    ``read_roots`` is false: a PLACEHOLDER root names nothing to read)."""
    roots: dict[tuple[str, str | None], ResultsRoot] = {}
    models = []
    for job in sweep.jobs:
        key = (job.config.storage.root, job.config.storage.endpoint_url)
        root = roots.setdefault(key, ResultsRoot(*key))
        has_text = job.config.model.spec.has_text_tower
        m = _Model(job=job, root=root, row=Row(job.model),
                   dirs_of={s: stage_dirs(s, has_text) for s in sweep.spec.stages})
        if not read_roots:
            m.decision = Decision(False, "spec not complete (PLACEHOLDER values)")
            models.append(m)
            continue
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
        self.tracking: list[_Model] = []  # models whose job this sweep polls (and stops on Ctrl-C)
        self._last_table = ""

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def show(self) -> None:
        """Reprint the table when something in it changed (not on every poll)."""
        table = render([m.row for m in self.models], self.stages)
        if table != self._last_table:
            self._last_table = table
            self.say(f"[{time.strftime('%H:%M:%S')}]\n{table}")

    def lose(self, m: _Model, job_id: str, exc: JobsApiError) -> None:
        """The cluster cannot tell us about this model's job: the model fails (exit code 1), the
        others go on. The job may still run; its id is in the model's sweep state, so a re-run
        finds it and tracks it."""
        if m in self.tracking:
            self.tracking.remove(m)
        m.row.status, m.row.job_id = LOST, job_id
        m.row.note = f"lost track of the job ({exc}); it may still run: ray job status {job_id}"

    # --- a job from an earlier sweep that is still running -----------------------------------
    def adopt_running(self, m: _Model) -> bool:
        """True when the model must not be submitted: an earlier sweep's job for it is still live
        (tracked from now on), or it cannot be told whether it is. Two jobs would write the same
        stage directories, so an unanswered question never means "submit"."""
        last = (m.state or {}).get("last_job") or {}
        if not last.get("id"):
            return False
        try:
            status = self.client.status(last["id"])
        except JobsApiError as exc:
            if exc.not_found:
                return False  # unknown to this cluster (restarted, another cluster, never submitted)
            self.lose(m, last["id"], exc)
            m.row.note = (f"cannot tell whether job {last['id']} from an earlier sweep still runs ({exc}); "
                          "not submitting a second one beside it: re-run when the cluster answers")
            return True
        if status in TERMINAL:
            return False
        if last.get("job_hash") == m.job.job_hash and set(self.stages) <= set(last.get("stages", ())):
            m.job_id, m.attached, m.row.status = last["id"], True, status
            m.row.job_id, m.row.note = last["id"], "(started by an earlier sweep; tracking it)"
            self.tracking.append(m)
        else:
            m.row.status = "FAILED"
            m.row.note = (f"job {last['id']} from an earlier sweep still runs this model with another config or "
                          f"stages: wait for it or stop it (ray job stop {last['id']})")
        return True

    def submit(self, m: _Model) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        sid = f"{self.sweep.spec.name}-{m.name}-{stamp}-{secrets.token_hex(2)}"
        # The state names the job BEFORE it is submitted: a sweep that dies right after submitting
        # leaves a job the next sweep finds by this id and tracks; one that dies before leaves an
        # id Ray does not know, which the next sweep reads as "nothing running".
        state = {**(m.state or {}), "last_job": {"id": sid, "job_hash": m.job.job_hash, "stages": list(self.stages),
                                                 "submitted_at": _now(), "address": self.client.address}}
        try:
            write_state(m.root, m.name, state)
        except Exception as exc:  # noqa: BLE001 - any storage error: a job the sweep cannot record must not start
            m.row.status, m.row.note = "FAILED", f"not submitted: cannot write its sweep state ({_first_line(exc)})"
            return
        m.state = state
        # Tracked from before the request on, so a Ctrl-C during it still stops the job.
        m.job_id = sid
        self.tracking.append(m)
        res = self.sweep.spec.entrypoint_resources
        try:
            self.client.submit(
                entrypoint=m.job.entrypoint, submission_id=sid, runtime_env=shipped_runtime_env(self.sweep) or None,
                metadata={"scope_ray_sweep": self.sweep.spec.name, "model": m.name, "job_hash": m.job.job_hash},
                entrypoint_num_cpus=res.num_cpus or None, entrypoint_num_gpus=res.num_gpus or None)
        except JobsApiError as exc:
            # The request may have reached Ray before the error (an answer lost on the way back):
            # only Ray can say whether the job exists.
            try:
                self.client.status(sid)
            except JobsApiError as check:
                if not check.not_found:
                    self.lose(m, sid, check)
                    return
                # A rejected submission (runtime_env upload, bad entrypoint resources...) fails
                # this model only; the others still run.
                self.tracking.remove(m)
                m.job_id = None
                m.row.status, m.row.note = "FAILED", f"submission failed: {exc}"
                return
        m.row.status, m.row.job_id = "PENDING", sid

    def finish(self, m: _Model) -> None:
        """A job ended: save its log, and on success record what it completed."""
        self.tracking.remove(m)
        message = ""
        try:
            info = self.client.info(m.job_id)
            message = info.message or ""
            if info.start_time and info.end_time:
                m.seconds = round((info.end_time - info.start_time) / 1000, 1)
        except JobsApiError:
            pass  # only the duration and Ray's message are missing
        try:
            logs = clean_log(self.client.logs(m.job_id))
            m.log_uri = write_text(m.root, posixpath.join(m.name, LOGS_DIR, f"{m.job_id}.log"), logs)
        except Exception as exc:  # noqa: BLE001 - a log that cannot be saved must not lose the sweep
            m.row.note = f"log not saved: {_first_line(exc)}"
        try:
            current = m.refresh_stages()
        except Exception as exc:  # noqa: BLE001 - unreadable manifests: nothing can be recorded as complete
            if m.row.status == "SUCCEEDED":
                m.row.status = INCOMPLETE
            m.row.note = f"its manifests could not be read ({_first_line(exc)}); a re-run checks them again"
            return
        if m.row.status == "SUCCEEDED":
            # Only stages whose every manifest is there count as complete: a job that exits 0
            # without committing a stage (an entrypoint that is not `run`) has not done it, so
            # the model is not complete and the sweep fails (exit code 1).
            done = tuple(s for s in self.stages if all(current[d] is not None for d in m.dirs_of[s]))
            missing = [s for s in self.stages if s not in done]
            if missing:
                m.row.status = INCOMPLETE
                m.row.note = f"job exited 0 but left no manifest for {', '.join(missing)}"
            m.state = completed_state(m.state, job_id=m.job_id, job_hash=m.job.job_hash, stages=done,
                                      manifests={d: current[d] for s in done for d in m.dirs_of[s]}, when=_now())
            write_state(m.root, m.name, m.state)
        elif not m.row.note and message:
            m.row.note = message.splitlines()[0][:120]
        if m.log_uri:
            m.extra["log"] = m.log_uri

    def poll_tracked(self) -> None:
        for m in list(self.tracking):
            try:
                m.row.status = self.client.status(m.job_id)
            except JobsApiError as exc:
                self.lose(m, m.job_id, exc)
                continue
            if m.row.status in TERMINAL:
                self.finish(m)
                continue
            try:
                m.refresh_stages()
            except Exception:  # noqa: BLE001 - a storage hiccup only delays the live table's stage cells
                pass

    def loop(self) -> None:
        queued = [m for m in self.models if not m.decision.skip and not self.adopt_running(m)]
        self.show()
        while queued or self.tracking:
            while queued and len(self.tracking) < self.sweep.spec.max_concurrent:
                self.submit(queued.pop(0))
            self.poll_tracked()
            self.show()
            if queued or self.tracking:
                time.sleep(self.poll)

    def stop_active(self) -> list[_Model]:
        """Ctrl-C: ask Ray to stop every job this sweep is tracking, wait for them, keep their logs."""
        for m in self.models:
            if m.row.status == "queued":
                m.row.status, m.row.note = "not run", "sweep interrupted before submission"
        if not self.tracking:
            return []
        self.say(f"\ninterrupted: stopping {len(self.tracking)} running job(s): "
                 f"{', '.join(m.job_id for m in self.tracking)}")
        for m in list(self.tracking):
            try:
                self.client.stop(m.job_id)
            except JobsApiError as exc:
                if exc.not_found:  # interrupted before its submission reached Ray
                    self.tracking.remove(m)
                    m.job_id, m.row.status, m.row.note = None, "not run", "sweep interrupted before submission"
                else:
                    self.lose(m, m.job_id, exc)
        deadline = time.monotonic() + STOP_WAIT_S
        while self.tracking and time.monotonic() < deadline:
            self.poll_tracked()
            if self.tracking:
                time.sleep(1)
        for m in self.tracking:  # still stopping: say so rather than wait forever
            m.row.note = f"stop requested; check with: ray job status {m.job_id}"
        return list(self.tracking)

    def record(self, started: str, exit_code: int) -> list[str]:
        """One JSON record of this sweep per results root it wrote to."""
        by_root: dict[str, list[_Model]] = {}
        for m in self.models:
            by_root.setdefault(m.root.uri, []).append(m)
        uris = []
        # Microseconds: two sweeps ending in the same second keep a record each; names sort by time.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        for models in by_root.values():
            rec = {"sweep": self.sweep.spec.name, "file": str(self.sweep.path), "address": self.client.address,
                   "stages": list(self.stages), "started_at": started, "ended_at": _now(), "exit_code": exit_code,
                   "models": [{"model": m.name, "status": m.row.status, "job_id": m.job_id or m.row.job_id or None,
                               "job_hash": m.job.job_hash, "spec": str(m.job.spec_path), "note": m.row.note,
                               "seconds": m.seconds, "log": m.log_uri} for m in models]}
            root = models[0].root
            uris.append(write_text(root, posixpath.join(".sweeps", self.sweep.spec.name, f"{stamp}.json"),
                                   json.dumps(rec, indent=2)))
        return uris

    def conclude(self, started: str, exit_code: int, still_running: list[_Model]) -> None:
        """The closing table, the sweep record and the summary, however the sweep ended."""
        self.show()
        try:
            for uri in self.record(started, exit_code):
                self.say(f"sweep record: {uri}")
        except Exception as exc:  # noqa: BLE001 - the summary below still tells what happened
            self.say(f"sweep record not written: {_first_line(exc)}")
        for m in self.models:
            if m.log_uri:
                self.say(f"{m.name}: {m.row.status}, log {m.log_uri}")
        if still_running:
            self.say("still stopping: " + ", ".join(m.job_id for m in still_running))
        bad = [m for m in self.models if m.row.status not in OK]
        name = self.sweep.spec.name
        if not bad:
            self.say(f"sweep {name}: all models complete")
            return
        self.say(f"sweep {name}: not complete: {', '.join(m.name for m in bad)}")
        for m in bad:
            self.say(f"  {m.name}: {m.row.status}" + (f": {m.row.note}" if m.row.note else ""))


# ------------------------------------------------------------------------------------ entry
def _dry_run(sweep: Sweep, models: list[_Model], out: TextIO) -> int:
    """The plan: the status table, the cluster, what is shipped, and each job's command."""
    for m in models:
        if not m.decision.skip:
            m.row.status, m.row.note = "would run", m.decision.reason
    print(render([m.row for m in models], sweep.spec.stages), file=out)
    print(f"\ncluster: {sweep.address or '(none: set RAY_ADDRESS or --address)'}", file=out)
    print(f"runtime_env: {json.dumps(shipped_runtime_env(sweep))}", file=out)
    for m in models:
        if not m.decision.skip:
            print(f"{m.name}: {m.job.entrypoint}", file=out)
    print("dry run: nothing submitted (a job an earlier sweep left running is not looked up)", file=out)
    return 0


def run_sweep(sweep_path: str, *, address: str | None = None, max_concurrent: int | None = None,
              overrides: list[str] | tuple[str, ...] = (), dry_run: bool = False, out: TextIO | None = None,
              poll_seconds: float | None = None) -> int:
    """Run a sweep; the exit code is 0 when every model succeeded or was skipped, 1 when any
    failed, was stopped, left a stage without its manifest or was lost track of, 130 after
    Ctrl-C. Spec and cluster-access errors raise before anything is submitted (exit 2 in the CLI)."""
    out = out or sys.stdout
    started = _now()
    sweep = load_sweep(sweep_path, address=address, max_concurrent=max_concurrent, overrides=overrides)
    # The shipped specs carry PLACEHOLDER paths: each job would fail at once on the cluster.
    left = {job.model: placeholders(job.config) for job in sweep.jobs}
    refusal = None
    if any(left.values()):
        refusal = SweepSpecError(f"{sweep.path}: PLACEHOLDER values left; point them at your data and results root "
                                 "(edit the job specs, the sweep's overrides, or --set KEY=VALUE); nothing submitted\n"
                                 + placeholder_summary(left))
        if not dry_run:
            raise refusal
    models = _plan(sweep, dry_run, read_roots=refusal is None)
    if dry_run:
        _dry_run(sweep, models, out)
        if refusal is not None:
            raise refusal  # the plan is shown; what must be set first is the error
        return 0
    for root in {m.root.uri: m.root for m in models}.values():
        root.check_writable()  # logs and the sweep record go there: fail before submitting anything
    client = _Client(sweep.address)
    run = _Run(sweep, models, client, out, poll_seconds or sweep.spec.poll_seconds)
    run.say(f"sweep {sweep.spec.name}: {len(models)} model(s), stages {','.join(sweep.spec.stages)}, "
            f"at most {sweep.spec.max_concurrent} at once, cluster {client.address}")
    still_running: list[_Model] = []
    exit_code = 1  # what the record says if an unexpected error ends the sweep (it is raised after)
    try:
        try:
            run.loop()
            exit_code = 0 if all(m.row.status in OK for m in models) else 1
        except KeyboardInterrupt:
            still_running = run.stop_active()
            exit_code = EXIT_INTERRUPTED
    finally:
        run.conclude(started, exit_code, still_running)
    return exit_code

"""Which models a sweep must run and which it can skip: the stage -> directory map, the per-model
sweep state on the results root, and the skip rule. No Ray here.

The skip rule (docs/sweep.md, "How skipping works"): a model is skipped only when the sweep
state under ``ROOT/<model>/logs/sweep-state.json`` says a job with the **same job hash**
(``spec.job_hash``: the whole resolved config but ``name`` and ``ray``) succeeded for a superset
of the requested stages, **and** every manifest those stages wrote is still on storage with the
config hash it had then. A changed config changes the job hash; a stage redone by hand with
other settings, or deleted, changes or removes its manifest: either way the model runs again
(and inside the job every stage still skips itself when its own manifest matches).
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from dataclasses import dataclass

from scope_ray.pipeline import BY_NAME
from scope_ray.storage import LOGS_DIR, ResultsRoot

STATE_FILE = "sweep-state.json"


def stage_dirs(stage: str, has_text_tower: bool) -> tuple[str, ...]:
    """The result directories (ROOT/<model>/<dir>/manifest.json) CLI stage ``stage`` commits, as
    the pipeline declares them; zero-shot needs a text tower and, for other models, succeeds
    without writing anything."""
    declared = BY_NAME[stage]
    if declared.needs_text_tower and not has_text_tower:
        return ()
    return declared.dirs


def manifest_hashes(root: ResultsRoot, model: str, dirs: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """Config hash of each directory's manifest; None where there is none (not run, or interrupted)."""
    out: dict[str, str | None] = {}
    for d in dirs:
        m = root.stage(model, d).manifest()
        out[d] = None if m is None else str(m.get("config_hash"))
    return out


def read_state(root: ResultsRoot, model: str) -> dict | None:
    path = posixpath.join(root.path, model, LOGS_DIR, STATE_FILE)
    try:
        with root.fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged state skips nothing: the model runs again


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")


def clean_log(text: str) -> str:
    """A job's console output as a file should hold it: no colour or cursor codes (Ray's worker
    prefixes, tqdm), and of a progress bar redrawn with carriage returns only its last state."""
    text = _ANSI.sub("", text)
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p.strip()]
            line = parts[-1] if parts else ""
        lines.append(line)
    return "\n".join(lines)


def write_text(root: ResultsRoot, relpath: str, text: str) -> str:
    """Write a small text file under the root (atomic rename locally, one PUT on S3); return its URI.

    Readers see the old text or the new, never a part. The temporary name is unique, so two
    sweeps writing the same file at once do not write into each other's temporary file; the
    last rename wins."""
    path = posixpath.join(root.path, relpath)
    root.ensure_dir(posixpath.dirname(path))
    if root.scheme == "file":
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        root.fs.pipe_file(tmp, text.encode())
        root.fs.mv(tmp, path)
    else:
        root.fs.pipe_file(path, text.encode())
    return posixpath.join(root.uri, relpath)


def write_state(root: ResultsRoot, model: str, state: dict) -> str:
    return write_text(root, posixpath.join(model, LOGS_DIR, STATE_FILE), json.dumps(state, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Decision:
    skip: bool
    reason: str


def decide(state: dict | None, job_hash: str, stages: tuple[str, ...], current: dict[str, str | None],
           dirs_of: dict[str, tuple[str, ...]]) -> Decision:
    """Skip or run, from the model's sweep state and the manifests on storage now.

    ``current``: manifest config hash per directory now (None = absent); ``dirs_of``: the
    directories each requested stage writes."""
    done = (state or {}).get("complete")
    if not done:
        return Decision(False, "no completed sweep job on record")
    if done.get("job_hash") != job_hash:
        return Decision(False, f"config changed since the last completed job (job hash {done.get('job_hash')} -> {job_hash})")
    missing = [s for s in stages if s not in done.get("stages", ())]
    if missing:
        return Decision(False, f"stage(s) {', '.join(missing)} not yet run with this config")
    recorded = done.get("manifests", {})
    for stage in stages:
        for d in dirs_of[stage]:
            if current.get(d) is None or current.get(d) != recorded.get(d):
                what = "removed or interrupted" if current.get(d) is None else "redone with another config"
                return Decision(False, f"{d} was {what} since job {done.get('job_id')}")
    return Decision(True, f"all requested stages complete with this config (job {done.get('job_id')})")


def completed_state(state: dict | None, *, job_id: str, job_hash: str, stages: tuple[str, ...],
                    manifests: dict[str, str | None], when: str) -> dict:
    """The state after job ``job_id`` succeeded: stages completed earlier under the same job hash
    are kept (a sweep of extract, then one of train-sae, add up); another hash starts over."""
    state = dict(state or {})
    prev = state.get("complete") or {}
    if prev.get("job_hash") == job_hash:
        all_stages = [s for s in dict.fromkeys([*prev.get("stages", ()), *stages])]
        all_manifests = {**prev.get("manifests", {}), **manifests}
    else:
        all_stages, all_manifests = list(stages), dict(manifests)
    state["complete"] = {"job_hash": job_hash, "job_id": job_id, "stages": all_stages,
                         "manifests": all_manifests, "completed_at": when}
    return state

"""The sweep spec: which job specs to run as Ray jobs, with what overrides, stages and runtime env.

A sweep is a YAML file (``jobs/sweeps/*.yaml``). It is validated like a job spec (pydantic,
unknown keys refused, errors that name the key), and then every job spec it lists is loaded
with the sweep's overrides and validated too, so a bad spec fails the sweep before anything is
submitted. The result is a ``Sweep``: one ``SweepJob`` per model, each with the exact
``scope-ray run`` command line its Ray job will run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scope_ray.cli import STAGES
from scope_ray.config import ConfigError, JobConfig, load_config, parse_override, read_yaml_mapping
from scope_ray.storage import canonical_uri


class SweepSpecError(ConfigError):
    """A sweep spec (or one of its job specs) that cannot run; nothing was submitted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Names that look like credentials. runtime_env is stored in Ray's job table and shown on the
# dashboard to anyone who can reach it, so a secret there leaks; clusters get credentials from
# their own environment (instance role, Kubernetes secret), never from the sweep.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY", re.IGNORECASE)


class RuntimeEnvSpec(_Strict):
    """The part of Ray's runtime_env a sweep may set (passed to every job as is)."""

    working_dir: str | None = Field(
        None, description="directory uploaded as each job's working directory, relative to the sweep file; "
        "job specs must lie inside it (the job reads them there). null = the cluster shares this filesystem")
    excludes: tuple[str, ...] = Field((), description="gitignore-style patterns left out of the upload "
                                      "(Ray already skips what .gitignore lists)")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of each job; never secrets")
    pip: tuple[str, ...] | None = Field(None, description="extra pip requirements installed for the jobs")
    py_modules: tuple[str, ...] | None = Field(None, description="local modules / wheels shipped with the jobs")

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in v if _SECRET_NAME.search(k))
        if bad:
            raise ValueError(
                f"{', '.join(bad)} looks like a credential; runtime_env is stored by Ray and shown on its dashboard, so "
                "never put secrets in a sweep spec: give the cluster its credentials through its own environment "
                "(instance / pod role, secret store)")
        return v


class EntrypointResources(_Strict):
    """What each job's driver process reserves on the cluster. Leave it empty (the default):

    Ray 2.60 runs a job's driver on the head node only when the job asks for NO entrypoint
    resources (ray/dashboard/modules/job/job_manager.py, ``JobManager._get_label_selector``,
    called from ``JobManager.submit_job`` with ``resources_specified``); any amount here lets
    Ray place the driver on whichever node has it free. The shipped cluster configs give the
    head 0 CPUs, so ``num_cpus: 1`` would put each driver on a GPU worker and take a CPU the
    stages' actors need. The stages' actors reserve their own resources either way."""

    num_cpus: float = Field(0, ge=0, description="CPUs reserved for the driver; > 0 moves it off the head node")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved for the driver; the pipeline's driver needs none")


class SweepSpec(_Strict):
    name: str = Field(description="sweep name: in the table, job metadata and the sweep record")
    jobs: tuple[str, ...] = Field(min_length=1, description="job spec paths, relative to the sweep file")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted key -> value applied to every job (like --set), e.g. storage.root")
    stages: tuple[str, ...] = Field(STAGES, description="stages each job runs (in pipeline order); default: all")
    max_concurrent: int = Field(2, ge=1, description="Ray jobs running at once")
    address: str | None = Field(None, description="Ray dashboard URL, e.g. http://head:8265; null = RAY_ADDRESS")
    runtime_env: RuntimeEnvSpec = RuntimeEnvSpec()
    entrypoint: str = Field(
        "python jobs/entrypoint.py", description="command each job runs; the sweep appends "
        "'JOB.yaml --stages ... --set ...'. Relative paths are relative to runtime_env.working_dir")
    entrypoint_resources: EntrypointResources = Field(
        EntrypointResources(), description="resources each job's driver reserves; default none, which keeps the "
        "driver on the head node (any resource here lets Ray place it on a worker)")
    poll_seconds: float = Field(2.0, gt=0, description="seconds between status polls")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names files and Ray submission ids)")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in v if s not in STAGES]
        if unknown or not v:
            raise ValueError(f"unknown stage(s) {unknown or list(v)}; allowed: {', '.join(STAGES)}")
        return tuple(s for s in STAGES if s in v)  # pipeline order, whatever order the file lists

    @field_validator("overrides")
    @classmethod
    def _keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not k or any(not p for p in str(k).split("."))]
        if bad:
            raise ValueError(f"empty key in {bad}; keys are dotted job-config keys, e.g. storage.root")
        return v


@dataclass(frozen=True)
class SweepJob:
    """One model of the sweep: its validated config and the Ray job that runs it."""

    spec_path: Path            # absolute, on this machine
    config: JobConfig          # the job exactly as the Ray job will resolve it
    overrides: tuple[str, ...]  # the --set items the job gets (sweep overrides, then the command line's)
    job_hash: str              # identity of the results this job produces (see job_hash)
    entrypoint: str            # shell command the Ray job runs

    @property
    def model(self) -> str:
        return self.config.model.name


@dataclass(frozen=True)
class Sweep:
    path: Path
    spec: SweepSpec
    jobs: tuple[SweepJob, ...]
    runtime_env: dict[str, Any]   # as submitted to Ray (working_dir absolute)
    address: str | None


def job_hash(job: JobConfig) -> str:
    """Identity of what a job computes: every config key except ``name`` and the ``ray`` section
    (they steer where and how it runs, not its results). Same hash = same results; a sweep
    never skips a model whose hash differs from the one its completed results were made with."""
    dumped = job.model_dump(mode="json")
    dumped.pop("ray")
    dumped.pop("name")
    dumped["model"]["layer"] = job.model.resolved_layer  # registry default written out = the same job
    dumped["model"]["tau"] = job.model.resolved_tau
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = SweepSpec
            for part in e["loc"][:-1]:
                ann = parent.model_fields[part].annotation
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
            lines.append(f"{key}: unknown key; allowed keys here: {', '.join(parent.model_fields)}")
        else:
            got = e.get("input")
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}"
                         + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "\n  ".join(lines)


def _as_set(key: str, value: Any) -> str:
    # JSON is YAML, and parse_override reads the value back as YAML: lists, numbers and nulls
    # survive the trip through the command line unchanged.
    return f"{key}={value if isinstance(value, str) and not _needs_quoting(value) else json.dumps(value)}"


def _needs_quoting(text: str) -> bool:
    # A plain string that YAML would read as something else (a number, a bool, null, a list...).
    try:
        return yaml.safe_load(text) != text
    except yaml.YAMLError:
        return True


def _share_override(config: JobConfig, max_concurrent: int, given: dict[str, str]) -> list[str]:
    """``ray.cluster_share=1/max_concurrent`` for a job that runs beside others, unless the sweep or
    the command line set the share, or the job's own spec asks for a smaller one. Why: each job
    sizes its actor pools to its share, so the concurrent jobs' actors never hold every CPU between
    them and starve each other's read tasks (scope_ray.stages.cluster.actor_resources)."""
    share = 1.0 / max_concurrent
    if "ray.cluster_share" in given or max_concurrent <= 1 or config.ray.cluster_share <= share:
        return []
    return [f"ray.cluster_share={share:.6g}"]


def load_sweep(path: str | Path, *, address: str | None = None, max_concurrent: int | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Load and validate a sweep and every job spec it names (with all overrides applied)."""
    path = Path(path).absolute()
    raw = read_yaml_mapping(path, "sweep", SweepSpecError)
    if max_concurrent is not None:
        raw["max_concurrent"] = max_concurrent
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SweepSpecError(f"invalid sweep spec {path}:\n  {_format(exc)}") from None

    base = path.parent
    working_dir = (base / spec.runtime_env.working_dir).resolve() if spec.runtime_env.working_dir else None
    if working_dir is not None and not working_dir.is_dir():
        raise SweepSpecError(f"{path}: runtime_env.working_dir {spec.runtime_env.working_dir!r} is not a directory "
                             f"(resolved: {working_dir})")
    # The sweep's overrides, then the command line's; a key given twice keeps the last value once.
    merged: dict[str, str] = {k: _as_set(k, v) for k, v in spec.overrides.items()}
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        merged.pop(key, None)
        merged[key] = item
    items = list(merged.values())

    jobs, errors, seen = [], [], {}
    for entry in spec.jobs:
        spec_path = (base / entry).resolve()
        try:
            config = load_config(spec_path, items)
        except ConfigError as exc:
            errors.append(f"{entry}: {exc}")
            continue
        if working_dir is not None:
            try:
                spec_arg = str(spec_path.relative_to(working_dir))
            except ValueError:
                errors.append(f"{entry}: lies outside runtime_env.working_dir ({working_dir}), so the job could not "
                              "read it on the cluster; move it inside, or drop working_dir on a shared filesystem")
                continue
        else:
            spec_arg = str(spec_path)
        # "/r", "/r/" and "s3://b//r" name one root: compare the canonical spelling.
        where = (canonical_uri(config.storage.root), config.model.name)
        if where in seen:
            errors.append(f"{entry}: model {config.model.name} with results root {config.storage.root} is also "
                          f"{seen[where]}'s: two jobs would write the same stage directories")
            continue
        seen[where] = entry
        share = _share_override(config, min(spec.max_concurrent, len(spec.jobs)), merged)
        job_items = items + share
        if share:
            config = load_config(spec_path, job_items)  # what the job will resolve on the cluster
        command = " ".join([spec.entrypoint, shlex.quote(spec_arg), "--stages", ",".join(spec.stages),
                            *(f"--set {shlex.quote(o)}" for o in job_items)])
        jobs.append(SweepJob(spec_path=spec_path, config=config, overrides=tuple(job_items),
                             job_hash=job_hash(config), entrypoint=command))
    if errors:
        raise SweepSpecError(f"sweep {path}: {len(errors)} of {len(spec.jobs)} job spec(s) cannot run; nothing was "
                             "submitted:\n  " + "\n  ".join(e.replace("\n", "\n    ") for e in errors))

    env = spec.runtime_env.model_dump(exclude_none=True)
    env = {k: v for k, v in env.items() if v not in ((), {}, [])}
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    if "py_modules" in env:  # local paths are relative to the sweep file, like working_dir
        env["py_modules"] = [m if "://" in m else str((base / m).resolve()) for m in env["py_modules"]]
    for key in ("excludes", "pip", "py_modules"):
        if key in env:
            env[key] = list(env[key])
    return Sweep(path=path, spec=spec, jobs=tuple(jobs), runtime_env=env,
                 address=address or spec.address or os.environ.get("RAY_ADDRESS") or None)

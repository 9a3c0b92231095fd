"""The files in cluster/ are accepted by the tools that read them, keep token auth on, and hold
no credentials. No cluster starts and nothing leaves the machine:

* cluster/aws-gpu.yaml goes through the Ray cluster launcher's own steps that need no cloud API
  (prepare_config: defaults merged, setup commands merged, per-type worker bounds; then
  validate_config against ray-schema.json), and each node_config through botocore's validator
  for EC2 RunInstances, which is what Ray's AWS provider passes it to.
* cluster/kuberay/*.yaml are validated against KubeRay v1.6.2's ray.io/v1 fields with the
  Kubernetes pod template they embed (tests/data/cluster/, made by make_kuberay_schema.py).
* cluster/runtime_env.yaml goes through Ray's RuntimeEnv.

Each validator is also shown to reject a misspelled field, so a pass means something.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
KUBERAY_SCHEMA = REPO / "tests" / "data" / "cluster" / "kuberay-v1.6.2.schema.json"

# NVIDIA GPUs per EC2 instance type (AWS's published specs) for the types the launcher may use.
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
                     "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pinned_ray_version() -> str:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins["ray"]


def renamed(doc: dict, path: tuple, old: str, new: str) -> dict:
    """A deep copy of ``doc`` with key ``old`` renamed to ``new`` in the mapping at ``path``."""
    out = copy.deepcopy(doc)
    node = out
    for step in path:
        node = node[step]
    node[new] = node.pop(old)
    return out


# --- the cluster launcher config -----------------------------------------------------------

def ray_launcher_checked(config: dict) -> dict:
    """What `ray up` does to a config before it touches the cloud; raises on an invalid one."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@cache
def _run_instances_input():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def run_instances_errors(node_config: dict) -> str:
    """botocore's report for node_config as RunInstances input ('' when valid). Ray adds the
    instance counts itself, so they are added here too."""
    from botocore.validate import ParamValidator

    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, _run_instances_input())
    return report.generate_report()


def test_launcher_config_passes_ray_validation_and_fits_the_job():
    from scope_ray.config import load_config

    prepared = ray_launcher_checked(load(LAUNCHER))
    types = prepared["available_node_types"]
    head_name = prepared["head_node_type"]
    workers = [t for name, t in types.items() if name != head_name]
    assert types[head_name]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    for t in gpu_types:
        # The advertised GPUs are the instance's real GPUs: more would strand actors, fewer waste GPUs.
        assert t["resources"]["GPU"] == GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    # The job sizes its actor pool from the GPUs present when it starts: min_workers must supply them.
    job = load_config(REPO / "jobs" / "clip-vit-b16.yaml")
    gpus_at_start = sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_types)
    assert gpus_at_start >= job.ray.num_actors
    # Setup runs on the head as well (Ray merges setup_commands into head_setup_commands).
    assert all(c in prepared["head_setup_commands"] for c in prepared["setup_commands"])


@pytest.mark.parametrize("path,old,new", [
    ((), "idle_timeout_minutes", "idle_timeout_minute"),
    (("available_node_types", "gpu_worker"), "min_workers", "min_worker"),
    (("available_node_types", "gpu_worker"), "resources", "resource"),
    (("auth",), "ssh_user", "ssh_usr"),
])
def test_launcher_validation_rejects_a_misspelled_key(path, old, new):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        ray_launcher_checked(renamed(load(LAUNCHER), path, old, new))


def test_launcher_node_configs_are_valid_run_instances_input():
    for name, node_type in load(LAUNCHER)["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name
    bad = renamed(load(LAUNCHER)["available_node_types"]["gpu_worker"]["node_config"], (), "InstanceType", "InstanceTyp")
    assert 'Unknown parameter in input: "InstanceTyp"' in run_instances_errors(bad)


def test_launcher_starts_every_node_with_token_auth_and_the_pinned_install():
    config = load(LAUNCHER)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    # The same token on every node: the launcher's own ~/.ray/auth_token is mounted where Ray reads it.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The project goes up from the working tree without the local venv, and installs with the pins.
    assert config["file_mounts"]["~/scope-ray"] == "." and ".venv" in config["rsync_exclude"]
    assert any("-c ~/scope-ray/constraints.txt ~/scope-ray" in c for c in config["setup_commands"])


# --- the KubeRay manifests -----------------------------------------------------------------

@cache
def _kuberay_schema() -> dict:
    return json.loads(KUBERAY_SCHEMA.read_text())


def kuberay_errors(manifest: dict) -> list[str]:
    """Every place ``manifest`` departs from KubeRay's CRD fields (unknown field, wrong type,
    missing required field, value outside an enum), as 'path: message'."""
    import jsonschema

    schema = _kuberay_schema()
    root = schema["x-roots"][manifest["kind"]]
    validator = jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{root}"})
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(manifest))


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_crd_fields(path):
    assert kuberay_errors(load(path)) == []


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("where,old,new,expect", [
    # a misspelled Kubernetes container field, deep inside the embedded pod template
    (("workerGroupSpecs", 0, "template", "spec", "containers", 0), "image", "imag",
     "$.{s}.workerGroupSpecs[0].template.spec.containers[0]"),
    (("workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"), "limits", "limit", "resources"),
    (("headGroupSpec", "template", "spec"), "serviceAccountName", "serviceAcountName", "headGroupSpec.template.spec"),
    # misspelled KubeRay fields
    (("workerGroupSpecs", 0), "maxReplicas", "maxReplica", "workerGroupSpecs[0]"),
    (("authOptions",), "mode", "mod", "authOptions"),
    ((), "enableInTreeAutoscaling", "enableIntreeAutoscaling", "$.{s}"),
])
@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_check_rejects_a_misspelled_field(path, where, old, new, expect):
    manifest = load(path)
    spec_path = ("spec",) if manifest["kind"] == "RayCluster" else ("spec", "rayClusterSpec")
    errors = kuberay_errors(renamed(manifest, spec_path + where, old, new))
    assert errors, "misspelling accepted"
    assert any(expect.format(s=".".join(spec_path)) in e for e in errors), errors


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_check_rejects_wrong_types_and_values(path):
    manifest = load(path)
    spec = _cluster_spec(manifest)
    spec["authOptions"]["mode"] = "tokens"                       # not in the enum
    spec["workerGroupSpecs"][0]["minReplicas"] = "1"             # a string where the CRD has an integer
    errors = kuberay_errors(manifest)
    assert any("authOptions.mode" in e for e in errors) and any("minReplicas" in e for e in errors), errors


def test_rayjob_shutdown_field_misspelling_is_rejected():
    errors = kuberay_errors(renamed(load(RAYJOB), ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"))
    assert any("shutdownAfterJobFinish" in e for e in errors), errors


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_cluster_has_token_auth_and_the_gpus_the_job_needs(path):
    from scope_ray.config import load_config

    manifest = load(path)
    spec = _cluster_spec(manifest)
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    # KubeRay gates token auth on rayVersion; it must be the image's Ray, which is the pinned one.
    assert spec["rayVersion"] == pinned_ray_version()
    assert f"FROM rayproject/ray:{pinned_ray_version()}-" in (CLUSTER / "Dockerfile").read_text()
    # The long-lived cluster autoscales (sweeps); the RayJob's cluster lives for one job at a fixed size.
    assert spec["enableInTreeAutoscaling"] is (manifest["kind"] == "RayCluster")
    job = load_config(REPO / "jobs" / "clip-vit-b16.yaml")
    gpus_at_start = 0
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus > 0
        gpus_at_start += gpus * group["minReplicas"]
    assert gpus_at_start >= job.ray.num_actors  # see the launcher test: the job sizes its pool at start


def test_rayjob_runs_the_clip_job_with_an_s3_root_and_shuts_down():
    from scope_ray.config import load_config

    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "jobs/entrypoint.py", "jobs/clip-vit-b16.yaml"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    # The overrides are ones scope-ray accepts, and they put the results on S3.
    job = load_config(REPO / argv[2], overrides)
    assert job.storage.root.startswith("s3://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is a path inside the image (RuntimeEnv would look for it here): it must be where
    # cluster/Dockerfile puts the project, so the entrypoint's relative paths resolve.
    assert f"WORKDIR {runtime_env['working_dir']}" in (CLUSTER / "Dockerfile").read_text()
    runtime_env_checked({k: v for k, v in runtime_env.items() if k != "working_dir"})
    assert runtime_env["env_vars"]["RAY_AUTH_MODE"] == "token"


# --- the runtime environment ---------------------------------------------------------------

def runtime_env_checked(env: dict) -> None:
    """Ray's RuntimeEnv type checks; a field Ray does not know would be sent to the cluster as a
    plugin name and fail there, so it is an error here."""
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - RuntimeEnv.known_fields
    if unknown:
        raise ValueError(f"unknown runtime_env fields {sorted(unknown)}")
    RuntimeEnv(**env)


def test_runtime_env_is_valid_and_keeps_token_auth():
    env = load(RUNTIME_ENV)
    runtime_env_checked(env)
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert ".venv" in env["excludes"]
    with pytest.raises(ValueError, match="working_dirr"):
        runtime_env_checked(renamed(env, (), "working_dir", "working_dirr"))
    with pytest.raises(TypeError):
        runtime_env_checked({**env, "env_vars": {"RAY_AUTH_MODE": 1}})


# --- no credentials, no auth switched off ---------------------------------------------------

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    # The shape of an AWS secret access key; a git commit id (40 lowercase hex) is not one.
    "40-character secret key": re.compile(
        r"(?<![A-Za-z0-9/+=])(?![0-9a-f]{40}(?![A-Za-z0-9/+=]))[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "Ray token (64 hex)": re.compile(r"\b[0-9a-f]{64}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "secret assigned a literal": re.compile(
        r"(?i)\b(aws_secret_access_key|aws_access_key_id|aws_session_token|ray_auth_token|password)\b"
        r"\s*[:=]\s*['\"]?(?!\$|PLACEHOLDER)[^\s'\"]{6,}"),
    "literal env value for a secret": re.compile(
        r"(?i)name:\s*(RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)\s*[,}\n]\s*value:"),
}


def credentials_in(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def cluster_files() -> list[Path]:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files + [p for p in KUBERAY_SCHEMA.parent.iterdir() if p.is_file()]


def test_no_credentials_and_no_auth_off_in_cluster_files():
    files = cluster_files()
    assert {LAUNCHER, RAYCLUSTER, RAYJOB, RUNTIME_ENV} <= set(files)
    for path in files:
        text = path.read_text()
        assert credentials_in(text) == [], path
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), path
        # Cloud-specific values are marked for the user to fill in, never someone's real ones.
        for uri in re.findall(r"s3://[^\s'\"]+", text):
            assert "PLACEHOLDER" in uri, (path, uri)


def test_credential_scan_catches_planted_credentials():
    # Built at run time so this file itself holds nothing credential-shaped.
    planted = {
        "AWS access key id": "key: AKIA" + "Q" * 16,
        "40-character secret key": "secret: " + "aB3/" * 10,
        "Ray token (64 hex)": "token: " + "0123456789abcdef" * 4,
        "private key": "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "secret assigned a literal": "AWS_SECRET_ACCESS_KEY=" + "hunter2hunter2",
        "literal env value for a secret": "- name: RAY_AUTH_TOKEN\n  value: x",
    }
    for name, text in planted.items():
        assert name in credentials_in(text), name
    assert credentials_in("AWS_SECRET_ACCESS_KEY=$FROM_THE_ENVIRONMENT  s3://PLACEHOLDER-bucket/x") == []
    assert credentials_in("commit " + "0a9eabde" * 5) == []  # a git commit id is not a secret key


# --- least-privilege IAM for the launcher's nodes -------------------------------------------

IAM_POLICIES = {"s3": CLUSTER / "iam-s3-policy.json", "head": CLUSTER / "iam-head-autoscaler-policy.json"}


def iam_problems(policy: dict) -> list[str]:
    """Every grant broader than the study needs: a wildcard in an action ("*", "s3:*",
    "s3:Get*"), a Deny-less policy's "NotAction" / "NotResource", and a resource wildcard that is
    not inside a PLACEHOLDER prefix (bucket, account, region) — except "*" for EC2 Describe
    calls, which AWS does not scope by resource."""
    problems = []
    for i, st in enumerate(policy["Statement"]):
        if st.get("Effect") != "Allow":
            continue
        if "NotAction" in st or "NotResource" in st:
            problems.append(f"statement {i}: NotAction / NotResource grants everything else")
        actions = [st["Action"]] if isinstance(st.get("Action"), str) else st.get("Action", [])
        resources = [st["Resource"]] if isinstance(st.get("Resource"), str) else st.get("Resource", [])
        problems += [f"statement {i}: wildcard action {a!r}" for a in actions if "*" in a]
        for r in resources:
            if r == "*":
                if not all(a.startswith("ec2:Describe") for a in actions):
                    problems.append(f"statement {i}: Resource '*' for {actions}")
            elif "*" in r and ("PLACEHOLDER" not in r or r.index("*") < r.rindex("PLACEHOLDER")):
                problems.append(f"statement {i}: wildcard resource {r!r} outside a PLACEHOLDER prefix")
            elif r.startswith("arn:aws:s3:::") and not r.startswith("arn:aws:s3:::PLACEHOLDER-"):
                problems.append(f"statement {i}: bucket {r!r} is not a placeholder")
    return problems


def _grants(policy: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for a in actions:
            out.setdefault(a, set()).update(resources)
    return out


def test_node_roles_are_least_privilege_and_referenced_by_the_launcher():
    policies = {name: json.loads(path.read_text()) for name, path in IAM_POLICIES.items()}
    for name, policy in policies.items():
        assert policy["Version"] == "2012-10-17" and iam_problems(policy) == [], name
    s3 = _grants(policies["s3"])
    # Exactly what the study does: results read / write / delete (re-runs replace stages), data read-only,
    # listing only under those prefixes.
    assert set(s3) == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    results = "arn:aws:s3:::PLACEHOLDER-bucket/scope-ray/*"
    assert s3["s3:PutObject"] == s3["s3:DeleteObject"] == {results}
    assert results in s3["s3:GetObject"] and all(r.startswith("arn:aws:s3:::PLACEHOLDER-bucket/") for r in s3["s3:GetObject"])
    (listing,) = [st for st in policies["s3"]["Statement"] if st["Action"] == "s3:ListBucket"]
    assert "scope-ray/*" in listing["Condition"]["StringLike"]["s3:prefix"]
    head = _grants(policies["head"])
    assert not any(a.startswith("s3:") for a in head)  # the head's S3 access is the S3 policy's, no more
    assert head["iam:PassRole"] == {"arn:aws:iam::PLACEHOLDER-account-id:role/PLACEHOLDER-scope-ray-s3"}
    # Both node types run with a profile of their own (no profile: Ray makes an EC2 + S3 full-access
    # one for the head), and the launcher names the policy documents those roles hold.
    launcher = load(LAUNCHER)
    for name, node_type in launcher["available_node_types"].items():
        assert "PLACEHOLDER" in node_type["node_config"]["IamInstanceProfile"]["Arn"], name
    text = LAUNCHER.read_text()
    assert all(path.name in text for path in IAM_POLICIES.values())


def test_the_iam_check_catches_broad_grants():
    broad = [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::PLACEHOLDER-bucket/scope-ray/*"},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::my-real-bucket/x"},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
        {"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::PLACEHOLDER-bucket/x"},
    ]
    for st in broad:
        assert iam_problems({"Statement": [st]}), st
    assert iam_problems({"Statement": [{"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"}]}) == []


def test_every_documented_ray_start_has_token_auth_with_a_token_made_first():
    """Wherever the docs tell a user to start Ray (`ray start`), token auth is on for it: the
    command carries RAY_AUTH_MODE=token or follows `export RAY_AUTH_MODE=token`, and the same
    file makes the token first (`ray get-auth-token --generate`): without a token, Ray 2.60's
    `ray start` fails with auth on, and a plain one comes up with no auth at all."""
    files = [REPO / "README.md", CLUSTER / "README.md", LAUNCHER, *sorted((REPO / "docs").glob("*.md"))]
    starts = 0
    for path in files:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            command = line.split("#", 1)[0] if path.suffix == ".md" else line
            if not re.search(r"(^|[\s;])ray start\b", command) or "`ray start" in line:
                continue  # prose naming the command, not a command to run
            starts += 1
            before = "\n".join(lines[:i + 1])
            assert ("RAY_AUTH_MODE=token ray start" in line or "export RAY_AUTH_MODE=token" in before), (path, line)
            assert "ray get-auth-token --generate" in before, (path, line)
    assert starts >= 3  # README's single-node steps and the launcher's head and worker starts

"""Secrets never travel to a cluster: a planted .env, key, ~/.aws-like folder or token file in a
working dir is left out of what Ray uploads (Ray's own packing code), what `ray up` rsyncs (real
rsync where installed, with the arguments Ray's launcher builds), and the image's build context
(Docker's .dockerignore reading, checked on known cases). One list: scope_ray/shiplist.py."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from scope_ray.shiplist import SECRET_EXCLUDES, rayignore_text, with_secret_excludes

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# What a careless checkout may hold (relative paths), one or more per pattern family.
SECRETS = (".env", "jobs/.env.production", ".envrc", "deploy/server.pem", "tls/node.key", "certs/client.p12",
           ".ssh/id_ed25519", "id_rsa", "id_rsa.pub", ".aws/credentials", ".aws/config", "home/.kube/config",
           ".docker/config.json", ".gnupg/pubring.kbx", "config/gcloud/application_default_credentials.json",
           ".ray/auth_token", "auth_token", "hf_token", "github-token.txt", "deploy/api.token", "my_token_file",
           ".git-credentials", "credentials.json", "aws_credentials", ".netrc", "_netrc", ".pgpass", ".pypirc",
           ".npmrc", "kubeconfig.yaml", "gcp-service-account-key.json", "secrets.yaml", "secrets.json")
# What must still ship: the project's own files whose names come close to the patterns.
KEEP = ("scope_ray/tokens.py", "tests/test_tokens.py", "tests/secrets_scan.py", "jobs/clip-vit-b16.yaml",
        "jobs/entrypoint.py", "cluster/runtime_env.yaml", "docs/keys.md", "envs/notes.txt", "a/key_points.py",
        ".rayignore")


def _plant(root: Path, with_rayignore: bool = True) -> Path:
    for rel in SECRETS + KEEP:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("AKIA-not-real secret material\n" if rel in SECRETS else "ok\n")
    if with_rayignore:
        (root / ".rayignore").write_text((REPO / ".rayignore").read_text())
    else:
        (root / ".rayignore").unlink()
    return root


def _ray_packs(root: Path, excludes: list[str]) -> set[str]:
    """The files Ray's runtime_env packing puts in the working_dir zip it uploads (the code
    `ray job submit --working-dir` and JobSubmissionClient run), .gitignore / .rayignore included."""
    from ray._private.runtime_env.packaging import _zip_files

    out = root.parent / f"{root.name}.zip"
    _zip_files(str(root), excludes, str(out), include_gitignore=True)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def _expected(with_rayignore: bool = True) -> set[str]:
    return set(KEEP) if with_rayignore else set(KEEP) - {".rayignore"}


def test_ray_uploads_leave_planted_secrets_behind(tmp_path, monkeypatch):
    # 1. `ray job submit --working-dir .` from the repository root: .rayignore alone, no excludes.
    shipped = _ray_packs(_plant(tmp_path / "a"), [])
    assert shipped == _expected(), sorted(shipped ^ _expected())
    # 2. cluster/runtime_env.yaml used from a directory without .rayignore: its excludes alone.
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    shipped = _ray_packs(_plant(tmp_path / "b", with_rayignore=False), env["excludes"])
    assert shipped == _expected(False), sorted(shipped ^ _expected(False))
    # 3. A sweep whose working_dir has no .rayignore: what the runner submits adds the list.
    from scope_ray.sweep import runner

    d = _plant(tmp_path / "c", with_rayignore=False)
    sweep = type("S", (), {"runtime_env": {"working_dir": str(d), "excludes": ["scope-ray-demo"]}})()
    submitted = runner.shipped_runtime_env(sweep)
    assert submitted["excludes"][0] == "scope-ray-demo" and set(SECRET_EXCLUDES) <= set(submitted["excludes"])
    shipped = _ray_packs(d, submitted["excludes"])
    assert shipped == _expected(False), sorted(shipped ^ _expected(False))
    # Without an upload there is nothing to exclude, and the runtime_env is left as it was.
    assert with_secret_excludes({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}


def test_the_sweep_submits_with_the_secret_excludes(tmp_path, monkeypatch):
    """Through `run_sweep`: the runtime_env the Jobs API receives, and the dry run's listing."""
    from scope_ray.sweep import runner

    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": {"name": "demo-vit-tiny", "weights": "none"},
                                                      "storage": {"root": str(tmp_path / "r")}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "jobs": ["job.yaml"], "stages": ["extract"],
                                                        "runtime_env": {"working_dir": "."}, "poll_seconds": 0.01}))
    seen = []

    class Refuses:  # a cluster that refuses the upload: the sweep records the model as FAILED
        def submit_job(self, **kw):
            seen.append(kw["runtime_env"])
            raise RuntimeError("Request failed with status code 400: upload refused")

        def get_job_status(self, job_id):
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")

    monkeypatch.setattr(runner, "_make_client", lambda address: Refuses())
    monkeypatch.setattr(runner, "RETRY_DELAYS_S", (0.0,))
    out = io.StringIO()
    assert runner.run_sweep(str(tmp_path / "sweep.yaml"), address="http://head:8265", out=out) == 1
    (env,) = seen
    assert env["working_dir"] == str(tmp_path.resolve()) and list(SECRET_EXCLUDES) == env["excludes"]
    dry = io.StringIO()
    runner.run_sweep(str(tmp_path / "sweep.yaml"), dry_run=True, out=dry)
    (line,) = [ln for ln in dry.getvalue().splitlines() if ln.startswith("runtime_env: ")]
    assert json.loads(line.split(": ", 1)[1])["excludes"] == list(SECRET_EXCLUDES)


def test_the_list_is_written_once_and_drops_none_of_the_projects_files():
    from ray._private.thirdparty.pathspec import PathSpec

    assert (REPO / ".rayignore").read_text() == rayignore_text()
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(SECRET_EXCLUDES) <= set(env["excludes"])
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert launcher["rsync_filter"] == [".rayignore"]  # rsync reads the same file in every folder it copies
    dockerignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"**/{p.rstrip('/')}" in dockerignore for p in SECRET_EXCLUDES)
    # Plain patterns only: no negation, no '/' inside (rsync and Docker would read those differently).
    assert all(not p.startswith("!") and "/" not in p.rstrip("/") for p in SECRET_EXCLUDES)
    # Nothing the project tracks is dropped (tokens.py: a bare "*token*" would have been).
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=30,
                             check=True).stdout.split()
    assert "scope_ray/tokens.py" in tracked
    spec = PathSpec.from_lines("gitwildmatch", SECRET_EXCLUDES)
    assert [f for f in tracked if spec.match_file(f)] == []


def _rsync_args() -> list[str]:
    """The filter arguments `ray up` gives rsync for cluster/aws-gpu.yaml (Ray's own builder)."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    options = {"rsync_exclude": launcher.get("rsync_exclude"), "rsync_filter": launcher.get("rsync_filter")}
    return SSHCommandRunner._create_rsync_filter_args(None, options)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (the launcher's copy tool)")
def test_the_launchers_rsync_leaves_secrets_behind_and_still_mounts_the_token(tmp_path):
    src = _plant(tmp_path / "checkout")
    args = _rsync_args()
    subprocess.run(["rsync", "-a", *args, f"{src}/", str(tmp_path / "node")], check=True, timeout=60)
    copied = {str(p.relative_to(tmp_path / "node")) for p in (tmp_path / "node").rglob("*") if p.is_file()}
    assert copied == _expected(), sorted(copied ^ _expected())
    # The token file mount (~/.ray/auth_token: ~/.ray/auth_token) goes through the same filters:
    # it must still arrive (an rsync_exclude "*token" would have dropped it).
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("not-a-real-token\n")
    (tmp_path / "node-home").mkdir()
    subprocess.run(["rsync", "-a", *args, str(token), str(tmp_path / "node-home" / "auth_token")], check=True,
                   timeout=60)
    assert (tmp_path / "node-home" / "auth_token").read_text() == "not-a-real-token\n"


def _docker_excluded(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore reading (moby patternmatcher): each pattern is cleaned and anchored
    at the context root; '**' matches any number of folders, '*' and '?' never cross a '/'; a
    path is left out when it or a folder above it matches. (No '!' lines here, so no re-includes.)"""
    def regex(p: str) -> re.Pattern:
        p = p.strip().strip("/")
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    compiled = [regex(p) for p in patterns if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(r.match(pre) for r in compiled for pre in prefixes)


def test_the_image_build_context_leaves_secrets_behind():
    # The reading first, on cases Docker's documentation states: a bare pattern is anchored at
    # the root, **/ reaches any depth, a matched folder takes its contents with it.
    assert _docker_excluded("a.pem", ["*.pem"]) and not _docker_excluded("deploy/a.pem", ["*.pem"])
    assert _docker_excluded("deploy/a.pem", ["**/*.pem"]) and _docker_excluded("a.pem", ["**/*.pem"])
    assert _docker_excluded(".aws/credentials", ["**/.aws"]) and _docker_excluded("x/.aws/config", ["**/.aws"])
    assert not _docker_excluded("scope_ray/tokens.py", ["**/*token"]) and _docker_excluded("x/auth_token", ["**/*token"])
    patterns = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert not [p for p in patterns if p.startswith("!")]
    left_in = [s for s in SECRETS if not _docker_excluded(s, patterns)]
    assert left_in == []
    dropped = [k for k in KEEP if _docker_excluded(k, patterns)]
    assert dropped == []

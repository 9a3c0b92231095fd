"""`scope-ray doctor`: each check passes on what works and fails, with a fix, on what does not."""

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

from scope_ray.cli import main
from scope_ray.config import load_config
from scope_ray.doctor import check_root, check_weights, pretrained_sources
from tests.ray_heads import start_retrying


def _job(tmp_path: Path, **extra: str) -> Path:
    lines = [f"storage: {{root: {extra.pop('root', tmp_path / 'results')}}}",
             f"model: {{name: {extra.pop('model', 'demo-vit-tiny')}, weights: {extra.pop('weights', 'none')}}}"]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_all_checks_pass_on_a_local_instance_and_writable_root(ray_local, tmp_path, capsys):
    assert main(["doctor", str(_job(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "ok   ray" in out and "CPUs" in out and "is writable" in out and "all checks passed" in out
    assert "the Ray instance this process is already connected to" in out  # the session's ray_local


def test_doctor_says_which_ray_it_checked():
    """Before: "a local single-node instance" even when ray.init() joined one already running."""
    from scope_ray.doctor import where_ray_is

    assert where_ray_is("10.0.0.1:6379", True, "", "10.0.0.1:6379") == "cluster at 10.0.0.1:6379"
    assert "already connected" in where_ray_is(None, False, "", "1.2.3.4:6379")
    assert "joined the Ray instance already running on this machine (1.2.3.4:6379)" in where_ray_is(
        None, True, "1.2.3.4:6379", "1.2.3.4:6379")
    assert "a new local single-node instance" in where_ray_is(None, True, "", "5.6.7.8:6379")
    assert "a new local single-node instance" in where_ray_is(None, True, "1.2.3.4:6379", "5.6.7.8:6379")


def test_unwritable_root_fails_with_a_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    check = check_root(load_config(_job(tmp_path, root=str(blocker / "results"))))
    assert not check.ok and str(blocker) in check.detail and check.fix


def test_a_data_path_that_does_not_exist_fails_naming_the_key(tmp_path, s3_bucket):
    from scope_ray.doctor import check_data

    (tmp_path / "train").mkdir()
    bucket, endpoint = s3_bucket
    job = load_config(None, [f"data.imagenet.train={{format: folder, path: {tmp_path / 'train'}}}",
                             f"data.imagenet.val={{format: parquet, path: {tmp_path / 'vall'}}}",
                             f"data.nyud.val={{format: parquet, path: {bucket}/nyud/val}}",
                             f"storage.endpoint_url={endpoint}"])
    check = check_data(job)
    assert not check.ok and "2 of 3" in check.detail and check.fix
    assert f"data.imagenet.val.path={tmp_path / 'vall'}" in check.detail and f"data.nyud.val.path={bucket}" in check.detail
    assert "data.imagenet.train" not in check.detail
    assert check_data(load_config(None, [f"data.imagenet.train={{format: folder, path: {tmp_path / 'train'}}}"])).ok


def test_missing_weights_file_fails(tmp_path):
    check = check_weights(load_config(_job(tmp_path, weights=str(tmp_path / "absent.safetensors"))))
    assert not check.ok and "does not exist" in check.detail


def test_pretrained_weights_offline_and_uncached_fail_cached_pass(tmp_path, monkeypatch):
    from huggingface_hub import constants

    job = load_config(_job(tmp_path, model="dinov2-b", weights="pretrained"))
    repo, url = pretrained_sources(job)
    assert repo == "timm/vit_base_patch14_dinov2.lvd142m" and url.startswith("https://")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    offline = check_weights(job)
    assert not offline.ok and "not cached" in offline.detail and ".safetensors" in offline.fix
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}").mkdir(parents=True)
    assert check_weights(job).ok


def test_clip_sources_come_from_open_clip(tmp_path):
    repo, url = pretrained_sources(load_config(_job(tmp_path, model="clip-vit-b16", weights="pretrained")))
    assert repo == "timm/vit_base_patch16_clip_224.openai" and url.endswith("ViT-B-16.pt")


def test_unreachable_jobs_api_fails_clearly(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL ray" in out and "not reachable" in out and "-> check the address" in out


def test_gpu_check_compares_torch_with_ray(monkeypatch):
    import torch

    from scope_ray.doctor import check_gpus

    assert check_gpus(0.0).ok  # no GPU anywhere: fine, CPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    missing = check_gpus(0.0)  # torch sees one, Ray advertises none: stages would silently use CPUs
    assert not missing.ok and "advertises none" in missing.detail and missing.fix
    assert check_gpus(1.0).ok and "Test GPU" in check_gpus(1.0).detail
    # A GPU the wheel has no kernels for (a 7.5 card against sm_90 only) fails with the facts.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    old_card = check_gpus(1.0)
    assert not old_card.ok and "compute capability 7.5" in old_card.detail and "sm_90" in old_card.detail


def test_gpu_check_fails_when_a_gpu_node_cannot_use_its_gpus():
    from scope_ray.doctor import check_gpus

    # What probe_gpu_node brings back from a GPU worker whose driver is too old for the wheel.
    bad = check_gpus(8.0, {"ip": "10.0.0.7", "problem": "torch cannot initialise CUDA: ... CUDA 13.0 ...", "name": "?"})
    assert not bad.ok and "10.0.0.7" in bad.detail and "CUDA 13.0" in bad.detail and "driver" in bad.fix
    good = check_gpus(8.0, {"ip": "10.0.0.7", "problem": None, "name": "NVIDIA H200"})
    assert good.ok and "NVIDIA H200 usable" in good.detail and "Ray advertises 8" in good.detail


def test_auth_verdict_fails_when_the_cluster_takes_callers_without_a_token(monkeypatch):
    """The decision on what a cluster told a caller without a token, for every answer: only a
    cluster that refused it, with a token at hand here, passes; the token is never printed."""
    from scope_ray.doctor import AuthProbe, check_auth

    off = check_auth(AuthProbe("disabled", "10.0.0.1:6379", "its GCS answers a gRPC call that carries no token"),
                     "~/.ray/auth_token")
    assert not off.ok and "WITHOUT token authentication" in off.detail and "10.0.0.1:6379" in off.detail
    assert "ray get-auth-token --generate" in off.fix and "RAY_AUTH_MODE=token ray start --head" in off.fix
    unknown = check_auth(AuthProbe(None, "http://h:8265", "its dashboard did not answer"), "~/.ray/auth_token")
    assert not unknown.ok and "cannot tell" in unknown.detail and unknown.fix
    on = AuthProbe("token", "http://h:8265", "refused")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert not check_auth(on, None).ok and "RAY_AUTH_TOKEN" in check_auth(on, None).fix  # no token here
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-test-token")
    ok = check_auth(on, "the RAY_AUTH_TOKEN environment variable")
    assert ok.ok and "RAY_AUTH_TOKEN" in ok.detail and "s3cr3t" not in ok.detail
    monkeypatch.delenv("RAY_AUTH_MODE")  # a token, but this client would not send it
    assert not check_auth(on, "the RAY_AUTH_TOKEN environment variable").ok


# --- against real Ray heads: one started as README users did before (plain `ray start --head` on a
# home without a token: Ray 2.60 brings it up WITHOUT auth), one with RAY_AUTH_MODE=token ----------

HEAD_PORTS = ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "min-worker-port")
HEAD_START_S = 60.0  # a head comes up in ~3 s here; a loaded 2-core CI machine gets room, not forever


class _Head:
    """A private `ray start --head --block` on free ports, its own temp dir and HOME, in its own
    process group (stopped by group and temp dir: never a bare `ray stop`)."""

    def __init__(self, workdir: Path, token: str | None):
        socks = [socket.socket() for _ in HEAD_PORTS]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = {k: s.getsockname()[1] for k, s in zip(HEAD_PORTS, socks)}
        for s in socks:
            s.close()
        ports["max-worker-port"] = ports["min-worker-port"] + 10
        self.gcs, self.url = f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}"
        self.temp_dir = tempfile.mkdtemp(prefix="srdr-")  # short: Ray's socket paths live under it
        self.home = workdir / "home"  # no ~/.ray/auth_token: a fresh user
        self.home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(self.home), PATH=f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}")
        self.token = None
        if token is not None:
            self.token = secrets.token_hex(16)
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=1",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               "--disable-usage-stats", "--include-log-monitor=false", f"--object-store-memory={100 * 2**20}",
               *(f"--{k}={v}" for k, v in ports.items())]
        self.log_path = workdir / "head.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HEAD_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, with token auth
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"Ray head not up after {HEAD_START_S:g} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # SIGTERM drains for up to 30 s; nothing here to keep
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        for entry in Path("/proc").iterdir():  # anything of ours that left the group
            try:
                if entry.name.isdigit() and self.temp_dir.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _started_head(workdir: Path, token: str | None) -> _Head:
    head = _Head(workdir, token=token)
    try:
        head.wait_ready()
    except BaseException:  # exited (retried by the caller) or hung: stop what it left either way
        head.stop()
        raise
    return head


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    made = {}
    try:
        for kind in ("plain", "token"):
            made[kind] = start_retrying(lambda: _started_head(tmp_path_factory.mktemp(f"head-{kind}"),
                                                              token=None if kind == "plain" else "token"))
        yield made
    finally:
        for h in made.values():
            h.stop()


def test_doctor_fails_on_a_cluster_started_without_token_auth(heads, capsys, monkeypatch):
    """`ray start --head` as the README had it (no RAY_AUTH_MODE, no token in the home) comes up
    without auth in Ray 2.60; doctor finds that from outside, at its GCS address and at its
    dashboard URL, and fails with one line and the fix. The token head's probe answers "token" at
    both addresses (a probe that always said "disabled" fails here); a token cluster passing the
    whole doctor is test_all_checks_pass_on_a_local_instance_and_writable_root (ray.init's
    local instance has token auth on in Ray 2.60)."""
    from scope_ray.doctor import probe_auth_mode

    plain, token = heads["plain"], heads["token"]
    assert [probe_auth_mode(a).mode for a in (plain.gcs, plain.url)] == ["disabled", "disabled"]
    assert [probe_auth_mode(a).mode for a in (token.gcs, token.url)] == ["token", "token"]

    def assert_fails_on_auth_only(text: str, code: int) -> None:
        assert code == 1, text
        (line,) = [ln for ln in text.splitlines() if ln.startswith("FAIL auth")]
        assert "WITHOUT token authentication" in line, text
        assert "-> restart it with token authentication: `ray get-auth-token --generate`" in text
        assert "ok   ray" in text and "1 check(s) failed: auth" in text, text  # reached; auth the one failure

    # The whole command as a user runs it (ray.init connects to the GCS address), in a process of its own.
    run = subprocess.run([sys.executable, "-m", "scope_ray.cli", "doctor"], env={**plain.env, "RAY_ADDRESS": plain.gcs},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert_fails_on_auth_only(run.stdout, run.returncode)
    # The dashboard URL (what `scope-ray sweep` and `ray job submit` use): no ray.init, so in-process.
    monkeypatch.setenv("RAY_ADDRESS", plain.url)
    code = main(["doctor"])
    assert_fails_on_auth_only(capsys.readouterr().out, code)

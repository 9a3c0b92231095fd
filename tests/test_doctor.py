"""`scope-ray doctor`: each check passes on what works and fails, with a fix, on what does not."""

from pathlib import Path

import pytest

from scope_ray.cli import main
from scope_ray.config import load_config
from scope_ray.doctor import check_root, check_weights, pretrained_sources


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


def test_auth_check_uses_the_sweeps_token_rule_and_never_prints_the_token(tmp_path, monkeypatch):
    from scope_ray.doctor import check_auth

    monkeypatch.setattr(Path, "home", lambda: tmp_path)  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert not check_auth().ok
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-test-token")
    ok = check_auth()
    assert ok.ok and "RAY_AUTH_TOKEN" in ok.detail and "s3cr3t" not in ok.detail

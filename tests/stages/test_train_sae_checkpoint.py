"""train-sae checkpoints are readable on any machine: a GPU worker writes them, a GPU-less driver
(the shipped clusters' head) finishes the run from them, and a restarted worker resumes exactly.

No Ray cluster: the driver's finishing step and the worker's loader are called directly on
checkpoint directories, as Ray Train hands them over.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from ray.train import Checkpoint

from scope_ray.config import load_config
from scope_ray.sae import BatchTopKSAE
from scope_ray.stages import train_sae
from scope_ray.storage import ResultsRoot

D, Q, K = 96, 384, 4  # demo-vit-tiny (width 96) at expansion 4, as _job configures


def _job(root):
    return load_config({"storage": {"root": str(root)}},
                       ["sae.expansion=4", f"sae.k={K}", "model.name=demo-vit-tiny"])


def _trained(steps: int = 3):
    """An SAE and its Adam after a few steps: the optimizer holds real moments."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D, Q, K, k_aux=8, dead_after_tokens=64)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        sae.loss(torch.randn(32, D), 1 / 32).total.backward()
        opt.step()
    return sae, opt


@contextlib.contextmanager
def _tagged_as_cuda():
    """Make torch.save record every storage's location as ``cuda:0``, which is exactly what a
    GPU worker's ``torch.save`` of Adam's state wrote, on a machine that has no GPU."""
    entry = (1, lambda storage: "cuda:0", lambda obj, location: None)
    torch.serialization._package_registry.append(entry)
    torch.serialization._package_registry.sort()
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def _legacy_checkpoint(directory, sae, opt, step: int) -> None:
    """A checkpoint as train-sae wrote it before 2026-12 on a GPU worker: optimizer.pt pickled
    with CUDA locations."""
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
                                os.path.join(directory, train_sae.SAE_STATE_FILE))
    with _tagged_as_cuda():
        torch.save(opt.state_dict(), os.path.join(directory, train_sae.LEGACY_OPTIMIZER_FILE))
    with open(os.path.join(directory, train_sae.PROGRESS_FILE), "w") as f:
        json.dump({"step": step, "nonfinite_rows": 0, "log": [{"step": step, "fvu": 0.5, "l0": 4.0}],
                   "resumed_from": [], "workers": [{"rank": 0}]}, f)


def test_the_cuda_tagged_fixture_reproduces_the_crash(tmp_path):
    # The fixture is what the bug needed: loading it as the old driver did fails on this CPU machine.
    sae, opt = _trained()
    _legacy_checkpoint(tmp_path, sae, opt, step=3)
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
        torch.load(tmp_path / train_sae.LEGACY_OPTIMIZER_FILE, weights_only=True)


def test_driver_finishes_from_a_cuda_located_checkpoint_on_a_cpu_machine(tmp_path):
    sae, opt = _trained()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _legacy_checkpoint(ckpt, sae, opt, step=3)
    root = ResultsRoot(str(tmp_path / "root"))
    job = _job(tmp_path / "root")
    stage = root.stage(job.model.name, train_sae.STAGE)
    result = train_sae._finish(job, root, stage, "hash", Checkpoint.from_directory(str(ckpt)), 3, 64,
                              log=lambda *_: None)
    assert result.steps == 3 and stage.is_complete("hash")
    saved = BatchTopKSAE.load(os.path.join(stage.uri, train_sae.SAE_FILE))
    x = torch.randn(8, D)
    assert torch.allclose(saved.encode(x), sae.eval().encode(x), atol=1e-6)


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "legacy-cuda-pickle"])
def test_worker_resumes_the_exact_optimizer_state(tmp_path, legacy):
    sae, opt = _trained()
    if legacy:
        _legacy_checkpoint(tmp_path, sae, opt, step=3)
    else:
        train_sae._save_checkpoint(str(tmp_path), sae, opt, 3, 0, [], [], [])
        # Nothing pickled: safetensors and JSON cannot record a device.
        assert sorted(os.listdir(tmp_path)) == sorted([train_sae.SAE_STATE_FILE, train_sae.OPTIMIZER_FILE,
                                                       train_sae.PROGRESS_FILE])
    fresh_sae = BatchTopKSAE(D, Q, K, k_aux=8, dead_after_tokens=64)
    fresh_opt = torch.optim.Adam(fresh_sae.parameters(), lr=1e-3)
    step, *_ = train_sae._load_checkpoint(str(tmp_path), fresh_sae, fresh_opt)
    assert step == 3
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"][0]["params"] == got["param_groups"][0]["params"]
    assert {k: v for k, v in got["param_groups"][0].items() if k != "betas"} == \
        {k: v for k, v in want["param_groups"][0].items() if k != "betas"}
    assert tuple(got["param_groups"][0]["betas"]) == tuple(want["param_groups"][0]["betas"])
    assert want["state"].keys() == got["state"].keys()
    for i in want["state"]:
        for name, value in want["state"][i].items():
            assert got["state"][i][name].device.type == "cpu"
            assert torch.equal(got["state"][i][name], value), (i, name)
    # One more identical step from each: the resumed optimizer continues exactly.
    x = torch.randn(32, D)
    for s, o in ((sae, opt), (fresh_sae, fresh_opt)):
        o.zero_grad()
        s.loss(x, 1 / 32).total.backward()
        o.step()
    assert torch.equal(sae.W_dec, fresh_sae.W_dec)


def test_a_diverged_sae_is_never_committed(tmp_path):
    sae, opt = _trained()
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    train_sae._save_checkpoint(str(ckpt), sae, opt, 3, 0, [{"step": 3, "loss": float("nan")}], [], [])
    root = ResultsRoot(str(tmp_path / "root"))
    job = _job(tmp_path / "root")
    stage = root.stage(job.model.name, train_sae.STAGE)
    with pytest.raises(RuntimeError, match="non-finite values in W_enc.*not committing"):
        train_sae._finish(job, root, stage, "hash", Checkpoint.from_directory(str(ckpt)), 3, 64, log=lambda *_: None)
    assert not stage.is_complete()

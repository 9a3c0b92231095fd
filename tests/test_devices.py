"""scope_ray.devices: work runs on the GPU Ray granted or on the CPU, never elsewhere, and a
granted GPU torch cannot use is an error with the facts, not a silent CPU run."""

from __future__ import annotations

import pytest

from scope_ray.devices import GPUUnusable, _supported, cuda_problem, device_for, wheel_facts


def test_the_device_is_what_ray_granted():
    assert device_for([], None) == "cpu"  # no GPU granted: the CPU, whatever torch sees
    assert device_for([], "no CUDA") == "cpu"
    assert device_for(["0"], None) == "cuda"
    with pytest.raises(GPUUnusable, match=r"GPU\(s\) \['3'\].*driver is older"):
        device_for(["3"], "torch cannot initialise CUDA: the driver is older than CUDA 13.0 needs")


def test_architecture_rule_matches_cuda_binary_compatibility():
    archs = ["sm_80", "sm_86", "sm_90", "compute_90"]
    assert _supported((8, 0), archs) and _supported((8, 9), archs)  # sm_86 cubins run on 8.9
    assert _supported((9, 0), archs) and _supported((12, 0), archs)  # compute_90 PTX JITs forward
    assert not _supported((7, 5), archs)  # a Turing card: no kernel for it
    assert not _supported((12, 0), ["sm_80", "sm_90"])  # cubins never run on a newer major


def test_this_cpu_machine_reports_why_cuda_is_unusable():
    import torch

    problem = cuda_problem()
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine
        pytest.skip("a GPU is usable here")
    assert problem is not None and torch.__version__ in problem
    assert f"torch {torch.__version__}" in wheel_facts()


def test_a_ray_task_granted_no_gpu_runs_on_the_cpu(ray_local):
    from scope_ray.devices import granted_device

    assert ray_local.get(ray_local.remote(num_gpus=0)(granted_device).remote()) == "cpu"

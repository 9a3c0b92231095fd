"""Sizing actor pools against the real (shared, 2-CPU) local Ray instance."""

from __future__ import annotations

import pytest

from scope_ray.config import load_config
from scope_ray.stages.cluster import ClusterResourceError, actor_resources


def test_pool_leaves_room_for_the_tasks_that_feed_it(ray_local):
    # Two 1-CPU actors would hold both CPUs and starve the read/decode tasks (a silent hang).
    res = actor_resources(load_config(None, ["ray.num_actors=2", "ray.cpus_per_actor=1"]).ray)
    assert res.pool_size == 1
    res = actor_resources(load_config(None, ["ray.num_actors=2", "ray.cpus_per_actor=0.5"]).ray)
    assert res.pool_size == 2


def test_actor_too_large_for_the_cluster_fails_at_once(ray_local):
    with pytest.raises(ClusterResourceError, match="cpus_per_actor"):
        actor_resources(load_config(None, ["ray.cpus_per_actor=2"]).ray)


def test_stage_with_bigger_tasks_reserves_room_for_them(ray_local):
    # The instability stage runs 1-CPU EMD tasks beside its actors: a 1.25-CPU actor on 2 CPUs
    # would leave 0.75 and the EMD tasks could never start.
    cfg = load_config(None, ["ray.cpus_per_actor=1.25"]).ray
    assert actor_resources(cfg).pool_size == 1  # read + decode (0.75) still fit beside it
    with pytest.raises(ClusterResourceError, match="tasks that run beside"):
        actor_resources(cfg, task_cpus=1.0)


def test_a_job_sizes_its_pool_to_its_share_so_concurrent_jobs_leave_each_other_room(ray_local):
    """ray.cluster_share (the sweep's 1/N): two jobs at half of this 2-CPU instance each keep room
    for their own read and decode tasks. With the defaults (1-CPU actor, 0.75 for the feeders),
    sizing against the whole cluster gives each job one 1-CPU actor: together they hold both
    CPUs and neither job's read task can ever start (issue 18's deadlock)."""
    total = ray_local.cluster_resources()["CPU"]
    lines: list[str] = []
    half = load_config(None, ["ray.cluster_share=0.5"]).ray
    res = actor_resources(half, log=lines.append)
    feeders = half.read_cpus + half.decode_cpus
    assert res.pool_size == 1 and res.num_cpus == pytest.approx(total / 2 - feeders)
    assert 2 * (res.pool_size * res.num_cpus + feeders) <= total + 1e-9  # both jobs, actors and feeders
    (line,) = lines
    assert "ray.cluster_share=0.5" in line and "instead of ray.cpus_per_actor=1" in line
    whole = actor_resources(load_config(None).ray, log=lines.append)
    assert 2 * whole.pool_size * whole.num_cpus >= total  # what deadlocked: two such jobs hold everything
    # An actor that already fits its share keeps its request and says nothing.
    small = actor_resources(load_config(None, ["ray.cluster_share=0.5", "ray.cpus_per_actor=0.25"]).ray,
                            log=lines.append)
    assert (small.num_cpus, small.pool_size, len(lines)) == (0.25, 1, 1)
    with pytest.raises(ClusterResourceError, match=r"this job's share of 0.5 CPUs \(ray.cluster_share=0.25\)"):
        actor_resources(load_config(None, ["ray.cluster_share=0.25"]).ray)


def test_each_role_has_its_own_gpu_setting_and_ddp_ranks_get_whole_gpus(ray_local):
    from scope_ray.config import ConfigError
    from scope_ray.stages.cluster import role_gpus

    # A half GPU per model actor is fine with 2 SAE workers: the setting no longer covers them.
    job = load_config(None, ["ray.gpus_per_actor=0.5", "sae.num_workers=2"])
    assert job.ray.gpus_per_sae_worker == "auto"
    load_config(None, ["sae.num_workers=2", "ray.gpus_per_sae_worker=1"])
    load_config(None, ["ray.gpus_per_sae_worker=0.5"])  # one worker: sharing a GPU is its own business
    with pytest.raises(ConfigError, match="ray.gpus_per_sae_worker.*one GPU"):
        load_config(None, ["sae.num_workers=2", "ray.gpus_per_sae_worker=0.5"])
    # On this GPU-less instance: 'auto' is 0 for every role; a number names its own key.
    assert role_gpus("auto", "ray.gpus_per_probe_worker") == 0.0
    with pytest.raises(ClusterResourceError, match="ray.gpus_per_probe_worker=0.25 but the Ray cluster has no GPUs"):
        role_gpus(0.25, "ray.gpus_per_probe_worker")


_NOISY = r'''
import sys
from scope_ray.config import load_config
from scope_ray.stages.cluster import connect
connect(load_config(None, [f"ray.log_level={sys.argv[1]}"]).ray, num_cpus=1, log_to_driver=False)
import ray.data
from ray import tune
ray.data.range(4).map_batches(lambda b: b).take_all()
tune.Tuner(lambda config: tune.report({"x": 1}), param_space={},
           run_config=tune.RunConfig(storage_path=sys.argv[2], name="t", verbose=0)).fit()
print("END")
'''


@pytest.mark.parametrize("level, noisy", [("warning", False), ("info", True)])
def test_ray_log_level_keeps_ray_data_and_tune_chatter_out_unless_asked(tmp_path, level, noisy):
    """ray.log_level (default warning): Ray Data's execution plans and Tune's experiment table are
    not printed; at info they are (which is what shows the check can see them)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT")}
    out = subprocess.run([sys.executable, "-c", _NOISY, level, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "END" in out.stdout, text[-2000:]
    assert ("Execution plan of Dataset" in text) is noisy
    assert ("Configuration for experiment" in text) is noisy


def test_max_actors_makes_an_autoscaling_pool_not_checked_against_the_present_cluster(ray_local):
    """ray.max_actors: Ray Data's pool of 1 to N actors. A request the 2-CPU instance cannot hold
    now is not refused (an autoscaling cluster adds nodes for it: tests/stages/test_autoscaling.py);
    without max_actors the same request fails at once, naming the cluster's CPUs."""
    lines: list[str] = []
    res = actor_resources(load_config(None, ["ray.max_actors=3", "ray.cpus_per_actor=4"]).ray, log=lines.append)
    assert (res.autoscale, res.pool_size, res.num_cpus, res.num_gpus) == (True, 3, 4.0, 0.0)
    strategy = res.strategy()
    assert (strategy.min_size, strategy.max_size) == (1, 3)
    assert lines and "1 to 3 model actors" in lines[0]
    with pytest.raises(ClusterResourceError, match="exceeds the cluster's 2 CPUs"):
        actor_resources(load_config(None, ["ray.cpus_per_actor=4"]).ray)
    fixed = actor_resources(load_config(None, ["ray.num_actors=1"]).ray).strategy()
    assert (fixed.min_size, fixed.max_size) == (1, 1)

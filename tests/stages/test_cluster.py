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

"""ray.max_actors on a real autoscaling cluster that starts with no worker node (issue 18.2).

The cluster runs in tests/stages/autoscaling_cluster.py, in namespaces of its own
(tests/namespaces.py): the fake multi-node provider's autoscaler adds real raylets on this machine."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.namespaces import require_namespaces, run_isolated

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_namespaces()
    workdir = tmp_path_factory.mktemp("autoscaling")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own cluster, no token
    env.update(HOME=str(workdir), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    proc = run_isolated([sys.executable, "-m", "tests.stages.autoscaling_cluster", str(workdir)], cwd=REPO, env=env,
                        timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return json.loads((workdir / "observations.json").read_text())


def test_a_fixed_pool_sized_from_the_present_nodes_is_refused(run):
    assert (run["cpus_at_start"], run["nodes_at_start"]) == (0.0, 1)
    assert run["fixed_pool_error"] and "ray.cpus_per_actor=2" in run["fixed_pool_error"], run["fixed_pool_error"]
    assert not run["committed_after_fixed"]


def test_an_autoscaling_pool_grows_the_cluster_and_commits_every_image_on_an_added_node(run):
    assert not run["skipped"]
    added = {n["node_id"] for n in run["nodes"] if n["node_id"] != run["head_node"] and n["cpus"] > 0}
    assert len(added) == 2, run["nodes"]  # one for the actor, one for the tasks that feed it
    nodes = run["manifest"]["nodes"]["train_tokens"]
    assert set(nodes) <= added and sum(n["images"] for n in nodes.values()) == len(run["train_ids"])
    assert run["stored_ids"] == run["train_ids"]  # every image once, nothing lost
    assert run["rows"] == len(run["train_ids"]) * run["tokens_per_image"]
    print(f"\n[autoscaling] cluster start {run['seconds']['cluster_start']:.1f} s, extract {run['seconds']['extract']:.1f} s "
          f"on {len(added)} added node(s); work by node: { {k[-5:]: v['images'] for k, v in nodes.items()} }")

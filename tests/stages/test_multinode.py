"""Extraction and DDP SAE training on a simulated three-node cluster (head + 2 workers), with real faults.

The cluster lives in a subprocess (tests/stages/multinode_cluster.py: node sizes, why the work
must spread, and how the faults are triggered): the session's shared local Ray instance stays as
it is. This test reads what that process committed and observed.

The faults, all real process deaths rather than exceptions raised by our code:
- extraction, once some token part files are on storage and both actors have begun batches: the
  pool actor process on worker node 0 is SIGKILLed mid-batch; once the other actor has begun a
  batch since, worker node 1 is removed mid-batch (its raylet, actor, decode tasks and object
  store) and a replacement node added, as KubeRay / the autoscaler would.
  Ray restarts both actors (Ray Data's pool default max_restarts=-1) and retries their batches
  (max_task_retries=-1; decode tasks max_retries=-1, lost blocks rebuilt from lineage).
- SAE training: the last Train worker SIGKILLs itself at step 13; Ray Train restarts the group
  from the step-9 checkpoint.

Why the assertions prove nothing lost and nothing doubled:
- lost: every input image id except the planted reject is in the stored token table, the reject
  is in ``rejects``, and the manifest's row counts match; a batch that died with its actor or its
  node and were never redone would be missing from the table by id;
- doubled: each used image id has exactly ``tokens_per_image`` rows and no (image_id, position)
  appears twice; a redone batch written under a new name beside its first copy, or a batch
  counted twice in the driver's tally, would break these (the tally must also sum to the table);
- mid-stage, so that the test would fail without the faults: both actors had begun batches before
  the kill, the part files present at each fault are a non-empty, strict subset of the committed
  ones (work done before, work still to do after),
  Ray's actor table shows each pool actor restarted exactly once, and rows came from the
  replacement node, which did not exist when the stage started;
- training: the killed process is recorded by Ray as WORKER_DIED, the run resumed from step 9, ends
  at the same step count as a run without a fault, and logs no step twice.

It also holds properties tests/stages/test_train_sae.py used to check in Ray Train runs of its
own on one node: two DDP workers (one step = one batch per worker, the averaged gradients train
the dictionary, decoder rows stay unit-norm), here on two nodes with gloo between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from scope_ray.sae import BatchTopKSAE
from scope_ray.storage import ResultsRoot

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, never the session's
    proc = subprocess.run([sys.executable, "-m", "tests.stages.multinode_cluster", str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return workdir, json.loads(proc.stdout.strip().splitlines()[-1])


def test_extraction_faults_fired_mid_stage(run):
    _, obs = run
    node0, node1 = obs["worker_nodes"]
    faults = obs["extraction_faults"]
    assert "actor_kill" in faults and "node_loss" in faults, f"the faults did not fire mid-stage: {faults}"
    kill, loss = faults["actor_kill"], faults["node_loss"]
    committed = set(obs["extract"]["tables"]["train_tokens"])
    # Both actors of the pool got batches before the kill: the split reaches the pool one batch a
    # block (stages/cluster.py one_block_per_batch), not as one block that a single actor takes whole.
    first = [a["pid"] for a in obs["extraction_actors"] if a["t"] < kill["t"]]
    assert len(first) == 2
    assert all(any(b["pid"] == pid and b["t"] < kill["t"] for b in obs["extraction_batches"]) for pid in first)
    # The actor on node 0 was killed after some batches were written and before the others.
    assert kill["node_id"] == node0
    assert kill["parts_before"] and set(kill["parts_before"]) < committed
    # Node 1 was removed later still, after the survivor wrote more, and before the last batches.
    assert loss["removed"] == node1 and node1 not in obs["live_worker_nodes"]
    assert set(kill["parts_before"]) <= set(loss["parts_before"]) < committed
    # Ray restarted each pool actor once: the killed one on its own node (a new process), the lost
    # node's one on the replacement node, which then produced rows.
    assert obs["extraction_pool_restarts"] == [1, 1]
    restarted = [a for a in obs["extraction_actors"] if a["t"] > kill["t"]]
    assert {a["node_id"] for a in restarted} == {node0, loss["replacement"]}
    assert kill["pid"] not in {a["pid"] for a in restarted}
    nodes = obs["extract"]["nodes"]["train_tokens"]
    assert loss["replacement"] not in obs["worker_nodes"] and nodes[loss["replacement"]]["rows"] > 0
    assert set(nodes) <= {node0, node1, loss["replacement"]}


def test_extraction_lost_nothing_and_doubled_nothing(run):
    _, obs = run
    m, per_image = obs["extract"], obs["tokens_per_image"]
    used = sorted(set(obs["train_image_ids"]) - set(obs["planted_reject_ids"]))
    stored = obs["stored_tokens"]
    # Every used image id exactly tokens_per_image times, no other id, no (image, position) twice.
    assert Counter(stored["image_id"]) == {image_id: per_image for image_id in used}
    pairs = list(zip(stored["image_id"], stored["position"]))
    assert len(set(pairs)) == len(pairs)
    assert all(0 <= p < obs["num_patches"] for p in stored["position"])
    assert sorted(obs["stored_rejects"]) == sorted(obs["planted_reject_ids"])
    # The manifest says the same, and the driver's per-node tally counted every batch once.
    assert m["rows"] == {"train_tokens": len(used) * per_image, "rejects": len(obs["planted_reject_ids"])}
    nodes = m["nodes"]["train_tokens"]
    assert sum(n["rows"] for n in nodes.values()) == len(pairs)
    assert sum(n["images"] for n in nodes.values()) == len(obs["train_image_ids"])
    assert obs["head_node"] not in nodes  # 0 CPUs: no actor there


def test_two_train_workers_survive_a_killed_worker_and_train_one_dictionary(run):
    workdir, obs = run
    m = obs["train_sae"]
    assert [w["rank"] for w in m["workers"]] == [0, 1]
    # The two live worker nodes (node 0 and the replacement) hold one Train worker each.
    assert sorted(w["node_id"] for w in m["workers"]) == sorted(obs["live_worker_nodes"]), m["workers"]
    # Each step consumes one global batch of 128 tokens, 64 per worker (2 epochs over the extracted tokens).
    assert m["steps"] == 2 * (obs["extract"]["rows"]["train_tokens"] // 128)  # sae.batch_size is the global batch
    assert m["final"]["fvu"] < 1.0
    stage = ResultsRoot(str(workdir / "results")).stage("demo-planted", "train-sae")
    log = stage.read_table("training_log").to_pylist()
    assert log[-1]["fvu"] < log[0]["fvu"]  # the two workers' averaged gradients do train it
    # The last rank's process was killed at step 13 (Ray saw its process die, rather than killing
    # it), and the restarted group resumed from the last checkpoint before it.
    fault = obs["train_fault"]
    assert fault["rank"] == 1 and fault["step"] == obs["fault_step"] == 13
    assert fault["ray_death_reasons"] == ["WORKER_DIED"], fault
    assert m["resumed_from_steps"] == [9]  # checkpoint_every=9
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps)) and steps[-1] == m["steps"]  # no step logged twice
    sae = BatchTopKSAE.load(str(workdir / "results" / "demo-planted" / "train-sae" / m["sae_file"]))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)

"""Extraction and DDP SAE training spread over a simulated three-node cluster (head + 2 workers).

The cluster lives in a subprocess (tests/stages/multinode_cluster.py: node sizes and why the work
must spread): the session's shared local Ray instance stays as it is. This test reads what that
process committed and checks where the work ran and that the outputs are the stage's own.

It also holds properties tests/stages/test_train_sae.py used to check in Ray Train runs of its
own on one node: two DDP workers (one step = one batch per worker, the averaged gradients train
the dictionary, decoder rows stay unit-norm) and a worker failure (the group restarts from the
last checkpoint and ends at the same step count, no step logged twice). Here the two workers are
on two nodes, gloo between them, and the failure restarts the group across both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_extraction_rows_come_from_both_worker_nodes(run):
    _, obs = run
    m = obs["extract"]
    images_in = obs["train_files"]  # counted on disk by the script, the planted truncated JPEG included
    used = images_in - obs["planted_rejects"]
    assert m["rows"]["rejects"] == obs["planted_rejects"]
    assert m["rows"]["train_tokens"] == used * obs["tokens_per_image"]
    assert obs["train_rows_stored"] == m["rows"]["train_tokens"] and obs["train_images_stored"] == used
    nodes = m["nodes"]["train_tokens"]
    # Both worker nodes produced rows, the head (0 CPUs) none; the tally accounts for every row and image.
    assert set(nodes) == set(obs["worker_nodes"]), (nodes, obs)
    assert all(n["rows"] > 0 for n in nodes.values())
    assert sum(n["rows"] for n in nodes.values()) == m["rows"]["train_tokens"]
    assert sum(n["images"] for n in nodes.values()) == images_in


def test_two_train_workers_on_two_nodes_train_one_dictionary(run):
    workdir, obs = run
    m = obs["train_sae"]
    assert [w["rank"] for w in m["workers"]] == [0, 1]
    assert {w["node_id"] for w in m["workers"]} == set(obs["worker_nodes"]), m["workers"]
    # Each step consumes one batch per worker (batch 64, 2 epochs over the extracted tokens).
    assert m["steps"] == 2 * (obs["extract"]["rows"]["train_tokens"] // (2 * 64))
    assert m["final"]["fvu"] < 1.0
    stage = ResultsRoot(str(workdir / "results")).stage("demo-planted", "train-sae")
    log = stage.read_table("training_log").to_pylist()
    assert log[-1]["fvu"] < log[0]["fvu"]  # the two workers' averaged gradients do train it
    # The injected failure fired and the restarted group resumed from the last checkpoint before it.
    assert obs["fault_fired"]
    assert m["resumed_from_steps"] == [9] and obs["fault_step"] == 13  # checkpoint_every=9
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps)) and steps[-1] == m["steps"]  # no step logged twice
    sae = BatchTopKSAE.load(str(workdir / "results" / "demo-planted" / "train-sae" / m["sae_file"]))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)

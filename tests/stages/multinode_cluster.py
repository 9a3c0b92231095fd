"""Extraction and two-worker SAE training on a simulated three-node Ray cluster.

Run by tests/stages/test_multinode.py as ``python -m tests.stages.multinode_cluster WORKDIR``, in a
process of its own: the test session's shared local Ray instance is never touched, and this
process shuts its cluster down before it exits. It prints one JSON line of observations (the
committed manifests, the worker nodes' ids, what is on storage) for the test to check.

The nodes (``ray.cluster_utils.Cluster``: separate raylets and object stores on this machine):
- head: 0 CPUs, as on a KubeRay head that does no work; the driver and Ray Train's controller
  (0 CPUs, pinned to the driver's node) live there;
- two workers: 3 CPUs each, 150 MB object store each.

Why the work must spread, rather than merely may:
- extraction: each model actor asks for 2 CPUs (``ray.cpus_per_actor``), so one node holds only
  one actor: the pool of two has an actor on each worker node whatever the scheduling strategy
  (Ray Data schedules pool actors with DataContext.scheduling_strategy, default "SPREAD", which
  is only a preference). Which actor gets which batch is Ray Data's choice (least busy actor,
  preferring one on the node holding the batch); the pool is made to wait for both actors
  (``wait_for_min_actors_s``) and the split has several batches, so both get work.
- SAE training: each Train worker asks for the same 2 CPUs. ScalingConfig's default
  ``placement_strategy`` is "PACK", which would put both workers on one node if one node could
  hold them; none can, so the placement group's two bundles land on the two worker nodes.
The one CPU each node keeps beside its actor / Train worker is not slack: Ray Data's file-listing
task (``ListFiles``, the first step of ``read_parquet`` in Ray 2.60) asks for a whole CPU and
cannot be told otherwise, so with 0.5 CPU free per node train-sae's token read never starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

WORKER_NODES = 2
WORKER_CPUS = 3
ACTOR_CPUS = 2  # > WORKER_CPUS / 2: one actor (or Train worker) per node
OBJECT_STORE_BYTES = 150 * 1024 * 1024
TRAIN_IMAGES, BATCH = 24, 4  # 7 batches with the planted reject: work for both actors
PLANTED_REJECTS = 1
FAULT_STEP = 13


def _write_data(workdir: Path) -> dict:
    """A small demo-style ImageNet train folder (plus one truncated JPEG the stage must reject)."""
    from scope_ray.data.images import bad_image_samples
    from scope_ray.data.synthetic import write_image_folder, write_synthetic

    sources = write_synthetic(str(workdir / "data"), n_train=TRAIN_IMAGES, n_val=0, size=112,
                              num_classes=10, seed=0, formats=("folder",),
                              counts={"ade20k": (0, 0), "nyud": (0, 0)})
    train = sources["imagenet"]["folder"]["train"]
    write_image_folder(train["path"], {"n00000000/zz_truncated.JPEG": bad_image_samples()["truncated"][0]})
    return {"train": train}


def _job(workdir: Path, data: dict):
    from scope_ray.config import load_config
    from scope_ray.demo import demo_spec

    spec = demo_spec()
    spec["data"] = {"imagenet": data}
    spec["storage"] = {"root": str(workdir / "results")}
    spec["extract"]["val_split"] = None  # a second pass would show nothing new about placement
    return load_config(spec, [
        f"extract.batch_size={BATCH}", "ray.num_actors=2", f"ray.cpus_per_actor={ACTOR_CPUS}", "ray.torch_threads=1",
        # 2 workers x 64 tokens a step: 9 steps an epoch over the 24 x 49 tokens, logged every 3.
        "sae.num_workers=2", "sae.epochs=2", "sae.batch_size=64", "sae.log_every=3", "sae.checkpoint_every=9",
    ])


def main(workdir: Path) -> dict:
    # Cluster writes its address to <Ray temp dir>/ray_current_cluster, where a plain ray.init()
    # anywhere on the machine (another test session's local instance) would find it and join this
    # cluster instead of starting its own. A private temp dir keeps it to this process. Short: Ray's
    # Unix socket paths live under it and are limited to ~107 characters.
    private_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    os.environ["RAY_TMPDIR"] = private_tmp
    try:
        return _run(workdir)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def _run(workdir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train's 2-s worker-group poll and its preemption watcher are start-up cost only here
    # (as for probe trials: scope_ray/stages/probe.py TRAIN_ENV); set before the controller starts.
    from scope_ray.stages.probe import TRAIN_ENV

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    seconds, t = {}, time.perf_counter()
    data = _write_data(workdir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES,
                                                                "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=OBJECT_STORE_BYTES)
                   for _ in range(WORKER_NODES)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        seconds["cluster_start"], t = time.perf_counter() - t, time.perf_counter()
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.wait_for_min_actors_s = 120  # dispatch only once the whole pool is up (see the docstring)

        from scope_ray.stages.extract import run_extract
        from scope_ray.stages.train_sae import run_train_sae
        from scope_ray.storage import ResultsRoot

        job = _job(workdir, data)
        root = ResultsRoot(job.storage.root)
        run_extract(job, root, progress=False, log=lambda *_: None)
        seconds["extract"], t = time.perf_counter() - t, time.perf_counter()
        # One worker fails at step 13 (once: the marker file): Ray Train restarts the group on the
        # two nodes from the step-9 checkpoint.
        run_train_sae(job, root, log=lambda *_: None, fault_at_step=FAULT_STEP, fault_marker=str(workdir / "fault"))
        seconds["train_sae"] = time.perf_counter() - t
        extract = root.stage(job.model.name, "extract")
        train_ids = extract.read_table("train_tokens", columns=["image_id"]).column("image_id")
        return {
            "head_node": cluster.head_node.node_id,
            "worker_nodes": [w.node_id for w in workers],
            "train_files": sum(1 for p in Path(data["train"]["path"]).rglob("*") if p.is_file()),
            "planted_rejects": PLANTED_REJECTS,
            "fault_step": FAULT_STEP,
            "fault_fired": (workdir / "fault").exists(),
            "tokens_per_image": job.extract.tokens_per_image,
            "num_patches": job.model.spec.num_patches,
            "train_rows_stored": len(train_ids),
            "train_images_stored": len(set(train_ids.to_pylist())),
            "extract": extract.manifest(),
            "train_sae": root.stage(job.model.name, "train-sae").manifest(),
            "seconds": seconds,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

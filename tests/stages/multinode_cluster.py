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
  hold them; none can, so the placement group's two bundles land on the two worker nodes (by
  then worker node 0 and the replacement for the lost node 1).

Faults (``_inject_extraction_faults``, a ``scope_ray.faults`` plan of kind "kill" for train-sae): during extraction the
driver SIGKILLs one pool actor's process, then removes the other worker node and adds a
replacement; during SAE training the last Train worker SIGKILLs itself at step 13. Each batch of
the extraction is paced (``PacedExtractor``, test-only) so that the faults, triggered by part files
appearing on storage, land mid-stage: after some batches, before others.

The one CPU each node keeps beside its actor / Train worker is not slack: Ray Data's file-listing
task (``ListFiles``, the first step of ``read_parquet`` in Ray 2.60) asks for a whole CPU and
cannot be told otherwise, so with 0.5 CPU free per node train-sae's token read never starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

WORKER_NODES = 2
WORKER_CPUS = 3
ACTOR_CPUS = 2  # > WORKER_CPUS / 2: one actor (or Train worker) per node
OBJECT_STORE_BYTES = 150 * 1024 * 1024
TRAIN_IMAGES, BATCH = 24, 3  # 9 batches with the planted reject: work for both actors, before and after each fault
PLANTED_REJECT_IDS = ["n00000000/zz_truncated.JPEG"]
FAULT_STEP = 13
# Each extraction batch waits this long before its work (PacedExtractor): the split then spans a
# few seconds, so the faults below land between batches that are done and batches still to come.
BATCH_PACE_S = 1.0
POLL_S = 0.05
BATCHES_LOG = "batches.jsonl"


def _write_data(workdir: Path) -> dict:
    """A small demo-style ImageNet train folder (plus one truncated JPEG the stage must reject)."""
    from scope_ray.data.images import bad_image_samples
    from scope_ray.data.synthetic import write_image_folder, write_synthetic

    sources = write_synthetic(str(workdir / "data"), n_train=TRAIN_IMAGES, n_val=0, size=112,
                              num_classes=10, seed=0, formats=("folder",),
                              counts={"ade20k": (0, 0), "nyud": (0, 0)})
    train = sources["imagenet"]["folder"]["train"]
    write_image_folder(train["path"], {PLANTED_REJECT_IDS[0]: bad_image_samples()["truncated"][0]})
    return {"train": train}


def _paced_extractor(registry: Path):
    """The stage's own TokenExtractor, slowed by BATCH_PACE_S a batch, each (re)started actor
    writing ``registry/<pid>.json`` = {"pid", "node_id"} once it is ready and a line to
    ``registry/BATCHES_LOG`` for each batch it begins: the fault injector learns from them which
    process to kill and when, and the test that both actors got work and Ray really restarted them."""
    from scope_ray.stages.extract import TokenExtractor

    class PacedExtractor(TokenExtractor):
        registry_dir = str(registry)  # a class attribute: pickled with the class, read on the actor

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            me = {"pid": os.getpid(), "node_id": self.node["node_id"], "t": time.time()}
            entry = Path(self.registry_dir) / f"{os.getpid()}.json"
            entry.with_suffix(".tmp").write_text(json.dumps(me))
            entry.with_suffix(".tmp").replace(entry)  # the injector never reads a half-written entry

        def __call__(self, batch):
            # One line per batch begun, appended whole (O_APPEND): which actor got work, and when.
            with open(Path(self.registry_dir) / BATCHES_LOG, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "t": time.time(), "images": len(batch["image_id"])}) + "\n")
            time.sleep(BATCH_PACE_S)
            return super().__call__(batch)

    return PacedExtractor


def _wait(condition, stop: threading.Event) -> bool:
    """Poll ``condition`` until it holds (True) or the stage has ended (False)."""
    while not stop.is_set():
        if condition():
            return True
        time.sleep(POLL_S)
    return False


def _inject_extraction_faults(cluster, workers: list, parts: Path, registry: Path, stop: threading.Event,
                              events: dict) -> None:
    """Runs beside the extraction stage (in the driver), triggered by what is on storage.

    1. Once some token part files exist, both pool actors have begun a batch, and the one on worker
       node 0 is in the middle of one: SIGKILL that actor's process. Ray restarts the actor (Ray Data's pool actors have max_restarts=-1) on the
       same node, the only one with 2 free CPUs, and retries its batches (max_task_retries=-1).
    2. Once the surviving actor has begun a batch since the kill (while the killed one restarts) and
       is still in it: remove worker node 1 with the actor, decode tasks and object store on it (its processes get
       SIGTERM, as a deleted pod's container does), then add a replacement 3-CPU node.

    Why a replacement node: it is what the project's clusters do. Both cluster/kuberay and
    cluster/aws-gpu.yaml keep a minimum worker count (KubeRay's operator recreates a deleted worker
    pod; the autoscaler starts nodes for pending resource demand, here the lost actor's restart
    asking for 2 CPUs), so after a node loss the stage goes on on a node with a new id, an empty
    object store and nothing cached. Ray Data 2.60 would also finish without it (tried here: the
    lost actor's restart waits until the surviving actor runs out of input and is released, then
    takes its place and runs the batches it was holding; with this few batches it took as long), so
    the replacement is not what makes the stage correct.
    ``events`` records what fired and which part files existed at that moment."""
    def names() -> list[str]:
        return sorted(p.name for p in parts.glob("*.parquet"))

    def actors() -> list[dict]:
        return [json.loads(p.read_text()) for p in registry.glob("*.json")]

    def begun() -> dict[int, float]:
        """pid -> when that actor began its latest batch."""
        log = registry / BATCHES_LOG
        latest: dict[int, float] = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            b = json.loads(line)
            latest[b["pid"]] = max(latest.get(b["pid"], 0.0), b["t"])
        return latest

    def mid_batch(pid: int) -> bool:
        # Began a batch less than half a pace ago: it holds a batch it has not finished, which Ray
        # must then redo on the actor's restart (so the restarted actor provably gets work).
        return time.time() - begun().get(pid, 0.0) < BATCH_PACE_S / 2

    node0, node1 = (w.node_id for w in workers)

    def first_actor(node_id: str) -> dict | None:
        return next((a for a in actors() if a["node_id"] == node_id), None)

    def ready_to_kill() -> bool:
        # Both first actors have begun a batch (both hold work; neither was released idle), a part
        # is on storage (work done before the fault), and the victim is mid-batch.
        victim, other = first_actor(node0), first_actor(node1)
        return (bool(names()) and victim is not None and other is not None
                and other["pid"] in begun() and mid_batch(victim["pid"]))

    if not _wait(ready_to_kill, stop):
        events["not_fired"] = {"actors": actors(), "begun": begun(), "parts": names()}
        return
    victim, survivor = first_actor(node0), first_actor(node1)
    before = names()
    os.kill(victim["pid"], signal.SIGKILL)
    events["actor_kill"] = {**victim, "parts_before": before, "t": time.time()}
    # Node 1 goes once its actor has begun a batch since the kill and is still in it.
    killed_at = events["actor_kill"]["t"]
    if not _wait(lambda: begun().get(survivor["pid"], 0.0) > killed_at and mid_batch(survivor["pid"]), stop):
        events["not_fired"] = {"node_loss": "node 1's actor began no batch after the kill", "begun": begun()}
        return
    before = names()
    cluster.remove_node(workers[1])
    events["node_loss"] = {"removed": node1, "parts_before": before, "t": time.time()}
    replacement = cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=OBJECT_STORE_BYTES)
    events["node_loss"]["replacement"] = replacement.node_id


def _gcs_actors() -> list[dict]:
    """Ray's actor table, dead actors included (restart counts, pids, death causes). Read from the
    GCS: the public state API (ray.util.state) needs the dashboard, which this cluster does not start."""
    import ray._private.state

    return list(ray._private.state.actors().values())


def _death_reason(actor: dict) -> str:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    return ActorDiedErrorContext.Reason.Name(actor["DeathCause"].actor_died_error_context.reason)


def _job(workdir: Path, data: dict):
    from scope_ray.config import load_config
    from scope_ray.demo import demo_spec

    spec = demo_spec()
    spec["data"] = {"imagenet": data}
    spec["storage"] = {"root": str(workdir / "results")}
    spec["extract"]["val_split"] = None  # a second pass would show nothing new about placement
    return load_config(spec, [
        f"extract.batch_size={BATCH}", "ray.num_actors=2", f"ray.cpus_per_actor={ACTOR_CPUS}", "ray.torch_threads=1",
        # A global batch of 128 tokens, 64 per worker: 9 steps an epoch over the 24 x 49 tokens, logged every 3.
        "sae.num_workers=2", "sae.epochs=2", "sae.batch_size=128", "sae.log_every=3", "sae.checkpoint_every=9",
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

        import scope_ray.stages.extract as extract_stage
        from scope_ray.stages.extract import run_extract
        from scope_ray import faults
        from scope_ray.stages.train_sae import run_train_sae
        from scope_ray.storage import ResultsRoot

        job = _job(workdir, data)
        root = ResultsRoot(job.storage.root)
        registry = workdir / "actors"
        registry.mkdir()
        extract_stage.TokenExtractor = _paced_extractor(registry)  # what _stream_split builds its pool from
        parts = Path(root.stage(job.model.name, "extract").table_path("train_tokens"))
        # The stage runs in a thread and the faults come from this main thread: Cluster.add_node
        # installs a SIGTERM handler, which Python allows only there.
        stop, events, failure = threading.Event(), {}, []

        def extract() -> None:
            try:
                run_extract(job, root, progress=False, log=lambda *_: None)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the main thread
                failure.append(exc)
            finally:
                stop.set()

        stage_thread = threading.Thread(target=extract, name="extract")
        stage_thread.start()
        _inject_extraction_faults(cluster, workers, parts, registry, stop, events)
        stage_thread.join()
        if failure:
            raise failure[0]
        seconds["extract"], t = time.perf_counter() - t, time.perf_counter()
        pool_restarts = sorted(a["NumRestarts"] for a in _gcs_actors()
                               if a["ActorClassName"].startswith("MapWorker(MapBatches("))
        # The last Train worker SIGKILLs itself at step 13 (once: the marker file): Ray Train restarts
        # the group on the two live worker nodes from the step-9 checkpoint.
        train_fault = workdir / "train-fault.json"
        with faults.injected("train-sae", step=FAULT_STEP, marker=str(train_fault), kind="kill"):
            run_train_sae(job, root, log=lambda *_: None)
        seconds["train_sae"] = time.perf_counter() - t
        killed = json.loads(train_fault.read_text()) if train_fault.exists() else None
        if killed:
            # Ray's reason for the killed worker's death: WORKER_DIED (its process vanished), not
            # RAY_KILL (what Ray Train does to the other workers when it tears the group down).
            killed["ray_death_reasons"] = [_death_reason(a) for a in _gcs_actors() if a["Pid"] == killed["pid"]]
        extract = root.stage(job.model.name, "extract")
        stored = extract.read_table("train_tokens", columns=["image_id", "position"])
        train_root = Path(data["train"]["path"])
        return {
            "head_node": cluster.head_node.node_id,
            "worker_nodes": [w.node_id for w in workers],
            "live_worker_nodes": [w.node_id for w in cluster.worker_nodes],
            "train_image_ids": sorted(str(p.relative_to(train_root)) for p in train_root.rglob("*") if p.is_file()),
            "planted_reject_ids": PLANTED_REJECT_IDS,
            "fault_step": FAULT_STEP,
            "extraction_faults": events,
            "extraction_actors": [json.loads(p.read_text()) for p in registry.glob("*.json")],
            "extraction_batches": [json.loads(line) for line in (registry / BATCHES_LOG).read_text().splitlines()],
            "extraction_pool_restarts": pool_restarts,
            "train_fault": killed,
            "tokens_per_image": job.extract.tokens_per_image,
            "num_patches": job.model.spec.num_patches,
            "stored_tokens": {"image_id": stored.column("image_id").to_pylist(),
                              "position": stored.column("position").to_pylist()},
            "stored_rejects": extract.read_table("rejects", columns=["image_id"]).column("image_id").to_pylist(),
            "extract": extract.manifest(),
            "train_sae": root.stage(job.model.name, "train-sae").manifest(),
            "seconds": seconds,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

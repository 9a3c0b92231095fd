"""Extraction on an autoscaling Ray cluster that starts with no worker node (issue 18.2).

Run by tests/stages/test_autoscaling.py as ``python -m tests.stages.autoscaling_cluster WORKDIR``
inside PID and network namespaces of its own (``unshare``): the head runs on Ray's default ports
and is stopped with ``ray stop --force``, which stops every Ray process it can see; inside the
namespaces that is only this cluster, never the test session's Ray. It prints one JSON line of
observations (WORKDIR/observations.json) for the test to check.

The cluster is what ``ray.cluster_utils.AutoscalingCluster`` makes (whose base config file the
Ray wheel does not ship, so the config is written here): ``ray start --head`` with an autoscaling
config for the autoscaler's fake multi-node provider (RAY_FAKE_CLUSTER): real raylets on this
machine, started and stopped by the real autoscaler. A head with 0 CPUs, as a KubeRay head that
does no work, and one worker node type of 2 CPUs, 0 to 2 nodes, none at the start.

Each model actor asks for a whole worker node (2 CPUs), so no node can hold an actor and the read
and decode tasks that feed it; a second node must come for those.

1. A fixed pool (``ray.max_actors`` unset) is sized and checked against the nodes present when
   the stage starts (none, or the one node its first read task made the autoscaler add): it is
   refused at once, naming the CPUs it found, and nothing is committed.
2. ``ray.max_actors=1``: the pool is Ray Data's autoscaling pool, not checked against the present
   nodes. The actor's pending request and its feeders' make the autoscaler add worker nodes,
   and the stage commits every image, computed on an added node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRAIN_IMAGES, BATCH = 16, 4
WORKER_CPUS, WORKER_NODES_MAX = 2, 2
ACTOR_CPUS = WORKER_CPUS  # a whole node per actor: its feeders need another node


def _job(workdir: Path, data: dict, overrides: list[str]):
    from scope_ray.config import load_config
    from scope_ray.demo import demo_spec

    spec = demo_spec()
    spec["data"] = {"imagenet": data}
    spec["storage"] = {"root": str(workdir / "results")}
    spec["extract"]["val_split"] = None
    return load_config(spec, [f"extract.batch_size={BATCH}", "ray.torch_threads=1", "ray.address=auto", *overrides])


def _autoscaling_config() -> dict:
    """The fake multi-node provider's cluster config: a 0-CPU head, one 2-CPU worker type (0..2)."""
    commands = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "scope-ray-autoscaling-test", "max_workers": WORKER_NODES_MAX,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {"resources": {"CPU": WORKER_CPUS}, "node_config": {}, "min_workers": 0, "max_workers": WORKER_NODES_MAX}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{c: [] for c in commands}}


def _start_head(workdir: Path) -> None:
    config = workdir / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config()))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    proc = subprocess.run(["ray", "start", "--head", "--num-cpus=0", f"--autoscaling-config={config}",
                           "--include-dashboard=false"], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start exited with {proc.returncode}: {proc.stderr[-3000:]}")


def main(workdir: Path) -> dict:
    import ray

    from scope_ray.data.synthetic import write_synthetic
    from scope_ray.stages.cluster import ClusterResourceError, connect
    from scope_ray.stages.extract import run_extract
    from scope_ray.storage import ResultsRoot

    sources = write_synthetic(str(workdir / "data"), n_train=TRAIN_IMAGES, n_val=0, size=112, num_classes=4, seed=0,
                              formats=("folder",), counts={"ade20k": (0, 0), "nyud": (0, 0)})
    data = {"train": sources["imagenet"]["folder"]["train"]}
    t = time.perf_counter()
    _start_head(workdir)
    out: dict = {"seconds": {}}
    try:
        fixed = _job(workdir, data, [])
        connect(fixed.ray, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        out["cpus_at_start"] = ray.cluster_resources().get("CPU", 0.0)
        out["nodes_at_start"] = len([n for n in ray.nodes() if n["Alive"]])
        out["seconds"]["cluster_start"], t = time.perf_counter() - t, time.perf_counter()
        root = ResultsRoot(fixed.storage.root)
        fixed = _job(workdir, data, [f"ray.cpus_per_actor={ACTOR_CPUS}"])
        try:
            run_extract(fixed, root, progress=False, log=lambda *_: None)
            out["fixed_pool_error"] = None
        except ClusterResourceError as exc:
            out["fixed_pool_error"] = str(exc)
        out["committed_after_fixed"] = root.stage(fixed.model.name, "extract").manifest() is not None
        lines: list[str] = []
        autoscaled = _job(workdir, data, ["ray.max_actors=1", f"ray.cpus_per_actor={ACTOR_CPUS}"])
        result = run_extract(autoscaled, root, progress=False, log=lines.append)
        out["skipped"] = result.skipped
        out["seconds"]["extract"] = time.perf_counter() - t
        stage = root.stage(autoscaled.model.name, "extract")
        out.update(
            lines=lines, rows=result.counts["train_tokens"].rows, images=result.counts["train_tokens"].images,
            manifest=stage.manifest(),
            stored_ids=sorted(set(stage.read_table("train_tokens", columns=["image_id"]).column("image_id").to_pylist())),
            nodes=[{"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0)}
                   for n in ray.nodes()],
            head_node=ray.get_runtime_context().get_node_id(),
            train_ids=sorted(str(p.relative_to(data["train"]["path"])) for p in Path(data["train"]["path"]).rglob("*")
                             if p.is_file()),
            tokens_per_image=autoscaled.extract.tokens_per_image)
        return out
    finally:
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)  # this namespace's only


if __name__ == "__main__":
    # A file, not stdout: Ray's own lines at exit would follow a printed result.
    workdir = Path(sys.argv[1])
    (workdir / "observations.json").write_text(json.dumps(main(workdir)))

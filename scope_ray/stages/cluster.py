"""Connecting to Ray and sizing actor requests against what the cluster really has."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from scope_ray.config import JobConfig, RayConfig
from scope_ray.logs import info


class ClusterResourceError(RuntimeError):
    """The job asks for resources the cluster does not have (Ray itself would wait forever)."""


def connect(cfg: RayConfig, *, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster ``cfg.address`` (or RAY_ADDRESS) names, or start a local instance.

    ``log_to_driver=False`` keeps the actors' own log lines (Ray Train's per-worker chatter) out of
    the terminal; the stages' progress lines come from the driver either way, and errors still
    surface as exceptions."""
    import ray

    quiet_ray(cfg.log_level)
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    level = getattr(logging, cfg.log_level.upper())
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, logging_level=level)


RAY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train")


def quiet_ray(level: str) -> None:
    """Ray's own loggers in this process at ``level`` (ray.log_level). Ray Data configures its
    logger when first imported, so it is imported before the level is set. Tune's current console
    output prints its tables whatever ``verbose`` says; below info, its legacy reporter (which
    honours ``verbose=0``) is asked for instead, unless RAY_AIR_NEW_OUTPUT is already set."""
    import ray.data  # noqa: F401 - configures the ray.data logger, which is then overridden

    numeric = getattr(logging, level.upper())
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    if numeric > logging.INFO:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass(frozen=True)
class ActorResources:
    num_cpus: float
    num_gpus: float
    torch_threads: int
    pool_size: int  # the fixed pool's size, or an autoscaling pool's maximum
    autoscale: bool = False  # ray.max_actors: the pool grows from 1 actor to pool_size

    def strategy(self):
        """Ray Data's compute strategy for the stage's model actors."""
        import ray.data

        if self.autoscale:
            return ray.data.ActorPoolStrategy(min_size=1, max_size=self.pool_size)
        return ray.data.ActorPoolStrategy(size=self.pool_size)


def role_gpus(value: float | str, key: str) -> float:
    """GPUs for one role's workers (``ray.gpus_per_actor`` / ``gpus_per_sae_worker`` /
    ``gpus_per_probe_worker``): 'auto' = 1 when the cluster has GPUs, else 0; a number > 0 fails
    at once on a GPU-less cluster, naming ``key``."""
    import ray

    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    if value == "auto":
        return 1.0 if gpus > 0 else 0.0
    if float(value) > 0 and gpus == 0:
        raise ClusterResourceError(
            f"{key}={value} but the Ray cluster has no GPUs (resources: "
            f"{ {k: v for k, v in total.items() if not k.startswith('node:')} }); "
            f"set {key}=auto or 0 to run on CPUs, or add GPU nodes"
        )
    return float(value)


MIN_ACTOR_CPUS = 0.1  # below this an actor's request stops meaning anything; fail instead


def actor_resources(cfg: RayConfig, task_cpus: float | None = None, log=info) -> ActorResources:
    """What each model actor asks for; for a fixed pool, fails at once where the cluster's present
    nodes cannot hold it (``ray.max_actors``, an autoscaling pool, is not checked: see
    ``_autoscaling_resources``).

    ``task_cpus``: CPUs that must stay free beside the actors so the stage's other tasks can run
    (default: one read task plus one decode task; a stage with bigger tasks passes their size).

    The pool is sized to this job's share of the cluster (``ray.cluster_share`` of its CPUs and
    GPUs; the sweep gives each of N concurrent jobs 1/N). Why: actors hold their CPUs for the whole
    stage while read and decode tasks come and go; two jobs whose actors each take what the cluster
    has, minus one job's feeding tasks, together hold every CPU, and both wait forever (the issue's
    2-CPU head: ``2.0/2.0 CPU``, pending ``{'CPU': 0.25}``). Within its share every job keeps room
    for its own feeding tasks, so each one always makes progress."""
    import ray

    if cfg.max_actors is not None:
        return _autoscaling_resources(cfg, log)
    total = ray.cluster_resources()
    share = cfg.cluster_share
    gpus, cpus = total.get("GPU", 0.0) * share, total.get("CPU", 0.0) * share
    num_gpus = role_gpus(cfg.gpus_per_actor, "ray.gpus_per_actor")
    feeders = cfg.read_cpus + cfg.decode_cpus if task_cpus is None else task_cpus
    actor_cpus = cfg.cpus_per_actor
    if share < 1 and actor_cpus + feeders > cpus + 1e-9 and cpus - feeders >= MIN_ACTOR_CPUS:
        # Ray's CPU numbers are reservations, not limits: a smaller one costs no speed on its own,
        # and keeps this job from taking the CPUs another job's tasks need.
        actor_cpus = round(cpus - feeders, 4)
        log(f"[ray] this job's share of the cluster is {cpus:g} of {total.get('CPU', 0.0):g} CPUs "
            f"(ray.cluster_share={share:g}): each model actor asks for {actor_cpus:g} CPUs instead of "
            f"ray.cpus_per_actor={cfg.cpus_per_actor:g}, leaving {feeders:g} for the tasks that feed it")
    where = f"the cluster's {cpus:g} CPUs" if share == 1 else f"this job's share of {cpus:g} CPUs (ray.cluster_share={share:g})"
    if actor_cpus > cpus:
        raise ClusterResourceError(
            f"ray.cpus_per_actor={actor_cpus:g} exceeds {where}; allowed: up to {cpus:g}"
        )
    pool = cfg.num_actors
    if num_gpus > 0:
        # One actor per GPU is the useful maximum; more would queue forever for a GPU.
        pool = max(1, min(pool, int(gpus // num_gpus)))
    # The actors must leave room for at least one read task and one decode task beside them:
    # a pool holding every CPU starves the tasks that feed it and the stage waits forever.
    fit = int((cpus - feeders + 1e-9) // actor_cpus)
    if fit < 1:
        raise ClusterResourceError(
            f"ray.cpus_per_actor={actor_cpus:g} plus {feeders:g} CPUs for the tasks that run beside the actors "
            f"need more than {where}; lower ray.cpus_per_actor"
        )
    pool = min(pool, fit)
    threads = cfg.torch_threads or max(1, int(actor_cpus))
    return ActorResources(num_cpus=actor_cpus, num_gpus=num_gpus, torch_threads=threads, pool_size=pool)


# How long an autoscaling pool waits for its first actor before the stage fails: Ray Data's default
# (-1) waits forever, which a request no node type can meet (too many CPUs, a GPU on a GPU-less
# cluster) would turn into a hang. Long enough for a cloud node to boot and pull an image.
AUTOSCALE_ACTOR_WAIT_S = 900


def _autoscaling_resources(cfg: RayConfig, log) -> ActorResources:
    """``ray.max_actors``: a pool of 1 to max_actors actors that Ray Data grows while work waits
    and room is free. Nothing is checked against the nodes present: an autoscaling cluster may have
    no worker yet, and the actors' pending requests are what make it add one. Why this does not
    starve the read and decode tasks that feed the pool (the fixed pool's reason for keeping room):
    Ray Data starts another actor only within the operator's resource budget, and a pending actor
    holds nothing. 'auto' GPUs: 1 if the cluster shows a GPU now, else none (an empty cluster shows
    none to detect: set a number there). The first actor is waited for AUTOSCALE_ACTOR_WAIT_S."""
    import ray.data

    # A number is not checked against the GPUs present (role_gpus would refuse it on an empty cluster).
    value = cfg.gpus_per_actor
    num_gpus = role_gpus(value, "ray.gpus_per_actor") if value == "auto" else float(value)
    ctx = ray.data.DataContext.get_current()
    if ctx.wait_for_min_actors_s < 0:
        ctx.wait_for_min_actors_s = AUTOSCALE_ACTOR_WAIT_S
    log(f"[ray] autoscaling actor pool: 1 to {cfg.max_actors} model actors of {cfg.cpus_per_actor:g} CPUs"
        f"{f' and {num_gpus:g} GPUs' if num_gpus else ''} each (ray.max_actors), grown by Ray Data as the cluster has room"
        + (f"; ray.cluster_share={cfg.cluster_share:g} does not apply to it" if cfg.cluster_share < 1 else ""))
    threads = cfg.torch_threads or max(1, int(cfg.cpus_per_actor))
    return ActorResources(num_cpus=cfg.cpus_per_actor, num_gpus=num_gpus, torch_threads=threads,
                          pool_size=cfg.max_actors, autoscale=True)


def one_block_per_batch(ds, batch_size: int):
    """``ds`` re-cut into blocks of ``batch_size`` rows, as it streams (no barrier, order kept).

    Why: an actor pool receives whole blocks, so every row of a block goes to one actor. A read
    step makes blocks of a listing's or a shard's size (hundreds of images), and a map step after it
    keeps them whole; on a small split, or at the head of a large one, one actor of the pool then
    does all the work while the others wait and are released. Blocks of one batch each spread over
    the pool (tests/stages/test_multinode.py: each actor of two got batches), and the CPU steps
    before the pool (decoding) spread over tasks the same way."""
    return ds.repartition(target_num_rows_per_block=batch_size)


def actor_backbone(job: JobConfig, torch_threads: int):
    """What every model actor starts with: torch's thread count set, the job's backbone built at
    its designated layer on the GPU when the actor has one. Returns (model, device)."""
    import torch

    from scope_ray.devices import granted_device
    from scope_ray.models import build_model

    torch.set_num_threads(torch_threads)
    device = granted_device()  # the GPU Ray granted, else the CPU (scope_ray.devices)
    model = build_model(job.model.name, weights=job.model.weights, seed=job.seed, layer=job.model.resolved_layer,
                        endpoint_url=job.storage.endpoint_url).to(device)
    model.precision = job.model.precision
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = job.model.tf32
    return model, device



def this_node() -> dict[str, str]:
    """The Ray node the calling process runs on (``node_id``, ``ip``): stages record it in their
    manifests so a reader can tell which machine produced which rows."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def tally_nodes(tally: dict[str, dict], summary: dict, count_keys: tuple[str, ...] = ("images", "rows")) -> None:
    """Add one batch of actor summaries (parallel arrays ``node_id``, ``node_ip`` and ``count_keys``)
    to ``tally``: node id → {"ip", <count>: total, ...}, the form the manifests store."""
    for i, node in enumerate(summary["node_id"]):
        entry = tally.setdefault(str(node), {"ip": str(summary["node_ip"][i]), **{k: 0 for k in count_keys}})
        for k in count_keys:
            entry[k] += int(summary[k][i])

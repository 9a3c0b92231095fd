"""Linear-probe search (METHOD §9, supp. C; Tables 3 and 8): Ray Tune over Ray Train, per
(task, variant) of the cached probe features.

Reads ``ROOT/<model>/probe-features/`` (``<task>_<split>`` tables, split = train / val; manifest
extras ``width``, ``grid``, ``image_size``, ``variants``); writes ``ROOT/<model>/probe/``:

- ``trials``: one row per finished trial (hyper-parameters, val metric, per-epoch curve, and what
  the trial cost: Tune actor start, Train start-up, data load, training, separately);
- ``best``: the trial best on val per (task, variant), one row each (the layout of Tables 3 / 8).

Shape of the search. For every (task, variant) the search tries ``probes.<task>.trials``
configurations: lr and weight decay log-uniform in the task's ranges, drawn up front from a
generator seeded by (job seed, task), so the same job always tries the same configurations, however
often it is interrupted, and every variant of a task tries the same ones (common random numbers:
variant differences are not search noise). One ``Tuner`` runs the trials of every (task,
variant) pair whose features fit in the object store together (consecutive Tuners beyond that), as
a grid over those draws, so trials of different pairs run side by side. Each trial is a function
trainable that builds a one-worker ``TorchTrainer`` (Train V2; ``Tuner(trainer)`` is deprecated) and
forwards its per-epoch reports to Tune with ``TuneReportCallback``; the worker runs
``scope_ray.probes.train.fit_probe``. Each pair's features are put in the object store once by the
driver; every trial's worker reads the same copy (``docs/probe_search.md`` has the scaling picture
and the measured costs).

Resuming, at two levels.
- Inside a trial: the Train worker reports a checkpoint (``FitState``: head, SGD momentum, LR
  schedule position, epoch, val curve, shuffling state; safetensors + JSON) every
  ``probes.checkpoint_every`` epochs and after the last, and resumes from
  ``ray.train.get_checkpoint()`` when Train hands it one. A worker that dies (process killed, node
  lost) is restarted by Train once (``WORKER_RESTARTS``; node preemptions are counted apart, without
  limit) from the last checkpoint, and the trial ends with exactly the metrics of an uninterrupted
  one; ``resumed_from_epoch`` in ``trials`` says where it picked up.
- Across attempts: a finished trial is recorded by the driver as its own part file of ``trials``,
  the moment Tune reports it complete; a re-run with the same config runs only the trials that have
  no part file (one that was running when the search stopped starts over: its Train run belonged to
  that attempt). This was chosen over ``Tuner.restore``: it does not depend on when Tune last
  snapshotted its experiment state, survives a code change between attempts, and a trial is the
  natural unit here. The manifest is committed last; a complete stage with the same config is
  skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import posixpath
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scope_ray import faults
from scope_ray.logs import info
from scope_ray.pipeline import PROBE as STAGE
from scope_ray.config import JobConfig
from scope_ray.probes.train import METRICS, FitState, ProbeSpec, fit_probe
from scope_ray.stages.cluster import ClusterResourceError
from scope_ray.stages.probe_cache import (
    FEATURES_STAGE,
    TASKS,
    FeatureCache,
    check_schemas,
    class_count,
    load_split,
    pack_units,
    open_cache,
    variant_bytes,
)
from scope_ray.storage import ResultsRoot, StageDir

# A Tune trial here only drives a Train run and waits; the Train worker does the work. Its small
# CPU share is what lets a trial and its worker fit beside each other on a small node.
TRIAL_CPUS = 0.25
TUNE_DIR, TRAIN_DIR, ATTEMPT = "_ray_tune", "_ray_train", "_attempt.json"
# How often Train restarts a trial's dead worker from its last checkpoint before the trial fails.
# Once covers a lost process or node; an error in the loop itself (bad data, a bug) fails again
# the same way, so more restarts would only repeat it. Preemptions are counted apart (no limit).
WORKER_RESTARTS = 1
# Share of the cluster's object store one search's features may take: (task, variant) pairs are
# searched together while they fit in it, in consecutive searches beyond that (ImageNet- /
# ADE20K-size features are several GB per pair; docs/probe_search.md).
OBJECT_STORE_SHARE = 0.5

TRIALS_SCHEMA = pa.schema([
    ("task", pa.string()), ("variant", pa.string()), ("trial", pa.int32()),
    ("lr", pa.float64()), ("weight_decay", pa.float64()),
    ("metric", pa.string()), ("value", pa.float64()), ("diverged", pa.bool_()),
    ("epochs", pa.int32()), ("batch_size", pa.int32()), ("curve", pa.list_(pa.float64())),
    ("train_loss", pa.float64()), ("n_train", pa.int64()), ("n_val", pa.int64()), ("device", pa.string()),
    # The Ray node the trial's Train worker ran on.
    ("node_id", pa.string()),
    # The epoch whose checkpoint the trial's worker resumed from after a restart; 0 = never restarted.
    ("resumed_from_epoch", pa.int32()),
    # Seconds: Tune actor start; Train start-up + teardown (controller, worker group, torch
    # process group); fetching features and building the head; the epochs (training + val).
    ("seconds_actor", pa.float64()), ("seconds_startup", pa.float64()), ("seconds_load", pa.float64()),
    ("seconds_train", pa.float64()), ("seconds_total", pa.float64()),
])
BEST_SCHEMA = pa.schema([
    ("task", pa.string()), ("variant", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
    ("trial", pa.int32()), ("lr", pa.float64()), ("weight_decay", pa.float64()), ("trials", pa.int32()),
])


class InjectedFault(RuntimeError):
    """Raised inside a trial's worker by tests (``scope_ray.faults`` plan ``probe``: ``raise``) to
    interrupt a search. (Its ``kill``: that trial's Train worker SIGKILLs its own process once,
    right after reporting epoch ``after_epoch``; ``marker``, a path on the worker's node, records
    that it did, so the restarted worker goes on.)"""


# ============================================================================ pure helpers
# How the (lr, weight decay) draws are seeded; part of the config hash.
DRAWS = "per task: every variant of a task tries the same configurations"


def sample_configs(seed: int, task: str, n: int, lr_range: Sequence[float],
                   wd_range: Sequence[float]) -> list[dict]:
    """The ``n`` (lr, weight decay) draws of one task's searches, log-uniform, reproducible from the seed.

    Common random numbers: the generator is seeded by (job seed, task) only, so every variant of a
    task (original, high / low / random removed) tries the very same configurations, and with
    ``trial_seed`` the same probe initialisation and shuffling per trial. A difference between two
    variants' best values is then the features', not the luck of separate draws. Trial k's draw
    does not depend on ``n`` (the first 3 of 5 are the 3 of 3)."""
    rng = np.random.default_rng([seed, TASKS.index(task)])

    def loguniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    return [{"trial": i, "lr": loguniform(*lr_range), "weight_decay": loguniform(*wd_range)} for i in range(n)]


def max_concurrent_trials(free: Mapping[str, float], worker_cpus: float, worker_gpus: float,
                          trial_cpus: float = TRIAL_CPUS) -> int:
    """Trials that fit at once: each holds a Tune actor (``trial_cpus``) and a one-worker Train
    group. Ray would start more trial actors than workers it can place and leave them waiting for
    ever; capping Tune at what fits keeps every started trial runnable."""
    per_trial = trial_cpus + worker_cpus
    n = int((free.get("CPU", 0.0) + 1e-9) // per_trial)
    if worker_gpus > 0:
        n = min(n, int((free.get("GPU", 0.0) + 1e-9) // worker_gpus))
    if n < 1:
        need = f"{per_trial:g} CPU" + (f" and {worker_gpus:g} GPU" if worker_gpus else "")
        raise ClusterResourceError(
            f"one probe trial needs {need} (Tune actor {trial_cpus:g} CPU + Train worker ray.cpus_per_actor="
            f"{worker_cpus:g}); the cluster has {free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free")
    return n


def trial_seed(job_seed: int, trial: int) -> int:
    """The seed of trial ``trial``'s probe (head init and shuffling): per trial index, the same in
    every variant (and task), so trial k of two variants differs only in the features."""
    return job_seed * 1_000_003 + trial


def search_trials(job: JobConfig, task: str, variant: str, trials: int | None = None) -> list[dict]:
    """Every trial of the (task, variant) search, as the trial runs it: task, variant, trial, lr,
    weight_decay and seed (the probe's). Everything but ``variant`` is the same for every variant of
    a task (``sample_configs``, ``trial_seed``); a finished trial is found again by (task, variant,
    trial), so a resumed search skips exactly the configurations it already ran."""
    tcfg = getattr(job.probes, task)
    configs = sample_configs(job.seed, task, trials or tcfg.trials, tcfg.lr_range, tcfg.weight_decay_range)
    return [{**c, "task": task, "variant": variant, "seed": trial_seed(job.seed, c["trial"])} for c in configs]


def best_rows(trials: list[dict]) -> list[dict]:
    """The best-on-val trial per (task, variant); diverged (NaN) trials never win; ties: lowest index."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in trials:
        groups.setdefault((row["task"], row["variant"]), []).append(row)
    out = []
    for (task, variant), rows in sorted(groups.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1])):
        sign = 1.0 if METRICS[task][1] == "max" else -1.0
        finite = [r for r in rows if r["value"] is not None and math.isfinite(r["value"])]
        pick = min(finite, key=lambda r: (-sign * r["value"], r["trial"])) if finite else None
        out.append({"task": task, "variant": variant, "metric": METRICS[task][0],
                    "value": pick["value"] if pick else float("nan"), "trial": pick["trial"] if pick else -1,
                    "lr": pick["lr"] if pick else float("nan"),
                    "weight_decay": pick["weight_decay"] if pick else float("nan"), "trials": len(rows)})
    return out


# ============================================================================ worker side
def probe_loop(cfg: dict) -> None:
    """Runs on the Train worker: ``fit_probe`` on the features the driver put in the object store,
    the val metric reported to Ray Train (and through it to Tune) after every epoch, with a
    checkpoint every ``checkpoint_every`` epochs and after the last; carries on from the
    checkpoint Train hands a restarted worker."""
    import ray
    import ray.train
    from ray.train.torch import get_device

    from scope_ray.stages.cluster import this_node

    t0 = time.perf_counter()
    torch.set_num_threads(cfg["torch_threads"])
    device = get_device()
    if device.type == "cuda":
        from scope_ray.devices import cuda_problem, device_for

        device_for([device.index], cuda_problem())  # a granted GPU torch cannot use fails here, with the facts
    train, val = ray.get([cfg["train_ref"], cfg["val_ref"]])  # zero-copy from the object store
    if cfg.get("inject_fault"):
        raise InjectedFault(f"injected fault in {cfg['task']}/{cfg['variant']} trial {cfg['trial']}")
    spec = ProbeSpec(**{k: cfg[k] for k in PROBE_SPEC_FIELDS})
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = FitState.load(d)
    resumed_from = resume.epoch if resume is not None else 0
    node_id = this_node()["node_id"]
    seconds_load = time.perf_counter() - t0
    kill = cfg.get("kill_worker")

    def report(epoch: int, metrics: dict, head: torch.nn.Module, last: bool, state: FitState | None) -> None:
        metrics = {**metrics, "seconds_load": seconds_load, "device": str(device), "node_id": node_id,
                   "resumed_from_epoch": resumed_from}
        if state is None:
            ray.train.report(metrics)
        else:
            # The last report must carry one too: Train V2 hands the driver only metrics that come
            # with a checkpoint. Its head.safetensors is where the final probe can be reloaded.
            with tempfile.TemporaryDirectory() as tmp:
                state.save(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if kill and epoch == kill["after_epoch"] and not os.path.exists(kill["marker"]):
            with open(kill["marker"], "w") as f:
                f.write(f"killed after epoch {epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    fit_probe(spec, train, val, device=device, on_epoch=report, checkpoint_every=cfg["checkpoint_every"],
              resume=resume)


PROBE_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ProbeSpec))
# Train V2's per-run extras are start-up cost for a trial that trains for seconds: the
# controller's worker-group poll (2 s by default) and the preemption-watcher actor. The watcher
# only tells the loop ahead of time that a node is draining, for a just-in-time checkpoint; this
# loop checkpoints on a schedule instead, and a preempted worker is still restarted from the last
# checkpoint without it. Measured on the CI machine: bench/README.md. A user's own setting wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# ============================================================================ trial (Tune actor)
def run_trial(config: dict, data: dict | None = None) -> dict:
    """One Tune trial: build and run a one-worker TorchTrainer, return the final metrics.

    ``data`` maps each "task/variant" of the search to its ``{"train": ref, "val": ref}``."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    entered = time.time()
    t0 = time.perf_counter()
    hp, spec = config["hp"], config["spec"]
    root = ResultsRoot(spec["root"], spec["endpoint_url"])
    refs = data[f"{hp['task']}/{hp['variant']}"]
    loop_cfg = {**spec["loops"][hp["task"]], **hp, "train_ref": refs["train"], "val_ref": refs["val"]}
    gpus = spec["worker_gpus"]
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=gpus > 0,
            resources_per_worker={"CPU": spec["worker_cpus"], **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"{spec['run']}-{hp['task']}-{hp['variant']}-t{hp['trial']}", storage_path=spec["train_storage"],
            storage_filesystem=None if root.scheme == "file" else root.arrow_fs,
            # Only the newest checkpoint is needed to resume, and the last one holds the final head.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=WORKER_RESTARTS), callbacks=[TuneReportCallback()]),
    )
    metrics = dict(trainer.fit().metrics)
    total = time.perf_counter() - t0
    startup = total - metrics["seconds_load"] - metrics["seconds_train"]
    return {**metrics, "entered_at": entered, "seconds_total": total, "seconds_startup": startup, "probe_done": True}


def _trial_name(trial) -> str:
    hp = trial.config["hp"]
    return f"{hp['task']}_{hp['variant']}_t{hp['trial']:03d}"


def _record_callback(write):
    """A driver-side Tune callback: record every trial the moment it completes."""
    from ray import tune

    class RecordTrials(tune.Callback):
        def __init__(self):
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if result.get("probe_done"):
                actor = result["entered_at"] - self.started.get(trial.trial_id, result["entered_at"])
                write(trial.config["hp"], result, max(actor, 0.0))

    return RecordTrials()


# ============================================================================ driver: stage
@dataclass
class ProbeResult:
    skipped: bool
    trials: list[dict] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)
    ran_trials: int = 0      # trials run by this call
    reused_trials: int = 0   # finished trials an earlier, interrupted call left behind
    max_concurrent: int | None = None
    manifest: dict | None = None


def config_hash(job: JobConfig, features_manifest: dict, tasks: list[str], variants: list[str],
                trials: int | None, num_classes: Mapping[str, int] | None) -> str:
    # worker_cpus only decides how many trials run at once and checkpoint_every only where a restarted
    # trial picks up (a resumed fit ends exactly as an uninterrupted one), not what they compute.
    # "draws" names how sample_configs seeds its draws: trials drawn per (task, variant) before
    # 2026-12 are not comparable across variants, so a search of theirs is never resumed or reused.
    blob = json.dumps({"draws": DRAWS,
                       "probes": job.stage_hash("probes", exclude=("probes.worker_cpus", "probes.checkpoint_every")),
                       "features": features_manifest.get("config_hash"),
                       "features_at": features_manifest.get("committed_at"), "tasks": tasks, "variants": variants,
                       "trials": trials, "num_classes": dict(num_classes or {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _part_name(task: str, variant: str, trial: int) -> str:
    return f"{task}__{variant}__t{trial:03d}"


def _finished(stage: StageDir, task: str, variant: str) -> set[int]:
    fs, tdir = stage.root.fs, stage.table_path("trials")
    fs.invalidate_cache(tdir)  # trials are written by Tune's callback; never trust a cached listing
    prefix = stage.run_name(f"{task}__{variant}__t")
    done = set()
    for p in fs.glob(posixpath.join(tdir, f"{prefix}*.parquet")):
        name = posixpath.basename(p)[len(prefix):-len(".parquet")]
        if name.isdigit():
            done.add(int(name))
    return done


def _resumable(stage: StageDir, chash: str) -> bool:
    """Whether an interrupted attempt of this very config left finished trials (and Tune / Train
    state) to keep; any other attempt's are deleted when the run starts."""
    try:
        return json.loads(stage.root.fs.cat_file(posixpath.join(stage.path, ATTEMPT))).get("config_hash") == chash
    except (FileNotFoundError, ValueError):
        return False


def _mark_attempt(stage: StageDir, chash: str) -> None:
    stage.root.ensure_dir(stage.path)
    stage.root.fs.pipe_file(posixpath.join(stage.path, ATTEMPT), json.dumps({"config_hash": chash}).encode())


def _free_resources(want_cpus: float, wait_s: float = 15.0) -> dict[str, float]:
    """What the cluster has free now. Actors of a stage that just ended release their resources a
    moment later; waiting (up to ``wait_s``) until ``want_cpus`` are free, or all there are, keeps
    that moment from deciding how many trials run at once for the whole search."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        want = min(want_cpus, ray.cluster_resources().get("CPU", 0.0))
        if free.get("CPU", 0.0) + 1e-9 >= want or time.monotonic() > deadline:
            return free
        time.sleep(0.25)


def _check_selection(cache: FeatureCache, tasks: Sequence[str] | None,
                     variants: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The (tasks, variants) to search: the given ones, each checked against the cache, or all."""
    tasks = list(tasks) if tasks is not None else cache.tasks
    for t in tasks:
        if t not in cache.tasks:
            raise ValueError(f"task {t!r} is not in the probe features at {cache.stage.uri}; allowed: {cache.tasks}")
    variants = list(variants) if variants is not None else cache.variants
    for v in variants:
        if v not in cache.variants:
            raise ValueError(f"variant {v!r} is not in the probe features at {cache.stage.uri}; allowed: {cache.variants}")
    check_schemas(cache, tasks)
    return tasks, variants


def run_probes(job: JobConfig, root: ResultsRoot, *, tasks: Sequence[str] | None = None,
               variants: Sequence[str] | None = None, trials: int | None = None,
               num_classes: Mapping[str, int] | None = None, log=info) -> ProbeResult:
    """Run (or resume, or skip) the probe search over the cached features of ``job``'s model.

    ``tasks`` / ``variants`` restrict the search (default: all in the cache); ``trials`` overrides
    every task's ``probes.<task>.trials``; ``num_classes`` overrides the class count per task
    (default: segmentation ``probes.segmentation_classes``, classification max label + 1).
    """
    import ray

    num_classes = {"segmentation": job.probes.segmentation_classes, **(num_classes or {})}
    cache = open_cache(job, root)
    tasks, variants = _check_selection(cache, tasks, variants)
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job, cache.stage.manifest(), tasks, variants, trials, num_classes)
    if stage.is_complete(chash):
        log(f"[probe] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        return ProbeResult(skipped=True, trials=stage.read_table("trials").to_pylist(),
                           best=stage.read_table("best").to_pylist(), manifest=stage.manifest())
    same = _resumable(stage, chash)
    with stage.writing(chash, resume=same, keep=(TUNE_DIR, TRAIN_DIR, ATTEMPT) if same else (),
                       lease_seconds=job.storage.lease_seconds):
        _mark_attempt(stage, chash)
        if not ray.is_initialized():
            from scope_ray.stages.cluster import connect

            connect(job.ray)
        search = _Search.plan(job, root, stage, cache, tasks, variants, num_classes, trials, log)
        ran, reused, searches = 0, 0, []
        # As few Tune searches as the object store allows: the (task, variant) pairs whose features fit
        # in it together share one Tuner, so their trials run side by side (a pair alone has only
        # `trials` of them) and each Tuner's set-up is paid once; each pair's features sit in the
        # object store once, shared by all its trials. Pairs too big to sit there together go to
        # consecutive searches (pack_units).
        store = ray.cluster_resources().get("object_store_memory", 0.0) * OBJECT_STORE_SHARE
        units = [(t, v) for t in tasks for v in variants]
        unit_bytes = {u: variant_bytes(cache, u[0]) for u in units}
        for number, group in enumerate(pack_units(units, unit_bytes, store or float("inf")), start=1):
            done = search.run(f"search{number}", group)
            reused += done["reused"]
            if done["summary"] is not None:
                ran += done["ran"]
                searches.append(done["summary"])
        return _commit(job, stage, chash, cache, tasks, variants, ran, reused, search.concurrent, searches, log)


def _write_trial(job: JobConfig, stage: StageDir, sizes: dict, hp: dict, result: dict, actor_s: float) -> None:
    """One finished trial's row, written as its own part (what a resumed search reads back)."""
    task, tcfg = hp["task"], getattr(job.probes, hp["task"])
    row = {"task": task, "variant": hp["variant"], "trial": hp["trial"], "lr": hp["lr"],
           "weight_decay": hp["weight_decay"], "metric": METRICS[task][0], "value": result["value"],
           "diverged": bool(result["diverged"]), "epochs": tcfg.epochs, "batch_size": tcfg.batch_size,
           "curve": list(result["curve"]), "train_loss": result["train_loss"],
           **sizes[f"{task}/{hp['variant']}"], "device": result["device"],
           "node_id": result["node_id"], "resumed_from_epoch": result["resumed_from_epoch"],
           "seconds_actor": actor_s,
           "seconds_startup": result["seconds_startup"], "seconds_load": result["seconds_load"],
           "seconds_train": result["seconds_train"], "seconds_total": result["seconds_total"]}
    stage.write_part("trials", _part_name(task, hp["variant"], hp["trial"]), pa.Table.from_pylist([row], schema=TRIALS_SCHEMA))


@dataclass
class _Search:
    """What every Tune search of one probe run shares: where it stores, how many trials run at
    once, each task's training loop, and the test-only faults (``scope_ray.faults``)."""

    job: JobConfig
    root: ResultsRoot
    stage: StageDir
    cache: FeatureCache
    trials: int | None
    classes: dict[str, int]
    loops: dict[str, dict]
    worker_cpus: float
    worker_gpus: float
    concurrent: int
    attempt: str
    log: object
    raising: list = field(default_factory=list)
    kill: dict | None = None

    @classmethod
    def plan(cls, job: JobConfig, root: ResultsRoot, stage: StageDir, cache: FeatureCache, tasks: list[str],
             variants: list[str], num_classes: Mapping[str, int], trials: int | None, log) -> "_Search":
        from scope_ray.stages.cluster import role_gpus

        worker_gpus = role_gpus(job.ray.gpus_per_probe_worker, "ray.gpus_per_probe_worker")
        worker_cpus = job.probes.worker_cpus or job.ray.cpus_per_actor
        most = sum(trials or getattr(job.probes, t).trials for t in tasks) * len(variants)  # largest possible search
        concurrent = max_concurrent_trials(_free_resources((TRIAL_CPUS + worker_cpus) * most), worker_cpus, worker_gpus)
        for d in (cls._dir(stage, TUNE_DIR), cls._dir(stage, TRAIN_DIR)):
            root.ensure_dir(d)
        fault = faults.plan(STAGE) or {}  # tests only: trials that raise, a worker that dies
        classes = {t: class_count(cache, t, num_classes) for t in tasks}
        loops = {t: {"task": t, "width": cache.width, "image_size": cache.image_size, "num_classes": classes[t],
                     "depth_bins": job.probes.depth_bins, "max_depth": job.probes.max_depth,
                     "epochs": getattr(job.probes, t).epochs, "batch_size": getattr(job.probes, t).batch_size,
                     "checkpoint_every": job.probes.checkpoint_every,
                     "torch_threads": job.ray.torch_threads or max(1, int(worker_cpus))} for t in tasks}
        # Train run names are per attempt: a trial that starts over must not pick up an old run's state.
        return cls(job=job, root=root, stage=stage, cache=cache, trials=trials, classes=classes, loops=loops,
                   worker_cpus=worker_cpus, worker_gpus=worker_gpus, concurrent=concurrent,
                   attempt=time.strftime("%Y%m%dT%H%M%S", time.gmtime()), log=log,
                   raising=[list(k) for k in fault.get("raise", [])], kill=fault.get("kill"))

    @staticmethod
    def _dir(stage: StageDir, name: str) -> str:
        return posixpath.join(stage.path, name)

    def _pending(self, group) -> tuple[list[dict], int]:
        """The group's trials not yet finished (a resumed run skips the rest), and how many were."""
        pending, reused = [], 0
        for task, variant in group:
            done = _finished(self.stage, task, variant)
            configs = search_trials(self.job, task, variant, self.trials)
            todo = [c for c in configs if c["trial"] not in done]
            reused += len(configs) - len(todo)
            pending += todo
        for c in pending:
            key = (c["task"], c["variant"], c["trial"])
            c["inject_fault"] = list(key) in self.raising
            c["kill_worker"] = self.kill if self.kill and (self.kill["task"], self.kill["variant"],
                                                           self.kill["trial"]) == key else None
        return pending, reused

    def _put_features(self, pending: list[dict]) -> tuple[dict, dict]:
        """Each pending (task, variant)'s train / val arrays in the object store once, and their sizes."""
        import ray

        refs, sizes = {}, {}
        for task, variant in sorted({(c["task"], c["variant"]) for c in pending}):
            train = load_split(self.cache, task, "train", variant, self.classes[task])
            val = load_split(self.cache, task, "val", variant, self.classes[task])
            key = f"{task}/{variant}"
            sizes[key] = {"n_train": len(next(iter(train.values()))), "n_val": len(next(iter(val.values())))}
            refs[key] = {"train": ray.put(train), "val": ray.put(val)}
            del train, val
        return refs, sizes

    def run(self, run: str, group) -> dict:
        """One Tune search over ``group``'s unfinished trials; every finished trial leaves its part."""
        from ray import tune

        pending, reused = self._pending(group)
        what = ", ".join(sorted({t for t, _ in group}, key=TASKS.index))
        if not pending:
            self.log(f"[probe] {run} ({what}): every trial already finished")
            return {"reused": reused, "ran": 0, "summary": None}
        t0 = time.perf_counter()
        refs, sizes = self._put_features(pending)
        spec = {"root": self.root.uri, "endpoint_url": self.root.endpoint_url, "seed": self.job.seed,
                "run": f"{run}-{self.attempt}", "worker_cpus": self.worker_cpus, "worker_gpus": self.worker_gpus,
                "train_storage": self._dir(self.stage, TRAIN_DIR), "loops": self.loops}
        tune_storage = self._dir(self.stage, TUNE_DIR)
        if self.root.fs.exists(posixpath.join(tune_storage, run)):
            self.root.fs.rm(posixpath.join(tune_storage, run), recursive=True)  # a fresh attempt, not a restore
        self.log(f"[probe] {run} ({what}): {len(pending)} trials over {len(group)} (task, variant) pairs, "
                 f"up to {self.concurrent} at once")
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, data=refs), {"CPU": TRIAL_CPUS}),
            param_space={"hp": tune.grid_search(pending), "spec": spec},
            tune_config=tune.TuneConfig(max_concurrent_trials=self.concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=run, storage_path=tune_storage,
                storage_filesystem=None if self.root.scheme == "file" else self.root.arrow_fs, verbose=0,
                # Tune pickles its callbacks: the writer holds the job, the stage and the sizes, not this
                # object (whose ``log`` may be a function that does not pickle, e.g. print under Ray).
                callbacks=[_record_callback(functools.partial(_write_trial, self.job, self.stage, sizes))]),
        )
        grid = tuner.fit()
        del refs, tuner
        failed = [(r.config["hp"], r.error) for r in grid if r.error is not None]
        self._check_recorded(group, pending, failed)
        seconds = time.perf_counter() - t0
        self.log(f"[probe] {run}: {len(pending) - len(failed)} trials in {seconds:.1f} s")
        if failed:
            hp, err = failed[0]
            raise RuntimeError(f"probe search {hp['task']}/{hp['variant']}: trial {hp['trial']} failed ({len(failed)} "
                               f"of {len(pending)} failed); finished trials are kept, re-run to resume. "
                               f"Cause: {type(err).__name__}: {err}") from err
        return {"reused": reused, "ran": len(pending),
                "summary": {"search": run, "units": [f"{t}/{v}" for t, v in group], "trials_run": len(pending),
                            "failed": 0, "wall_seconds": seconds, "max_concurrent": self.concurrent}}

    def _check_recorded(self, group, pending: list[dict], failed: list) -> None:
        """Every trial that did not fail must have left its part file: the commit counts on it."""
        failed_keys = {(hp["task"], hp["variant"], hp["trial"]) for hp, _ in failed}
        recorded = {(t, v): _finished(self.stage, t, v) for t, v in group}
        unrecorded = [c for c in pending if c["trial"] not in recorded[(c["task"], c["variant"])]
                      and (c["task"], c["variant"], c["trial"]) not in failed_keys]
        if unrecorded:
            c = unrecorded[0]
            raise RuntimeError(f"probe search {c['task']}/{c['variant']}: trial {c['trial']} ended without being "
                               f"recorded ({len(unrecorded)} such); re-run to run it again")


def _commit(job, stage: StageDir, chash: str, cache: FeatureCache, tasks, variants, ran: int, reused: int,
            concurrent: int, searches: list[dict], log) -> ProbeResult:
    files = stage.run_files("trials")
    rows = [r for f in files for r in pq.read_table(f, filesystem=stage.root.arrow_fs).to_pylist()
            if r["task"] in tasks and r["variant"] in variants]
    rows.sort(key=lambda r: (TASKS.index(r["task"]), r["variant"], r["trial"]))
    best = best_rows(rows)
    stage.write_part("best", "part-0", pa.Table.from_pylist(best, schema=BEST_SCHEMA))
    manifest = stage.commit(
        chash, {"probe_features": cache.stage.uri}, {"trials": len(rows), "best": len(best)},
        extra={"tasks": tasks, "variants": variants, "max_concurrent_trials": concurrent,
               "trial_cpus": TRIAL_CPUS, "searches": searches, "ran_trials": ran, "reused_trials": reused})
    # One line per task (its variants side by side, as Table 3 reads); each trial's lr and wd are
    # in the stored best table.
    for task in dict.fromkeys(b["task"] for b in best):
        mine = [b for b in best if b["task"] == task]
        log(f"[probe] best {task} {mine[0]['metric']}: "
            + ", ".join(f"{b['variant']} {b['value']:.4f}" for b in mine))
    return ProbeResult(skipped=False, trials=rows, best=best, ran_trials=ran, reused_trials=reused,
                       max_concurrent=concurrent, manifest=manifest)

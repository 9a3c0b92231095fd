"""Linear-probe search (METHOD §9, supp. C; Tables 3 and 8): Ray Tune over Ray Train, per
(task, variant) of the cached probe features.

Reads ``ROOT/<model>/probe-features/`` (``<task>_<split>`` tables, split = train / val; manifest
extras ``width``, ``grid``, ``image_size``, ``variants``); writes ``ROOT/<model>/probe/``:

- ``trials``: one row per finished trial (hyper-parameters, val metric, per-epoch curve, and what
  the trial cost: Tune actor start, Train start-up, data load, training, separately);
- ``best``: the trial best on val per (task, variant), one row each (the layout of Tables 3 / 8).

Shape of the search. For every (task, variant) one ``Tuner`` runs ``probes.<task>.trials``
configurations: lr and weight decay log-uniform in the task's ranges, drawn up front from a
generator seeded by (job seed, task, variant) and handed to Tune as a grid over those draws, so the
same job always tries the same configurations, however often it is interrupted. Each trial is a
function trainable that builds a one-worker ``TorchTrainer`` (Train V2; ``Tuner(trainer)`` is
deprecated) and forwards its per-epoch reports to Tune with ``TuneReportCallback``. The (task,
variant)'s features are put in the object store once by the driver; every trial's worker reads the
same copy (``docs/probe_search.md`` has the scaling picture and the measured costs).

Resuming. A finished trial is recorded by the driver as its own part file of ``trials``, the moment
Tune reports it complete; a re-run with the same config runs only the trials that have no part file
(an interrupted or failed trial starts over: a probe trial is short and keeps no checkpoint). This
was chosen over ``Tuner.restore``: it does not depend on when Tune last snapshotted its experiment
state, survives a code change between attempts, and a trial is the natural unit here. The manifest
is committed last; a complete stage with the same config is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from scope_ray.config import JobConfig
from scope_ray.probes.metrics import IGNORE_INDEX
from scope_ray.stages.cluster import ClusterResourceError
from scope_ray.storage import ResultsRoot, StageDir

STAGE = "probe"
FEATURES_STAGE = "probe-features"
TASKS = ("classification", "segmentation", "depth")
# Val metric per task and whether larger is better.
METRICS = {"classification": ("top1", "max"), "segmentation": ("miou", "max"), "depth": ("rmse", "min")}
SEGMENTATION_CLASSES = 150  # ADE20K (METHOD §9)
# A Tune trial here only drives a Train run and waits; the Train worker does the work. Its small
# CPU share is what lets a trial and its worker fit beside each other on a small node.
TRIAL_CPUS = 0.25
TUNE_DIR, TRAIN_DIR, ATTEMPT = "_ray_tune", "_ray_train", "_attempt.json"

TRIALS_SCHEMA = pa.schema([
    ("task", pa.string()), ("variant", pa.string()), ("trial", pa.int32()),
    ("lr", pa.float64()), ("weight_decay", pa.float64()),
    ("metric", pa.string()), ("value", pa.float64()), ("diverged", pa.bool_()),
    ("epochs", pa.int32()), ("batch_size", pa.int32()), ("curve", pa.list_(pa.float64())),
    ("train_loss", pa.float64()), ("n_train", pa.int64()), ("n_val", pa.int64()), ("device", pa.string()),
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
    """Raised inside a trial's worker by tests (``_inject_fault``) to interrupt a search."""


# ============================================================================ pure helpers
def sample_configs(seed: int, task: str, variant: str, n: int, lr_range: Sequence[float],
                   wd_range: Sequence[float]) -> list[dict]:
    """The ``n`` (lr, weight decay) draws of one search, log-uniform, reproducible from the seed."""
    rng = np.random.default_rng([seed, TASKS.index(task), zlib.crc32(variant.encode())])

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
def _head(cfg: dict) -> torch.nn.Module:
    from scope_ray.probes import ClassificationProbe, DepthProbe, SegmentationProbe

    task, d = cfg["task"], cfg["width"]
    if task == "classification":
        return ClassificationProbe(d, cfg["num_classes"])
    if task == "segmentation":
        return SegmentationProbe(d, cfg["num_classes"])
    return DepthProbe(d, bins=cfg["depth_bins"], max_depth=cfg["max_depth"])


def _forward(task: str, head, batch: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    if task == "classification":
        return head(batch["x"])
    if task == "segmentation":
        return head(batch["tokens"], size)
    return head(batch["cls"], batch["tokens"], size)


def _loss(task: str, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from scope_ray.probes import scale_invariant_loss, segmentation_loss

    if task == "classification":
        return F.cross_entropy(out, batch["y"])
    if task == "segmentation":
        return segmentation_loss(out, batch["mask"].long())
    return scale_invariant_loss(out, batch["depth"])


def _batches(arrays: dict[str, np.ndarray], order: np.ndarray, batch_size: int, device):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(device) for k, v in arrays.items()}


@torch.no_grad()
def _evaluate(cfg: dict, head, val: dict[str, np.ndarray], device) -> float:
    from scope_ray.probes import Accuracy, ConfusionMatrix, DepthErrors

    task, size = cfg["task"], (cfg["image_size"], cfg["image_size"])
    acc = {"classification": Accuracy, "depth": DepthErrors}.get(task)
    acc = acc() if acc else ConfusionMatrix(cfg["num_classes"], IGNORE_INDEX)
    head.eval()
    n = len(next(iter(val.values())))
    for batch in _batches(val, np.arange(n), cfg["batch_size"], device):
        out = _forward(task, head, batch, size)
        if task == "classification":
            acc.update(out, batch["y"])
        elif task == "segmentation":
            acc.update(out.argmax(1), batch["mask"].long())
        else:
            acc.update(out, batch["depth"])
    return {"classification": lambda: acc.value(), "segmentation": lambda: acc.miou(),
            "depth": lambda: acc.rmse()}[task]()


def probe_loop(cfg: dict) -> None:
    """Runs on the Train worker: SGD (momentum 0.9) with cosine annealing over the epochs; the val
    metric is reported to Ray Train (and through it to Tune) after every epoch."""
    import ray
    import ray.train
    from ray.train.torch import get_device

    t0 = time.perf_counter()
    torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"])
    device = get_device()
    train, val = ray.get([cfg["train_ref"], cfg["val_ref"]])  # zero-copy from the object store
    head = _head(cfg).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    if cfg.get("inject_fault"):
        raise InjectedFault(f"injected fault in {cfg['task']}/{cfg['variant']} trial {cfg['trial']}")
    seconds_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    task, size = cfg["task"], (cfg["image_size"], cfg["image_size"])
    n = len(next(iter(train.values())))
    rng = np.random.default_rng(cfg["seed"])
    curve: list[float] = []
    diverged, mean_loss = False, float("nan")
    for epoch in range(cfg["epochs"]):
        head.train()
        total, batches = 0.0, 0
        for batch in _batches(train, rng.permutation(n), cfg["batch_size"], device):
            loss = _loss(task, _forward(task, head, batch, size), batch)
            if not torch.isfinite(loss):
                diverged = True  # a high sampled lr can blow up: the trial scores NaN, the search goes on
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        sched.step()
        mean_loss = total / max(batches, 1)
        diverged = diverged or not all(bool(torch.isfinite(p).all()) for p in head.parameters())
        value = float("nan") if diverged else _evaluate(cfg, head, val, device)
        curve.append(value)
        metrics = {"epoch": epoch + 1, "value": value, "train_loss": mean_loss, "diverged": diverged,
                   "seconds_load": seconds_load, "seconds_train": time.perf_counter() - t1,
                   "curve": list(curve), "device": str(device)}
        if epoch + 1 < cfg["epochs"] and not diverged:
            ray.train.report(metrics)
            continue
        # Train V2 hands the driver only metrics that come with a checkpoint: the last report
        # carries one (the head's weights, safetensors), which is also where the probe can be reloaded.
        import safetensors.torch

        with tempfile.TemporaryDirectory() as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(tmp, "head.safetensors"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        break


# ============================================================================ trial (Tune actor)
def run_trial(config: dict, data: dict | None = None) -> dict:
    """One Tune trial: build and run a one-worker TorchTrainer, return the final metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    entered = time.time()
    t0 = time.perf_counter()
    hp, spec = config["hp"], config["spec"]
    root = ResultsRoot(spec["root"], spec["endpoint_url"])
    loop_cfg = {**spec["loop"], **hp, "seed": spec["seed"] * 1_000_003 + hp["trial"],
                "train_ref": data["train"], "val_ref": data["val"]}
    gpus = spec["worker_gpus"]
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=gpus > 0,
            resources_per_worker={"CPU": spec["worker_cpus"], **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"{spec['run']}-t{hp['trial']}", storage_path=spec["train_storage"],
            storage_filesystem=None if root.scheme == "file" else root.arrow_fs,
            failure_config=ray.train.FailureConfig(max_failures=0), callbacks=[TuneReportCallback()]),
    )
    metrics = dict(trainer.fit().metrics)
    total = time.perf_counter() - t0
    startup = total - metrics["seconds_load"] - metrics["seconds_train"]
    return {**metrics, "entered_at": entered, "seconds_total": total, "seconds_startup": startup, "probe_done": True}


def _trial_name(trial) -> str:
    return f"trial_{trial.config['hp']['trial']:03d}"


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


# ============================================================================ driver: features
@dataclass
class _Cache:
    stage: StageDir
    width: int
    grid: int
    image_size: int
    variants: list[str]
    tasks: list[str]


def _open_cache(job: JobConfig, root: ResultsRoot) -> _Cache:
    stage = root.stage(job.model.name, FEATURES_STAGE)
    m = stage.manifest()
    if m is None:
        raise RuntimeError(f"{job.model.name}: no probe features at {stage.uri}; run `scope-ray stage probe-features` first")
    missing = [k for k in ("width", "grid", "image_size") if k not in m]
    if missing:
        raise ValueError(f"{stage.uri}/manifest.json lacks {missing}; the probe search needs width, grid and image_size")
    tasks = [t for t in TASKS if f"{t}_train" in m["tables"] and f"{t}_val" in m["tables"]]
    variants = list(m.get("variants") or [])
    if not variants:
        seen: set[str] = set()
        for t in tasks:
            seen.update(stage.read_table(f"{t}_val", columns=["variant"]).column("variant").to_pylist())
        variants = sorted(seen)
    return _Cache(stage, int(m["width"]), int(m["grid"]), int(m["image_size"]), variants, tasks)


COLUMNS = {"classification": ("embedding", "label"), "segmentation": ("tokens", "mask"), "depth": ("cls", "tokens", "depth")}
ARRAY_NAMES = {"embedding": "x", "label": "y", "tokens": "tokens", "mask": "mask", "cls": "cls", "depth": "depth"}


def _widths(cache: _Cache) -> dict[str, int]:
    d, s = cache.width, cache.image_size
    return {"embedding": d, "cls": d, "tokens": cache.grid ** 2 * d, "mask": s * s, "depth": s * s}


def _matrix(table: pa.Table, column: str, width: int, where: str, why: str) -> np.ndarray:
    """A list column as a dense [rows, width] array; a row of another length is an error naming it."""
    col = table.column(column)
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != width:
            first = table.column("image_id")[0].as_py() if table.num_rows else None
            raise ValueError(f"{where}: column {column!r} holds {col.type.list_size} values per image, expected "
                             f"{width} ({why}); every row has that size, the first is image {first!r}")
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            image = table.column("image_id")[int(bad[0])].as_py()
            raise ValueError(f"{where}: image {image!r} has {int(lengths[bad[0]])} values in {column!r}, "
                             f"expected {width} ({why}); {bad.size} such rows")
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(table.num_rows, width)


def check_schemas(cache: _Cache, tasks: Sequence[str]) -> None:
    """Before any trial: every table has its columns, and fixed-size lists the manifest's sizes."""
    widths = _widths(cache)
    for task in tasks:
        for split in ("train", "val"):
            name = f"{task}_{split}"
            files = cache.stage.part_files(name)
            if not files:
                raise ValueError(f"{cache.stage.uri}/{name}: the table has no part files")
            schema = pq.read_schema(files[0], filesystem=cache.stage.root.arrow_fs)
            missing = [c for c in ("image_id", "variant", *COLUMNS[task]) if c not in schema.names]
            if missing:
                raise ValueError(f"{cache.stage.uri}/{name}: missing column(s) {missing}; it has {schema.names}")
            for col in COLUMNS[task]:
                typ = schema.field(col).type
                if pa.types.is_fixed_size_list(typ) and typ.list_size != widths[col]:
                    first = pq.read_table(files[0], columns=["image_id"], filesystem=cache.stage.root.arrow_fs)
                    image = first.column("image_id")[0].as_py() if first.num_rows else None
                    raise ValueError(f"{cache.stage.uri}/{name}: column {col!r} holds {typ.list_size} values per "
                                     f"image, expected {widths[col]} from the manifest (width {cache.width}, grid "
                                     f"{cache.grid}, image_size {cache.image_size}); first image {image!r}")


def _check_class_range(values: np.ndarray, ids: list[str], num_classes: int, ignore: int | None,
                       where: str, column: str) -> None:
    """Labels must lie in [0, num_classes) or equal ``ignore``; the error names the first bad image."""

    def outside(v: np.ndarray) -> np.ndarray:
        bad = (v < 0) | (v >= num_classes)
        return bad & (v != ignore) if ignore is not None else bad

    bad = outside(values)
    rows = np.flatnonzero(bad.any(axis=1) if bad.ndim > 1 else bad)
    if rows.size:
        r = int(rows[0])
        row = np.atleast_1d(values[r])
        allowed = f"0..{num_classes - 1}" + ("" if ignore is None else f" or {ignore} (ignore)")
        raise ValueError(f"{where}: label outside the class range in {column!r} of image {ids[r]!r}: "
                         f"{np.unique(row[outside(row)])[:5].tolist()}; allowed: {allowed} "
                         f"({rows.size} image(s) affected; num_classes={num_classes})")


def load_split(cache: _Cache, task: str, split: str, variant: str, num_classes: int | None) -> dict[str, np.ndarray]:
    """One (task, split, variant) of the cache as dense arrays, checked: sizes from the manifest,
    labels in the class range. Only this variant's rows are read."""
    table_name = f"{task}_{split}"
    where = f"{cache.stage.uri}/{table_name}"
    files = cache.stage.part_files(table_name)
    cols = ["image_id", *COLUMNS[task]]
    table = pq.read_table(files, columns=cols, filesystem=cache.stage.root.arrow_fs,
                          filters=[("variant", "=", variant)]) if files else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"{where}: no rows for variant {variant!r}")
    ids = table.column("image_id").to_pylist()
    widths, s = _widths(cache), cache.image_size
    why = {"embedding": "width", "cls": "width", "tokens": f"grid² x width = {cache.grid}² x {cache.width}",
           "mask": f"image_size² = {s}²", "depth": f"image_size² = {s}²"}
    out: dict[str, np.ndarray] = {}
    for col in COLUMNS[task]:
        if col == "label":
            y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            if num_classes is not None:
                _check_class_range(y, ids, num_classes, None, where, col)
            out["y"] = y
            continue
        m = _matrix(table, col, widths[col], where, why[col])
        if col == "tokens":
            m = m.reshape(len(m), cache.grid ** 2, cache.width).astype(np.float32, copy=False)
        elif col == "mask":
            if num_classes is not None:
                _check_class_range(m, ids, num_classes, IGNORE_INDEX, where, col)
            m = m.reshape(len(m), s, s).astype(np.uint8, copy=False)
        elif col == "depth":
            m = m.reshape(len(m), s, s).astype(np.float32, copy=False)
        else:
            m = m.astype(np.float32, copy=False)
        out[ARRAY_NAMES[col]] = m
    return out


def _class_count(cache: _Cache, task: str, given: Mapping[str, int] | None) -> int | None:
    if given and task in given:
        return int(given[task])
    if task == "segmentation":
        return SEGMENTATION_CLASSES
    if task == "classification":
        # Classes are the labels the cache holds (1000 for ImageNet): max label + 1 over both splits.
        hi = -1
        for split in ("train", "val"):
            labels = cache.stage.read_table(f"{task}_{split}", columns=["label"]).column("label")
            if len(labels):
                hi = max(hi, int(pc.max(labels).as_py()))
        return max(hi + 1, 2)
    return None


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
    # worker_cpus only decides how many trials run at once, not what they compute.
    blob = json.dumps({"probes": job.stage_hash("probes", exclude=("probes.worker_cpus",)), "features": features_manifest.get("config_hash"),
                       "features_at": features_manifest.get("committed_at"), "tasks": tasks, "variants": variants,
                       "trials": trials, "num_classes": dict(num_classes or {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _part_name(task: str, variant: str, trial: int) -> str:
    return f"{task}__{variant}__t{trial:03d}"


def _finished(stage: StageDir, task: str, variant: str) -> set[int]:
    fs, tdir = stage.root.fs, stage.table_path("trials")
    prefix = f"{task}__{variant}__t"
    done = set()
    for p in fs.glob(posixpath.join(tdir, f"{prefix}*.parquet")):
        name = posixpath.basename(p)[len(prefix):-len(".parquet")]
        if name.isdigit():
            done.add(int(name))
    return done


def _prepare(stage: StageDir, chash: str) -> None:
    """Keep an interrupted attempt's finished trials only when it ran this very config."""
    fs = stage.root.fs
    marker = posixpath.join(stage.path, ATTEMPT)
    try:
        same = json.loads(fs.cat_file(marker)).get("config_hash") == chash
    except (FileNotFoundError, ValueError):
        same = False
    if not same:
        stage.reset()
        stage.root.ensure_dir(stage.path)
        fs.pipe_file(marker, json.dumps({"config_hash": chash}).encode())


def _free_resources(need_cpus: float, wait_s: float = 15.0) -> dict[str, float]:
    """What the cluster has free now. Actors of a stage that just ended release their resources a
    moment later, so a cluster that could hold one trial in total is given that moment."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0.0) + 1e-9 >= need_cpus or ray.cluster_resources().get("CPU", 0.0) < need_cpus \
                or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def run_probes(job: JobConfig, root: ResultsRoot, *, tasks: Sequence[str] | None = None,
               variants: Sequence[str] | None = None, trials: int | None = None,
               num_classes: Mapping[str, int] | None = None, log=print,
               _inject_fault: set[tuple[str, str, int]] | None = None) -> ProbeResult:
    """Run (or resume, or skip) the probe search over the cached features of ``job``'s model.

    ``tasks`` / ``variants`` restrict the search (default: all in the cache); ``trials`` overrides
    every task's ``probes.<task>.trials``; ``num_classes`` overrides the class count per task
    (default: segmentation 150, classification max label + 1).
    """
    import ray
    from ray import tune

    cache = _open_cache(job, root)
    tasks = list(tasks) if tasks is not None else cache.tasks
    for t in tasks:
        if t not in cache.tasks:
            raise ValueError(f"task {t!r} is not in the probe features at {cache.stage.uri}; allowed: {cache.tasks}")
    variants = list(variants) if variants is not None else cache.variants
    for v in variants:
        if v not in cache.variants:
            raise ValueError(f"variant {v!r} is not in the probe features at {cache.stage.uri}; allowed: {cache.variants}")
    check_schemas(cache, tasks)
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job, cache.stage.manifest(), tasks, variants, trials, num_classes)
    if stage.is_complete(chash):
        log(f"[probe] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        return ProbeResult(skipped=True, trials=stage.read_table("trials").to_pylist(),
                           best=stage.read_table("best").to_pylist(), manifest=stage.manifest())
    _prepare(stage, chash)

    if not ray.is_initialized():
        from scope_ray.stages.cluster import connect

        connect(job.ray)
    from scope_ray.stages.cluster import actor_resources

    worker_gpus = actor_resources(job.ray).num_gpus
    worker_cpus = job.probes.worker_cpus or job.ray.cpus_per_actor
    concurrent = max_concurrent_trials(_free_resources(TRIAL_CPUS + worker_cpus), worker_cpus, worker_gpus)
    fs_arrow = None if root.scheme == "file" else root.arrow_fs
    tune_storage = posixpath.join(stage.path, TUNE_DIR)
    train_storage = posixpath.join(stage.path, TRAIN_DIR)
    for d in (tune_storage, train_storage):
        root.ensure_dir(d)
    ran, reused, searches = 0, 0, []
    # Train run names are per attempt: a trial that starts over must not pick up an old run's state.
    attempt = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for task in tasks:
        tcfg = getattr(job.probes, task)
        n_trials = trials or tcfg.trials
        classes = _class_count(cache, task, num_classes)
        for variant in variants:
            configs = sample_configs(job.seed, task, variant, n_trials, tcfg.lr_range, tcfg.weight_decay_range)
            done = _finished(stage, task, variant)
            pending = [c for c in configs if c["trial"] not in done]
            reused += n_trials - len(pending)
            if not pending:
                log(f"[probe] {task}/{variant}: all {n_trials} trials already finished")
                continue
            t0 = time.perf_counter()
            train = load_split(cache, task, "train", variant, classes)
            val = load_split(cache, task, "val", variant, classes)
            n_train, n_val = len(next(iter(train.values()))), len(next(iter(val.values())))
            refs = {"train": ray.put(train), "val": ray.put(val)}
            del train, val
            for c in pending:
                c["inject_fault"] = (task, variant, c["trial"]) in (_inject_fault or set())
            run = f"{task}-{variant}"
            spec = {
                "root": root.uri, "endpoint_url": root.endpoint_url, "seed": job.seed, "run": f"{run}-{attempt}",
                "worker_cpus": worker_cpus, "worker_gpus": worker_gpus, "train_storage": train_storage,
                "loop": {"task": task, "variant": variant, "width": cache.width, "image_size": cache.image_size,
                         "num_classes": classes, "depth_bins": job.probes.depth_bins, "max_depth": job.probes.max_depth,
                         "epochs": tcfg.epochs, "batch_size": tcfg.batch_size,
                         "torch_threads": job.ray.torch_threads or max(1, int(worker_cpus))},
            }

            def write(hp, result, actor_s, task=task, variant=variant, n_train=n_train, n_val=n_val, tcfg=tcfg):
                row = {"task": task, "variant": variant, "trial": hp["trial"], "lr": hp["lr"],
                       "weight_decay": hp["weight_decay"], "metric": METRICS[task][0], "value": result["value"],
                       "diverged": bool(result["diverged"]), "epochs": tcfg.epochs, "batch_size": tcfg.batch_size,
                       "curve": list(result["curve"]), "train_loss": result["train_loss"], "n_train": n_train,
                       "n_val": n_val, "device": result["device"], "seconds_actor": actor_s,
                       "seconds_startup": result["seconds_startup"], "seconds_load": result["seconds_load"],
                       "seconds_train": result["seconds_train"], "seconds_total": result["seconds_total"]}
                stage.write_part("trials", _part_name(task, variant, hp["trial"]),
                                 pa.Table.from_pylist([row], schema=TRIALS_SCHEMA))

            if root.fs.exists(posixpath.join(tune_storage, run)):
                root.fs.rm(posixpath.join(tune_storage, run), recursive=True)  # a fresh attempt, not a restore
            log(f"[probe] {task}/{variant}: {len(pending)} of {n_trials} trials ({n_train} train / {n_val} val), "
                f"up to {concurrent} at once")
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(run_trial, data=refs), {"CPU": TRIAL_CPUS}),
                param_space={"hp": tune.grid_search(pending), "spec": spec},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=run, storage_path=tune_storage, storage_filesystem=fs_arrow,
                                          verbose=0, callbacks=[_record_callback(write)]),
            )
            grid = tuner.fit()
            del refs, tuner
            failed = [(r.config["hp"]["trial"], r.error) for r in grid if r.error is not None]
            ran += len(pending) - len(failed)
            searches.append({"task": task, "variant": variant, "trials_run": len(pending), "failed": len(failed),
                             "wall_seconds": time.perf_counter() - t0, "max_concurrent": concurrent})
            if failed:
                trial, err = failed[0]
                raise RuntimeError(f"probe search {task}/{variant}: trial {trial} failed ({len(failed)} of "
                                   f"{len(pending)} failed); finished trials are kept, re-run to resume. "
                                   f"Cause: {type(err).__name__}: {err}") from err
    return _commit(job, stage, chash, cache, tasks, variants, ran, reused, concurrent, searches, log)


def _commit(job, stage: StageDir, chash: str, cache: _Cache, tasks, variants, ran: int, reused: int,
            concurrent: int, searches: list[dict], log) -> ProbeResult:
    files = sorted(stage.root.fs.glob(posixpath.join(stage.table_path("trials"), "*.parquet")))
    rows = [r for f in files for r in pq.read_table(f, filesystem=stage.root.arrow_fs).to_pylist()
            if r["task"] in tasks and r["variant"] in variants]
    rows.sort(key=lambda r: (TASKS.index(r["task"]), r["variant"], r["trial"]))
    best = best_rows(rows)
    stage.write_part("best", "part-0", pa.Table.from_pylist(best, schema=BEST_SCHEMA))
    manifest = stage.commit(
        chash, {"probe_features": cache.stage.uri}, {"trials": len(rows), "best": len(best)},
        extra={"tasks": tasks, "variants": variants, "max_concurrent_trials": concurrent,
               "trial_cpus": TRIAL_CPUS, "searches": searches, "ran_trials": ran, "reused_trials": reused})
    for b in best:
        log(f"[probe] best {b['task']}/{b['variant']}: {b['metric']} {b['value']:.4f} (trial {b['trial']}, "
            f"lr {b['lr']:.3g}, wd {b['weight_decay']:.3g})")
    return ProbeResult(skipped=False, trials=rows, best=best, ran_trials=ran, reused_trials=reused,
                       max_concurrent=concurrent, manifest=manifest)

"""SAE training on Ray Train: DDP workers stream the extracted tokens through Ray Data.

Reads extract's ``train_tokens``; writes ``ROOT/<model>/train-sae/``: ``sae.safetensors`` (input
scale folded in) beside the manifest, and the ``training_log`` table (one row per logged step) in
``ROOT/tables/training_log/model=<model>/stage=train-sae/``.

Fault tolerance is Ray Train's: every ``checkpoint_every`` steps rank 0 reports a checkpoint
(raw SAE state, optimizer state, step) to the results root; ``FailureConfig`` restarts failed
workers from it, and re-running an interrupted stage resumes the same run (same
``RunConfig(storage_path, name)``) instead of starting over. The total number of steps is fixed
up front, so a resumed run ends at the same step count as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import resource
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scope_ray.config import JobConfig
from scope_ray.logs import info, worker_info
from scope_ray.stages.cluster import ClusterResourceError
from scope_ray.storage import ResultsRoot, StageDir
from scope_ray.tokens import activations_of
from scope_ray import faults
from scope_ray.pipeline import TRAIN_SAE as STAGE
from scope_ray.pipeline import extract_hash
from scope_ray.pipeline import train_sae_hash as config_hash
from scope_ray.stages.common import SAE_FILE, check_token_width, load_sae  # noqa: F401 (load_sae: the stage's reader)

TRAIN_DIR = "_ray_train"


class InjectedFault(RuntimeError):
    """Raised once inside the training loop by tests (``scope_ray.faults``, kind "raise") to exercise recovery."""


def _inject_fault(fault: dict, step: int, rank: int, world: int) -> None:
    """Fail this worker once at ``fault["step"]``; the marker file makes it once per test, across
    restarts. ``fault["kind"]``: "raise" an InjectedFault (an error the driver can recognise by its
    message), or "kill" the worker process with SIGKILL (a crash Ray only sees as a dead actor, as
    on an OOM kill or a lost machine)."""
    if step != fault["step"] or os.path.exists(fault["marker"]):
        return
    if fault["kind"] == "raise":
        open(fault["marker"], "w").close()
        raise InjectedFault(f"injected fault at step {step}")
    if rank != world - 1:
        return  # one process dies, as when one machine is lost; the others are torn down by Ray Train
    from scope_ray.stages.cluster import this_node

    # Written before the kill: the test learns which process died and where.
    with open(fault["marker"], "w") as f:
        json.dump({"pid": os.getpid(), "rank": rank, "step": step, **this_node()}, f)
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------- worker side
def _to_matrix(batch: pa.Table) -> dict[str, np.ndarray]:
    """Fixed-size-list activations → a dense [rows, d] float32 matrix Ray Train can batch."""
    return {"x": activations_of(batch)}


# A checkpoint is written by a Train worker (on a GPU node, its tensors on the GPU) and read by
# the driver (on the shipped clusters a GPU-less head) and by restarted workers. Everything in it
# is a CPU tensor in safetensors or plain JSON: no device location is ever recorded, so any
# machine can read it, and nothing in it is unpickled.
SAE_STATE_FILE, OPTIMIZER_FILE, PROGRESS_FILE = "sae_state.safetensors", "optimizer.safetensors", "progress.json"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"  # torch.save'd Adam state of checkpoints written before 2026-12


def _save_checkpoint(directory: str, sae, optimizer, step: int, nonfinite: int, log: list[dict],
                     resumed_from: list[int], workers: list[dict]) -> None:
    import safetensors.torch

    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(directory, SAE_STATE_FILE))
    opt = optimizer.state_dict()
    # Adam's per-parameter moments flattened to "<param index>.<name>"; the rest (step counts that
    # are plain numbers, param_groups) is JSON.
    tensors = {f"{i}.{name}": v.detach().cpu().contiguous()
               for i, per_param in opt["state"].items() for name, v in per_param.items() if torch.is_tensor(v)}
    plain = {str(i): {name: v for name, v in per_param.items() if not torch.is_tensor(v)}
             for i, per_param in opt["state"].items()}
    safetensors.torch.save_file(tensors, os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
        json.dump({"step": step, "nonfinite_rows": nonfinite, "log": log, "resumed_from": resumed_from,
                   "workers": workers, "optimizer": {"param_groups": opt["param_groups"], "plain_state": plain}}, f)


def _load_progress(directory: str) -> dict:
    with open(os.path.join(directory, PROGRESS_FILE)) as f:
        return json.load(f)


def _load_sae_state(directory: str, sae) -> None:
    import safetensors.torch

    sae.load_state_dict(safetensors.torch.load_file(os.path.join(directory, SAE_STATE_FILE), device="cpu"))


def _load_optimizer_state(directory: str, optimizer, progress: dict) -> None:
    """Restore Adam's state on the CPU (the caller moves it to its device). Only a worker that
    goes on training needs this; the driver finishing a run never reads it."""
    import safetensors.torch

    path = os.path.join(directory, OPTIMIZER_FILE)
    if not os.path.exists(path):
        # A checkpoint from before safetensors: its tensors may carry a CUDA location (saved on a
        # GPU worker), so they are mapped to the CPU; still never unpickled beyond tensors.
        legacy = os.path.join(directory, LEGACY_OPTIMIZER_FILE)
        optimizer.load_state_dict(torch.load(legacy, map_location="cpu", weights_only=True))
        return
    tensors = safetensors.torch.load_file(path, device="cpu")
    saved = progress["optimizer"]
    state: dict[int, dict] = {int(i): dict(plain) for i, plain in saved["plain_state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _load_checkpoint(directory: str, sae, optimizer) -> tuple[int, int, list[dict], list[int]]:
    """What a (restarted) worker resumes from: SAE, optimizer and progress."""
    progress = _load_progress(directory)
    _load_sae_state(directory, sae)
    _load_optimizer_state(directory, optimizer, progress)
    return progress["step"], progress["nonfinite_rows"], progress["log"], progress["resumed_from"]


def _worker_nodes(rank: int, world: int, dist, device) -> list[dict]:
    """Every worker's {"rank", "node_id", "ip"}, rank order, gathered so rank 0 can record them.

    A fixed-width byte tensor rather than ``all_gather_object``: that one needs the right current
    CUDA device under NCCL, while ``device`` is already each worker's own."""
    from scope_ray.stages.cluster import this_node

    me = {"rank": rank, **this_node()}
    if world == 1 or not dist.is_initialized():
        return [me]
    blob = json.dumps(me).encode()
    if len(blob) > 512:
        raise ValueError(f"worker node record longer than 512 bytes: {blob!r}")
    mine = torch.tensor(list(blob.ljust(512)), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return [json.loads(bytes(t.cpu().tolist()).decode()) for t in everyone]


class _LossModule(torch.nn.Module):
    """The training loss as a module's forward: DDP only synchronises gradients of computations
    that go through its wrapper's forward, and the loss (with AuxK) is more than ``sae.forward``.

    Every worker calls it at every step, also with an empty batch (no finite row): then the loss
    is a zero-weight function of every parameter, so DDP's gradient all-reduce and the SAE's
    statistics reducer see the same collectives on every rank. Skipping the forward on one rank
    put the ranks' all-reduces out of step (a timeout under gloo, a hang under NCCL)."""

    def __init__(self, sae, aux_coef: float):
        super().__init__()
        self.sae, self.aux_coef = sae, aux_coef

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        from scope_ray.sae import SAELoss

        if len(x_BD):
            record = self.sae.loss(x_BD, self.aux_coef)
        else:
            self.sae.observe_empty_batch()
            zero = sum(p.sum() for p in self.sae.parameters()) * 0.0
            record = SAELoss(total=zero, mse=zero, aux=zero, fvu=float("nan"), l0=0.0,
                             dead_fraction=float(self.sae.dead_mask().double().mean()))
        self.sae.last_record = record
        return record.total


def make_stats_reducer(dist):
    """A ``BatchTopKSAE.stats_reducer`` over the initialised process group ``dist``: a latent fired
    if it fired on any worker, θ's sample is the smallest kept activation over all workers, the
    tokens are summed. Two small collectives per step (a [F + 1] max and a scalar sum) against the
    [F x D] gradient all-reduce."""

    def reduce(fired_F: torch.Tensor, smallest: torch.Tensor, n_tokens: torch.Tensor):
        packed = torch.cat([fired_F.float(), (-smallest.float()).reshape(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        total = n_tokens.to(torch.long).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return packed[:-1] > 0, (-packed[-1]).to(smallest.dtype), total

    return reduce


def train_step(module, sae, optimizer, x_BD: torch.Tensor) -> torch.Tensor:
    """One optimizer step of every worker (``module`` = ``_LossModule``, DDP-wrapped or not):
    zero_grad → loss (statistics update) → backward → project → step → renormalise."""
    optimizer.zero_grad(set_to_none=True)
    loss = module(x_BD)
    loss.backward()
    sae.remove_parallel_grad()
    optimizer.step()
    sae.normalize_decoder()
    return loss


@dataclass
class _Progress:
    """A worker's place in the run, as a checkpoint stores it.

    Non-finite rows: ``counted_before`` is the all-worker total stored in the last checkpoint;
    ``nonfinite`` counts this worker's since then. Only the first epoch counts (later epochs see
    the same rows again)."""

    step: int = 0
    counted_before: int = 0
    log: list = field(default_factory=list)
    resumed_from: list = field(default_factory=list)
    nonfinite: int = 0
    revived_logged: int = 0


def _new_sae(cfg: dict):
    """The dictionary every worker starts from (same seed, same scale), and its optimizer."""
    from scope_ray.sae import BatchTopKSAE
    from scope_ray.sae_step import adam

    sae = BatchTopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"], k_aux=cfg["k_aux"],
                       dead_after_tokens=cfg["dead_after_tokens"], threshold_ema=cfg["threshold_ema"])
    with torch.no_grad():
        # The driver computed these from a sample (what set_input_scale_from / init_b_dec do) so
        # that workers receive two numbers' worth of config rather than the sample itself.
        sae.input_scale.fill_(cfg["input_scale"])
        sae.b_dec.copy_(torch.tensor(cfg["b_dec_init"]) * cfg["input_scale"])
    # sae.loss (in _LossModule) takes the sparse step by size; adam is fused where available.
    return sae, adam(sae.parameters(), cfg["lr"])


def _resume(cfg: dict, sae, optimizer, rank: int) -> _Progress:
    """Ray Train's checkpoint (a restarted group) or the configured one (a re-run), else a new start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or cfg.get("resume_from")
    if checkpoint is None:
        return _Progress()
    with checkpoint.as_directory() as d:
        step, counted_before, log, resumed_from = _load_checkpoint(d, sae, optimizer)
    if rank == 0:
        worker_info(f"[train-sae] resuming from checkpoint at step {step}/{cfg['total_steps']}")
    return _Progress(step=step, counted_before=counted_before, log=log, resumed_from=resumed_from + [step])


def _to_device(sae, optimizer, device) -> None:
    sae.to(device).train()
    # Optimizer state tensors follow the parameters' device (a checkpoint's come back on the CPU).
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)


def _log_step(cfg: dict, sae, loss, progress: _Progress, dist, world: int, rank: int) -> None:
    record = sae.last_record
    revived = int(sae.revived_total)
    row = {"step": progress.step, "loss": float(loss.detach()), "fvu": record.fvu, "l0": record.l0,
           "dead_fraction": record.dead_fraction, "threshold": float(sae.threshold / sae.input_scale),
           # Latents AuxK brought back since the previous log row (the same count on every worker:
           # the statistics are the global batch's).
           "revived": revived - progress.revived_logged,
           "nonfinite_rows": progress.counted_before + _all_sum(progress.nonfinite, dist, world), "time": time.time(),
           # Peak resident memory of this worker process (Linux reports KiB).
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    progress.revived_logged = revived
    progress.log.append(row)
    if rank == 0:
        worker_info(f"[train-sae] step {progress.step}/{cfg['total_steps']} loss {row['loss']:.4f} fvu {row['fvu']:.3f} "
                    f"l0 {row['l0']:.1f} dead {row['dead_fraction']:.3f} revived {row['revived']}")


def _report(sae, optimizer, progress: _Progress, workers, dist, world: int, rank: int) -> None:
    """Ray Train's report of this step; rank 0's carries the checkpoint."""
    import ray.train

    record = sae.last_record
    metrics = {"step": progress.step, "fvu": record.fvu, "l0": record.l0}
    total_bad = progress.counted_before + _all_sum(progress.nonfinite, dist, world)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, sae, optimizer, progress.step, total_bad, progress.log, progress.resumed_from, workers)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])  # identical initial dictionaries on every worker
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    device = get_device()
    if device.type == "cuda":
        from scope_ray.devices import cuda_problem, device_for

        device_for([device.index], cuda_problem())  # a granted GPU torch cannot use fails here, with the facts
    sae, optimizer = _new_sae(cfg)
    progress = _resume(cfg, sae, optimizer, rank)
    _to_device(sae, optimizer, device)
    workers = _worker_nodes(rank, world, dist, device)
    module = _LossModule(sae, cfg["aux_coef"])
    if world > 1:
        # θ, the dead counters and the revival count are reduced over the workers at every step
        # (make_stats_reducer), so they are the global batch's and identical everywhere; DDP's
        # own buffer broadcast (rank 0's copy over the others' each forward) is not needed.
        sae.stats_reducer = make_stats_reducer(dist)
        module = prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})
    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch, total = cfg["steps_per_epoch"], cfg["total_steps"]
    fault = cfg.get("fault_at_step")
    while progress.step < total:
        epoch = progress.step // steps_per_epoch
        done_in_epoch = progress.step % steps_per_epoch  # non-zero only right after a resume
        batches = shard.iter_torch_batches(
            batch_size=cfg["batch_size"], drop_last=True, dtypes=torch.float32, device=device,
            local_shuffle_buffer_size=cfg["shuffle_buffer"] or None,
            local_shuffle_seed=(cfg["seed"] * 1_000_003 + epoch * 7919 + rank) if cfg["shuffle_buffer"] else None,
        )
        for i, batch in enumerate(batches):
            if i < done_in_epoch:
                continue  # trained before the checkpoint: replay the epoch's order, skip the work
            if i >= steps_per_epoch or progress.step >= total:
                break
            x = batch["x"]
            finite = torch.isfinite(x).all(dim=1)
            n_bad = int((~finite).sum())
            if n_bad:
                progress.nonfinite += n_bad if epoch == 0 else 0
                x = x[finite]
            if fault:
                _inject_fault(fault, progress.step, rank, world)
            loss = train_step(module, sae, optimizer, x)
            progress.step += 1
            if progress.step % cfg["log_every"] == 0 or progress.step == total:
                _log_step(cfg, sae, loss, progress, dist, world, rank)
            if progress.step % cfg["checkpoint_every"] == 0 or progress.step == total:
                _report(sae, optimizer, progress, workers, dist, world, rank)


def _all_sum(value: int, dist, world: int) -> int:
    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item())


# ------------------------------------------------------------------------- driver side
@dataclass
class TrainResult:
    skipped: bool
    steps: int = 0
    nonfinite_rows: int = 0
    final: dict | None = None
    manifest: dict | None = None
    resumed_from: list[int] | None = None  # steps at which a restarted worker group picked up a checkpoint


def _token_files(job: JobConfig, root: ResultsRoot) -> tuple[StageDir, list[str]]:

    extract = root.stage(job.model.name, "extract")
    if not extract.is_complete(extract_hash(job)):
        why = "is missing" if not extract.is_complete() else "was run with another config (model, layer, data or extract settings)"
        raise RuntimeError(f"{job.model.name}: the extract stage at {extract.uri} {why}; run `scope-ray stage extract` first")
    files = extract.part_files("train_tokens")
    if not files:
        raise RuntimeError(f"{job.model.name}: extraction produced no training tokens")
    return extract, files


def _scale_sample(files: list[str], root: ResultsRoot, n: int) -> np.ndarray:
    """Up to ``n`` finite token rows from the first part files (the scale needs a sample, not all)."""
    parts, have = [], 0
    for f in files:
        x = _to_matrix(pq.read_table(f, columns=["activation"], filesystem=root.arrow_fs))["x"]
        x = x[np.isfinite(x).all(axis=1)]
        parts.append(x)
        have += len(x)
        if have >= n:
            break
    sample = np.concatenate(parts)[:n] if parts else np.zeros((0, 0), np.float32)
    if len(sample) == 0:
        raise ValueError("no finite token rows to fix the SAE input scale from")
    return sample


def _loop_config(job: JobConfig, files: list[str], root: ResultsRoot, n_rows: int, steps_per_epoch: int,
                 total_steps: int, dead_after: int) -> dict:
    """What every Train worker's loop is told (plain numbers: no sample travels to the workers)."""
    spec, workers = job.model.spec, job.sae.num_workers
    sample = _scale_sample(files, root, job.sae.scale_sample)
    mean_sq = float((sample.astype(np.float64) ** 2).sum(axis=1).mean())
    cfg = {
        "seed": job.seed, "d_in": spec.width, "d_sae": job.dictionary_size, "k": job.sae.k, "k_aux": job.sae.k_aux,
        "dead_after_tokens": dead_after, "threshold_ema": job.sae.threshold_ema, "lr": job.sae.lr,
        "aux_coef": job.sae.aux_coef, "batch_size": job.sae.batch_size // workers,
        # A buffer larger than a worker's share of an epoch never fills: cap it at half of that.
        "shuffle_buffer": min(job.sae.shuffle_buffer, n_rows // (2 * workers)),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "log_every": job.sae.log_every,
        "checkpoint_every": job.sae.checkpoint_every, "input_scale": math.sqrt(spec.width / mean_sq),
        "b_dec_init": sample.mean(axis=0, dtype=np.float64).tolist(), "torch_threads": job.ray.torch_threads,
    }
    fault = faults.plan(STAGE)
    if fault is not None:
        cfg["fault_at_step"] = {"step": fault["step"], "marker": fault["marker"], "kind": fault.get("kind", "raise")}
    return cfg


def _token_stream(job: JobConfig, files: list[str], root: ResultsRoot):
    """The training tokens as a Ray Dataset, and the ingest options Ray Train must read it with."""
    import ray.data
    import ray.train
    from ray.data import FileShuffleConfig

    # File-order shuffle plus each worker's local shuffle buffer: a shuffle that streams.
    # (randomize_block_order would be all-to-all: every token block in the object store first.)
    ds = ray.data.read_parquet(files, filesystem=root.arrow_fs, num_cpus=job.ray.read_cpus, partitioning=None,
                               shuffle=FileShuffleConfig(seed=job.seed)).select_columns(["activation"])
    ds = ds.map_batches(_to_matrix, batch_format="pyarrow", num_cpus=job.ray.read_cpus)
    # Same seed, same batches: a re-run (or a resume that replays an epoch's order) must see the
    # data in the same order. Ray Train runs the split with its own execution options (not the
    # dataset's context), so the ordering has to be asked for there.
    with warnings.catch_warnings():
        # Ray 2.60's own default options touch a deprecated field; nothing for a user to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return ds, ingest


def run_train_sae(job: JobConfig, root: ResultsRoot, *, log=info) -> TrainResult:
    """Train (or skip, or resume) the SAE for ``job``. (Tests break one worker through
    ``scope_ray.faults``: plan ``train-sae``.)"""
    import ray.train
    from ray.train.torch import TorchTrainer

    from scope_ray.stages.cluster import role_gpus

    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[train-sae] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        return TrainResult(skipped=True, manifest=stage.manifest())
    if job.sae.source is not None:
        return _import(job, root, stage, chash, log)
    extract, files = _token_files(job, root)
    spec = job.model.spec
    check_token_width(files, root, spec.width, "train-sae")
    n_rows = extract.manifest()["rows"]["train_tokens"]
    workers = job.sae.num_workers
    worker_gpus = role_gpus(job.ray.gpus_per_sae_worker, "ray.gpus_per_sae_worker")
    _check_train_resources(job, workers, worker_gpus, log)
    # sae.batch_size is the global batch, split evenly over the workers: a run's steps, learning
    # rate and tokens per step do not depend on how many workers share it (docs/sae.md).
    steps_per_epoch = n_rows // job.sae.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"sae.batch_size={job.sae.batch_size} exceeds the {n_rows} training tokens; "
                         f"allowed: batch_size <= {n_rows}")
    total_steps = steps_per_epoch * job.sae.epochs
    dead_after = _dead_window(job, total_steps * job.sae.batch_size, log)
    run_name = f"sae-{chash}"
    # Checkpoints of this config (under TRAIN_DIR) are how an interrupted run resumes: kept.
    with stage.writing(chash, keep=(TRAIN_DIR,), lease_seconds=job.storage.lease_seconds):
        cfg = _loop_config(job, files, root, n_rows, steps_per_epoch, total_steps, dead_after)
        ds, ingest = _token_stream(job, files, root)
        storage_path = posixpath.join(stage.path, TRAIN_DIR)
        if root.scheme == "file":
            os.makedirs(storage_path, exist_ok=True)
        resume = _latest_checkpoint(root, posixpath.join(storage_path, run_name))
        if resume is not None:
            log(f"[train-sae] resuming the interrupted run from {resume.path}")
            # Ray 2.60 deprecates TorchTrainer(resume_from_checkpoint=); the loop loads it itself
            # whenever Ray Train has no newer checkpoint of this fit to hand.
            cfg["resume_from"] = resume
        log(f"[train-sae] {job.model.name}: {n_rows} tokens, d={spec.width} -> q={cfg['d_sae']}, K={job.sae.k}, "
            f"{workers} worker(s), {total_steps} steps of {job.sae.batch_size} tokens"
            + (f" ({job.sae.batch_size // workers} per worker)" if workers > 1 else ""))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=worker_gpus > 0,
                resources_per_worker={"CPU": job.ray.cpus_per_actor, **({"GPU": worker_gpus} if worker_gpus else {})},
            ),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage_path,
                storage_filesystem=None if root.scheme == "file" else root.arrow_fs,
                failure_config=ray.train.FailureConfig(max_failures=job.sae.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": ds},
            dataset_config=ray.train.DataConfig(execution_options=ingest),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"train-sae: Ray Train finished without a checkpoint ({result.error})")
        return _finish(job, root, stage, chash, result.checkpoint, total_steps, dead_after, log)


def _import(job: JobConfig, root: ResultsRoot, stage: StageDir, chash: str, log) -> TrainResult:
    """``sae.source``: read the SAE another toolkit trained (exactly; scope_ray/sae_import.py),
    check it fits the model and the configured dictionary, and commit it as this stage's SAE."""
    from scope_ray.sae_import import InputNormalization, Source, import_sae

    src = job.sae.source
    norm = src.input_normalization
    sae = import_sae(Source(src.format, src.path, src.architecture, src.k, src.threshold,
                            None if norm is None else InputNormalization(norm.scale, norm.mean)),
                     endpoint_url=job.storage.endpoint_url)
    spec = job.model.spec
    if sae.d_in != spec.width:
        raise ValueError(f"sae.source {src.path}: the SAE reads width {sae.d_in}, but {spec.name} layer "
                         f"{job.model.resolved_layer} has width {spec.width}; was it trained on another model?")
    if sae.d_sae != job.dictionary_size:
        raise ValueError(f"sae.source {src.path}: {sae.d_sae} latents, but sae.expansion {job.sae.expansion} x width "
                         f"{spec.width} = {job.dictionary_size}; set sae.expansion to {sae.d_sae / spec.width:g}"
                         + ("" if sae.d_sae % spec.width == 0 else " (not a whole multiple: not supported yet)"))
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        sae_file = stage.run_name(SAE_FILE)
        sae.save(posixpath.join(stage.uri, sae_file), endpoint_url=root.endpoint_url)
        manifest = stage.commit(chash, {"sae_source": src.model_dump(mode="json")}, {},
                                extra={"sae_file": sae_file, "imported": sae.provenance, "d_in": sae.d_in,
                                       "d_sae": sae.d_sae, "k": sae.k, "activation": sae.activation})
    log(f"[train-sae] {job.model.name}: imported a {src.format} {sae.provenance['architecture']} SAE "
        f"({sae.d_in} -> {sae.d_sae}, {sae.activation}) from {src.path}; no training")
    return TrainResult(skipped=False, steps=0, manifest=manifest)


def _dead_window(job: JobConfig, run_tokens: int, log=info) -> int:
    """The dead-latent window of this run (``sae.dead_after_tokens`` resolved; counted in tokens
    of the global batch), with a warning when AuxK cannot fire in it: no latent can be silent for
    longer than the run."""
    window = job.sae.resolved_dead_after_tokens(run_tokens)
    if window >= run_tokens:
        log(f"[train-sae] WARNING: sae.dead_after_tokens={window} is not shorter than the {run_tokens} tokens "
            "this run trains on: no latent can count as dead, so AuxK never runs. Use 'auto' or a "
            "smaller window.")
    return window


def _check_train_resources(job: JobConfig, workers: int, gpus_per_worker: float, log=info) -> None:
    """Ray Train would wait forever for a worker group the cluster cannot place: fail now instead."""
    import ray

    total = ray.cluster_resources()
    free = _free_cpus_after_packing([n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")],
                                    workers, job.ray.cpus_per_actor)
    if free is not None and max(free, default=0.0) < 1.0:
        # Ray Data 2.60's file-listing task asks for one whole CPU whatever num_cpus says; with the
        # Train workers packed onto the nodes, no node may have one left and the token read never
        # starts. Packing is Ray's choice, so this is a warning, not an error.
        log(f"[train-sae] WARNING: {workers} Train worker(s) x {job.ray.cpus_per_actor:g} CPUs may leave no node with "
            f"a whole free CPU (per-node CPUs left after packing: {[round(f, 2) for f in free]}); the token read needs one "
            "and would wait forever. Lower ray.cpus_per_actor or use nodes with a spare CPU.")
    need_cpu = workers * job.ray.cpus_per_actor
    if need_cpu + job.ray.read_cpus > total.get("CPU", 0):
        raise ClusterResourceError(
            f"sae.num_workers={workers} x ray.cpus_per_actor={job.ray.cpus_per_actor} (+ {job.ray.read_cpus} for "
            f"reading tokens) exceeds the cluster's {total.get('CPU', 0):g} CPUs; lower one of them")
    if gpus_per_worker and workers * gpus_per_worker > total.get("GPU", 0):
        raise ClusterResourceError(f"sae.num_workers={workers} needs {workers * gpus_per_worker:g} GPUs; "
                                   f"the cluster has {total.get('GPU', 0):g}")


def _free_cpus_after_packing(node_cpus: list[float], workers: int, cpus_per_worker: float) -> list[float] | None:
    """CPUs left per node once ``workers`` bundles are packed first-fit onto the largest nodes
    (what Ray Train's PACK placement tends to do); None when they do not fit at all."""
    free = sorted(node_cpus, reverse=True)
    for _ in range(workers):
        slot = next((i for i, f in enumerate(free) if f + 1e-9 >= cpus_per_worker), None)
        if slot is None:
            return None
        free[slot] -= cpus_per_worker
    return free


def _latest_checkpoint(root: ResultsRoot, run_dir: str):
    """The furthest checkpoint an earlier, interrupted attempt of this exact run left behind.

    Ray Train restores failed workers within one ``fit``; a driver that died (or a stage re-run
    after a failure) starts a new ``fit``, which is pointed at the furthest checkpoint explicitly.
    """
    import ray.train

    best, best_step = None, -1
    for progress in root.fs.glob(posixpath.join(run_dir, "checkpoint_*", PROGRESS_FILE)):
        try:
            step = json.loads(root.fs.cat_file(progress))["step"]
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint cut off mid-write is not one to resume from
        if step > best_step:
            best, best_step = posixpath.dirname(progress), step
    if best is None:
        return None
    return ray.train.Checkpoint(best, filesystem=root.arrow_fs)


def _finish(job: JobConfig, root: ResultsRoot, stage: StageDir, chash: str, checkpoint, total_steps: int,
            dead_after: int, log) -> TrainResult:
    from scope_ray.sae import BatchTopKSAE

    spec = job.model.spec
    sae = BatchTopKSAE(spec.width, job.dictionary_size, job.sae.k, k_aux=job.sae.k_aux,
                       dead_after_tokens=dead_after, threshold_ema=job.sae.threshold_ema)
    # The driver needs the dictionary and the run's record, never the optimizer state: on the
    # shipped clusters it runs on a GPU-less head.
    with checkpoint.as_directory() as d:
        progress = _load_progress(d)
        _load_sae_state(d, sae)
    step, nonfinite, history = progress["step"], progress["nonfinite_rows"], progress["log"]
    resumed_from, workers = progress["resumed_from"], progress.get("workers", [])
    if step != total_steps:
        raise RuntimeError(f"train-sae: final checkpoint is at step {step}, expected {total_steps}")
    bad = [name for name, t in sae.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        # A diverged run (too high a learning rate, say) must not become the dictionary every
        # later stage reads: nothing is committed, and the log says where the loss went.
        last = history[-1] if history else {}
        raise RuntimeError(f"train-sae: the trained SAE has non-finite values in {', '.join(bad)} (last logged loss "
                           f"{last.get('loss', float('nan')):.4g} at step {last.get('step', '?')}); not committing. "
                           "Lower sae.lr or check the tokens")
    sae.eval()
    # Named by the run like every file it writes: the committed SAE stays until this manifest lands.
    sae_file = stage.run_name(SAE_FILE)
    sae.save(posixpath.join(stage.uri, sae_file), endpoint_url=root.endpoint_url)
    stage.write_part("training_log", "part-0", pa.Table.from_pylist(history))
    final = history[-1] if history else {}
    manifest = stage.commit(
        chash, {"train_tokens": root.stage(job.model.name, "extract").uri}, {"training_log": len(history)},
        extra={"sae_file": sae_file, "steps": step, "nonfinite_rows": nonfinite, "d_in": spec.width,
               "d_sae": sae.d_sae, "k": sae.k, "final": final, "resumed_from_steps": resumed_from,
               "workers": workers, "dead_after_tokens": dead_after,
               "revived_latents": int(sum(r.get("revived", 0) for r in history))},
    )
    log(f"[train-sae] done: {step} steps, final fvu {final.get('fvu', float('nan')):.3f}, l0 {final.get('l0', float('nan')):.1f}, "
        f"dead {final.get('dead_fraction', float('nan')):.3f} (window {dead_after} tokens), "
        f"{manifest['revived_latents']} revivals by AuxK; {nonfinite} non-finite token rows excluded")
    return TrainResult(skipped=False, steps=step, nonfinite_rows=nonfinite, final=final, manifest=manifest,
                       resumed_from=resumed_from)



"""Fitting one linear probe (METHOD §9): SGD with momentum 0.9 and cosine annealing over the
epochs, the val metric after every epoch. Pure PyTorch on in-memory arrays, no Ray: the probe
search's Train worker calls ``fit_probe`` with a callback that reports each epoch, the planted
removal test and the benchmark call it directly.

A fit can be checkpointed and resumed: every ``checkpoint_every`` epochs (and after the last)
the callback also gets a ``FitState`` — head weights, SGD momentum buffers, the LR schedule's
position, the epoch, the val curve so far and the shuffling generator's state — and
``fit_probe(..., resume=state)`` carries on from it to exactly the head and metrics an
uninterrupted fit gives. On disk a state is ``head.safetensors`` + ``optimizer.safetensors``
(tensors) + ``state.json`` (scalars): no pickle.

What differs between tasks (the arrays, head, loss and metric) is ``probes/tasks.py``'s; this
module fits any of them the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scope_ray.probes.tasks import TASKS, Task

# Val metric per task and whether larger is better.
METRICS: dict[str, tuple[str, str]] = {name: (t.metric, t.better) for name, t in TASKS.items()}


@dataclass(frozen=True)
class ProbeSpec:
    """Everything one probe fit depends on."""

    task: Task
    width: int  # D
    image_size: int  # S: masks and depth maps are S x S
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int = 0
    num_classes: int | None = None  # classification / segmentation
    depth_bins: int = 256
    max_depth: float = 10.0

    def __post_init__(self) -> None:
        if self.task not in METRICS:
            raise ValueError(f"unknown probe task {self.task!r}; allowed: {list(METRICS)}")
        if TASKS[self.task].needs_classes and not (self.num_classes and self.num_classes >= 2):
            raise ValueError(f"{self.task} probe needs num_classes >= 2, got {self.num_classes}")


@dataclass
class ProbeFit:
    value: float  # the val metric after the last epoch (NaN when the fit diverged)
    curve: list[float]  # the val metric after every epoch
    train_loss: float  # mean training loss of the last epoch
    diverged: bool
    head: torch.nn.Module
    seconds_train: float
    samples_seen: int = 0  # training samples processed (for throughput)


def build_head(spec: ProbeSpec) -> torch.nn.Module:
    return TASKS[spec.task].build_head(spec)


def _forward(spec: ProbeSpec, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return TASKS[spec.task].forward(spec, head, batch)


def _loss(spec: ProbeSpec, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return TASKS[spec.task].loss(out, batch)


def _batches(arrays: dict[str, np.ndarray], order: np.ndarray, batch_size: int, device) -> Iterator[dict]:
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(device) for k, v in arrays.items()}


def num_rows(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


@torch.no_grad()
def evaluate(spec: ProbeSpec, head: torch.nn.Module, val: dict[str, np.ndarray], device="cpu") -> float:
    """The task's val metric: top-1 (fraction), mIoU (fraction, ignore 255) or RMSE (metres,
    valid pixels only)."""
    task = TASKS[spec.task]
    meter = task.meter(spec)
    head.eval()
    for batch in _batches(val, np.arange(num_rows(val)), spec.batch_size, device):
        task.update(meter, task.forward(spec, head, batch), batch)
    return task.value(meter)


HEAD_FILE, OPTIMIZER_FILE, STATE_FILE = "head.safetensors", "optimizer.safetensors", "state.json"
_MOMENTUM = ".momentum_buffer"


@dataclass
class FitState:
    """Everything a fit needs to carry on after ``epoch`` epochs exactly as if never stopped.

    Tensors live on the CPU. ``optimizer`` / ``scheduler`` are ``torch.optim`` state dicts without
    their tensors (the momentum buffers are ``momentum``, keyed by parameter name); ``rng`` is the
    NumPy bit generator's state that draws each epoch's shuffling order."""

    spec: dict  # dataclasses.asdict(ProbeSpec) of the fit that saved it
    n_train: int
    epoch: int  # epochs completed
    head: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]  # parameter name -> SGD momentum buffer (same shape)
    optimizer: dict  # SGD param_groups (lr as the schedule left it, momentum, weight decay, ...)
    scheduler: dict  # CosineAnnealingLR position (last_epoch, _last_lr, ...)
    rng: dict  # numpy.random.Generator.bit_generator.state
    curve: list[float]
    train_loss: float
    diverged: bool
    samples_seen: int
    seconds_train: float  # training seconds of every epoch so far, across resumes

    @property
    def finished(self) -> bool:
        return self.diverged or self.epoch >= self.spec["epochs"]

    def save(self, directory: str) -> None:
        import safetensors.torch

        safetensors.torch.save_file(self.head, os.path.join(directory, HEAD_FILE))
        safetensors.torch.save_file({f"{k}{_MOMENTUM}": v for k, v in self.momentum.items()},
                                    os.path.join(directory, OPTIMIZER_FILE))
        tensors = ("head", "momentum")
        scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in tensors}
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(scalars, f)  # floats round-trip exactly (repr); NaN is written as NaN

    @classmethod
    def load(cls, directory: str) -> "FitState":
        import safetensors.torch

        with open(os.path.join(directory, STATE_FILE)) as f:
            scalars = json.load(f)
        momentum = safetensors.torch.load_file(os.path.join(directory, OPTIMIZER_FILE))
        return cls(head=safetensors.torch.load_file(os.path.join(directory, HEAD_FILE)),
                   momentum={k[:-len(_MOMENTUM)]: v for k, v in momentum.items()}, **scalars)


def _capture(spec: ProbeSpec, n_train: int, epoch: int, head: torch.nn.Module, opt: torch.optim.Optimizer,
             sched: Any, rng: np.random.Generator, curve: list[float], train_loss: float, diverged: bool,
             seen: int, seconds_train: float) -> FitState:
    names = [name for name, _ in head.named_parameters()]  # the optimizer's parameter order
    opt_state = opt.state_dict()
    momentum = {names[i]: s["momentum_buffer"].detach().cpu().clone() for i, s in opt_state["state"].items()
                if s.get("momentum_buffer") is not None}
    return FitState(spec=dataclasses.asdict(spec), n_train=n_train, epoch=epoch,
                    head={k: v.detach().cpu().clone().contiguous() for k, v in head.state_dict().items()},
                    momentum=momentum, optimizer={"param_groups": opt_state["param_groups"]},
                    scheduler=sched.state_dict(), rng=rng.bit_generator.state, curve=list(curve),
                    train_loss=train_loss, diverged=diverged, samples_seen=seen, seconds_train=seconds_train)


def _restore(state: FitState, spec: ProbeSpec, n_train: int, head: torch.nn.Module, opt: torch.optim.Optimizer,
             sched: Any, rng: np.random.Generator) -> None:
    # A state only continues the fit that saved it: another trial's state would resume silently wrong.
    if state.spec != dataclasses.asdict(spec) or state.n_train != n_train:
        raise ValueError(f"cannot resume: the saved state is of a fit with spec {state.spec} on {state.n_train} "
                         f"training rows, this fit is {dataclasses.asdict(spec)} on {n_train}")
    head.load_state_dict(state.head)
    names = [name for name, _ in head.named_parameters()]
    opt.load_state_dict({"state": {i: {"momentum_buffer": state.momentum[n]} for i, n in enumerate(names)
                                   if n in state.momentum},
                         "param_groups": state.optimizer["param_groups"]})
    sched.load_state_dict(state.scheduler)
    rng.bit_generator.state = state.rng


# on_epoch(epoch (1-based), metrics of that epoch, head, last epoch?, state): ``state`` is the
# resumable FitState after this epoch on checkpoint epochs (every ``checkpoint_every`` and the
# last), else None.
EpochCallback = Callable[[int, dict, torch.nn.Module, bool, "FitState | None"], None]


def fit_probe(spec: ProbeSpec, train: dict[str, np.ndarray], val: dict[str, np.ndarray], *,
              device="cpu", on_epoch: EpochCallback | None = None, checkpoint_every: int | None = None,
              resume: FitState | None = None) -> ProbeFit:
    """Train a fresh head on ``train`` (or carry on from ``resume``) and score it on ``val``
    after every epoch.

    Deterministic for a given spec (seeded init and shuffling), resumed or not. A loss that turns
    non-finite (a high sampled lr) ends the fit as diverged, with value NaN: a search goes on with
    its other trials rather than failing. ``checkpoint_every``: hand ``on_epoch`` a ``FitState``
    every that many epochs and after the last (None: never). A ``resume`` state that is already
    finished returns its fit at once, without calling ``on_epoch``.
    """
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
    with torch.random.fork_rng(devices=[]):  # seeding here must not reset the caller's stream
        torch.manual_seed(spec.seed)
        head = build_head(spec).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    rng = np.random.default_rng(spec.seed)
    n = num_rows(train)
    curve: list[float] = []
    diverged, mean_loss, seen, seconds_before, done = False, float("nan"), 0, 0.0, 0
    if resume is not None:
        _restore(resume, spec, n, head, opt, sched, rng)
        curve, diverged, mean_loss = list(resume.curve), resume.diverged, resume.train_loss
        seen, seconds_before, done = resume.samples_seen, resume.seconds_train, resume.epoch
    t0 = time.perf_counter()
    if resume is not None and resume.finished:
        return ProbeFit(value=curve[-1], curve=curve, train_loss=mean_loss, diverged=diverged, head=head,
                        seconds_train=seconds_before, samples_seen=seen)
    for epoch in range(done + 1, spec.epochs + 1):
        head.train()
        total, batches = 0.0, 0
        for batch in _batches(train, rng.permutation(n), spec.batch_size, device):
            loss = _loss(spec, _forward(spec, head, batch), batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
            seen += num_rows(batch)
        sched.step()
        mean_loss = total / max(batches, 1)
        diverged = diverged or not all(bool(torch.isfinite(p).all()) for p in head.parameters())
        value = float("nan") if diverged else evaluate(spec, head, val, device)
        curve.append(value)
        last = diverged or epoch == spec.epochs
        seconds = seconds_before + time.perf_counter() - t0
        state = None
        if checkpoint_every is not None and (last or epoch % checkpoint_every == 0):
            state = _capture(spec, n, epoch, head, opt, sched, rng, curve, mean_loss, diverged, seen, seconds)
        if on_epoch is not None:
            on_epoch(epoch, {"epoch": epoch, "value": value, "train_loss": mean_loss, "diverged": diverged,
                             "seconds_train": seconds, "curve": list(curve)}, head, last, state)
        if last:
            break
    return ProbeFit(value=curve[-1], curve=curve, train_loss=mean_loss, diverged=diverged, head=head,
                    seconds_train=seconds_before + time.perf_counter() - t0, samples_seen=seen)

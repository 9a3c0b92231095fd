"""Fitting one linear probe (METHOD §9): SGD with momentum 0.9 and cosine annealing over the
epochs, the val metric after every epoch. Pure PyTorch on in-memory arrays, no Ray: the probe
search's Train worker calls ``fit_probe`` with a callback that reports each epoch, the planted
removal test and the benchmark call it directly.

Arrays (NumPy, what ``stages/probe_cache.load_split`` returns):
- classification: ``x`` [B, D] float32 pooled embeddings, ``y`` [B] int64 labels;
- segmentation: ``tokens`` [B, N, D] float32, ``mask`` [B, S, S] uint8 (255 = ignore);
- depth: ``cls`` [B, D] float32, ``tokens`` [B, N, D] float32, ``depth`` [B, S, S] float32 metres
  (0 / NaN = invalid pixel, masked in the loss and the metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from scope_ray.probes.heads import ClassificationProbe, DepthProbe, SegmentationProbe
from scope_ray.probes.losses import scale_invariant_loss, segmentation_loss
from scope_ray.probes.metrics import IGNORE_INDEX, Accuracy, ConfusionMatrix, DepthErrors

Task = Literal["classification", "segmentation", "depth"]
# Val metric per task and whether larger is better.
METRICS: dict[str, tuple[str, str]] = {"classification": ("top1", "max"), "segmentation": ("miou", "max"),
                                       "depth": ("rmse", "min")}


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
        if self.task != "depth" and not (self.num_classes and self.num_classes >= 2):
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
    if spec.task == "classification":
        return ClassificationProbe(spec.width, spec.num_classes)
    if spec.task == "segmentation":
        return SegmentationProbe(spec.width, spec.num_classes)
    return DepthProbe(spec.width, bins=spec.depth_bins, max_depth=spec.max_depth)


def _forward(spec: ProbeSpec, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    size = (spec.image_size, spec.image_size)
    if spec.task == "classification":
        return head(batch["x"])
    if spec.task == "segmentation":
        return head(batch["tokens"], size)
    return head(batch["cls"], batch["tokens"], size)


def _loss(spec: ProbeSpec, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if spec.task == "classification":
        return F.cross_entropy(out, batch["y"])
    if spec.task == "segmentation":
        return segmentation_loss(out, batch["mask"].long())
    return scale_invariant_loss(out, batch["depth"])


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
    if spec.task == "classification":
        acc = Accuracy()
    elif spec.task == "segmentation":
        acc = ConfusionMatrix(spec.num_classes, IGNORE_INDEX)
    else:
        acc = DepthErrors()
    head.eval()
    for batch in _batches(val, np.arange(num_rows(val)), spec.batch_size, device):
        out = _forward(spec, head, batch)
        if spec.task == "classification":
            acc.update(out, batch["y"])
        elif spec.task == "segmentation":
            acc.update(out.argmax(1), batch["mask"].long())
        else:
            acc.update(out, batch["depth"])
    if spec.task == "classification":
        return acc.value()
    return acc.miou() if spec.task == "segmentation" else acc.rmse()


# on_epoch(epoch (1-based), metrics of that epoch, head, last epoch?)
EpochCallback = Callable[[int, dict, torch.nn.Module, bool], None]


def fit_probe(spec: ProbeSpec, train: dict[str, np.ndarray], val: dict[str, np.ndarray], *,
              device="cpu", on_epoch: EpochCallback | None = None) -> ProbeFit:
    """Train a fresh head on ``train`` and score it on ``val`` after every epoch.

    Deterministic for a given spec (seeded init and shuffling). A loss that turns non-finite (a
    high sampled lr) ends the fit as diverged, with value NaN: a search goes on with its other
    trials rather than failing.
    """
    with torch.random.fork_rng(devices=[]):  # seeding here must not reset the caller's stream
        torch.manual_seed(spec.seed)
        head = build_head(spec).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    rng = np.random.default_rng(spec.seed)
    n = num_rows(train)
    t0 = time.perf_counter()
    curve: list[float] = []
    diverged, mean_loss, seen = False, float("nan"), 0
    for epoch in range(1, spec.epochs + 1):
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
        if on_epoch is not None:
            on_epoch(epoch, {"epoch": epoch, "value": value, "train_loss": mean_loss, "diverged": diverged,
                             "seconds_train": time.perf_counter() - t0, "curve": list(curve)}, head, last)
        if last:
            break
    return ProbeFit(value=curve[-1], curve=curve, train_loss=mean_loss, diverged=diverged, head=head,
                    seconds_train=time.perf_counter() - t0, samples_seen=seen)

"""The three probe tasks behind one contract (METHOD §9): each says what its batches hold, builds its
head, runs it, scores its loss and accumulates its val metric. ``probes/train.py`` fits any of
them without knowing which; a new task is one class here, registered in ``TASKS`` (an import-time
check makes the registry cover exactly ``Task``).

Arrays per task (NumPy, what ``stages/probe_cache.load_split`` returns):
- classification: ``x`` [B, D] float32 pooled embeddings, ``y`` [B] int64 labels;
- segmentation: ``tokens`` [B, N, D] float32, ``mask`` [B, S, S] uint8 (255 = ignore);
- depth: ``cls`` [B, D] float32, ``tokens`` [B, N, D] float32, ``depth`` [B, S, S] float32 metres
  (0 / NaN = invalid pixel, masked in the loss and the metric).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F

from scope_ray.probes.heads import ClassificationProbe, DepthProbe, SegmentationProbe
from scope_ray.probes.losses import scale_invariant_loss, segmentation_loss
from scope_ray.probes.metrics import IGNORE_INDEX, Accuracy, ConfusionMatrix, DepthErrors

if TYPE_CHECKING:
    from scope_ray.probes.train import ProbeSpec

Task = Literal["classification", "segmentation", "depth"]
Batch = dict[str, torch.Tensor]


class ProbeTask:
    """One task's head, forward, loss and metric."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the val metric's name
    better: ClassVar[str]  # "max" or "min"
    arrays: ClassVar[tuple[str, ...]]  # what a batch holds
    needs_classes: ClassVar[bool] = True

    def build_head(self, spec: "ProbeSpec") -> torch.nn.Module:
        raise NotImplementedError

    def forward(self, spec: "ProbeSpec", head: torch.nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def meter(self, spec: "ProbeSpec") -> Any:
        """A fresh accumulator of the val metric."""
        raise NotImplementedError

    def update(self, meter: Any, out: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError

    def value(self, meter: Any) -> float:
        raise NotImplementedError


class Classification(ProbeTask):
    name, metric, better, arrays = "classification", "top1", "max", ("x", "y")

    def build_head(self, spec):
        return ClassificationProbe(spec.width, spec.num_classes)

    def forward(self, spec, head, batch):
        return head(batch["x"])

    def loss(self, out, batch):
        return F.cross_entropy(out, batch["y"])

    def meter(self, spec):
        return Accuracy()

    def update(self, meter, out, batch):
        meter.update(out, batch["y"])

    def value(self, meter):
        return meter.value()


class Segmentation(ProbeTask):
    name, metric, better, arrays = "segmentation", "miou", "max", ("tokens", "mask")

    def build_head(self, spec):
        return SegmentationProbe(spec.width, spec.num_classes)

    def forward(self, spec, head, batch):
        return head(batch["tokens"], (spec.image_size, spec.image_size))

    def loss(self, out, batch):
        return segmentation_loss(out, batch["mask"].long())

    def meter(self, spec):
        return ConfusionMatrix(spec.num_classes, IGNORE_INDEX)

    def update(self, meter, out, batch):
        meter.update(out.argmax(1), batch["mask"].long())

    def value(self, meter):
        return meter.miou()


class Depth(ProbeTask):
    name, metric, better, arrays = "depth", "rmse", "min", ("cls", "tokens", "depth")
    needs_classes = False

    def build_head(self, spec):
        return DepthProbe(spec.width, bins=spec.depth_bins, max_depth=spec.max_depth)

    def forward(self, spec, head, batch):
        return head(batch["cls"], batch["tokens"], (spec.image_size, spec.image_size))

    def loss(self, out, batch):
        return scale_invariant_loss(out, batch["depth"])

    def meter(self, spec):
        return DepthErrors()

    def update(self, meter, out, batch):
        meter.update(out, batch["depth"])

    def value(self, meter):
        return meter.rmse()


TASKS: dict[str, ProbeTask] = {t.name: t() for t in (Classification, Segmentation, Depth)}
if set(TASKS) != set(get_args(Task)):  # every declared task has exactly one implementation
    raise ImportError(f"probe tasks {sorted(TASKS)} do not match Task {sorted(get_args(Task))}")

"""The probe tasks' one contract (scope_ray/probes/tasks.py)."""

from typing import get_args

import numpy as np
import pytest
import torch

from scope_ray.probes.tasks import TASKS, Task
from scope_ray.probes.train import METRICS, ProbeSpec, build_head, evaluate


def test_every_task_has_one_implementation_with_its_metric():
    assert set(TASKS) == set(get_args(Task)) == set(METRICS)
    assert {n: (t.metric, t.better) for n, t in TASKS.items()} == {
        "classification": ("top1", "max"), "segmentation": ("miou", "max"), "depth": ("rmse", "min")}


def test_an_unknown_task_is_an_error_not_the_depth_head():
    with pytest.raises(ValueError, match="unknown probe task 'normals'"):
        ProbeSpec(task="normals", width=8, image_size=4, epochs=1, batch_size=2, lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_runs_head_loss_and_metric_on_the_arrays_it_declares(task):
    d, n, s, b = 8, 4, 4, 3
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(b, d)).astype(np.float32), "y": np.array([0, 1, 1]),
              "tokens": rng.normal(size=(b, n, d)).astype(np.float32),
              "mask": rng.integers(0, 2, size=(b, s, s)).astype(np.uint8),
              "cls": rng.normal(size=(b, d)).astype(np.float32),
              "depth": rng.uniform(1, 5, size=(b, s, s)).astype(np.float32)}
    impl = TASKS[task]
    val = {k: arrays[k] for k in impl.arrays}
    spec = ProbeSpec(task=task, width=d, image_size=s, epochs=1, batch_size=2, lr=0.1, weight_decay=0.0,
                     num_classes=None if not impl.needs_classes else 2)
    head = build_head(spec)
    batch = {k: torch.from_numpy(v) for k, v in val.items()}
    loss = impl.loss(impl.forward(spec, head, batch), batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert np.isfinite(evaluate(spec, head, val))

"""SAE training curves in the report, and the same curves for TensorBoard.

Read from each model's committed train-sae ``training_log`` (docs/storage.md); an imported SAE
(``sae.source``) has none and is skipped. The report draws one figure per model (loss, FVU, L0,
dead latents against the step); ``write_tensorboard`` writes the same scalars as TensorBoard event
files under the report folder, ``tensorboard/<model>/``, so ``tensorboard --logdir
REPORT/tensorboard`` shows every model's run side by side. Pure: no Ray.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from scope_ray.report.document import Figure, Section
from scope_ray.report.figures import TRAINING_CURVES, training_curves
from scope_ray.storage import ResultsRoot

TENSORBOARD_DIR = "tensorboard"
SCALARS = tuple(key for key, _ in TRAINING_CURVES) + ("revived", "threshold")


def training_log(root: ResultsRoot, run) -> list[dict] | None:
    """The committed training log of ``run`` (a report ModelRun), or None when there is none."""
    manifest = run.manifests.get("train-sae")
    if not manifest or "training_log" not in (manifest.get("tables") or {}):
        return None
    return root.stage(run.name, "train-sae").read_table("training_log").to_pylist()


def training_section(root: ResultsRoot, runs: list, tmp: Path) -> Section | None:
    """One figure per model with a training log; None when no model has one."""
    figures = []
    for run in runs:
        rows = training_log(root, run)
        if not rows:
            continue
        path = training_curves(rows, tmp / f"training-{run.name}.png",
                               title=f"{run.name}: SAE training ({len(rows)} logged steps, last step {rows[-1]['step']})")
        figures.append(Figure(f"SAE training curves — {run.name}", f"training--{run.name}.png", path.read_bytes()))
    if not figures:
        return None
    return Section("SAE training curves", [
        "train-sae's log as committed (sae.log_every steps apart): the loss in the scaled space, FVU and L0 of the "
        "training batches, and the fraction of latents dead (no firing for sae.dead_after_tokens tokens). The same "
        f"scalars are written for TensorBoard: `tensorboard --logdir <report folder>/{TENSORBOARD_DIR}`."],
        figures=figures)


def write_tensorboard(root: ResultsRoot, runs: list, out: Path) -> list[Path]:
    """``out/tensorboard/<model>/`` event files of every model's training log (replacing the ones an
    earlier report wrote, so a re-run never shows a curve twice). Returns the model folders."""
    from tensorboardX import SummaryWriter

    written = []
    for run in runs:
        rows = training_log(root, run)
        if not rows:
            continue
        folder = out / TENSORBOARD_DIR / run.name
        shutil.rmtree(folder, ignore_errors=True)
        writer = SummaryWriter(logdir=str(folder))
        try:
            for row in sorted(rows, key=lambda r: r["step"]):
                for key in SCALARS:
                    value = row.get(key)
                    if value is not None and math.isfinite(float(value)):
                        writer.add_scalar(f"train-sae/{key}", float(value), global_step=int(row["step"]),
                                          walltime=row.get("time"))
        finally:
            writer.close()
        written.append(folder)
    return written

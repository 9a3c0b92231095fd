"""The pipeline, declared once: every result directory, how its config hash chains from its
upstream's, and the command-line stages that run them, in order.

The CLI (stage names, ``--stages``), the demo, the sweep's plan (which directories a stage must
have committed) and the report (the order it lists directories in) all read this module; no stage
module imports another (a stage reads an upstream stage's results through ``scope_ray.stages.common``
and names it through the constants here).

A result directory is ``ROOT/<model>/<dir>/`` (docs/storage.md). A command-line stage may commit
several: ``cds`` runs pass 1 (``cds-topk``), pass 2 (``cds``) and the split (``partition``);
``probe`` caches the probe features (``probe-features``) and runs the search (``probe``).

Config hashes: what a directory's content depends on. Each hash ends with its upstream's (or part
of it), so a change upstream redoes everything below; ``JobConfig.stage_hash`` also covers the
content digest of any dataset or weights it names (docs/storage.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scope_ray.logs import info

if TYPE_CHECKING:
    from scope_ray.config import JobConfig

# ------------------------------------------------------------------------------ result directories
EXTRACT = "extract"
TRAIN_SAE = "train-sae"
EVAL_SAE = "eval-sae"
INSTABILITY = "instability"
CDS_TOPK = "cds-topk"
CDS = "cds"
PARTITION = "partition"
PROBE_FEATURES = "probe-features"
PROBE = "probe"
ZEROSHOT = "zeroshot"

# How a random control group is drawn (hashed by probe-features: features cached with a control
# drawn from all q, before 2026-12, are not the same variant and must not be reused).
RANDOM_POOL = "low group: scored features (finite CDS) with CDS <= gamma, i.e. scored features outside the high group"


@dataclass(frozen=True)
class Step:
    """One stage function: the result directory whose result it returns, and where it lives
    (``module:function``, imported when run; called as ``fn(job, root, **kwargs)``)."""

    name: str
    function: str

    def load(self):
        import importlib

        module, _, function = self.function.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Stage:
    """A command-line stage: its name, the result directories it commits (in order), the stages
    whose results it reads, and the steps that run it, in order."""

    name: str
    dirs: tuple[str, ...]
    upstream: tuple[str, ...]
    steps: tuple[Step, ...]
    needs_text_tower: bool = False  # zero-shot: other models succeed without writing anything


PIPELINE: tuple[Stage, ...] = (
    Stage("extract", (EXTRACT,), (), (Step(EXTRACT, "scope_ray.stages.extract:run_extract"),)),
    Stage("train-sae", (TRAIN_SAE,), ("extract",), (Step(TRAIN_SAE, "scope_ray.stages.train_sae:run_train_sae"),)),
    Stage("eval-sae", (EVAL_SAE,), ("extract", "train-sae"), (Step(EVAL_SAE, "scope_ray.stages.eval_sae:run_eval_sae"),)),
    Stage("instability", (INSTABILITY,), ("extract",),
          (Step(INSTABILITY, "scope_ray.stages.instability:run_instability"),)),
    # run_cds commits both passes (cds-topk, then cds) and returns the scores.
    Stage("cds", (CDS_TOPK, CDS, PARTITION), ("train-sae",),
          (Step(CDS, "scope_ray.stages.cds:run_cds"), Step(PARTITION, "scope_ray.stages.partition:run_partition"))),
    Stage("probe", (PROBE_FEATURES, PROBE), ("cds",),
          (Step(PROBE_FEATURES, "scope_ray.stages.probe_features:run_probe_features"),
           Step(PROBE, "scope_ray.stages.probe:run_probes"))),
    Stage("zeroshot", (ZEROSHOT,), ("probe",), (Step(ZEROSHOT, "scope_ray.stages.zeroshot:run_zeroshot"),),
          needs_text_tower=True),
)
STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
BY_NAME: dict[str, Stage] = {s.name: s for s in PIPELINE}
# Every step in pipeline order: what the demo runs, one result per step.
STEPS: tuple[Step, ...] = tuple(step for s in PIPELINE for step in s.steps)
# Every result directory in pipeline order (the report lists them so).
RESULT_DIRS: tuple[str, ...] = tuple(d for s in PIPELINE for d in s.dirs)


def stage_of(result_dir: str) -> str:
    """The command-line stage that commits ``result_dir`` (what a hint tells a user to run)."""
    for s in PIPELINE:
        if result_dir in s.dirs:
            return s.name
    raise KeyError(f"no stage commits {result_dir!r}; result directories: {', '.join(RESULT_DIRS)}")


def run_hint(result_dir: str) -> str:
    """The command that (re)makes ``result_dir``, as a user types it."""
    return f"scope-ray stage {stage_of(result_dir)}"


def runner(name: str, log=info):
    """The function that runs command-line stage ``name`` as ``fn(job, root)``: its steps in order.

    A step that skipped with a reason (zero-shot on a model without a text tower) says so; one that
    skipped because its result is already committed has said so itself."""
    steps = BY_NAME[name].steps

    def run(job, root) -> None:
        for step in steps:
            result = step.load()(job, root, log=log)
            reason = getattr(result, "reason", None)
            if getattr(result, "skipped", False) and reason:
                log(f"[{step.name}] skipped: {reason}")

    return run


def extract_hash(job: "JobConfig") -> str:
    """What the extracted tokens depend on (a change here means the stage is redone)."""
    # Only what changes the tokens: not tau (used by eval) nor the batch size (sampling is keyed
    # by image id, not by batch).
    base = job.stage_hash("model.name", "model.weights", "model.layer", "model.precision", "model.tf32",
                          "data.imagenet", "data.max_pixels", "data.max_aspect_ratio",
                          "data.min_side", "extract", exclude=("extract.batch_size",))
    # The model's eval resize / crop (its library's pretrained config). The plain one is the only
    # one before 2026-12-03, so stages committed with it keep their hash; any other names itself
    # here, and through train-sae's hash every downstream stage (probe features, galleries) too.
    from scope_ray.data.images import PLAIN

    transform = job.model.spec.transform
    if transform == PLAIN:
        return base
    from scope_ray.storage import content_hash

    return content_hash([base, repr(transform)])[:16]


def train_sae_hash(job: "JobConfig") -> str:
    # Retries, logging and checkpoint cadence do not change the dictionary: a re-run that only
    # changes them resumes the same run.
    operational = ("sae.max_failures", "sae.log_every", "sae.checkpoint_every", "sae.dense_fraction")
    return job.stage_hash("sae", exclude=operational) + extract_hash(job)[:8]


def eval_sae_hash(job: "JobConfig") -> str:
    return job.stage_hash("model.tau", "sae.dense_fraction")[:8] + train_sae_hash(job)


def instability_hash(job: "JobConfig", tau: float) -> str:
    """What the instability tables depend on: the model, the split, the selection and token cap,
    the alignment, the resolved shifts and the tau value itself (so a new extract giving another
    auto tau, or another ``scope.instability_alignment``, redoes it)."""
    split = job.scope.instability_split
    base = job.stage_hash("model.name", "model.weights", "model.layer", "model.precision", "model.tf32",
                          f"data.imagenet.{split}", "data.max_pixels", "data.max_aspect_ratio",
                          "data.min_side", "scope.instability_images", "scope.instability_split",
                          "scope.instability_tokens", "scope.instability_alignment")
    blob = json.dumps({"base": base, "tau": float(tau), "shifts": list(job.instability_shifts)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cds_topk_hash(job: "JobConfig") -> str:
    # scope.shift: the selection reads the overlap of the SCC pair at that shift.
    return job.stage_hash("data.imagenet", "data.max_pixels", "data.max_aspect_ratio", "data.min_side", "scope.pool_split",
                          "scope.pool_images", "scope.k_cds", "scope.spare_images", "scope.shift")[:8] + train_sae_hash(job)


def cds_hash(job: "JobConfig") -> str:
    return job.stage_hash("scope.shift")[:8] + cds_topk_hash(job)


def partition_hash(job: "JobConfig") -> str:
    return job.stage_hash("scope.gamma", "scope.min_usable_images", "scope.awcds_bins", "scope.gallery_features",
                          "scope.gallery_images", "scope.instability_images", "scope.instability_split",
                          f"data.imagenet.{job.scope.instability_split}", "model.tau")[:8] + cds_hash(job)


def probe_features_hash(job: "JobConfig") -> str:
    """What the probe features depend on: the task data, the decoding limits and (through the
    partition's hash) the model, layer, SAE and groups; not batch sizes or Ray settings."""
    from scope_ray.storage import content_hash

    data = job.stage_hash("data.imagenet", "data.ade20k", "data.nyud", "data.max_pixels", "data.max_aspect_ratio", "data.min_side")
    return content_hash([data, RANDOM_POOL])[:8] + partition_hash(job)

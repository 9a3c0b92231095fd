"""The shipped job and sweep specs: every one validates, the paper's settings per model, the demo
spec matches the builtin one, and the Ray job entrypoint passes the exit code through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scope_ray.config import load_config
from scope_ray.demo import demo_spec
from scope_ray.models.registry import REGISTRY
from scope_ray.sweep import load_sweep

JOBS = Path(__file__).resolve().parents[1] / "jobs"

# METHOD.md §11 (supp. A, Table 5): designated layer (1-based) and tau per paper model; None = auto.
# CLIP: the penultimate block, a decision (METHOD §1; the supplement states no CLIP layer) so that
# removal reaches CLIP's class-token embedding through the last block.
PAPER = {
    "clip-vit-b16": (11, None), "clip-vit-l14": (23, None), "clip-vit-l14-336": (23, None),
    "dinov2-b": (11, 100), "dinov2-l": (23, 100), "dinov2-g": (40, 150),
    "deit3-s": (10, 500), "deit3-b": (9, 500), "deit3-l": (18, 1000),
    "siglip2-b": (12, 150), "siglip2-l": (24, 150), "siglip2-g": (27, 300),
}


def _paths(job) -> list[str]:
    return [src.path for ds in (job.data.imagenet, job.data.ade20k, job.data.nyud)
            for src in (ds.train, ds.val) if src is not None] + [job.storage.root]


@pytest.mark.parametrize("model", sorted(PAPER))
def test_each_paper_model_has_a_spec_with_the_papers_settings(model):
    job = load_config(JOBS / f"{model}.yaml")
    layer, tau = PAPER[model]
    assert job.name == job.model.name == model and job.model.weights == "pretrained"
    assert job.model.resolved_layer == layer == REGISTRY[model].layer
    assert job.model.resolved_tau == ("auto" if tau is None else tau)
    assert (job.sae.expansion, job.sae.k, job.extract.tokens_per_image) == (32, 30, 4)
    assert job.dictionary_size == 32 * REGISTRY[model].width
    assert job.data.ade20k.train and job.data.nyud.val  # the probe tasks have data
    # Placeholders are marked as such, never a real-looking bucket someone might write to.
    assert all(p.startswith("s3://PLACEHOLDER-bucket/") for p in _paths(job))
    assert (job.zeroshot.class_names is not None) == REGISTRY[model].has_text_tower
    if REGISTRY[model].has_text_tower:  # zero-shot can see removal: a block runs after the edit (METHOD §10)
        assert job.zeroshot.image_embedding == "class_token" and job.model.resolved_layer < REGISTRY[model].depth


def test_the_jobs_folder_holds_the_paper_models_and_the_demo_and_nothing_else():
    assert {p.stem for p in JOBS.glob("*.yaml")} == set(PAPER) | {"demo"}


def test_the_demo_job_is_the_builtin_demo_with_cluster_data_paths():
    shipped = yaml.safe_load((JOBS / "demo.yaml").read_text())
    builtin = demo_spec()
    for section in ("data", "storage"):  # what the cluster version adds: where the data and results live
        shipped.pop(section)
        builtin.pop(section, None)
    assert shipped == builtin
    job = load_config(JOBS / "demo.yaml")
    assert job.model.name == "demo-planted" and all("PLACEHOLDER-bucket" in p for p in _paths(job))
    # The demo's data is synthetic, as `scope-ray demo` records it: the report must not set its
    # numbers beside the paper's as comparable.
    assert job.data.synthetic


SWEEPS = {"paper-all": set(PAPER), "clip": {m for m in PAPER if m.startswith("clip")},
          "base-models": {"clip-vit-b16", "dinov2-b", "deit3-b", "siglip2-b"}}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_each_sweep_loads_and_validates_its_jobs(name):
    sweep = load_sweep(JOBS / "sweeps" / f"{name}.yaml")
    assert {j.model for j in sweep.jobs} == SWEEPS[name]
    assert sweep.runtime_env["working_dir"] == str(JOBS.parent)  # the job specs travel with each job
    for j in sweep.jobs:
        assert j.entrypoint.startswith(f"python jobs/entrypoint.py jobs/{j.model}.yaml --stages extract,")
    # No entrypoint resources: only then does Ray 2.60 keep the driver on the (0-CPU) head node
    # instead of placing it on a GPU worker (docs/sweep.md, "The sweep spec").
    res = sweep.spec.entrypoint_resources
    assert (res.num_cpus, res.num_gpus) == (0, 0)


def test_the_sweeps_folder_holds_exactly_these_sweeps():
    assert {p.stem for p in (JOBS / "sweeps").glob("*.yaml")} == set(SWEEPS)


def test_entrypoint_runs_scope_ray_run_and_passes_its_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: {k: 0}\n")
    res = subprocess.run([sys.executable, str(JOBS / "entrypoint.py"), str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "sae.k" in res.stderr  # run's config error, exit code 2, before Ray starts
    res = subprocess.run([sys.executable, str(JOBS / "entrypoint.py"), str(bad), "--stages", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown stage" in res.stderr

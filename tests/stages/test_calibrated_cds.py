"""The calibrated ground truth through the real Ray stages (cds-topk, cds): per planted-aligned SAE
feature, the stored CDS against its hand-derived value (models/planted_calibrated.py).

The SAE committed as train-sae has the ten planted directions as its first ten atoms (encoder =
decoder = u_j, no bias, θ = 1e-3; the other atoms never fire), so its codes on the
demo-planted-calibrated model's tokens are the planted codes up to float32 rounding. The pool is
the calibrated one, PNG (lossless: the marker colours stay exact), with one decoy per direction.
Thresholds: planted_check.ground_truth_check's (MAE <= 0.01, Spearman >= 0.95, every direction
scored); tests/test_calibrated_ground_truth.py gives the reasons and the mutation gate.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
import pytest
import torch
from PIL import Image

from scope_ray.config import load_config
from scope_ray.data.synthetic import write_image_folder
from scope_ray.models import build_model
from scope_ray.models.planted import calibrated_directions
from scope_ray.models.planted_calibrated import DIRECTIONS, SHIFT, calibrated_pool, expected_cds
from scope_ray.planted_check import ground_truth_check
from scope_ray.sae import BatchTopKSAE
from scope_ray.stages.cds import run_cds
from scope_ray.stages.train_sae import SAE_FILE
from scope_ray.stages.train_sae import config_hash as train_hash
from scope_ray.storage import ResultsRoot

pytestmark = pytest.mark.slow
K_CDS, SPARES = 4, 2


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_calibrated_cds_through_the_stages(ray_local, tmp_path):
    pool = calibrated_pool(seed=0, good=K_CDS + SPARES, decoys=1)
    files = {"classes.txt": b"n00000000\n"}
    files.update({f"val/n00000000/{i.replace('/', '_')}.png": _png(img) for i, img in pool.items()})
    write_image_folder(str(tmp_path / "pool"), files)
    job = load_config({"storage": {"root": str(tmp_path / "results")},
                       "data": {"imagenet": {"val": {"format": "folder", "path": str(tmp_path / "pool" / "val")}}}},
                      ["model.name=demo-planted-calibrated", "sae.expansion=1", "sae.k=4", f"scope.shift={SHIFT}",
                       f"scope.k_cds={K_CDS}", f"scope.spare_images={SPARES}", "scope.batch_size=8",
                       "ray.num_actors=1"])
    root = ResultsRoot(job.storage.root)
    model = build_model(job.model.name, weights="none", seed=job.seed)
    u_JD = calibrated_directions(model)
    j, q, d = len(DIRECTIONS), job.dictionary_size, job.model.spec.width
    torch.manual_seed(0)
    sae = BatchTopKSAE(d, q, job.sae.k).eval()
    with torch.no_grad():
        sae.W_enc[:, :j] = u_JD.T  # W_enc is [D, q], W_dec [q, D]
        sae.W_dec[:j] = u_JD
        sae.b_enc.fill_(-1e6)
        sae.b_enc[:j] = 0.0
        sae.b_dec.zero_()
        sae.threshold.fill_(1e-3)
    stage = root.stage(job.model.name, "train-sae")
    sae.save(posixpath.join(stage.uri, SAE_FILE), endpoint_url=root.endpoint_url)
    stage.commit(train_hash(job), {}, {})

    result = run_cds(job, root, progress=False, log=lambda *_: None)
    table = root.stage(job.model.name, "cds").read_table("cds")
    measured = table.column("cds").to_numpy()[:j]
    expected = expected_cds(job.model.spec.grid, SHIFT)
    check = ground_truth_check(measured, expected)
    print("\nfeature  expected  measured  used\n" + "\n".join(
        f"{f:>7} {e:>9.4f} {m:>9.4f} {u:>5}" for f, (e, m, u) in
        enumerate(zip(expected, measured, table.column("images_used").to_numpy()[:j]))), "\n", check)
    assert check["passed"], check
    # Every planted feature scored on k_CDS images, none of them a decoy (nothing in the overlap).
    assert (table.column("images_used").to_numpy()[:j] == K_CDS).all()
    topk = root.stage(job.model.name, "cds-topk").read_table("topk")
    assert not any(i.split("/")[-1].startswith("decoy") for i in topk.column("image_id").to_pylist())
    assert result.nan_features == q - j  # the atoms that never fire

"""Ground truth for the whole scope pipeline: on the planted-scope model, extraction → SAE →
CDS through the real Ray stages must give the SAE features aligned with planted global-scope
directions high CDS and those aligned with planted local-scope directions low CDS."""

from __future__ import annotations

import numpy as np
import pytest

from scope_ray.config import load_config
from scope_ray.data.synthetic import write_synthetic
from scope_ray.models import build_model, planted_directions
from scope_ray.stages.cds import run_cds
from scope_ray.stages.extract import run_extract
from scope_ray.stages.partition import run_partition
from scope_ray.stages.train_sae import load_sae, run_train_sae
from scope_ray.storage import ResultsRoot

pytestmark = pytest.mark.slow

ALIGNED = 0.5  # |cos| between a decoder atom and a planted direction for the atom to count as "that direction"

PLANTED_SETTINGS = [
    "model.name=demo-planted", "extract.tokens_per_image=49", "sae.expansion=4", "sae.k=8",
    "sae.batch_size=256", "sae.epochs=20", "sae.lr=0.003", "sae.log_every=200", "sae.checkpoint_every=1000",
    "sae.shuffle_buffer=4096", "sae.threshold_ema=0.9", "scope.k_cds=8", "scope.spare_images=4",
    "scope.batch_size=32", "scope.gallery_features=2", "scope.gallery_images=2", "scope.instability_images=32",
]


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting one half (the Mann–Whitney statistic)."""
    pos, neg = np.asarray(scores_pos)[:, None], np.asarray(scores_neg)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_auroc_by_hand():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auroc(np.array([0.5]), np.array([0.5])) == 0.5


def aligned_features(decoder_QD: np.ndarray, local_LD: np.ndarray, global_GD: np.ndarray) -> dict[str, np.ndarray]:
    """Features whose decoder atom is aligned (|cos| ≥ ALIGNED) with a planted direction, by kind;
    an atom goes to the kind of its single best-matching direction."""
    atoms = decoder_QD / np.linalg.norm(decoder_QD, axis=1, keepdims=True)
    dirs = np.concatenate([local_LD, global_GD])
    cos = np.abs(atoms @ dirs.T)
    best, which = cos.max(axis=1), cos.argmax(axis=1)
    is_global = which >= len(local_LD)
    return {"local": np.flatnonzero((best >= ALIGNED) & ~is_global),
            "global": np.flatnonzero((best >= ALIGNED) & is_global)}


def test_planted_global_features_score_high_cds_through_the_real_stages(ray_local, tmp_path, capsys):
    data = write_synthetic(str(tmp_path / "data"), n_train=384, n_val=96, size=112, num_classes=10, seed=0,
                           formats=("parquet",))["imagenet"]["parquet"]
    job = load_config({"storage": {"root": str(tmp_path / "results")},
                       "data": {"imagenet": {"train": data["train"], "val": data["val"]}}}, PLANTED_SETTINGS)
    root = ResultsRoot(job.storage.root)
    quiet = lambda *_: None  # noqa: E731
    run_extract(job, root, progress=False, log=quiet)
    run_train_sae(job, root, log=quiet)
    result = run_cds(job, root, progress=False, log=quiet)
    cds = result.table.column("cds").to_numpy()

    dirs = planted_directions(build_model(job.model.name, weights="none", seed=job.seed))
    sae = load_sae(job, root)
    groups = aligned_features(sae.W_dec.detach().numpy(), dirs["local"].numpy(), dirs["global"].numpy())
    loc, glob = cds[groups["local"]], cds[groups["global"]]
    nan_loc, nan_glob = int(np.isnan(loc).sum()), int(np.isnan(glob).sum())
    loc, glob = loc[np.isfinite(loc)], glob[np.isfinite(glob)]
    score = auroc(glob, loc)
    with capsys.disabled():
        print(f"\n[planted] {glob.size} global-aligned features (CDS median {np.median(glob):.3f}, {nan_glob} NaN), "
              f"{loc.size} local-aligned (median {np.median(loc):.3f}, {nan_loc} NaN): AUROC {score:.3f}")
    assert glob.size >= 2 and loc.size >= 4, "the SAE did not learn the planted directions; see docs/models.md"
    assert score >= 0.9

    # The partition puts the planted global features in the high group and validates on tokens:
    # the high-CDS group's activation sits on the outlier tokens.
    part = run_partition(job, root, progress=False, log=quiet)
    gamma = part.row["gamma"]
    assert np.mean(glob > gamma) >= 0.75 and np.mean(loc <= gamma) >= 0.75
    groups_by_name = {g["group"]: g for g in part.groups}
    assert groups_by_name["high"]["outlier_share"] > groups_by_name["low"]["outlier_share"]

"""Does the pipeline recover the planted scopes? (demo-planted, docs/models.md)

The planted model's designated-layer tokens carry known local-scope and global-scope directions.
After extraction → SAE → CDS, every SAE feature whose decoder atom is aligned with one of them
has a known right answer: global-aligned features must score high CDS, local-aligned ones low.
``planted_recovery`` measures that as an AUROC (the probability that a global-aligned feature
outscores a local-aligned one). The demo prints it; tests/test_demo.py requires ≥ 0.9.
"""

from __future__ import annotations

import numpy as np

ALIGNED = 0.5  # |cos| between a decoder atom and a planted direction for the atom to count as "that direction"


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting one half (the Mann–Whitney statistic);
    NaN when either side is empty."""
    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    p, n = pos[:, None], neg[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (pos.size * neg.size))


def aligned_features(decoder_QD: np.ndarray, local_LD: np.ndarray, global_GD: np.ndarray,
                     threshold: float = ALIGNED) -> dict[str, np.ndarray]:
    """Indices of features whose decoder atom is aligned (|cos| ≥ threshold) with a planted
    direction, by kind; an atom goes to the kind of its single best-matching direction."""
    atoms = decoder_QD / np.maximum(np.linalg.norm(decoder_QD, axis=1, keepdims=True), 1e-12)
    dirs = np.concatenate([local_LD, global_GD])
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    cos = np.abs(atoms @ dirs.T)
    best, which = cos.max(axis=1), cos.argmax(axis=1)
    is_global = which >= len(local_LD)
    return {"local": np.flatnonzero((best >= threshold) & ~is_global),
            "global": np.flatnonzero((best >= threshold) & is_global)}


def planted_recovery(job, root, cds_Q: np.ndarray) -> dict:
    """For a job on the planted model: the aligned features, their CDS medians and the AUROC.
    Features with CDS NaN are counted and left out of the AUROC."""
    from scope_ray.models import build_model, planted_directions
    from scope_ray.stages.train_sae import load_sae

    if job.model.spec.builder != "planted":
        raise ValueError(f"{job.model.name} is not a planted model; there is no ground truth to check")
    dirs = planted_directions(build_model(job.model.name, weights=job.model.weights, seed=job.seed))
    decoder = load_sae(job, root).W_dec.detach().float().numpy()
    groups = aligned_features(decoder, dirs["local"].float().numpy(), dirs["global"].float().numpy())
    out = {}
    for kind, idx in groups.items():
        c = cds_Q[idx]
        out[kind] = {"features": int(idx.size), "nan": int(np.isnan(c).sum()),
                     "median_cds": float(np.median(c[np.isfinite(c)])) if np.isfinite(c).any() else float("nan"),
                     "cds": c[np.isfinite(c)]}
    out["auroc"] = auroc(out["global"]["cds"], out["local"]["cds"])
    return out

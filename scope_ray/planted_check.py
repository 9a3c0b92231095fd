"""Does the pipeline recover the planted scopes? (demo-planted, docs/models.md)

The planted model's designated-layer tokens carry known local-scope and global-scope directions.
After extraction → SAE → CDS, every SAE feature whose decoder atom is aligned with one of them
has a known right answer: global-aligned features must score high CDS, local-aligned ones low.
``planted_recovery`` measures that as an AUROC (the probability that a global-aligned feature
outscores a local-aligned one). The demo prints it; tests/test_demo.py requires ≥ 0.9.

``planted_removal_effect`` checks the downstream side: removing the local-aligned features must
cost segmentation and depth probes more than removing the global-aligned ones (tests/test_demo.py
asserts the direction and prints the sizes).
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


# ------------------------------------------------------------------ calibrated ground truth
# Thresholds of the calibrated check (models/planted_calibrated.py; tests/test_calibrated_ground_truth.py
# gives the reasons). MAE: a quarter of the smallest gap between two directions' expected CDS
# (0.036 at the default geometry), far above the rounding of an exact pipeline (~1e-8).
# Spearman: 10 directions; one adjacent swap gives 0.988, four 0.952.
GT_MAX_MAE = 0.01
GT_MIN_SPEARMAN = 0.95


def ground_truth_check(measured: np.ndarray, expected: np.ndarray, *, max_mae: float = GT_MAX_MAE,
                       min_spearman: float = GT_MIN_SPEARMAN) -> dict:
    """Measured CDS per planted direction against its expected value: mean absolute error,
    Spearman rank correlation and the number of directions with no CDS (NaN). ``passed`` only when
    every direction has a CDS, MAE <= max_mae and Spearman >= min_spearman (a constant or NaN
    measurement has no rank correlation: it fails)."""
    from scipy.stats import spearmanr

    m, e = np.asarray(measured, np.float64), np.asarray(expected, np.float64)
    if m.shape != e.shape or m.ndim != 1:
        raise ValueError(f"measured and expected must be matching 1-D arrays, got {m.shape} and {e.shape}")
    ok = np.isfinite(m)
    mae = float(np.abs(m[ok] - e[ok]).mean()) if ok.any() else float("nan")
    if ok.sum() >= 2 and np.ptp(m[ok]) > 0:
        rho = float(spearmanr(m[ok], e[ok]).statistic)
    else:
        rho = float("nan")
    passed = bool(ok.all() and mae <= max_mae and np.isfinite(rho) and rho >= min_spearman)
    return {"mae": mae, "spearman": rho, "nan": int((~ok).sum()), "passed": passed}


# ------------------------------------------------------------------------ removal direction
REMOVAL_VARIANTS = ("original", "local_removed", "global_removed")


def planted_probe_data(model, edits: dict, *, n: int, seed: int, num_classes: int = 10,
                       batch_size: int = 32) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Fresh synthetic scenes through ``model`` once per edit: per variant, the segmentation and
    depth arrays ``probes.train.fit_probe`` takes (masks in training encoding: background and
    anything unlabelled = 255, shape class c = c)."""
    import torch

    from scope_ray.data.synthetic import make_scene

    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, model.spec.image_size, num_classes) for _ in range(n)]
    images = np.stack([s.image for s in scenes])
    masks = np.stack([np.where(s.mask >= 1, s.mask.astype(np.int64) - 1, 255) for s in scenes]).astype(np.uint8)
    depths = np.stack([s.depth for s in scenes]).astype(np.float32)
    p = model.num_prefix_tokens
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for variant, edit in edits.items():
        chunks = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                pixels = model.preprocess(torch.from_numpy(images[start:start + batch_size]))
                chunks.append(model.final_tokens(pixels, edit=edit).float().numpy())
        tokens_BTD = np.concatenate(chunks)
        patch_BND = np.ascontiguousarray(tokens_BTD[:, p:])
        out[variant] = {"segmentation": {"tokens": patch_BND, "mask": masks},
                        "depth": {"cls": np.ascontiguousarray(tokens_BTD[:, 0]), "tokens": patch_BND, "depth": depths}}
    return out


def planted_removal_effect(job, root, *, n_train: int = 64, n_val: int = 32,
                           epochs: dict[str, int] | None = None, lrs: dict[str, tuple[float, ...]] | None = None,
                           num_classes: int = 10, depth_bins: int = 64, seed: int = 0) -> dict:
    """Probe segmentation and depth on the planted model's final tokens with the SAE features
    aligned to the planted LOCAL directions removed, with those aligned to the planted GLOBAL
    directions removed, and with nothing removed.

    Local directions carry each patch's own colour; global ones sit on 1-3 flat outlier tokens per
    image. So removing the local group should cost dense prediction more than removing the global
    group. Each (task, variant) takes the best of a small lr grid on val (the paper's protocol
    in miniature). Returns per task the metric per variant, the group sizes and the drops.
    """
    import torch

    from scope_ray.data.synthetic import FAR_M
    from scope_ray.models import build_model, planted_directions
    from scope_ray.probes.train import METRICS, ProbeSpec, fit_probe
    from scope_ray.removal import removal_edit
    from scope_ray.stages.train_sae import load_sae

    if job.model.spec.builder != "planted":
        raise ValueError(f"{job.model.name} is not a planted model; there is no ground truth to check")
    model = build_model(job.model.name, weights=job.model.weights, seed=job.seed, layer=job.model.resolved_layer)
    sae = load_sae(job, root)
    dirs = planted_directions(model)
    groups = aligned_features(sae.W_dec.detach().float().numpy(), dirs["local"].float().numpy(),
                              dirs["global"].float().numpy())
    edits = {"original": None, "local_removed": removal_edit(sae, groups["local"]),
             "global_removed": removal_edit(sae, groups["global"])}
    train = planted_probe_data(model, edits, n=n_train, seed=seed + 1, num_classes=num_classes)
    val = planted_probe_data(model, edits, n=n_val, seed=seed + 2, num_classes=num_classes)
    # Sized to take seconds, not minutes, on 2 CPU cores: the depth head softmaxes its bins at
    # every pixel, so it gets fewer epochs and 64 bins instead of the paper's 256 (the check is
    # about which removal hurts more, not about the metric's value).
    epochs = epochs or {"segmentation": 6, "depth": 3}
    lrs = lrs or {"segmentation": (0.1,), "depth": (0.1,)}
    out: dict = {"groups": {k: int(v.size) for k, v in groups.items()}}
    with torch.random.fork_rng(devices=[]):
        for task in ("segmentation", "depth"):
            sign = 1.0 if METRICS[task][1] == "max" else -1.0
            values = {}
            for variant in REMOVAL_VARIANTS:
                fits = [fit_probe(ProbeSpec(task=task, width=model.spec.width, image_size=model.spec.image_size,
                                            epochs=epochs[task], batch_size=16, lr=lr, weight_decay=1e-5, seed=seed,
                                            num_classes=num_classes if task == "segmentation" else None,
                                            depth_bins=depth_bins, max_depth=FAR_M),
                                  train[variant][task], val[variant][task]).value for lr in lrs[task]]
                finite = [v for v in fits if np.isfinite(v)]
                values[variant] = max(finite, key=lambda v: sign * v) if finite else float("nan")
            # A drop is how much worse the variant is than the original, in the metric's own units.
            drop = {v: sign * (values["original"] - values[v]) for v in ("local_removed", "global_removed")}
            out[task] = {"metric": METRICS[task][0], **values, "drop_local": drop["local_removed"],
                         "drop_global": drop["global_removed"]}
    return out

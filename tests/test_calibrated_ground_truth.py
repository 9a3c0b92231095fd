"""The calibrated ground truth and its mutation gate (pure: no Ray, no ViT; about a second).

``measure_cds`` is the CDS pipeline of the two stages composed from the production functions
(stages/cds.py's ``overlap_selection_scores`` and ``topk.FeatureTopK`` for pass 1; ``scc.scc_views``,
``scc.overlap_maps``, ``scope.scc_pair_scores`` and ``scope.cds_from_scores`` for pass 2), run on
the calibrated planted directions' codes (models/planted_calibrated.py: the codes an SAE whose
atoms are the planted directions would return). Each ``fault`` swaps one piece for a broken one.
The correct pipeline must reproduce every direction's hand-derived CDS; every fault must fail the
same check (``planted_check.ground_truth_check``).

Thresholds (planted_check.GT_MAX_MAE = 0.01, GT_MIN_SPEARMAN = 0.95). The correct pipeline is
exact here (the derivation holds on every good image and the EMD is exact), so its error is
float rounding (~1e-8); 0.01 is a quarter of the smallest gap between two directions' expected
CDS (0.036), so a fault that moves any value by a meaningful fraction of the scale fails. With 10
directions a Spearman of 0.95 allows at most four adjacent swaps (one swap: 0.988): a scorer that
orders the directions roughly right but on the wrong scale is caught by the MAE, one on the
right scale but in the wrong order by the rank correlation, and one that loses directions (CDS
NaN) by the NaN count. docs/scope.md §7 has the table this test prints.
"""

from __future__ import annotations

import numpy as np
import pytest

from scope_ray.data.images import resize_center_crop
from scope_ray.models.planted_calibrated import (
    DIRECTIONS, GRID, PATCH, SHIFT, calibrated_codes, calibrated_pool, calibrated_token_norms, expected_cds,
)
from scope_ray.planted_check import ground_truth_check
from scope_ray.scc import overlap_indices, overlap_maps, scc_views
from scope_ray.scope import _grid_diameter, cds_from_scores, scc_pair_scores
from scope_ray.stages.cds import overlap_selection_scores
from scope_ray.topk import NO_KEY, FeatureTopK, image_keys

K_CDS, SPARES = 4, 2
FAULTS = ("emd_zero", "permute_view2", "no_offset", "l2", "dgrid_2x", "magnitude", "centre_crop_selection",
          "token_norm")


def _l2_scores(m1, m2):
    """Plain L2 between the two normalised maps, over its maximum √2 (in [0, 1]); empty rules kept."""
    a, b = m1.reshape(len(m1), -1), m2.reshape(len(m2), -1)
    sa, sb = a.sum(1, keepdims=True), b.sum(1, keepdims=True)
    out = np.where((sa[:, 0] == 0) & (sb[:, 0] == 0), np.nan, 1.0)
    both = (sa[:, 0] > 0) & (sb[:, 0] > 0)
    out[both] = np.linalg.norm(a[both] / sa[both] - b[both] / sb[both], axis=1) / np.sqrt(2)
    return out


def measure_cds(pool: dict[str, np.ndarray], fault: str | None = None, *, grid: int = GRID, shift: int = SHIFT,
                patch: int = PATCH) -> np.ndarray:
    """[J] CDS per calibrated direction through pass 1 and pass 2, with ``fault`` injected."""
    ids = list(pool)
    j = len(DIRECTIONS)
    views = {i: scc_views(pool[i], patch, grid, shift) for i in ids}
    z1 = calibrated_codes(np.stack([views[i][0] for i in ids]), patch)
    z2 = calibrated_codes(np.stack([views[i][1] for i in ids]), patch)
    idx1, idx2 = overlap_indices(grid, shift)
    # ---- pass 1: top (k + spares) images per direction
    if fault == "centre_crop_selection":  # the old pass 1: all tokens of a centre-cropped, aspect-kept image
        sel_IJ = calibrated_codes(np.stack([resize_center_crop(pool[i], grid * patch) for i in ids]), patch).max(1)
    else:
        sel_IJ = overlap_selection_scores(z1, z2, idx1, idx2)
    topk = FeatureTopK(j, K_CDS + SPARES)
    topk.update(sel_IJ, image_keys(ids))
    row_of = {k: r for r, k in enumerate(image_keys(ids).tolist())}
    # ---- pass 2: overlap maps of the selected images' SCC pairs, scored in rank order
    if fault == "no_offset":  # view-1 cell (i, j) taken for overlap cell (i, j): the +s dropped
        side = grid - shift
        i_o, j_o = np.divmod(np.arange(side * side), side)
        idx1 = i_o * grid + j_o
    out = np.full(j, np.nan)
    perm = np.random.default_rng(0).permutation((grid - shift) ** 2)
    for f in range(j):
        rows = [row_of[k] for k in topk.keys[f] if k != NO_KEY]
        if not rows:
            continue
        a1, a2 = z1[rows][:, :, f], z2[rows][:, :, f]
        if fault == "no_offset":
            side = grid - shift
            m1, m2 = a1[:, idx1].reshape(-1, side, side), a2[:, idx2].reshape(-1, side, side)
        else:
            m1, m2 = overlap_maps(a1, a2, grid, shift)
        if fault == "permute_view2":
            m2 = m2.reshape(len(m2), -1)[:, perm].reshape(m2.shape)
        if fault == "magnitude":  # mean max activation over the overlap: no geometry at all
            out[f] = float(np.maximum(m1.max(axis=(1, 2)), m2.max(axis=(1, 2)))[:K_CDS].mean())
            continue
        if fault == "token_norm":  # mean norm of the tokens the direction fires on
            n1, n2 = calibrated_token_norms(z1[rows]), calibrated_token_norms(z2[rows])
            on1, on2 = a1 > 0, a2 > 0
            out[f] = float((n1[on1].sum() + n2[on2].sum()) / max(1, on1.sum() + on2.sum()))
            continue
        if fault == "l2":
            scores = _l2_scores(m1, m2)
        else:
            scores = scc_pair_scores(m1, m2)
            if fault == "emd_zero":  # only the empty-map rule left
                scores = np.where(np.isfinite(scores) & (scores < 1), 0.0, scores)
            if fault == "dgrid_2x":
                scores = np.where(scores < 1, scores / 2, scores)
        out[f] = cds_from_scores(scores, K_CDS)[0]
    if fault in ("magnitude", "token_norm"):  # put activation / norm on the CDS scale [0, 1]
        out = out / np.nanmax(out)
    return out


@pytest.fixture(scope="module")
def pool():
    return calibrated_pool(seed=0, good=K_CDS + SPARES + 2, decoys=K_CDS + SPARES)


@pytest.fixture(scope="module")
def gate(pool):
    expected = expected_cds()
    return {fault: ground_truth_check(measure_cds(pool, fault), expected) for fault in (None, *FAULTS)}


def test_expected_values_by_hand():
    # p = 16, s = 4: CDS = λ·g·4/11 (module docstring); D_grid = √2·11 is the overlap's diagonal.
    e = expected_cds()
    assert _grid_diameter(GRID - SHIFT, GRID - SHIFT) == pytest.approx(np.sqrt(2) * 11)
    np.testing.assert_allclose(e, np.array([0, 0.1, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2, 1.6, 2.0]) * 4 / 11)
    assert e[0] == 0 and e[-1] == pytest.approx(8 / 11) and np.all(np.diff(e) > 0.036)
    with pytest.raises(ValueError, match="shift"):
        expected_cds(GRID, 5)


def test_one_pair_by_hand():
    """One image, one direction of each anchor kind: where the mass sits in each overlap map."""
    img = calibrated_pool(seed=1, good=1, decoys=0)["good/000"]
    v1, v2 = scc_views(img, PATCH, GRID, SHIFT)
    assert np.array_equal(v1, img[:GRID * PATCH, :GRID * PATCH])  # the SCC resize is the identity here
    z1, z2 = calibrated_codes(np.stack([v1, v2]))
    for j in (4, 8):  # fixed anchor at (11, 4), λ 0.6; mirror, λ 0.8
        d = DIRECTIONS[j]
        m1, m2 = overlap_maps(z1[:, j], z2[:, j], GRID, SHIFT)
        content = np.argwhere((m1 > 0) & (m2 > 0) & np.isclose(m1, m2))
        assert len(content) == 1  # the marker's own cell, identical in both views
        (u, v), = content
        assert m1[u, v] == pytest.approx((1 - d.lam) * d.amplitude)
        if d.anchor == "fixed":
            x, y = (d.cell[0] - SHIFT, d.cell[1] - SHIFT), d.cell
        else:  # marker at canvas cell (u + s, v + s): mirror anchors at p−1−c−s (view 1), p−1−c+s (view 2)
            x = (GRID - 1 - (u + SHIFT) - SHIFT, GRID - 1 - (v + SHIFT) - SHIFT)
            y = (GRID - 1 - u, GRID - 1 - v)
        assert m1[x] == pytest.approx(d.lam * d.amplitude) and m2[y] == pytest.approx(d.lam * d.amplitude)
        assert np.count_nonzero(m1) == np.count_nonzero(m2) == 2
        emd = scc_pair_scores(m1[None], m2[None])[0] * np.sqrt(2) * (GRID - SHIFT - 1)
        assert emd == pytest.approx(d.lam * d.gain * SHIFT * np.sqrt(2), rel=1e-9)


def test_norm_does_not_separate_scope(pool):
    """Local directions on high-norm tokens, global ones on ordinary tokens."""
    e = expected_cds()
    high = np.array([d.norm == "high" for d in DIRECTIONS])
    assert high[np.argsort(e)[:2]].all() and not high[np.argsort(e)[-2:]].any()


def test_correct_pipeline_recovers_the_calibrated_cds(pool, gate):
    measured = measure_cds(pool)
    np.testing.assert_allclose(measured, expected_cds(), atol=1e-9)
    assert gate[None]["passed"] and gate[None]["mae"] < 1e-9 and gate[None]["spearman"] == pytest.approx(1.0)


def test_mutation_gate_every_fault_fails_the_check(gate):
    lines = [f"{'fault':<24}{'MAE':>8}{'Spearman':>10}{'NaN':>5}  caught"]
    for fault, r in gate.items():
        lines.append(f"{fault or 'none (correct)':<24}{r['mae']:>8.4f}{r['spearman']:>10.3f}{r['nan']:>5}  "
                     f"{'-' if fault is None else ('yes' if not r['passed'] else 'NO')}")
    print("\n" + "\n".join(lines))
    missed = [f for f in FAULTS if gate[f]["passed"]]
    assert not missed, f"faults not caught by the calibrated check: {missed}"

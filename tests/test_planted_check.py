"""The ground-truth check for the planted model: AUROC and atom alignment by hand. (The check
itself runs through the real stages in tests/test_demo.py, whose default model is demo-planted.)"""

import numpy as np
import pytest

from scope_ray.planted_check import aligned_features, auroc, ground_truth_check


def test_auroc_by_hand():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auroc(np.array([0.5]), np.array([0.5])) == 0.5
    assert auroc(np.array([0.3, 0.7]), np.array([0.5])) == 0.5
    assert np.isnan(auroc(np.array([]), np.array([0.5])))


def test_aligned_features_assigns_each_atom_to_its_best_direction():
    local = np.eye(4)[:2]  # e0, e1
    glob = np.eye(4)[2:3]  # e2
    atoms = np.array([[1, 0.1, 0, 0],     # local e0
                      [0, 0, -3, 0],      # global (sign does not matter)
                      [0, 0, 0, 1],       # aligned with nothing planted
                      [0.6, 0, 0.8, 0]])  # global: 0.8 > 0.6
    g = aligned_features(atoms, local, glob)
    assert g["local"].tolist() == [0] and g["global"].tolist() == [1, 3]
    assert aligned_features(atoms, local, glob, threshold=0.9)["global"].tolist() == [1]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_every_feature_in_at_most_one_group(threshold):
    rng = np.random.default_rng(0)
    g = aligned_features(rng.normal(size=(50, 8)), rng.normal(size=(3, 8)), rng.normal(size=(2, 8)), threshold)
    assert not set(g["local"]) & set(g["global"])


def test_ground_truth_check_by_hand():
    e = np.array([0.0, 0.1, 0.2, 0.3])
    ok = ground_truth_check(e + 0.005, e)
    assert ok["passed"] and ok["mae"] == pytest.approx(0.005) and ok["spearman"] == pytest.approx(1.0)
    assert not ground_truth_check(e / 2, e)["passed"]  # right order, wrong scale: MAE 0.075
    assert not ground_truth_check(e[::-1].copy(), e)["passed"]  # right scale, wrong order
    nan = ground_truth_check(np.array([0.0, 0.1, np.nan, 0.3]), e)
    assert not nan["passed"] and nan["nan"] == 1 and nan["mae"] == 0.0  # a direction without a CDS fails
    const = ground_truth_check(np.zeros(4), e)
    assert not const["passed"] and np.isnan(const["spearman"])  # a constant has no rank correlation
    with pytest.raises(ValueError):
        ground_truth_check(np.zeros(3), e)

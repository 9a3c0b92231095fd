"""The ground-truth check for the planted model: AUROC and atom alignment by hand. (The check
itself runs through the real stages in tests/test_demo.py, whose default model is demo-planted.)"""

import numpy as np
import pytest

from scope_ray.planted_check import aligned_features, auroc


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

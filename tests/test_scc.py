"""SCC geometry (METHOD §3): the overlap indices pair up byte-identical patches of a real photo."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from scope_ray.scc import canvas_coordinates, overlap_indices, overlap_maps, scc_views


def _patches_NPP3(view_HW3: np.ndarray, patch: int) -> np.ndarray:
    """Cut a view into its patch tokens, row-major: [N, patch, patch, 3]."""
    g = view_HW3.shape[0] // patch
    return view_HW3.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, patch, patch, 3)


@pytest.fixture(scope="module")
def photo():
    return astronaut()  # 512 x 512 RGB uint8: a real photograph, textured almost everywhere


@pytest.mark.parametrize("patch,grid,shift", [(16, 14, 1), (14, 16, 3), (8, 7, 6), (32, 4, 2), (5, 2, 1)])
def test_overlap_indices_pair_identical_pixels(photo, patch, grid, shift):
    v1, v2 = scc_views(photo, patch, grid, shift)
    assert v1.shape == v2.shape == (grid * patch, grid * patch, 3)
    assert v1.dtype == v2.dtype == np.uint8
    p1, p2 = _patches_NPP3(v1, patch), _patches_NPP3(v2, patch)
    idx1, idx2 = overlap_indices(grid, shift)
    assert len(idx1) == len(idx2) == (grid - shift) ** 2
    assert np.array_equal(p1[idx1], p2[idx2])  # byte-identical, every overlap patch
    # The same token position in the two views shows different pixels (the content moved).
    differs = [not np.array_equal(p1[k], p2[k]) for k in range(grid * grid)]
    assert np.mean(differs) > 0.9
    # Patches outside view 1's overlap are not found anywhere in view 2.
    outside = np.setdiff1d(np.arange(grid * grid), idx1)
    flat2 = {p.tobytes() for p in p2}
    assert np.mean([p1[k].tobytes() not in flat2 for k in outside]) > 0.9


def test_overlap_indices_formula():
    idx1, idx2 = overlap_indices(4, 1)
    # cell (0,0) of the overlap: view 1 patch (1,1) = 5, view 2 patch (0,0) = 0; row-major after
    assert idx1.tolist() == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert idx2.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_views_are_crops_of_the_resized_image(photo):
    from scope_ray.data.images import resize_square

    big = resize_square(photo, (7 + 2) * 8)
    v1, v2 = scc_views(photo, 8, 7, 2)
    assert np.array_equal(v1, big[:56, :56]) and np.array_equal(v2, big[16:72, 16:72])


def test_overlap_maps_and_canvas():
    grid, shift = 5, 2
    acts1_N = np.arange(25.0)
    acts2_N = 100 + np.arange(25.0)
    m1, m2 = overlap_maps(acts1_N, acts2_N, grid, shift)
    assert m1.shape == m2.shape == (3, 3)
    assert m1[0, 0] == 2 * 5 + 2 and m2[0, 0] == 100 and m1[2, 2] == 24 and m2[2, 2] == 100 + 12
    # batched over leading axes
    mb1, _ = overlap_maps(np.stack([acts1_N, 2 * acts1_N]), np.stack([acts2_N, acts2_N]), grid, shift)
    assert mb1.shape == (2, 3, 3) and np.array_equal(mb1[1], 2 * m1)
    c1, c2 = canvas_coordinates(grid, shift)
    idx1, idx2 = overlap_indices(grid, shift)
    assert c1.shape == c2.shape == (25, 2)
    assert np.array_equal(c1[idx1], c2[idx2])  # overlap patches land on the same canvas cell
    assert c1[0].tolist() == [0.5, 0.5] and c2[0].tolist() == [2.5, 2.5]
    assert c2.max() == grid + shift - 0.5


@pytest.mark.parametrize("grid,shift", [(1, 1), (4, 0), (4, 4), (4, -1), (3.5, 1)])
def test_bad_geometry(grid, shift):
    with pytest.raises(ValueError):
        overlap_indices(grid, shift)


def test_bad_images():
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="patch"):
        scc_views(img, 0, 4, 1)
    with pytest.raises(ValueError, match="RGB"):
        scc_views(np.zeros((20, 20), np.uint8), 4, 4, 1)
    with pytest.raises(ValueError, match="uint8"):
        scc_views(img.astype(np.float32), 4, 4, 1)
    with pytest.raises(ValueError, match="shift"):
        scc_views(img, 4, 4, 4)
    with pytest.raises(ValueError, match="N = grid"):
        overlap_maps(np.zeros(15), np.zeros(16), 4, 1)

"""Shifted Context Crop (METHOD §3, §4): two views of one image that share patches pixel for pixel.

Pure NumPy + PIL (no Ray). Geometry, in patch units (``p`` = grid, ``s`` = shift, ``n`` = patch):

- the image is resized (bicubic, aspect not kept) to ``(p+s)·n`` square;
- view 1 is the ``p·n`` crop at pixel (0, 0), view 2 the crop at (s·n, s·n);
- patch (i+s, j+s) of view 1 and patch (i, j) of view 2 are the same pixels, for
  i, j in 0 … p−s−1: the ``(p−s)²`` overlap.

Token order everywhere is the ViT's: row-major over the patch grid, flat index ``row·p + col``.
docs/scope.md draws the picture.
"""

from __future__ import annotations

import operator

import numpy as np

from scope_ray.data.images import resize_square


def _check_geometry(grid: int, shift: int) -> tuple[int, int]:
    try:
        grid, shift = operator.index(grid), operator.index(shift)
    except TypeError:
        raise ValueError(f"grid and shift must be integers, got grid={grid!r}, shift={shift!r}") from None
    if grid < 2:
        raise ValueError(f"grid must be >= 2 patches per side (an overlap needs one), got {grid}")
    if not 1 <= shift <= grid - 1:
        raise ValueError(f"shift must be in 1..grid-1 = 1..{grid - 1} patches, got {shift}")
    return grid, shift


def scc_views(image: np.ndarray, patch: int, grid: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """img_HW3 uint8 → (view1, view2), each ``(grid·patch, grid·patch, 3)`` uint8 (METHOD §3)."""
    grid, shift = _check_geometry(grid, shift)
    try:
        patch = operator.index(patch)
    except TypeError:
        raise ValueError(f"patch must be an integer pixel size, got {patch!r}") from None
    if patch < 1:
        raise ValueError(f"patch must be >= 1 pixel, got {patch}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {list(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    big_SS3 = resize_square(image, (grid + shift) * patch)
    side, off = grid * patch, shift * patch
    view1 = np.ascontiguousarray(big_SS3[:side, :side])
    view2 = np.ascontiguousarray(big_SS3[off:off + side, off:off + side])
    return view1, view2


def overlap_indices(grid: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx1_O, idx2_O) int64, O = (grid−shift)²: flat row-major patch indices of the overlap in
    view 1 and view 2, in the same order (row-major over the overlap cell (i, j)):
    ``idx1[k] = (i+s)·grid + (j+s)`` and ``idx2[k] = i·grid + j``."""
    grid, shift = _check_geometry(grid, shift)
    i_O, j_O = np.divmod(np.arange((grid - shift) ** 2, dtype=np.int64), grid - shift)
    return (i_O + shift) * grid + (j_O + shift), i_O * grid + j_O


def overlap_maps(acts1_N: np.ndarray, acts2_N: np.ndarray, grid: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations over each view's patch tokens ``[..., N]`` (N = grid², row-major) → the two
    overlap maps ``[..., grid−shift, grid−shift]``; cell (i, j) of both maps is the same pixels."""
    grid, shift = _check_geometry(grid, shift)
    acts1_N, acts2_N = np.asarray(acts1_N), np.asarray(acts2_N)
    n = grid * grid
    for name, a in (("acts1_N", acts1_N), ("acts2_N", acts2_N)):
        if a.ndim < 1 or a.shape[-1] != n:
            raise ValueError(f"{name} must end in the N = grid² = {n} patch tokens, got shape {list(a.shape)}")
    idx1, idx2 = overlap_indices(grid, shift)
    side = grid - shift
    return (
        acts1_N[..., idx1].reshape(*acts1_N.shape[:-1], side, side),
        acts2_N[..., idx2].reshape(*acts2_N.shape[:-1], side, side),
    )


def canvas_coordinates(grid: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(coords1_N2, coords2_N2) float64: the (row, col) centre of every patch token of view 1
    (placed at offset 0) and view 2 (offset shift) on the common (grid+shift)² canvas, in patch
    units, token order row-major (METHOD §4). Overlap patches get identical coordinates."""
    grid, shift = _check_geometry(grid, shift)
    r_N, c_N = np.divmod(np.arange(grid * grid), grid)
    coords1_N2 = np.stack([r_N, c_N], axis=1).astype(np.float64) + 0.5
    return coords1_N2, coords1_N2 + float(shift)

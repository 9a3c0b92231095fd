"""Outlier instability, the pure part (METHOD §4; Table 7 at s = 1, Table 9 over s = 1…6): which
overlap tokens are scored, the exact attention EMD of one token between the two SCC views under
each alignment, the one-per-class image selection, and the per-shift summary. No Ray, no I/O:
``scope_ray.stages.instability`` streams images through these (docs/instability.md).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow as pa

SELECTION_RULE = ("first image of each label in source order, up to scope.instability_images; unlabelled "
                  "images (label < 0) fill the remainder, in source order, only when the split has fewer labelled classes")


def overlap_sample(image_id: str, shift: int, n_overlap: int, cap: int | None, seed: int) -> np.ndarray:
    """Positions (sorted, in 0 … n_overlap−1) of the overlap tokens whose EMD is computed: all of
    them, or ``cap`` drawn by a generator seeded with (seed, crc32(image id), shift), so a re-run,
    another batching or a retry picks the same tokens."""
    if cap is None or cap >= n_overlap:
        return np.arange(n_overlap)
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode()), shift])
    return np.sort(rng.choice(n_overlap, size=cap, replace=False))


def tokens_per_image(grid: int, shift: int, cap: int | None) -> int:
    """Token rows one used image contributes at ``shift``."""
    n = (grid - shift) ** 2
    return n if cap is None else min(cap, n)


def _usable(w_N: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(w_N)) and w_N.sum() > 0)


def head_attention_emds(attn1_HN: np.ndarray, attn2_HN: np.ndarray, coords1_N2: np.ndarray,
                        coords2_N2: np.ndarray) -> np.ndarray:
    """emd_H: per head, the exact EMD (``emd.points_emd``; Euclidean, patch units) between one
    token's attention row in view 1 (weights on ``coords1``) and in view 2 (on ``coords2``).
    NaN for a head whose row in either view is not a distribution (NaN, or no mass on the patches,
    which happens only if all attention underflowed onto prefix tokens)."""
    from scope_ray.emd import points_emd

    attn1_HN, attn2_HN = np.asarray(attn1_HN), np.asarray(attn2_HN)
    if attn1_HN.shape != attn2_HN.shape or attn1_HN.ndim != 2:
        raise ValueError(f"attention rows must both be [H, N], got {list(attn1_HN.shape)} and {list(attn2_HN.shape)}")
    out_H = np.full(attn1_HN.shape[0], np.nan)
    for h in range(attn1_HN.shape[0]):
        if _usable(attn1_HN[h]) and _usable(attn2_HN[h]):
            out_H[h] = points_emd(attn1_HN[h], coords1_N2, attn2_HN[h], coords2_N2)
    return out_H


def token_attention_emd(attn1_HN: np.ndarray, attn2_HN: np.ndarray, coords1_N2: np.ndarray,
                        coords2_N2: np.ndarray) -> float:
    """METHOD §4 for one overlap token: the head-mean of ``head_attention_emds``; NaN when any head
    is undefined (such a token is counted, never averaged: summary column ``n_undefined``)."""
    return float(np.mean(head_attention_emds(attn1_HN, attn2_HN, coords1_N2, coords2_N2)))


# Where the two views' attention rows are placed before the EMD (scope.instability_alignment;
# docs/instability.md "Alignment" has the analytic values on known geometries).
ALIGNMENTS = ("canvas", "view", "overlap")


def alignment_supports(grid: int, shift: int, alignment: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keep1_M, coords1_M2, keep2_M, coords2_M2): which patch tokens of view 1 / view 2 a row keeps
    (flat row-major indices) and the (row, col) points, in patch units, its kept weights sit on.

    - ``canvas``: every patch; view 1 at offset 0, view 2 at offset ``shift`` on the common
      ``(p+s)²`` canvas (``scc.canvas_coordinates``): the same pixels land on the same point.
    - ``view``: every patch, each view in its own ``p × p`` frame (no offset): the same position
      within the view lands on the same point.
    - ``overlap``: only the ``(p−s)²`` overlap patches (``scc.overlap_indices``), both on their
      common canvas points; the EMD normalises each cut row to sum 1 (``emd.points_emd``)."""
    from scope_ray.scc import canvas_coordinates, overlap_indices

    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    coords1_N2, coords2_N2 = canvas_coordinates(grid, shift)
    all_N = np.arange(grid * grid)
    if alignment == "canvas":
        return all_N, coords1_N2, all_N, coords2_N2
    if alignment == "view":
        return all_N, coords1_N2, all_N, coords1_N2.copy()
    idx1, idx2 = overlap_indices(grid, shift)
    return idx1, coords1_N2[idx1], idx2, coords2_N2[idx2]


def aligned_head_emds(attn1_HN: np.ndarray, attn2_HN: np.ndarray, grid: int, shift: int, alignment: str,
                      supports: tuple | None = None) -> np.ndarray:
    """emd_H for one overlap token under ``alignment`` (``alignment_supports``; pass ``supports``
    to reuse them across tokens). A head is undefined (NaN) when either full row is not a
    distribution (``_usable``: as ``head_attention_emds``) or, for ``overlap``, when either row has no
    mass on the overlap patches: it is never given a value, and the token then counts in
    ``n_undefined``."""
    attn1_HN, attn2_HN = np.asarray(attn1_HN), np.asarray(attn2_HN)
    keep1, c1, keep2, c2 = supports if supports is not None else alignment_supports(grid, shift, alignment)
    if attn1_HN.shape != attn2_HN.shape or attn1_HN.ndim != 2 or attn1_HN.shape[1] != grid * grid:
        raise ValueError(f"attention rows must both be [H, {grid * grid}], got {list(attn1_HN.shape)} and "
                         f"{list(attn2_HN.shape)}")
    out_H = head_attention_emds(attn1_HN[:, keep1], attn2_HN[:, keep2], c1, c2)
    whole_H = np.array([_usable(a) and _usable(b) for a, b in zip(attn1_HN, attn2_HN)], dtype=bool)
    out_H[~whole_H] = np.nan  # a NaN outside the overlap still makes the row unusable
    return out_H


def aligned_token_emd(attn1_HN: np.ndarray, attn2_HN: np.ndarray, grid: int, shift: int, alignment: str,
                      supports: tuple | None = None) -> float:
    """The token value under ``alignment``: the head-mean of ``aligned_head_emds`` (NaN if any head is)."""
    return float(np.mean(aligned_head_emds(attn1_HN, attn2_HN, grid, shift, alignment, supports)))


class ClassPicker:
    """Streaming one-per-class selection (docs/instability.md): feed (id, label) in source order."""

    def __init__(self, n: int):
        self.n = n
        self.labelled: list[tuple[str, int, int]] = []  # (id, label, source position)
        self.unlabelled: list[tuple[str, int, int]] = []
        self._seen: set[int] = set()
        self.scanned = 0

    @property
    def done(self) -> bool:
        """n labelled classes found: nothing later in the source can change the selection."""
        return len(self.labelled) >= self.n

    def add(self, ids: list[str], labels: list[int]) -> bool:
        for image_id, label in zip(ids, labels):
            if self.done:
                break
            pos, self.scanned = self.scanned, self.scanned + 1
            if label is None or label < 0:
                if len(self.unlabelled) < self.n:
                    self.unlabelled.append((image_id, -1, pos))
            elif label not in self._seen:
                self._seen.add(label)
                self.labelled.append((image_id, int(label), pos))
        return self.done

    def selection(self) -> list[tuple[str, int, int]]:
        """Chosen (id, label, position): every first-of-class image, then unlabelled ones if short."""
        return self.labelled + self.unlabelled[: self.n - len(self.labelled)]


def summarize(tokens: pa.Table, shifts: tuple[int, ...], images: int, tau: float) -> list[dict[str, Any]]:
    """Table 9 rows (Table 7 is the s = 1 row) from the token table: per shift the mean EMD over
    non-outlier and outlier tokens (NaN tokens excluded from the means, counted in n_undefined)."""
    shift_T = tokens.column("shift").to_numpy()
    out_T = tokens.column("outlier").to_numpy().astype(bool)
    emd_T = tokens.column("emd").to_numpy()
    rows = []
    for s in shifts:
        at = shift_T == s
        non, out = at & ~out_T, at & out_T
        defined = np.isfinite(emd_T)
        rows.append({
            "shift": int(s),
            "d_non": float(emd_T[non & defined].mean()) if (non & defined).any() else float("nan"),
            "d_out": float(emd_T[out & defined].mean()) if (out & defined).any() else float("nan"),
            "n_non": int(non.sum()), "n_out": int(out.sum()), "n_undefined": int((at & ~defined).sum()),
            "images": int(images), "tau": float(tau),
        })
    return rows

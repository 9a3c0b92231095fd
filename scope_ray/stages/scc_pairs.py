"""Shifted Context Crop pairs as a Ray Data batch transform: image bytes in, one row per (image, shift) out.

Runs as stateless CPU tasks ahead of the model actors (like ``decode.py``), so decoding, the
bicubic resize and the two crops never hold a GPU. Each image is decoded once and cut for every
requested shift (METHOD §3, ``scc.scc_views``). A rejected image travels on as one row per shift
with ``ok=False``, zero views and the reason, so the actor downstream sees every image and can
record the rejection (once: by convention on the row of the first shift).

Used by the instability stage (METHOD §4) and by the CDS stage's second pass (METHOD §5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scope_ray.data.images import DEFAULT_MAX_ASPECT_RATIO, RejectedImage, decode_image
from scope_ray.scc import scc_views

if TYPE_CHECKING:
    import ray.data

    from scope_ray.config import JobConfig
    from scope_ray.models.registry import ModelSpec


def scc_pairs_batch(batch: dict[str, np.ndarray], *, patch: int, grid: int, shifts: tuple[int, ...],
                    max_pixels: int, min_side: int,
                    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> dict[str, np.ndarray]:
    """B images → R = B·len(shifts) rows, image-major (image 0 at every shift, then image 1, …).

    Input: ``image_id``, ``image`` (encoded bytes) and any other columns (repeated per output row).
    Output: ``image_id``, ``shift`` int64 [R], ``view1`` / ``view2`` uint8 [R, grid·patch, grid·patch, 3],
    ``ok`` bool [R], ``reason`` str [R] (empty when ok), plus the pass-through columns.
    """
    shifts = tuple(int(s) for s in shifts)
    if not shifts:
        raise ValueError("shifts must name at least one shift")
    images = batch["image"]
    n, k = len(images), len(shifts)
    side = grid * patch
    view1_RSS3 = np.zeros((n * k, side, side, 3), dtype=np.uint8)
    view2_RSS3 = np.zeros((n * k, side, side, 3), dtype=np.uint8)
    ok_R = np.zeros(n * k, dtype=bool)
    reason_R = np.full(n * k, "", dtype=object)
    for i, data in enumerate(images):
        rows = slice(i * k, (i + 1) * k)
        try:
            img_HW3 = decode_image(None if data is None else bytes(data), max_pixels=max_pixels, min_side=min_side,
                                   max_aspect_ratio=max_aspect_ratio)
        except RejectedImage as exc:
            reason_R[rows] = exc.reason
            continue
        for j, s in enumerate(shifts):
            view1_RSS3[i * k + j], view2_RSS3[i * k + j] = scc_views(img_HW3, patch, grid, s)
        ok_R[rows] = True
    out = {key: np.repeat(np.asarray(col), k, axis=0) for key, col in batch.items() if key != "image"}
    out.update(shift=np.tile(np.asarray(shifts, dtype=np.int64), n), view1=view1_RSS3, view2=view2_RSS3,
               ok=ok_R, reason=reason_R)
    return out


def with_scc_pairs(ds: "ray.data.Dataset", spec: "ModelSpec", shifts: tuple[int, ...], job: "JobConfig") -> "ray.data.Dataset":
    """``ds`` (a ``read_source`` dataset, or any with ``image_id`` and ``image``) → its SCC pairs at
    ``shifts`` for ``spec``'s patch size and native grid. ``job.scope.batch_size`` images per task,
    so a task emits ``batch_size · len(shifts)`` rows."""
    return ds.map_batches(
        scc_pairs_batch,
        fn_kwargs=dict(patch=spec.patch, grid=spec.grid, shifts=tuple(int(s) for s in shifts),
                       max_pixels=job.data.max_pixels, min_side=job.data.min_side,
                       max_aspect_ratio=job.data.max_aspect_ratio),
        batch_size=job.scope.batch_size, num_cpus=job.ray.decode_cpus, batch_format="numpy",
    )

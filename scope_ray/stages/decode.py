"""Image decoding as a Ray Data batch function: bytes in, fixed-size pixels or a reject reason out.

Runs as stateless CPU tasks ahead of the model actors so JPEG decoding never starves a GPU.
Rejected images travel on with ``ok=False`` and zero pixels, so the actor that writes the
outputs also records the rejection: one place sees every image exactly once.

One decoder for every stage: extraction and the SCC stages decode images only; probe-features
passes its ``task`` and gets the task's target put through the image's own resize + centre crop
(``data.images.crop_geometry``, the one copy of that geometry).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from scope_ray.data.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    IGNORE_INDEX,
    PLAIN,
    EvalTransform,
    RejectedImage,
    decode_depth,
    decode_image,
    decode_mask,
    resize_center_crop,
    resize_center_crop_plane,
)

# The probe tasks (scope_ray.probes.tasks.Task), spelled here so that decoding needs no torch.
TargetTask = Literal["classification", "segmentation", "depth"]
_TARGET_COLUMN = {"segmentation": "mask", "depth": "depth"}  # classification's label passes through


def _bytes(data) -> bytes | None:
    return None if data is None else bytes(data)


def _same_size(img_HW3: np.ndarray, plane_HW: np.ndarray, what: str) -> None:
    if img_HW3.shape[:2] != plane_HW.shape:
        (h, w), (ph, pw) = img_HW3.shape[:2], plane_HW.shape
        raise RejectedImage(f"{what} size mismatch: image {h}x{w}, {what} {ph}x{pw}")


def _empty_target(task: TargetTask | None, n: int, size: int) -> np.ndarray | None:
    """The target column before decoding: all-ignore (segmentation) / all-NaN (depth)."""
    if task is None or task == "classification":
        return None
    if task == "segmentation":
        return np.full((n, size, size), IGNORE_INDEX, dtype=np.uint8)
    if task == "depth":
        return np.full((n, size, size), np.nan, dtype=np.float32)
    raise ValueError(f"unknown task {task!r}; allowed: classification, segmentation, depth")


def _decode_target(batch: dict[str, np.ndarray], i: int, img_HW3: np.ndarray, task: TargetTask, size: int,
                   max_pixels: int, transform: EvalTransform = PLAIN) -> np.ndarray | None:
    """Row ``i``'s target at the input geometry, or a ``RejectedImage`` saying why there is none."""
    if task == "classification":
        if int(batch["label"][i]) < 0:
            raise RejectedImage("missing label")
        return None
    column = _TARGET_COLUMN[task]
    decode = decode_mask if task == "segmentation" else decode_depth
    plane = decode(_bytes(batch[column][i]), max_pixels=max_pixels)
    _same_size(img_HW3, plane, column)
    return resize_center_crop_plane(plane, size, transform)


def decode_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int, min_side: int,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
                 task: TargetTask | None = None, transform: EvalTransform = PLAIN) -> dict[str, np.ndarray]:
    """``image`` bytes → ``pixels`` [B, size, size, 3] uint8, ``ok`` [B] and ``reason`` [B],
    resized and cropped by the model's ``transform`` (``ModelSpec.transform``).

    With a ``task``, also its target at the input geometry: classification's ``label`` (int64,
    passed through; < 0 is rejected as "missing label"), segmentation's ``mask`` [B, S, S] uint8
    (255 = ignore), depth's ``depth`` [B, S, S] float32 (metres, NaN = invalid). A rejected row
    keeps zero pixels and an all-ignore / all-NaN target: a half-decoded target never travels
    with a reject.

    One image's failure never fails the batch: ``RejectedImage`` is its reason, and a
    ``MemoryError`` the decoders did not already turn into one still is (the image is gone, the
    task and the other images are not)."""
    images = batch["image"]
    n = len(images)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    reason = np.full(n, "", dtype=object)
    target = _empty_target(task, n, size)
    empty = None if target is None else target[0].copy() if n else None
    for i, data in enumerate(images):
        img = None
        try:
            img = decode_image(_bytes(data), max_pixels=max_pixels, min_side=min_side,
                               max_aspect_ratio=max_aspect_ratio)
            if task is not None:
                plane = _decode_target(batch, i, img, task, size, max_pixels, transform)
                if target is not None:
                    target[i] = plane
            pixels[i] = resize_center_crop(img, size, max_pixels=max_pixels, transform=transform)
            ok[i] = True
        except (RejectedImage, MemoryError) as exc:
            reason[i] = exc.reason if isinstance(exc, RejectedImage) else "out of memory decoding or resizing"
            if target is not None:
                target[i] = empty
        finally:
            img = None  # an image that took most of the memory must not outlive its row
    out = {k: v for k, v in batch.items() if k not in ("image", *_TARGET_COLUMN.values())}
    out.update(pixels=pixels, ok=ok, reason=reason)
    if task in _TARGET_COLUMN:
        out[_TARGET_COLUMN[task]] = target
    return out

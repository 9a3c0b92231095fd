"""Image decoding as a Ray Data batch function: bytes in, fixed-size pixels or a reject reason out.

Runs as stateless CPU tasks ahead of the model actors so JPEG decoding never starves a GPU.
Rejected images travel on with ``ok=False`` and zero pixels, so the actor that writes the
outputs also records the rejection: one place sees every image exactly once.
"""

from __future__ import annotations

import numpy as np

from scope_ray.data.images import DEFAULT_MAX_ASPECT_RATIO, RejectedImage, decode_image, resize_center_crop


def decode_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int, min_side: int,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> dict[str, np.ndarray]:
    """``image`` bytes → ``pixels`` [B, size, size, 3] uint8, ``ok`` [B] and ``reason`` [B].

    One image's failure never fails the batch: ``RejectedImage`` is its reason, and a
    ``MemoryError`` the decoders did not already turn into one still is (the image is gone, the
    task and the other images are not)."""
    images = batch["image"]
    n = len(images)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    reason = np.full(n, "", dtype=object)
    for i, data in enumerate(images):
        try:
            img = decode_image(None if data is None else bytes(data), max_pixels=max_pixels, min_side=min_side,
                               max_aspect_ratio=max_aspect_ratio)
            pixels[i] = resize_center_crop(img, size, max_pixels=max_pixels)
            ok[i] = True
        except RejectedImage as exc:
            reason[i] = exc.reason
        except MemoryError:
            reason[i] = "out of memory decoding or resizing"
        finally:
            img = None  # an image that took most of the memory must not outlive its row
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixels=pixels, ok=ok, reason=reason)
    return out

"""Real photos without a download: the images that ship inside scikit-image.

The demo and tests need natural images (shape scenes have no natural statistics); scikit-image
bundles about twenty photos in ``skimage/data``. They are read as raw file bytes, so they go
through the same decoder, and the same reject rules, as any dataset.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from scope_ray.data.synthetic import write_image_folder
from scope_ray.storage import join_uri

PHOTO_CLASS = "n99999999"  # one synthetic class: the pool is for analysis, not classification
MIN_PHOTO_SIDE = 128

# Photographs (or micrographs / telescope shots) only: the list leaves out drawings and test
# patterns (chessboards, logo, phantom, horse silhouette, colour wheel) and non-image data.
PHOTO_NAMES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)


def _skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def bundled_photos() -> dict[str, bytes]:
    """``file name → raw bytes`` of the photos present in this scikit-image install, in name order.

    A name missing from this version of scikit-image, or a file under MIN_PHOTO_SIDE pixels on
    a side, is skipped; the result is never empty with a normal install.
    """
    root = _skimage_data_dir()
    photos: dict[str, bytes] = {}
    for name in sorted(PHOTO_NAMES):
        path = root / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < MIN_PHOTO_SIDE:
                    continue
        except Exception:
            continue
        photos[name] = data
    if not photos:
        raise FileNotFoundError(f"no bundled photos found in {root}; is scikit-image installed in full?")
    return photos


def write_photo_pool(dest_uri: str, endpoint_url: str | None = None) -> dict:
    """Write the photos as an ImageNet-style folder split ``dest/photos/n99999999/<name>``;
    return the SourceConfig fields for it (read with dataset "imagenet"; every label is 0)."""
    split = join_uri(dest_uri, "photos")
    write_image_folder(split, {f"{PHOTO_CLASS}/{name}": data for name, data in bundled_photos().items()}, endpoint_url)
    return {"format": "folder", "path": split}

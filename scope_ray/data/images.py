"""Bytes → pixels, safely: every image, mask and depth map enters the project through here.

Pure (no Ray). The contract is narrow on purpose: a decoder either returns an array of a fixed
kind or raises ``RejectedImage`` with a short, stable reason; no other exception escapes for bad
bytes, so a Ray task can record a reject and go on instead of failing the job.

Order of checks in ``decode_image`` (docs/data.md lists every outcome):
  missing / empty / rejected by the source → identify from the header → size and aspect-ratio
  guards (before any pixel is decoded) → full load (truncated files fail here;
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set) → EXIF orientation → conversion of the colour
  mode to RGB uint8. A ``MemoryError`` anywhere in decoding or resizing is a reject too.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold; DataConfig.max_pixels defaults to it too
DEFAULT_MIN_SIDE = 8
# ADE20K's "other" and every id > 150 after reduce_zero_label (decode_mask): the pixels no loss or
# metric counts. Declared here, in the module that makes them, and imported by probes.metrics.
IGNORE_INDEX = 255
# Longer side / shorter side. The centre crop of a 1:32 strip keeps 1/32 of it, upscaled: no
# photo or panorama in the datasets we read comes close, while an 8 x 11,000,000 sliver (under
# max_pixels) does. DataConfig.max_aspect_ratio defaults to it too.
DEFAULT_MAX_ASPECT_RATIO = 32.0
# A source that could not read a file safely (too big, outside the dataset root, a name that is
# not UTF-8) puts these bytes plus the reason where the image bytes would be, so every decoder
# (and every stage that calls one) records that reason as the reject without a schema change.
# No image format starts with a NUL byte.
SOURCE_REJECT = b"\x00scope-ray:rejected-by-source\x00"

# Leading bytes of formats PIL reads: bytes that start like an image but do not open are
# "corrupt", not "not an image" (a broken JPEG and a stray text file need different fixes).
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def source_reject(reason: str) -> bytes:
    """The bytes a source stores for a file it rejected unread; decoders raise ``reason``."""
    return SOURCE_REJECT + reason.encode("utf-8", "backslashreplace")


class RejectedImage(Exception):
    """Bytes that cannot become a usable array; ``reason`` is short, stable and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------- opening
def _sniff(data: bytes) -> str | None:
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open_checked(data: bytes | None, *, max_pixels: int, min_side: int, corrupt: str, missing: str,
                  max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Open lazily and apply the size guards from the header; pixels are not decoded yet.

    ``corrupt`` prefixes the reason for unreadable bytes ("corrupt or truncated image", "corrupt mask").
    """
    if data is None:
        raise RejectedImage(missing)
    if len(data) == 0:
        raise RejectedImage("empty file")
    if data.startswith(SOURCE_REJECT):
        raise RejectedImage(data[len(SOURCE_REJECT):].decode("utf-8", "replace").strip() or "rejected by the source")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the authority; PIL's warning would otherwise
            # make a job that raised max_pixels reject what it asked to keep.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage(f"too large: {exc}") from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is None:
            raise RejectedImage("not an image") from None
        raise RejectedImage(f"{corrupt}: {fmt} header but unreadable") from None
    except Exception as exc:  # any parser failure on hostile bytes is a reject, never a crash
        raise RejectedImage(f"{corrupt}: {type(exc).__name__}: {exc}") from None
    if w * h > max_pixels:
        raise RejectedImage(f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if min(w, h) < min_side:
        raise RejectedImage(f"too small: {w}x{h} < min side {min_side}")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise RejectedImage(f"too elongated: {w}x{h}, aspect ratio {max(w, h) / min(w, h):.4g} > "
                            f"max_aspect_ratio {max_aspect_ratio:g}")
    return im


def _load(im: Image.Image, corrupt: str) -> Image.Image:
    """Decode every pixel now, so truncation and bad entropy data surface as a reject here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", "Truncated File Read" chatter
            im.load()
    except MemoryError:
        raise RejectedImage(f"out of memory decoding a {im.size[0]}x{im.size[1]} {im.mode} image") from None
    except Exception as exc:
        raise RejectedImage(f"{corrupt}: {type(exc).__name__}: {exc}") from None
    return im


# ------------------------------------------------------------------------------------ modes
def _to_rgb_HW3(im: Image.Image) -> np.ndarray:
    """Any PIL mode → [H, W, 3] uint8 RGB.

    - 16-bit grey ('I;16*'): the type range 0..65535 maps to 0..255 by ``>> 8``; the actual
      range is not stretched, so a dark 16-bit photo stays dark (photometry is preserved).
    - 'I' (32-bit int): treated as 16-bit data (its usual source is a 16-bit PNG/TIFF/PGM):
      clipped to 0..65535, then ``>> 8``.
    - 'F' (32-bit float): assumed to hold 0..1, clipped, then x 255 and rounded.
    - Alpha (RGBA, LA, PA, palette transparency) is discarded, not composited: the colour under
      a transparent pixel is kept, as ``PIL.Image.convert("RGB")`` in timm/open_clip does.
    """
    mode = im.mode
    if mode.startswith("I;16"):
        grey_HW = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "I":
        grey_HW = (np.clip(np.asarray(im), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        grey_HW = np.rint(np.clip(np.nan_to_num(np.asarray(im), nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    else:
        if mode != "RGB":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Palette images with Transparency ..." is expected here
                im = im.convert("RGB")
        return np.array(im, dtype=np.uint8)
    return np.repeat(grey_HW[:, :, None], 3, axis=2)


# -------------------------------------------------------------------------------- decoders
def decode_image(
    data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> np.ndarray:
    """Encoded image bytes → img_HW3 uint8 RGB, EXIF orientation applied; else ``RejectedImage``."""
    corrupt = "corrupt or truncated image"
    im = _open_checked(data, max_pixels=max_pixels, min_side=min_side, corrupt=corrupt, missing="missing image",
                       max_aspect_ratio=max_aspect_ratio)
    im = _load(im, corrupt)
    try:
        im = ImageOps.exif_transpose(im)
    except MemoryError:
        raise RejectedImage(f"out of memory rotating a {im.size[0]}x{im.size[1]} image") from None
    except Exception:
        pass  # unreadable EXIF: the pixels are fine, keep them as stored (documented in docs/data.md)
    try:
        return _to_rgb_HW3(im)
    except MemoryError:
        raise RejectedImage(f"out of memory converting a {im.size[0]}x{im.size[1]} {im.mode} image to RGB") from None
    except Exception as exc:
        raise RejectedImage(f"unsupported image mode {im.mode}: {type(exc).__name__}: {exc}") from None


def decode_mask(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """ADE20K annotation PNG (release: 0 = unlabelled, 1..150 = classes) → mask_HW uint8 in
    training encoding: class k → k-1 (0..149), 0 and anything > 150 → 255 (ignore).

    This is mmseg's ``reduce_zero_label``; the probe's ignore index is 255.
    """
    im = _open_checked(data, max_pixels=max_pixels, min_side=1, corrupt="corrupt mask", missing="missing label")
    im = _load(im, "corrupt mask")
    if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        # 'P' would be read as its raw indices, which is how some tools save label maps.
        raise RejectedImage(f"corrupt mask: expected a single-channel class-index PNG, got mode {im.mode}")
    try:
        raw_HW = np.asarray(im).astype(np.int64)
        return np.where((raw_HW >= 1) & (raw_HW <= 150), raw_HW - 1, IGNORE_INDEX).astype(np.uint8)
    except MemoryError:
        raise RejectedImage(f"out of memory reading a {im.size[0]}x{im.size[1]} mask") from None


def decode_depth(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """NYUd depth PNG (16-bit, millimetres, 0 = invalid) → depth_HW float32 metres, NaN = invalid."""
    im = _open_checked(data, max_pixels=max_pixels, min_side=1, corrupt="corrupt depth", missing="missing depth")
    im = _load(im, "corrupt depth")
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        # 8-bit depth in mm would top out at 0.255 m: certainly the wrong file, never guess a scale.
        raise RejectedImage(f"corrupt depth: expected a 16-bit PNG in millimetres, got mode {im.mode}")
    try:
        mm_HW = np.asarray(im).astype(np.float32)
        mm_HW[mm_HW <= 0] = np.nan
        return mm_HW / np.float32(1000.0)
    except MemoryError:
        raise RejectedImage(f"out of memory reading a {im.size[0]}x{im.size[1]} depth map") from None


# ---------------------------------------------------------------------------------- resizing
def _check_HW3(img_HW3: np.ndarray, size: int) -> None:
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if img_HW3.ndim != 3 or img_HW3.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {list(img_HW3.shape)}")


@dataclass(frozen=True)
class EvalTransform:
    """A model's evaluation resize and crop, as its library's pretrained config gives it.

    ``resize_mode`` "shortest": the shorter side to ``floor(size / crop_pct)`` (timm's eval
    transform; crop_pct 1 is open_clip's and torchvision's Resize + CenterCrop), then the central
    size x size crop. "squash": straight to size x size, aspect ratio not kept. ``interpolation``
    is the image filter; label and depth planes are always resampled nearest."""

    crop_pct: float = 1.0
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct {self.crop_pct} outside (0, 1]")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}; supported: {', '.join(RESIZE_MODES)}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation {self.interpolation!r}; supported: {', '.join(_FILTERS)}")


RESIZE_MODES = ("shortest", "squash")
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
PLAIN = EvalTransform()  # the only transform before 2026-12-03 (CLIP, DINOv2, the demo models)


def crop_geometry(h: int, w: int, size: int, transform: EvalTransform = PLAIN) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left) of the resize + centre crop of an h x w input.

    The one copy of this geometry: images (``resize_center_crop``) and their label / depth planes
    (``resize_center_crop_plane``) both use it, so a mask always lines up with its pixels."""
    if transform.resize_mode == "squash":
        return size, size, 0, 0
    scale = int(math.floor(size / transform.crop_pct)) if transform.crop_pct < 1 else size
    if h <= w:
        new_h, new_w = scale, max(scale, int(scale * w / h))
    else:
        new_h, new_w = max(scale, int(scale * h / w)), scale
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def resize_center_crop(img_HW3: np.ndarray, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       transform: EvalTransform = PLAIN) -> np.ndarray:
    """Resize by ``transform`` (default: bicubic, the shorter side to ``size``), then the central
    size x size crop.

    Rounding follows torchvision's Resize + CenterCrop (the preprocessing the models were trained
    with): the long side is ``int(size * long / short)``, the crop offset ``round((L - size) / 2)``.
    The resized image is a real intermediate, so the pixel budget applies to it too: an
    8 x 11,000,000 strip resized to a 224 short side would be 224 x 308,000,000 x 3 bytes. Over
    ``max_pixels`` (or out of memory anyway) it is a ``RejectedImage`` with the reason.
    """
    _check_HW3(img_HW3, size)
    h, w = img_HW3.shape[:2]
    new_h, new_w, top, left = crop_geometry(h, w, size, transform)
    if new_w * new_h > max_pixels:
        raise RejectedImage(f"too large to resize: {w}x{h} → {new_w}x{new_h} = {new_w * new_h} pixels > "
                            f"max_pixels {max_pixels}")
    try:
        im = Image.fromarray(np.ascontiguousarray(img_HW3, dtype=np.uint8))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), _FILTERS[transform.interpolation])
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()
    except MemoryError:
        raise RejectedImage(f"out of memory resizing a {w}x{h} image to {size}") from None


def resize_center_crop_plane(plane_HW: np.ndarray, size: int, transform: EvalTransform = PLAIN) -> np.ndarray:
    """A label or depth plane put through its image's resize + centre crop, nearest-neighbour.

    uint8 (class ids) or float32 (metres, NaN = invalid). Nearest never invents a class id or a
    depth between a foreground and a background surface, and an invalid (NaN) pixel stays NaN
    without spreading. PIL samples pixel centres for every filter, so the plane lines up with the
    bicubic image resize of ``resize_center_crop`` (same ``crop_geometry``).
    """
    if plane_HW.ndim != 2 or plane_HW.dtype not in (np.uint8, np.float32):
        raise ValueError(f"expected a uint8 or float32 plane [H, W], got {plane_HW.dtype} {list(plane_HW.shape)}")
    h, w = plane_HW.shape
    new_h, new_w, top, left = crop_geometry(h, w, size, transform)
    im = Image.fromarray(np.ascontiguousarray(plane_HW))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.NEAREST)
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=plane_HW.dtype).copy()


def resize_square(img_HW3: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size x size, aspect ratio not kept (SCC cuts its own square views)."""
    _check_HW3(img_HW3, size)
    try:
        im = Image.fromarray(np.ascontiguousarray(img_HW3, dtype=np.uint8))
        return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8).copy()
    except MemoryError:
        raise RejectedImage(f"out of memory resizing a {img_HW3.shape[1]}x{img_HW3.shape[0]} image to {size}") from None


# ------------------------------------------------------------------------- bad-input catalogue
def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient_rgb(w: int, h: int) -> Image.Image:
    y_HW, x_HW = np.mgrid[0:h, 0:w]
    rgb_HW3 = np.stack([x_HW * 255 // max(w - 1, 1), y_HW * 255 // max(h - 1, 1), (x_HW + y_HW) % 256], axis=2)
    return Image.fromarray(rgb_HW3.astype(np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _bilevel_png_bomb(side: int) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels built row by row: a few KB on disk, and
    never more than one row in memory (PIL would allocate the whole image to save it)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@functools.cache
def bad_image_samples() -> dict[str, tuple[bytes, str]]:
    """kind → (bytes, expected outcome "convert" | "reject") under the default limits.

    For tests and the fault suite; built once per process (the bombs take ~0.1 s).
    """
    photo = _gradient_rgb(48, 32)
    jpeg = _encode(photo, "JPEG", quality=90)
    grey = photo.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90 CW to display": stored 48x32 shows as 32x48
    return {
        "rgb_jpeg": (jpeg, "convert"),
        "corrupt": (jpeg[:20] + bytes(range(256)) * 8, "reject"),  # JFIF header, then garbage
        "truncated": (jpeg[: len(jpeg) // 2], "reject"),
        "empty": (b"", "reject"),
        "non_image": ("These are notes, not a picture.\n".encode("utf-8"), "reject"),
        "one_by_one": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "reject"),
        "grayscale": (_encode(grey, "JPEG", quality=90), "convert"),
        "grayscale_alpha": (_encode(Image.merge("LA", (grey, grey.point(lambda v: 255 - v))), "PNG"), "convert"),
        "palette": (_encode(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"), "convert"),
        "cmyk": (_encode(photo.convert("CMYK"), "JPEG", quality=90), "convert"),
        "rgba": (_encode(Image.merge("RGBA", (*photo.split(), grey)), "PNG"), "convert"),
        "gray16": (_encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"), "convert"),
        "bilevel": (_encode(grey.convert("1"), "PNG"), "convert"),
        "exif_rotated": (_encode(photo, "JPEG", quality=90, exif=exif), "convert"),
        # 12000^2 = 1.44e8 px: above max_pixels, below PIL's hard limit (its warning path)
        "decompression_bomb": (_bilevel_png_bomb(12_000), "reject"),
        # 20000^2 = 4e8 px: above PIL's own DecompressionBombError limit (2 x 89,478,485)
        "decompression_bomb_huge": (_bilevel_png_bomb(20_000), "reject"),
    }

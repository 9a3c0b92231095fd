"""Decoding properties: every bad input is converted or rejected with a reason, never a crash."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scope_ray.data.images import (
    RejectedImage,
    bad_image_samples,
    decode_depth,
    decode_image,
    decode_mask,
    resize_center_crop,
    resize_square,
)

SAMPLES = bad_image_samples()
REASON_PREFIX = {
    "corrupt": "corrupt or truncated image",
    "truncated": "corrupt or truncated image",
    "empty": "empty file",
    "non_image": "not an image",
    "one_by_one": "too small: 1x1 < min side 8",
    "decompression_bomb": "too large: 12000x12000",
    "decompression_bomb_huge": "too large",
}


def _encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _half_red_half_blue() -> np.ndarray:
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :24] = (255, 0, 0)
    img[:, 24:] = (0, 0, 255)
    return img


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_catalogue_outcomes(kind):
    data, expected = SAMPLES[kind]
    if expected == "convert":
        img = decode_image(data, max_pixels=89_478_485, min_side=8)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 8
    else:
        with pytest.raises(RejectedImage) as info:
            decode_image(data, max_pixels=89_478_485, min_side=8)
        assert info.value.reason.startswith(REASON_PREFIX.get(kind, ""))
        assert info.value.reason and "\n" not in info.value.reason


def test_catalogue_covers_the_required_kinds():
    required = {"corrupt", "truncated", "empty", "non_image", "one_by_one", "grayscale", "grayscale_alpha",
                "palette", "cmyk", "rgba", "gray16", "bilevel", "decompression_bomb"}
    assert required <= set(SAMPLES)
    assert len(SAMPLES["decompression_bomb"][0]) < 100_000  # small in bytes, huge in pixels


def test_missing_image_is_rejected():
    with pytest.raises(RejectedImage, match="missing image"):
        decode_image(None, max_pixels=10**6, min_side=8)


def test_size_limits_are_checked_from_the_header():
    data = SAMPLES["rgb_jpeg"][0]  # 48x32
    with pytest.raises(RejectedImage) as info:
        decode_image(data, max_pixels=1000, min_side=8)
    assert info.value.reason == "too large: 48x32 = 1536 pixels > max_pixels 1000"
    with pytest.raises(RejectedImage) as info:
        decode_image(data, max_pixels=10**6, min_side=40)
    assert info.value.reason == "too small: 48x32 < min side 40"


def test_grey_modes_become_equal_channels():
    for kind in ("grayscale", "grayscale_alpha", "gray16", "bilevel"):
        img = decode_image(SAMPLES[kind][0], max_pixels=10**6, min_side=8)
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all(), kind


def test_sixteen_bit_type_range_is_scaled_to_eight_bits():
    raw = np.array([[0, 255, 256, 32768, 65535, 65280, 1000, 4000]] * 8, np.uint16)
    img = decode_image(_encode(raw), max_pixels=10**6, min_side=8)
    np.testing.assert_array_equal(img[0, :, 0], [0, 0, 1, 128, 255, 255, 3, 15])


def test_int32_and_float_modes_use_documented_ranges():
    i32 = np.array([[-5, 0, 256, 65535, 70000, 1 << 20, 512, 0]] * 8, np.int32)  # mode 'I'
    np.testing.assert_array_equal(decode_image(_encode(i32, "TIFF"), max_pixels=10**6, min_side=8)[0, :, 1],
                                  [0, 0, 1, 255, 255, 255, 2, 0])
    f32 = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, 0.1, 0.9, 0.2]] * 8, np.float32)  # mode 'F'
    np.testing.assert_array_equal(decode_image(_encode(f32, "TIFF"), max_pixels=10**6, min_side=8)[0, :, 2],
                                  [0, 0, 128, 255, 255, 26, 230, 51])


def test_alpha_is_discarded_not_composited():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent
    img = decode_image(_encode(rgba), max_pixels=10**6, min_side=8)
    assert (img == np.array([10, 20, 30], np.uint8)).all()


def test_palette_matches_its_rgb_rendering():
    data = SAMPLES["palette"][0]
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, max_pixels=10**6, min_side=8), expected)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise for display
    data = _encode(_half_red_half_blue(), "JPEG", quality=95, exif=exif)
    img = decode_image(data, max_pixels=10**6, min_side=8).astype(int)
    assert img.shape == (48, 32, 3)
    top, bottom = img[:20].mean(axis=(0, 1)), img[-20:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # stored left (red) is now on top


def test_exif_sample_is_rotated():
    assert decode_image(SAMPLES["exif_rotated"][0], max_pixels=10**6, min_side=8).shape == (48, 32, 3)


_PNG = _encode(_half_red_half_blue())
_JPEG = _encode(_half_red_half_blue(), "JPEG", quality=90)


def _decode_or_reason(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=10**6, min_side=8)
    except RejectedImage as exc:
        assert isinstance(exc.reason, str) and exc.reason
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape(data):
    _decode_or_reason(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([_PNG, _JPEG]), st.floats(0.0, 0.999))
def test_truncations_never_escape(data, frac):
    _decode_or_reason(data[: int(len(data) * frac)])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([_PNG, _JPEG]), st.integers(0, 10**6), st.integers(1, 255))
def test_corrupted_bytes_never_escape(data, pos, xor):
    b = bytearray(data)
    b[pos % len(b)] ^= xor
    _decode_or_reason(bytes(b))


@pytest.mark.parametrize("hw", [(32, 48), (48, 32), (20, 20), (224, 17), (10, 300)])
def test_resize_center_crop_shape_and_constant(hw):
    img = np.full((*hw, 3), 77, np.uint8)
    out = resize_center_crop(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and (out == 77).all()
    assert resize_square(img, 24).shape == (24, 24, 3)


def test_center_crop_keeps_the_middle():
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, 32:64] = 255  # the central third is white
    out = resize_center_crop(img, 32)
    assert (out[:, 4:28] > 200).all()


def test_mask_release_encoding_maps_to_training_encoding():
    raw = np.array([[0, 1, 2, 150, 151, 255, 7, 0]] * 4, np.uint8)
    np.testing.assert_array_equal(decode_mask(_encode(raw))[0], [255, 0, 1, 149, 255, 255, 6, 255])


def test_mask_rejects():
    with pytest.raises(RejectedImage, match="missing label"):
        decode_mask(None)
    with pytest.raises(RejectedImage, match="corrupt mask"):
        decode_mask(_PNG)  # RGB is not a class-index map
    with pytest.raises(RejectedImage, match="corrupt mask"):
        decode_mask(_encode(np.zeros((8, 8), np.uint8))[:40])
    with pytest.raises(RejectedImage, match="not an image"):
        decode_mask(b"hello")


def test_depth_millimetres_to_metres_with_invalid_nan():
    mm = np.array([[0, 1000, 1500, 65535]] * 3, np.uint16)
    m = decode_depth(_encode(mm))
    assert m.dtype == np.float32
    assert np.isnan(m[:, 0]).all()
    np.testing.assert_allclose(m[0, 1:], [1.0, 1.5, 65.535], rtol=1e-6)


def test_depth_rejects():
    with pytest.raises(RejectedImage, match="missing depth"):
        decode_depth(None)
    with pytest.raises(RejectedImage, match="corrupt depth: expected a 16-bit PNG"):
        decode_depth(_encode(np.zeros((8, 8), np.uint8)))
    with pytest.raises(RejectedImage, match="empty file"):
        decode_depth(b"")


# ------------------------------------------------------------------ bounded decoding (issue 14)
def _bilevel_strip_png(w: int, h: int) -> bytes:
    """A valid all-black 1-bit w x h PNG built row by row: tiny on disk, one row in memory."""
    from scope_ray.data.images import _png_chunk

    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_an_extreme_strip_under_max_pixels_is_rejected_from_the_header():
    """8 x 11,000,000 bilevel PNG (~10 KB, 8.8e7 px < max_pixels): its resize used to ask for
    ~48 GiB and the MemoryError escaped; now the aspect-ratio limit rejects it before decoding."""
    strip = _bilevel_strip_png(11_000_000, 8)
    assert len(strip) < 20_000
    with pytest.raises(RejectedImage) as info:
        decode_image(strip, max_pixels=89_478_485, min_side=8)
    assert info.value.reason == "too elongated: 11000000x8, aspect ratio 1.375e+06 > max_aspect_ratio 32"
    # The limit is a parameter (DataConfig.max_aspect_ratio); a 1:4 image is well inside it.
    assert decode_image(_bilevel_strip_png(64, 16), max_pixels=10**6, min_side=8).shape == (16, 64, 3)
    with pytest.raises(RejectedImage, match="too elongated"):
        decode_image(_bilevel_strip_png(64, 16), max_pixels=10**6, min_side=8, max_aspect_ratio=3)


def test_the_resize_target_is_under_the_pixel_budget_too():
    """With the aspect limit lifted, the resize's own intermediate is bounded by max_pixels."""
    strip_HW3 = np.zeros((8, 400, 3), np.uint8)  # a 64 short side → 3200 x 64
    with pytest.raises(RejectedImage) as info:
        resize_center_crop(strip_HW3, 64, max_pixels=10**5)
    assert info.value.reason == "too large to resize: 400x8 → 3200x64 = 204800 pixels > max_pixels 100000"
    assert resize_center_crop(strip_HW3, 64).shape == (64, 64, 3)  # the default budget allows it


def test_memory_errors_in_decoding_and_resizing_are_rejects(monkeypatch):
    from PIL import ImageFile

    jpeg = SAMPLES["rgb_jpeg"][0]

    def no_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_memory)
        with pytest.raises(RejectedImage, match="^out of memory decoding a 48x32 RGB image$"):
            decode_image(jpeg, max_pixels=10**6, min_side=8)
    img_HW3 = decode_image(jpeg, max_pixels=10**6, min_side=8)
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "convert", no_memory)
        with pytest.raises(RejectedImage, match="^out of memory converting"):
            decode_image(SAMPLES["palette"][0], max_pixels=10**6, min_side=8)
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "resize", no_memory)
        with pytest.raises(RejectedImage, match="^out of memory resizing a 48x32 image to 16$"):
            resize_center_crop(img_HW3, 16)
        with pytest.raises(RejectedImage, match="^out of memory resizing"):
            resize_square(img_HW3, 16)


def test_decode_batch_turns_every_failure_into_a_reason_and_keeps_the_batch(monkeypatch):
    import scope_ray.stages.decode as decode

    strip = _bilevel_strip_png(11_000_000, 8)
    batch = {"image_id": np.array(["a", "strip", "b"], dtype=object),
             "image": np.array([SAMPLES["rgb_jpeg"][0], strip, SAMPLES["grayscale"][0]], dtype=object)}
    out = decode.decode_batch(batch, size=16, max_pixels=89_478_485, min_side=8)
    assert out["ok"].tolist() == [True, False, True]
    assert out["reason"][1].startswith("too elongated: 11000000x8")
    real = decode.decode_image

    def oom_on_second(data, **kw):
        if data == strip:
            raise MemoryError
        return real(data, **kw)

    monkeypatch.setattr(decode, "decode_image", oom_on_second)
    out = decode.decode_batch(batch, size=16, max_pixels=89_478_485, min_side=8)
    assert out["ok"].tolist() == [True, False, True] and out["reason"][1] == "out of memory decoding or resizing"


def test_a_source_reject_marker_becomes_the_reject_reason_in_every_decoder():
    from scope_ray.data.images import source_reject

    for decode in (decode_image, decode_mask, decode_depth):
        with pytest.raises(RejectedImage) as info:
            decode(source_reject("file too large: 9 bytes > max_file_bytes 8"))
        assert info.value.reason == "file too large: 9 bytes > max_file_bytes 8"

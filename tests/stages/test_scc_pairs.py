"""SCC pairs as a batch transform: one row per (image, shift), overlap patches byte-identical, rejects kept."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scope_ray.config import load_config
from scope_ray.data.images import bad_image_samples, decode_image
from scope_ray.scc import overlap_indices, scc_views
from scope_ray.stages.scc_pairs import scc_pairs_batch, with_scc_pairs

PATCH, GRID = 16, 7  # demo-vit-tiny's geometry
SHIFTS = (1, 2, 5)


def _png(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_HW3).save(buf, format="PNG")
    return buf.getvalue()


def _patches_NPP3(view_HW3: np.ndarray, patch: int) -> np.ndarray:
    g = view_HW3.shape[0] // patch
    return view_HW3.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, patch, patch, 3)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    from skimage.data import astronaut, chelsea

    return [_png(astronaut()), _png(chelsea())]  # real photographs, lossless so decoding is exact


def _batch(images: list[bytes | None]) -> dict[str, np.ndarray]:
    return {"image_id": np.array([f"img{i}" for i in range(len(images))], dtype=object),
            "image": np.array(images, dtype=object), "label": np.arange(len(images), dtype=np.int64) + 10}


def test_one_row_per_image_and_shift_with_identical_overlap_pixels(photos):
    out = scc_pairs_batch(_batch(photos), patch=PATCH, grid=GRID, shifts=SHIFTS, max_pixels=10**8, min_side=8)
    r = len(photos) * len(SHIFTS)
    side = GRID * PATCH
    assert out["view1"].shape == out["view2"].shape == (r, side, side, 3)
    assert out["view1"].dtype == np.uint8
    assert out["shift"].dtype == np.int64 and out["shift"].tolist() == list(SHIFTS) * len(photos)
    assert out["image_id"].tolist() == [f"img{i}" for i in range(len(photos)) for _ in SHIFTS]
    assert out["label"].tolist() == [10 + i for i in range(len(photos)) for _ in SHIFTS]  # passed through
    assert out["ok"].all() and set(out["reason"]) == {""}
    assert "image" not in out
    for row in range(r):
        s = int(out["shift"][row])
        p1, p2 = _patches_NPP3(out["view1"][row], PATCH), _patches_NPP3(out["view2"][row], PATCH)
        idx1, idx2 = overlap_indices(GRID, s)
        assert np.array_equal(p1[idx1], p2[idx2])  # the same pixels, every overlap patch
        assert not np.array_equal(p1, p2)  # but the views differ: the context moved
        # And they are exactly scc_views of the decoded photograph.
        img = decode_image(photos[row // len(SHIFTS)])
        v1, v2 = scc_views(img, PATCH, GRID, s)
        assert np.array_equal(out["view1"][row], v1) and np.array_equal(out["view2"][row], v2)


def test_rejected_images_give_one_row_per_shift_with_a_reason(photos):
    corrupt = bad_image_samples()["truncated"][0]
    images = [photos[0], corrupt, None, b"not an image at all"]
    out = scc_pairs_batch(_batch(images), patch=PATCH, grid=GRID, shifts=(1, 3), max_pixels=10**8, min_side=8)
    assert len(out["ok"]) == 8
    assert out["ok"].tolist() == [True, True] + [False] * 6
    reasons = out["reason"].tolist()
    assert reasons[:2] == ["", ""]
    assert all(reasons[2:]) and reasons[2] == reasons[3]  # same reason on each shift's row
    assert reasons[4] == "missing image" and reasons[6] == "not an image"
    assert not out["view1"][2:].any() and not out["view2"][2:].any()
    assert out["image_id"].tolist()[2:4] == ["img1", "img1"]


@pytest.mark.slow
def test_with_scc_pairs_through_ray_data(ray_local, photos):
    import ray.data

    job = load_config(None, ["scope.batch_size=2"])
    ds = ray.data.from_items([{"image_id": f"p{i}", "image": b, "label": i} for i, b in enumerate(photos * 2)])
    rows = with_scc_pairs(ds, job.model.spec, (1, 4), job).take_all()
    assert len(rows) == 8
    assert sorted((r["image_id"], int(r["shift"])) for r in rows) == sorted(
        (f"p{i}", s) for i in range(4) for s in (1, 4))
    for r in rows:
        idx1, idx2 = overlap_indices(GRID, int(r["shift"]))
        assert r["ok"] and np.array_equal(_patches_NPP3(r["view1"], PATCH)[idx1], _patches_NPP3(r["view2"], PATCH)[idx2])


def test_the_jobs_aspect_ratio_limit_reaches_every_decoder(photos):
    """data.max_aspect_ratio is passed by every stage that decodes (scc pairs, probe features,
    extract and the gallery's decode_batch) and is in the hashes of the stages that read images."""
    from scope_ray import pipeline
    from scope_ray.config import load_config
    from scope_ray.stages.decode import decode_batch

    wide = _png(np.zeros((20, 70, 3), np.uint8))  # 3.5 : 1
    batch = _batch([photos[0], wide])
    pairs = scc_pairs_batch(batch, patch=PATCH, grid=GRID, shifts=(1,), max_pixels=10**8, min_side=8,
                            max_aspect_ratio=3.0)
    assert pairs["ok"].tolist() == [True, False] and "aspect ratio" in pairs["reason"][1]
    assert scc_pairs_batch(batch, patch=PATCH, grid=GRID, shifts=(1,), max_pixels=10**8, min_side=8,
                           max_aspect_ratio=4.0)["ok"].tolist() == [True, True]
    cls = decode_batch(batch, task="classification", size=20, max_pixels=10**8, min_side=8, max_aspect_ratio=3.0)
    assert cls["ok"].tolist() == [True, False]
    assert decode_batch(batch, size=20, max_pixels=10**8, min_side=8, max_aspect_ratio=3.0)["ok"].tolist() == [True, False]
    a, b = load_config(None), load_config(None, ["data.max_aspect_ratio=4"])
    for h in (pipeline.extract_hash, pipeline.cds_topk_hash, pipeline.probe_features_hash):
        assert h(a) != h(b)
    assert pipeline.instability_hash(a, 5.0) != pipeline.instability_hash(b, 5.0)

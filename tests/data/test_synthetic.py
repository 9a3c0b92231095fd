"""Synthetic scenes and their on-disk layouts; bundled photos. No Ray here."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scope_ray.config import SourceConfig
from scope_ray.data.bundled import PHOTO_CLASS, bundled_photos, write_photo_pool
from scope_ray.data.images import decode_depth, decode_image, decode_mask
from scope_ray.data.synthetic import make_scene, write_image_folder, write_synthetic


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scene_properties(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        s = make_scene(rng, 64, 7)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.uint8 and s.mask.max() <= 7
        assert s.depth.shape == (64, 64) and s.depth.dtype == np.float32
        assert not np.isnan(s.depth).any() and s.depth.min() >= 0.5 and s.depth.max() <= 10.0
        # Shapes (0.5..5 m) are always nearer than the background (6..10 m).
        assert ((s.mask > 0) == (s.depth < 5.5)).all()
        visible = np.bincount(s.mask.ravel(), minlength=8)[1:]
        assert 0 <= s.label < 7 and visible[s.label] == visible.max() > 0


def test_scene_is_a_function_of_the_generator_state():
    a = make_scene(np.random.default_rng(5), 32, 10)
    b = make_scene(np.random.default_rng(5), 32, 10)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label


def test_write_is_byte_deterministic(tmp_path):
    kw = dict(n_train=5, n_val=3, size=24, num_classes=4, images_per_shard=2)
    write_synthetic(str(tmp_path / "a"), seed=7, **kw)
    write_synthetic(str(tmp_path / "b"), seed=7, **kw)
    write_synthetic(str(tmp_path / "c"), seed=8, **kw)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b and len(a) > 50
    assert a != c and {k: v for k, v in a.items() if k in c} != {k: v for k, v in c.items() if k in a}


def test_layouts_and_encodings(tmp_path):
    out = write_synthetic(str(tmp_path), n_train=5, n_val=2, size=24, num_classes=4, images_per_shard=3)
    for dataset, formats in out.items():
        for fmt, splits in formats.items():
            assert set(splits) == {"train", "val"}
            for fields in splits.values():
                SourceConfig(**fields)  # every entry is a valid source

    inet = tmp_path / "imagenet"
    assert (inet / "folder/classes.txt").read_text().split() == [f"n{c:08d}" for c in range(4)]
    jpegs = sorted((inet / "folder/train").rglob("*.JPEG"))
    assert len(jpegs) == 5 and all(p.parent.name.startswith("n000000") for p in jpegs)

    ade = tmp_path / "ade20k/folder"
    assert out["ade20k"]["folder"]["val"] == {"format": "folder", "path": str(ade), "split": "validation"}
    for img in (ade / "images/training").iterdir():
        mask = decode_mask((ade / "annotations/training" / (img.stem + ".png")).read_bytes())
        assert mask.shape == (24, 24) and set(np.unique(mask)) <= {255, 0, 1, 2, 3}

    for img in (tmp_path / "nyud/folder/train/images").iterdir():
        depth = decode_depth((tmp_path / "nyud/folder/train/depth" / img.name).read_bytes())
        assert np.isnan(depth[:, :2]).all() and np.nanmin(depth) >= 0.5 and np.nanmax(depth) <= 10.0

    table = pq.read_table(tmp_path / "ade20k/parquet/train/part-00000.parquet")
    assert table.column_names == ["key", "image", "mask"] and table.num_rows == 3
    assert sorted(p.name for p in (tmp_path / "ade20k/parquet/train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_table(tmp_path / "nyud/parquet/val/part-00000.parquet").column_names == ["key", "image", "depth"]
    assert str(pq.read_table(tmp_path / "imagenet/parquet/val/part-00000.parquet").schema.field("label").type) == "int64"

    with tarfile.open(tmp_path / "nyud/webdataset/train/shard-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["train_000000.png", "train_000000.depth.png"]
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    with tarfile.open(tmp_path / "imagenet/webdataset/train/shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["train_000003.jpg", "train_000003.cls"]
        assert int(tar.extractfile(names[1]).read()) in range(4)
    with tarfile.open(tmp_path / "ade20k/webdataset/val/shard-000000.tar") as tar:
        assert tar.getnames() == ["val_000000.jpg", "val_000000.seg.png", "val_000001.jpg", "val_000001.seg.png"]


def test_empty_split_and_format_subset(tmp_path):
    out = write_synthetic(str(tmp_path), n_train=2, n_val=0, size=16, formats=("parquet",))
    assert out["nyud"] == {"parquet": {"train": {"format": "parquet", "path": str(tmp_path / "nyud/parquet/train")}}}
    assert not (tmp_path / "imagenet/folder").exists()
    with pytest.raises(ValueError, match="unknown formats"):
        write_synthetic(str(tmp_path), n_train=1, n_val=1, formats=("zip",))


def test_write_image_folder(tmp_path):
    write_image_folder(str(tmp_path / "x"), {"a/b.jpg": b"123", "c.txt": b"note"})
    assert _tree(tmp_path / "x") == {"a/b.jpg": b"123", "c.txt": b"note"}


def test_bundled_photos_decode(tmp_path):
    photos = bundled_photos()
    assert {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"} <= set(photos)
    for name, data in photos.items():
        img = decode_image(data, max_pixels=89_478_485, min_side=8)
        assert min(img.shape[:2]) >= 128, name
    src = write_photo_pool(str(tmp_path))
    assert src == {"format": "folder", "path": str(tmp_path / "photos")}
    assert sorted(p.name for p in (tmp_path / "photos" / PHOTO_CLASS).iterdir()) == sorted(photos)
    assert (tmp_path / "photos" / PHOTO_CLASS / "rocket.jpg").read_bytes() == photos["rocket.jpg"]


def test_counts_per_dataset(tmp_path):
    import pyarrow.parquet as pq

    out = write_synthetic(str(tmp_path), n_train=3, n_val=2, size=16, formats=("parquet",),
                          counts={"ade20k": (1, 1), "nyud": (2, 0)})
    rows = {(d, s): pq.read_table(src["path"]).num_rows for d, splits in out.items() for s, src in splits["parquet"].items()}
    assert rows == {("imagenet", "train"): 3, ("imagenet", "val"): 2, ("ade20k", "train"): 1, ("ade20k", "val"): 1,
                    ("nyud", "train"): 2}
    with pytest.raises(ValueError, match="unknown datasets"):
        write_synthetic(str(tmp_path), n_train=1, n_val=1, counts={"coco": (1, 1)})

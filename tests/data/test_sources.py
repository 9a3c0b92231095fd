"""read_source on every dataset x format, locally and on S3 (moto), including bad files."""

from __future__ import annotations

import io
import posixpath
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope_ray.config import SourceConfig
from scope_ray.data.images import RejectedImage, decode_depth, decode_image, decode_mask
from scope_ray.data.sources import output_schema, read_source
from scope_ray.data.synthetic import write_image_folder, write_synthetic

N_TRAIN, N_VAL, SIZE, SHARD = 10, 4, 24, 4
KW = dict(n_train=N_TRAIN, n_val=N_VAL, size=SIZE, num_classes=5, seed=3, images_per_shard=SHARD)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(root), **KW)


def _rows(fields: dict, dataset: str, endpoint_url: str | None = None, **extra) -> list[dict]:
    ds = read_source(SourceConfig(**{**fields, **extra}), dataset, endpoint_url=endpoint_url)
    return ds.take_all()


def _key(image_id: str) -> str:
    """The synthetic key inside any format's id (folder path, shard/key, or the key itself)."""
    return posixpath.splitext(posixpath.basename(image_id))[0]


def _decoded_target(dataset: str, row: dict):
    if dataset == "imagenet":
        return row["label"]
    if dataset == "ade20k":
        return decode_mask(row["mask"]).tobytes()
    return np.nan_to_num(decode_depth(row["depth"]), nan=-1).tobytes()


@pytest.mark.parametrize("dataset", ["imagenet", "ade20k", "nyud"])
def test_formats_agree(ray_local, local, dataset):
    by_format = {}
    for fmt, splits in local[dataset].items():
        rows = _rows(splits["train"], dataset)
        assert len(rows) == N_TRAIN
        assert set(rows[0]) == set(output_schema(dataset).names)
        assert len({r["image_id"] for r in rows}) == N_TRAIN
        by_format[fmt] = {_key(r["image_id"]): (r["image"], _decoded_target(dataset, r)) for r in rows}
    assert by_format["folder"] == by_format["parquet"] == by_format["webdataset"]
    if dataset == "imagenet":
        assert {v[1] for v in by_format["folder"].values()} <= set(range(5))


def test_folder_ids_and_labels(ray_local, local):
    rows = _rows(local["imagenet"]["folder"]["val"], "imagenet")
    for r in rows:
        wnid, name = r["image_id"].split("/")
        assert name.endswith(".JPEG") and r["label"] == int(wnid[1:])  # class c lives in n0000000c
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    ade = _rows(local["ade20k"]["folder"]["train"], "ade20k")
    assert ade[0]["image_id"] == "train_000000.jpg"
    nyud = _rows(local["nyud"]["folder"]["train"], "nyud")
    assert nyud[0]["image_id"] == "train_000000.png"
    wds = _rows(local["ade20k"]["webdataset"]["train"], "ade20k")
    assert wds[0]["image_id"] == "shard-000000.tar/train_000000"


def test_order_is_stable_and_max_images_takes_the_first(ray_local, local):
    for dataset, fmt in [("imagenet", "folder"), ("imagenet", "parquet"), ("nyud", "webdataset")]:
        fields = local[dataset][fmt]["train"]
        full = [r["image_id"] for r in _rows(fields, dataset)]
        assert [r["image_id"] for r in _rows(fields, dataset)] == full
        head = [r["image_id"] for r in _rows(fields, dataset, max_images=3)]
        assert head == full[:3]


def test_read_is_lazy(ray_local, local):
    import ray.data
    from ray.data.dataset import MaterializedDataset

    before = ray.data.DataContext.get_current().execution_options.preserve_order
    ds = read_source(SourceConfig(**local["imagenet"]["folder"]["train"]), "imagenet")
    assert isinstance(ds, ray.data.Dataset) and not isinstance(ds, MaterializedDataset)
    # Ordering is switched on for this dataset only, never in the process-wide context.
    assert ds.context.execution_options.preserve_order
    assert ray.data.DataContext.get_current().execution_options.preserve_order == before


def test_classes_txt_sets_the_label_order(ray_local, tmp_path, local):
    src = posixpath.dirname(local["imagenet"]["folder"]["val"]["path"])
    rows = {r["image_id"]: r["label"] for r in _rows(local["imagenet"]["folder"]["val"], "imagenet")}
    # Same files, classes.txt in reverse order: every label flips.
    dst = tmp_path / "rev"
    files = {rid: b"x" for rid in rows}
    write_image_folder(str(dst / "val"), files)
    (dst / "classes.txt").write_text("\n".join(f"n{c:08d}" for c in reversed(range(5))) + "\n")
    rev = {r["image_id"]: r["label"] for r in _rows({"format": "folder", "path": str(dst / "val")}, "imagenet")}
    assert rev == {k: 4 - v for k, v in rows.items()}
    # No classes.txt anywhere: sorted sub-directory names.
    (dst / "classes.txt").unlink()
    dirs = sorted({k.split("/")[0] for k in rows})
    plain = {r["image_id"]: r["label"] for r in _rows({"format": "folder", "path": str(dst / "val")}, "imagenet")}
    assert plain == {k: dirs.index(k.split("/")[0]) for k in rows}
    assert src  # the synthetic layout keeps classes.txt beside the split dirs


def test_stray_files_reach_decoding_and_missing_annotations_are_null(ray_local, tmp_path):
    out = write_synthetic(str(tmp_path), n_train=3, n_val=0, size=16, formats=("folder",))
    ade = out["ade20k"]["folder"]["train"]
    root = tmp_path / "ade20k/folder"
    (root / "annotations/training/train_000001.png").unlink()
    write_image_folder(str(root / "images/training"), {"notes.txt": b"not a picture", ".DS_Store": b"junk",
                                                       "sub/.hidden.jpg": b"junk"})
    rows = {r["image_id"]: r for r in _rows(ade, "ade20k")}
    assert set(rows) == {"notes.txt", "train_000000.jpg", "train_000001.jpg", "train_000002.jpg"}
    assert rows["train_000001.jpg"]["mask"] is None and rows["notes.txt"]["mask"] is None
    assert rows["train_000000.jpg"]["mask"] is not None
    with pytest.raises(RejectedImage, match="not an image"):
        decode_image(rows["notes.txt"]["image"], max_pixels=10**6, min_side=8)
    with pytest.raises(RejectedImage, match="missing label"):
        decode_mask(rows["train_000001.jpg"]["mask"])

    nyud_root = tmp_path / "nyud/folder/train"
    (nyud_root / "depth/train_000002.png").unlink()
    write_image_folder(str(nyud_root / "images"), {"empty.png": b""})
    rows = {r["image_id"]: r for r in _rows(out["nyud"]["folder"]["train"], "nyud")}
    assert rows["train_000002.png"]["depth"] is None and rows["empty.png"]["image"] == b""

    inet = tmp_path / "imagenet/folder/train"
    write_image_folder(str(inet), {"loose.JPEG": b"?", "n00000001/readme.txt": b"hi", "n00000077/x.jpg": b"?"})
    rows = {r["image_id"]: r["label"] for r in _rows(out["imagenet"]["folder"]["train"], "imagenet")}
    assert rows["loose.JPEG"] == -1 and rows["n00000001/readme.txt"] == 1 and rows["n00000077/x.jpg"] == -1
    assert "classes.txt" not in rows and len(rows) == 6


def test_parquet_without_key_is_a_clear_error(ray_local, tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), tmp_path / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) key; it has: image, label"):
        read_source(SourceConfig(format="parquet", path=str(tmp_path)), "imagenet")


def test_parquet_optional_target_and_hf_struct(ray_local, tmp_path):
    img = pa.array([{"bytes": b"abc", "path": "a.jpg"}, {"bytes": None, "path": None}])
    pq.write_table(pa.table({"key": [1, 2], "image": img}), tmp_path / "part-00000.parquet")
    rows = _rows({"format": "parquet", "path": str(tmp_path)}, "imagenet")
    assert rows == [{"image_id": "1", "image": b"abc", "label": -1}, {"image_id": "2", "image": None, "label": -1}]
    rows = _rows({"format": "parquet", "path": str(tmp_path)}, "ade20k")
    assert [r["mask"] for r in rows] == [None, None]


def test_webdataset_sample_without_image(ray_local, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("a.cls", b"3"), ("b.jpg", b"img"), ("b.cls", b"oops"), ("c.PNG", b"png")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-000000.tar").write_bytes(buf.getvalue())
    rows = _rows({"format": "webdataset", "path": str(tmp_path)}, "imagenet")
    assert rows == [
        {"image_id": "shard-000000.tar/a", "image": None, "label": 3},
        {"image_id": "shard-000000.tar/b", "image": b"img", "label": -1},
        {"image_id": "shard-000000.tar/c", "image": b"png", "label": -1},
    ]


def test_bad_configs(local):
    with pytest.raises(ValueError, match="needs `split`"):
        read_source(SourceConfig(format="folder", path=local["ade20k"]["folder"]["train"]["path"]), "ade20k")
    with pytest.raises(ValueError, match="only used by ade20k folder"):
        read_source(SourceConfig(format="parquet", path="x", split="training"), "ade20k")
    with pytest.raises(ValueError, match="unknown dataset"):
        read_source(SourceConfig(format="parquet", path="x"), "coco")  # type: ignore[arg-type]


def test_s3_matches_local(ray_local, _moto, local):
    bucket, endpoint = _moto
    remote = write_synthetic(f"{bucket}/synthetic", endpoint_url=endpoint, **KW)
    for dataset, formats in remote.items():
        for fmt, splits in formats.items():
            assert splits["val"]["path"].startswith("s3://")
            got = _rows(splits["val"], dataset, endpoint_url=endpoint)
            want = _rows(local[dataset][fmt]["val"], dataset)
            assert got == want, (dataset, fmt)
    limited = _rows(remote["ade20k"]["folder"]["val"], "ade20k", endpoint_url=endpoint, max_images=2)
    assert [r["image_id"] for r in limited] == ["val_000000.jpg", "val_000001.jpg"]


# ---------------------------------------------------------------------------------- manifest
def _write_manifest(path: Path, header: str, lines: list[str]) -> str:
    path.write_text("\n".join([header, *lines]) + "\n")
    return str(path)


def test_manifest_reads_what_the_folder_source_reads_and_a_missing_file_is_a_null_image(ray_local, local):
    folder = local["imagenet"]["folder"]["train"]
    by_folder = {r["image_id"]: r for r in _rows(folder, "imagenet")}
    # The manifest sits beside the split directory and lists the same files with the folder's labels.
    split_dir = Path(folder["path"])
    lines = [f"{split_dir.name}/{i},{r['label']}" for i, r in sorted(by_folder.items())]
    lines.append(f"{split_dir.name}/gone.JPEG,")  # listed, not on storage; empty label
    a_dir = f"{split_dir.name}/{next(i for i in by_folder if '/' in i).split('/')[0]}"
    lines.append(f"{a_dir},2")  # a directory is no image file either
    manifest = _write_manifest(split_dir.parent / "train.csv", "path,label", lines)
    rows = {r["image_id"]: r for r in _rows({"format": "manifest", "path": manifest}, "imagenet")}
    assert rows.pop(f"{split_dir.name}/gone.JPEG") == {"image_id": f"{split_dir.name}/gone.JPEG", "image": None,
                                                       "label": -1}
    assert rows.pop(a_dir) == {"image_id": a_dir, "image": None, "label": 2}
    with pytest.raises(RejectedImage, match="missing image"):  # how the stages record a null image
        decode_image(None, max_pixels=10**6, min_side=8)
    assert {i.split("/", 1)[1]: (r["image"], r["label"]) for i, r in rows.items()} == \
        {i: (r["image"], r["label"]) for i, r in by_folder.items()}


def test_manifest_annotations_are_paired_by_their_own_path(ray_local, local):
    ade = Path(local["ade20k"]["folder"]["train"]["path"])  # images/training, annotations/training below it
    lines = ["images/training/train_000000.jpg,annotations/training/train_000000.png",
             "images/training/train_000001.jpg,"]
    manifest = _write_manifest(ade / "m.csv", "path,mask", lines)
    rows = {r["image_id"]: r for r in _rows({"format": "manifest", "path": manifest}, "ade20k")}
    assert rows["images/training/train_000000.jpg"]["mask"] == \
        (ade / "annotations/training/train_000000.png").read_bytes()
    assert rows["images/training/train_000001.jpg"]["mask"] is None


@pytest.mark.parametrize("header, line, dataset", [
    ("path,label", "../outside.jpg,1", "imagenet"),
    ("path,label", "a/../../outside.jpg,1", "imagenet"),
    ("path,label", "/etc/hostname,1", "imagenet"),
    ("path,label", "s3://another-bucket/x.jpg,1", "imagenet"),
    ("path,label", "..,1", "imagenet"),
    ("path,mask", "a.jpg,../../masks/a.png", "ade20k"),
])
def test_a_manifest_entry_outside_the_dataset_root_fails_before_any_work(tmp_path, header, line, dataset):
    manifest = _write_manifest(tmp_path / "m.csv", header, ["fine/a.jpg," + ("1" if dataset == "imagenet" else ""),
                                                             line])
    # read_source raises while building the dataset, before a single Ray task exists.
    with pytest.raises(ValueError, match=r"1 entry outside the dataset root .* nothing was read: line 3"):
        read_source(SourceConfig(format="manifest", path=manifest), dataset)


def test_manifest_duplicates_missing_columns_and_bad_csv_are_named(tmp_path):
    cases = [
        ("path,label", ["a.jpg,1", "./a.jpg,2"], "lists 1 image.* more than once .*: a.jpg"),
        ("file,label", ["a.jpg,1"], "lacks a `path` column; it has: file, label"),
        ("path,label", ["a.jpg,one"], "is not a readable CSV"),
        ("path,label", ["a.jpg,1", ",2"], "line 3: empty path"),
    ]
    for header, lines, message in cases:
        with pytest.raises(ValueError, match=message):
            read_source(SourceConfig(format="manifest", path=_write_manifest(tmp_path / "m.csv", header, lines)),
                        "imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(SourceConfig(format="manifest", path=str(tmp_path / "absent.csv")), "imagenet")


def test_the_outside_root_rule_is_lexical():
    from scope_ray.data.sources import _outside_root

    # ".." that stays inside is fine; symlinks are followed (shared-storage farms of links are common).
    assert not _outside_root("a/b/../c.jpg") and _outside_root("a/../../c.jpg") and _outside_root("C:\\x.jpg")


# ------------------------------------------------------------------------------ parquet shards
@pytest.mark.parametrize("damage", ["truncated", "not parquet", "truncated, upper-case name"])
def test_a_damaged_parquet_shard_fails_before_any_work_naming_it(tmp_path, damage):
    for i in range(3):
        pq.write_table(pa.table({"key": [f"k{i}"], "image": [b"x"]}), tmp_path / f"part-{i:05d}.parquet")
    bad = tmp_path / "part-00001.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2] if damage.startswith("truncated") else b"<html>oops</html>")
    if damage.endswith("upper-case name"):  # Ray reads *.PARQUET too, so it is checked too
        bad = bad.rename(tmp_path / "part-00001.PARQUET")
    with pytest.raises(ValueError, match=rf"1 of 3 shard\(s\) cannot be read .* nothing was processed: {bad.name}"):
        read_source(SourceConfig(format="parquet", path=str(tmp_path)), "imagenet")


def test_a_parquet_source_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(SourceConfig(format="parquet", path=str(tmp_path / "absent")), "imagenet")


# ------------------------------------------------------------------ bounded reading (issue 14)
def test_parquet_zero_rows_and_a_bad_later_shard_fail_before_any_work_naming_it(tmp_path):
    """No Ray needed: the checks run on the driver, before the dataset is built."""
    good = pa.table({"key": ["a"], "image": [b"x"], "label": [1]})
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(good.slice(0, 0), empty / "part-0.parquet")
    with pytest.raises(ValueError, match="hold no rows; nothing to process"):
        read_source(SourceConfig(format="parquet", path=str(empty)), "imagenet")
    for name, second, problem in [
        ("no_image", pa.table({"key": ["b"], "label": [2]}), "no column 'image'"),
        ("str_label", pa.table({"key": ["b"], "image": [b"y"], "label": ["two"]}), "label is string, not an integer"),
    ]:
        (tmp_path / name).mkdir()
        pq.write_table(good, tmp_path / name / "part-0.parquet")
        pq.write_table(second, tmp_path / name / "part-1.parquet")
        with pytest.raises(ValueError, match=f"shard 'part-1.parquet': {problem}; nothing was processed"):
            read_source(SourceConfig(format="parquet", path=str(tmp_path / name)), "imagenet")


def test_unreadable_files_are_rejects_with_reasons_and_the_split_goes_on(ray_local, tmp_path):
    """One read through Ray: a non-UTF-8 name, a symlink out of the root, a file over
    max_file_bytes, a '_'-prefixed class folder, and a .tar member over the limit."""
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    root = tmp_path / "folder"
    for d in ("c1", "_c2"):
        (root / d).mkdir(parents=True)
    (root / "c1" / "a.png").write_bytes(png)
    (root / "_c2" / "b.png").write_bytes(png)
    (root / "c1" / "big.png").write_bytes(png + b"\0" * 4096)
    with open(os.fsencode(str(root / "c1")) + b"/bad\xff.png", "wb") as fh:
        fh.write(png)
    (tmp_path / "secret.txt").write_bytes(b"not yours")
    (root / "c1" / "link.png").symlink_to(tmp_path / "secret.txt")
    fields = {"format": "folder", "path": str(root), "max_file_bytes": 2048}
    rows = {r["image_id"]: r for r in _rows(fields, "imagenet")}
    assert sorted(rows) == ["_c2/b.png", "c1/a.png", "c1/bad\\xff.png", "c1/big.png", "c1/link.png"]
    assert rows["_c2/b.png"]["label"] == 0 and rows["c1/a.png"]["label"] == 1  # "_c2" is a class
    reasons = {}
    for image_id, row in rows.items():
        try:
            decode_image(row["image"], max_pixels=10**6, min_side=8)
        except RejectedImage as exc:
            reasons[image_id] = exc.reason
    assert reasons == {
        "c1/bad\\xff.png": "file name is not valid UTF-8",
        "c1/big.png": f"file too large: {len(png) + 4096} bytes > max_file_bytes 2048",
        "c1/link.png": f"outside the dataset root: resolves to {str(tmp_path / 'secret.txt')!r} "
                       "(allow_links_outside_root is off)",
    }
    opted_in = {r["image_id"]: r for r in _rows({**fields, "allow_links_outside_root": True}, "imagenet")}
    assert opted_in["c1/link.png"]["image"] == b"not yours"

    wds = tmp_path / "wds"
    wds.mkdir()
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tar:
        for name, data in [("a.png", png), ("a.cls", b"3"), ("b.png", png + b"\0" * 4096), ("c.png", png)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (wds / "shard-0.tar").write_bytes(tbuf.getvalue())
    rows = _rows({"format": "webdataset", "path": str(wds), "max_file_bytes": 2048}, "imagenet")
    assert [r["image_id"] for r in rows] == ["shard-0.tar/a", "shard-0.tar/b", "shard-0.tar/c"]
    assert rows[0]["image"] == png and rows[0]["label"] == 3 and rows[2]["image"] == png
    with pytest.raises(RejectedImage, match="^tar member 'b.png' too large: .* > max_file_bytes 2048$"):
        decode_image(rows[1]["image"])

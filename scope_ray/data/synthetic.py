"""Small learnable datasets made on the spot: shape scenes with a class, a segmentation mask and depth.

Pure (no Ray). Tests and the demo need ImageNet-, ADE20K- and NYUd-shaped data without a
download; one scene generator feeds all three, and ``write_synthetic`` lays each out in the
three storage formats of docs/data.md. The same seed gives byte-identical files.

A scene: a background plane far away (depth 6..10 m, nearer towards the bottom like a floor)
and 1-3 shapes, each a fronto-parallel plane at its own depth in 0.5..5 m, painted far to near
so nearer shapes occlude farther ones. A shape's class fixes its form (circle / rectangle /
triangle), its hue and its stripe texture, so the classes are learnable from pixels.
"""

from __future__ import annotations

import colorsys
import io
import posixpath
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from scope_ray.storage import fsspec_filesystem, join_uri, split_uri

DATASETS = ("imagenet", "ade20k", "nyud")
FORMATS = ("folder", "parquet", "webdataset")
ADE_SPLIT_DIRS = {"train": "training", "val": "validation"}  # the ADEChallengeData2016 names
JPEG_QUALITY = 90
NEAR_M, FAR_M = 0.5, 10.0
INVALID_BORDER_PX = 2  # NYUd-style: the depth PNG's leftmost columns are 0 (= invalid)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [S, S, 3] uint8 RGB
    label: int  # image class: the class of the shape with the most visible pixels
    mask: np.ndarray  # [S, S] uint8, ADE20K release encoding: 0 = background, c+1 = shape class c
    depth: np.ndarray  # [S, S] float32 metres, no NaN, in [NEAR_M, FAR_M]


def wnid(c: int) -> str:
    """ImageNet-style synset id of synthetic class ``c``."""
    return f"n{c:08d}"


def _class_colour(c: int, num_classes: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((c / max(num_classes, 1)) % 1.0, 0.85, 0.95)
    return np.array([r, g, b], dtype=np.float32) * 255


def _shape_mask(kind: int, cy: float, cx: float, r: float, y_SS: np.ndarray, x_SS: np.ndarray) -> np.ndarray:
    if kind == 0:  # circle
        return (y_SS - cy) ** 2 + (x_SS - cx) ** 2 <= r * r
    if kind == 1:  # axis-aligned rectangle, wider than tall
        return (np.abs(y_SS - cy) <= 0.7 * r) & (np.abs(x_SS - cx) <= r)
    # upward triangle: inside all three half-planes
    ay, ax, by, bx, qy, qx = cy - r, cx, cy + r, cx - r, cy + r, cx + r
    def side(py, px, qy_, qx_):
        return (x_SS - px) * (qy_ - py) - (y_SS - py) * (qx_ - px)
    s1, s2, s3 = side(ay, ax, by, bx), side(by, bx, qy, qx), side(qy, qx, ay, ax)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def make_scene(rng: np.random.Generator, size: int, num_classes: int) -> Scene:
    if not 1 <= num_classes <= 150:  # the ADE20K release encoding has room for 150 classes
        raise ValueError(f"num_classes must be in 1..150, got {num_classes}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    y_SS, x_SS = np.mgrid[0:size, 0:size].astype(np.float32)
    v_SS = y_SS / max(size - 1, 1)
    # Background: a vertical colour gradient and a far plane that comes nearer towards the bottom.
    top, bottom = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    image_SS3 = top * (1 - v_SS[..., None]) + bottom * v_SS[..., None]
    far = rng.uniform(8.0, FAR_M)
    depth_SS = far - (far - 6.0) * v_SS
    mask_SS = np.zeros((size, size), dtype=np.uint8)

    n_shapes = int(rng.integers(1, 4))
    classes = rng.integers(0, num_classes, n_shapes)
    depths = np.sort(rng.uniform(NEAR_M, 5.0, n_shapes))[::-1]  # far first: painter's order
    for c, d in zip(classes, depths):
        c = int(c)
        r = rng.uniform(0.15, 0.35) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        inside_SS = _shape_mask(c % 3, cy, cx, r, y_SS, x_SS)
        # Stripes whose period and direction depend on the class: texture as well as colour.
        period = 3 + (c // 3) % 5
        along = x_SS if (c // 15) % 2 == 0 else y_SS
        stripe_SS = ((along // period) % 2).astype(np.float32)
        colour_SS3 = _class_colour(c, num_classes) * (0.75 + 0.25 * stripe_SS[..., None])
        image_SS3 = np.where(inside_SS[..., None], colour_SS3, image_SS3)
        mask_SS[inside_SS] = c + 1
        depth_SS = np.where(inside_SS, np.float32(d), depth_SS)

    image_SS3 = image_SS3 + rng.normal(0, 6, image_SS3.shape)  # sensor noise: no two pixels alike
    counts = np.bincount(mask_SS.ravel(), minlength=num_classes + 1)[1:]
    return Scene(
        image=np.clip(np.rint(image_SS3), 0, 255).astype(np.uint8),
        label=int(np.argmax(counts)),
        mask=mask_SS,
        depth=np.clip(depth_SS, NEAR_M, FAR_M).astype(np.float32),
    )


# ----------------------------------------------------------------------------------- encoding
def _jpeg(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_HW3).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def depth_png(depth_HW: np.ndarray) -> bytes:
    """Metres → 16-bit PNG in millimetres; NaN and the left border become 0 (invalid)."""
    mm_HW = np.nan_to_num(np.rint(depth_HW * 1000.0), nan=0.0)
    mm_HW = np.clip(mm_HW, 0, 65535).astype(np.uint16)
    mm_HW[:, :INVALID_BORDER_PX] = 0
    return _png(mm_HW)


@dataclass(frozen=True)
class _Sample:
    key: str
    image: bytes
    image_ext: str  # "jpg" or "png"
    label: int
    mask: bytes  # PNG, release encoding
    depth: bytes  # 16-bit PNG, mm


def _samples(dataset: str, split: str, n: int, size: int, num_classes: int, seed: int) -> list[_Sample]:
    # One stream per (dataset, split): adding a split or a dataset never changes another's images.
    rng = np.random.default_rng([seed, DATASETS.index(dataset), 0 if split == "train" else 1])
    out = []
    for i in range(n):
        s = make_scene(rng, size, num_classes)
        ext = "png" if dataset == "nyud" else "jpg"
        out.append(_Sample(
            key=f"{split}_{i:06d}",
            image=_png(s.image) if ext == "png" else _jpeg(s.image),
            image_ext=ext,
            label=s.label,
            mask=_png(s.mask) if dataset == "ade20k" else b"",
            depth=depth_png(s.depth) if dataset == "nyud" else b"",
        ))
    return out


# ------------------------------------------------------------------------------------ layouts
def _folder_files(dataset: str, split: str, samples: list[_Sample], num_classes: int) -> tuple[dict[str, bytes], dict]:
    """Relative path → bytes under ROOT/<dataset>/folder, and the SourceConfig fields."""
    files: dict[str, bytes] = {}
    if dataset == "imagenet":
        files["classes.txt"] = "".join(wnid(c) + "\n" for c in range(num_classes)).encode()
        for s in samples:
            files[f"{split}/{wnid(s.label)}/{s.key}.JPEG"] = s.image
        return files, {"format": "folder", "path": split}
    if dataset == "ade20k":
        d = ADE_SPLIT_DIRS[split]
        for s in samples:
            files[f"images/{d}/{s.key}.jpg"] = s.image
            files[f"annotations/{d}/{s.key}.png"] = s.mask
        return files, {"format": "folder", "path": "", "split": d}
    for s in samples:
        files[f"{split}/images/{s.key}.png"] = s.image
        files[f"{split}/depth/{s.key}.png"] = s.depth
    return files, {"format": "folder", "path": split}


def _shards(samples: list[_Sample], per_shard: int) -> Iterable[tuple[int, list[_Sample]]]:
    for i in range(0, len(samples), per_shard):
        yield i // per_shard, samples[i : i + per_shard]


def _parquet_bytes(dataset: str, samples: list[_Sample]) -> bytes:
    cols = {"key": pa.array([s.key for s in samples], pa.string()),
            "image": pa.array([s.image for s in samples], pa.binary())}
    if dataset == "imagenet":
        cols["label"] = pa.array([s.label for s in samples], pa.int64())
    elif dataset == "ade20k":
        cols["mask"] = pa.array([s.mask for s in samples], pa.binary())
    else:
        cols["depth"] = pa.array([s.depth for s in samples], pa.binary())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="none")  # images are compressed already
    return buf.getvalue()


def _tar_bytes(dataset: str, samples: list[_Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:  # a sample's members are contiguous, as WebDataset requires
            members = {s.image_ext: s.image}
            if dataset == "imagenet":
                members["cls"] = str(s.label).encode("ascii")
            elif dataset == "ade20k":
                members["seg.png"] = s.mask
            else:
                members["depth.png"] = s.depth
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{s.key}.{suffix}")
                # Fixed metadata: the archive depends on the content only, never on who/when.
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _put_all(root_uri: str, files: dict[str, bytes], endpoint_url: str | None) -> None:
    fs, root = fsspec_filesystem(root_uri, endpoint_url)
    full = {posixpath.join(root, rel): data for rel, data in files.items()}
    if split_uri(root_uri)[0] == "file":  # object stores have no directories to make
        for parent in sorted({posixpath.dirname(p) for p in full}):
            fs.makedirs(parent, exist_ok=True)
    fs.pipe(full)  # s3fs uploads a dict of files concurrently


def _source(root_uri: str, dataset: str, fmt: str, split: str) -> dict:
    return {"format": fmt, "path": join_uri(root_uri, dataset, fmt, split)}


def write_image_folder(dest_uri: str, images: dict[str, bytes], endpoint_url: str | None = None) -> None:
    """Drop ``relative/path → bytes`` files (good or bad) into a folder dataset."""
    _put_all(dest_uri, dict(images), endpoint_url)


def write_synthetic(
    root_uri: str,
    *,
    n_train: int,
    n_val: int,
    size: int = 112,
    num_classes: int = 10,
    seed: int = 0,
    formats: Iterable[str] = FORMATS,
    endpoint_url: str | None = None,
    images_per_shard: int = 64,
    counts: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, dict[str, dict[str, dict]]]:
    """Write ImageNet-, ADE20K- and NYUd-style datasets; return
    ``{dataset: {format: {split: SourceConfig fields}}}`` (splits with 0 images are left out).

    ``counts`` overrides (n_train, n_val) per dataset name, e.g. fewer dense-task images."""
    formats = tuple(formats)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; allowed: {', '.join(FORMATS)}")
    if images_per_shard < 1:
        raise ValueError("images_per_shard must be >= 1")
    unknown = set(counts or {}) - set(DATASETS)
    if unknown:
        raise ValueError(f"counts for unknown datasets {sorted(unknown)}; allowed: {', '.join(DATASETS)}")
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for dataset in DATASETS:
        out[dataset] = {f: {} for f in formats}
        files: dict[str, bytes] = {}
        train_n, val_n = (counts or {}).get(dataset, (n_train, n_val))
        for split, n in (("train", train_n), ("val", val_n)):
            if n <= 0:
                continue
            samples = _samples(dataset, split, n, size, num_classes, seed)
            if "folder" in formats:
                rel, src = _folder_files(dataset, split, samples, num_classes)
                files.update({f"folder/{p}": b for p, b in rel.items()})
                src["path"] = join_uri(root_uri, dataset, "folder", src["path"]).rstrip("/")
                out[dataset]["folder"][split] = src
            if "parquet" in formats:
                for i, shard in _shards(samples, images_per_shard):
                    files[f"parquet/{split}/part-{i:05d}.parquet"] = _parquet_bytes(dataset, shard)
                out[dataset]["parquet"][split] = _source(root_uri, dataset, "parquet", split)
            if "webdataset" in formats:
                for i, shard in _shards(samples, images_per_shard):
                    files[f"webdataset/{split}/shard-{i:06d}.tar"] = _tar_bytes(dataset, shard)
                out[dataset]["webdataset"][split] = _source(root_uri, dataset, "webdataset", split)
        _put_all(join_uri(root_uri, dataset), files, endpoint_url)
    return out

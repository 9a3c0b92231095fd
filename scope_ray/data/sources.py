"""Where Ray Data enters: one dataset split in any storage format → a lazy, streaming Dataset.

Every source yields the same columns (docs/data.md is the reference):
    image_id  string   unique and stable across runs (see ``_id`` helpers below)
    image     binary   encoded bytes as stored; null/empty allowed, ``decode_image`` rejects them
    label     int64    imagenet only; -1 = no label
    mask      binary   ade20k only; annotation PNG in the release encoding, null = missing
    depth     binary   nyud only; 16-bit PNG in millimetres, null = missing
Nothing is decoded or filtered by file extension here: a stray file must reach the decoder and
become a recorded reject, not vanish. Nothing is materialised either: the driver only lists files
(and reads one Parquet footer or ``classes.txt``); the rest runs in Ray tasks as rows stream.
"""

from __future__ import annotations

import collections
import functools
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from scope_ray.config import SourceConfig
from scope_ray.storage import arrow_filesystem, fsspec_filesystem, join_uri, split_uri

DatasetName = Literal["imagenet", "ade20k", "nyud"]
TARGET_COLUMN: dict[str, str] = {"imagenet": "label", "ade20k": "mask", "nyud": "depth"}
CLASSES_FILE = "classes.txt"
# WebDataset member suffixes taken as the image, in order of preference (lower-cased).
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
WDS_TARGET_SUFFIX = {"imagenet": "cls", "ade20k": "seg.png", "nyud": "depth.png"}
_ANNOTATION_READ_THREADS = 16  # paired-file reads are latency-bound on object stores
_MANIFEST_BLOCK_ROWS = 256  # rows of a manifest per Ray block (one read task each)


def output_schema(dataset: DatasetName) -> pa.Schema:
    target = pa.field("label", pa.int64()) if dataset == "imagenet" else pa.field(TARGET_COLUMN[dataset], pa.binary())
    return pa.schema([pa.field("image_id", pa.string()), pa.field("image", pa.binary()), target])


def read_source(
    source: SourceConfig,
    dataset: DatasetName,
    *,
    endpoint_url: str | None = None,
    ordered: bool = True,
    num_cpus: float | None = None,
) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Dataset of ``source``'s rows (columns: ``output_schema(dataset)``).

    ``ordered`` turns on Ray's ``preserve_order`` for this dataset and everything derived from it:
    rows then arrive in file order (files sorted by path) and ``max_images`` picks the same
    images on every run. Without it Ray emits blocks as tasks finish.
    ``num_cpus`` is what each read task reserves (Ray's default is 1): reading is I/O-bound, and
    on a small node a whole CPU per read task starves the decoding and model stages behind it.
    """
    if dataset not in TARGET_COLUMN:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(TARGET_COLUMN)}")
    if source.split is not None and not (source.format == "folder" and dataset == "ade20k"):
        raise ValueError(f"source {source.path!r}: `split` is only used by ade20k folder sources "
                         f"(images/<split>/, annotations/<split>/); leave it unset for {dataset} {source.format}")
    if source.format in ("folder", "webdataset"):
        # Parquet and manifest sources check their files below; these two would otherwise only
        # find out inside a read task, after the caller has started work.
        _require_exists(source.path, endpoint_url)
    if source.format == "folder":
        ds = _read_folder(source, dataset, endpoint_url, num_cpus)
    elif source.format == "parquet":
        ds = _read_parquet(source, dataset, endpoint_url, num_cpus)
    elif source.format == "webdataset":
        ds = _read_webdataset(source, dataset, endpoint_url, num_cpus)
    elif source.format == "manifest":
        ds = _read_manifest(source, dataset, endpoint_url, num_cpus)
    else:  # pragma: no cover - SourceConfig's Literal makes this unreachable
        raise ValueError(f"unknown source format {source.format!r}")
    if ordered:
        # The context object is this dataset's own copy, shared with datasets derived from it.
        ds.context.execution_options.preserve_order = True
    if source.max_images is not None:
        ds = ds.limit(source.max_images)
    return ds


def _require_exists(uri: str, endpoint_url: str | None) -> None:
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {uri!r} does not exist (a typo in the path?)")


def _remote(num_cpus: float | None) -> dict[str, float]:
    return {} if num_cpus is None else {"num_cpus": num_cpus}


def _table(dataset: str, ids: Any, images: Any, target: Any) -> pa.Table:
    schema = output_schema(dataset)
    cols = [pa.array(c, type=f.type) if isinstance(c, list) else c.cast(f.type)
            for c, f in zip((ids, images, target), schema)]
    return pa.Table.from_arrays(cols, schema=schema)


# ------------------------------------------------------------------------------------ folder
def _folder_roots(source: SourceConfig, dataset: str) -> tuple[str, str | None]:
    """(URI of the directory holding the images, URI of the paired annotation directory)."""
    if dataset == "imagenet":
        return source.path, None
    if dataset == "ade20k":
        if not source.split:
            raise ValueError(f"ade20k folder source {source.path!r} needs `split` (e.g. training, validation): "
                             "the release layout is images/<split>/ and annotations/<split>/")
        return join_uri(source.path, "images", source.split), join_uri(source.path, "annotations", source.split)
    return join_uri(source.path, "images"), join_uri(source.path, "depth")


def imagenet_class_index(image_root: str, endpoint_url: str | None = None) -> dict[str, int]:
    """wnid → label: the line order of ``classes.txt`` (in the split directory or beside it),
    else the sorted names of the split's sub-directories."""
    fs, root = fsspec_filesystem(image_root, endpoint_url)
    parent = posixpath.dirname(root)
    for candidate in [posixpath.join(root, CLASSES_FILE)] + ([posixpath.join(parent, CLASSES_FILE)] if parent else []):
        try:
            text = fs.cat_file(candidate).decode("utf-8")
        except FileNotFoundError:
            continue
        index: dict[str, int] = {}
        for line in text.splitlines():
            # First token only: also reads LOC_synset_mapping.txt-style "n01440764 tench, Tinca tinca".
            if line.strip() and not line.lstrip().startswith("#"):
                index.setdefault(line.split()[0], len(index))
        return index
    names = sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True) if e.get("type") == "directory"
    )
    return {n: i for i, n in enumerate(n for n in names if not n.startswith((".", "_")))}


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return parts[-1] == CLASSES_FILE or any(p.startswith(".") for p in parts)


@functools.lru_cache(maxsize=8)
def _cached_fs(uri: str, endpoint_url: str | None):
    return fsspec_filesystem(uri, endpoint_url)


def _read_or_none(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        # A missing annotation (or image a manifest lists) is data, not an error: it becomes a
        # recorded reject. A listed directory is no file either.
        return None


def _folder_batch(batch: pa.Table, *, dataset: str, root: str, class_index: dict[str, int],
                  target_root: str | None, endpoint_url: str | None) -> pa.Table:
    prefix = root.rstrip("/") + "/"
    paths = batch.column("path").to_pylist()
    rels = [p[len(prefix):] if p.startswith(prefix) else posixpath.basename(p) for p in paths]
    keep = [i for i, rel in enumerate(rels) if not _skipped(rel)]
    rels = [rels[i] for i in keep]
    images = batch.column("bytes").take(pa.array(keep, pa.int64()))
    if dataset == "imagenet":
        target: Any = [class_index.get(rel.split("/")[0], -1) if "/" in rel else -1 for rel in rels]
    else:
        fs, troot = _cached_fs(target_root, endpoint_url)
        paths = [posixpath.join(troot, posixpath.splitext(rel)[0] + ".png") for rel in rels]
        with ThreadPoolExecutor(min(_ANNOTATION_READ_THREADS, max(len(paths), 1))) as pool:
            target = list(pool.map(functools.partial(_read_or_none, fs), paths))
    return _table(dataset, rels, images, target)


def _read_folder(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    image_root, target_root = _folder_roots(source, dataset)
    class_index = imagenet_class_index(image_root, endpoint_url) if dataset == "imagenet" else {}
    fs, path = arrow_filesystem(image_root, endpoint_url)
    # No file_extensions filter on purpose (module docstring). Ray sorts the listed paths and
    # skips names starting with "." or "_" directly under `path`.
    ds = ray.data.read_binary_files(path, filesystem=fs, include_paths=True, **_remote(num_cpus))
    return ds.map_batches(
        _folder_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **_remote(num_cpus),
        fn_kwargs=dict(dataset=dataset, root=path, class_index=class_index, target_root=target_root,
                       endpoint_url=endpoint_url),
    )


# ----------------------------------------------------------------------------------- parquet
def _binary_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Plain binary, or the ``struct<bytes, path>`` that Hugging Face datasets write for images."""
    if pa.types.is_struct(col.type):
        return pc.struct_field(col, "bytes")
    return col


def _parquet_batch(batch: pa.Table, *, dataset: str) -> pa.Table:
    n = batch.num_rows
    target_name = TARGET_COLUMN[dataset]
    if target_name in batch.column_names:
        target = batch.column(target_name)
        target = pc.fill_null(target.cast(pa.int64()), -1) if dataset == "imagenet" else _binary_column(target)
    else:
        target = pa.array([-1] * n, pa.int64()) if dataset == "imagenet" else pa.nulls(n, pa.binary())
    return _table(dataset, batch.column("key").cast(pa.string()), _binary_column(batch.column("image")), target)


def _read_parquet(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import pyarrow.dataset as pads
    import ray.data

    fs, path = arrow_filesystem(source.path, endpoint_url)
    # Every shard's footer is read on the driver, before any Ray work: a truncated or foreign
    # file would otherwise fail one read task deep into the stage, after the shards before it
    # were processed. The first footer also gives the schema for the column check.
    names = _checked_parquet_schema(source.path, path, fs).names
    target = TARGET_COLUMN[dataset]
    missing = [c for c in ("key", "image") if c not in names]
    if missing:
        raise ValueError(
            f"parquet source {source.path!r} lacks column(s) {', '.join(missing)}; it has: {', '.join(names)}. "
            f"A {dataset} shard needs key (string id), image (encoded bytes) and {target} (see docs/data.md)"
        )
    columns = ["key", "image"] + ([target] if target in names else [])
    # select_columns right after the read is pushed down into it: other columns are never read.
    ds = ray.data.read_parquet(path, filesystem=fs, **_remote(num_cpus)).select_columns(columns)
    return ds.map_batches(_parquet_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **_remote(num_cpus),
                          fn_kwargs=dict(dataset=dataset))


def _checked_parquet_schema(uri: str, path: str, fs) -> pa.Schema:
    """The schema of the first shard under ``path``, after checking every shard's footer."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"parquet source {uri!r} does not exist")
    if kind == pafs.FileType.Directory:
        # The files Ray's read_parquet reads: *.parquet in any case, skipping names that start with "." or "_".
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(".parquet")
                       and not any(p.startswith((".", "_")) for p in i.path[len(path):].split("/") if p))
    else:
        files = [path]
    if not files:
        raise ValueError(f"parquet source {uri!r} holds no .parquet files")

    def footer(f: str) -> str | Exception:
        try:
            with fs.open_input_file(f) as fh:
                return pq.ParquetFile(fh).schema_arrow
        except Exception as exc:  # noqa: BLE001 - any unreadable footer is reported by name below
            return exc

    with ThreadPoolExecutor(min(_ANNOTATION_READ_THREADS, len(files))) as pool:
        footers = list(pool.map(footer, files))
    bad = [(f, r) for f, r in zip(files, footers) if isinstance(r, Exception)]
    if bad:
        listed = "; ".join(f"{posixpath.basename(f)}: {type(e).__name__}: {str(e).splitlines()[0]}" for f, e in bad[:5])
        raise ValueError(
            f"parquet source {uri!r}: {len(bad)} of {len(files)} shard(s) cannot be read (truncated or not Parquet), "
            f"nothing was processed: {listed}{' ...' if len(bad) > 5 else ''}. Re-write or remove them"
        )
    return footers[0]


# ---------------------------------------------------------------------------------- manifest
def _outside_root(rel: str) -> bool:
    """True when a manifest path would leave the dataset root (or is not a plain relative path)."""
    if not rel or rel.startswith(("/", "\\")) or "://" in rel or "\\" in rel:
        return True
    norm = posixpath.normpath(rel)
    return norm == ".." or norm.startswith("../") or norm == "."


def read_manifest(source: SourceConfig, dataset: str, endpoint_url: str | None = None) -> tuple[pa.Table, str]:
    """Load and validate a manifest CSV on the driver: ``(rows, dataset root URI)``.

    Columns: ``path`` (required: image file relative to the manifest's directory), and the
    target: ``label`` (ImageNet, integer, empty = -1) or ``mask`` / ``depth`` (annotation file,
    relative like ``path``; empty = missing). Any path that is absolute, carries a scheme, or
    climbs out of the root with ``..`` fails the whole source before any work: a manifest is a
    definition of the dataset, and one that points elsewhere is wrong or hostile, not data.
    """
    import io

    import pyarrow.csv as pacsv

    fs, mpath = fsspec_filesystem(source.path, endpoint_url)
    try:
        raw = fs.cat_file(mpath)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {source.path!r} does not exist") from None
    target = TARGET_COLUMN[dataset]
    types = {"path": pa.string(), target: pa.int64() if dataset == "imagenet" else pa.string()}
    try:
        table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"manifest {source.path!r} is not a readable CSV: {exc}") from None
    if "path" not in table.column_names:
        raise ValueError(f"manifest {source.path!r} lacks a `path` column; it has: {', '.join(table.column_names)}")
    checked = ["path"] + ([target] if dataset != "imagenet" and target in table.column_names else [])
    escapes = []
    for col in checked:
        for line, rel in enumerate(table.column(col).to_pylist(), start=2):  # line 1 is the header
            if rel is None and col == "path":
                escapes.append(f"line {line}: empty path")
            elif rel is not None and _outside_root(rel):
                escapes.append(f"line {line}: {col} {rel!r}")
    if escapes:
        raise ValueError(
            f"manifest {source.path!r}: {len(escapes)} entr{'y' if len(escapes) == 1 else 'ies'} outside the dataset "
            f"root (paths must be relative to the manifest's directory and stay inside it), nothing was read: "
            + "; ".join(escapes[:5]) + (" ..." if len(escapes) > 5 else "")
        )
    ids = [posixpath.normpath(p) for p in table.column("path").to_pylist()]
    counts = collections.Counter(ids)
    twice = sorted(i for i, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"manifest {source.path!r} lists {len(twice)} image(s) more than once (each would be counted "
                         f"more than once), nothing was read: {', '.join(twice[:5])}")
    if target in table.column_names:
        tcol = table.column(target)
        tcol = pc.fill_null(tcol, -1) if dataset == "imagenet" else tcol
    else:
        tcol = pa.array([-1] * len(ids), pa.int64()) if dataset == "imagenet" else pa.nulls(len(ids), pa.string())
    scheme, path = split_uri(source.path)
    root = posixpath.dirname(path)
    return pa.table({"image_id": pa.array(ids, pa.string()), "target": tcol}), f"s3://{root}" if scheme == "s3" else root


def _manifest_batch(batch: pa.Table, *, dataset: str, root: str, endpoint_url: str | None) -> pa.Table:
    fs, froot = _cached_fs(root, endpoint_url)
    ids = batch.column("image_id").to_pylist()
    with ThreadPoolExecutor(min(_ANNOTATION_READ_THREADS, max(len(ids), 1))) as pool:
        # A listed file that is missing becomes a null image: a recorded reject, not an error.
        images = list(pool.map(functools.partial(_read_or_none, fs), [posixpath.join(froot, i) for i in ids]))
        if dataset == "imagenet":
            target: Any = batch.column("target")
        else:
            rels = batch.column("target").to_pylist()
            target = list(pool.map(lambda r: None if r is None else _read_or_none(fs, posixpath.join(froot, r)), rels))
    return _table(dataset, ids, images, target)


def _read_manifest(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    rows, root = read_manifest(source, dataset, endpoint_url)
    # Many small blocks, so that reading the files spreads over tasks as the rows stream.
    blocks = [rows.slice(i, _MANIFEST_BLOCK_ROWS) for i in range(0, rows.num_rows, _MANIFEST_BLOCK_ROWS)] or [rows]
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(_manifest_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          **_remote(num_cpus), fn_kwargs=dict(dataset=dataset, root=root, endpoint_url=endpoint_url))


# -------------------------------------------------------------------------------- webdataset
def _wds_sample(sample: dict[str, Any], *, dataset: str) -> dict[str, Any]:
    """Ray's per-sample decoder hook, used only to pick raw members: no member is ever decoded
    (no pickle, no torch.load), and every sample gets the same keys so no column is NaN-filled."""
    members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
    image = next((members[s] for s in WDS_IMAGE_SUFFIXES if s in members), None)
    out = {"__key__": sample["__key__"], "__url__": sample.get("__url__", ""), "image": image}
    raw = members.get(WDS_TARGET_SUFFIX[dataset])
    if dataset == "imagenet":
        try:
            out["label"] = int(raw.decode("ascii").strip()) if raw is not None else -1
        except (UnicodeDecodeError, ValueError):
            out["label"] = -1  # an unreadable class file counts as "no label"
    else:
        out[TARGET_COLUMN[dataset]] = raw
    return out


def _wds_batch(batch: pa.Table, *, dataset: str) -> pa.Table:
    urls, keys = batch.column("__url__").to_pylist(), batch.column("__key__").to_pylist()
    ids = [f"{posixpath.basename(u)}/{k}" for u, k in zip(urls, keys)]
    target = batch.column(TARGET_COLUMN[dataset])
    return _table(dataset, ids, batch.column("image"), target)


def _read_webdataset(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    fs, path = arrow_filesystem(source.path, endpoint_url)
    ds = ray.data.read_webdataset(
        path, filesystem=fs, file_extensions=["tar"], **_remote(num_cpus),
        decoder=functools.partial(_wds_sample, dataset=dataset),
    )
    return ds.map_batches(_wds_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **_remote(num_cpus),
                          fn_kwargs=dict(dataset=dataset))

"""Where Ray Data enters: one dataset split in any storage format → a lazy, streaming Dataset.

Every source yields the same columns (docs/data.md is the reference):
    image_id  string   unique and stable across runs (see ``_id`` helpers below)
    image     binary   encoded bytes as stored; null/empty allowed, ``decode_image`` rejects them
    label     int64    imagenet only; -1 = no label
    mask      binary   ade20k only; annotation PNG in the release encoding, null = missing
    depth     binary   nyud only; 16-bit PNG in millimetres, null = missing
Nothing is decoded or filtered by file extension here: a stray file must reach the decoder and
become a recorded reject, not vanish. Nothing is materialised either: the driver only lists files
(and reads Parquet footers or ``classes.txt``); the rest runs in Ray tasks as rows stream.
Every file and tar member is read within bounds (scope_ray/data/reading.py): its size is checked
before it is read, a local file's resolved path must stay under the dataset root, and a name that
is not UTF-8 is a reject; each of these reaches the decoder as a reject with its reason.
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
from scope_ray.data.images import source_reject
from scope_ray.data.reading import is_local, read_bounded, readable_name, tar_samples
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
    # "_"-prefixed folders are classes like any other (they used to vanish uncounted); only
    # hidden "." folders are not, as they are not listed for reading either.
    return {n: i for i, n in enumerate(n for n in names if not n.startswith("."))}


def _skipped(name: str) -> bool:
    """Hidden files and folders ('.DS_Store', '.ipynb_checkpoints') and the class list are not images."""
    return name.startswith(".") or name == CLASSES_FILE


def _list_folder(fs, root: str) -> list[tuple[str, str | None]]:
    """Sorted ``(image id = path under root, reject reason or None)`` of every file under ``root``.

    Listed here rather than by Ray so that a name that is not UTF-8 is a reject (pyarrow's
    listing raised UnicodeDecodeError, which stopped the whole split) and "_"-prefixed names are
    read (Ray skips them). Local listing follows links to folders, once per resolved folder (a
    link cycle ends); where a file resolves to is checked when it is read.
    """
    import os

    out: list[tuple[str, str | None]] = []
    if is_local(fs):
        base = os.fsencode(root.rstrip("/"))
        visited: set[bytes] = set()
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
            rel_dir = os.path.relpath(dirpath, base)
            for name in filenames:
                if name.startswith(b"."):
                    continue
                rel, reason = readable_name(name if rel_dir == b"." else rel_dir + b"/" + name)
                if reason is None and _skipped(posixpath.basename(rel)):
                    continue
                out.append((rel, reason))
    else:
        prefix = root.rstrip("/") + "/"
        for path in fs.find(root):
            rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
            if not any(_skipped(p) for p in rel.split("/")):
                out.append((rel, None))
    return sorted(out)


@functools.lru_cache(maxsize=8)
def _cached_fs(uri: str, endpoint_url: str | None):
    return fsspec_filesystem(uri, endpoint_url)


def _reader(source: SourceConfig, root: str, endpoint_url: str | None):
    """``path → bytes | None | source_reject`` for files of ``source`` under the dataset ``root``."""
    fs, froot = _cached_fs(root, endpoint_url)
    confine = None if source.allow_links_outside_root else froot
    return functools.partial(_read_file, fs, max_bytes=source.max_file_bytes, root=confine)


def _read_file(fs, path: str, *, max_bytes: int, root: str | None) -> bytes | None:
    return read_bounded(fs, path, max_bytes=max_bytes, root=root)


def _folder_batch(batch: pa.Table, *, dataset: str, source: SourceConfig, image_root: str, class_index: dict[str, int],
                  target_root: str | None, endpoint_url: str | None) -> pa.Table:
    rels = batch.column("image_id").to_pylist()
    reasons = batch.column("reason").to_pylist()
    read = _reader(source, source.path, endpoint_url)
    _, iroot = _cached_fs(image_root, endpoint_url)
    with ThreadPoolExecutor(min(_ANNOTATION_READ_THREADS, max(len(rels), 1))) as pool:
        images = list(pool.map(lambda r, why: source_reject(why) if why else read(posixpath.join(iroot, r)),
                               rels, reasons))
        if dataset == "imagenet":
            target: Any = [class_index.get(rel.split("/")[0], -1) if "/" in rel else -1 for rel in rels]
        else:
            _, troot = _cached_fs(target_root, endpoint_url)
            paths = [posixpath.join(troot, posixpath.splitext(rel)[0] + ".png") for rel in rels]
            target = list(pool.map(read, paths))
    return _table(dataset, rels, images, target)


def _read_folder(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    image_root, target_root = _folder_roots(source, dataset)
    class_index = imagenet_class_index(image_root, endpoint_url) if dataset == "imagenet" else {}
    fs, path = _cached_fs(image_root, endpoint_url)
    # No file_extensions filter on purpose (module docstring).
    listed = _list_folder(fs, path)
    rows = pa.table({"image_id": pa.array([r for r, _ in listed], pa.string()),
                     "reason": pa.array([why for _, why in listed], pa.string())})
    # Many small blocks, so that reading the files spreads over tasks as the rows stream.
    blocks = [rows.slice(i, _MANIFEST_BLOCK_ROWS) for i in range(0, rows.num_rows, _MANIFEST_BLOCK_ROWS)] or [rows]
    return ray.data.from_arrow(blocks).map_batches(
        _folder_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **_remote(num_cpus),
        fn_kwargs=dict(dataset=dataset, source=source, image_root=image_root, class_index=class_index,
                       target_root=target_root, endpoint_url=endpoint_url),
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

    def footer(f: str) -> tuple[pa.Schema, int] | Exception:
        try:
            with fs.open_input_file(f) as fh:
                pf = pq.ParquetFile(fh)
                return pf.schema_arrow, pf.metadata.num_rows
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
    if sum(rows for _, rows in footers) == 0:
        raise ValueError(f"parquet source {uri!r}: its {len(files)} shard(s) hold no rows; nothing to process")
    # Every shard's columns, not only the first's: a later shard without `image`, or with a
    # string label, would otherwise fail inside a read task deep into the stage.
    for i, (f, (schema, _)) in enumerate(zip(files, footers)):
        # The first shard's missing columns are reported by the caller, with what it has.
        problems = [f"no column {c!r}" for c in ("key", "image") if i and c not in schema.names]
        if "image" in schema.names and not _binary_like(schema.field("image").type):
            problems.append(f"image is {schema.field('image').type}, not binary")
        if "label" in schema.names and not pa.types.is_integer(schema.field("label").type) \
                and not pa.types.is_null(schema.field("label").type):
            problems.append(f"label is {schema.field('label').type}, not an integer")
        if problems:
            raise ValueError(f"parquet source {uri!r}: shard {posixpath.basename(f)!r}: {'; '.join(problems)}; "
                             "nothing was processed (see docs/data.md for the columns)")
    return footers[0][0]


def _binary_like(t: pa.DataType) -> bool:
    """Binary bytes, or the Hugging Face ``struct<bytes, path>`` image."""
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _binary_like(t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


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


def _manifest_batch(batch: pa.Table, *, dataset: str, source: SourceConfig, root: str,
                    endpoint_url: str | None) -> pa.Table:
    _, froot = _cached_fs(root, endpoint_url)
    # The manifest's checks are lexical; this one follows links (a listed path through a
    # symlinked folder must not read /etc/hostname).
    read = _reader(source, root, endpoint_url)
    ids = batch.column("image_id").to_pylist()
    with ThreadPoolExecutor(min(_ANNOTATION_READ_THREADS, max(len(ids), 1))) as pool:
        # A listed file that is missing becomes a null image: a recorded reject, not an error.
        images = list(pool.map(read, [posixpath.join(froot, i) for i in ids]))
        if dataset == "imagenet":
            target: Any = batch.column("target")
        else:
            rels = batch.column("target").to_pylist()
            target = list(pool.map(lambda r: None if r is None else read(posixpath.join(froot, r)), rels))
    return _table(dataset, ids, images, target)


def _read_manifest(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    rows, root = read_manifest(source, dataset, endpoint_url)
    # Many small blocks, so that reading the files spreads over tasks as the rows stream.
    blocks = [rows.slice(i, _MANIFEST_BLOCK_ROWS) for i in range(0, rows.num_rows, _MANIFEST_BLOCK_ROWS)] or [rows]
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(_manifest_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          **_remote(num_cpus), fn_kwargs=dict(dataset=dataset, source=source, root=root,
                                                              endpoint_url=endpoint_url))


# -------------------------------------------------------------------------------- webdataset
def _wds_row(sample: dict[str, Any], *, dataset: str) -> dict[str, Any]:
    """One sample's raw members → one output row. No member is ever decoded here (no pickle, no
    torch.load); a sample with a member that was not read has that reason as its image."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    raw_id = f"{posixpath.basename(sample['__url__'])}/{sample['__key__']}"
    # tarfile keeps a name that is not UTF-8 as surrogate escapes: back to bytes, then a reject.
    image_id, bad_name = readable_name(raw_id.encode("utf-8", "surrogateescape"))
    image = next((members[s] for s in WDS_IMAGE_SUFFIXES if s in members), None)
    why = sample.get("__reject__") or bad_name
    if why:
        image = source_reject(why)
    raw = members.get(WDS_TARGET_SUFFIX[dataset])
    out = {"image_id": image_id, "image": image}
    if dataset == "imagenet":
        try:
            out["label"] = int(raw.decode("ascii").strip()) if raw is not None else -1
        except (UnicodeDecodeError, ValueError):
            out["label"] = -1  # an unreadable class file counts as "no label"
    else:
        out[TARGET_COLUMN[dataset]] = raw
    return out


_WDS_ROWS_PER_BLOCK = 64


@functools.cache
def _bounded_webdataset_class():
    """Ray's read_webdataset reads each member whole before anything can look at its size (a
    1.5 MB gzip .tar holding a 1.5 GiB member was decompressed into memory); this datasource
    streams the archive through ``tar_samples``, which checks every member's header first."""
    from ray.data.datasource import FileBasedDatasource

    class BoundedWebDataset(FileBasedDatasource):
        _FILE_EXTENSIONS = ["tar"]

        def __init__(self, paths, *, dataset: str, max_member_bytes: int, max_archive_bytes: int, **kwargs):
            super().__init__(paths, **kwargs)
            self._dataset, self._limits = dataset, dict(max_member_bytes=max_member_bytes,
                                                        max_archive_bytes=max_archive_bytes)

        def _read_stream(self, f, path: str):
            rows = []
            for sample in tar_samples(f, url=path, **self._limits):
                rows.append(_wds_row(sample, dataset=self._dataset))
                if len(rows) >= _WDS_ROWS_PER_BLOCK:
                    yield pa.Table.from_pylist(rows, schema=output_schema(self._dataset))
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=output_schema(self._dataset))

    return BoundedWebDataset


def _read_webdataset(source: SourceConfig, dataset: str, endpoint_url: str | None, num_cpus: float | None):
    import ray.data

    fs, path = arrow_filesystem(source.path, endpoint_url)
    datasource = _bounded_webdataset_class()(
        path, filesystem=fs, file_extensions=["tar"], dataset=dataset,
        max_member_bytes=source.max_file_bytes, max_archive_bytes=source.max_archive_bytes)
    return ray.data.read_datasource(datasource, **_remote(num_cpus))

"""Reading the probe-features cache (``ROOT/<model>/probe-features/``) for the probe search.

Everything is checked before a trial starts: the manifest has the geometry (width, grid,
image_size), every table has its columns at the manifest's sizes, and labels lie in the class
range (255 = ignore in masks). A violation is a ValueError naming the table, the column and the
first offending image. ``load_split`` reads one (task, split, variant) as the dense arrays
``scope_ray.probes.train.fit_probe`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scope_ray.pipeline import PROBE_FEATURES as FEATURES_STAGE
from scope_ray.pipeline import run_hint
from scope_ray.config import JobConfig
from scope_ray.probes.metrics import IGNORE_INDEX
from scope_ray.probes.tasks import TASKS as TASK_CONTRACTS
from scope_ray.storage import ResultsRoot, StageDir

TASKS: tuple[str, ...] = tuple(TASK_CONTRACTS)  # the probe tasks in their declared order


@dataclass
class FeatureCache:
    """The committed probe-features stage of one model and the geometry its manifest records."""

    stage: StageDir
    width: int
    grid: int
    image_size: int
    variants: list[str]
    tasks: list[str]


def open_cache(job: JobConfig, root: ResultsRoot) -> FeatureCache:
    stage = root.stage(job.model.name, FEATURES_STAGE)
    m = stage.manifest()
    if m is None:
        raise RuntimeError(f"{job.model.name}: no probe features at {stage.uri}; run `{run_hint(FEATURES_STAGE)}` first")
    missing = [k for k in ("width", "grid", "image_size") if k not in m]
    if missing:
        raise ValueError(f"{stage.uri}/manifest.json lacks {missing}; the probe search needs width, grid and image_size")
    tasks = [t for t in TASKS if f"{t}_train" in m["tables"] and f"{t}_val" in m["tables"]]
    variants = list(m.get("variants") or [])
    if not variants:
        seen: set[str] = set()
        for t in tasks:
            seen.update(stage.read_table(f"{t}_val", columns=["variant"]).column("variant").to_pylist())
        variants = sorted(seen)
    return FeatureCache(stage, int(m["width"]), int(m["grid"]), int(m["image_size"]), variants, tasks)


COLUMNS = {"classification": ("embedding", "label"), "segmentation": ("tokens", "mask"), "depth": ("cls", "tokens", "depth")}
ARRAY_NAMES = {"embedding": "x", "label": "y", "tokens": "tokens", "mask": "mask", "cls": "cls", "depth": "depth"}


def _widths(cache: FeatureCache) -> dict[str, int]:
    d, s = cache.width, cache.image_size
    return {"embedding": d, "cls": d, "tokens": cache.grid ** 2 * d, "mask": s * s, "depth": s * s}


def _matrix(table: pa.Table, column: str, width: int, where: str, why: str) -> np.ndarray:
    """A list column as a dense [rows, width] array; a row of another length is an error naming it."""
    col = table.column(column)
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != width:
            first = table.column("image_id")[0].as_py() if table.num_rows else None
            raise ValueError(f"{where}: column {column!r} holds {col.type.list_size} values per image, expected "
                             f"{width} ({why}); every row has that size, the first is image {first!r}")
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            image = table.column("image_id")[int(bad[0])].as_py()
            raise ValueError(f"{where}: image {image!r} has {int(lengths[bad[0]])} values in {column!r}, "
                             f"expected {width} ({why}); {bad.size} such rows")
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(table.num_rows, width)


def check_schemas(cache: FeatureCache, tasks: Sequence[str]) -> None:
    """Before any trial: every table has its columns, and fixed-size lists the manifest's sizes."""
    widths = _widths(cache)
    for task in tasks:
        for split in ("train", "val"):
            name = f"{task}_{split}"
            files = cache.stage.part_files(name)
            if not files:
                raise ValueError(f"{cache.stage.table_uri(name)}: the table has no part files")
            schema = pq.read_schema(files[0], filesystem=cache.stage.root.arrow_fs)
            missing = [c for c in ("image_id", "variant", *COLUMNS[task]) if c not in schema.names]
            if missing:
                raise ValueError(f"{cache.stage.table_uri(name)}: missing column(s) {missing}; it has {schema.names}")
            for col in COLUMNS[task]:
                typ = schema.field(col).type
                if pa.types.is_fixed_size_list(typ) and typ.list_size != widths[col]:
                    first = pq.read_table(files[0], columns=["image_id"], filesystem=cache.stage.root.arrow_fs)
                    image = first.column("image_id")[0].as_py() if first.num_rows else None
                    raise ValueError(f"{cache.stage.table_uri(name)}: column {col!r} holds {typ.list_size} values per "
                                     f"image, expected {widths[col]} from the manifest (width {cache.width}, grid "
                                     f"{cache.grid}, image_size {cache.image_size}); first image {image!r}")


def _check_class_range(values: np.ndarray, ids: list[str], num_classes: int, ignore: int | None,
                       where: str, column: str) -> None:
    """Labels must lie in [0, num_classes) or equal ``ignore``; the error names the first bad image."""

    def outside(v: np.ndarray) -> np.ndarray:
        bad = (v < 0) | (v >= num_classes)
        return bad & (v != ignore) if ignore is not None else bad

    bad = outside(values)
    rows = np.flatnonzero(bad.any(axis=1) if bad.ndim > 1 else bad)
    if rows.size:
        r = int(rows[0])
        row = np.atleast_1d(values[r])
        allowed = f"0..{num_classes - 1}" + ("" if ignore is None else f" or {ignore} (ignore)")
        raise ValueError(f"{where}: label outside the class range in {column!r} of image {ids[r]!r}: "
                         f"{np.unique(row[outside(row)])[:5].tolist()}; allowed: {allowed} "
                         f"({rows.size} image(s) affected; num_classes={num_classes})")


def load_split(cache: FeatureCache, task: str, split: str, variant: str, num_classes: int | None) -> dict[str, np.ndarray]:
    """One (task, split, variant) of the cache as dense arrays, checked: sizes from the manifest,
    labels in the class range. Only this variant's rows are read."""
    table_name = f"{task}_{split}"
    where = cache.stage.table_uri(table_name)
    files = cache.stage.part_files(table_name)
    cols = ["image_id", *COLUMNS[task]]
    # partitioning=None: the part files' hive folders (model=, stage=) are not columns here.
    table = pq.read_table(files, columns=cols, filesystem=cache.stage.root.arrow_fs, partitioning=None,
                          filters=[("variant", "=", variant)]) if files else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"{where}: no rows for variant {variant!r}")
    ids = table.column("image_id").to_pylist()
    widths, s = _widths(cache), cache.image_size
    why = {"embedding": "width", "cls": "width", "tokens": f"grid² x width = {cache.grid}² x {cache.width}",
           "mask": f"image_size² = {s}²", "depth": f"image_size² = {s}²"}
    out: dict[str, np.ndarray] = {}
    for col in COLUMNS[task]:
        if col == "label":
            y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            if num_classes is not None:
                _check_class_range(y, ids, num_classes, None, where, col)
            out["y"] = y
            continue
        m = _matrix(table, col, widths[col], where, why[col])
        if col == "tokens":
            m = m.reshape(len(m), cache.grid ** 2, cache.width).astype(np.float32, copy=False)
        elif col == "mask":
            if num_classes is not None:
                _check_class_range(m, ids, num_classes, IGNORE_INDEX, where, col)
            m = m.reshape(len(m), s, s).astype(np.uint8, copy=False)
        elif col == "depth":
            m = m.reshape(len(m), s, s).astype(np.float32, copy=False)
        else:
            m = m.astype(np.float32, copy=False)
        out[ARRAY_NAMES[col]] = m
    return out


def class_count(cache: FeatureCache, task: str, given: Mapping[str, int] | None) -> int | None:
    if given and task in given:
        return int(given[task])
    if task == "segmentation":
        # The class count is config (probes.segmentation_classes), which run_probes always passes.
        raise ValueError("the segmentation class count must be given (probes.segmentation_classes)")
    if task == "classification":
        # Classes are the labels the cache holds (1000 for ImageNet): max label + 1 over both splits.
        hi = -1
        for split in ("train", "val"):
            labels = cache.stage.read_table(f"{task}_{split}", columns=["label"]).column("label")
            if len(labels):
                hi = max(hi, int(pc.max(labels).as_py()))
        return max(hi + 1, 2)
    return None


def variant_bytes(cache: FeatureCache, task: str) -> int:
    """Bytes one variant of ``task`` (train + val) takes as the dense arrays ``load_split`` makes,
    from the manifest's row counts (every variant has the same rows)."""
    m = cache.stage.manifest() or {}
    rows = sum(int(m.get("rows", {}).get(f"{task}_{split}", 0)) for split in ("train", "val"))
    per_variant = rows // max(len(cache.variants), 1)
    d, n, s = cache.width, cache.grid ** 2, cache.image_size
    row = {"classification": 4 * d + 8, "segmentation": 4 * n * d + s * s, "depth": 4 * (n + 1) * d + 4 * s * s}[task]
    return per_variant * row


def pack_units(units: Sequence[tuple[str, str]], unit_bytes: Mapping[tuple[str, str], int],
               budget: float) -> list[list[tuple[str, str]]]:
    """(task, variant) pairs in order, packed into consecutive groups whose features fit ``budget``
    bytes together (a pair larger than the budget alone gets a group of its own)."""
    groups: list[list[tuple[str, str]]] = []
    used = 0.0
    for unit in units:
        size = unit_bytes[unit]
        if groups and used + size <= budget:
            groups[-1].append(unit)
            used += size
        else:
            groups.append([unit])
            used = size
    return groups

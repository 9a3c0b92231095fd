"""Committed results as one table across models: what a notebook reads (docs/api.md).

A results root keeps every table as a hive-partitioned dataset, ``ROOT/tables/<table>/model=…/stage=…/``
(docs/storage.md): any dataframe tool reads it whole. A run still writing, or one that failed, has
its part files in those folders too, until the stage's next commit. ``read_results`` returns one
Arrow table per (stage, table) over every model whose stage is committed, with a ``model`` column
first, reading only the part files each manifest lists — never a partial run's files — in either
layout. ``committed_files`` gives the same file lists for engines that read Parquet themselves;
``uncommitted_files`` lists the part files no manifest names and ``stages_in_old_layout`` the
committed stages not in those folders yet (both empty: the folders are exactly the committed
results). No Ray.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from scope_ray.storage import HIVE, TABLES_DIR, ResultsRoot, hive_value


@dataclass
class Listing:
    """Part files of one (stage, table) per model, and the models left out with why."""

    files: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def all_files(self) -> list[str]:
        return [f for files in self.files.values() for f in files]


def _root(root: str | ResultsRoot, endpoint_url: str | None) -> ResultsRoot:
    return root if isinstance(root, ResultsRoot) else ResultsRoot(root, endpoint_url)


def _models(r: ResultsRoot, table: str) -> list[str]:
    """Model folders, and models with part files of ``table`` but no folder yet (a first run writing)."""
    folder = posixpath.join(r.path, TABLES_DIR, table)
    r.fs.invalidate_cache(folder)
    partitions = r.fs.ls(folder, detail=False) if r.fs.exists(folder) else []
    writing = {v for p in partitions if (v := hive_value(p, "model")) is not None}
    return sorted(set(r.models()) | writing)


def committed_files(root: str | ResultsRoot, stage: str, table: str, *, models: list[str] | None = None,
                    endpoint_url: str | None = None) -> Listing:
    """The committed part files of ``stage/table`` for each model under ``root`` (or ``models``).
    A model whose stage is not committed, or has no such table, is in ``skipped`` with the reason.
    Local roots give local paths; ``s3://`` roots give ``s3://`` URIs."""
    r = _root(root, endpoint_url)
    out = Listing()
    for model in models if models is not None else _models(r, table):
        if models is None and r.fs.exists(f"{r.path}/{model}/report.md"):
            continue  # ROOT/report/ is the report (docs/report.md), not a model
        d = r.stage(model, stage)
        manifest = d.manifest()
        if manifest is None:
            out.skipped[model] = f"{stage} not committed"
        elif table not in manifest.get("tables", {}):
            out.skipped[model] = f"{stage} has no table {table!r} (it has {', '.join(sorted(manifest['tables'])) or 'none'})"
        else:
            prefix = "" if r.scheme == "file" else f"{r.scheme}://"
            out.files[model] = [prefix + f for f in d.part_files(table)]
    return out


def read_results(root: str | ResultsRoot, stage: str, table: str, *, models: list[str] | None = None,
                 columns: list[str] | None = None, endpoint_url: str | None = None) -> pa.Table:
    """One Arrow table of ``stage/table`` over every model that committed it, ``model`` first.
    Schemas of different models are unified (a column one model lacks is null there). ValueError
    when no model has it, naming why each was left out."""
    r = _root(root, endpoint_url)
    listing = committed_files(r, stage, table, models=models)
    parts = []
    for model in listing.files:
        t = r.stage(model, stage).read_table(table, columns=columns)
        if "model" in t.column_names:  # a part written before the hive layout kept its own model column
            t = t.drop_columns(["model"])
        parts.append(t.add_column(0, "model", pa.array([model] * t.num_rows, pa.string())))
    if not parts:
        why = "; ".join(f"{m}: {reason}" for m, reason in listing.skipped.items()) or "no model folders"
        raise ValueError(f"no committed {stage}/{table} under {r.uri} ({why})")
    return pa.concat_tables(parts, promote_options="default")


def uncommitted_files(root: str | ResultsRoot, *, endpoint_url: str | None = None) -> list[str]:
    """Part files under ``ROOT/tables/`` that no manifest lists: a run still writing, a failed one's
    (deleted when that stage next runs), or a replaced run's while a commit deletes them. Empty
    means a direct read of the table folders (pandas, DuckDB, Polars) is exactly the committed
    results. Hidden names (temporary files, which those readers skip) are not listed."""
    r = _root(root, endpoint_url)
    tables = posixpath.join(r.path, TABLES_DIR)
    r.fs.invalidate_cache(tables)
    if not r.fs.exists(tables):
        return []
    prefix = "" if r.scheme == "file" else f"{r.scheme}://"
    manifests: dict[tuple[str, str], dict | None] = {}
    out = []
    for path in r.fs.find(tables):
        parts = path[len(tables.rstrip("/")) + 1:].split("/")
        if posixpath.basename(path).startswith((".", "_")):
            continue
        model = hive_value(parts[1], "model") if len(parts) == 4 else None
        stage = hive_value(parts[2], "stage") if len(parts) == 4 else None
        if model is not None and stage is not None:
            table, name = parts[0], parts[3]
            if (model, stage) not in manifests:
                manifests[(model, stage)] = r.stage(model, stage).manifest()
            m = manifests[(model, stage)]
            if m is not None and m.get("table_layout") == HIVE and name in m["tables"].get(table, ()):
                continue
        out.append(prefix + path)
    return sorted(out)


def stages_in_old_layout(root: str | ResultsRoot, *, endpoint_url: str | None = None) -> list[str]:
    """Committed stages (``<model>/<stage>``) whose tables are still where results written before
    the hive layout kept them, ``ROOT/<model>/<stage>/<table>/``: read by ``read_results``, absent
    from ``ROOT/tables/`` until ``scope-ray migrate ROOT``."""
    r = _root(root, endpoint_url)
    out = []
    for model, name in r.stage_folders():
        m = r.stage(model, name).manifest()
        if m is not None and m.get("table_layout") != HIVE:
            out.append(f"{model}/{name}")
    return out

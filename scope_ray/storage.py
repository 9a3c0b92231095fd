"""The results root and every dataset URI: one code path for local paths and ``s3://``.

Layout (docs/storage.md is the reference): a stage's tables are Parquet part files in hive-style
partition folders, ``ROOT/tables/<table>/model=<model>/stage=<stage>/`` (one dataset per table
across models and stages for any dataframe tool), and its manifest sits beside the data, in
``ROOT/<model>/<stage>/manifest.json``, written last. A stage is complete exactly when its
manifest exists and names the config hash the caller expects; readers only read the part files
a manifest lists, so a half-written stage is never visible to them.

Credentials come from the standard AWS chain (environment, profile, instance role) and are never
logged or written; only the endpoint URL may come from the job config (for S3-compatible stores).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from scope_ray.lease import DEFAULT_LEASE_SECONDS, Lease, StageBusy, acquire
from scope_ray.tokens import REJECTS_SCHEMA

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# ROOT/tables/<table>/model=<model>/stage=<stage>/: every stage's tables, hive-partitioned.
TABLES_DIR = "tables"
# manifest["table_layout"]: where the part files it lists are. Manifests written before the hive
# layout have no such key: their files are in ROOT/<model>/<stage>/<table>/ ("stage"), still read
# there; `scope-ray migrate ROOT` moves them (StageDir.migrate).
HIVE, STAGE_FOLDERS = "hive", "stage"
PARTITION_KEYS = ("model", "stage")  # the hive partition columns: no stored table has them
# ROOT/<model>/logs/: job logs and sweep state (docs/sweep.md); not a stage, never committed.
LOGS_DIR = "logs"


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` with scheme ``file`` or ``s3``; a bare path is ``file``."""
    if uri.startswith("s3://"):
        # One spelling per object: "s3://b//x/" and "s3://b/x" are the same prefix.
        return "s3", "/".join(p for p in uri[len("s3://"):].split("/") if p)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    # Normalised ("/r/", "/r/./", "/x/../r" are "/r"): roots are compared as strings.
    return "file", os.path.normpath(str(Path(uri).expanduser().absolute()))


def canonical_uri(uri: str) -> str:
    """The one name of a root for comparisons: normalised, local symlinks resolved."""
    scheme, path = split_uri(uri)
    return f"s3://{path}" if scheme == "s3" else os.path.realpath(path)


def fsspec_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for ``uri``."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        import s3fs

        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # skip_instance_cache: tests start and stop S3 servers; a cached client would point at a dead one.
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True,
                               config_kwargs={"retries": s3_retry_config()})
        return fs, path
    return fsspec.filesystem("file"), path


def s3_retry_config() -> dict[str, Any]:
    """botocore's retry policy for every S3 request: ``standard`` mode, 5 attempts, unless the
    standard AWS variables ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` say otherwise.

    Every request (a part file's PUT, the manifest's PUT, a listing) is retried on its own by
    botocore after a refused, reset or cut connection, with jittered exponential backoff, and
    s3fs wraps each call in its own retry loop for transport errors (up to 5 tries): an endpoint
    that is back within seconds costs nothing. The project adds no third loop, which would
    multiply the time a dead endpoint takes to be reported (s3fs's connect/read timeouts, 5 s /
    15 s, bound a silent one). botocore ignores the variables once a config is passed, hence
    read here."""
    return {"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)}


class StorageUnreachable(ConnectionError):
    """The results root's store could not be reached or stopped answering, after the client's
    retries. Nothing the failed call was writing became visible (docs/storage.md, "When the
    store fails")."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the network or the endpoint failed", as opposed to an answer from the
    store (access denied, no such bucket), which keep their own, already clear, types."""
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import botocore.exceptions as bx

        errors += (bx.ConnectionError, bx.HTTPClientError)
    except ImportError:  # no s3fs installed: local roots only
        pass
    return errors


@contextmanager
def _unreachable_names(root: "ResultsRoot", what: str):
    """Re-raise a transport failure as ``StorageUnreachable`` naming the root and the operation
    (botocore's own message names only a request URL, and the CLI prints ConnectionErrors as one
    clear line)."""
    try:
        yield
    except StorageUnreachable:
        raise
    except _transport_errors() as exc:
        raise StorageUnreachable(
            f"results root {root.uri}: {what} failed, the store did not answer after retries "
            f"({type(exc).__name__}: {exc})") from exc


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (what Ray Data and pyarrow.parquet take) and the path inside it."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    fs, path = fsspec_filesystem(uri, endpoint_url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join_uri(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


# Where a run has no git checkout (a Ray job's uploaded working dir drops .git; the image has
# none), the commit comes from here: the sweep sets it from the submitting checkout, the image
# from its build argument, a user's `ray job submit` from `--runtime-env-json` (README).
COMMIT_ENV = "SCOPE_RAY_COMMIT"


def git_commit(cwd: str | Path | None = None) -> str:
    """The short commit of the checkout at ``cwd`` (this package's by default), with ``-dirty``
    when it has uncommitted changes; "" outside a checkout."""
    where = cwd or Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}-dirty" if dirty else sha


def code_version() -> str:
    """Package version plus the commit (recorded in manifests): from the checkout when there is
    one, else from ``SCOPE_RAY_COMMIT``."""
    from scope_ray import __version__

    sha = git_commit() or os.environ.get(COMMIT_ENV, "").strip()
    return f"{__version__}+{sha}" if sha else __version__


class StageCompletedMeanwhile(RuntimeError):
    """Another run committed this stage with the same config while this run was starting."""


class StageIncomplete(RuntimeError):
    """Reading a stage that has no manifest (never run, interrupted, or run with another config)."""


@dataclass
class StageDir:
    """``ROOT/<model>/<stage>/`` — one stage's manifest, figures and checkpoints — and its tables'
    partitions ``ROOT/tables/<table>/model=<model>/stage=<stage>/``.

    A run writes through ``writing(config_hash)``: it holds the stage's lease (one writer,
    ``scope_ray.lease``), and every file it writes is named ``<config hash>-<name>`` (``run``).
    The committed stage's files keep their own names until the new manifest lands, so a run that
    fails — a typo in an input path, a crash, a diverged SAE — leaves the committed stage
    byte-identical; the files of the run it replaces are deleted only after the new manifest is
    written (docs/storage.md, "Replacing a stage")."""

    root: "ResultsRoot"
    model: str
    stage: str
    run: str | None = None  # the config hash of the run writing this stage (set by ``writing``)
    keep: tuple[str, ...] = ()  # sub-directories the writing run manages itself (checkpoints)
    _lease: Lease | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # Shipped to Ray actors (which write parts under the run's names); the lease stays here.
        return {**self.__dict__, "_lease": None}

    @property
    def uri(self) -> str:
        return join_uri(self.root.uri, self.model, self.stage)

    @property
    def path(self) -> str:
        return posixpath.join(self.root.path, self.model, self.stage)

    def table_path(self, table: str, layout: str = HIVE) -> str:
        """The folder of ``table``'s part files: its hive partition (what every run writes), or
        under the stage folder for a manifest committed before that layout."""
        if layout == STAGE_FOLDERS:
            return posixpath.join(self.path, table)
        return posixpath.join(self.root.path, *self._partition(table))

    def table_uri(self, table: str) -> str:
        """Where new part files of ``table`` go, as a URI (for messages)."""
        return join_uri(self.root.uri, *self._partition(table))

    def _partition(self, table: str) -> tuple[str, ...]:
        """``table``'s partition of this stage, as path components under the root."""
        return TABLES_DIR, table, f"model={self.model}", f"stage={self.stage}"

    def _partitions(self) -> list[str]:
        """This stage's partition folder in every table of the root that has one."""
        tables = posixpath.join(self.root.path, TABLES_DIR)
        self.root.fs.invalidate_cache(tables)
        if not self.root.fs.exists(tables):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.root.fs.ls(tables, detail=False)]
        out = []
        for p in (self.table_path(t) for t in sorted(names)):
            # s3fs answers exists() from a cached listing of the parent: another client's files
            # (a failed run's debris) must not be missed.
            self.root.fs.invalidate_cache(p)
            if self.root.fs.exists(p):
                out.append(p)
        return out

    @property
    def file_tag(self) -> str | None:
        """What the writing run's files are named after: a short digest of its config hash
        (downstream hashes are long; the digest keeps file names short and still one per config)."""
        return file_tag(self.run) if self.run else None

    def run_name(self, name: str) -> str:
        """``name`` as the writing run stores it: prefixed with its file tag."""
        return f"{self.file_tag}-{name}" if self.run else name

    # --- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or None. A store that cannot be reached raises
        ``StorageUnreachable``: it must never read as "not complete", which would redo (and first
        delete) a stage that is complete."""
        mpath = posixpath.join(self.path, MANIFEST)
        try:
            with _unreachable_names(self.root, f"reading {self.model}/{self.stage}/{MANIFEST}"):
                with self.root.fs.open(mpath, "rb") as f:
                    return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None  # a damaged manifest marks nothing complete: the stage is redone

    def is_complete(self, config_hash: str | None = None) -> bool:
        """Committed, and (when given) with this config hash."""
        m = self.manifest()
        return m is not None and (config_hash is None or m.get("config_hash") == config_hash)

    def reset(self) -> None:
        """Remove the whole stage, committed or not (by hand only: a run never deletes committed
        work before its own manifest lands; see ``writing``)."""
        mpath = posixpath.join(self.path, MANIFEST)
        with _unreachable_names(self.root, f"removing {self.model}/{self.stage}"):
            if self.root.fs.exists(mpath):
                # Manifest first: a reader must never see a manifest whose part files are going away.
                self.root.fs.rm(mpath)
            if self.root.fs.exists(self.path):
                self.root.fs.rm(self.path, recursive=True)
            for partition in self._partitions():
                self.root.fs.rm(partition, recursive=True)

    @contextmanager
    def writing(self, config_hash: str, *, resume: bool = False, keep: tuple[str, ...] = (),
                lease_seconds: float = DEFAULT_LEASE_SECONDS):
        """Hold the stage's lease for a run of ``config_hash`` and clear what earlier, uncommitted
        attempts left (never the committed stage's files). ``resume`` keeps this config's own
        earlier files (finished probe trials); ``keep`` names sub-directories left alone (the
        run manages them: Ray Train checkpoints). Raises ``lease.StageBusy`` naming the holder
        when another live run writes this stage."""
        lease = acquire(self.root, self.model, self.stage, config_hash, lease_seconds)
        try:
            if self.is_complete(config_hash):
                # Committed by another run of this config between the caller's check and the
                # lease: running again would write over the committed files' very names.
                raise StageCompletedMeanwhile(
                    f"stage {self.model}/{self.stage} at {self.root.uri} was committed with this config by another run "
                    "while this one started; run the same command again to use it")
            self.run, self.keep, self._lease = config_hash, tuple(keep), lease
            with _unreachable_names(self.root, f"clearing {self.model}/{self.stage}"):
                self._clear(keep_own=resume)
            yield self
        finally:
            lease.release()
            self.run, self.keep, self._lease = None, (), None

    def _files(self) -> list[str]:
        """Every file of the stage: under its folder, and in its tables' partitions (full paths)."""
        out = []
        for folder in [self.path, *self._partitions()]:
            self.root.fs.invalidate_cache(folder)  # others' writes are not in this client's cache
            if self.root.fs.exists(folder):
                out += self.root.fs.find(folder)
        return sorted(set(out))

    def _own(self, path: str) -> str | None:
        """``path`` relative to the stage folder (None for a file in a table partition)."""
        base = self.path.rstrip("/") + "/"
        return path[len(base):] if path.startswith(base) else None

    def _kept(self, path: str) -> bool:
        """The manifest, or a file in a sub-directory the writing run manages itself."""
        rel = self._own(path)
        return rel is not None and (rel == MANIFEST or rel.split("/", 1)[0] in self.keep)

    def _remove(self, paths: list[str]) -> None:
        for path in paths:
            try:
                self.root.fs.rm(path)
            except FileNotFoundError:
                pass

    def _clear(self, keep_own: bool) -> None:
        """Delete debris: files neither the committed stage's nor (``keep_own``) this run's."""
        committed = self.manifest()
        tags = set()
        if committed is not None and committed.get("file_tag"):
            tags.add(committed["file_tag"] + "-")
        if keep_own:
            tags.add(self.file_tag + "-")
        legacy = committed is not None and not committed.get("file_tag")

        def debris(path: str) -> bool:
            if self._kept(path) and (self._own(path) != MANIFEST or committed is not None):
                return False
            name = posixpath.basename(path)
            if name.endswith(".tmp"):
                return True
            if any(name.startswith(t) for t in tags):
                return False
            # A stage committed before files were named by run: its files have plain names.
            return not (legacy and not _tagged(name))

        self._remove([p for p in self._files() if debris(p)])

    def _drop_superseded(self) -> None:
        """After this run's manifest landed: delete every file of the run it replaced."""
        own = self.file_tag + "-"
        self._remove([p for p in self._files()
                      if not self._kept(p) and (not posixpath.basename(p).startswith(own) or p.endswith(".tmp"))])

    def commit(self, config_hash: str, inputs: dict[str, Any], rows: dict[str, int], extra: dict[str, Any] | None = None,
               empty_schemas: dict[str, pa.Schema] | None = None) -> dict:
        """Write the manifest, last: listing every part file of every table makes the stage readable.
        If the store fails part-way, this raises ``StorageUnreachable``; the PUT is all or nothing,
        so the manifest is absent (the stage is redone on the next run) or, when only the answer to
        the last attempt was lost, whole (the stage is complete) — never partial.

        A table of ``rows`` that no part was written for gets one zero-row part with its schema
        from ``empty_schemas`` (``rejects``: ``tokens.REJECTS_SCHEMA`` unless given): readers —
        the report, pandas, Polars — then see an empty table with its columns, not a table without
        any (a clean run rejects nothing)."""
        schemas = {"rejects": REJECTS_SCHEMA, **(empty_schemas or {})}
        if self.run is not None and self.run != config_hash:
            raise ValueError(f"stage {self.model}/{self.stage}: committing config {config_hash} from a run of {self.run}")
        if self._lease is not None:
            self._lease.check()  # a run that lost its lease must not commit over the new holder
        with _unreachable_names(self.root, f"committing {self.model}/{self.stage}"):
            manifest = self._commit(config_hash, inputs, rows, extra, schemas)
            if self.run is not None:
                self._drop_superseded()
        return manifest

    def _commit(self, config_hash: str, inputs: dict[str, Any], rows: dict[str, int],
                extra: dict[str, Any] | None, schemas: dict[str, pa.Schema]) -> dict:
        tables: dict[str, list[str]] = {}
        for table in rows:
            files = sorted(posixpath.basename(p) for p in self.run_files(table))
            if not files and table in schemas:
                files = [posixpath.basename(self.write_part(table, "empty", schemas[table].empty_table()))]
            tables[table] = files
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "model": self.model,
            "stage": self.stage,
            "config_hash": config_hash,
            # Every file this run wrote is named "<file_tag>-..." (files of a stage committed
            # before runs named their files have no tag, and no such key).
            **({"file_tag": self.file_tag} if self.run else {}),
            "table_layout": HIVE,
            "inputs": inputs,
            "rows": rows,
            "tables": tables,
            "code_version": code_version(),
            "host": socket.gethostname(),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        mpath = posixpath.join(self.path, MANIFEST)
        if self.root.scheme == "file":
            # Same-directory rename is atomic on POSIX: a reader sees no manifest or the whole one.
            self.root.ensure_dir(self.path)
            write_local_atomically(mpath, blob)
        else:
            # An S3 PUT is atomic per object: the manifest appears whole or not at all.
            self.root.fs.pipe_file(mpath, blob)

    def migrate(self, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
        """Move a stage committed in the stage-folder layout into the hive partitions; the number
        of part files moved (0 when it is not committed or already there). Holding the stage's
        lease, it writes every part file the manifest lists to its partition (same names), then
        rewrites the manifest (the switch: before it readers read the old files, after it the new
        ones), then deletes the old table folders. Interrupted anywhere, the stage stays readable
        and complete, and running it again finishes the move (a switched stage's old folders
        included). Raises ``lease.StageBusy`` when a run is writing the stage."""
        m = self.manifest()
        if m is None or (m.get("table_layout") == HIVE and not self._old_folders(m)):
            return 0
        lease = acquire(self.root, self.model, self.stage, m["config_hash"], lease_seconds)
        try:
            m = self.manifest()  # again under the lease: another run may have committed meanwhile
            if m is None:
                return 0
            moved = 0
            with _unreachable_names(self.root, f"migrating {self.model}/{self.stage}"):
                if m.get("table_layout") != HIVE:
                    for table, names in m["tables"].items():
                        src, dst = self.table_path(table, STAGE_FOLDERS), self.table_path(table)
                        self.root.ensure_dir(dst)
                        for name in names:
                            _migrate_part(self.root, table, posixpath.join(src, name), posixpath.join(dst, name))
                            moved += 1
                    lease.check()
                    self._write_manifest({**m, "table_layout": HIVE})
                for old in self._old_folders(m):
                    self.root.fs.rm(old, recursive=True)
            return moved
        finally:
            lease.release()

    def _old_folders(self, manifest: dict) -> list[str]:
        """The stage-folder layout's table folders of ``manifest``'s tables that exist."""
        out = []
        for table in manifest["tables"]:
            old = self.table_path(table, STAGE_FOLDERS)
            self.root.fs.invalidate_cache(old)
            if self.root.fs.exists(old):
                out.append(old)
        return out

    # --- tables ---------------------------------------------------------------------------
    def write_part(self, table: str, part_name: str, data: pa.Table) -> str:
        """Write one part file; a retried task writing the same part name overwrites, never duplicates.
        ``data`` must not have a ``model`` or ``stage`` column: the partition folders are those
        columns for every reader of ``ROOT/tables/``, which would fail on a duplicate."""
        clash = [c for c in PARTITION_KEYS if c in data.column_names]
        if clash:
            raise ValueError(f"{self.model}/{self.stage}/{table}: a stored table cannot have the column(s) {clash} "
                             "(its partition folders model=/stage= are those columns)")
        tdir = self.table_path(table)
        self.root.ensure_dir(tdir)
        fpath = posixpath.join(tdir, f"{self.run_name(part_name)}.parquet")
        with _unreachable_names(self.root, f"writing {self.model}/{self.stage}/{table}/{part_name}.parquet"):
            write_parquet(data, fpath, self.root)
        return fpath

    def write_figure(self, local_path: str | Path) -> str:
        """Copy a figure drawn locally to ``<stage>/figures/<name>``; returns its URI. Call before
        ``commit`` (the manifest then names what is there)."""
        name = self.run_name(Path(local_path).name)
        fdir = posixpath.join(self.path, "figures")
        self.root.ensure_dir(fdir)
        self.root.fs.put_file(str(local_path), posixpath.join(fdir, name))
        return join_uri(self.uri, "figures", name)

    def written_table(self, table: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Every part file written so far, committed or not: what a stage reads back to verify
        its own output before it commits. Empty (with ``schema``) when nothing was written."""
        import pyarrow.dataset as pads

        files = self.run_files(table)
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return pads.dataset(files, filesystem=self.root.arrow_fs, format="parquet", schema=schema,
                            partitioning=None).to_table(columns=columns)

    def run_files(self, table: str) -> list[str]:
        """Full paths of the part files the writing run has written to ``table`` so far (all
        part files when no run is writing)."""
        pattern = f"{self.file_tag}-*.parquet" if self.run else "*.parquet"
        # Workers write through their own clients: this process's listing cache (s3fs keeps one
        # per folder, filled by any earlier listing) does not know their files.
        self.root.fs.invalidate_cache(self.table_path(table))
        return sorted(self.root.fs.glob(posixpath.join(self.table_path(table), pattern)))

    def part_files(self, table: str) -> list[str]:
        """Full paths of a committed table's part files (only those the manifest lists)."""
        m = self.manifest()
        if m is None:
            raise StageIncomplete(f"stage {self.model}/{self.stage} at {self.root.uri} is not complete (no manifest)")
        if table not in m["tables"]:
            raise KeyError(f"stage {self.model}/{self.stage} has no table {table!r}; it has {sorted(m['tables'])}")
        folder = self.table_path(table, m.get("table_layout", STAGE_FOLDERS))
        return [posixpath.join(folder, f) for f in m["tables"][table]]

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        files = self.part_files(table)
        if not files:
            return pa.table({})
        parts = [read_part(f, self.root, columns) for f in files]
        return pa.concat_tables(parts, promote_options="default")

    def table_uris(self, table: str) -> list[str]:
        """Part files as paths for Ray Data (use with ``root.arrow_fs``)."""
        return self.part_files(table)


FILE_TAG_LENGTH = 12


def file_tag(config_hash: str) -> str:
    """The tag a run of ``config_hash`` names its files with."""
    return hashlib.sha256(config_hash.encode()).hexdigest()[:FILE_TAG_LENGTH]


def _tagged(name: str) -> bool:
    """Named by a run: ``<file tag>-...``."""
    head, sep, _ = name.partition("-")
    return bool(sep) and len(head) == FILE_TAG_LENGTH and all(c in "0123456789abcdef" for c in head)


def temp_name(path: str) -> str:
    """A temporary name beside ``path``, unique per writer: a zombie task and its retry writing
    the same part at once must not share (and truncate) one temporary file. Never matches the
    ``*.parquet`` / ``manifest.json`` / ``*.png`` names readers look for, and starts with "." so
    that dataframe tools reading a table's folder skip it (pyarrow, pandas, Spark ignore names
    starting with "." or "_"). Everything written locally goes through one (parts, manifests,
    figures, the report), then ``os.replace``."""
    head, name = posixpath.split(path)
    return posixpath.join(head, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def hive_value(path: str, key: str) -> str | None:
    """``v`` when the last component of ``path`` is the partition folder ``key=v``, else None."""
    head, sep, value = posixpath.basename(path.rstrip("/")).partition("=")
    return value if sep and head == key else None


def copy_file(root: "ResultsRoot", src: str, dst: str) -> None:
    """Copy within the root so that ``dst`` appears whole or not at all: locally through a
    temporary name, on S3 as one server-side copy."""
    if root.scheme == "file":
        tmp = temp_name(dst)
        try:
            root.fs.copy(src, tmp)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        root.fs.copy(src, dst)


def _migrate_part(root: "ResultsRoot", table: str, src: str, dst: str) -> None:
    """One old-layout part file to its partition: copied as it is, or — when it has a ``model`` /
    ``stage`` column (the folders are those now) or is a ``rejects`` part without ``task`` —
    rewritten with the columns every new part of that table has."""
    with root.fs.open(src, "rb") as f:
        names = pq.read_schema(f).names
    if not any(c in names for c in PARTITION_KEYS) and not (table == "rejects" and "task" not in names):
        copy_file(root, src, dst)
        return
    data = read_part(src, root)
    data = data.drop_columns([c for c in PARTITION_KEYS if c in data.column_names])
    if table == "rejects" and "task" not in data.column_names:
        data = data.append_column(pa.field("task", pa.string()), pa.nulls(data.num_rows, pa.string()))
    write_parquet(data, dst, root)


@dataclass
class Migration:
    """What ``migrate_root`` did: part files moved per ``<model>/<stage>``, and stages left as
    they were because a run was writing them (with the holder)."""

    moved: dict[str, int] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)


def migrate_root(root: "ResultsRoot", log: Callable[[str], None] | None = None) -> Migration:
    """``StageDir.migrate`` for every committed stage under ``root``."""
    from scope_ray.logs import info

    log = log or info
    out = Migration()
    for model, name in root.stage_folders():
        try:
            n = root.stage(model, name).migrate()
        except StageBusy as exc:  # a run is writing it; if that run commits, it writes the new layout
            out.busy[f"{model}/{name}"] = str(exc)
            log(f"[migrate] {model}/{name}: not moved, a run is writing it (run migrate again once it ends): {exc}")
            continue
        if n:
            out.moved[f"{model}/{name}"] = n
            log(f"[migrate] {model}/{name}: {n} part files moved to {TABLES_DIR}/<table>/model={model}/stage={name}/")
    return out


def read_part(path: str, root: "ResultsRoot", columns: list[str] | None = None, **kwargs) -> pa.Table:
    """One part file, as written: without the ``model`` / ``stage`` columns pyarrow would add from
    the hive folder names of its path."""
    return pq.read_table(path, columns=columns, filesystem=root.arrow_fs, partitioning=None, **kwargs)


def write_local_atomically(path: str, blob: bytes) -> None:
    """Write ``blob`` to the local file ``path`` through a temporary name unique to this writer,
    then rename: a reader sees the old file or the whole new one, two writers never share a
    temporary file, and a failed write (a full disk) leaves nothing behind under either name."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_uri_bytes(uri: str, blob: bytes, endpoint_url: str | None = None) -> None:
    """One whole file at ``uri``: locally through a temporary name (a crash never leaves a
    truncated file under the final name), on S3 as one PUT (an object appears whole or not at all)."""
    fs, path = fsspec_filesystem(uri, endpoint_url)
    if split_uri(uri)[0] == "file":
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write_local_atomically(path, blob)
    else:
        fs.pipe_file(path, blob)


def read_uri_bytes(uri: str, endpoint_url: str | None = None, what: str = "file") -> bytes:
    """The bytes of the file at ``uri``; FileNotFoundError naming ``what`` when there is none."""
    fs, path = fsspec_filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {uri!r} does not exist")
    with fs.open(path, "rb") as f:
        return f.read()


def write_parquet(data: pa.Table, path: str, root: "ResultsRoot") -> None:
    """Write through a temporary name so a crash mid-write never leaves a truncated part file."""
    if root.scheme == "file":
        tmp = temp_name(path)
        try:
            pq.write_table(data, tmp, filesystem=root.arrow_fs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)  # the write failed: leave nothing behind
    else:
        # S3 objects appear only when the upload completes (the one PUT at close, or the
        # CompleteMultipartUpload of a file past s3fs's 50 MiB block): a cut connection leaves
        # no object, or the old one, never a truncated one. s3fs marks the file flushed before
        # uploading, so a failed upload is not retried later by the file's finaliser either.
        pq.write_table(data, path, filesystem=root.arrow_fs)


class ResultsRoot:
    """A results root URI with the filesystem handles every stage writes through."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.endpoint_url = endpoint_url
        self.scheme, self.path = split_uri(uri)
        # Local roots become absolute here: actors on other processes (or nodes) have other
        # working directories, and a relative root would scatter the outputs.
        self.uri = f"s3://{self.path}" if self.scheme == "s3" else self.path
        self.fs, _ = fsspec_filesystem(uri, endpoint_url)
        # One client for both views of the root: pyarrow's wraps the fsspec one.
        self.arrow_fs = pafs.LocalFileSystem() if self.scheme == "file" else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def __reduce__(self):
        # Ship the URI, not live clients, to Ray workers: each process opens its own connections.
        return (ResultsRoot, (self.uri, self.endpoint_url))

    def __repr__(self) -> str:
        return f"ResultsRoot({self.uri!r})"

    def ensure_dir(self, path: str) -> None:
        # Object stores have no directories; s3fs's makedirs would even create a missing bucket,
        # turning a typo in the root into a silent new bucket.
        if self.scheme == "file":
            self.fs.makedirs(path, exist_ok=True)

    def stage(self, model: str, stage: str, run: str | None = None) -> StageDir:
        """A stage directory; ``run`` (a config hash) when writing for that run from a worker."""
        return StageDir(self, model, stage, run=run)

    def check_writable(self) -> None:
        """Fail early, before any work, when the root cannot be written."""
        probe = posixpath.join(self.path, f".write-probe-{os.getpid()}-{time.time_ns()}")
        try:
            self.ensure_dir(self.path)
            self.fs.pipe_file(probe, b"ok")
        except Exception as exc:  # noqa: BLE001 - any failure here means "not writable"
            raise PermissionError(f"results root {self.uri} is not writable: {type(exc).__name__}: {exc}") from None
        finally:
            try:  # a full disk may have left an empty probe file behind
                self.fs.rm(probe)
            except (FileNotFoundError, OSError):
                pass

    def stage_folders(self) -> list[tuple[str, str]]:
        """(model, stage) of every folder that may be a stage: ``ROOT/<model>/<stage>/``, not hidden."""
        out = []
        for model in self.models():
            for sub in sorted(self.fs.ls(posixpath.join(self.path, model), detail=False)):
                name = posixpath.basename(sub.rstrip("/"))
                if not name.startswith((".", "_")) and self.fs.isdir(sub):
                    out.append((model, name))
        return out

    def stages_with_tables(self, model: str) -> set[str]:
        """Stages of ``model`` with a partition in any table (written to, committed or not)."""
        tables = posixpath.join(self.path, TABLES_DIR)
        self.fs.invalidate_cache(tables)
        if not self.fs.exists(tables):
            return set()
        out = set()
        for table in self.fs.ls(tables, detail=False):
            folder = posixpath.join(table, f"model={model}")
            self.fs.invalidate_cache(folder)
            if self.fs.exists(folder):
                out |= {v for p in self.fs.ls(folder, detail=False) if (v := hive_value(p, "stage")) is not None}
        return out

    def models(self) -> list[str]:
        """Folders under the root that may be models: not hidden, not the tables' tree."""
        if not self.fs.exists(self.path):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False) if self.fs.isdir(p)]
        return sorted(n for n in names if not n.startswith(".") and n != TABLES_DIR)


def content_hash(items: Iterable[str]) -> str:
    """A short stable name for a batch, from what it contains (so a retry rewrites the same part)."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]

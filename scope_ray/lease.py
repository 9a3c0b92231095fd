"""One writer per stage: a lease file on the results root, taken before a stage writes anything.

Two runs writing one stage at once would interleave their part files and delete each other's
(docs/reliability.md, F24). A run therefore holds ``ROOT/<model>/.leases/<stage>.json`` while it
writes; a second run finds it and stops with an error that names the holder.

- Taking the lease is one exclusive create: ``os.link`` of a fully written temporary file locally
  (fails when the name exists, and the lease never appears half written), an ``If-None-Match: *``
  PUT on S3 (answered 412 when the object exists).
- The holder renews it every third of its lifetime from a daemon thread, so a live run never
  loses it; a holder that died stops renewing, and once ``expires_at`` has passed (or, on the
  same host, as soon as its process is gone) the next run takes it over.
- Taking over is itself exclusive, so two runs finding one dead lease cannot both win: locally
  the dead file is renamed away (only one rename of a name succeeds); on S3 it is overwritten
  with ``If-Match: <its ETag>`` (only one conditional PUT on that version succeeds).
- Renewing checks the lease is still this run's (token compared locally, ``If-Match`` on S3):
  a holder that stalled past its expiry and was taken over learns it has lost the lease and
  refuses to commit (``Lease.check``), instead of writing over the new holder.

Pure storage logic, no Ray: the stage functions take it around everything they write
(``StageDir.writing``).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scope_ray.storage import ResultsRoot

LEASE_DIR = ".leases"
# Long enough that a busy driver (a GIL-heavy step, a slow store) always renews in time, short
# enough that a crashed run on another node blocks a re-run for at most this long.
DEFAULT_LEASE_SECONDS = 120.0


class StageBusy(RuntimeError):
    """Another live run holds this stage's lease."""


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took it over: nothing more may be written."""


def lease_path(root: "ResultsRoot", model: str, stage: str) -> str:
    return posixpath.join(root.path, model, LEASE_DIR, f"{stage}.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_precondition_failure(exc: BaseException) -> bool:
    """An S3 412 (If-None-Match / If-Match not met), as botocore or s3fs raise it."""
    # s3fs turns the 412 into OSError(EINVAL, "At least one of the pre-conditions ... did not hold").
    text = f"{type(exc).__name__} {exc} {exc.__cause__}"
    return ("PreconditionFailed" in text or "pre-conditions you specified" in text or " 412" in text
            or isinstance(exc, FileExistsError))


@dataclass
class Lease:
    """A held lease. ``release`` is idempotent; ``check`` raises ``LeaseLost`` once it was lost."""

    root: "ResultsRoot"
    path: str
    record: dict[str, Any]
    seconds: float
    etag: str | None = None
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _renewing: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def token(self) -> str:
        return self.record["token"]

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease is still this run's *now*: renewed here, not only
        by the heartbeat (a run frozen past its expiry may reach its commit before the next beat)."""
        if not self.lost:
            with self._renewing:
                self.renew(strict=True)
        if self.lost:
            raise LeaseLost(self.lost)

    def renew(self, strict: bool = False) -> None:
        """Push ``expires_at`` forward, only while the lease is still this run's. ``strict``: a
        store error is raised (the caller must know), not left for the next beat."""
        if self._stop.is_set() and not strict:
            return  # released meanwhile: never write the lease back
        record = {**self.record, "expires_at": time.time() + self.seconds}
        blob = json.dumps(record, indent=2).encode()
        if self.root.scheme == "file":
            # Under the takeover lock: a contender replacing an expired lease and this renewal
            # cannot interleave (else both would hold it).
            with _takeover_lock(self.path, wait_s=10.0) as locked:
                if not locked:
                    if strict:
                        raise LeaseLost(f"could not confirm the lease {self.path}: its takeover lock is held")
                    return
                current = _read_local(self.path)
                if current is None or current.get("token") != self.token:
                    self.lost = _lost_message(self, current)
                    return
                _write_local_replace(self.path, blob)
        else:
            try:
                out = self.root.fs.call_s3("put_object", **_bucket_key(self.root, self.path), Body=blob,
                                           IfMatch=self.etag)
            except Exception as exc:  # noqa: BLE001 - a 412 means taken over; anything else: try again later
                if _is_precondition_failure(exc) or isinstance(exc, FileNotFoundError):
                    current, etag = _read_s3(self.root, self.path)
                    if current is not None and current.get("token") == self.token:
                        # Our own write, retried by the client after its answer was lost: still ours.
                        self.etag, self.record = etag, current
                        return
                    self.lost = _lost_message(self, current)
                    return
                if strict:
                    raise
                return
            self.etag = out.get("ETag", self.etag)
        self.record = record

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with self._renewing:  # never beside a commit's own check, nor after release
                    self.renew()
            except Exception:  # noqa: BLE001 - a transient store error: the next beat retries
                pass
            if self.lost:
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease:{self.path}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        with self._renewing:  # a renewal in flight finishes first; none starts after
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.lost:
            return
        try:
            if self.root.scheme == "file":
                current = _read_local(self.path)
                if current is not None and current.get("token") == self.token:
                    os.remove(self.path)
            else:
                current, _ = _read_s3(self.root, self.path)
                if current is not None and current.get("token") == self.token:
                    self.root.fs.rm(self.path)
        except FileNotFoundError:
            pass
        self.lost = "released"


def _lost_message(lease: Lease, current: dict | None) -> str:
    who = describe(current) if current else "nobody (the lease file was removed)"
    return (f"this run's lease on {lease.path} expired and is now held by {who}; nothing more is written. "
            "Re-run when that run has finished")


def describe(record: dict) -> str:
    left = record.get("expires_at", 0) - time.time()
    return (f"pid {record.get('pid')} on {record.get('host')} (config {record.get('config_hash')}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record.get('acquired_at', 0)))}, "
            f"lease {'expires in %.0f s unless renewed' % left if left > 0 else 'expired'}; "
            f"command: {record.get('command', '?')})")


def _bucket_key(root: "ResultsRoot", path: str) -> dict[str, str]:
    bucket, _, key = path.partition("/")
    return {"Bucket": bucket, "Key": key}


def _read_local(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # damaged: readable as "expired, holder unknown"


def _read_s3(root: "ResultsRoot", path: str) -> tuple[dict | None, str | None]:
    """The lease's record and the ETag of that very version (s3fs reads an opened object with
    ``If-Match`` on the ETag it found on opening, so the two always belong together)."""
    for attempt in range(5):
        root.fs.invalidate_cache(path)  # the lease changes under s3fs's listing cache
        try:
            with root.fs.open(path, "rb") as f:
                etag = f.details.get("ETag")
                data = f.read()
            break
        except FileNotFoundError:
            return None, None
        except OSError as exc:  # replaced between opening and reading: read the new one
            if not _is_precondition_failure(exc) or attempt == 4:
                raise
    try:
        return json.loads(data), etag
    except (ValueError, UnicodeDecodeError):
        return {}, etag


def _write_local_replace(path: str, blob: bytes) -> None:
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def _create_local(path: str, blob: bytes) -> bool:
    """Exclusive create of a whole file: True when this call made it."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk included: leave nothing in .leases/


@contextmanager
def _takeover_lock(path: str, wait_s: float = 0.0) -> Iterator[bool]:
    """An exclusive create beside the lease (``<lease>.takeover``): held while a contender replaces
    a dead lease or the holder renews it. Yields whether it was taken (waiting up to ``wait_s``);
    one left by a process that died holding it is broken after a minute."""
    lock = path + ".takeover"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > 60:
                    os.remove(lock)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.01)
    os.close(fd)
    try:
        yield True
    finally:
        os.remove(lock)


def _take_over_local(path: str, seen: dict, blob: bytes) -> bool:
    """Replace the dead lease ``seen`` by ours, under the takeover lock: without it, two runs
    could each replace "the dead lease", the second over the first's live one."""
    with _takeover_lock(path) as locked:
        if not locked or _read_local(path) != seen:
            return False  # another run is at it, or it was taken or released meanwhile
        _write_local_replace(path, blob)
        return True


def _stale(record: dict | None, now: float) -> bool:
    if not record:  # damaged or empty
        return True
    if record.get("expires_at", 0) < now:
        return True
    # Same host: a holder whose process is gone is dead now, not in two minutes.
    return record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1)))


def acquire(root: "ResultsRoot", model: str, stage: str, config_hash: str,
            seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
    """Take the stage's lease or raise ``StageBusy`` naming the live holder."""
    path = lease_path(root, model, stage)
    now = time.time()
    record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
              "config_hash": config_hash, "acquired_at": now, "expires_at": now + seconds,
              "command": " ".join(sys.argv)[:300]}
    blob = json.dumps(record, indent=2).encode()
    for _ in range(100):  # a takeover in progress or lost to another run: look again
        if root.scheme == "file":
            if _create_local(path, blob):
                return _started(Lease(root, path, record, seconds))
            current = _read_local(path)
            if current is None:
                continue  # released between the two calls
            if not _stale(current, time.time()):
                raise _busy(root, model, stage, path, current)
            if _take_over_local(path, current, blob):
                return _started(Lease(root, path, record, seconds))
            time.sleep(0.02)  # another run is taking it over: look again
            continue
        else:
            try:
                out = root.fs.call_s3("put_object", **_bucket_key(root, path), Body=blob, IfNoneMatch="*")
                return _started(Lease(root, path, record, seconds, etag=out.get("ETag")))
            except Exception as exc:  # noqa: BLE001
                if not _is_precondition_failure(exc):
                    raise
            current, etag = _read_s3(root, path)
            if current is None:
                continue
            if current.get("token") == record["token"]:
                # Our own PUT, retried by the client after its answer was lost: we hold it.
                return _started(Lease(root, path, current, seconds, etag=etag))
            if not _stale(current, time.time()):
                raise _busy(root, model, stage, path, current)
            try:
                out = root.fs.call_s3("put_object", **_bucket_key(root, path), Body=blob, IfMatch=etag)
                return _started(Lease(root, path, record, seconds, etag=out.get("ETag")))
            except Exception as exc:  # noqa: BLE001
                if not _is_precondition_failure(exc):
                    raise
    raise StageBusy(f"stage {model}/{stage} at {root.uri}: could not take the lease {path} after 100 tries "
                    "(other runs keep taking it); run one job per stage at a time")


def _started(lease: Lease) -> Lease:
    lease.start()
    return lease


def _busy(root: "ResultsRoot", model: str, stage: str, path: str, record: dict) -> StageBusy:
    uri = f"s3://{path}" if root.scheme == "s3" else path
    return StageBusy(
        f"stage {model}/{stage} at {root.uri} is being written by another run: {describe(record)}. "
        f"Wait for it to finish (its results are then reused), or, if that run is dead, wait for its lease to "
        f"expire or delete {uri}")

"""Reading files and tar members within bounds: size from the metadata before any byte is read,
resolved paths confined to the dataset root, and names that are not UTF-8 kept as rejects.

Pure (no Ray): ``scope_ray.data.sources`` calls these inside its read tasks. A file that must not
be read comes back as ``source_reject(reason)`` bytes in place of its contents, which every
decoder turns into a recorded reject with that reason (scope_ray/data/images.py).
"""

from __future__ import annotations

import gzip
import os
import posixpath
import re
import tarfile
import zlib
from typing import IO, Any, Iterator

from scope_ray.data.images import source_reject

# WebDataset's key rule: the member's path up to the first "." of its base name; the rest is the suffix.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def readable_name(raw: bytes) -> tuple[str, str | None]:
    """A listed name as bytes → (id usable as a string column, reject reason or None).

    A name that is not UTF-8 cannot be a string id as it stands; its bytes are kept visible
    as ``\\xNN`` escapes so the reject names the file."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), "file name is not valid UTF-8"


def is_local(fs: Any) -> bool:
    """True for fsspec's local filesystem (the only one with symlinks)."""
    protocol = getattr(fs, "protocol", "")
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def read_bounded(fs: Any, path: str | bytes, *, max_bytes: int, root: str | None) -> bytes | None:
    """The bytes of ``path``; ``None`` when it is missing (or a directory); ``source_reject``
    bytes when it is bigger than ``max_bytes`` (from its size, before reading) or, with a local
    ``root``, when its resolved path leaves ``root``'s resolved path.

    ``root=None`` turns confinement off (``SourceConfig.allow_links_outside_root``, or S3, which
    has no links). The check is on the resolved path and the open is of that path, so a link
    swapped in between does not redirect the read to the unchecked target.
    """
    if root is not None and is_local(fs):
        real = os.path.realpath(path)
        real_root = os.path.realpath(os.fsencode(root) if isinstance(path, bytes) else root)
        if os.path.commonpath([real, real_root]) != real_root:
            shown = os.fsdecode(real) if isinstance(real, bytes) else real
            return source_reject(f"outside the dataset root: resolves to {shown!r} (allow_links_outside_root "
                                 "is off)")
        try:
            with open(real, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > max_bytes:
                    return source_reject(f"file too large: {size} bytes > max_file_bytes {max_bytes}")
                return fh.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return source_reject(f"file too large: {size} bytes > max_file_bytes {max_bytes}")
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        # A missing annotation (or image a manifest lists) is data, not an error: it becomes a
        # recorded reject. A listed directory is no file either.
        return None


def tar_samples(fileobj: IO[bytes], *, url: str, max_member_bytes: int, max_archive_bytes: int) -> Iterator[dict]:
    """Stream a (possibly compressed) WebDataset tar → one dict per sample: ``__key__``,
    ``__url__``, a lower-case suffix → bytes per member, and ``__reject__`` (reason) when a member
    was not read.

    Every member's size comes from its header before it is read: one over ``max_member_bytes``
    is skipped (streamed past, never held) and its sample rejected; once the members' declared
    sizes pass ``max_archive_bytes`` the rest of the archive is not read and one last sample,
    keyed ``__rest__``, carries that reject. Members of a sample must be contiguous (the
    WebDataset rule); a key seen again after another is an error naming the archive.
    """
    current: dict | None = None
    seen: set[str] = set()
    declared = 0
    last = None
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    members = iter(stream)
    while True:
        try:
            info = next(members)
        except StopIteration:
            break
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            # A truncated or damaged archive: what was read stays, the rest is one reject.
            if current is not None:
                yield current
            after = f"after {last!r}" if last else "at its start"
            yield {"__key__": "__rest__", "__url__": url,
                   "__reject__": f"archive unreadable {after}: {type(exc).__name__}: {exc}"}
            return
        last = info.name
        if not info.isreg():
            continue
        declared += info.size
        if declared > max_archive_bytes:
            if current is not None:
                yield current
            yield {"__key__": "__rest__", "__url__": url,
                   "__reject__": f"archive over max_archive_bytes {max_archive_bytes}: members from "
                                 f"{info.name!r} on were not read"}
            return
        match = _KEY_SUFFIX.match(info.name)
        if match is None:
            continue  # no suffix: not part of any sample (WebDataset skips these too)
        key, suffix = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                seen.add(current["__key__"])
                yield current
            if key in seen:
                raise ValueError(f"webdataset archive {url!r}: the members of sample {key!r} are not contiguous; "
                                 "re-create it with members sorted by name (tar --sort=name)")
            current = {"__key__": key, "__url__": url}
        if info.size > max_member_bytes:
            current.setdefault("__reject__", f"tar member {posixpath.basename(info.name)!r} too large: {info.size} "
                                             f"bytes > max_file_bytes {max_member_bytes}")
            continue  # the stream skips the unread member's data in bounded chunks
        current[suffix] = stream.extractfile(info).read()
    if current is not None:
        yield current

"""What an input *is*, not only where it is: a short digest of a dataset's or a weights file's
files (name, size and modification time locally; name, size and ETag on S3).

A stage's config hash covers its inputs' paths. A dataset or weights file replaced in place at
the same path would leave every stage that read it "complete", and its stale output would be
kept (docs/reliability.md, F26). The config hash therefore also covers this digest
(``JobConfig.stage_hash``): a replaced, added or removed file reruns the stages that read it, and
only those. One listing per input per job (cached on the job, which travels to the Ray workers
with it); nothing is read, so a 1 GB checkpoint costs one ``stat``.

A file rewritten with the same size inside the same modification-time tick (local), or an
object store without ETags, goes unnoticed: the digest is about replaced inputs, not tampering.
"""

from __future__ import annotations

import hashlib
import posixpath

from scope_ray.storage import fsspec_filesystem, split_uri

MISSING = "missing"


def input_identity(uri: str, endpoint_url: str | None = None) -> str:
    """A 16-hex digest of every file at ``uri`` (a file, or a directory listed recursively), or
    ``"missing"`` when nothing is there (the stage that reads it reports that clearly)."""
    scheme, _ = split_uri(uri)
    fs, path = fsspec_filesystem(uri, endpoint_url)
    try:
        if fs.isfile(path):
            entries = {posixpath.basename(path): fs.info(path)}
        else:
            base = path.rstrip("/") + "/"
            entries = {p[len(base):]: info for p, info in fs.find(path, detail=True).items() if p.startswith(base)}
    except FileNotFoundError:
        return MISSING
    if not entries:
        return MISSING
    h = hashlib.sha256()
    for name in sorted(entries):
        info = entries[name]
        # S3: the ETag is a digest of the object's content; locally, size and mtime stand in for it.
        stamp = info.get("ETag") or info.get("etag") if scheme == "s3" else info.get("mtime")
        h.update(f"{name}\0{info.get('size')}\0{stamp}\n".encode())
    return h.hexdigest()[:16]

"""Bounded, confined reading (scope_ray/data/reading.py): pure, no Ray, milliseconds."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import fsspec
import pytest

from scope_ray.data.images import RejectedImage, decode_image, source_reject
from scope_ray.data.reading import read_bounded, readable_name, tar_samples

LOCAL = fsspec.filesystem("file")


def _reason(data: bytes) -> str:
    with pytest.raises(RejectedImage) as info:
        decode_image(data)
    return info.value.reason


def _tar(members: list[tuple[str, bytes, int | None]], *, gz: bool = False) -> bytes:
    """A tar whose headers may claim a size (third item) other than the bytes that follow: a
    member can claim 1.5 GiB in a test file of a few KB. Nothing after a lying member is valid,
    so it goes last."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, claimed in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if claimed is None:
                tar.addfile(info, io.BytesIO(data))
            else:
                info.size = claimed
                tar.fileobj.write(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.fileobj.write(data)
                tar.offset += len(data) + tarfile.BLOCKSIZE  # keep tarfile's own bookkeeping sane
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def test_a_tar_member_over_the_limit_is_never_read_and_rejects_only_its_sample():
    """A gzip .tar whose member claims 1.5 GiB: rejected from its header; members before it stay.
    (The test file ends where the 1.5 GiB would start: that is the archive's truncation reject.)"""
    data = _tar([("a.jpg", b"A" * 10, None), ("a.cls", b"1", None), ("b.cls", b"2", None),
                 ("b.jpg", b"", 3 * 2**29)], gz=True)
    samples = list(tar_samples(io.BytesIO(data), url="s/x.tar", max_member_bytes=1000, max_archive_bytes=2**40))
    assert [s["__key__"] for s in samples] == ["a", "b", "__rest__"]
    assert samples[0]["jpg"] == b"A" * 10 and "__reject__" not in samples[0]
    assert "jpg" not in samples[1] and samples[1]["cls"] == b"2"
    assert samples[1]["__reject__"] == "tar member 'b.jpg' too large: 1610612736 bytes > max_file_bytes 1000"
    assert samples[2]["__reject__"].startswith("archive unreadable after 'b.jpg': ReadError")


def test_a_big_member_is_streamed_past_and_the_members_after_it_are_read():
    data = _tar([("a.jpg", b"A" * 5000, None), ("b.jpg", b"B" * 10, None)], gz=True)
    samples = list(tar_samples(io.BytesIO(data), url="x.tar", max_member_bytes=4096, max_archive_bytes=2**40))
    assert samples[0]["__reject__"].startswith("tar member 'a.jpg' too large: 5000 bytes")
    assert samples[1] == {"__key__": "b", "__url__": "x.tar", "jpg": b"B" * 10}


def test_an_archive_over_its_limit_stops_with_one_reject_for_the_rest():
    data = _tar([(f"{k}.jpg", b"x" * 600, None) for k in "abcd"])
    samples = list(tar_samples(io.BytesIO(data), url="x.tar", max_member_bytes=10**6, max_archive_bytes=1500))
    assert [s["__key__"] for s in samples] == ["a", "b", "__rest__"]
    assert samples[-1]["__reject__"] == "archive over max_archive_bytes 1500: members from 'c.jpg' on were not read"


def test_non_contiguous_sample_members_are_an_error_naming_the_archive():
    data = _tar([("a.jpg", b"1", None), ("b.jpg", b"2", None), ("a.cls", b"3", None)])
    with pytest.raises(ValueError, match="'x.tar'.*'a' are not contiguous"):
        list(tar_samples(io.BytesIO(data), url="x.tar", max_member_bytes=10, max_archive_bytes=10**6))


def test_a_file_over_the_limit_is_rejected_from_its_size(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    (tmp_path / "ok.png").write_bytes(b"x" * 100)
    for root in (str(tmp_path), None):
        assert _reason(read_bounded(LOCAL, str(tmp_path / "big.png"), max_bytes=100, root=root)) == \
            "file too large: 101 bytes > max_file_bytes 100"
        assert read_bounded(LOCAL, str(tmp_path / "ok.png"), max_bytes=100, root=root) == b"x" * 100
        assert read_bounded(LOCAL, str(tmp_path / "gone.png"), max_bytes=100, root=root) is None


def test_a_symlink_out_of_the_root_is_a_reject_unless_allowed(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"hostname")
    root = tmp_path / "data"
    (root / "c1").mkdir(parents=True)
    (root / "c1" / "link.png").symlink_to(outside)
    (root / "linked_dir").symlink_to(tmp_path)  # a folder link: the files under it leave the root too
    (root / "c1" / "inside.png").write_bytes(b"in")
    (root / "c1" / "link_inside.png").symlink_to(root / "c1" / "inside.png")
    for path in (root / "c1" / "link.png", root / "linked_dir" / "secret.txt"):
        reason = _reason(read_bounded(LOCAL, str(path), max_bytes=100, root=str(root)))
        assert reason == f"outside the dataset root: resolves to {str(outside)!r} (allow_links_outside_root is off)"
        assert read_bounded(LOCAL, str(path), max_bytes=100, root=None) == b"hostname"  # the opt-in
    assert read_bounded(LOCAL, str(root / "c1" / "link_inside.png"), max_bytes=100, root=str(root)) == b"in"


def test_a_name_that_is_not_utf8_is_kept_visible_as_a_reject():
    assert readable_name("c1/ok.png".encode()) == ("c1/ok.png", None)
    assert readable_name(b"c1/bad\xff.png") == ("c1/bad\\xff.png", "file name is not valid UTF-8")
    assert source_reject("x").startswith(b"\x00")

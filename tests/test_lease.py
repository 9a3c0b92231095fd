"""One writer per stage: the lease, on a local root and on a real S3 server on loopback."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from scope_ray.lease import LeaseLost, StageBusy, acquire, lease_path
from scope_ray.storage import ResultsRoot


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return ResultsRoot(str(tmp_path / "results"))
    bucket, endpoint = request.getfixturevalue("s3_bucket")
    return ResultsRoot(f"{bucket}/runs", endpoint_url=endpoint)


def _record(root: ResultsRoot, path: str) -> dict:
    root.fs.invalidate_cache(path)
    return json.loads(root.fs.cat_file(path))


def _overwrite(root: ResultsRoot, path: str, **changes) -> None:
    record = {**_record(root, path), **changes}
    root.fs.pipe_file(path, json.dumps(record).encode())


def test_a_second_writer_is_refused_with_the_holder_named(root):
    first = acquire(root, "m", "extract", "a" * 16)
    try:
        with pytest.raises(StageBusy) as err:
            acquire(root, "m", "extract", "b" * 16)
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "a" * 16 in msg and "m/extract" in msg and "delete" in msg
        # Another stage of the same model is not blocked.
        other = acquire(root, "m", "train-sae", "c" * 16)
        other.release()
    finally:
        first.release()
    second = acquire(root, "m", "extract", "b" * 16)  # released: free again
    second.release()
    assert not root.fs.exists(lease_path(root, "m", "extract"))


def test_an_expired_lease_is_taken_over(root):
    dead = acquire(root, "m", "s", "a" * 16, seconds=60)
    dead._stop.set()  # the holder stops renewing, as a dead process would
    _overwrite(root, dead.path, expires_at=time.time() - 1, host="another-host")
    fresh = acquire(root, "m", "s", "b" * 16)
    try:
        assert _record(root, fresh.path)["config_hash"] == "b" * 16
    finally:
        fresh.release()


def test_a_holder_whose_process_is_gone_is_taken_over_at_once_on_its_host(tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    lease = acquire(root, "m", "s", "a" * 16, seconds=600)
    lease._stop.set()
    _overwrite(root, lease.path, pid=int(gone.stdout))  # unexpired, but its process has exited
    taken = acquire(root, "m", "s", "b" * 16)
    taken.release()


def test_of_many_runs_finding_one_dead_lease_exactly_one_takes_it(root):
    dead = acquire(root, "m", "s", "a" * 16)
    dead._stop.set()
    _overwrite(root, dead.path, expires_at=time.time() - 1, host="another-host")
    won, busy, start = [], [], threading.Barrier(6)

    def contender(i):
        start.wait()
        try:
            won.append(acquire(root, "m", "s", f"{i:016d}"))
        except StageBusy:
            busy.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(busy) == 5
    assert _record(root, won[0].path)["token"] == won[0].token
    won[0].release()


def test_a_live_holder_keeps_its_lease_by_renewing_it(root):
    lease = acquire(root, "m", "s", "a" * 16, seconds=1.5)
    try:
        first = _record(root, lease.path)["expires_at"]
        time.sleep(2.0)  # past the first expiry: only renewal keeps it
        assert _record(root, lease.path)["expires_at"] > first
        with pytest.raises(StageBusy):
            acquire(root, "m", "s", "b" * 16)
        lease.check()
    finally:
        lease.release()


def test_a_holder_that_stalled_and_was_taken_over_learns_it_and_writes_nothing(root):
    stalled = acquire(root, "m", "s", "a" * 16, seconds=60)
    stalled._stop.set()  # stalled: no renewals
    _overwrite(root, stalled.path, expires_at=time.time() - 1)
    stage_b = acquire(root, "m", "s", "b" * 16)
    try:
        stalled.renew()  # what its heartbeat does when it wakes up
        with pytest.raises(LeaseLost, match="held by"):
            stalled.check()
        stalled.release()  # must not remove the new holder's lease
        assert _record(root, stage_b.path)["token"] == stage_b.token
    finally:
        stage_b.release()


def test_a_holder_frozen_past_its_expiry_finds_out_at_its_commit_not_only_at_the_next_beat(root):
    frozen = acquire(root, "m", "s", "a" * 16, seconds=60)
    frozen._stop.set()  # no heartbeat will come in time
    _overwrite(root, frozen.path, expires_at=time.time() - 1)
    other = acquire(root, "m", "s", "b" * 16)
    try:
        with pytest.raises(LeaseLost):
            frozen.check()  # what commit calls: it asks the store itself
        assert _record(root, other.path)["token"] == other.token
    finally:
        other.release()


def test_the_clients_retry_of_its_own_write_is_not_a_takeover(root):
    """A PUT whose answer was lost is sent again by the client; the conditional retry then meets
    the object it wrote itself. That is still this run's lease."""
    lease = acquire(root, "m", "s", "a" * 16, seconds=60)
    try:
        lease._stop.set()  # no heartbeat: the renewal below is check()'s own
        _overwrite(root, lease.path)  # our own record again, under a new ETag (the first attempt landed)
        lease.check()  # renews with If-Match on the old ETag: 412, yet the lease is ours
        assert lease.lost is None
    finally:
        lease.release()

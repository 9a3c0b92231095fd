"""What the tests that start private Ray heads (`ray start --head --block`) share."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

HEAD_START_ATTEMPTS = 3


def start_retrying(start: Callable[[], T], attempts: int = HEAD_START_ATTEMPTS) -> T:
    """``start()`` until it returns, at most ``attempts`` times. ``start`` makes a head on fresh
    free ports and waits for it; it raises RuntimeError when `ray start` exited (after stopping what
    it started). Why retry: free ports are found by binding and closing, so another process can take
    one before `ray start` binds it, and `ray start` then exits 1; fresh ports are the fix. A head
    that hangs raises TimeoutError, which is not retried."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")

"""Fault injection for tests, kept out of every stage's signature: one environment variable holds a
plan (JSON, stage name → what to break), read in one place, by the stage that it names, on the
driver (which hands the relevant part to its workers with their config).

    with injected("train-sae", step=13, marker="/tmp/fault", kind="kill"):
        run_train_sae(job, root)          # one worker fails once at step 13

Plans the stages read:
- ``train-sae``: ``{"step": int, "marker": path, "kind": "raise" | "kill"}`` — one Train worker
  fails once at that step (the marker file makes it once per test, across restarts).
- ``probe``: ``{"raise": [[task, variant, trial], ...], "kill": {"task", "variant", "trial",
  "after_epoch", "marker"}}`` — those trials raise ``InjectedFault`` every time; that one trial's
  Train worker SIGKILLs itself once after reporting that epoch.

Nothing sets the variable outside tests; a user never sees it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FAULT_PLAN_ENV = "SCOPE_RAY_FAULT_PLAN"


def plan(stage: str) -> dict[str, Any] | None:
    """The fault planned for ``stage`` in this process, or None."""
    raw = os.environ.get(FAULT_PLAN_ENV)
    if not raw:
        return None
    return json.loads(raw).get(stage)


@contextmanager
def injected(stage: str, **spec: Any) -> Iterator[None]:
    """Plan ``spec`` for ``stage`` while the block runs (tests only)."""
    before = os.environ.get(FAULT_PLAN_ENV)
    plans = json.loads(before) if before else {}
    os.environ[FAULT_PLAN_ENV] = json.dumps({**plans, stage: spec})
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FAULT_PLAN_ENV, None)
        else:
            os.environ[FAULT_PLAN_ENV] = before

"""The live model x stage table a sweep prints (pure text; no Ray, no storage)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Stage cells.
DONE = "done"      # the stage's manifest(s) are on storage
RUNNING = "run"    # the job is running and this is the first requested stage not yet done
TODO = "."         # not (yet) done
NOT_APPLICABLE = "n/a"  # zeroshot on a model without a text tower


@dataclass
class Row:
    model: str
    status: str = "queued"  # queued, skipped, PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, INCOMPLETE, LOST, not run
    stages_done: dict[str, bool | None] = field(default_factory=dict)  # stage -> done; None = not applicable
    job_id: str = ""
    note: str = ""


def stage_cells(row: Row, stages: tuple[str, ...]) -> list[str]:
    cells, running_marked = [], False
    for s in stages:
        done = row.stages_done.get(s, False)
        if done is None:
            cells.append(NOT_APPLICABLE)
        elif done:
            cells.append(DONE)
        elif row.status == "RUNNING" and not running_marked:
            # Stages run in pipeline order, so the first one not done is the one running.
            cells.append(RUNNING)
            running_marked = True
        else:
            cells.append(TODO)
    return cells


def render(rows: list[Row], stages: tuple[str, ...]) -> str:
    header = ["model", "job", *stages, "job id / note"]
    body = [[r.model, r.status, *stage_cells(r, stages), " ".join(x for x in (r.job_id, r.note) if x)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1])
    return "\n".join(x.rstrip() for x in lines)

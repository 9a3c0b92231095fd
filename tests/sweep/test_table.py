"""scope_ray/sweep/table.py: the live model x stage table."""

from __future__ import annotations

from scope_ray.sweep.table import Row, render


def test_table_marks_done_running_and_not_applicable_stages():
    stages = ("extract", "train-sae", "eval-sae", "zeroshot")
    rows = [Row("clip-vit-b16", "RUNNING", {"extract": True, "train-sae": False, "eval-sae": False,
                                             "zeroshot": False}, "job-1"),
            Row("dinov2-b", "skipped", {s: True for s in stages[:3]} | {"zeroshot": None}, note="complete"),
            Row("deit3-b", "queued")]
    lines = render(rows, stages).splitlines()
    assert lines[0].split() == ["model", "job", *stages, "job", "id", "/", "note"]
    assert lines[1].split() == ["clip-vit-b16", "RUNNING", "done", "run", ".", ".", "job-1"]
    assert lines[2].split() == ["dinov2-b", "skipped", "done", "done", "done", "n/a", "complete"]
    assert lines[3].split() == ["deit3-b", "queued", ".", ".", ".", "."]
    assert len({line.index(" done") if " done" in line else -1 for line in lines[1:3]}) == 1  # aligned columns

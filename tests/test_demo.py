"""The demo runs end to end and a second run reuses everything."""

import pytest

from scope_ray.demo import PLANTED_BAD_FILES, run_demo
from scope_ray.storage import ResultsRoot

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_skips(ray_local, tmp_path):
    lines: list[str] = []
    out = run_demo(tmp_path / "demo", log=lines.append)
    assert not out["extract"].skipped
    root = ResultsRoot(out["root"])
    stage = root.stage("demo-vit-tiny", "extract")
    rejects = stage.read_table("rejects")
    assert sorted(rejects.column("image_id").to_pylist()) == sorted(PLANTED_BAD_FILES)
    assert stage.manifest()["rows"]["train_tokens"] > 0
    assert any("summary" in line for line in lines)
    assert not out["train"].skipped and not out["eval"].skipped
    row = out["eval"].row
    # Issue 3's bar for the demo SAE (the figures are printed in the demo's summary).
    assert row["fvu_all"] < 0.3, row
    assert any("FVU_A" in line for line in lines)
    again = run_demo(tmp_path / "demo", log=lines.append)
    assert again["extract"].skipped and again["train"].skipped and again["eval"].skipped

"""What the sweep tests share: the two demo models, the stages a sweep runs, and a sweep spec
written beside two job specs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MODELS = ("demo-vit-tiny", "demo-vit-reg")
STAGES = ["extract", "train-sae"]


def spec_files(d: Path, sweep: dict, jobs: dict[str, dict] | None = None) -> Path:
    for name, spec in (jobs or {"a.yaml": {"model": {"name": "demo-vit-tiny"}},
                                "b.yaml": {"model": {"name": "demo-vit-reg"}}}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(yaml.safe_dump(spec))
    path = d / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "jobs": ["a.yaml", "b.yaml"], **sweep}, sort_keys=False))
    return path


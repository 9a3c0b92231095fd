"""SAE training curves: a figure per model in the report and the same scalars for TensorBoard."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pyarrow as pa
import pytest

from scope_ray.report.content import write_report
from scope_ray.storage import ResultsRoot


def write_training(root: ResultsRoot, model: str, rows: list[dict]) -> None:
    stage = root.stage(model, "train-sae")
    stage.write_part("training_log", "part-0", pa.Table.from_pylist(rows))
    stage.commit("t", {}, {"training_log": len(rows)}, extra={"sae_file": "sae.safetensors", "steps": rows[-1]["step"]})


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in ``folder``, read as TFRecords (8-byte length, 4-byte CRC,
    the Event proto, 4-byte CRC) without TensorBoard's own reader."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _rows() -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "fvu": 0.5 / s ** 0.5, "l0": 8.0, "dead_fraction": 0.1 if s < 300 else 0.0,
             "revived": 0, "threshold": 0.3, "time": 1_700_000_000.0 + s} for s in (100, 200, 300)]


def test_training_curves_are_drawn_and_written_for_tensorboard_once(tmp_path):
    root = ResultsRoot(str(tmp_path / "results"))
    rows = _rows()
    rows[1]["fvu"] = math.nan  # a non-finite value is left out, not written as NaN
    write_training(root, "demo-vit-tiny", rows)
    out = tmp_path / "report"
    md = Path(write_report(root.uri, out=str(out)).markdown).read_text()
    assert "## SAE training curves" in md and "SAE training curves — demo-vit-tiny" in md
    assert (out / "figures" / "training--demo-vit-tiny.png").stat().st_size > 1000
    scalars = read_events(out / "tensorboard" / "demo-vit-tiny")
    assert [s for s, _ in scalars["train-sae/loss"]] == [100, 200, 300]
    assert [v for _, v in scalars["train-sae/loss"]] == pytest.approx([0.02, 0.01, 2 / 300], rel=1e-6)  # float32
    assert [s for s, _ in scalars["train-sae/fvu"]] == [100, 300]
    assert [v for _, v in scalars["train-sae/dead_fraction"]] == pytest.approx([0.1, 0.1, 0.0], rel=1e-6)
    # A second report replaces the event files, not adds to them (TensorBoard would draw both).
    earlier = out / "tensorboard" / "demo-vit-tiny" / "events.out.tfevents.1.earlier-report"
    earlier.write_bytes((out / "tensorboard" / "demo-vit-tiny").glob("events.out.tfevents.*").__next__().read_bytes())
    assert len(read_events(out / "tensorboard" / "demo-vit-tiny")["train-sae/loss"]) == 6
    write_report(root.uri, out=str(out))
    assert len(read_events(out / "tensorboard" / "demo-vit-tiny")["train-sae/loss"]) == 3


def test_a_model_without_a_training_log_has_no_curves(tmp_path):
    root = ResultsRoot(str(tmp_path / "results"))
    root.stage("demo-vit-tiny", "train-sae").commit("t", {}, {}, extra={"imported": {"toolkit": "saev"}})
    md = Path(write_report(root.uri, out=str(tmp_path / "report")).markdown).read_text()
    assert "## SAE training curves" not in md and not (tmp_path / "report" / "tensorboard").exists()

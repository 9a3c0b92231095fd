"""Reading committed results across models (scope_ray/results.py), and docs/api.md's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from scope_ray.results import committed_files, read_results, uncommitted_files
from scope_ray.storage import ResultsRoot
from scope_ray.tokens import rejects_table
from tests.report.test_compare import write_scope

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _eval(root: ResultsRoot, model: str, fvu: float) -> None:
    stage = root.stage(model, "eval-sae")
    stage.write_part("sae_eval", "part-0", pa.Table.from_pylist([{"fvu_all": fvu, "l0_all": 8.0, "dead_latents": 1}]))
    stage.commit("e", {}, {"sae_eval": 1})


def _populated(root: ResultsRoot, in_flight: bool = True) -> dict[str, np.ndarray]:
    cds = {"clip-vit-b16": np.array([0.1, 0.2, 0.9, np.nan]), "dinov2-b": np.linspace(0, 1, 6)}
    for model, values in cds.items():
        write_scope(root, model, values, 0.5)
        _eval(root, model, {"clip-vit-b16": 0.2, "dinov2-b": 0.3}[model])
    if in_flight:  # a run of a third model still writing: a part file, no manifest
        _in_flight(root)
    return cds


def _in_flight(root: ResultsRoot) -> str:
    return root.stage("deit3-b", "partition").write_part("features", "part-0", pa.table({"feature": [0], "cds": [0.5]}))


def test_one_table_across_models_with_only_committed_parts(tmp_path):
    root = ResultsRoot(str(tmp_path / "results"))
    cds = _populated(root)
    # A stray part beside a committed table (a superseded or half-written run's) is not listed.
    root.stage("dinov2-b", "partition").write_part("features", "stray", pa.table({"feature": [99], "cds": [0.0]}))
    t = read_results(root.uri, "partition", "features")
    assert t.column_names[0] == "model"
    for model, values in cds.items():
        rows = t.filter(pa.compute.equal(t["model"], model))
        np.testing.assert_array_equal(rows["cds"].to_numpy(zero_copy_only=False), values)
    listing = committed_files(root.uri, "partition", "features")
    assert set(listing.files) == set(cds) and listing.skipped == {"deit3-b": "partition not committed"}
    assert not any("stray" in f for f in listing.all_files)
    assert read_results(root.uri, "partition", "features", models=["dinov2-b"], columns=["cds"]).column_names == [
        "model", "cds"]
    with pytest.raises(ValueError, match=r"no committed probe/best .*clip-vit-b16: probe not committed"):
        read_results(root.uri, "probe", "best")
    with pytest.raises(ValueError, match="has no table 'nope'"):
        read_results(root.uri, "partition", "nope")


def test_an_s3_root_reads_the_same(s3_bucket, tmp_path):
    uri, endpoint = s3_bucket
    root = ResultsRoot(f"{uri}/results", endpoint)
    cds = _populated(root)
    t = read_results(f"{uri}/results", "partition", "features", endpoint_url=endpoint)
    assert t.num_rows == sum(v.size for v in cds.values())
    assert all(f.startswith(f"{uri}/results/") for f in committed_files(root, "partition", "features").all_files)
    assert uncommitted_files(root) == [f"{uri}/results/tables/features/model=deit3-b/stage=partition/part-0.parquet"]


def _blocks() -> tuple[list[str], str]:
    """docs/api.md's ```python blocks: the data ones in order, and the logging one."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    logging_blocks = [b for b in blocks if "basicConfig" in b]
    assert len(logging_blocks) == 1 and len(blocks) == 5, len(blocks)  # pandas, DuckDB, Polars, exact reads
    return [b for b in blocks if "basicConfig" not in b], logging_blocks[0]


def test_the_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every data block of docs/api.md (pandas, DuckDB and Polars on the hive folders, then the
    exact readers), in order, in one namespace, against a root at the demo's path."""
    monkeypatch.chdir(tmp_path)
    root = ResultsRoot("scope-ray-demo/results")
    cds = _populated(root, in_flight=False)
    namespace: dict = {}
    for block in _blocks()[0]:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    # pandas: group sizes per model; DuckDB: the same per model and group; Polars: Table 6's rows.
    sizes = namespace["features"].groupby(["model", "group"]).size().to_dict()
    assert sizes == {("clip-vit-b16", "high"): 1, ("clip-vit-b16", "low"): 2, ("clip-vit-b16", "unscored"): 1,
                     ("dinov2-b", "high"): 3, ("dinov2-b", "low"): 3}
    duck = {(r.model, r.group): r.latents for r in namespace["by_group"].itertuples()}
    assert duck == sizes
    assert namespace["by_group"]["median_cds"].iloc[3] == pytest.approx(np.median(cds["dinov2-b"][cds["dinov2-b"] > 0.5]))
    assert sorted(namespace["sae_eval"]["model"].to_list()) == sorted(cds)
    assert sorted(namespace["sae_eval"]["fvu_all"].to_list()) == [0.2, 0.3]
    assert "clip-vit-b16" in out and "median_cds" in out and "fvu_all" in out
    assert sorted(namespace["committed"].column("model").to_pylist()) == sorted(cds)

    # A run of a third model starts writing: the folders now show its rows, the exact readers do not,
    # and uncommitted_files names its file (the page's first assert would now fail, as it says).
    part = _in_flight(root)
    direct = pd.read_parquet("scope-ray-demo/results/tables/features")
    assert set(direct["model"]) == {"clip-vit-b16", "dinov2-b", "deit3-b"}
    assert set(read_results(root.uri, "partition", "features").column("model").to_pylist()) == set(cds)
    assert uncommitted_files(root.uri) == [part]


def test_every_stages_rejects_read_as_one_dataset(tmp_path):
    """One schema per table name: extract's rejects and probe-features' (with their task) are one dataset."""
    root = ResultsRoot(str(tmp_path / "results"))
    for stage, task in (("extract", None), ("probe-features", "depth")):
        d = root.stage("m", stage)
        d.write_part("rejects", "p", rejects_table("val", [f"{stage}-img"], ["corrupt"], task=task))
        d.commit("h", {}, {"rejects": 1})
    root.stage("m", "cds").commit("h", {}, {"rejects": 0})  # a clean stage: one empty part, same columns
    t = pd.read_parquet(tmp_path / "results" / "tables" / "rejects")
    assert sorted(zip(t["stage"].astype(str), t["image_id"], t["task"].fillna("-"))) == [
        ("extract", "extract-img", "-"), ("probe-features", "probe-features-img", "depth")]
    assert uncommitted_files(root.uri) == []


def test_the_api_page_logging_lines_show_the_stages_lines():
    """docs/api.md "Progress lines": its block, run as written in a fresh interpreter (it configures
    the root logger, which this test session must not), makes a stage's line appear."""
    import subprocess
    import sys

    block = _blocks()[1]
    code = block + "\nfrom scope_ray.logs import info\ninfo('[extract] a progress line')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "INFO:scope_ray:[extract] a progress line" in proc.stderr

"""Reading committed results across models (scope_ray/results.py), and docs/api.md's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from scope_ray.results import committed_files, read_results
from scope_ray.storage import ResultsRoot
from tests.report.test_compare import write_scope

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _eval(root: ResultsRoot, model: str, fvu: float) -> None:
    stage = root.stage(model, "eval-sae")
    stage.write_part("sae_eval", "part-0", pa.Table.from_pylist([{"fvu_all": fvu, "l0_all": 8.0, "dead_latents": 1}]))
    stage.commit("e", {}, {"sae_eval": 1})


def _populated(root: ResultsRoot) -> dict[str, np.ndarray]:
    cds = {"clip-vit-b16": np.array([0.1, 0.2, 0.9, np.nan]), "dinov2-b": np.linspace(0, 1, 6)}
    for model, values in cds.items():
        write_scope(root, model, values, 0.5)
        _eval(root, model, {"clip-vit-b16": 0.2, "dinov2-b": 0.3}[model])
    # A run of a third model still writing: a part file, no manifest. Never read.
    root.stage("deit3-b", "partition").write_part("features", "part-0", pa.table({"feature": [0], "cds": [0.5]}))
    return cds


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


def test_the_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every ```python block of docs/api.md's pandas, DuckDB and Polars sections, in order, in one
    namespace, against a root at the demo's path."""
    monkeypatch.chdir(tmp_path)
    root = ResultsRoot("scope-ray-demo/results")
    cds = _populated(root)
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 4  # pandas, DuckDB, Polars, then "Progress lines" (the next test)
    namespace: dict = {}
    for block in blocks[:3]:
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
    assert "clip-vit-b16" in out and "median_cds" in out and "fvu_all" in out
    assert "deit3-b" not in out  # its partition is not committed


def test_the_api_page_logging_lines_show_the_stages_lines():
    """docs/api.md "Progress lines": its block, run as written in a fresh interpreter (it configures
    the root logger, which this test session must not), makes a stage's line appear."""
    import subprocess
    import sys

    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[3]
    assert "basicConfig" in block
    code = block + "\nfrom scope_ray.logs import info\ninfo('[extract] a progress line')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "INFO:scope_ray:[extract] a progress line" in proc.stderr

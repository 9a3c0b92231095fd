"""The report's "Scope across SAEs": one backbone's SAEs from several results roots, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from scope_ray.cli import main
from scope_ray.report.content import write_report
from scope_ray.storage import ResultsRoot


def write_scope(root: ResultsRoot, model: str, cds: np.ndarray, gamma: float, *, imported: dict | None = None,
                layer: int = 11) -> dict:
    """A committed train-sae (trained here or imported), extract manifest and partition with ``cds``."""
    extra = {"sae_file": "sae.safetensors", "d_in": 8, "d_sae": cds.size}
    if imported:
        extra.update(imported=imported, activation="topk")
    root.stage(model, "train-sae").commit("t", {}, {}, extra=extra)
    root.stage(model, "extract").commit("e", {}, {}, extra={"layer": layer})
    finite = np.isfinite(cds)
    low, high = int((cds[finite] <= gamma).sum()), int((cds[finite] > gamma).sum())
    row = {"dictionary_size": cds.size, "gamma": gamma, "gamma_source": "config", "low_cds": low,
           "high_cds": high, "unscored": int((~finite).sum())}
    stage = root.stage(model, "partition")
    stage.write_part("partition", "part-0", pa.Table.from_pylist([row]))
    group = np.where(~finite, "unscored", np.where(cds <= gamma, "low", "high"))
    stage.write_part("features", "part-0", pa.table({"feature": np.arange(cds.size), "cds": cds, "group": group}))
    stage.commit("p", {}, {"partition": 1, "features": cds.size}, extra={"gamma": gamma})
    return row


def _table_rows(md: str, model: str) -> list[list[str]]:
    section = md[md.index("## Scope across SAEs"):]
    section = section[:section.find("\n## ", 5) if "\n## " in section[5:] else None]
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in section.splitlines()
            if line.startswith("|") and line.strip("| ").startswith(model + " ")]


def test_the_same_model_in_two_roots_is_compared_row_by_row_with_one_figure(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = (ResultsRoot(str(tmp_path / name)) for name in ("batchtopk", "jumprelu", "other"))
    cds_a = np.concatenate([rng.uniform(0, 0.3, 300), rng.uniform(0.5, 1, 84), [np.nan] * 4])
    cds_b = np.concatenate([rng.uniform(0, 0.3, 150), rng.uniform(0.5, 1, 234)])
    write_scope(a, "clip-vit-b16", cds_a, 0.4)
    write_scope(b, "clip-vit-b16", cds_b, 0.35, imported={"toolkit": "saelens", "architecture": "jumprelu"})
    write_scope(a, "dinov2-b", cds_a, 0.4)  # in one root only: not compared
    write_scope(c, "deit3-b", cds_b, 0.3)
    paths = write_report(a.uri, out=str(tmp_path / "report"), compare=(b.uri, c.uri))
    md = Path(paths.markdown).read_text()
    rows = _table_rows(md, "clip-vit-b16")
    assert [r[1] for r in rows] == [a.uri, b.uri]  # this root first, then --compare order
    assert [r[2] for r in rows] == ["trained here (BatchTopK)", "imported: saelens jumprelu (topk)"]
    # q, γ, low, high, unscored, high / scored, median CDS: each computed here from what was written.
    assert rows[0][4:11] == ["388", "0.400", "config", "300", "84", "4", f"{84 / 384:.3f}"]
    assert rows[0][11] == f"{np.median(cds_a[np.isfinite(cds_a)]):.3f}"
    assert rows[1][4:11] == ["384", "0.350", "config", "150", "234", "0", f"{234 / 384:.3f}"]
    assert not _table_rows(md, "dinov2-b") and not _table_rows(md, "deit3-b")
    assert (tmp_path / "report" / "figures" / "compare--clip-vit-b16.png").stat().st_size > 1000
    assert "different layers" not in md


def test_different_layers_are_flagged_and_nothing_shared_says_so(tmp_path):
    a, b = ResultsRoot(str(tmp_path / "a")), ResultsRoot(str(tmp_path / "b"))
    cds = np.linspace(0, 1, 64)
    write_scope(a, "clip-vit-b16", cds, 0.5, layer=11)
    write_scope(b, "clip-vit-b16", cds, 0.5, layer=12)
    md = Path(write_report(a.uri, out=str(tmp_path / "r1"), compare=(b.uri,)).markdown).read_text()
    assert "clip-vit-b16: the SAEs read different layers (['11', '12'])" in md
    c = ResultsRoot(str(tmp_path / "c"))
    write_scope(c, "deit3-b", cds, 0.5)
    md = Path(write_report(a.uri, out=str(tmp_path / "r2"), compare=(c.uri,)).markdown).read_text()
    assert "No model has a complete partition stage in two or more of" in md
    assert "## Scope across SAEs" not in Path(write_report(a.uri, out=str(tmp_path / "r3")).markdown).read_text()


def test_report_compare_on_the_command_line(tmp_path, capsys):
    a, b = ResultsRoot(str(tmp_path / "a")), ResultsRoot(str(tmp_path / "b"))
    write_scope(a, "clip-vit-b16", np.linspace(0, 1, 32), 0.5)
    write_scope(b, "clip-vit-b16", np.linspace(0, 0.5, 32), 0.25)
    assert main(["report", a.uri, "--out", str(tmp_path / "r"), "--compare", b.uri]) == 0
    assert len(_table_rows((tmp_path / "r" / "report.md").read_text(), "clip-vit-b16")) == 2
    assert main(["report", a.uri, "--out", str(tmp_path / "r"), "--compare", str(tmp_path / "missing")]) == 2
    assert "no results under" in capsys.readouterr().err


@pytest.mark.parametrize("n_series", [1, 3])
def test_cds_comparison_draws_every_series(tmp_path, n_series):
    from PIL import Image

    from scope_ray.report.figures import cds_comparison

    series = [(f"sae {i}", np.random.default_rng(i).uniform(0, 1, 50), 0.3 + 0.1 * i) for i in range(n_series)]
    series.append(("empty", np.full(4, np.nan), None))
    path = cds_comparison(series, tmp_path / "c.png", title="t")
    assert Image.open(path).size[0] > 300

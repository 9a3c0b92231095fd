"""``scope-ray report``: the Markdown / HTML report of a results root (scope_ray.report.content).

Stage outputs are written the way the stages write them (their schemas, their summary and figure
functions, ``StageDir.commit``), without running the pipeline: the report only reads storage.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from scope_ray.report import published
from scope_ray.models.registry import REGISTRY
from scope_ray.report.content import comparability, write_report, zeroshot_effect
from scope_ray.storage import ResultsRoot
from tests.browser import chromium_or_skip, render
from tests.report.test_probes import ALL_VARIANTS, write_probe


def write_eval(root: ResultsRoot, model: str, fvu_all: float, extra: dict | None = None) -> None:
    row = {"layer": 12, "fvu_all": fvu_all, "fvu_outlier": 0.5, "l0_all": 8.0, "l0_outlier": 6.5,
           "cs_all": 0.91, "cs_outlier": float("nan"), "tau": 42.0, "tau_source": "config", "tokens": 1568,
           "outlier_tokens": 0, "nonfinite_rows": 0, "d_sae": 384, "dead_latents": 3, "dense_latents": 1,
           "dense_fraction": 0.1}
    stage = root.stage(model, "eval-sae")
    stage.write_part("sae_eval", "part-0", pa.Table.from_pylist([row]))
    stage.commit("h", {"val_tokens": "x"}, {"sae_eval": 1}, extra={"tau": 42.0, "tau_source": "config", **(extra or {})})


def write_instability(root: ResultsRoot, model: str, tmp: Path, *, commit: bool = True) -> None:
    from scope_ray.report.figures import instability_plot
    from scope_ray.instability import summarize

    rng = np.random.default_rng(0)
    tokens = pa.table({"shift": np.repeat([1, 2], 50), "outlier": np.tile([True] + [False] * 9, 10),
                       "emd": rng.uniform(0.5, 3.0, 100)})
    summary = summarize(tokens, (1, 2), 10, 42.0)
    stage = root.stage(model, "instability")
    stage.write_part("summary", "part-0", pa.Table.from_pylist([{**r, "layer": 12} for r in summary]))
    fig = instability_plot([r["shift"] for r in summary], [r["d_non"] for r in summary], [r["d_out"] for r in summary],
                           tmp / f"{model}-instability" / "instability.png", title=model)
    uri = stage.write_figure(fig)
    if commit:
        stage.commit("h", {"images": {}}, {"summary": len(summary)}, extra={"figures": {"instability": uri}})


def write_partition(root: ResultsRoot, model: str, tmp: Path) -> None:
    from scope_ray.report.figures import awcds_curve, cds_histogram

    cds = np.random.default_rng(1).uniform(0, 1, 384)
    stage = root.stage(model, "partition")
    row = {"dictionary_size": 384, "gamma": 0.31, "gamma_source": "auto (Otsu on scored CDS)",
           "low_cds": int((cds[5:] <= 0.31).sum()), "high_cds": int((cds[5:] > 0.31).sum()), "unscored": 5,
           "unscored_never_fired": 3, "unscored_images_rejected": 0, "unscored_no_usable_image": 0,
           "unscored_too_few_usable_images": 2, "min_usable_images": 4, "shift": 1, "k_cds": 16}
    stage.write_part("partition", "part-0", pa.Table.from_pylist([row]))
    stage.write_part("gamma_sensitivity", "part-0", pa.Table.from_pylist([
        {"gamma": g, "low": int((cds[5:] <= g).sum()), "high": int((cds[5:] > g).sum())} for g in (0.26, 0.31, 0.36)]))
    stage.write_part("groups", "part-0", pa.Table.from_pylist([
        {"group": g, "features": n, "mean_act_outlier": 0.2, "mean_act_normal": 0.1, "outlier_share": 0.3}
        for g, n in (("low", row["low_cds"]), ("high", row["high_cds"]))]))
    local = {"cds_histogram": cds_histogram(cds, tmp / model / "cds_histogram.png", title=model, gamma=0.31),
             "awcds": awcds_curve(np.linspace(5, 95, 10), np.linspace(0.1, 0.4, 10), tmp / model / "awcds.png", title=model)}
    figures = {k: stage.write_figure(p) for k, p in local.items()}
    stage.commit("h", {"cds": "x"}, {"partition": 1, "gamma_sensitivity": 3, "groups": 2},
                 extra={"gamma": 0.31, "figures": figures})


def write_zeroshot(root: ResultsRoot, model: str, weights: str) -> None:
    from scope_ray.stages.zeroshot import ZEROSHOT_SCHEMA

    confidence = dict(zip(ALL_VARIANTS, (0.500, 0.468, 0.520, 0.495)))  # high moves it most: -0.032
    rows = [{"variant": v, "n_images": 32, "n_correct": 8 - i, "top1": (8 - i) / 32, "mean_confidence": confidence[v],
             "top1_delta": -i / 32, "mean_confidence_delta": confidence[v] - confidence["original"], "n_classes": 10,
             "templates": ["a photo of a {}."],
             "logit_scale": 100.0, "image_embedding": "class_token"} for i, v in enumerate(ALL_VARIANTS)]
    stage = root.stage(model, "zeroshot")
    stage.write_part("zeroshot", "part-0", pa.Table.from_pylist(rows, schema=ZEROSHOT_SCHEMA))
    stage.commit("h", {"features": "x"}, {"zeroshot": len(rows)}, extra={"weights": weights})


def populate(root: ResultsRoot, tmp: Path) -> None:
    # A paper model run with random-init weights (what the zeroshot manifest records): every table.
    write_eval(root, "clip-vit-b16", 0.4321)
    write_instability(root, "clip-vit-b16", tmp)
    write_partition(root, "clip-vit-b16", tmp)
    write_probe(root, "clip-vit-b16", {t: ALL_VARIANTS for t in ("classification", "segmentation", "depth")})
    write_zeroshot(root, "clip-vit-b16", weights="none")
    # A paper model whose manifests do not say which weights: Table 6 only.
    write_eval(root, "dinov2-b", 0.1234)
    # A model the paper does not have: eval only, an interrupted instability stage whose "part
    # file" is not Parquet at all (reading it would fail), and a model-level figure.
    write_eval(root, "demo-vit-tiny", 0.2468)
    write_instability(root, "demo-vit-tiny", tmp, commit=False)
    bad = Path(root.stage("demo-vit-tiny", "instability").table_path("summary")) / "part-1.parquet"
    bad.write_bytes(b"not parquet")
    (Path(root.path) / "demo-vit-tiny" / "figures").mkdir()
    (Path(root.path) / "demo-vit-tiny" / "figures" / "token_norms.png").write_bytes(
        (Path(root.path) / "clip-vit-b16" / "partition" / "figures" / "awcds.png").read_bytes())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = ResultsRoot(str(tmp / "results"))
    populate(root, tmp / "drawn")
    paths = write_report(str(tmp / "results"))
    return root, paths


def _rows(md: str, model: str) -> list[list[str]]:
    """Cells of every Markdown table row whose first cell is ``model``."""
    out = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == model:
            out.append(cells)
    return out


def _section(md: str, heading: str) -> str:
    start = md.index(heading)
    nxt = md.find("\n## ", start + 1)
    return md[start: nxt if nxt > 0 else None]


def test_markdown_holds_every_table_with_the_published_rows_of_matching_models(report):
    root, paths = report
    assert Path(paths.markdown) == Path(root.path) / "report" / "report.md"
    md = Path(paths.markdown).read_text()
    for heading in ("## SAE reconstruction (Table 6)", "## Outlier instability (Tables 7 and 9)",
                    "## CDS partition (Table 4)", "## Linear probes after feature-group removal (Tables 3 and 8)",
                    "## CLIP zero-shot per variant", "## Stage status", "### Stages: clip-vit-b16"):
        assert heading in md
    t6 = _section(md, "## SAE reconstruction")
    clip = _rows(t6, "clip-vit-b16")
    assert [r[1] for r in clip] == ["this run", "paper (supp. Table 6)"]
    assert re.search(r"\| model +\| row +\| SAE \| FVU_A \| FVU_O \| +L0_A \|", t6)
    assert clip[0][2] == clip[1][2] == "–"  # write_eval writes no train-sae manifest; the paper row names no origin
    assert clip[0][3] == "0.432" and clip[1][3] == "0.099" and clip[1][5] == "30.201"
    assert "| dead latents | dense latents |" in t6 and clip[0][12:14] == ["3", "1"]  # write_eval's counts
    # Random-init weights: the paper's row is shown, the comparison marked as not meaningful, with why.
    assert clip[1][-1] == "not meaningful"
    assert "clip-vit-b16 vs paper: not meaningful: random-init weights (`weights: none`)" in t6
    dino = _rows(t6, "dinov2-b")
    assert [r[1] for r in dino] == ["this run", "paper (supp. Table 6)"] and dino[1][-1] == "unverified"
    assert [r[1] for r in _rows(t6, "demo-vit-tiny")] == ["this run"]  # not in the paper: no published row

    t4 = _section(md, "## CDS partition")
    assert _rows(t4, "clip-vit-b16")[1][2:7] == ["24576", "0.140", "–", "17329", "7247"]
    ours = _rows(t4, "clip-vit-b16")[0]
    # write_partition's 379 scored draws split 126 / 253 at 0.31 (counted by hand from its seed):
    # low + high + unscored = 384, and the unscored reasons add up to 5.
    assert ours[5:12] == ["126", "253", "5", "3", "0", "0", "2"]
    assert re.search(r"\| clip-vit-b16 \| 0\.360 \|\s+138 \|\s+241 \|", t4)  # γ sensitivity, γ + 0.05
    assert [r[1] for r in _rows(t4, "demo-vit-tiny")] == ["not run"]
    t79 = _section(md, "## Outlier instability")
    assert [r[1] for r in _rows(t79, "demo-vit-tiny")] == ["incomplete (no manifest; not read)"]
    assert [r[1] for r in _rows(t79, "dinov2-b")] == ["not run", "paper (supp. Table 7)"]
    assert "0.610" in _rows(t79, "dinov2-b")[1] and "6.960" in _rows(t79, "dinov2-b")[1]
    probes = _section(md, "## Linear probes")
    published_cls = [r for r in _rows(probes, "clip-vit-b16") if r[1].startswith("paper")][0]
    assert published_cls[2:5] == ["74.82", "75.54", "64.86"]
    from scope_ray.report import probes as probe_module

    assert published.PROBES is probe_module.PUBLISHED  # one copy
    zs = _section(md, "## CLIP zero-shot")
    assert [r[2] for r in _rows(zs, "clip-vit-b16")] == [
        "original", "high-CDS removed", "low-CDS removed", "random removed"]
    # write_zeroshot's numbers by hand: |Δ confidence| is 0.032 (high), 0.020 (low), 0.005 (random);
    # high's top-1 is 7/32 against 8/32, i.e. -3.125 points.
    assert ("clip-vit-b16: high-CDS removed moved the mean confidence most, by -0.032 (0.500 → 0.468; "
            "top-1 -3.1 points).") in zs
    overview = {r[0]: r for r in (_rows(_section(md, "## Overview"), m)[0] for m in ("clip-vit-b16", "dinov2-b", "demo-vit-tiny"))}
    assert overview["clip-vit-b16"][-2:] == ["none", "not meaningful"]  # weights as the manifests record them
    assert overview["dinov2-b"][-2:] == ["not recorded", "unverified"]
    assert overview["demo-vit-tiny"][-3:] == ["instability", "not recorded", "none"]


def test_markdown_reads_in_a_terminal_and_links_local_figure_copies(report):
    _, paths = report
    md = Path(paths.markdown).read_text()
    assert not re.search(r"</?[a-zA-Z][^>]*>", md), "no HTML in the Markdown"
    table, tables = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            tables.append(table)
            table = []
    assert len(tables) >= 8
    for t in tables:
        assert len({len(line) for line in t}) == 1, "every table is an aligned grid:\n" + "\n".join(t)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # clip: instability + 2 partition figures; demo: its model-level figure; Figure 8.
    assert len(links) == 5
    for link in links:
        assert not link.startswith(("/", "http")) and (Path(paths.markdown).parent / link).stat().st_size > 0


def test_html_is_self_contained_and_every_figure_renders_in_chromium(report):
    _, paths = report
    page = Path(paths.html).read_text()
    assert "http://" not in page and "https://" not in page
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    rendered = render(paths.html, chromium_or_skip())
    assert len(rendered.images) == 5
    assert rendered.broken == []
    assert rendered.body.get("data-images-checked") == "5"
    assert "CDS partition (Table 4)" in rendered.dom


def test_the_browser_check_catches_a_corrupt_image(report, tmp_path):
    _, paths = report
    page = Path(paths.html).read_text()
    start = page.index("base64,") + len("base64,")
    corrupt = page[:start] + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + page[page.index('"', start):]
    (tmp_path / "corrupt.html").write_text(corrupt)
    rendered = render(tmp_path / "corrupt.html", chromium_or_skip())
    assert len(rendered.images) == 5 and len(rendered.broken) == 1
    assert rendered.broken[0]["data-state"] == "broken"


def test_an_empty_root_is_a_clear_error(tmp_path):
    for root in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError, match=re.escape(str(root))):
            write_report(str(root))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("an earlier report, not a model")
    with pytest.raises(ValueError, match="no results under"):
        write_report(str(tmp_path))


@pytest.mark.parametrize("manifests, verdict", [
    ([{"weights": "pretrained"}, {}], "comparable"),
    ([{"weights": "none"}], "not meaningful"),
    ([{"weights": "pretrained", "synthetic_data": True}], "not meaningful"),
    ([{"rows": {}}], "unverified"),
])
def test_comparability_follows_what_the_manifests_record(manifests, verdict):
    assert comparability(manifests)[0] == verdict


def test_a_run_off_the_papers_settings_is_not_compared():
    paper = [{"stage": "extract", "layer": 9, "weights": "pretrained"}, {"stage": "train-sae", "d_in": 768, "d_sae": 24576, "k": 30}]
    assert comparability(paper, "deit3-b")[0] == "comparable"
    other_k = [paper[0], {**paper[1], "k": 8}]
    verdict, why = comparability(other_k, "deit3-b")
    assert verdict == "not meaningful" and "K = 8 (paper: 30)" in why
    verdict, why = comparability([{**paper[0], "layer": 12}, paper[1]], "deit3-b")
    assert verdict == "not meaningful" and "layer 12 (paper: 9)" in why


def test_the_zero_shot_sentence_names_the_variant_that_moved_confidence_most():
    row = lambda v, conf, top1: {"variant": v, "mean_confidence": conf, "top1": top1,  # noqa: E731
                                 "mean_confidence_delta": conf - 0.4, "top1_delta": top1 - 0.5}
    # Low-CDS removal moves confidence by +0.0004 (random by -0.0001), top-1 by -1/8 = -12.5 points.
    rows = [row("original", 0.4, 0.5), row("high_removed", 0.4, 0.5), row("low_removed", 0.4004, 0.375),
            row("random_removed", 0.3999, 0.5)]
    assert zeroshot_effect("demo-clip", rows) == ("demo-clip: low-CDS removed moved the mean confidence most, "
                                                  "by +4.00e-04 (0.40000 → 0.40040; top-1 -12.5 points).")
    same = [row(v, 0.4, 0.5) for v in ALL_VARIANTS]
    assert zeroshot_effect("m", same, {"variants_equal_original_by_construction": True}) == (
        "m: no removal variant moved the mean confidence or top-1 — by construction: the designated layer is the last "
        "block and the image embedding the class token, which removal (on patch tokens only) never reaches.")
    assert zeroshot_effect("m", same, {}) == "m: no removal variant moved the mean confidence or top-1."


def test_clips_layer_is_ours_not_the_papers_and_the_report_says_so():
    """The supplement states no CLIP layer (Table 5 lists the other ViTs): a CLIP run is not marked off
    the paper for its layer, and the note names the layer read and this project's penultimate default."""
    assert all(published.LAYER[m] is None for m in ("clip-vit-b16", "clip-vit-l14", "clip-vit-l14-336"))
    assert {m: REGISTRY[m].layer for m, layer in published.LAYER.items() if layer is not None} == \
        {m: layer for m, layer in published.LAYER.items() if layer is not None}
    sae = {"stage": "train-sae", "d_in": 768, "d_sae": 24576, "k": 30}
    for layer in (11, 12):
        verdict, why = comparability([{"stage": "extract", "layer": layer, "weights": "pretrained"}, sae], "clip-vit-b16")
        assert verdict == "comparable" and f"this run read layer {layer}, but the paper does not state" in why
        assert "penultimate block (11 of 12), a decision (METHOD §1)" in why and "(paper:" not in why
    assert comparability([{"stage": "extract", "layer": 9, "weights": "pretrained"}, sae], "deit3-b") == (
        "comparable", "weights pretrained; no synthetic data recorded")  # a stated layer: no caveat


def test_an_s3_root_is_read_and_the_report_uploaded_next_to_it(s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    uri = f"{bucket}/results"
    root = ResultsRoot(uri, endpoint)
    write_eval(root, "clip-vit-l14", 0.3)
    write_partition(root, "clip-vit-l14", tmp_path)
    paths = write_report(uri, endpoint_url=endpoint)
    assert (paths.markdown, paths.html) == (f"{uri}/report/report.md", f"{uri}/report/report.html")
    md = root.fs.cat_file(f"{root.path}/report/report.md").decode()
    assert [r[1] for r in _rows(_section(md, "## SAE reconstruction"), "clip-vit-l14")] == [
        "this run", "paper (supp. Table 6)"]
    assert f"Results root: `{uri}`" in md
    figures = root.fs.ls(f"{root.path}/report/figures", detail=False)
    assert len(figures) == 2
    html = root.fs.cat_file(f"{root.path}/report/report.html").decode()
    assert html.count("data:image/png;base64,") == 2
    # A second report of the same root ignores the first (report/ is not a model) and can go elsewhere.
    local = write_report(uri, out=str(tmp_path / "here"), endpoint_url=endpoint)
    assert Path(local.markdown).read_text().count("### Stages: ") == 1
    assert _rows(_section(Path(local.markdown).read_text(), "## SAE reconstruction"), "clip-vit-l14")[0][3] == "0.300"


def test_a_committed_table_that_cannot_be_read_is_reported_not_fatal(tmp_path):
    root = ResultsRoot(str(tmp_path / "results"))
    write_eval(root, "deit3-s", 0.2)
    (Path(root.stage("deit3-s", "eval-sae").table_path("sae_eval")) / "part-0.parquet").write_bytes(b"truncated")
    md = Path(write_report(root.uri).markdown).read_text()
    rows = _rows(_section(md, "## SAE reconstruction"), "deit3-s")
    assert rows[0][1].startswith("unreadable: ") and rows[1][1] == "paper (supp. Table 6)"


def test_sweep_logs_are_not_a_stage_and_an_unreadable_probe_table_costs_only_its_row(tmp_path):
    from scope_ray.storage import LOGS_DIR

    root = ResultsRoot(str(tmp_path / "results"))
    write_eval(root, "deit3-s", 0.2)
    logs = Path(root.path) / "deit3-s" / LOGS_DIR
    logs.mkdir()
    (logs / "sweep-state.json").write_text("{}")
    write_probe(root, "clip-vit-b16", {"classification": ALL_VARIANTS})
    probe_parts = sorted(p for p in (Path(root.path) / "tables").rglob("*.parquet")
                         if "/model=clip-vit-b16/stage=probe/" in str(p))
    assert probe_parts
    for part in probe_parts:
        part.write_bytes(b"truncated")
    md = Path(write_report(root.uri).markdown).read_text()
    assert "| logs" not in md and "incomplete: logs" not in md
    status = _section(md, "## Stage status")
    assert "logs" not in status
    probes = _section(md, "## Linear probes")
    assert any(cell.startswith("unreadable: ") for r in _rows(probes, "clip-vit-b16") for cell in r)


def test_data_accounting_counts_rejects_by_reason_nonfinite_rows_and_recoveries(tmp_path):
    from scope_ray.tokens import rejects_table

    root = ResultsRoot(str(tmp_path / "results"))
    extract = root.stage("demo-vit-tiny", "extract")
    extract.write_part("rejects", "train-a", rejects_table("train", ["a.jpg", "b.jpg"], [
        "corrupt or truncated image: OSError: image file is truncated", "corrupt or truncated image: JPEG header"]))
    extract.write_part("rejects", "train-b", rejects_table("train", ["c.jpg"], [
        "too large: 12000x12000 = 144000000 pixels > max_pixels 89478485"]))
    extract.commit("h", {}, {"rejects": 3})
    train = root.stage("demo-vit-tiny", "train-sae")
    train.commit("h", {}, {}, extra={"nonfinite_rows": 10, "resumed_from_steps": [9]})
    write_eval(root, "demo-vit-tiny", 0.25)  # nonfinite_rows 0 in its table, not in its manifest: no row
    probe = root.stage("demo-vit-tiny", "probe")
    probe.write_part("trials", "t", pa.table({"resumed_from_epoch": pa.array([0, 3, 0], pa.int32())}))
    probe.commit("h", {}, {"trials": 3})
    md = Path(write_report(str(root.path)).markdown).read_text()
    section = md.split("Data accounting: rejects and recoveries", 1)[1].split("\n## ", 1)[0]
    rows = {r[1]: r for r in _rows(section, "demo-vit-tiny")}
    assert set(rows) == {"extract", "train-sae", "probe"}
    assert rows["probe"][4] == "1 trial(s) resumed from a mid-trial checkpoint"
    assert rows["extract"][2] == "3" and rows["extract"][-1] == "corrupt or truncated image 2, too large 1"
    assert rows["train-sae"][3] == "10" and "resumed from step 9" in rows["train-sae"][4]

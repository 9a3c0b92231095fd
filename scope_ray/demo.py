"""``scope-ray demo``: the whole pipeline on data made on the spot, with no network and no GPU.

It writes a small synthetic ImageNet-style dataset (shape scenes in two storage formats, plus a
truncated JPEG and a text file planted to show how bad input is recorded) and scikit-image's
bundled photos, then runs every stage this version implements on a local Ray instance.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from scope_ray.config import JobConfig, load_config
from scope_ray.logs import info

DEMO_TRAIN_IMAGES = 192
DEMO_VAL_IMAGES = 32
# The dense probe tasks (ADE20K-, NYUd-style) train on fewer images: their heads upsample to every
# pixel, which makes them the demo's costly probes on a CPU.
DEMO_DENSE_IMAGES = (96, 32)
DEMO_BROWSE_FEATURES = 40  # feature pages in the demo's browser: the 20 lowest- and 20 highest-CDS features

PLANTED_BAD_FILES = {
    # A JPEG cut in half and a stray text file: the demo shows them rejected, not crashing the run.
    "n00000000/zz_truncated.JPEG": "truncated",
    "n00000001/zz_notes.txt": "non_image",
}


def demo_spec() -> dict:
    return yaml.safe_load(resources.files("scope_ray.jobs_builtin").joinpath("demo.yaml").read_text())


def prepare_data(workdir: Path, seed: int, log=info) -> dict:
    """Write the demo datasets once; a marker file makes re-runs reuse them."""
    from scope_ray.data.bundled import write_photo_pool
    from scope_ray.data.images import bad_image_samples
    from scope_ray.data.synthetic import write_image_folder, write_synthetic

    data = workdir / "data"
    marker = data / "demo-data.json"
    wanted = {"train": DEMO_TRAIN_IMAGES, "val": DEMO_VAL_IMAGES, "dense": list(DEMO_DENSE_IMAGES), "seed": seed}
    if marker.exists():
        layout = json.loads(marker.read_text())
        if layout.get("made_with") == wanted:
            return layout
        log(f"[demo] the data under {data} was made with other settings; writing it again")
        shutil.rmtree(data)  # only ever holds what an earlier demo wrote (the marker says so)
    log(f"[demo] writing synthetic datasets under {data}")
    sources = write_synthetic(str(data), n_train=DEMO_TRAIN_IMAGES, n_val=DEMO_VAL_IMAGES, size=112,
                              num_classes=10, seed=seed, formats=("folder", "parquet"),
                              counts={"ade20k": DEMO_DENSE_IMAGES, "nyud": DEMO_DENSE_IMAGES})
    bad = bad_image_samples()
    train_dir = sources["imagenet"]["folder"]["train"]["path"]
    write_image_folder(train_dir, {name: bad[kind][0] for name, kind in PLANTED_BAD_FILES.items()})
    photos = write_photo_pool(str(data / "photos"))
    layout = {"sources": sources, "photos": photos, "made_with": wanted}
    marker.write_text(json.dumps(layout, indent=2))
    return layout


def demo_config(workdir: Path, layout: dict, overrides: list[str]) -> JobConfig:
    spec = demo_spec()
    img = layout["sources"]["imagenet"]
    ade, nyu = layout["sources"]["ade20k"]["folder"], layout["sources"]["nyud"]["parquet"]
    # Two storage formats on purpose: the ADE20K-style set as release folders, NYUd as Parquet.
    spec["data"] = {"imagenet": {"train": img["folder"]["train"], "val": img["parquet"]["val"]},
                    "ade20k": {"train": ade["train"], "val": ade["val"]},
                    "nyud": {"train": nyu["train"], "val": nyu["val"]}, "synthetic": True}
    spec["storage"] = {"root": str(workdir / "results")}
    return load_config(spec, overrides)


def run_demo(workdir: str | Path = "scope-ray-demo", overrides: list[str] | None = None, log=info) -> dict:
    """Make the data, run every declared step (``pipeline.STEPS``) in order, print the summary and
    write the report; returns each step's result and what the summary showed."""
    from scope_ray.pipeline import STEPS
    from scope_ray.report.content import write_report
    from scope_ray.browse import write_browser
    from scope_ray.sae_export import export_sae
    from scope_ray.stages.cluster import connect
    from scope_ray.storage import ResultsRoot

    t0 = time.time()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    base = load_config(demo_spec())  # validate the embedded spec before writing anything
    layout = prepare_data(workdir, base.seed, log)
    job = demo_config(workdir, layout, list(overrides or []))
    root = ResultsRoot(job.storage.root, job.storage.endpoint_url)
    root.check_writable()
    planted = job.model.spec.builder == "planted"
    log(f"[demo] model {job.model.name} ({job.model.spec.description})")
    if planted:
        log("[demo] NOTE: demo-planted is a PLANTED model, not a trained ViT: its tokens carry known local- and "
            "global-scope directions, so the CDS split below has a known right answer (docs/models.md)")
    connect(job.ray, num_cpus=os.cpu_count(), log_to_driver=False)
    import ray.data

    # The stages print their own progress; Ray Data's per-operator bars would bury the summary.
    ray.data.DataContext.get_current().enable_progress_bars = False
    results, seconds = {}, {}
    for step in STEPS:
        t = time.time()
        results[step.name] = step.load()(job, root, log=log)
        seconds[step.name] = time.time() - t
    shown = _log_summary(job, root, results, seconds, workdir, log)
    if planted:
        shown.update(_log_planted(job, root, results["cds"], log))
    _log_accounting(job, root, log)
    # The report reads only what the stages committed, as `scope-ray report ROOT` would
    # (it also draws Figure 8 across every model under the root).
    report = write_report(root.uri, endpoint_url=job.storage.endpoint_url)
    exported = export_sae(job, root, str(workdir / "export" / job.model.name))
    browser = write_browser(job, root, workdir / "browse", max_features=DEMO_BROWSE_FEATURES, log=lambda *_: None)
    log("")
    log(f"  report           {report.html}")
    log(f"                   {report.markdown}  (or: scope-ray report {root.uri})")
    log(f"  SAE + model card {posixpath.dirname(exported.card)}  (or: scope-ray export-sae JOB --out DIR)")
    log(f"  feature browser  {browser.index}  ({browser.feature_pages} feature pages; or: scope-ray browse JOB --out DIR)")
    log(f"  wall time        {time.time() - t0:.1f} s")
    r = results
    return {"report": report, "export": exported, "browser": browser, "root": root.uri, "extract": r["extract"], "train": r["train-sae"],
            "eval": r["eval-sae"], "instability": r["instability"], "cds": r["cds"], "partition": r["partition"],
            "probe_features": r["probe-features"], "probes": r["probe"], "zeroshot": r["zeroshot"],
            "seconds": seconds, "probe_seconds": seconds["probe-features"] + seconds["probe"],
            "planted": shown.get("planted"), "removal": shown.get("removal"), "probe_rows": shown["probe_rows"],
            "figure": shown["figure"], "figures": shown["figures"]}


def _log_summary(job: JobConfig, root, results: dict, seconds: dict[str, float], workdir: Path, log) -> dict:
    """The stage tables in the paper's layouts, then the figures; returns what they showed."""
    from scope_ray.report.figures import norm_histogram

    row = results["eval-sae"].row
    stage = root.stage(job.model.name, "extract")
    norms = stage.read_table("val_tokens", columns=["norm"]).column("norm").to_numpy()
    figures = Path(root.path if root.scheme == "file" else workdir / "figures") / job.model.name / "figures"
    fig = norm_histogram(norms, figures / "token_norms.png",
                         title=f"{job.model.name} layer {job.model.resolved_layer}: patch-token norms (val)",
                         tau=row["tau"])
    log("")
    log("scope-ray demo — summary")
    log(f"  results root     {root.uri}")
    log("  extracted        " + ", ".join(f"{table} {rows} rows" for table, rows in stage.manifest()["rows"].items()))
    p50, p99 = np.percentile(norms, [50, 99])
    log(f"  token norms      median {p50:.2f}, p99 {p99:.2f}, max {float(norms.max()):.2f}")
    ran = [name for name in results if name != "zeroshot"]
    log("  stages           " + ", ".join(f"{k} {'reused' if results[k].skipped else 'ran'} ({seconds[k]:.0f} s)"
                                          for k in ran))
    _log_sae_and_scope(job, row, results["instability"], results["partition"], log)
    probe_rows = _log_probes(job, root, results, seconds, log)
    zeroshot = results["zeroshot"]
    log(f"  zero-shot        {'skipped: ' + zeroshot.reason if zeroshot.skipped else f'{len(zeroshot.rows)} variants'}")
    inst_fig = (results["instability"].manifest or {}).get("figures", {}).get("instability", "(not drawn by this version)")
    log("")
    log("  figures")
    partition_figures = results["partition"].figures
    for name, path in {"token norms": str(fig), "instability (Table 9)": str(inst_fig), **partition_figures}.items():
        log(f"    {name:<22} {path}")
    return {"figure": str(fig), "figures": {**partition_figures, "instability": str(inst_fig)}, "probe_rows": probe_rows}


def _log_sae_and_scope(job: JobConfig, row: dict, instability, partition, log) -> None:
    """Table 6 (SAE evaluation), Tables 7 / 9 (instability) and Table 4 (the CDS partition)."""
    from scope_ray.report.figures import table_markdown
    from scope_ray.stages.partition import table4_columns

    log("")
    log(f"  SAE evaluation (Table 6 layout; q = {row['d_sae']}, K = {job.sae.k}, tau = {row['tau']:.3g} [{row['tau_source']}])")
    log(_indent(table_markdown([row], [("model", "model", ""), ("fvu_all", "FVU_A", ".3f"), ("fvu_outlier", "FVU_O", ".3f"),
                                        ("l0_all", "L0_A", ".2f"), ("l0_outlier", "L0_O", ".2f"), ("cs_all", "CS_A", ".3f"),
                                        ("cs_outlier", "CS_O", ".3f")])))
    log(f"  dead latents {row['dead_latents']}, dense latents (> {row['dense_fraction']:.0%} of tokens) {row['dense_latents']}")
    log("")
    log(f"  Outlier instability (Tables 7 / 9 layout; mean attention EMD in patches, {instability.images_selected} images, "
        f"alignment {job.scope.instability_alignment})")
    log(_indent(table_markdown(instability.summary, [("shift", "s", "d"), ("d_non", "D_non", ".3f"),
                                                     ("d_out", "D_out", ".3f"), ("n_non", "non-outlier tokens", "d"),
                                                     ("n_out", "outlier tokens", "d")])))
    log("")
    p = partition.row
    log(f"  CDS partition (Table 4 layout; k_cds = {job.scope.k_cds}, s = {job.scope.shift})")
    log(_indent(table_markdown([p], [("model", "model", "")] + table4_columns())))
    log(f"  γ sensitivity (low-CDS / high-CDS; every one of the {p['dictionary_size']} features is low, high or "
        "unscored): " + ", ".join(f"γ {r['gamma']:.3f}: {r['low']} / {r['high']}" for r in partition.sensitivity))
    log(_indent(table_markdown(partition.groups, [("group", "group", ""), ("features", "features", "d"),
                                                  ("mean_act_outlier", "mean act. on outliers", ".3f"),
                                                  ("mean_act_normal", "mean act. on normal tokens", ".3f"),
                                                  ("outlier_share", "share on outliers", ".3f")])))
    log("")


def _log_probes(job: JobConfig, root, results: dict, seconds: dict[str, float], log) -> list[dict]:
    """Tables 3 / 8 (linear probes) as the report reads them back from the root."""
    from scope_ray.report.figures import table_markdown
    from scope_ray.report.probes import (TASK_FORMAT, TASK_TITLE, TASKS, VARIANT_LABEL, VARIANTS, collect_probe_results,
                                         column, probe_table)

    probe_rows = collect_probe_results(root)
    cfg, probes = job.probes, results["probe"]
    log(f"  Linear probes (Table 3 / Table 8 layout; best of {cfg.classification.trials}/{cfg.segmentation.trials}/"
        f"{cfg.depth.trials} trial(s), {cfg.classification.epochs}/{cfg.segmentation.epochs}/{cfg.depth.epochs} epochs "
        f"for classification/segmentation/depth: demo schedules, far from the paper's 5 x 100)")
    # One model, so one table: a row per task (the report has a table per task, a row per model).
    mine = [r for r in probe_table(probe_rows) if r["model"] == job.model.name]
    if mine:
        rows = [{"task": TASK_TITLE[t], **{v: format(mine[0][column(t, v)], TASK_FORMAT[t]) for v in VARIANTS}}
                for t in TASKS]
        log(_indent(table_markdown(rows, [("task", "probe", "")] + [(v, VARIANT_LABEL[v], "") for v in VARIANTS])))
    if probes.trials:
        startup = float(np.mean([t["seconds_startup"] for t in probes.trials]))
        training = float(np.mean([t["seconds_train"] for t in probes.trials]))
        log(f"  probe stages {seconds['probe-features'] + seconds['probe']:.0f} s: {len(probes.trials)} trials, each "
            f"~{startup:.1f} s of Ray Train start-up and ~{training:.2f} s of training, up to {probes.max_concurrent} at once")
    return probe_rows


def _log_planted(job: JobConfig, root, cds, log) -> dict:
    """The planted model's known answer: does CDS separate its two kinds of direction, and does
    removing them cost what it should?"""
    from scope_ray.planted_check import planted_recovery, planted_removal_effect

    rec = planted_recovery(job, root, cds.table.column("cds").to_numpy())
    log("")
    log(f"  planted ground truth: SAE features aligned with a planted global-scope direction: {rec['global']['features']} "
        f"(CDS median {rec['global']['median_cds']:.3f}); with a local-scope one: {rec['local']['features']} "
        f"(median {rec['local']['median_cds']:.3f}); AUROC {rec['auroc']:.3f} (1 = CDS separates them perfectly)")
    removal = planted_removal_effect(job, root)
    seg, dep = removal["segmentation"], removal["depth"]
    log(f"  planted removal: removing the {removal['groups']['local']} local-aligned features costs segmentation "
        f"{100 * seg['drop_local']:.1f} mIoU points and depth {dep['drop_local']:+.3f} m RMSE; removing the "
        f"{removal['groups']['global']} global-aligned ones {100 * seg['drop_global']:.1f} points and "
        f"{dep['drop_global']:+.3f} m (fresh scenes, in-process probes)")
    log("  note: demo-planted is a planted model (ground truth, not a real ViT). Its global-scope directions sit on")
    log("        high-norm tokens, so high-CDS features should dominate the outliers; its attention is a random")
    log("        ViT's, so the instability table shows no outlier effect here (that needs pretrained weights).")
    return {"planted": rec, "removal": removal}


def _log_accounting(job: JobConfig, root, log) -> None:
    """What was kept out and what was survived, stage by stage (the report's "Data accounting")."""
    from scope_ray.report.content import accounting_rows, collect

    log("")
    for row in accounting_rows(root, [r for r in collect(root) if r.name == job.model.name]):
        kept_out = [f"{row['rejected']} rejected ({row['reasons']})" if row.get("rejected") else "",
                    f"{row['nonfinite']} non-finite rows left out" if row.get("nonfinite") else "",
                    row.get("recovered", "")]
        if any(kept_out):
            log(f"  kept out / recovered  {row['stage']}: " + "; ".join(k for k in kept_out if k))


def _indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())

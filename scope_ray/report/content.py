"""``scope-ray report ROOT``: every committed result under a results root as one Markdown and one
self-contained HTML report, beside the paper's published numbers where the model matches.

Reads only what manifests mark complete (a stage directory without ``manifest.json`` is listed as
incomplete and never opened) through :class:`scope_ray.storage.ResultsRoot`, so local, ``file://``
and ``s3://`` roots read the same way. What goes in the report is decided here; the layout is
:mod:`scope_ray.report.document`'s. Reference: docs/report.md. Pure: no Ray.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_ray.report import published
from scope_ray.report import probes as pr
from scope_ray.models.registry import REGISTRY
from scope_ray.report.document import FIGURES_DIR, Document, Figure, Section, Table, render_html, render_markdown
from scope_ray.report.training import training_section, write_tensorboard
from scope_ray.pipeline import RESULT_DIRS
from scope_ray.storage import LOGS_DIR, ResultsRoot, code_version, join_uri, temp_name

# Result directories in pipeline order (scope_ray/pipeline.py); one with another name is still
# listed (after these).
STAGES = RESULT_DIRS
MODEL_FIGURES = "figures"  # ROOT/<model>/figures/: figures drawn outside a stage (e.g. the demo's token norms)
REPORT_DIR = "report"  # the default output, ROOT/report/
REPORT_MARKER = "report.md"  # a top-level folder holding one is a report, not a model
NOT_RUN = "not run"
INCOMPLETE = "incomplete (no manifest; not read)"

FIGURE_CAPTION = {
    "instability": "Mean attention EMD by SCC shift, outlier vs non-outlier tokens (Tables 7 / 9)",
    "cds_histogram": "CDS of every SAE feature with the γ split (Figure 6)",
    "awcds": "Mean awCDS by token-norm percentile (Figure 7)",
    "gallery_low": "Lowest-CDS (local-scope) features: top images with activation overlaid (Figure 9)",
    "gallery_high": "Highest-CDS (global-scope) features: top images with activation overlaid (Figure 10)",
    "token_norms": "Patch-token norms of the validation tokens, τ marked",
    "figure8_probe_accuracy": "ImageNet linear-probe top-1 per variant (Figure 8)",
}

_FIGURE_ORDER = {key: i for i, key in enumerate(FIGURE_CAPTION)}  # paper order within a stage


@dataclass(frozen=True)
class ReportPaths:
    markdown: str
    html: str


@dataclass
class ModelRun:
    """One model folder: its stages' manifests (None = incomplete) and model-level figure paths."""

    name: str
    manifests: dict[str, dict | None] = field(default_factory=dict)
    model_figures: list[str] = field(default_factory=list)

    def status(self, stage: str) -> str:
        if stage not in self.manifests:
            return NOT_RUN
        return "complete" if self.manifests[stage] is not None else INCOMPLETE

    def complete(self, stage: str) -> bool:
        return self.manifests.get(stage) is not None


# ------------------------------------------------------------------------------------ reading
def collect(root: ResultsRoot) -> list[ModelRun]:
    """Every model folder under ``root`` with its stage folders; ValueError when there is none."""
    runs = []
    for model in root.models():
        mpath = posixpath.join(root.path, model)
        if root.fs.exists(posixpath.join(mpath, REPORT_MARKER)):
            continue
        run = ModelRun(model)
        for sub in sorted(root.fs.ls(mpath, detail=False)):
            name = posixpath.basename(sub.rstrip("/"))
            if name.startswith((".", "_")) or not root.fs.isdir(sub):
                continue
            if name == MODEL_FIGURES:
                run.model_figures = sorted(root.fs.glob(posixpath.join(sub, "*.png")))
            elif name == LOGS_DIR:  # the sweep's job logs and state (docs/sweep.md), not a stage
                continue
            else:
                run.manifests[name] = root.stage(model, name).manifest()
        # A stage that wrote part files but no manifest yet (running, or killed) has no folder of its
        # own: its partitions in ROOT/tables/ say it was started.
        for name in sorted(root.stages_with_tables(model) - set(run.manifests)):
            run.manifests[name] = root.stage(model, name).manifest()
        runs.append(run)
    if not runs:
        raise ValueError(f"no results under {root.uri}: expected ROOT/<model>/<stage>/ folders (docs/storage.md)")
    return sorted(runs, key=lambda r: pr.model_key(r.name))


def _read(root: ResultsRoot, model: str, stage: str, table: str) -> list[dict]:
    return root.stage(model, stage).read_table(table).to_pylist()


# The paper's SAE settings for every model (METHOD §2, supp. A): q = 32 x width, K = 30.
PAPER_EXPANSION, PAPER_K = 32, 30


def setting_differences(model: str, manifests: list[dict]) -> list[str]:
    """Where this run's recorded settings leave the paper's for ``model``: the designated layer
    (extract; only where the paper states one, :data:`published.LAYER`: not for the CLIPs, see
    :func:`layer_caveat`), the dictionary size and K (train-sae). Empty when nothing recorded differs."""
    paper_layer = published.LAYER.get(model)
    diffs = []
    for m in manifests:
        if m.get("stage") == "extract" and paper_layer is not None and m.get("layer") not in (None, paper_layer):
            diffs.append(f"layer {m['layer']} (paper: {paper_layer})")
        if m.get("stage") == "train-sae":
            if m.get("imported"):  # sae.source: the SAE's origin is named wherever the differences are
                origin = m["imported"]
                diffs.append(f"SAE imported from {origin.get('toolkit')} ({origin.get('architecture')}, "
                             f"{m.get('activation')}; {origin.get('source')}), not trained here (paper: BatchTopK)")
            if m.get("k") not in (None, PAPER_K):
                diffs.append(f"K = {m['k']} (paper: {PAPER_K})")
            if m.get("d_sae") and m.get("d_in") and m["d_sae"] != PAPER_EXPANSION * m["d_in"]:
                diffs.append(f"q = {m['d_sae']} (paper: {PAPER_EXPANSION} x {m['d_in']})")
    return diffs


def layer_caveat(model: str | None, manifests: list[dict]) -> str:
    """For a paper model whose designated layer the paper does not state (the CLIPs): which layer the
    run read and that this project's default is its own decision, with the reason; "" otherwise. So a
    comparison never passes this project's CLIP layer off as the paper's."""
    if model not in published.LAYER or published.LAYER[model] is not None or model not in REGISTRY:
        return ""
    spec = REGISTRY[model]
    used = next((m["layer"] for m in manifests if m.get("stage") == "extract" and m.get("layer") is not None), None)
    run = f"this run read layer {used}" if used is not None else "the manifests do not record the layer"
    return (f"{run}, but the paper does not state CLIP's designated layer (supp. Table 5 lists only the other "
            f"ViTs), so its numbers may come from another block; this project's default is the penultimate block "
            f"({spec.layer} of {spec.depth}), a decision (METHOD §1): removal edits patch tokens only, and at the last "
            "block it could not reach CLIP's class-token embedding, so zero-shot would show no effect by construction")


def comparability(manifests: list[dict], model: str | None = None) -> tuple[str, str]:
    """Whether the paper's numbers mean anything next to this run: ``(verdict, why)`` with verdict
    ``comparable``, ``not meaningful`` or ``unverified``, from what the committed manifests record:
    ``weights`` ('none' = random init; the extract and zeroshot stages record it) and ``synthetic_data``
    (extract records ``data.synthetic``)."""
    weights = sorted({str(m["weights"]) for m in manifests if m.get("weights") is not None})
    if "none" in weights:
        return "not meaningful", "random-init weights (`weights: none`): the paper used pretrained weights"
    if any(m.get("synthetic_data") for m in manifests):
        return "not meaningful", "synthetic data: the paper used ImageNet-1K, ADE20K and NYUd"
    diffs = setting_differences(model, manifests) if model else []
    caveat = layer_caveat(model, manifests)
    caveat = f"; {caveat}" if caveat else ""
    if diffs:
        return "not meaningful", "settings differ from the paper's: " + ", ".join(diffs) + caveat
    if not weights:
        return "unverified", ("the manifests do not record the weights; the paper's numbers hold only for "
                              "pretrained weights on the paper's data" + caveat)
    return "comparable", f"weights {', '.join(weights)}; no synthetic data recorded" + caveat


NO_PUBLISHED = ("none", "the paper reports no numbers for this model")


def has_published(model: str) -> bool:
    return any(model in table for table in (published.SAE_EVAL, published.INSTABILITY, published.PARTITION,
                                            published.PROBES))


def _weights(run: ModelRun) -> str:
    found = sorted({str(m["weights"]) for m in run.manifests.values() if m and m.get("weights") is not None})
    return ", ".join(found) or "not recorded"


# ------------------------------------------------------------------------------------ tables
def _status_row(run: ModelRun, stage: str) -> dict:
    return {"model": run.name, "row": run.status(stage), "_kind": "missing"}


def _paper_row(run: ModelRun, source: str, values: dict, verdicts: dict[str, tuple[str, str]]) -> dict:
    return {"model": run.name, "row": f"paper ({source})", "_kind": "paper",
            "vs_paper": verdicts[run.name][0], **values}


def _notes(rows: list[dict], verdicts: dict[str, tuple[str, str]]) -> list[str]:
    seen = dict.fromkeys(r["model"] for r in rows if r.get("_kind") == "paper")
    return [f"{m} vs paper: {verdicts[m][0]}: {verdicts[m][1]}" for m in seen]


def _ours(run: ModelRun, values: dict) -> dict:
    return {"model": run.name, "row": "this run", "_kind": "ours", **values}


def _guarded(run: ModelRun, stage: str, build) -> list[dict]:
    """``build(run)``: our row(s) from a complete stage; or one row saying why there are none."""
    if not run.complete(stage):
        return [_status_row(run, stage)]
    try:
        return build(run)
    except Exception as exc:  # noqa: BLE001 - one unreadable table must not hide the rest of the report
        return [{"model": run.name, "row": f"unreadable: {type(exc).__name__}: {exc}"[:160], "_kind": "missing"}]


_LEAD = [("model", "model", ""), ("row", "row", "")]


def _compared(cols: list, rows: list[dict], verdicts, title: str = "") -> Table:
    """A table of our rows and the paper's; the ``vs paper`` column and its notes only when a paper row is there."""
    has_paper = any(r.get("_kind") == "paper" for r in rows)
    return Table(cols + ([("vs_paper", "vs paper", "")] if has_paper else []), rows, title=title,
                 notes=_notes(rows, verdicts))


def sae_origin(run: ModelRun) -> str:
    """Where the model's SAE comes from: trained here, or imported from another toolkit (sae.source)."""
    m = run.manifests.get("train-sae") or {}
    imported = m.get("imported")
    if imported:
        return f"imported: {imported.get('toolkit')} {imported.get('architecture')} ({m.get('activation')})"
    return "trained here (BatchTopK)" if m else "–"


def sae_eval_section(root: ResultsRoot, runs: list[ModelRun], verdicts) -> Section:
    rows = []
    for run in runs:
        rows += _guarded(run, "eval-sae", lambda r: [{**_ours(r, row), "sae": sae_origin(r)}
                                                     for row in _read(root, r.name, "eval-sae", "sae_eval")])
        if run.name in published.SAE_EVAL:
            rows.append(_paper_row(run, published.SAE_EVAL_SOURCE, published.SAE_EVAL[run.name], verdicts))
    cols = _LEAD + [("sae", "SAE", ""), ("fvu_all", "FVU_A", ".3f"), ("fvu_outlier", "FVU_O", ".3f"), ("l0_all", "L0_A", ".3f"),
                    ("l0_outlier", "L0_O", ".3f"), ("cs_all", "CS_A", ".3f"), ("cs_outlier", "CS_O", ".3f"),
                    ("tau", "τ", ".4g"), ("outlier_tokens", "outlier tokens", "d"), ("tokens", "tokens", "d"),
                    ("dead_latents", "dead latents", "d"), ("dense_latents", "dense latents", "d")]
    return Section("SAE reconstruction (Table 6)", [
        "FVU, L0 and cosine similarity over all validation patch tokens (A) and outlier tokens (O, norm > τ); "
        "the SAE in JumpReLU mode at its trained threshold. Dead latents fire on no validation token; dense "
        "ones on more than sae.dense_fraction of them (the paper reports neither)."],
        [_compared(cols, rows, verdicts)])


def instability_section(root: ResultsRoot, runs: list[ModelRun], verdicts) -> Section:
    rows, shifts = [], set()

    def ours(run):
        out = {}
        for r in _read(root, run.name, "instability", "summary"):
            s = int(r["shift"])
            shifts.add(s)
            out.update({f"d_non_{s}": r["d_non"], f"d_out_{s}": r["d_out"], "images": r.get("images")})
        # Which alignment produced these numbers (scope.instability_alignment); a manifest from
        # before the key existed can only be the common canvas, the one placement there was then.
        out["alignment"] = (run.manifests.get("instability") or {}).get("alignment", "canvas (not recorded)")
        return [_ours(run, out)]

    for run in runs:
        rows += _guarded(run, "instability", ours)
        paper = published.INSTABILITY.get(run.name)
        if paper:
            shifts.update(paper)
            values = {k: v for s, (dn, do) in paper.items() for k, v in ((f"d_non_{s}", dn), (f"d_out_{s}", do))}
            rows.append(_paper_row(run, published.INSTABILITY_SOURCE[run.name], {**values, "alignment": "not stated"},
                                   verdicts))
    cols = list(_LEAD)
    for s in sorted(shifts):
        cols += [(f"d_non_{s}", f"D_non s={s}", ".3f"), (f"d_out_{s}", f"D_out s={s}", ".3f")]
    cols += [("images", "images", "d"), ("alignment", "alignment", "")]
    return Section("Outlier instability (Tables 7 and 9)", [
        "Mean attention EMD (in patches) between the two views of a Shifted Context Crop, over non-outlier "
        "(D_non) and outlier (D_out) tokens, per shift s; s = 1 is Table 7, the s sweep Table 9.",
        "The alignment column says where each run placed the two views' attention rows before the EMD "
        "(scope.instability_alignment, docs/instability.md): canvas = the common (p+s)² canvas, view 2 at "
        "offset s (a uniform or view-anchored row scores exactly s·√2 there); view = each view's own frame; "
        "overlap = only the shared patches, renormalised. The paper does not state its alignment."],
        [_compared(cols, rows, verdicts)])


def partition_section(root: ResultsRoot, runs: list[ModelRun], verdicts) -> Section:
    from scope_ray.stages.partition import SENSITIVITY_COLUMNS, table4_columns

    rows, groups, sensitivity = [], [], []
    for run in runs:
        rows += _guarded(run, "partition", lambda r: [_ours(r, row) for row in _read(root, r.name, "partition", "partition")])
        if run.complete("partition"):
            groups += _guarded(run, "partition",
                               lambda r: [{"model": r.name, **g} for g in _read(root, r.name, "partition", "groups")])
            sensitivity += _guarded(run, "partition", lambda r: [
                {"model": r.name, **g} for g in _read(root, r.name, "partition", "gamma_sensitivity")])
        if run.name in published.PARTITION:
            rows.append(_paper_row(run, published.PARTITION_SOURCE, published.PARTITION[run.name], verdicts))
    cols = _LEAD + table4_columns()
    tables = [_compared(cols, rows, verdicts)]
    if sensitivity:
        tables.append(Table([("model", "model", "")] + SENSITIVITY_COLUMNS, sensitivity,
                            title="γ sensitivity: group sizes at γ − 0.05, γ, γ + 0.05"))
    if groups:
        tables.append(Table([("model", "model", ""), ("group", "group", ""), ("features", "features", "d"),
                             ("mean_act_outlier", "mean act. on outliers", ".3f"),
                             ("mean_act_normal", "mean act. on normal tokens", ".3f"),
                             ("outlier_share", "share on outliers", ".3f")], groups,
                            title="Group check: where each group's activation lands (high-CDS should favour outliers)"))
    return Section("CDS partition (Table 4)", [
        "SAE dictionary size, the threshold γ and the features it puts in the low-CDS (local scope, CDS ≤ γ) "
        "and high-CDS (global scope, CDS > γ) groups. Every feature is in exactly one bucket: low, high or "
        "unscored, with the reason (never fired on a pool image, all its images rejected, no usable image, or "
        "fewer usable images than scope.min_usable_images); the three sum to the dictionary size. γ 'auto' is "
        "Otsu's threshold over the scored features only."], tables)


def probe_rows(root: ResultsRoot, runs: list[ModelRun]) -> tuple[list[dict], dict[str, str]]:
    """Every complete probe stage's rows, read model by model so one unreadable table costs only
    its own model's rows: (rows, {model: why unreadable})."""
    rows, unreadable = [], {}
    for run in runs:
        if not run.complete("probe"):
            continue
        try:
            rows += pr.collect_probe_results(root, models=[run.name])
        except Exception as exc:  # noqa: BLE001 - as in _guarded
            unreadable[run.name] = f"unreadable: {type(exc).__name__}: {exc}"[:160]
    return rows, unreadable


def probe_section(root: ResultsRoot, runs: list[ModelRun], verdicts) -> Section:
    rows_read, unreadable = probe_rows(root, runs)
    ours = {r["model"]: r for r in pr.probe_table(rows_read)}
    tables = []
    for task in pr.TASKS:
        rows = []
        for run in runs:
            if run.name in ours:
                row = ours[run.name]
                has_task = any(math.isfinite(row[pr.column(task, v)]) for v in pr.VARIANTS)
                rows.append(_ours(run, {v: row[pr.column(task, v)] for v in pr.VARIANTS}) if has_task
                            else {"model": run.name, "row": f"{task} not searched", "_kind": "missing"})
            elif run.name in unreadable:
                rows.append({"model": run.name, "row": unreadable[run.name], "_kind": "missing"})
            else:
                rows.append(_status_row(run, "probe"))
            paper = {v: pr.PUBLISHED.get(run.name, {}).get((task, v)) for v in pr.VARIANTS}
            if any(x is not None for x in paper.values()):
                rows.append(_paper_row(run, published.PROBES_SOURCE.get(run.name, "paper"), paper, verdicts))
        spec = pr.TASK_FORMAT[task]
        cols = _LEAD + [(v, pr.VARIANT_LABEL[v], spec) for v in pr.VARIANTS]
        tables.append(_compared(cols, rows, verdicts, pr.TASK_TITLE[task]))
    return Section("Linear probes after feature-group removal (Tables 3 and 8)", [
        "Best-on-validation result of the probe search per variant. The random-removal control is this "
        "project's addition; the paper reports no number for it."], tables)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _signed(delta: float) -> str:
    """A signed Δ confidence that does not round a small but real change to ±0.000."""
    return f"{delta:+.3f}" if delta == 0 or abs(delta) >= 1e-3 else f"{delta:+.2e}"


def zeroshot_effect(model: str, rows: list[dict], manifest: dict | None = None) -> str:
    """One sentence from a committed ``zeroshot`` table (raw variant names): which removal variant
    moved CLIP's mean max-softmax confidence most (largest |Δ|; the first in table order on a tie),
    by how much, and its top-1 change in points; or that none moved it (and why, when the stage
    recorded that every variant equals the original by construction)."""
    base = next((r for r in rows if r["variant"] == "original"), None)
    moved = [r for r in rows if r["variant"] != "original" and r.get("mean_confidence_delta") is not None
             and math.isfinite(r["mean_confidence_delta"])]
    if base is None or not moved:
        return f"{model}: no removal variant to set against the original."
    best = max(moved, key=lambda r: abs(r["mean_confidence_delta"]))
    if best["mean_confidence_delta"] == 0 and all(r.get("top1_delta") == 0 for r in moved):
        why = (" — by construction: the designated layer is the last block and the image embedding the class "
               "token, which removal (on patch tokens only) never reaches"
               if (manifest or {}).get("variants_equal_original_by_construction") else "")
        return f"{model}: no removal variant moved the mean confidence or top-1{why}."
    label = pr.VARIANT_LABEL.get(best["variant"], best["variant"])
    digits = 3 if abs(best["mean_confidence_delta"]) >= 1e-3 else 5  # so the two values differ in print
    return (f"{model}: {label} moved the mean confidence most, by {_signed(best['mean_confidence_delta'])} "
            f"({base['mean_confidence']:.{digits}f} → {best['mean_confidence']:.{digits}f}; top-1 "
            f"{100 * best['top1_delta']:+.1f} points).")


def zeroshot_section(root: ResultsRoot, runs: list[ModelRun]) -> Section | None:
    with_stage = [r for r in runs if "zeroshot" in r.manifests or getattr(REGISTRY.get(r.name), "has_text_tower", False)]
    if not any("zeroshot" in r.manifests for r in runs):
        return None
    rows, effects = [], []
    for run in with_stage:
        rows += _guarded(run, "zeroshot", lambda r: [
            _ours(r, {**row, "variant": pr.VARIANT_LABEL.get(row["variant"], row["variant"]),
                      "top1": _percent(row["top1"]), "top1_delta": _percent(row["top1_delta"])})
            for row in _read(root, r.name, "zeroshot", "zeroshot")])
        if run.complete("zeroshot"):
            try:
                effects.append(zeroshot_effect(run.name, _read(root, run.name, "zeroshot", "zeroshot"),
                                               run.manifests["zeroshot"]))
            except Exception:  # noqa: BLE001 - the table already shows the stage as unreadable
                pass
    cols = _LEAD + [("variant", "variant", ""), ("top1", "top-1 %", ".2f"), ("top1_delta", "Δ top-1", "+.2f"),
                    ("mean_confidence", "mean confidence", ".3f"), ("mean_confidence_delta", "Δ confidence", "+.3f"),
                    ("n_images", "images", "d"), ("n_classes", "classes", "d")]
    return Section("CLIP zero-shot per variant", [
        "Zero-shot top-1 and mean max-softmax confidence per removal variant, Δ against the original. The "
        "paper states this effect only qualitatively, so there is no published row.", *effects], [Table(cols, rows)])


# ------------------------------------------------------------------------------- data accounting
def _reason_key(reason: str) -> str:
    """The stable head of a reject reason (``too large: 12000x12000 ...`` -> ``too large``)."""
    return str(reason).split(":")[0].strip()


def _accounting_row(root: ResultsRoot, run: ModelRun, stage: str) -> dict | None:
    """What a complete stage left out and what it recovered from; None when it records neither."""
    m = run.manifests[stage] or {}
    row: dict = {"model": run.name, "stage": stage}
    if "rejects" in (m.get("tables") or {}):
        reasons = Counter(_reason_key(r) for r in
                          root.stage(run.name, stage).read_table("rejects", columns=["reason"]).column("reason").to_pylist())
        row["rejected"] = sum(reasons.values())
        row["reasons"] = ", ".join(f"{k} {n}" for k, n in reasons.most_common())
    if isinstance(m.get("nonfinite_rows"), int):
        row["nonfinite"] = m["nonfinite_rows"]
    recovered = []
    if m.get("resumed_from_steps"):
        recovered.append("Train workers restarted, resumed from step " + ", ".join(map(str, m["resumed_from_steps"])))
    if stage == "probe" and "trials" in (m.get("tables") or {}):
        trials = root.stage(run.name, stage).read_table("trials")
        if "resumed_from_epoch" in trials.column_names:
            epochs = [e for e in trials.column("resumed_from_epoch").to_pylist() if e]
            if epochs:
                recovered.append(f"{len(epochs)} trial(s) resumed from a mid-trial checkpoint")
    if recovered:
        row["recovered"] = "; ".join(recovered)
    return row if len(row) > 2 else None


def accounting_rows(root: ResultsRoot, runs: list[ModelRun]) -> list[dict]:
    """Per complete stage that records any: images rejected (``rejected``, ``reasons``), non-finite
    rows left out (``nonfinite``), restarts survived (``recovered``)."""
    rows = []
    for run in runs:
        for stage in [s for s in STAGES if run.complete(s)] + [s for s in run.manifests if s not in STAGES and run.complete(s)]:
            try:
                row = _accounting_row(root, run, stage)
            except Exception as exc:  # noqa: BLE001 - one unreadable table costs its own row only
                row = {"model": run.name, "stage": stage, "reasons": f"unreadable: {type(exc).__name__}: {exc}"[:160]}
            if row:
                rows.append(row)
    return rows


def accounting_section(root: ResultsRoot, runs: list[ModelRun]) -> Section:
    rows = accounting_rows(root, runs)
    cols = [("model", "model", ""), ("stage", "stage", ""), ("rejected", "rejected", ""),
            ("nonfinite", "non-finite rows left out", ""), ("recovered", "recovered from", ""),
            ("reasons", "reject reasons", "")]
    paras = ["What each complete stage left out, and why (its `rejects` table; docs/reliability.md lists every "
             "kind of bad input), and the failures it recovered from. Nothing else was dropped: each stage checks "
             "its rows against images in minus rejects before it commits."]
    if not rows:
        paras.append("No stage rejected anything or needed to recover.")
    return Section("Data accounting: rejects and recoveries", paras, [Table(cols, rows)] if rows else [])


# ------------------------------------------------------------------------------- status, figures
def _rows_text(rows: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (rows or {}).items())


def _wall_seconds(m: dict) -> float | None:
    """Wall time where the stage records one (the probe search per Tune search, or a top-level field)."""
    for key in ("wall_seconds", "seconds"):
        if isinstance(m.get(key), (int, float)):
            return float(m[key])
    searches = [s.get("wall_seconds") for s in m.get("searches") or [] if isinstance(s, dict)]
    return float(sum(searches)) if searches and all(isinstance(s, (int, float)) for s in searches) else None


def status_section(run: ModelRun, verdict: tuple[str, str]) -> Section:
    rows = []
    for s in list(STAGES) + sorted(s for s in run.manifests if s not in STAGES):
        m = run.manifests.get(s)
        rows.append({"stage": s, "status": run.status(s), "rows": _rows_text(m.get("rows")) if m else None,
                     "wall": _wall_seconds(m) if m else None, "at": (m or {}).get("committed_at"),
                     "code": (m or {}).get("code_version")})
    # Rows per table last: it is the long cell, and the short ones stay in view in a terminal.
    cols = [("stage", "stage", ""), ("status", "status", ""), ("wall", "wall s", ".0f"),
            ("at", "committed (UTC)", ""), ("code", "code", ""), ("rows", "rows per table", "")]
    spec = REGISTRY.get(run.name)
    paras = [f"Model: {spec.description if spec else 'not in the registry'}."]
    extract = run.manifests.get("extract") or {}
    for table, inp in (extract.get("inputs") or {}).items():
        src = inp.get("source") or {}
        paras.append(f"Data, {table}: {inp.get('split')} split, {src.get('format')} at `{src.get('path')}` "
                     f"({inp.get('images')} images in, {inp.get('rejected')} rejected).")
    paras.append(f"Published numbers: {verdict[0]}: {verdict[1]}.")
    return Section(f"Stages: {run.name}", paras, [Table(cols, rows)], level=3)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _figures(root: ResultsRoot, run: ModelRun) -> tuple[list[Figure], list[str]]:
    """The figures each complete stage's manifest lists (read from that stage's figures/ folder, so a
    moved root still resolves) and the model-level figures/*.png; plus notes on listed-but-missing ones."""
    figures, missing = [], []
    for stage in [s for s in STAGES if run.complete(s)] + [s for s in run.manifests if s not in STAGES and run.complete(s)]:
        listed = (run.manifests[stage].get("figures") or {}).items()
        for key, uri in sorted(listed, key=lambda kv: (_FIGURE_ORDER.get(kv[0], len(_FIGURE_ORDER)), kv[0])):
            name = posixpath.basename(str(uri))
            path = posixpath.join(root.path, run.name, stage, "figures", name)
            try:
                png = root.fs.cat_file(path)
            except FileNotFoundError:
                missing.append(f"{stage}: {name} is listed in the manifest but not on storage")
                continue
            figures.append(Figure(f"{FIGURE_CAPTION.get(key, key)} — {run.name}, {stage}",
                                  _slug(f"{run.name}--{stage}--{name}"), png))
    for path in run.model_figures:
        name = posixpath.basename(path)
        figures.append(Figure(f"{FIGURE_CAPTION.get(Path(name).stem, Path(name).stem)} — {run.name}",
                              _slug(f"{run.name}--{name}"), root.fs.cat_file(path)))
    return figures, missing


def figure8_section(root: ResultsRoot, runs: list[ModelRun], tmp: Path) -> Section | None:
    rows, _ = probe_rows(root, runs)
    if not any(r["task"] == "classification" for r in rows):
        return None
    path = pr.figure8(rows, tmp / "figure8.png", title="ImageNet linear probe top-1 across scales (hollow: paper)")
    return Section("Probe accuracy across model scales (Figure 8)", [],
                   figures=[Figure("ImageNet linear-probe top-1 per variant and model (Figure 8)", "figure8.png",
                                   path.read_bytes())])


# ------------------------------------------------------------------------------------ writing
def build_document(root: ResultsRoot, tmp: Path, compare: tuple[ResultsRoot, ...] = ()) -> Document:
    """The whole report of ``root``; ``compare``: other roots whose SAEs of the same models are set
    beside this root's (scope_ray.report.compare)."""
    runs = collect(root)
    verdicts = {r.name: comparability([m for m in r.manifests.values() if m], r.name) if has_published(r.name)
                else NO_PUBLISHED for r in runs}
    versions = sorted({m["code_version"] for r in runs for m in r.manifests.values() if m and m.get("code_version")})
    overview = Section("Overview", [
        f"Results root: `{root.uri}`.",
        f"Made {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by scope-ray {code_version()}; "
        f"results written by {', '.join(versions) or 'no complete stage'}.",
        "Rows marked `paper` are the published numbers for the same model (docs/report.md). They are "
        "comparable only with pretrained weights and the paper's data; `vs paper` says whether this run is."],
        [Table([("model", "model", ""), ("complete", "stages complete", ""), ("incomplete", "incomplete", ""),
                ("weights", "weights", ""), ("vs_paper", "vs paper", "")],
               [{"model": r.name, "complete": f"{sum(r.complete(s) for s in r.manifests)}/{len(r.manifests)}",
                 "incomplete": ", ".join(s for s in r.manifests if not r.complete(s)) or "none",
                 "weights": _weights(r), "vs_paper": verdicts[r.name][0]} for r in runs])])
    sections = [overview, sae_eval_section(root, runs, verdicts), instability_section(root, runs, verdicts),
                partition_section(root, runs, verdicts), probe_section(root, runs, verdicts)]
    zs = zeroshot_section(root, runs)
    sections += [zs] if zs else []
    fig8 = figure8_section(root, runs, tmp)
    sections += [fig8] if fig8 else []
    curves = training_section(root, runs, tmp)
    sections += [curves] if curves else []
    if compare:
        from scope_ray.report.compare import comparison_section

        sections.append(comparison_section(root, list(compare), tmp))
    for run in runs:
        figures, missing = _figures(root, run)
        sections.append(Section(f"Figures: {run.name}", missing or ([] if figures else ["No figures recorded."]),
                                figures=figures))
    sections.append(accounting_section(root, runs))
    sections.append(Section("Stage status", ["Complete = the stage's manifest exists; only the part files it "
                                             "lists were read. Incomplete stages are never read."]))
    sections += [status_section(r, verdicts[r.name]) for r in runs]
    return Document("scope-ray results report", sections)


def _write_local(doc: Document, out: Path) -> ReportPaths:
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES_DIR).mkdir(exist_ok=True)
    for sec in doc.sections:
        for f in sec.figures:
            _replace(out / FIGURES_DIR / f.filename, f.png)
    md, page = out / "report.md", out / "report.html"
    _replace(md, render_markdown(doc).encode("utf-8"))
    _replace(page, render_html(doc).encode("utf-8"))
    return ReportPaths(str(md), str(page))


def _replace(path: Path, data: bytes) -> None:
    """Write beside, then rename: someone reading the previous report meanwhile sees it whole."""
    tmp = Path(temp_name(str(path)))  # two reports at once: two temp files
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(root: str, out: str | None = None, endpoint_url: str | None = None,
                 compare: tuple[str, ...] = ()) -> ReportPaths:
    """Write ``report.md`` (+ ``figures/``) and a self-contained ``report.html`` for ``root``.

    ``out``: a local folder; default ``ROOT/report/`` — for an ``s3://`` root the report is made in a
    temporary folder and uploaded there, and the returned paths are its ``s3://`` URIs.
    ``compare``: other results roots (same endpoint) whose SAEs of the same models are compared
    with this root's by scope ("Scope across SAEs")."""
    results = ResultsRoot(root, endpoint_url)
    others = tuple(ResultsRoot(other, endpoint_url) for other in compare)
    with tempfile.TemporaryDirectory(prefix="scope-ray-report-") as tmp:
        doc = build_document(results, Path(tmp), others)
        if out is not None or results.scheme == "file":
            target = (Path(out) if out is not None else Path(results.path) / REPORT_DIR).absolute()
            paths = _write_local(doc, target)
            write_tensorboard(results, collect(results), target)
            return paths
        local = _write_local(doc, Path(tmp) / REPORT_DIR)
        write_tensorboard(results, collect(results), Path(tmp) / REPORT_DIR)
        dest = posixpath.join(results.path, REPORT_DIR)
        for path in sorted(Path(local.markdown).parent.rglob("*")):
            if path.is_file():
                results.fs.put_file(str(path), posixpath.join(dest, path.relative_to(Path(local.markdown).parent).as_posix()))
        return ReportPaths(join_uri(results.uri, REPORT_DIR, "report.md"), join_uri(results.uri, REPORT_DIR, "report.html"))

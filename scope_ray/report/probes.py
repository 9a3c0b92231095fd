"""The probe results as the paper shows them: Table 3 / supp. Table 8 and supp. Figure 8.

Reads the committed ``probe`` stage of every model under a results root (its ``best`` table:
one row per (task, variant), the best-on-val trial; ``scope_ray/stages/probe.py``) and lays it
out as

- :func:`probe_table`: one row per model, one column per task x variant in the paper's units
  (ImageNet top-1 and ADE20K mIoU in %, NYUd RMSE in metres), beside the published number where
  the paper has one for that model (:data:`PUBLISHED`); :func:`probe_markdown` renders it;
- :func:`figure8`: ImageNet linear-probe top-1 per variant across the model scales of each family.

Pure: pyarrow through :mod:`scope_ray.storage`, NumPy and matplotlib (Agg); no Ray, no torch.

Scale. Models of a family are ordered by ``depth * width**2`` from the registry, proportional to
the parameter count of the transformer blocks (each block holds ≈ 12·width² weights), so it orders
S < B < L < G in every family without a table of parameter counts. Ties (CLIP ViT-L/14 and
ViT-L/14-336 share their blocks) fall back to registry order, which puts the 224-px model first.
A model not in the registry has family ``"unknown"`` and no scale (NaN); it sorts after the known
models, by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from scope_ray.models.registry import REGISTRY
from scope_ray.report.figures import GREY, BLUE, RED, no_data, prepare_output, pyplot, save_figure, table_markdown
from scope_ray.storage import ResultsRoot

STAGE = "probe"
# Mirrors scope_ray.stages.probe.TASKS / METRICS and probe_features.VARIANTS (tests check they
# agree); copied rather than imported because those modules pull in torch.
TASKS = ("classification", "segmentation", "depth")
VARIANTS = ("original", "high_removed", "low_removed", "random_removed")
METRIC = {"classification": "top1", "segmentation": "miou", "depth": "rmse"}
# Stored value -> table unit: top-1 and mIoU are fractions in the stage, percent in the paper.
TABLE_SCALE = {"classification": 100.0, "segmentation": 100.0, "depth": 1.0}
TASK_TITLE = {
    "classification": "ImageNet linear probe top-1 (%, higher is better)",
    "segmentation": "ADE20K linear probe mIoU (%, higher is better)",
    "depth": "NYUd linear probe RMSE (m, lower is better)",
}
TASK_FORMAT = {"classification": ".2f", "segmentation": ".2f", "depth": ".4f"}
VARIANT_LABEL = {
    "original": "original",
    "high_removed": "high-CDS removed",
    "low_removed": "low-CDS removed",
    "random_removed": "random removed",
}
UNKNOWN_FAMILY = "unknown"

# Published linear-probe results, in table units (top-1 / mIoU in %, RMSE in m), keyed by
# registry name, then (task, variant). Only the three variants the paper reports; the random
# control is this project's addition (METHOD §8) and has no published number.
PUBLISHED: dict[str, dict[tuple[str, str], float]] = {
    # Main paper Table 3, as quoted in METHOD.md §12 (order there: original / high-CDS-removed /
    # low-CDS-removed). "CLIP-B/16" -> clip-vit-b16.
    "clip-vit-b16": {
        ("classification", "original"): 74.82, ("classification", "high_removed"): 75.54,
        ("classification", "low_removed"): 64.86,
        ("segmentation", "original"): 25.87, ("segmentation", "high_removed"): 26.02,
        ("segmentation", "low_removed"): 11.65,
        ("depth", "original"): 0.8841, ("depth", "high_removed"): 0.8616, ("depth", "low_removed"): 0.9481,
    },
    # Main paper Table 3 via METHOD.md §12: "CLIP-L/14" is the 224-px ViT-L/14 (clip-vit-l14),
    # not the 336-px model, which the paper names "ViT-L/14-336px" where it means it.
    "clip-vit-l14": {
        ("classification", "original"): 80.82, ("classification", "high_removed"): 81.28,
        ("classification", "low_removed"): 78.30,
        ("segmentation", "original"): 26.66, ("segmentation", "high_removed"): 26.44,
        ("segmentation", "low_removed"): 13.89,
        ("depth", "original"): 0.8029, ("depth", "high_removed"): 0.7994, ("depth", "low_removed"): 0.8878,
    },
    # Supplementary Table 8 (ADE20K mIoU, NYUd RMSE; "the Base-scale DINOv2, DeiT3, and SigLIP2
    # models"; rows Original / high-CDS-removed / low-CDS-removed). Their ImageNet top-1 is only
    # drawn in supp. Figure 8, with no numbers printed, so none is transcribed.
    "dinov2-b": {
        ("segmentation", "original"): 25.26, ("segmentation", "high_removed"): 26.11,
        ("segmentation", "low_removed"): 15.47,
        ("depth", "original"): 0.7500, ("depth", "high_removed"): 0.7539, ("depth", "low_removed"): 0.8402,
    },
    "deit3-b": {
        ("segmentation", "original"): 26.48, ("segmentation", "high_removed"): 26.26,
        ("segmentation", "low_removed"): 8.38,
        ("depth", "original"): 0.8444, ("depth", "high_removed"): 0.8391, ("depth", "low_removed"): 1.0607,
    },
    "siglip2-b": {
        ("segmentation", "original"): 35.62, ("segmentation", "high_removed"): 35.39,
        ("segmentation", "low_removed"): 16.93,
        ("depth", "original"): 0.8178, ("depth", "high_removed"): 0.8123, ("depth", "low_removed"): 0.9205,
    },
}

# Figure 8's colours (supp. Figure 8 caption: baseline green, high-CDS-removed blue,
# low-CDS-removed red); the random control, ours, grey and dashed.
_GREEN = "#228833"
_DARK_GREY = "#777777"
VARIANT_STYLE = {
    "original": dict(color=_GREEN, linestyle="-", marker="o"),
    "high_removed": dict(color=BLUE, linestyle="-", marker="s"),
    "low_removed": dict(color=RED, linestyle="-", marker="v"),
    "random_removed": dict(color=_DARK_GREY, linestyle="--", marker="x"),
}

_REGISTRY_INDEX = {name: i for i, name in enumerate(REGISTRY)}
_FAMILY_ORDER = list(dict.fromkeys(spec.family for spec in REGISTRY.values())) + [UNKNOWN_FAMILY]


def model_scale(model: str) -> float:
    """``depth * width**2`` from the registry (∝ transformer-block parameters); NaN if unknown."""
    spec = REGISTRY.get(model)
    return float(spec.depth * spec.width ** 2) if spec is not None else float("nan")


def model_family(model: str) -> str:
    spec = REGISTRY.get(model)
    return spec.family if spec is not None else UNKNOWN_FAMILY


def _model_key(model: str) -> tuple:
    """Family (registry order, unknown last), then scale, then registry order, then name."""
    family = model_family(model)
    scale = model_scale(model)
    return (_FAMILY_ORDER.index(family) if family in _FAMILY_ORDER else len(_FAMILY_ORDER),
            0 if math.isfinite(scale) else 1, scale if math.isfinite(scale) else 0.0,
            _REGISTRY_INDEX.get(model, len(_REGISTRY_INDEX)), model)


def model_key(model: str) -> tuple:
    """Sort key putting models in the paper's order: family, then scale (what every table here uses)."""
    return _model_key(model)


def _order(name: str, names: tuple[str, ...]) -> tuple[int, str]:
    return (names.index(name) if name in names else len(names), name)


def collect_probe_results(root: ResultsRoot, models: list[str] | None = None) -> list[dict]:
    """Every committed probe stage's ``best`` rows, flattened, one dict per (model, task, variant).

    Keys: ``model``, ``family``, ``scale`` (:func:`model_scale`), ``task``, ``variant``,
    ``metric``, ``value`` (as stored: top-1 / mIoU fractions, RMSE in m; NaN when every trial
    diverged) and ``trials`` (trials in that search). A model directory without a probe manifest
    (never run, interrupted) is skipped; only the part files the manifest lists are read. Sorted by
    family, scale, task and variant (paper order).
    """
    rows: list[dict] = []
    for model in root.models() if models is None else models:  # ``models``: only these
        stage = root.stage(model, STAGE)
        if stage.manifest() is None:
            continue
        family, scale = model_family(model), model_scale(model)
        for r in stage.read_table("best").to_pylist():
            value = r.get("value")
            rows.append({
                "model": model, "family": family, "scale": scale,
                "task": r["task"], "variant": r["variant"], "metric": r["metric"],
                "value": float("nan") if value is None else float(value),
                "trials": r.get("trials"),
            })
    rows.sort(key=lambda r: (_model_key(r["model"]), _order(r["task"], TASKS), _order(r["variant"], VARIANTS)))
    return rows


def column(task: str, variant: str) -> str:
    """Key of our result in a :func:`probe_table` row; the published one is ``"paper:" + key``."""
    return f"{task}/{variant}"


def probe_table(rows: list[dict]) -> list[dict]:
    """Table 3 / supp. Table 8 layout: one row per model (same order as :func:`collect_probe_results`).

    Each row has ``model``, ``family``, ``scale`` and, for every task in :data:`TASKS` and
    variant in :data:`VARIANTS`, ``column(task, variant)``: our best-on-val value in table units
    (top-1 and mIoU in %, RMSE in m), and ``"paper:" + column(task, variant)``: the published
    value from :data:`PUBLISHED`. Both are NaN where missing (a variant not run, a model the paper
    does not report). Rows of tasks or variants outside those lists are not shown.
    """
    by_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        model = r["model"]
        if model not in by_model:
            out: dict[str, Any] = {"model": model, "family": r.get("family", model_family(model)),
                                   "scale": r.get("scale", model_scale(model))}
            published = PUBLISHED.get(model, {})
            for task in TASKS:
                for variant in VARIANTS:
                    out[column(task, variant)] = float("nan")
                    out["paper:" + column(task, variant)] = float(published.get((task, variant), float("nan")))
            by_model[model] = out
        task, variant = r["task"], r["variant"]
        if task in TASKS and variant in VARIANTS:
            value = r["value"]
            value = float("nan") if value is None else float(value)
            by_model[model][column(task, variant)] = value * TABLE_SCALE[task]
    return [by_model[m] for m in sorted(by_model, key=_model_key)]


def probe_markdown(table: list[dict], tasks: tuple[str, ...] = TASKS) -> str:
    """:func:`probe_table` as Markdown for a terminal: one table per task (a heading line, then
    rows = models, columns = variants, each published number in a ``paper`` column right of ours).
    A task's ``paper`` columns are left out when no model in the table has a published number for
    it. "–" marks a missing value."""
    parts = []
    for task in tasks:
        has_paper = any(math.isfinite(row["paper:" + column(task, v)]) for row in table for v in VARIANTS)
        spec = TASK_FORMAT[task]
        columns: list[tuple[str, str, str]] = [("model", "model", "")]
        for variant in VARIANTS:
            columns.append((column(task, variant), VARIANT_LABEL[variant], spec))
            if has_paper and variant in {v for per in PUBLISHED.values() for (_, v) in per}:
                columns.append(("paper:" + column(task, variant), "paper", spec))
        parts.append(f"{TASK_TITLE[task]}\n\n" + table_markdown(table, columns))
    return "\n".join(parts)


def figure8_panels(rows: list[dict]) -> list[dict]:
    """What :func:`figure8` draws: one panel per family with a classification result.

    Each panel: ``family``, ``models`` (ordered by scale) and ``top1`` = {variant: [top-1 % per
    model, NaN where that model lacks the variant]} for the variants present in the family, in
    :data:`VARIANTS` order."""
    cls = [r for r in rows if r["task"] == "classification"]
    families = sorted({r["family"] for r in cls}, key=lambda f: _order(f, tuple(_FAMILY_ORDER)))
    panels = []
    for family in families:
        fam = [r for r in cls if r["family"] == family]
        models = sorted({r["model"] for r in fam}, key=_model_key)
        variants = sorted({r["variant"] for r in fam}, key=lambda v: _order(v, VARIANTS))
        top1 = {v: [float("nan")] * len(models) for v in variants}
        for r in fam:
            value = float("nan") if r["value"] is None else float(r["value"])
            top1[r["variant"]][models.index(r["model"])] = 100.0 * value
        panels.append({"family": family, "models": models, "top1": top1})
    return panels


def figure8(rows: list[dict], out_path: str | Path, *, title: str | None = None,
            show_published: bool = True) -> Path:
    """Supp. Figure 8: ImageNet linear-probe top-1 (%) per variant across the scales of each family.

    One panel per family with classification results (:func:`figure8_panels`); x: the family's
    models by scale, labelled by name; one line per variant present (original green, high-CDS
    removed blue, low-CDS removed red, random removed grey dashed). A model missing a variant
    leaves a gap; a lone model is a set of points. With ``show_published``, the paper's numbers
    (:data:`PUBLISHED`; only CLIP has published top-1) are drawn as hollow markers of the same
    colour. No classification rows: one panel saying "no data". Returns the PNG path.
    """
    plt = pyplot()
    path = prepare_output(out_path)
    panels = figure8_panels(rows)
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(1.0 + 3.4 * n, 3.6), dpi=120, squeeze=False)
    if not panels:
        no_data(axes[0, 0], "no classification probe results")
        axes[0, 0].set_axis_off()
    for ax, panel in zip(axes[0], panels):
        models = panel["models"]
        x = np.arange(len(models))
        any_point = False
        for variant, values in panel["top1"].items():
            y = np.asarray(values, dtype=np.float64)
            style = VARIANT_STYLE.get(variant, dict(color=GREY, linestyle=":", marker="."))
            ax.plot(x, y, label=VARIANT_LABEL.get(variant, variant), markersize=5, **style)
            any_point |= bool(np.isfinite(y).any())
        if show_published:
            for variant in VARIANTS:
                paper = np.array([PUBLISHED.get(m, {}).get(("classification", variant), np.nan) for m in models])
                if np.isfinite(paper).any():
                    style = VARIANT_STYLE[variant]
                    ax.plot(x, paper, linestyle="none", marker=style["marker"], markersize=8,
                            markerfacecolor="none", markeredgecolor=style["color"],
                            label=f"{VARIANT_LABEL[variant]} (paper)")
                    any_point = True
        if not any_point:
            no_data(ax, "all trials diverged")
        ax.set_xticks(x)
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_title(panel["family"], fontsize=9)
        ax.set_ylabel("ImageNet linear probe top-1 (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)

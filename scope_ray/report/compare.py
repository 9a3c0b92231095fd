"""Scope as an axis for comparing SAEs: one backbone, several SAEs side by side.

A results root holds one SAE per model (ROOT/<model>/train-sae/), so SAEs to compare live in
different roots — e.g. the same job run once training BatchTopK here and once with ``sae.source``
pointing at a TopK or JumpReLU SAE from another toolkit, each with its own ``storage.root``.
``scope-ray report ROOT --compare OTHER_ROOT ...`` adds a section that, for every model whose
partition stage is complete in two or more of those roots, shows the CDS distributions (one
figure, densities so that dictionary sizes may differ), γ and the group sizes of each SAE.
Pure: no Ray; reads only committed stages, like the rest of the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scope_ray.report.document import Figure, Section, Table
from scope_ray.storage import ResultsRoot

COLUMNS = [("model", "model", ""), ("root", "results root", ""), ("sae", "SAE", ""), ("layer", "layer", ""),
           ("dictionary_size", "q", "d"), ("gamma", "γ", ".3f"), ("gamma_source", "γ from", ""),
           ("low_cds", "low-CDS", "d"), ("high_cds", "high-CDS", "d"), ("unscored", "unscored", "d"),
           ("high_share", "high / scored", ".3f"), ("cds_median", "median CDS", ".3f")]


def _entry(root: ResultsRoot, run) -> dict | None:
    """One SAE's partition summary and its per-feature CDS, or None when partition is not complete."""
    from scope_ray.report.content import sae_origin

    if not run.complete("partition"):
        return None
    stage = root.stage(run.name, "partition")
    row = stage.read_table("partition").to_pylist()[0]
    cds = stage.read_table("features").column("cds").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = row["low_cds"] + row["high_cds"]
    finite = cds[np.isfinite(cds)]
    layer = (run.manifests.get("extract") or {}).get("layer")
    return {"model": run.name, "root": root.uri, "sae": sae_origin(run), "layer": layer,
            **{k: row[k] for k in ("dictionary_size", "gamma", "gamma_source", "low_cds", "high_cds", "unscored")},
            "high_share": row["high_cds"] / scored if scored else None,
            "cds_median": float(np.median(finite)) if finite.size else None, "_cds": cds}


def comparison_section(primary: ResultsRoot, others: list[ResultsRoot], tmp: Path) -> Section | None:
    """The "Scope across SAEs" section, or None when no model has a complete partition in two roots."""
    from scope_ray.report.content import collect
    from scope_ray.report.figures import cds_comparison

    by_model: dict[str, list[dict]] = {}
    for root in [primary, *others]:
        for run in collect(root):
            entry = _entry(root, run)
            if entry is not None:
                by_model.setdefault(run.name, []).append(entry)
    shared = {m: rows for m, rows in by_model.items() if len(rows) >= 2}
    if not shared:
        roots = ", ".join(f"`{r.uri}`" for r in [primary, *others])
        return Section("Scope across SAEs", [f"No model has a complete partition stage in two or more of {roots}: "
                                             "nothing to compare."])
    rows, figures, notes = [], [], []
    for model, entries in sorted(shared.items()):
        rows += [{k: v for k, v in e.items() if k != "_cds"} for e in entries]
        if len({e["layer"] for e in entries}) > 1:
            notes.append(f"{model}: the SAEs read different layers ({sorted({str(e['layer']) for e in entries})}); "
                         "their scope is not of the same activations.")
        series = [(f"{i + 1}: {e['sae']}", e["_cds"], e["gamma"]) for i, e in enumerate(entries)]
        path = cds_comparison(series, tmp / f"compare-{model}.png",
                              title=f"{model}: CDS of scored features per SAE (dashed: each one's γ)")
        figures.append(Figure(f"CDS distributions of {len(entries)} SAEs on {model} (numbered as in the table, "
                              "in root order)", f"compare--{model}.png", path.read_bytes()))
    return Section("Scope across SAEs", [
        "The same backbone with different SAEs, one per results root (this root first, then each --compare "
        "root): how each dictionary's features divide by information scope. γ is each SAE's own (its "
        "scope.gamma or Otsu on its scored CDS); 'high / scored' is the share of scored features that are "
        "global-scope.", *notes], [Table(COLUMNS, rows)], figures=figures)

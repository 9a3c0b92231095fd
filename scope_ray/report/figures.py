"""Figures and tables from a results root.

Pure plotting helpers (NumPy + matplotlib with the Agg backend + PIL; no Ray). Every figure
function writes one PNG, creates the parent directories, closes its figure and returns the
path. Titles come from the caller. Empty or all-NaN input never raises: the figure then says
"no data" instead of pretending to show something.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from scope_ray.storage import temp_name

NAN_CELL = "–"  # what table_markdown prints for NaN / None / missing values

BLUE = "#4477aa"
RED = "#cc3311"
_ORANGE = "#ee7733"
GREY = "#bbbbbb"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prepare_output(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, path: Path) -> Path:
    plt = pyplot()
    try:
        fig.tight_layout()
    except Exception:  # tight_layout can fail on degenerate layouts; the figure is still valid
        pass
    path = Path(path)
    # Drawn beside and renamed: a reader (the report, a browser) never opens a half-written figure.
    tmp = Path(temp_name(str(path)))
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def no_data(ax, message: str = "no data") -> None:
    ax.text(
        0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
        fontsize=11, color="#777777",
        bbox=dict(boxstyle="round", facecolor="#f4f4f4", edgecolor=GREY),
    )


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def norm_histogram(norms, path: str | Path, *, title: str, tau: float | None = None) -> Path:
    """Histogram of token norms on a log axis (outlier tokens sit far right), tau marked if known."""
    plt = pyplot()
    path = prepare_output(path)
    norms = np.asarray(norms, dtype=np.float64).ravel()
    norms = norms[np.isfinite(norms) & (norms > 0)]
    tau = _finite_or_none(tau)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if norms.size:
        bins = np.geomspace(norms.min(), norms.max(), 60) if norms.min() < norms.max() else 30
        ax.hist(norms, bins=bins, color=BLUE)
        ax.set_xscale("log")
    else:
        no_data(ax, "no finite positive norms")
    ax.set_xlabel("token L2 norm")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    if tau is not None and (norms.size or tau > 0):
        ax.axvline(tau, color=RED, linestyle="--", label=f"τ = {tau:g}")
        ax.legend()
    return save_figure(fig, path)


def _draw_cds_groups(ax, finite, shown, edges, gamma: float | None, sensitivity: list[dict] | None) -> list:
    """Figure 6's scored features: low / high stacked either side of γ (its line, its ± band), or
    one colour without a γ. Returns the legend handles."""
    from matplotlib.patches import Patch

    if gamma is None:
        if not finite.size:
            return []
        ax.hist(shown, bins=edges, color=BLUE, label=f"features: {finite.size}")
        return list(ax.get_legend_handles_labels()[0])
    low = finite <= gamma
    n_low, n_high = int(low.sum()), int((~low).sum())
    if finite.size:
        ax.hist([shown[low], shown[~low]], bins=edges, stacked=True, color=[BLUE, RED],
                label=[f"low-CDS (≤ γ): {n_low}", f"high-CDS (> γ): {n_high}"])
        handles = list(ax.get_legend_handles_labels()[0])
    else:
        handles = [Patch(color=BLUE, label=f"low-CDS (≤ γ): {n_low}"), Patch(color=RED, label=f"high-CDS (> γ): {n_high}")]
    handles.append(ax.axvline(gamma, color="black", linestyle="--", label=f"γ = {gamma:.3g}"))
    if sensitivity:
        lo, hi = sensitivity[0], sensitivity[-1]
        handles.append(ax.axvspan(lo["gamma"], hi["gamma"], color="black", alpha=0.07, lw=0,
                                  label=f"γ {lo['gamma']:.3g}…{hi['gamma']:.3g}: high-CDS {lo['high']}…{hi['high']}"))
    return handles


def cds_histogram(
    cds,
    path: str | Path,
    *,
    title: str,
    gamma: float | None,
    bins: int = 50,
    log_y: bool = False,
    unscored_cds=None,
    sensitivity: list[dict] | None = None,
) -> Path:
    """Figure 6: histogram of the finite CDS values of all features on [0, 1].

    With a threshold ``gamma`` the features split into **low-CDS: ``cds <= gamma``** and
    **high-CDS: ``cds > gamma``** (NaN features belong to neither); the two groups are drawn in
    different colours (stacked within a bin that straddles γ), γ is a dashed vertical line
    labelled with its value, and the legend gives the size of each group plus the number of
    NaN-CDS features (no usable image). ``gamma=None`` (or NaN) draws one colour and no line.
    ``unscored_cds``: CDS values of features left out of the split (too few usable images; NaN
    for those with none), stacked on top in grey, so a pile at CDS 1 stays visible rather than
    moving γ. ``sensitivity`` (rows of gamma / low / high, first and last the γ ± δ ends) shades
    the band between them and puts their high-group sizes in the legend.
    Finite values a rounding error outside [0, 1] are clipped onto the axis for drawing only;
    the counts use the values as given.
    """
    from matplotlib.patches import Patch

    plt = pyplot()
    path = prepare_output(path)
    cds = np.asarray(cds, dtype=np.float64).ravel()
    finite = cds[np.isfinite(cds)]
    unscored = np.asarray([] if unscored_cds is None else unscored_cds, dtype=np.float64).ravel()
    unscored_shown = np.clip(unscored[np.isfinite(unscored)], 0.0, 1.0)
    # Without a separate unscored set, every non-finite value is one; with it, the NaN in ``cds``
    # are those unscored features' places and are counted once, there.
    n_nan = int(cds.size - finite.size) if unscored_cds is None else int(unscored.size)
    gamma = _finite_or_none(gamma)
    edges = np.linspace(0.0, 1.0, max(int(bins), 1) + 1)
    shown = np.clip(finite, 0.0, 1.0)

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    handles = _draw_cds_groups(ax, finite, shown, edges, gamma, sensitivity)
    if unscored_cds is None:
        handles.append(Patch(color=GREY, label=f"NaN CDS (no usable image): {n_nan}"))
    else:
        if unscored_shown.size:
            # Stacked on what is already drawn: the bars' bottoms are the scored counts per bin.
            below = np.histogram(shown, bins=edges)[0]
            ax.bar(edges[:-1], np.histogram(unscored_shown, bins=edges)[0], width=np.diff(edges), bottom=below,
                   align="edge", color=GREY)
        handles.append(Patch(color=GREY, label=f"unscored: {n_nan} ({unscored_shown.size} with a CDS from too "
                                                f"few images, drawn)"))
    if not finite.size:
        no_data(ax, "no finite CDS values")
    if log_y and finite.size:
        ax.set_yscale("log")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("CDS")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=handles, fontsize=7, loc="best")  # "best": clear of a pile at CDS 1
    return save_figure(fig, path)


def cds_comparison(series: list[tuple[str, Any, float | None]], path: str | Path, *, title: str,
                   bins: int = 40) -> Path:
    """Several SAEs of one backbone: each one's scored CDS (finite values) as a step histogram
    normalised to a density (dictionaries of different sizes stay comparable), its γ a dashed line
    in the same colour. ``series``: (label, cds, γ) per SAE; the legend gives scored count and γ."""
    plt = pyplot()
    path = prepare_output(path)
    colours = [BLUE, RED, "#228833", _ORANGE, "#aa3377", "#66ccee", "#777777"]
    edges = np.linspace(0.0, 1.0, max(int(bins), 1) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    drawn = 0
    for i, (label, cds, gamma) in enumerate(series):
        colour = colours[i % len(colours)]
        values = np.asarray(cds, dtype=np.float64).ravel()
        finite = np.clip(values[np.isfinite(values)], 0.0, 1.0)
        gamma = _finite_or_none(gamma)
        text = f"{label}: {finite.size} scored" + (f", γ = {gamma:.3g}" if gamma is not None else "")
        if finite.size:
            ax.hist(finite, bins=edges, density=True, histtype="step", linewidth=1.6, color=colour, label=text)
            drawn += 1
        else:
            ax.plot([], [], color=colour, label=text + " (none scored)")
        if gamma is not None:
            ax.axvline(gamma, color=colour, linestyle="--", linewidth=1.0)
    if not drawn:
        no_data(ax, "no finite CDS values")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("CDS")
    ax.set_ylabel("density of scored features")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def awcds_curve(
    centres,
    means,
    path: str | Path,
    *,
    title: str,
    outlier_percentile: float | None = None,
) -> Path:
    """Figure 7: mean awCDS per token-norm percentile bin.

    ``centres`` are the bin centres in norm percentiles (0–100), ``means`` the mean awCDS of the
    tokens in each bin; bins whose centre or mean is NaN (e.g. no token with an active feature)
    are skipped. ``outlier_percentile`` (the norm percentile of τ) adds a dashed vertical marker
    with the outlier side shaded.
    """
    plt = pyplot()
    path = prepare_output(path)
    centres = np.asarray(centres, dtype=np.float64).ravel()
    means = np.asarray(means, dtype=np.float64).ravel()
    if centres.shape != means.shape:
        raise ValueError(f"centres {centres.shape} and means {means.shape} differ in length")
    ok = np.isfinite(centres) & np.isfinite(means)
    outlier_percentile = _finite_or_none(outlier_percentile)

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if ok.any():
        order = np.argsort(centres[ok])
        ax.plot(centres[ok][order], means[ok][order], color=BLUE, marker="o", markersize=3,
                label="mean awCDS")
    else:
        no_data(ax, "no finite awCDS bins")
    if outlier_percentile is not None:
        ax.axvline(outlier_percentile, color=RED, linestyle="--",
                   label=f"outliers (norm > τ) from p{outlier_percentile:.4g}")
        ax.axvspan(outlier_percentile, 100.0, color=RED, alpha=0.08, lw=0)
    ax.set_xlim(0.0, 100.0)
    ax.set_xlabel("token norm percentile")
    ax.set_ylabel("mean awCDS")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


TRAINING_CURVES = (("loss", "loss (MSE + AuxK, scaled)"), ("fvu", "FVU"), ("l0", "L0 (active latents / token)"),
                   ("dead_fraction", "dead latents (fraction)"))


def training_curves(rows: list[dict], path: str | Path, *, title: str) -> Path:
    """The SAE's training log (train-sae's ``training_log`` rows) against the step: one panel per
    quantity in ``TRAINING_CURVES``; non-finite values are left out (a panel with none says so)."""
    plt = pyplot()
    path = prepare_output(path)
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    steps = np.asarray([r.get("step", np.nan) for r in rows], dtype=np.float64)
    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(10, 2.6), dpi=120)
    for ax, (key, label) in zip(axes, TRAINING_CURVES):
        values = np.asarray([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
        ok = np.isfinite(steps) & np.isfinite(values)
        if ok.any():
            ax.plot(steps[ok], values[ok], color=BLUE, marker="o", markersize=2.5, linewidth=1.2)
        else:
            no_data(ax, "not logged")
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def instability_plot(shifts, d_non, d_out, path: str | Path, *, title: str) -> Path:
    """Table 9 as a figure: mean attention EMD against the SCC shift s.

    One line for non-outlier tokens (D̄_non), one for outlier tokens (D̄_out), each point
    annotated with its value. NaN entries (a group with no token at that shift) are left out;
    a group with no value at all is marked "(no tokens)" in the legend.
    """
    plt = pyplot()
    path = prepare_output(path)
    shifts = np.asarray(shifts, dtype=np.float64).ravel()
    d_non = np.asarray(d_non, dtype=np.float64).ravel()
    d_out = np.asarray(d_out, dtype=np.float64).ravel()
    if not (shifts.shape == d_non.shape == d_out.shape):
        raise ValueError(f"shifts {shifts.shape}, d_non {d_non.shape}, d_out {d_out.shape} differ")

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    any_point = False
    for values, name, colour, marker in (
        (d_non, "non-outlier tokens", BLUE, "o"),
        (d_out, "outlier tokens", RED, "s"),
    ):
        has_s = np.isfinite(shifts)
        if not (has_s & np.isfinite(values)).any():
            ax.plot([], [], color=colour, marker=marker, label=f"{name} (no tokens)")
            continue
        any_point = True
        order = np.argsort(shifts[has_s])
        xs, ys = shifts[has_s][order], values[has_s][order]
        ax.plot(xs, ys, color=colour, marker=marker, label=name)  # NaN leaves a gap in the line
        for x, y in zip(xs, ys):
            if not math.isfinite(y):
                continue
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=6, color=colour)
    if any_point:
        ax.margins(y=0.15)  # room for the value labels above the top points
    else:
        no_data(ax, "no finite EMD values")
    finite_s = shifts[np.isfinite(shifts)]
    if finite_s.size:
        ticks = np.unique(finite_s)
        if ticks.size <= 20:
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
        pad = 0.5 if ticks.size else 0.0
        ax.set_xlim(ticks.min() - pad, ticks.max() + pad)
    ax.set_xlabel("shift s (patches)")
    ax.set_ylabel("mean attention EMD")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _upsample_nearest(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to (height, width); works for any ratio."""
    gh, gw = m.shape
    rows = np.minimum((np.arange(height) * gh) // max(height, 1), gh - 1)
    cols = np.minimum((np.arange(width) * gw) // max(width, 1), gw - 1)
    return m[rows[:, None], cols[None, :]]


def overlay_map(
    image,
    activation,
    *,
    max_alpha: float = 0.6,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a feature's patch-grid activation map over an RGB image; returns uint8 [H, W, 3].

    The (g, g) map is resized to the image with nearest-neighbour (each patch becomes a block),
    normalised by its own maximum, coloured with ``cmap`` and blended with per-pixel alpha
    ``max_alpha * activation / max``. Non-finite and negative entries count as zero, so a
    zero (or all-NaN) map leaves the image unchanged pixel for pixel.
    """
    import matplotlib

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.nan_to_num(img.astype(np.float64)), 0, 255).astype(np.uint8)
    m = np.asarray(activation, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"activation map must be 2-D, got shape {m.shape}")
    m = np.where(np.isfinite(m) & (m > 0), m, 0.0)
    peak = m.max() if m.size else 0.0
    if peak <= 0 or img.shape[0] == 0 or img.shape[1] == 0:
        return img.copy()
    norm = _upsample_nearest(m / peak, img.shape[0], img.shape[1])
    colour = matplotlib.colormaps[cmap](norm)[..., :3] * 255.0
    alpha = (max_alpha * norm)[..., None]
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _cell_missing(activation: np.ndarray) -> bool:
    """A gallery cell has no image when its map holds no finite value."""
    return not np.isfinite(np.asarray(activation, dtype=np.float64)).any()


def feature_gallery(
    images,
    maps,
    path: str | Path,
    *,
    title: str,
    row_labels: list[str],
    max_alpha: float = 0.6,
) -> Path:
    """Figures 9/10: one row per feature, one column per top-activating image.

    ``images`` is uint8 [F, M, S, S, 3], ``maps`` the feature's non-negative activation maps
    [F, M, g, g] on the patch grid. Each cell shows :func:`overlay_map` of the two (per-cell
    normalisation; an all-zero map shows the plain image). A missing image — marked by the
    caller with an all-zero image and an all-NaN map — is drawn as a blank cell with "—".
    ``row_labels`` (one per feature, e.g. "feature 17 · CDS 0.03") go left of each row.
    """
    plt = pyplot()
    path = prepare_output(path)
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float64)
    row_labels = list(row_labels)
    empty = images.size == 0 or maps.size == 0 or images.ndim != 5 or maps.ndim != 4
    if not empty:
        if images.shape[:2] != maps.shape[:2]:
            raise ValueError(f"images {images.shape} and maps {maps.shape} disagree on [F, M]")
        if len(row_labels) != images.shape[0]:
            raise ValueError(f"{len(row_labels)} row labels for {images.shape[0]} features")

    if empty:
        fig, ax = plt.subplots(figsize=(4, 2), dpi=120)
        ax.set_axis_off()
        no_data(ax, "no features to show")
        fig.suptitle(title, fontsize=9)
        return save_figure(fig, path)

    n_f, n_m = images.shape[:2]
    cell = 1.25
    fig, axes = plt.subplots(
        n_f, n_m, figsize=(1.6 + cell * n_m, 0.45 + cell * n_f), dpi=120, squeeze=False,
    )
    for f in range(n_f):
        for m in range(n_m):
            ax = axes[f, m]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if _cell_missing(maps[f, m]):
                ax.set_facecolor("white")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.set_aspect("equal")
                ax.text(0.5, 0.5, "—", ha="center", va="center", fontsize=14, color="#777777")
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(GREY)
            else:
                ax.imshow(overlay_map(images[f, m], maps[f, m], max_alpha=max_alpha),
                          interpolation="nearest")
            if m == 0:
                ax.set_ylabel(row_labels[f], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def format_cell(value: Any, spec: str) -> str:
    if _is_blank(value):
        return NAN_CELL
    if isinstance(value, np.generic):
        value = value.item()
    if spec.endswith("d") and isinstance(value, float) and value.is_integer():
        value = int(value)
    text = format(value, spec) if spec else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict], columns: list[tuple[str, str, str]], *, aligned: bool = False) -> str:
    """Render ``rows`` as a GitHub Markdown table.

    ``columns`` are ``(key, header, format spec)``; the spec goes to :func:`format` (".3f",
    "d", ...; "" means ``str``). NaN, None and a missing key print as "–". Columns with a
    format spec are right-aligned, the others left-aligned. Cells are separated by " | "
    without padding; the result ends with a newline (empty string when there are no columns).
    ``aligned=True`` pads every cell to its column's width, so the table also reads as a grid
    in a terminal (same cells, same Markdown).
    """
    if not columns:
        return ""
    header = [h.replace("|", "\\|") for _, h, _ in columns]
    body = [[format_cell(row.get(k), spec) for k, _, spec in columns] for row in rows]
    right = [bool(spec) for _, _, spec in columns]
    if not aligned:
        widths = [0] * len(columns)
        rule = ["---:" if r else "---" for r in right]
    else:
        widths = [max([3, len(header[i])] + [len(line[i]) for line in body]) for i in range(len(columns))]
        rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(b) for b in body)]) + "\n"

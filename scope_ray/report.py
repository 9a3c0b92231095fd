"""Figures and tables from a results root."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def norm_histogram(norms, path: str | Path, *, title: str, tau: float | None = None) -> Path:
    """Histogram of token norms on a log axis (outlier tokens sit far right), tau marked if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    norms = np.asarray(norms, dtype=np.float64)
    norms = norms[np.isfinite(norms) & (norms > 0)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    bins = np.geomspace(norms.min(), norms.max(), 60) if norms.size and norms.min() < norms.max() else 30
    ax.hist(norms, bins=bins, color="#4477aa")
    ax.set_xscale("log")
    ax.set_xlabel("token L2 norm")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    if tau is not None:
        ax.axvline(tau, color="#cc3311", linestyle="--", label=f"τ = {tau:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

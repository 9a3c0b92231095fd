"""Information-scope statistics (METHOD §1, §6): thresholds chosen from data.

Pure NumPy. ``otsu_threshold`` picks tau (on log token norms) and gamma (on CDS values).
"""

from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The Otsu threshold of ``values``: the cut maximising the between-class variance of a
    ``bins``-bin histogram. Non-finite values are ignored; a constant input returns that constant."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)  # weight of the lower class for a cut after bin i
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    i = int(np.argmax(between[:-1]))  # a cut after the last bin would leave one class empty
    return float(edges[i + 1])


def auto_tau(norms: np.ndarray) -> float:
    """tau: 'auto' (METHOD §1): the Otsu threshold of log token norms, back in norm units."""
    norms = np.asarray(norms, dtype=np.float64)
    norms = norms[np.isfinite(norms) & (norms > 0)]
    return float(np.exp(otsu_threshold(np.log(norms))))

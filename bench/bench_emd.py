"""EMD on activation maps: ``grid_emd`` (support path) versus ``ot.emd2`` on the full grid.

Both sides solve the same exact problem with POT's network simplex; the script checks they agree
to 1e-6 on every pair before it prints a time. Map kinds (overlap grids of 14 x 14 and 16 x 16):

  sparse-indep   two unrelated sparse maps (5 % / 15 % of cells on, exponential values)
  sparse-scc     an SCC-like pair: the second map is the first with every value jittered
                 (log-normal, sigma 0.3) and ~10 % of its cells switched on or off; this is
                 what a feature's two overlap maps look like
  dense          every cell on (exponential values)

Baselines: ``dense`` = ``grid_emd_dense`` (``ot.emd2`` on the HW x HW grid, cost matrix cached
per shape, as any sensible caller would); ``dense+M`` additionally rebuilds the cost matrix with
``ot.dist`` on every call (a naive caller). Times are the best of ``--repeats`` passes over the
same pairs, divided by the number of pairs.

    .venv/bin/python bench/bench_emd.py                   # 300 pairs per case, ~30 s
    .venv/bin/python bench/bench_emd.py --pairs 100 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ot

from scope_ray.emd import grid_emd, grid_emd_dense


def sparse_map(rng, h: int, density: float) -> np.ndarray:
    m = rng.exponential(size=(h, h)) * (rng.random((h, h)) < density)
    if not m.any():
        m[rng.integers(h), rng.integers(h)] = rng.exponential()
    return m


def scc_partner(rng, m: np.ndarray, density: float) -> np.ndarray:
    out = m * rng.lognormal(0.0, 0.3, size=m.shape)
    flip = rng.random(m.shape) < 0.1
    out[flip & (m > 0)] = 0.0  # the feature stops firing here in view 2
    born = flip & (m == 0) & (rng.random(m.shape) < density)
    out[born] = rng.exponential(size=int(born.sum()))  # ... or starts firing
    if not out.any():
        out = m.copy()
    return out


def make_pairs(kind: str, h: int, density: float, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        a = sparse_map(rng, h, density)
        b = scc_partner(rng, a, density) if kind == "sparse-scc" else sparse_map(rng, h, density)
        pairs.append((a, b))
    return pairs


def dense_rebuilt(a: np.ndarray, b: np.ndarray) -> float:
    h, w = a.shape
    r, c = np.divmod(np.arange(h * w), w)
    xy = np.stack([r, c], 1) + 0.5
    return float(ot.emd2((a / a.sum()).ravel(), (b / b.sum()).ravel(), ot.dist(xy, xy, metric="euclidean"),
                         numItermax=max(100_000, 20 * (h * w) ** 2)))


def time_per_pair(fn, pairs, repeats: int) -> tuple[float, list[float]]:
    best, values = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = [fn(a, b) for a, b in pairs]
        best = min(best, time.perf_counter() - t0)
    return best / len(pairs), values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=300, help="pairs per case (dense cases use a third)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cases = [(kind, h, d) for kind in ("sparse-indep", "sparse-scc") for h in (14, 16) for d in (0.05, 0.15)]
    cases += [("dense", h, 1.0) for h in (14, 16)]
    print(f"POT {ot.__version__}; {args.pairs} pairs per sparse case, best of {args.repeats}; times per pair")
    print(f"{'case':<14}{'grid':>6}{'density':>9}{'support':>12}{'dense':>12}{'dense+M':>12}"
          f"{'ratio':>8}{'ratio+M':>9}{'max |diff|':>12}")
    t_start = time.perf_counter()
    for i, (kind, h, density) in enumerate(cases):
        n = args.pairs if kind != "dense" else max(10, args.pairs // 3)
        pairs = make_pairs(kind, h, density, n, args.seed + i)
        t_fast, v_fast = time_per_pair(grid_emd, pairs, args.repeats)
        t_dense, v_dense = time_per_pair(grid_emd_dense, pairs, args.repeats)
        t_naive, v_naive = time_per_pair(dense_rebuilt, pairs, args.repeats)
        diff = max(np.max(np.abs(np.subtract(v_fast, v_dense))), np.max(np.abs(np.subtract(v_fast, v_naive))))
        if diff > 1e-6:
            raise SystemExit(f"MISMATCH: support path and full-grid ot.emd2 differ by {diff:.3g} on {kind} {h}x{h}")
        print(f"{kind:<14}{f'{h}x{h}':>6}{density:>9.0%}{t_fast * 1e6:>10.0f}us{t_dense * 1e6:>10.0f}us"
              f"{t_naive * 1e6:>10.0f}us{t_dense / t_fast:>7.1f}x{t_naive / t_fast:>8.1f}x{diff:>12.1e}")
    print(f"all pairs agree to 1e-6; total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

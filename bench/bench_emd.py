"""Exact EMD on SAE activation maps: ``grid_emd`` / ``grid_emd_many`` versus ``ot.emd2`` on the full grid.

All three solve the same exact problem with POT's network simplex; the script checks that every
value agrees with the baseline to 1e-6 and exits non-zero if one does not. Maps are generated here
(seeded) on the CDS overlap grids of 13 x 13 (CLIP-B/16 at 224 px: p = 14, s = 1) and 15 x 15
(p = 16, s = 1), in the shapes SAE features give them:

  local         a local-scope feature: the same sparse support in both views (connected blobs
                from 2 cells to 15 % of the grid), values log-normal, the second map's values
                perturbed by a log-normal factor (sigma 0.15)
  global        a global-scope feature: 1-4 spikes per map, at different cells in the two maps
  dense-local   30-50 % of the cells on, same support in both views, values perturbed as in local
  dense-global  30-50 % of the cells on, independently in the two maps
  mix           45 % local, 40 % global, 15 % dense (half of each dense kind), shuffled
  sparse-mix    55 % local, 45 % global

Times are CPU time of this process (``time.process_time``; the box is shared, and CPU time is
what other load disturbs least) per pair, best of ``--repeats`` passes over the same pairs:
  baseline      ``ot.emd2(a, b, M)`` on the full HW x HW grid: maps normalised, M precomputed once
                per grid and not charged, ``check_marginals=False`` (the cheapest way to call it)
  grid_emd      one call per pair
  many          one ``grid_emd_many`` call on all pairs of the row
  solver        POT's C network simplex alone on the reduced problems ``many`` hands it: the floor
                for any code that calls that solver once per remaining pair

    .venv/bin/python bench/bench_emd.py                 # 500 pairs per row, ~25 s on 2 cores
    .venv/bin/python bench/bench_emd.py --pairs 100 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ot

import scope_ray.emd as emd_module
from scope_ray.emd import grid_emd, grid_emd_many

STEPS = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])


def blob_support(rng, h: int, n: int) -> np.ndarray:
    """n cells grown as 1-3 connected blobs from random seeds (a feature firing on object parts)."""
    on = np.zeros((h, h), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        on[rng.integers(h), rng.integers(h)] = True
    while on.sum() < n:
        ys, xs = np.nonzero(on)
        i = rng.integers(len(ys))
        y, x = np.array([ys[i], xs[i]]) + STEPS[rng.integers(4)]
        if 0 <= y < h and 0 <= x < h:
            on[y, x] = True
    return on


def local_pair(rng, h: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    n = rng.integers(max(2, round(lo * h * h)), round(hi * h * h) + 1)
    a = blob_support(rng, h, n) * rng.lognormal(0.0, 0.75, (h, h))
    return a, a * rng.lognormal(0.0, 0.15, (h, h))


def global_pair(rng, h: int) -> tuple[np.ndarray, np.ndarray]:
    cells = rng.permutation(h * h)
    n1, n2 = rng.integers(1, 5, size=2)
    a, b = np.zeros(h * h), np.zeros(h * h)
    a[cells[:n1]] = rng.exponential(size=n1) + 0.05
    b[cells[n1:n1 + n2]] = rng.exponential(size=n2) + 0.05
    return a.reshape(h, h), b.reshape(h, h)


def dense_global_pair(rng, h: int) -> tuple[np.ndarray, np.ndarray]:
    def one():
        m = (rng.random((h, h)) < rng.uniform(0.3, 0.5)) * rng.lognormal(0.0, 0.75, (h, h))
        if not m.any():
            m[0, 0] = 1.0
        return m
    return one(), one()


MIXES = {
    "mix": {"local": 0.45, "global": 0.40, "dense-local": 0.075, "dense-global": 0.075},
    "sparse-mix": {"local": 0.55, "global": 0.45},
}


def make_pairs(kind: str, h: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    makers = {
        "local": lambda: local_pair(rng, h, 0.0, 0.15),
        "global": lambda: global_pair(rng, h),
        "dense-local": lambda: local_pair(rng, h, 0.3, 0.5),
        "dense-global": lambda: dense_global_pair(rng, h),
    }
    if kind in MIXES:
        shares = MIXES[kind]
        counts = {k: int(round(f * n)) for k, f in shares.items()}
        counts[next(iter(counts))] += n - sum(counts.values())
        kinds = [k for k, c in counts.items() for _ in range(c)]
        pairs = [makers[k]() for k in rng.permutation(kinds)]
    else:
        pairs = [makers[kind]() for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def solver_floor(m1: np.ndarray, m2: np.ndarray, repeats: int) -> float:
    """Time of POT's C solver alone on the reduced problems that grid_emd_many hands it (recorded
    once, then replayed): what any wrapper around that solver pays at least."""
    calls = []
    real = emd_module.emd_c

    def record(*args):
        calls.append(tuple(np.array(x) if isinstance(x, np.ndarray) else x for x in args))
        return real(*args)
    emd_module.emd_c = record
    try:
        grid_emd_many(m1, m2)
    finally:
        emd_module.emd_c = real
    return best_time(lambda: [real(*c)[1] for c in calls], repeats)[0]


def baseline_call(cost_PP: np.ndarray):
    cap = max(100_000, 20 * cost_PP.size)

    def emd2(a: np.ndarray, b: np.ndarray) -> float:
        return float(ot.emd2((a / a.sum()).ravel(), (b / b.sum()).ravel(), cost_PP,
                             numItermax=cap, check_marginals=False))
    return emd2


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, np.asarray(out, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500, help="pairs per row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    print(f"POT {ot.__version__}, numpy {np.__version__}; {args.pairs} pairs per row, best of {args.repeats}; "
          f"times per pair")
    print(f"{'grid':<7}{'maps':<14}{'baseline':>10}{'grid_emd':>10}{'many':>9}{'solver':>9}"
          f"{'ratio':>8}{'ratio many':>12}{'max |diff|':>12}")
    t_start, worst = time.perf_counter(), 0.0
    for h in (13, 15):
        r, c = np.divmod(np.arange(h * h), h)
        xy = np.stack([r, c], 1).astype(np.float64)
        base = baseline_call(ot.dist(xy, xy, metric="euclidean"))
        for kind in ("local", "global", "dense-local", "dense-global", "mix", "sparse-mix"):
            m1, m2 = make_pairs(kind, h, args.pairs, rng)
            n = len(m1)
            t_base, v_base = best_time(lambda: [base(a, b) for a, b in zip(m1, m2)], args.repeats)
            t_one, v_one = best_time(lambda: [grid_emd(a, b) for a, b in zip(m1, m2)], args.repeats)
            t_many, v_many = best_time(lambda: grid_emd_many(m1, m2), args.repeats)
            t_solver = solver_floor(m1, m2, args.repeats)
            diff = float(max(np.max(np.abs(v_one - v_base)), np.max(np.abs(v_many - v_base))))
            worst = max(worst, diff)
            print(f"{f'{h}x{h}':<7}{kind:<14}{t_base / n * 1e6:>8.1f}us{t_one / n * 1e6:>8.1f}us"
                  f"{t_many / n * 1e6:>7.1f}us{t_solver / n * 1e6:>7.1f}us{t_base / t_one:>7.1f}x"
                  f"{t_base / t_many:>11.1f}x{diff:>12.1e}", flush=True)
            if diff > 1e-6:
                raise SystemExit(f"MISMATCH: {kind} {h}x{h}: a fast path differs from full-grid ot.emd2 by {diff:.3g}")
    print(f"all values agree with full-grid ot.emd2 to {worst:.1e} (<= 1e-6); "
          f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

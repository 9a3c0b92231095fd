"""Probe training: throughput of the head itself, what a Ray Tune x Ray Train trial adds, and how
long the demo's probe stages take.

Three parts, one run:

1. In-process ``fit_probe`` (scope_ray/probes/train.py) on random features at the demo geometry
   (D = 96, 7x7 tokens, 112 px) and at CLIP ViT-B/16's (D = 768, 14x14 tokens, 224 px): training
   samples per second per task. This is what a trial's training term grows with.
2. The probe search stage (``run_probes``) on a small cached-features stage, one trial per
   (task, variant): per trial, the Tune actor start, Ray Train's start-up and the training, from
   the stage's own ``trials`` table. Ratio printed: a trial's total over its training.
3. ``--demo DIR``: the demo's two probe stages (probe-features, probe search) timed on their own:
   the demo runs once to fill DIR (skipped when DIR already holds a finished demo), then both probe
   stages are deleted and the demo is run again, so every other stage is reused and only those two
   run. Ratio printed: the probe stages' wall time over the sum of their trials' training.

    .venv/bin/python bench/bench_probe.py                         # parts 1 and 2
    .venv/bin/python bench/bench_probe.py --demo /tmp/bench-demo  # and part 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GEOMETRIES = {"demo (D=96, 7x7, 112 px)": (96, 7, 112), "CLIP B/16 (D=768, 14x14, 224 px)": (768, 14, 224)}
BATCH = {"classification": 1024, "segmentation": 64, "depth": 8}  # the paper's (supp. C)


def _arrays(task: str, n: int, d: int, g: int, s: int, rng):
    import numpy as np

    tokens = rng.normal(size=(n, g * g, d)).astype(np.float32)
    if task == "classification":
        return {"x": tokens.mean(1), "y": rng.integers(0, 1000, n)}
    if task == "segmentation":
        return {"tokens": tokens, "mask": rng.integers(0, 150, (n, s, s)).astype(np.uint8)}
    return {"cls": tokens[:, 0].copy(), "tokens": tokens, "depth": rng.uniform(0.5, 10, (n, s, s)).astype(np.float32)}


def part_throughput(threads: int) -> list[dict]:
    import numpy as np
    import torch

    from scope_ray.probes.train import ProbeSpec, fit_probe

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, (d, g, s) in GEOMETRIES.items():
        for task in ("classification", "segmentation", "depth"):
            # Enough samples for a few batches, few enough that a CPU finishes in seconds.
            n = {"classification": 4096, "segmentation": 64 if d < 500 else 32, "depth": 32 if d < 500 else 16}[task]
            bs = min(BATCH[task], n)
            data = _arrays(task, n, d, g, s, rng)
            spec = ProbeSpec(task=task, width=d, image_size=s, epochs=2, batch_size=bs, lr=1e-3, weight_decay=1e-5,
                             num_classes=None if task == "depth" else (1000 if task == "classification" else 150))
            tiny = {k: v[:1] for k, v in data.items()}  # val on one sample: time the training, not the scoring
            fit = fit_probe(spec, data, tiny)
            rows.append({"geometry": name, "task": task, "samples": fit.samples_seen, "seconds": fit.seconds_train,
                         "per_s": fit.samples_seen / fit.seconds_train})
            print(f"  {name:<34} {task:<15} batch {bs:>4}: {rows[-1]['per_s']:>9.1f} samples/s "
                  f"({fit.samples_seen} samples in {fit.seconds_train:.2f} s)", flush=True)
    return rows


def part_trials(worker_cpus: float) -> dict:
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "stages"))
    from test_probe import NUM_CLASSES, write_cache  # the tests' small synthetic feature cache

    from scope_ray.config import load_config
    from scope_ray.stages.probe import run_probes
    from scope_ray.storage import ResultsRoot

    with tempfile.TemporaryDirectory() as tmp:
        root = ResultsRoot(str(Path(tmp) / "r"))
        write_cache(root, n_train=256, n_val=64)
        task = {"epochs": 5, "batch_size": 16, "lr_range": [0.1, 1.0]}
        job = load_config({"storage": {"root": root.uri},
                           "probes": {"classification": task, "segmentation": task, "depth": task,
                                      "depth_bins": 16, "max_depth": 4.0, "worker_cpus": worker_cpus}})
        t0 = time.perf_counter()
        res = run_probes(job, root, trials=1, num_classes=NUM_CLASSES, log=lambda *_: None)
        wall = time.perf_counter() - t0
    ray.shutdown()
    trials = res.trials
    mean = {k: sum(t[k] for t in trials) / len(trials)
            for k in ("seconds_actor", "seconds_startup", "seconds_load", "seconds_train", "seconds_total")}
    return {"trials": len(trials), "concurrent": res.max_concurrent, "wall": wall, **mean}


def part_demo(workdir: Path) -> dict:
    from scope_ray.demo import run_demo
    from scope_ray.storage import ResultsRoot

    quiet = lambda *_: None  # noqa: E731
    first = None
    if not (workdir / "results" / "demo-planted" / "probe" / "manifest.json").exists():
        print(f"  first run of the demo in {workdir} to fill it ...", flush=True)
        t0 = time.perf_counter()
        full = run_demo(workdir, log=quiet)
        first = time.perf_counter() - t0
        print("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in full["seconds"].items()), flush=True)
    import ray

    ray.shutdown()
    for stage in ("probe-features", "probe"):
        shutil.rmtree(workdir / "results" / "demo-planted" / stage, ignore_errors=True)
    out = run_demo(workdir, log=quiet)
    trials = out["probes"].trials
    pf = out["probe_features"]
    return {"first": first, "seconds": out["probe_seconds"], "features_seconds": pf.seconds, "trials": len(trials),
            "concurrent": out["probes"].max_concurrent,
            "train_sum": sum(t["seconds_train"] for t in trials),
            "startup_mean": sum(t["seconds_startup"] for t in trials) / len(trials),
            "reused": [k for k in ("extract", "train", "eval", "instability", "cds", "partition") if out[k].skipped]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for part 1")
    ap.add_argument("--worker-cpus", type=float, default=0.5, help="probes.worker_cpus for part 2")
    ap.add_argument("--demo", type=Path, default=None, help="workdir for part 3 (the demo's probe stages)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; torch threads {args.threads}")

    print("1. fit_probe in-process, training throughput (2 epochs, the paper's batch sizes where the sample allows)")
    part_throughput(args.threads)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"2. probe search stage, 1 trial per (task, variant) = 6 trials, 256 train / 64 val rows, 5 epochs, "
          f"worker_cpus {args.worker_cpus}")
    t = part_trials(args.worker_cpus)
    print(f"  {t['trials']} trials, up to {t['concurrent']} at once, stage wall {t['wall']:.1f} s")
    print(f"  per trial: Tune actor {t['seconds_actor']:.2f} s, Train start-up {t['seconds_startup']:.2f} s, "
          f"load {t['seconds_load']:.2f} s, training {t['seconds_train']:.2f} s, total {t['seconds_total']:.2f} s")
    print(f"  ratio trial total / training: {t['seconds_total'] / t['seconds_train']:.1f}x")

    if args.demo:
        print(f"3. the demo's probe stages (everything else reused) in {args.demo}")
        d = part_demo(args.demo)
        if d["first"] is not None:
            print(f"  the whole demo, first run (data written, every stage run, Ray start): {d['first']:.1f} s")
        print(f"  second run reused: {', '.join(d['reused'])}")
        print(f"  probe-features {d['features_seconds']:.1f} s + probe search = {d['seconds']:.1f} s for both; "
              f"{d['trials']} trials up to {d['concurrent']} at once, Train start-up {d['startup_mean']:.1f} s "
              f"per trial, training {d['train_sum']:.1f} s summed over trials")
        print(f"  ratio probe stages wall / training: {d['seconds'] / d['train_sum']:.1f}x")


if __name__ == "__main__":
    main()

"""CDS stage throughput (features/s) at two dictionary sizes, through the real Ray stages.

A synthetic analysis pool goes through both CDS passes (pass 1: per-feature top images;
pass 2: SCC pairs of the selected images, one exact EMD per (feature, image)) with a seeded random
SAE whose threshold keeps codes sparse. The same pool and backbone are used at both sizes, so
the ratio of the two rows shows how the stage scales with q. Printed per size: wall time of each
pass, (feature, image) scores per second in pass 2, and features per second end to end.

    .venv/bin/python bench/bench_cds.py                       # demo-vit-tiny, q = 384 and 1536
    .venv/bin/python bench/bench_cds.py --images 128 --expansions 4 32
"""

from __future__ import annotations

import argparse
import os
import posixpath
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96, help="analysis-pool images")
    ap.add_argument("--expansions", type=int, nargs=2, default=(4, 16), help="two SAE expansion factors")
    ap.add_argument("--k-cds", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2, help="ray.num_actors (capped so read/decode tasks fit beside them)")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from scope_ray.config import load_config
    from scope_ray.data.images import resize_center_crop
    from scope_ray.data.images import decode_image
    from scope_ray.data.synthetic import write_synthetic
    from scope_ray.models import build_model
    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.cds import run_cds, run_cds_topk
    from scope_ray.stages.cluster import actor_resources
    from scope_ray.stages.train_sae import SAE_FILE
    from scope_ray.stages.train_sae import config_hash as train_hash
    from scope_ray.storage import ResultsRoot

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        pool = write_synthetic(str(Path(tmp) / "data"), n_train=2, n_val=args.images, size=112, num_classes=10,
                               seed=0)["imagenet"]["folder"]["val"]
        rows = []
        for e in args.expansions:
            root_dir = Path(tmp) / f"results-{e}"
            job = load_config({"storage": {"root": str(root_dir)}, "data": {"imagenet": {"val": pool}}},
                              [f"sae.expansion={e}", "sae.k=8", f"scope.k_cds={args.k_cds}", "scope.spare_images=4",
                               f"ray.num_actors={args.actors}", "ray.torch_threads=1", "scope.batch_size=16"])
            root = ResultsRoot(str(root_dir))
            spec = job.model.spec
            # A seeded random SAE, threshold at the 90th percentile of positive pre-activations.
            model = build_model(job.model.name, weights="none", seed=0)
            files = sorted(Path(pool["path"]).rglob("*.JPEG"))[:16]
            pix = np.stack([resize_center_crop(decode_image(f.read_bytes(), max_pixels=10**8, min_side=8), 112)
                            for f in files])
            with torch.inference_mode():
                tokens = model.forward_layer(model.preprocess(pix)).patch_tokens.reshape(-1, spec.width)
            torch.manual_seed(0)
            sae = BatchTopKSAE(spec.width, job.dictionary_size, job.sae.k).eval()
            with torch.no_grad():
                pre = sae.pre_acts(tokens)
                sae.threshold.fill_(float(torch.quantile(pre[pre > 0][:1_000_000], 0.9)))
            stage = root.stage(job.model.name, "train-sae")
            sae.save(posixpath.join(stage.uri, SAE_FILE))
            stage.commit(train_hash(job), {}, {})

            t0 = time.perf_counter()
            run_cds_topk(job, root, progress=False, log=lambda *_: None)
            t1 = time.perf_counter()
            result = run_cds(job, root, progress=False, log=lambda *_: None)
            t2 = time.perf_counter()
            pairs = root.stage(job.model.name, "cds").manifest()["rows"]["pairs"]
            q = job.dictionary_size
            pool_size = actor_resources(job.ray).pool_size
            rows.append(dict(q=q, pass1=t1 - t0, pass2=t2 - t1, pairs=pairs, nan=result.nan_features,
                             fps=q / (t2 - t0)))
    print(f"CDS stage, demo-vit-tiny (7x7 grid, s=1 -> 6x6 overlap), {args.images} pool images, k_cds {args.k_cds} "
          f"+ 4 spares, {pool_size} model actor(s), {os.cpu_count()} CPUs")
    print(f"{'q':>6} {'pass 1 s':>9} {'pass 2 s':>9} {'pairs':>7} {'pairs/s':>8} {'NaN CDS':>8} {'features/s':>11}")
    for r in rows:
        print(f"{r['q']:>6} {r['pass1']:9.1f} {r['pass2']:9.1f} {r['pairs']:>7} {r['pairs'] / r['pass2']:8.0f} "
              f"{r['nan']:>8} {r['fps']:11.1f}")
    a, b = rows
    print(f"q x{b['q'] / a['q']:.0f}: total time x{(b['pass1'] + b['pass2']) / (a['pass1'] + a['pass2']):.2f}, "
          f"pass 2 time x{b['pass2'] / a['pass2']:.2f}, features/s x{b['fps'] / a['fps']:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()

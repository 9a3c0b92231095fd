"""Extraction throughput: the Ray Data stage versus a plain single-process PyTorch loop.

Both read the same image files, decode them with the same code, run the same model at the same
batch size and write the same token Parquet (4 sampled tokens per image); the ratio is
Ray stage throughput / plain loop throughput. Ray start-up is measured separately (paid once
per cluster, not per stage).

    .venv/bin/python bench/bench_extract.py                       # defaults: deit3-s, 1024 images
    .venv/bin/python bench/bench_extract.py --model demo-vit-tiny --images 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(job, files: list[Path], out_dir: Path) -> int:
    """The straightforward baseline: one process, decode → forward → write, batch by batch."""
    import pyarrow.parquet as pq

    from scope_ray.data.images import RejectedImage, decode_image, resize_center_crop
    from scope_ray.models import build_model
    from scope_ray.tokens import sample_positions, token_table

    model = build_model(job.model.name, weights="none", seed=job.seed, layer=job.model.resolved_layer)
    size, bs, k = job.model.spec.image_size, job.extract.batch_size, job.extract.tokens_per_image
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = 0
    for start in range(0, len(files), bs):
        ids, pixels = [], []
        for f in files[start:start + bs]:
            try:
                img = decode_image(f.read_bytes(), max_pixels=job.data.max_pixels, min_side=job.data.min_side)
            except RejectedImage:
                continue
            ids.append(f.name)
            pixels.append(resize_center_crop(img, size))
        with torch.inference_mode():
            out = model.forward_layer(model.preprocess(torch.from_numpy(np.stack(pixels))))
        tokens, norms = out.patch_tokens.numpy(), out.norms.numpy()
        pos = np.stack([sample_positions(i, tokens.shape[1], k, job.seed) for i in ids])
        r = np.arange(len(ids))[:, None]
        table = token_table(ids, pos, tokens[r, pos], norms[r, pos])
        pq.write_table(table, out_dir / f"part-{start:06d}.parquet")
        rows += table.num_rows
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit3-s")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each; the best is reported")
    args = ap.parse_args()

    import ray

    from scope_ray.config import load_config
    from scope_ray.data.synthetic import write_synthetic
    from scope_ray.stages.extract import run_extract
    from scope_ray.storage import ResultsRoot

    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    cores = os.cpu_count() or 1
    try:
        from scope_ray.models import get_spec

        size = get_spec(args.model).image_size
        sources = write_synthetic(str(work / "data"), n_train=args.images, n_val=1, size=size, seed=0, formats=("folder",))
        train = sources["imagenet"]["folder"]["train"]
        files = sorted(p for p in Path(train["path"]).rglob("*") if p.is_file() and p.name != "classes.txt")
        common = [f"model.name={args.model}", f"extract.batch_size={args.batch_size}", "extract.val_split=null",
                  f"ray.torch_threads={cores}"]
        torch.set_num_threads(cores)

        plain = []
        for r in range(args.repeats):
            job = load_config({"data": {"imagenet": {"train": train}}}, common + [f"storage.root={work}/plain{r}"])
            t0 = time.perf_counter()
            rows = plain_loop(job, files, work / f"plain{r}")
            plain.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        staged = []
        for r in range(args.repeats):
            job = load_config({"data": {"imagenet": {"train": train}}}, common + [f"storage.root={work}/ray{r}"])
            root = ResultsRoot(job.storage.root)
            t0 = time.perf_counter()
            res = run_extract(job, root, progress=False, log=lambda *_: None)
            staged.append(time.perf_counter() - t0)
            assert res.counts["train_tokens"].rows == rows, (res.counts, rows)

        n = len(files)
        plain_tput, ray_tput = n / min(plain), n / min(staged)
        print(f"model {args.model}, {n} images of {size}px, batch {args.batch_size}, {cores} cores, "
              f"torch {torch.__version__}, ray {ray.__version__}")
        print(f"plain single-process loop : {plain_tput:8.1f} images/s  (best of {args.repeats}: {min(plain):.2f} s)")
        print(f"Ray Data extraction stage : {ray_tput:8.1f} images/s  (best of {args.repeats}: {min(staged):.2f} s)")
        print(f"ratio Ray / plain         : {ray_tput / plain_tput:8.2f}x   (target >= 0.8x)")
        print(f"Ray start-up (once)       : {startup:8.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

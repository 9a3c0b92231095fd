"""SAE training throughput and peak memory: the Ray Train stage versus a plain PyTorch loop.

Both train a BatchTopK SAE of the same width, K, batch size, optimizer and step count on the same
token Parquet. The plain loop is a straightforward dense implementation written out below that
holds every token in memory; the stage streams the Parquet through Ray Data into a Ray Train
(DDP) worker running scope_ray's BatchTopKSAE (whose top-K·B selection is pre-filtered). Reported:
- steady-state tokens/s (stage: from its own step-log timestamps, first to last logged step;
  plain: the timed loop), and their ratio;
- end-to-end wall time of the stage (Ray Train start-up, data streaming, checkpoints, commit);
- peak RSS of the process that trains (plain: this process; stage: the Train worker).

    .venv/bin/python bench/bench_train_sae.py                    # deit3-s width (384), q = 3072, K = 30
    .venv/bin/python bench/bench_train_sae.py --tokens 131072 --expansion 16
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(x: np.ndarray, args, seed: int) -> tuple[float, int]:
    """The straightforward baseline, written out here on purpose (not scope_ray's SAE class):
    dense BatchTopK with a flat topk over all B·q pre-activations, dense decode, Adam, unit-norm
    atoms with the parallel gradient removed: the standard recipe in ~20 lines."""
    torch.manual_seed(seed)
    d, q = x.shape[1], x.shape[1] * args.expansion
    w_dec = torch.randn(q, d)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_dec.requires_grad_(True)
    w_enc = w_dec.detach().T.clone().requires_grad_(True)
    b_enc = torch.zeros(q, requires_grad=True)
    sample = torch.from_numpy(x[:65536]).double()
    scale = float((d / sample.pow(2).sum(1).mean()).sqrt())
    b_dec = (sample.mean(0) * scale).float().requires_grad_(True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=2e-4)
    order = np.random.default_rng(seed).permutation(len(x))
    steps = len(x) // args.batch_size
    t0 = time.perf_counter()
    for i in range(steps):
        xb = torch.from_numpy(x[order[i * args.batch_size:(i + 1) * args.batch_size]]) * scale
        pre = torch.relu((xb - b_dec) @ w_enc + b_enc)
        vals, idx = pre.flatten().topk(args.k * len(xb), sorted=False)
        z = torch.zeros_like(pre).flatten().scatter(0, idx, vals).view_as(pre)
        loss = (xb - (z @ w_dec + b_dec)).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w_dec.grad -= (w_dec.grad * w_dec).sum(1, keepdim=True) * w_dec
            opt.step()
            w_dec /= w_dec.norm(dim=1, keepdim=True)
    return time.perf_counter() - t0, steps


def plain_loop_scope_ray(x: np.ndarray, args, seed: int) -> tuple[float, int]:
    """The same in-memory loop around scope_ray's BatchTopKSAE: separates what the SAE code gains
    from what Ray's streaming and Train machinery cost."""
    from scope_ray.sae import BatchTopKSAE

    torch.manual_seed(seed)
    sae = BatchTopKSAE(x.shape[1], x.shape[1] * args.expansion, args.k)
    sae.set_input_scale_from(torch.from_numpy(x[:65536]))
    sae.init_b_dec(torch.from_numpy(x[:65536]))
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    order = np.random.default_rng(seed).permutation(len(x))
    steps = len(x) // args.batch_size
    t0 = time.perf_counter()
    for i in range(steps):
        sae.training_step(torch.from_numpy(x[order[i * args.batch_size:(i + 1) * args.batch_size]]), opt)
    return time.perf_counter() - t0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit3-s", help="registry model whose width the tokens have")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()

    import ray

    from scope_ray.config import load_config
    from scope_ray.models import get_spec
    from scope_ray.stages.extract import config_hash as extract_hash
    from scope_ray.stages.train_sae import run_train_sae
    from scope_ray.storage import ResultsRoot
    from scope_ray.tokens import activations_of, token_table

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    d = get_spec(args.model).width
    work = Path(tempfile.mkdtemp(prefix="bench-sae-"))
    try:
        rng = np.random.default_rng(0)
        dirs = rng.normal(size=(4 * d, d)).astype(np.float32)
        codes = np.zeros((args.tokens, 4 * d), np.float32)
        for i in range(args.tokens):
            codes[i, rng.choice(4 * d, 8, replace=False)] = rng.uniform(0.5, 3, 8)
        x = codes @ dirs
        root = ResultsRoot(str(work / "results"))
        stage = root.stage(args.model, "extract")
        parts = 8
        for p in range(parts):
            sl = slice(p * args.tokens // parts, (p + 1) * args.tokens // parts)
            acts = x[sl][:, None, :]
            ids = [f"img{i}" for i in range(sl.start, sl.stop)]
            stage.write_part("train_tokens", f"p{p}", token_table(ids, np.zeros((len(ids), 1), int), acts,
                                                                 np.linalg.norm(acts, axis=-1)))
        job = load_config({"model": {"name": args.model}, "storage": {"root": str(work / "results")}},
                          [f"sae.expansion={args.expansion}", f"sae.k={args.k}", f"sae.batch_size={args.batch_size}",
                           "sae.epochs=1", "sae.log_every=4", f"sae.checkpoint_every={args.tokens // args.batch_size}",
                           f"ray.torch_threads={cores}", "sae.shuffle_buffer=16384"])
        stage.commit(extract_hash(job), {}, {"train_tokens": args.tokens, "val_tokens": 0, "rejects": 0})

        # The plain loop reads the same Parquet into memory first (its read time is not counted).
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x_loaded = activations_of(stage.read_table("train_tokens")).copy()
        plain_s, steps = plain_loop(x_loaded, args, seed=0)
        plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        plain_tput = steps * args.batch_size / plain_s
        ours_s, _ = plain_loop_scope_ray(x_loaded, args, seed=0)
        ours_tput = steps * args.batch_size / ours_s

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        res = run_train_sae(job, root, log=lambda *_: None)
        stage_s = time.perf_counter() - t0
        log = root.stage(args.model, "train-sae").read_table("training_log").to_pylist()
        first, last = log[0], log[-1]
        ray_tput = (last["step"] - first["step"]) * args.batch_size / (last["time"] - first["time"])
        ray_rss = max(r["max_rss_mb"] for r in log)
        print(f"tokens {args.tokens} x d={d}, q={d * args.expansion}, K={args.k}, batch {args.batch_size}, "
              f"{steps} steps, {cores} cores, torch {torch.__version__}, ray {ray.__version__}, device cpu")
        print(f"plain single-process loop : {plain_tput:10.0f} tokens/s  ({plain_s:.2f} s; peak RSS {plain_rss:.0f} MB incl. all tokens)")
        print(f"same loop, scope_ray SAE  : {ours_tput:10.0f} tokens/s  ({ours_s:.2f} s)")
        print(f"Ray Train stage, steady   : {ray_tput:10.0f} tokens/s  (steps {first['step']}..{last['step']}; worker peak RSS {ray_rss:.0f} MB)")
        print(f"ratio Ray / plain (steady): {ray_tput / plain_tput:10.2f}x   (target >= 1.0x)")
        print(f"ratio Ray / same loop     : {ray_tput / ours_tput:10.2f}x   (what streaming + Ray Train cost)")
        print(f"Ray stage end to end      : {stage_s:10.2f} s for {res.steps} steps "
              f"(= {res.steps * args.batch_size / stage_s:.0f} tokens/s incl. Train start-up, streaming, checkpoint, commit)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One BatchTopK training step: this project against overcomplete, dictionary_learning and sparsify.

Tokens per second for one full training step (forward, loss, backward, optimizer step and
whatever each toolkit does around it: decoder unit norm, threshold, dead-latent counters) on
the same synthetic tokens: d = 768, K = 30, batch 1,024, Adam, fp32, CPU. Every contender runs
in a fresh process per round (order alternating between rounds); a round's figure is the
median step time of its timed steps, the table shows the median over rounds and the largest
peak RSS. Then an exactness check: scope_ray's sparse step against its dense reference, and
scope_ray's BatchTopK against dictionary_learning's (same weights and batch: same kept entries,
reconstruction, loss and gradients).

The peers are installed by this script into their own virtual environment (pinned versions
below, torch pinned by the project's constraints.txt), never into the project's venv; a peer
that cannot be installed is reported and skipped. They are references only.

    .venv/bin/python bench/bench_sae_peers.py                        # q = 24,576 and 3,072, 1 thread, 3 rounds
    .venv/bin/python bench/bench_sae_peers.py --threads 1 2 --rounds 5
    .venv/bin/python bench/bench_sae_peers.py --q 3072 --only scope_ray sparsify
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = {  # contender -> pip requirements (pinned)
    # overcomplete 0.3.0 calls matplotlib.cm.get_cmap at import, removed in matplotlib 3.9.
    "overcomplete": "overcomplete==0.3.0 matplotlib==3.8.4",
    "dictionary_learning": "dictionary-learning==0.1.0",
    "sparsify": "eai-sparsify==1.3.3",
}
OURS = ("scope_ray", "scope_ray_plain_adam", "scope_ray_dense")
LABELS = {
    "scope_ray": "scope_ray (sparse step, fused Adam: what train-sae runs)",
    "scope_ray_plain_adam": "scope_ray (sparse step, for-loop Adam)",
    "scope_ray_dense": "scope_ray dense reference (the step before issue 16)",
    "overcomplete": "overcomplete 0.3.0",
    "dictionary_learning": "dictionary_learning 0.1.0",
    "sparsify": "sparsify (eai-sparsify 1.3.3, CPU path)",
}
D, K, BATCH, LR = 768, 30, 1024, 2e-4


# --- the peers' environment --------------------------------------------------------------------
def peer_venv(path: Path, log) -> dict[str, str]:
    """Make (once) the venv with the pinned peers; returns {peer: "" if importable else why not}."""
    py = path / "bin" / "python"
    if not py.exists():
        log(f"creating the peers' virtual environment at {path}")
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    status = {}
    for name, req in PEERS.items():
        if _imports(py, name):
            status[name] = ""
            continue
        log(f"installing {req} into {path} ...")
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                            "torch==2.14.1", *req.split()], capture_output=True, text=True)
        ok = r.returncode == 0 and _imports(py, name)
        status[name] = "" if ok else f"pip install {req} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return status


def _imports(py: Path, name: str) -> bool:
    return subprocess.run([str(py), "-c", f"import {name}"], capture_output=True,
                          env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}).returncode == 0


# --- one contender in its own process ----------------------------------------------------------
def tokens(torch, n_batches: int, seed: int = 0):
    """Synthetic activations with sparse structure: each token a non-negative mix of 24 of 4,096
    random directions plus noise and a common offset (the same bytes in every process)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4096, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(D, generator=g)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, 4096, (BATCH, 24), generator=g)
        coef = torch.rand(BATCH, 24, generator=g) * 3
        x = torch.einsum("bk,bkd->bd", coef, atoms[idx]) + 0.1 * torch.randn(BATCH, D, generator=g) + offset
        out.append(x.contiguous())
    return out


def make_step(name: str, q: int, torch, xs):
    """Build contender ``name`` and return step(x) -> None doing one full training step."""
    torch.manual_seed(0)
    if name.startswith("scope_ray"):
        sys.path.insert(0, str(REPO))
        from scope_ray.sae import BatchTopKSAE
        from scope_ray.sae_step import adam

        sae = BatchTopKSAE(D, q, K)
        sae.set_input_scale_from(xs[0])
        sae.init_b_dec(xs[0])
        sae.train()
        if name == "scope_ray_dense":
            sae.sparse_step = False
        opt = adam(sae.parameters(), LR) if name == "scope_ray" else torch.optim.Adam(sae.parameters(), lr=LR)
        return lambda x: sae.training_step(x, opt)
    if name == "overcomplete":
        from overcomplete.sae import BatchTopKSAE

        sae = BatchTopKSAE(D, nb_concepts=q, top_k=K * BATCH, device="cpu")
        sae.train()
        opt = torch.optim.Adam(sae.parameters(), lr=LR)

        def step(x):  # overcomplete's own training loop body (train_sae): MSE, backward, step
            opt.zero_grad()
            _, _, x_hat = sae(x)
            loss = (x - x_hat).square().mean()
            loss.backward()
            opt.step()
        return step
    if name == "dictionary_learning":
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        trainer = BatchTopKTrainer(steps=100_000, activation_dim=D, dict_size=q, k=K, layer=0, lm_name="bench",
                                   lr=LR, device="cpu", seed=0)
        counter = iter(range(2_000, 10**9))  # past threshold_start_step: the θ update runs, as in training
        return lambda x: trainer.update(next(counter), x)
    if name == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(D, SparseCoderConfig(num_latents=q, k=K), device="cpu")
        opt = torch.optim.Adam(sae.parameters(), lr=LR)
        since_fired = torch.zeros(q, dtype=torch.long)

        def step(x):  # the body of sparsify's Trainer.fit for one SAE, without the LM forward
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x, dead_mask=since_fired > 10_000_000)
            (out.fvu + (1 / 32) * out.auxk_loss).backward()
            since_fired.add_(x.shape[0])
            since_fired[out.latent_indices.flatten()] = 0
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
        return step
    raise ValueError(name)


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads[0])
    xs = tokens(torch, 4)
    step = make_step(args.worker, args.q[0], torch, xs)
    for i in range(args.warmup):
        step(xs[i % len(xs)])
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(xs[i % len(xs)])
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"step_s": statistics.median(times),
                                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_contender(name: str, q: int, threads: int, args, peer_python: Path) -> dict:
    py = sys.executable if name in OURS else str(peer_python)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "SPARSIFY_DISABLE_TRITON": "1"}  # sparsify's Triton decoder is GPU-only
    steps = args.steps or (3 if q > 8192 else 8)
    cmd = [py, str(Path(__file__).resolve()), "--worker", name, "--q", str(q), "--threads", str(threads),
           "--steps", str(steps), "--warmup", str(args.warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"{name} q={q} failed:\n{r.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


# --- exactness ---------------------------------------------------------------------------------
def exact_dictionary_learning(out: str) -> None:
    """(peer venv) One dictionary_learning BatchTopK loss + backward; weights, batch, kept
    entries, reconstruction, loss and gradients to a safetensors file."""
    import safetensors.torch
    import torch
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

    torch.manual_seed(1)
    q = 3072
    dtype = torch.float64 if out.endswith("64.safetensors") else torch.float32
    ae = BatchTopKSAE(D, q, K).to(dtype)
    with torch.no_grad():
        ae.encoder.bias.normal_(0, 0.05)
        ae.b_dec.normal_(0, 0.1)
    x = tokens(torch, 1, seed=7)[0].to(dtype)
    f = ae.encode(x, use_threshold=False)
    x_hat = ae.decode(f)
    loss = (x - x_hat).pow(2).sum(dim=-1).mean()  # BatchTopKTrainer.loss's l2 term (no dead latent)
    loss.backward()
    safetensors.torch.save_file({
        "x": x, "W_enc": ae.encoder.weight.detach().T.contiguous(), "b_enc": ae.encoder.bias.detach(),
        "W_dec": ae.decoder.weight.detach().T.contiguous(), "b_dec": ae.b_dec.detach(),
        "kept": f.flatten().nonzero().squeeze(1), "x_hat": x_hat.detach(), "loss": loss.detach(),
        "g_W_enc": ae.encoder.weight.grad.T.contiguous(), "g_b_enc": ae.encoder.bias.grad,
        "g_W_dec": ae.decoder.weight.grad.T.contiguous(), "g_b_dec": ae.b_dec.grad}, out)


def scope_ray_grads(ref: dict, sparse: bool):
    """scope_ray's loss on the peer's weights and batch (input scale 1, no dead latent)."""
    import torch

    sys.path.insert(0, str(REPO))
    from scope_ray.sae import BatchTopKSAE

    dtype = ref["x"].dtype
    sae = BatchTopKSAE(D, ref["W_enc"].shape[1], K).to(dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(ref[name])
    sae.train()
    sae.sparse_step = sparse
    rec = sae.loss(ref["x"], aux_coef=1 / 32)
    rec.total.backward()
    with torch.no_grad():
        z = sae.encode(ref["x"], use_threshold=False)
        out = {"kept": z.flatten().nonzero().squeeze(1), "x_hat": sae.decode(z), "loss": rec.total.detach()}
    out.update({f"g_{n}": getattr(sae, n).grad for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    return out


def compare(a: dict, b: dict) -> dict:
    res = {"same_kept": bool(a["kept"].shape == b["kept"].shape and (a["kept"].sort().values == b["kept"].sort().values).all())}
    for key in ("x_hat", "loss", "g_W_enc", "g_b_enc", "g_W_dec", "g_b_dec"):
        diff = float((a[key] - b[key]).abs().max())
        res[key] = diff / max(float(b[key].abs().max()), 1e-30)  # relative to the largest entry
    return res


def exactness(peer_python: Path | None, log) -> None:
    import safetensors.torch

    for bits in (32, 64):
        dl = None
        if peer_python is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, f"dl{bits}.safetensors")
                r = subprocess.run([str(peer_python), str(Path(__file__).resolve()), "--exact-peer", path],
                                   capture_output=True, text=True, cwd=REPO)
                if r.returncode == 0:
                    dl = safetensors.torch.load_file(path)
                else:
                    log(f"  dictionary_learning exactness run failed: {r.stderr[-500:]}")
        ref_dense = dl if dl is not None else _own_weights(bits)
        dense = scope_ray_grads(ref_dense, sparse=False)
        sparse = scope_ray_grads(ref_dense, sparse=True)
        log(f"fp{bits}, q = 3,072, B = {BATCH}, K = {K} (max |difference| / max |reference|):")
        log(f"  scope_ray sparse vs its dense reference: {_fmt(compare(sparse, dense))}")
        if dl is not None:
            log(f"  scope_ray sparse vs dictionary_learning: {_fmt(compare(sparse, dl))}")
            log(f"  scope_ray dense  vs dictionary_learning: {_fmt(compare(dense, dl))}")


def _own_weights(bits: int) -> dict:
    """Weights and batch for the sparse-vs-dense check when dictionary_learning is not installed."""
    import torch

    dtype = torch.float64 if bits == 64 else torch.float32
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3072, D, generator=g, dtype=dtype)
    w /= w.norm(dim=1, keepdim=True)
    return {"x": tokens(torch, 1, seed=7)[0].to(dtype), "W_dec": w, "W_enc": w.T.contiguous(),
            "b_enc": 0.05 * torch.randn(3072, generator=g, dtype=dtype), "b_dec": torch.zeros(D, dtype=dtype)}


def _fmt(res: dict) -> str:
    return f"same kept entries: {res['same_kept']}; " + ", ".join(
        f"{k.replace('g_', 'd/d')} {v:.1e}" for k, v in res.items() if k != "same_kept")


# --- driver ------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q", type=int, nargs="+", default=[24_576, 3_072])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="timed steps per process (default 3 at q > 8192, else 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=[*OURS, *PEERS], help="run these contenders only")
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "scope-ray" / "bench-peers-venv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--exact-peer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.exact_peer:
        return exact_dictionary_learning(args.exact_peer)

    def log(msg):
        print(msg, flush=True)

    status = peer_venv(args.venv, log)
    peer_python = args.venv / "bin" / "python"
    for name, why in status.items():
        if why:
            log(f"{name}: NOT MEASURED ({why})")
    contenders = [c for c in (*OURS, *PEERS) if (not args.only or c in args.only) and not status.get(c)]
    log(f"contenders: {', '.join(contenders)}; d = {D}, K = {K}, batch {BATCH}, Adam, fp32, "
        f"{args.rounds} rounds, fresh process each, alternating order")
    results = {}
    for threads in args.threads:
        for q in args.q:
            for r in range(args.rounds):
                order = contenders if r % 2 == 0 else contenders[::-1]
                for name in order:
                    res = run_contender(name, q, threads, args, peer_python)
                    results.setdefault((threads, q, name), []).append(res)
                    log(f"  threads {threads} q {q} round {r + 1} {name}: {BATCH / res['step_s']:,.0f} tokens/s, "
                        f"peak RSS {res['rss_mb']:,.0f} MB")
    log("")
    log("| threads | q | contender | tokens/s (median of rounds) | rounds | peak RSS | scope_ray / this |")
    log("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for q in args.q:
            tps = {n: statistics.median(BATCH / r["step_s"] for r in results[(threads, q, n)]) for n in contenders}
            for n in contenders:
                runs = ", ".join(f"{BATCH / r['step_s']:,.0f}" for r in results[(threads, q, n)])
                ratio = f"{tps['scope_ray'] / tps[n]:.2f}×" if "scope_ray" in tps else ""
                rss = max(r["rss_mb"] for r in results[(threads, q, n)])
                log(f"| {threads} | {q:,} | {LABELS[n]} | {tps[n]:,.0f} | {runs} | {rss:,.0f} MB | {ratio} |")
    log("")
    exactness(peer_python if not status.get("dictionary_learning") else None, log)


if __name__ == "__main__":
    main()

"""Import SAEs made and saved by the peer toolkits' own code; compare our forward with theirs.

For each toolkit and architecture: in the peers' own virtual environment (pinned, never the
project's; ``peer_env``), build a tiny SAE with random weights, non-zero biases and a real
threshold, save it with the toolkit's own save path (sparsify ``save_to_disk``; dictionary_learning's
trainer layout ``ae.pt`` + ``config.json``; overcomplete ``state_dict()``, the only save it has;
SAELens ``save_model``; saev ``nn.dump``), and run the toolkit's own forward on fixed inputs. Then,
here, import the file with ``scope_ray.sae_import`` and print the largest absolute difference of
codes and reconstructions (fp32; the issue asks for <= 1e-5). Exit 1 when any pair is over that.

The peers' environment is a venv whose own site-packages hold the toolkits and whatever they need
that the project does not have; a ``.pth`` line puts the project's site-packages after them, so
torch, numpy and safetensors are not downloaded again (a few hundred MB, ~1 min, instead of 7 GB).
SAELens and saev are installed without their dependency trees (SAELens pulls transformer_lens's
whole model zoo; saev 0.1.0 pins Python >= 3.12 tooling it does not import for nn): only the
modules their SAE classes import, pinned below. tests/test_sae_import_peers.py runs this in CI.

    .venv/bin/python bench/check_sae_import.py                      # makes the peers' env if missing
    .venv/bin/python bench/check_sae_import.py --venv /tmp/peers    # somewhere else
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 1e-5
D, F, K, N = 16, 64, 4, 257
# Installed with their dependencies (what the project already has is reused through the .pth).
# overcomplete 0.3.0 calls matplotlib.cm.get_cmap at import, removed in matplotlib 3.9.
WITH_DEPS = ["overcomplete==0.3.0", "matplotlib==3.8.4", "dictionary-learning==0.1.0", "eai-sparsify==1.3.3"]
# Installed alone: exactly the modules SAELens' and saev's SAE classes import.
WITHOUT_DEPS = ["sae-lens==6.54.12", "transformer-lens==2.18.0", "jaxtyping==0.3.11", "better-abc==0.0.3",
                "typeguard==4.6.1", "saev==0.1.0", "beartype==0.23.1"]
TOOLKITS = {"sparsify": "sparsify", "dictionary_learning": "dictionary_learning", "overcomplete": "overcomplete",
            "saelens": "sae_lens", "saev": "saev.nn"}  # format -> module the peer side imports


def peer_env(path: Path, log=print) -> dict[str, str]:
    """Make (once) the peers' venv at ``path``; returns {format: "" if importable else why not}."""
    import site
    import sysconfig

    py = path / "bin" / "python"
    if not py.exists():
        log(f"creating the peers' virtual environment at {path}")
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        project = sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else site.getsitepackages()[0]
        Path(own, "scope_ray_project.pth").write_text(project + "\n")
    status = {fmt: "" if _imports(py, module) else "missing" for fmt, module in TOOLKITS.items()}
    if any(status.values()):
        for args in (WITH_DEPS, ["--no-deps", *WITHOUT_DEPS]):
            log(f"installing {' '.join(args)} into {path} ...")
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                               capture_output=True, text=True)
            if r.returncode != 0:
                log(f"pip failed: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")
        status = {fmt: "" if _imports(py, module) else f"import {module} fails in {path}"
                  for fmt, module in TOOLKITS.items()}
    return status


def _imports(py: Path, module: str) -> bool:
    return subprocess.run([str(py), "-c", f"import {module}"], capture_output=True,
                          env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}).returncode == 0

# Runs in the peers' venv: writes <out>/<case>/... (the toolkit's files) and <out>/<case>.npz (x, codes, recon).
PEER_SIDE = r'''
import json, os, sys
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
import numpy as np, torch
out = sys.argv[1]; D, F, K, N = map(int, sys.argv[2:6])
torch.manual_seed(0)
x = torch.randn(N, D) * 2 + 0.3

def bump(module):  # non-zero biases everywhere: a reader that drops one is caught
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name or name in ("b_dec", "b_enc"):
                p.add_(torch.randn_like(p) * 0.3)

def dump(case, codes, recon, extra=None):
    np.savez(f"{out}/{case}.npz", x=x.numpy(), codes=codes.detach().numpy(), recon=recon.detach().numpy())
    if extra: open(f"{out}/{case}.json", "w").write(json.dumps(extra))

# --- sparsify ---------------------------------------------------------------------------------
from sparsify import SparseCoder, SparseCoderConfig
sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), device="cpu", dtype=torch.float32); bump(sae)
with torch.no_grad():
    sae.b_dec.add_(torch.randn(D) * 0.3)
    o = sae(x)
codes = torch.zeros(N, F).scatter_(-1, o.latent_indices, o.latent_acts)
sae.save_to_disk(f"{out}/sparsify_topk"); dump("sparsify_topk", codes, o.sae_out)

# --- dictionary_learning: the trainer's layout, ae.pt (state dict) + config.json ----------------
from dictionary_learning import AutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.top_k import AutoEncoderTopK
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
made = {"AutoEncoder": AutoEncoder(D, F), "AutoEncoderTopK": AutoEncoderTopK(D, F, k=K),
        "BatchTopKSAE": BatchTopKSAE(D, F, k=K), "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(D, F, k=K, group_sizes=[16, 16, 32]),
        "JumpReluAutoEncoder": JumpReluAutoEncoder(D, F, device="cpu")}
for cls, ae in made.items():
    bump(ae)
    with torch.no_grad():
        for name in ("bias", "b_dec"):
            if hasattr(ae, name): getattr(ae, name).add_(torch.randn(D) * 0.3)
        if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"): ae.threshold.fill_(0.5)
        if cls == "JumpReluAutoEncoder": ae.threshold.copy_(torch.rand(F) * 0.8)
        recon, codes = ae(x, output_features=True)
    d = f"{out}/dl_{cls}"; os.makedirs(d)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, f"{d}/ae.pt")
    json.dump({"trainer": {"dict_class": cls, "activation_dim": D, "dict_size": F}}, open(f"{d}/config.json", "w"))
    dump(f"dl_{cls}", codes, recon)

# --- overcomplete: state_dict() with torch.save (it has no save of its own) -----------------------
from overcomplete.sae import SAE, TopKSAE, BatchTopKSAE as OcBatchTopK, JumpSAE
for arch, m in {"SAE": SAE(D, F), "TopKSAE": TopKSAE(D, F, top_k=K), "BatchTopKSAE": OcBatchTopK(D, F, top_k=K * 64),
                "JumpSAE": JumpSAE(D, F)}.items():
    bump(m)
    with torch.no_grad():
        m.dictionary._weights.mul_(torch.rand(F, 1) + 0.5)   # off unit norm, as a saved dictionary is
        if arch == "JumpSAE": m.thresholds.copy_(torch.randn(F) * 0.5 - 1.0)
        extra = None
        if arch == "BatchTopKSAE":
            m.train(); m(x)                                   # one batch sets its running threshold
            extra = {"threshold": float(m.running_threshold)}
    torch.save(m.state_dict(), f"{out}/oc_{arch}.pt")
    m.train(); m.eval()                                       # refresh the fused eval dictionary
    with torch.no_grad():
        _, codes, recon = m(x)
    dump(f"oc_{arch}", codes, recon, {"architecture": arch, **(extra or {})})
# --- SAELens: save_model writes sae_weights.safetensors + cfg.json ---------------------------------
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
for name, m in {"standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F)),
                "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K)),
                "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, rescale_acts_by_decoder_norm=True)),
                "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))}.items():
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if "threshold" in pname:  # raw θ > 0, or log θ
                p.copy_(torch.rand_like(p) * 0.8 if pname == "threshold" else torch.randn_like(p) * 0.5 - 1.0)
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else D ** -0.5))  # an initialiser's scale
    m.eval()
    with torch.no_grad():
        codes = m.encode(x); recon = m.decode(codes)
    m.save_model(f"{out}/sl_{name}"); dump(f"sl_{name}", codes, recon)

# --- saev 0.1.0: nn.dump writes a JSON header line, then torch.save(state_dict) ----------------------
import saev.config, saev.nn
m = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=F // D, seed=0)); bump(m)
with torch.no_grad():
    m.b_dec.add_(torch.randn(D) * 0.3)
    recon, codes, _ = m(x)
saev.nn.dump(f"{out}/saev_relu/sae.pt", m); dump("saev_relu", codes, recon)
print("peer side done")
'''


def compare_all(venv: Path) -> list[dict]:
    """Run the peer side in ``venv``, import every file it saved, and return per case the largest
    differences of codes and reconstructions against the toolkit's own forward."""
    from scope_ray.sae_import import Source, import_sae

    rows = []
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(venv / "bin" / "python"), "-c", PEER_SIDE, out, str(D), str(F), str(K), str(N)],
                       check=True, env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1"})
        cases = {"sparsify_topk": Source("sparsify", f"{out}/sparsify_topk")}
        for cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
            cases[f"dl_{cls}"] = Source("dictionary_learning", f"{out}/dl_{cls}/ae.pt")
        for arch in ("SAE", "TopKSAE", "BatchTopKSAE", "JumpSAE"):
            extra = json.loads(Path(f"{out}/oc_{arch}.json").read_text())
            cases[f"oc_{arch}"] = Source("overcomplete", f"{out}/oc_{arch}.pt", architecture=arch,
                                         k=K if arch == "TopKSAE" else None, threshold=extra.get("threshold"))
        for name in ("standard", "topk", "topk_rescaled", "jumprelu"):
            cases[f"sl_{name}"] = Source("saelens", f"{out}/sl_{name}")
        cases["saev_relu"] = Source("saev", f"{out}/saev_relu/sae.pt")
        for case, src in cases.items():
            ref = np.load(f"{out}/{case}.npz")
            sae = import_sae(src)
            with torch.no_grad():
                recon, codes = sae(torch.from_numpy(ref["x"]))
            rows.append({"case": case, "toolkit": src.format, "max_codes": float(np.abs(ref["codes"]).max()),
                         "max_recon": float(np.abs(ref["recon"]).max()),
                         "diff_codes": float(np.abs(codes.numpy() - ref["codes"]).max()),
                         "diff_recon": float(np.abs(recon.numpy() - ref["recon"]).max()),
                         "active": float(np.count_nonzero(ref["codes"], axis=1).mean())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "scope-ray" / "sae-import-peers-venv")
    args = p.parse_args()
    status = peer_env(args.venv, lambda m: print(m, file=sys.stderr))
    if any(status.values()):
        print(f"peers not importable: { {k: v for k, v in status.items() if v} }")
        return 2
    rows = compare_all(args.venv)
    print(f"{'toolkit / architecture':<40} {'max |codes|':>12} {'max |recon|':>12} {'codes':>10} {'recon':>10}")
    for r in rows:
        print(f"{r['case']:<40} {r['max_codes']:>12.4g} {r['max_recon']:>12.4g} {r['diff_codes']:>10.2e} "
              f"{r['diff_recon']:>10.2e}  (active per row {r['active']:.1f})")
    worst = max(max(r["diff_codes"], r["diff_recon"]) for r in rows)
    print(f"largest difference {worst:.2e} (tolerance {TOLERANCE:g}, fp32, {N} inputs, d={D}, q={F})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

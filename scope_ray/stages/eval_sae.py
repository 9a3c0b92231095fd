"""SAE evaluation (METHOD §2, Table 6): FVU, L0 and CS over all validation tokens and outliers.

Streams ``extract/val_tokens`` through a pool of SAE actors (JumpReLU at the trained threshold);
each batch returns partial sums (``MetricAccumulator``) that the driver merges, so no token is
held in memory. Writes ``ROOT/<model>/eval-sae/sae_eval`` (one row per model, Table 6 layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from scope_ray.config import JobConfig
from scope_ray.logs import info
from scope_ray.storage import ResultsRoot
from scope_ray.pipeline import EVAL_SAE as STAGE
from scope_ray.pipeline import eval_sae_hash as config_hash
from scope_ray.pipeline import extract_hash, train_sae_hash
from scope_ray.stages.common import check_token_width, load_sae, resolve_tau  # noqa: F401 (resolve_tau: the stage's reader)



class SAEEvaluator:
    """Ray Data actor: token batches in, one row of merged partial metrics (all / outlier) out."""

    def __init__(self, job: JobConfig, root: ResultsRoot, tau: float, torch_threads: int):
        import torch

        from scope_ray.devices import granted_device

        torch.set_num_threads(torch_threads)
        self.device = granted_device()  # the GPU Ray granted, else the CPU (scope_ray.devices)
        self.sae = load_sae(job, root, device=self.device)
        self.tau = tau

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        from scope_ray.metrics import MetricAccumulator
        from scope_ray.tokens import activations_of

        x = activations_of(batch)
        finite = np.isfinite(x).all(axis=1)
        x = torch.from_numpy(np.ascontiguousarray(x[finite])).to(self.device)
        outlier = torch.from_numpy(batch.column("norm").to_numpy()[finite] > self.tau).to(self.device)
        all_acc, out_acc = MetricAccumulator(), MetricAccumulator()
        with torch.inference_mode():
            x_hat, z = self.sae(x)
        all_acc.update(x, x_hat, z)
        if bool(outlier.any()):
            out_acc.update(x[outlier], x_hat[outlier], z[outlier])
        return {**_pack(all_acc, "all_", self.sae.d_in, self.sae.d_sae), **_pack(out_acc, "out_", self.sae.d_in, self.sae.d_sae),
                "nonfinite": np.array([int((~finite).sum())])}


_ACC_SCALARS = ("n_tokens", "centered_sq", "err_sq", "cos_sum", "nonzero")


def _pack(acc, prefix: str, d: int, q: int) -> dict[str, np.ndarray]:
    """A MetricAccumulator as one row of plain arrays (Arrow-native: no pickled objects in the stream)."""
    row = {prefix + k: np.array([getattr(acc, k)]) for k in _ACC_SCALARS}
    row[prefix + "mean_D"] = (acc.mean_D if acc.n_tokens else np.zeros(d))[None]
    row[prefix + "fire_counts"] = (acc.fire_counts if acc.n_tokens else np.zeros(q, np.int64))[None]
    return row


def _unpack(part: dict[str, np.ndarray], i: int, prefix: str):
    from scope_ray.metrics import MetricAccumulator

    acc = MetricAccumulator()
    if int(part[prefix + "n_tokens"][i]) == 0:
        return acc
    for k in _ACC_SCALARS:
        setattr(acc, k, part[prefix + k][i].item())
    acc.mean_D = np.asarray(part[prefix + "mean_D"][i], dtype=np.float64)
    acc.fire_counts = np.asarray(part[prefix + "fire_counts"][i], dtype=np.int64)
    return acc


@dataclass
class EvalResult:
    skipped: bool
    row: dict | None = None


def run_eval_sae(job: JobConfig, root: ResultsRoot, *, log=info) -> EvalResult:
    import ray.data

    from scope_ray.metrics import MetricAccumulator
    from scope_ray.stages.cluster import actor_resources

    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[eval-sae] {job.model.name}: already complete (config {chash}); skipping")
        return EvalResult(skipped=True, row=stage.read_table("sae_eval").to_pylist()[0])

    extract = root.stage(job.model.name, "extract")
    if not extract.is_complete(extract_hash(job)):
        raise RuntimeError(f"{job.model.name}: the extract stage at {extract.uri} is missing or from another config; "
                           "run `scope-ray stage extract` first")
    if not root.stage(job.model.name, "train-sae").is_complete(train_sae_hash(job)):
        load_sae(job, root)  # raises with the reason (missing, or trained with another config)
    files = extract.part_files("val_tokens")
    check_token_width(files, root, job.model.spec.width, "eval-sae")
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        tau, tau_source = resolve_tau(job, root)
        res = actor_resources(job.ray)
        ds = ray.data.read_parquet(files, filesystem=root.arrow_fs, num_cpus=job.ray.read_cpus,
                                   partitioning=None).select_columns(["activation", "norm"])
        ds = ds.map_batches(
            SAEEvaluator, fn_constructor_kwargs=dict(job=job, root=root, tau=tau, torch_threads=res.torch_threads),
            compute=res.strategy(), num_cpus=res.num_cpus, num_gpus=res.num_gpus,
            batch_size=4096, batch_format="pyarrow",
        )
        all_acc, out_acc, nonfinite = MetricAccumulator(), MetricAccumulator(), 0
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(part["nonfinite"])):
                all_acc.merge(_unpack(part, i, "all_"))
                out_acc.merge(_unpack(part, i, "out_"))
            nonfinite += int(part["nonfinite"].sum())
        a = all_acc.result()
        o = out_acc.result() if out_acc.n_tokens else {"fvu": float("nan"), "l0": float("nan"), "cs": float("nan")}
        rate = all_acc.firing_rate()
        row = {
            "model": job.model.name, "layer": job.model.resolved_layer,
            "fvu_all": a["fvu"], "fvu_outlier": o["fvu"], "l0_all": a["l0"], "l0_outlier": o["l0"],
            "cs_all": a["cs"], "cs_outlier": o["cs"], "tau": tau, "tau_source": tau_source,
            "tokens": all_acc.n_tokens, "outlier_tokens": out_acc.n_tokens, "nonfinite_rows": nonfinite,
            "d_sae": int(rate.size), "dead_latents": int((rate == 0).sum()),
            "dense_latents": int((rate > job.sae.dense_fraction).sum()), "dense_fraction": job.sae.dense_fraction,
        }
        stored = {k: v for k, v in row.items() if k != "model"}  # the table's folder names the model
        stage.write_part("sae_eval", "part-0", pa.Table.from_pylist([stored]))
        stage.commit(chash, {"val_tokens": extract.uri}, {"sae_eval": 1}, extra={"tau": tau, "tau_source": tau_source})
        log(f"[eval-sae] {job.model.name}: FVU_A {row['fvu_all']:.3f} FVU_O {row['fvu_outlier']:.3f} "
            f"L0_A {row['l0_all']:.2f} L0_O {row['l0_outlier']:.2f} CS_A {row['cs_all']:.3f} CS_O {row['cs_outlier']:.3f} "
            f"(tau {tau:.3g}, {tau_source}; {row['outlier_tokens']}/{row['tokens']} outlier tokens; "
            f"{row['dead_latents']} dead, {row['dense_latents']} dense latents)")
        return EvalResult(skipped=False, row=row)

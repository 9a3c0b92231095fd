"""SAE export reads only stages committed for the job's config, and keeps the SAE file loadable."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from scope_ray import pipeline
from scope_ray.config import load_config
from scope_ray.sae import BatchTopKSAE
from scope_ray.sae_export import export_sae, read_provenance
from scope_ray.storage import ResultsRoot


def _committed_sae(tmp_path):
    job = load_config({"model": {"name": "demo-vit-tiny"}, "storage": {"root": str(tmp_path / "results")}},
                      ["sae.expansion=1", "sae.k=4"])
    root = ResultsRoot(job.storage.root)
    torch.manual_seed(0)
    sae = BatchTopKSAE(96, 96, 4)
    with torch.no_grad():
        sae.threshold.fill_(0.1)  # as training would have estimated it
    stage = root.stage(job.model.name, pipeline.TRAIN_SAE)
    sae.save(f"{stage.uri}/sae.safetensors")
    stage.commit(pipeline.train_sae_hash(job), {}, {}, extra={"sae_file": "sae.safetensors", "steps": 7,
                                                               "d_in": 96, "d_sae": 96, "k": 4})
    return job, root, sae


def _commit_eval(root, job, config_hash: str, fvu: float) -> None:
    stage = root.stage(job.model.name, pipeline.EVAL_SAE)
    stage.write_part("sae_eval", "part-0", pa.Table.from_pylist([{"fvu_all": fvu, "tokens": 10}]))
    stage.commit(config_hash, {}, {"sae_eval": 1})


def test_a_stale_eval_is_not_attached_and_a_current_one_is(tmp_path):
    job, root, sae = _committed_sae(tmp_path)
    _commit_eval(root, job, "made-with-another-config", 0.5)
    first = export_sae(job, root, str(tmp_path / "one"))
    assert read_provenance(first.sae)["metrics"] is None
    assert "eval-sae has not run for this config." in (tmp_path / "one" / "README.md").read_text()
    _commit_eval(root, job, pipeline.eval_sae_hash(job), 0.25)
    second = export_sae(job, root, str(tmp_path / "two"))
    prov = read_provenance(second.sae)
    assert prov["metrics"]["fvu_all"] == 0.25 and prov["metrics"]["dead_latents"] is None
    assert prov["origin"] == {**prov["origin"], "kind": "trained here", "steps": 7}
    assert "| 0.25 | – |" in (tmp_path / "two" / "README.md").read_text()
    x = torch.randn(16, 96)
    np.testing.assert_array_equal(BatchTopKSAE.load(second.sae).encode(x).detach().numpy(),
                                  sae.encode(x).detach().numpy())
    assert second.features is None and not (tmp_path / "two" / "features.parquet").exists()


def test_export_to_s3_from_an_s3_root(s3_bucket):
    uri, endpoint = s3_bucket
    job = load_config({"model": {"name": "demo-vit-tiny"},
                       "storage": {"root": f"{uri}/results", "endpoint_url": endpoint}}, ["sae.expansion=1", "sae.k=4"])
    root = ResultsRoot(job.storage.root, endpoint)
    torch.manual_seed(0)
    sae = BatchTopKSAE(96, 96, 4)
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    stage = root.stage(job.model.name, pipeline.TRAIN_SAE)
    sae.save(f"{stage.uri}/sae.safetensors", endpoint_url=endpoint)
    stage.commit(pipeline.train_sae_hash(job), {}, {}, extra={"sae_file": "sae.safetensors", "steps": 1})
    paths = export_sae(job, root, f"{uri}/shared")
    assert paths.sae == f"{uri}/shared/sae.safetensors" and paths.card == f"{uri}/shared/README.md"
    assert read_provenance(paths.sae, endpoint)["base_model"]["name"] == "demo-vit-tiny"
    x = torch.randn(8, 96)
    assert torch.equal(BatchTopKSAE.load(paths.sae, endpoint_url=endpoint).encode(x), sae.encode(x))

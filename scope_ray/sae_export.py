"""SAE export: a job's committed SAE as a folder someone else can use, with a model card.

``export_sae(job, root, out)`` writes three files to the folder ``out`` (a local path or an
``s3://`` URI), each whole or not at all (``storage.write_uri_bytes``):

- ``sae.safetensors``: the committed SAE's tensors and its loading header, unchanged (so
  ``BatchTopKSAE.load`` / ``ImportedSAE.load`` read it as before), plus one more header key,
  ``scope_ray_provenance``: JSON of what the SAE was made from and how it measured (``provenance``
  below). A reader that only knows safetensors still sees where the file came from.
- ``features.parquet``: one row per latent (feature, cds, group, unscored_reason) — the scope label
  of every feature, from the partition stage; absent when the partition stage has not run.
- ``README.md``: the model card (Hugging Face-style YAML front matter, then base model, layer,
  preprocessing, training data, metrics, scope summary, how to load, provenance).

Only committed stages whose config hash matches the job are read: a stale eval or partition is
reported as "not run for this config" instead of being attached to the wrong SAE.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scope_ray import pipeline
from scope_ray.config import JobConfig
from scope_ray.storage import ResultsRoot, join_uri, read_uri_bytes, write_uri_bytes

PROVENANCE_KEY = "scope_ray_provenance"
SAE_NAME, FEATURES_NAME, CARD_NAME = "sae.safetensors", "features.parquet", "README.md"
METRIC_KEYS = ("fvu_all", "fvu_outlier", "l0_all", "l0_outlier", "cs_all", "cs_outlier", "tau", "tokens",
               "outlier_tokens", "dead_latents", "dense_latents")
SCOPE_KEYS = ("dictionary_size", "gamma", "gamma_source", "low_cds", "high_cds", "unscored", "shift", "k_cds",
              "min_usable_images")


@dataclass(frozen=True)
class ExportPaths:
    sae: str
    card: str
    features: str | None


def _committed(root: ResultsRoot, job: JobConfig, stage: str, config_hash: str):
    """The stage's directory when it is committed for this job's config, else None."""
    d = root.stage(job.model.name, stage)
    return d if d.is_complete(config_hash) else None


def _data_source(job: JobConfig, extract_manifest: dict) -> dict:
    inputs = extract_manifest.get("inputs", {}).get("train_tokens", {})
    src = job.data.imagenet.train
    return {"path": src.path if src is not None else None, "format": src.format if src is not None else None,
            "images": inputs.get("images"), "rejected": inputs.get("rejected"),
            "token_rows": extract_manifest.get("rows", {}).get("train_tokens"),
            "tokens_per_image": extract_manifest.get("tokens_per_image"),
            "synthetic": bool(extract_manifest.get("synthetic_data", False))}


def provenance(job: JobConfig, root: ResultsRoot) -> dict:
    """What the committed SAE of ``job`` was made from and how it measured, from the manifests and
    tables of its committed stages (every value read, none recomputed)."""
    train = _committed(root, job, pipeline.TRAIN_SAE, pipeline.train_sae_hash(job))
    if train is None:
        raise RuntimeError(f"{job.model.name}: no SAE committed for this config at "
                           f"{root.stage(job.model.name, pipeline.TRAIN_SAE).uri}; run `scope-ray stage train-sae` first")
    tm = train.manifest()
    spec = job.model.spec
    out: dict = {
        "base_model": {"name": spec.name, "family": spec.family, "library": spec.loader, "arch": spec.arch,
                       "pretrained_tag": spec.pretrained_tag, "weights": job.model.weights, "width": spec.width,
                       "depth": spec.depth, "patch": spec.patch, "image_size": spec.image_size},
        "layer": {"index": job.model.resolved_layer, "site": "residual stream at the output of this block (1-based)",
                  "tokens": "patch tokens only (class / register tokens excluded)"},
        "preprocessing": {"resize": f"shorter side to {spec.image_size}, bicubic", "crop":
                          f"central {spec.image_size}x{spec.image_size}", "mean": list(spec.mean),
                          "std": list(spec.std), "input_scale": "folded into the weights (feed raw activations)"},
        "sae": {"d_in": tm.get("d_in"), "d_sae": tm.get("d_sae"), "k": tm.get("k"),
                "activation": tm.get("activation", "batchtopk (JumpReLU threshold at inference)")},
        "code_version": tm.get("code_version"), "train_sae_config_hash": tm.get("config_hash"),
        "committed_at": tm.get("committed_at"), "seed": job.seed,
    }
    if "imported" in tm:
        out["origin"] = {"kind": "imported", **tm["imported"]}
    else:
        extract = root.stage(job.model.name, pipeline.EXTRACT).manifest() or {}
        out["origin"] = {"kind": "trained here", "architecture": "BatchTopK", "steps": tm.get("steps"),
                         "expansion": job.sae.expansion, "lr": job.sae.lr, "batch_size": job.sae.batch_size,
                         "epochs": job.sae.epochs, "aux_coef": job.sae.aux_coef, "k_aux": job.sae.k_aux,
                         "dead_after_tokens": tm.get("dead_after_tokens"), "final": tm.get("final"),
                         "training_data": _data_source(job, extract)}
    ev = _committed(root, job, pipeline.EVAL_SAE, pipeline.eval_sae_hash(job))
    out["metrics"] = ({k: ev.read_table("sae_eval").to_pylist()[0].get(k) for k in METRIC_KEYS}
                      if ev is not None else None)
    part = _committed(root, job, pipeline.PARTITION, pipeline.partition_hash(job))
    out["scope"] = ({k: part.read_table("partition").to_pylist()[0].get(k) for k in SCOPE_KEYS}
                    if part is not None else None)
    if part is not None:
        cds = part.read_table("features").column("cds").to_numpy(zero_copy_only=False).astype(np.float64)
        scored = cds[np.isfinite(cds)]
        if scored.size:
            out["scope"]["cds_quantiles"] = dict(zip(("p10", "p50", "p90"),
                                                     np.quantile(scored, [0.1, 0.5, 0.9]).round(6).tolist()))
    return out


def _with_provenance(blob: bytes, prov: dict, path: str) -> bytes:
    """The safetensors ``blob`` re-serialised with ``prov`` added to its header metadata."""
    import safetensors.torch

    from scope_ray.sae_import import safetensors_metadata

    meta = dict(safetensors_metadata(blob, path))
    meta[PROVENANCE_KEY] = json.dumps(prov, sort_keys=True)
    return safetensors.torch.save(safetensors.torch.load(blob), metadata=meta)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _card_front_matter(prov: dict) -> list[str]:
    base = prov["base_model"]
    hub = f"{base['library']}:{base['arch']}" + (f".{base['pretrained_tag']}" if base["pretrained_tag"] else "")
    return ["---", "library_name: scope-ray", f"base_model: {json.dumps(hub)}",
            "tags: [sparse-autoencoder, interpretability, vision-transformer, information-scope]", "---", ""]


def model_card(prov: dict, job: JobConfig) -> str:
    """The model card (Markdown) for a provenance dict from ``provenance``."""
    base, layer, pre, sae, origin = (prov[k] for k in ("base_model", "layer", "preprocessing", "sae", "origin"))
    lines = _card_front_matter(prov) + [
        f"# SAE for {base['name']}, block {layer['index']}", "",
        f"A sparse autoencoder of {sae['d_sae']} latents on the {sae['d_in']}-wide {layer['site']} of "
        f"`{base['arch']}` ({base['library']}, weights: {base['weights']}), {layer['tokens']}. "
        f"Origin: {origin['kind']}" + (f" ({origin.get('toolkit')} {origin.get('architecture')})"
                                       if origin["kind"] == "imported" else " (BatchTopK)") + ".", ""]
    if base["weights"] != "pretrained":
        lines += [f"**The backbone's weights are `{base['weights']}`, not the library's pretrained ones: this SAE "
                  "describes that network only.**", ""]
    lines += [
        "## Preprocessing", "",
        f"- resize: {pre['resize']}; crop: {pre['crop']}",
        f"- normalise: mean {pre['mean']}, std {pre['std']}",
        f"- input scale: {pre['input_scale']}", ""]
    if origin["kind"] == "imported":
        lines += ["## Source", "", f"- toolkit: {origin.get('toolkit')}, class {origin.get('architecture')}",
                  f"- file: `{origin.get('source')}` (sha256 `{origin.get('sha256')}`)", ""]
    else:
        data = origin["training_data"]
        lines += ["## Training", "",
                  f"- data: `{data['path']}` ({data['format']}), {_fmt(data['images'])} images "
                  f"({_fmt(data['rejected'])} rejected), {_fmt(data['token_rows'])} token rows "
                  f"({_fmt(data['tokens_per_image'])} per image)" + (" — synthetic demo data" if data["synthetic"] else ""),
                  f"- BatchTopK: k = {sae['k']}, expansion {origin['expansion']}, lr {origin['lr']}, batch "
                  f"{origin['batch_size']}, {origin['epochs']} epochs ({origin['steps']} steps), AuxK k_aux "
                  f"{origin['k_aux']} coef {_fmt(origin['aux_coef'])}, dead after {_fmt(origin['dead_after_tokens'])} tokens",
                  ""]
    lines += ["## Metrics (validation tokens; supp. Table 6's columns)", ""]
    m = prov["metrics"]
    if m is None:
        lines += ["eval-sae has not run for this config.", ""]
    else:
        lines += ["| " + " | ".join(METRIC_KEYS) + " |", "|" + "---|" * len(METRIC_KEYS),
                  "| " + " | ".join(_fmt(m[k]) for k in METRIC_KEYS) + " |", ""]
    lines += ["## Information scope (CDS partition, Table 4's columns)", ""]
    s = prov["scope"]
    if s is None:
        lines += ["partition has not run for this config.", ""]
    else:
        lines += [f"- γ = {_fmt(s['gamma'])}, {s['gamma_source']}; shift {s['shift']}, k_cds {s['k_cds']}",
                  f"- low-CDS (local scope): {s['low_cds']}, high-CDS (global scope): {s['high_cds']}, "
                  f"unscored: {s['unscored']} (of {s['dictionary_size']})"]
        if "cds_quantiles" in s:
            lines.append("- CDS quantiles of scored latents: " + ", ".join(f"{k} {v:.3f}" for k, v in s["cds_quantiles"].items()))
        lines += [f"- every latent's CDS and group: `{FEATURES_NAME}`", ""]
    loader = "ImportedSAE" if origin["kind"] == "imported" else "BatchTopKSAE"
    module = "scope_ray.sae_import" if origin["kind"] == "imported" else "scope_ray.sae"
    lines += ["## Load", "", "```python", f"from {module} import {loader}", "",
              f"sae = {loader}.load(\"{SAE_NAME}\")  # safetensors + JSON header, no pickle",
              "codes = sae.encode(activations)  # [tokens, d_in] -> [tokens, d_sae]", "```", "",
              "## Provenance", "",
              f"scope-ray {prov['code_version']}, train-sae config hash `{prov['train_sae_config_hash']}`, "
              f"committed {prov['committed_at']}, seed {prov['seed']}, job `{job.name}`. The same record is in "
              f"the `{PROVENANCE_KEY}` key of {SAE_NAME}'s header.", ""]
    return "\n".join(lines)


def export_sae(job: JobConfig, root: ResultsRoot, out: str) -> ExportPaths:
    """Write ``out``/{sae.safetensors, features.parquet, README.md} for ``job``'s committed SAE."""
    prov = provenance(job, root)
    train = root.stage(job.model.name, pipeline.TRAIN_SAE)
    src = posixpath.join(train.uri, train.manifest().get("sae_file", "sae.safetensors"))
    blob = read_uri_bytes(src, root.endpoint_url, "SAE file")
    endpoint = root.endpoint_url if out.startswith("s3://") else None
    sae_uri, card_uri = join_uri(out, SAE_NAME), join_uri(out, CARD_NAME)
    write_uri_bytes(sae_uri, _with_provenance(blob, prov, src), endpoint)
    features_uri = None
    if prov["scope"] is not None:
        table = root.stage(job.model.name, pipeline.PARTITION).read_table("features")
        buf = io.BytesIO()
        pq.write_table(table.select(["feature", "cds", "group", "unscored_reason"]).cast(pa.schema([
            ("feature", pa.int64()), ("cds", pa.float64()), ("group", pa.string()), ("unscored_reason", pa.string())])),
            buf)
        features_uri = join_uri(out, FEATURES_NAME)
        write_uri_bytes(features_uri, buf.getvalue(), endpoint)
    write_uri_bytes(card_uri, model_card(prov, job).encode(), endpoint)
    return ExportPaths(sae_uri, card_uri, features_uri)


def read_provenance(path: str, endpoint_url: str | None = None) -> dict:
    """The ``scope_ray_provenance`` record of an exported SAE file."""
    from scope_ray.sae_import import safetensors_metadata

    meta = safetensors_metadata(read_uri_bytes(path, endpoint_url, "SAE file"), path)
    if PROVENANCE_KEY not in meta:
        raise ValueError(f"{path} has no {PROVENANCE_KEY!r} header: not written by scope-ray export-sae")
    return json.loads(meta[PROVENANCE_KEY])

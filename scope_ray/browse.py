"""``scope-ray browse JOB --out DIR``: a static site of a model's SAE features, by scope.

``index.html`` lists every feature (CDS, group, CDS status, usable images, top activation, firing
rate on validation tokens), sortable by any column and searchable, with the job's γ and group
sizes. The lowest- and highest-CDS features (``max_features`` in all, half from each end; every
scored one when there are fewer) get a page ``f/<feature>.html`` with their top images from CDS
pass 1, each shown as the SCC pair CDS compared — view 1 and view 2, the feature's activation
overlaid on each — with the image's pair score. A local-scope feature lights up the same content
in both views; a global-scope one moves.

Reads only committed stages of the job's config (partition, cds, cds-topk, extract's val tokens)
and recomputes the activation maps of the shown pairs with the job's model and SAE (SCC views at
``scope.shift``, as pass 2 made them). Plain files, no server needed; ``--serve`` serves the
folder on localhost. Ray Data reads the images (any source the job reads); the maps are computed
in this process.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scope_ray import pipeline
from scope_ray.config import JobConfig
from scope_ray.logs import info
from scope_ray.report.document import IMAGE_CHECK_SCRIPT
from scope_ray.storage import ResultsRoot

INDEX, FEATURE_DIR, IMAGE_DIR = "index.html", "f", "img"


@dataclass(frozen=True)
class BrowsePaths:
    index: Path
    feature_pages: int
    images: int


def _committed(job: JobConfig, root: ResultsRoot, stage: str, config_hash: str):
    d = root.stage(job.model.name, stage)
    if not d.is_complete(config_hash):
        raise RuntimeError(f"{job.model.name}: the {stage} stage is not committed for this config at {d.uri}; run "
                           f"`scope-ray stage {pipeline.stage_of(stage)}` first")
    return d


def feature_table(job: JobConfig, root: ResultsRoot) -> list[dict]:
    """One row per feature: CDS, group, reason, CDS status and images used, its best activation."""
    part = _committed(job, root, pipeline.PARTITION, pipeline.partition_hash(job))
    cds = _committed(job, root, pipeline.CDS, pipeline.cds_hash(job))
    topk = _committed(job, root, pipeline.CDS_TOPK, pipeline.cds_topk_hash(job)).read_table("topk")
    rows = {r["feature"]: dict(r) for r in part.read_table("features").to_pylist()}
    for r in cds.read_table("cds", columns=["feature", "images_used", "status"]).to_pylist():
        rows[r["feature"]].update(images_used=r["images_used"], status=r["status"])
    best: dict[int, float] = {}
    for f, a in zip(topk.column("feature").to_pylist(), topk.column("max_act").to_pylist()):
        best[f] = max(best.get(f, 0.0), float(a))
    for f, r in rows.items():
        r["max_act"] = best.get(f)
    return [rows[f] for f in sorted(rows)]


def firing_rate(job: JobConfig, root: ResultsRoot, max_tokens: int = 20_000) -> tuple[np.ndarray, int]:
    """Fraction of (up to ``max_tokens``) stored validation tokens on which each feature fires,
    encoded in chunks so only counts are kept; returns (rate_Q, tokens read)."""
    import pyarrow.parquet as pq
    import torch

    from scope_ray.stages.common import load_sae
    from scope_ray.tokens import activations_of

    sae = load_sae(job, root)
    counts, seen = None, 0
    for f in root.stage(job.model.name, pipeline.EXTRACT).part_files("val_tokens"):
        x = activations_of(pq.read_table(f, columns=["activation"], filesystem=root.arrow_fs))
        x = x[np.isfinite(x).all(axis=1)][: max_tokens - seen]
        for start in range(0, len(x), 2048):
            with torch.inference_mode():
                fired = (sae.encode(torch.from_numpy(x[start:start + 2048])) > 0).sum(dim=0).numpy()
            counts = fired if counts is None else counts + fired
        seen += len(x)
        if seen >= max_tokens:
            break
    if counts is None:
        return np.full(job.dictionary_size, np.nan), 0
    return counts / seen, seen


def chosen_features(rows: list[dict], max_features: int) -> list[int]:
    """The ``max_features`` scored features at the two ends of the CDS range (half each)."""
    scored = sorted((r for r in rows if r["cds"] is not None and np.isfinite(r["cds"]) and r["group"] != "unscored"),
                    key=lambda r: (r["cds"], r["feature"]))
    if len(scored) <= max_features:
        return [r["feature"] for r in scored]
    low = max_features // 2
    return [r["feature"] for r in scored[:low] + scored[len(scored) - (max_features - low):]]


def pair_maps(job: JobConfig, root: ResultsRoot, wanted: list[tuple[int, str]]) -> dict:
    """For each (feature, image id): the two SCC views (uint8) and the feature's patch-grid map on
    each, as CDS pass 2 computed them. Images that no longer decode are left out."""
    import ray.data  # noqa: F401 - the sources are read through Ray Data

    from scope_ray.data.sources import read_source
    from scope_ray.stages.cluster import actor_backbone
    from scope_ray.stages.common import load_sae, pool_source, selected_only
    from scope_ray.stages.scc_pairs import with_scc_pairs
    from scope_ray.topk import image_keys

    spec = job.model.spec
    ids = sorted({i for _, i in wanted})
    if not ids:
        return {}
    ds = read_source(pool_source(job), "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
    ds = ds.map_batches(selected_only, fn_kwargs=dict(keys_sorted=np.unique(image_keys(ids))), batch_size=256,
                        num_cpus=job.ray.read_cpus, batch_format="numpy")
    views = {}
    for batch in with_scc_pairs(ds, spec, (job.scope.shift,), job).iter_batches(batch_size=None, batch_format="numpy"):
        for i, ok, v1, v2 in zip(batch["image_id"], batch["ok"], batch["view1"], batch["view2"]):
            if ok:
                views[str(i)] = (v1, v2)
    import torch

    model, device = actor_backbone(job, job.ray.torch_threads or 1)
    sae = load_sae(job, root, device=device)
    out = {}
    by_image: dict[str, list[int]] = {}
    for f, i in wanted:
        if i in views:
            by_image.setdefault(i, []).append(f)
    for image_id, feats in by_image.items():
        pixels = torch.from_numpy(np.stack(views[image_id])).to(device)
        with torch.inference_mode():
            tokens = model.forward_layer(model.preprocess(pixels)).patch_tokens.float()
            z = sae.encode(tokens.reshape(-1, tokens.shape[-1])).reshape(2, spec.grid, spec.grid, -1)
        for f in feats:
            m = z[..., f].cpu().numpy()
            out[(f, image_id)] = (*views[image_id], m[0], m[1])
    return out


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}th{cursor:pointer;background:#f4f4f4}
td:nth-child(3),td:nth-child(4),th:nth-child(3),th:nth-child(4){text-align:left}.low{color:#4477aa}.high{color:#cc3311}.unscored{color:#888}
.pair{display:inline-block;margin:0 1.5em 1.5em 0;text-align:center;font-size:13px}.pair img{width:192px;
image-rendering:pixelated;margin:2px}input{font-size:15px;padding:4px;margin:0.5em 0}"""

# Sorting and filtering in the page itself (no server). A link can carry both: index.html#sort=-cds
# (descending by the column with that key) and #q=high (the filter text), e.g. #sort=-cds&q=high.
_SCRIPT = """const t=document.getElementById('features'),q=document.getElementById('q'),b=t.tBodies[0];
function filter(){const s=q.value.toLowerCase();for(const r of b.rows)
r.style.display=r.textContent.toLowerCase().includes(s)?'':'none'}
function sortBy(c,d){const v=r=>{const x=r.cells[c].dataset.v;return x===undefined?r.cells[c].textContent:parseFloat(x)};
const rs=[...b.rows];rs.sort((a,z)=>{const p=v(a),o=v(z);if(typeof p=='number'&&typeof o=='number'){
if(isNaN(p))return isNaN(o)?0:1;if(isNaN(o))return -1;return (p-o)*d}return String(p).localeCompare(String(o))*d});
rs.forEach(r=>b.appendChild(r))}
q.oninput=filter;
t.tHead.onclick=e=>{const h=e.target;h.dataset.d=h.dataset.d=='1'?'-1':'1';sortBy(h.cellIndex,+h.dataset.d)};
const a=new URLSearchParams(location.hash.slice(1)),k=a.get('sort');
if(k){const h=[...t.tHead.rows[0].cells].find(c=>c.dataset.key==k.replace(/^-/,''));if(h)sortBy(h.cellIndex,k[0]=='-'?-1:1)}
if(a.get('q')){q.value=a.get('q');filter()}
document.body.dataset.ready='1';"""

_COLUMNS = (("feature", "feature", "d"), ("cds", "CDS", ".3f"), ("group", "group", ""), ("status", "CDS status", ""),
            ("images_used", "usable images", "d"), ("max_act", "top activation", ".3f"),
            ("firing_rate", "firing rate", ".4f"))


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}" + (f"<script>{script}</script>" if script else "")
            + "</body></html>")


def _cell(row: dict, key: str, spec: str, pages: set[int]) -> str:
    value = row.get(key)
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    data = "" if number is None else f" data-v='{number if np.isfinite(number) else 'NaN'}'"
    text = html.escape(_fmt(value, spec) if spec and number is not None else _fmt(value))
    if key == "feature" and value in pages:
        text = f"<a href='{FEATURE_DIR}/{value}.html'>{text}</a>"
    if key == "group":
        text = f"<span class='{html.escape(str(value))}'>{text}</span>"
    return f"<td{data}>{text}</td>"


def index_page(job: JobConfig, summary: dict, rows: list[dict], pages: set[int]) -> str:
    head = "".join(f"<th data-key='{key}'>{html.escape(label)}</th>" for key, label, _ in _COLUMNS)
    body_rows = "".join("<tr>" + "".join(_cell(r, k, s, pages) for k, _, s in _COLUMNS) + "</tr>" for r in rows)
    return _page(f"{job.model.name}: SAE features by scope", f"""
<h1>{html.escape(job.model.name)}: {len(rows)} SAE features by information scope</h1>
<p>γ = {_fmt(summary['gamma'])}, {html.escape(str(summary['gamma_source']))}: {summary['low']} low-CDS (local scope),
{summary['high']} high-CDS (global scope), {summary['unscored']} unscored. Firing rate over {summary['tokens']} validation
tokens. Pages with images for the {len(pages)} features at the two ends of the CDS range (linked).
Click a column to sort; type to filter (a link can carry both: <code>#sort=-cds&amp;q=high</code>).</p>
<input id='q' placeholder='filter: feature id, group, status…' size='40'>
<table id='features'><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>""", _SCRIPT)


def feature_page(job: JobConfig, row: dict, shown: list[dict], neighbours: tuple[int | None, int | None]) -> str:
    prev_f, next_f = neighbours
    nav = " ".join(x for x in (
        f"<a href='{prev_f}.html'>← feature {prev_f}</a>" if prev_f is not None else "",
        f"<a href='../{INDEX}'>all features</a>",
        f"<a href='{next_f}.html'>feature {next_f} →</a>" if next_f is not None else "") if x)
    scope = {"low": "local scope", "high": "global scope"}.get(row["group"], row.get("unscored_reason") or "unscored")
    pairs = "".join(f"""<div class='pair'>
<div><img alt='view 1' src='../{IMAGE_DIR}/{p['v1']}'><img alt='view 2' src='../{IMAGE_DIR}/{p['v2']}'></div>
rank {p['rank']}: {html.escape(p['image_id'])} · top activation {_fmt(p['max_act'])} · pair score {_fmt(p['score'])}</div>"""
                    for p in shown) or "<p>No image of this feature decodes any more.</p>"
    return _page(f"feature {row['feature']}", f"""<p>{nav}</p>
<h1>Feature {row['feature']}: CDS {_fmt(row['cds'])} — <span class='{html.escape(row['group'])}'>{html.escape(row['group'])}
</span> ({html.escape(scope)})</h1>
<p>CDS status {html.escape(str(row.get('status')))}, {row.get('images_used')} usable images, firing rate
{_fmt(row.get('firing_rate'), '.4f')}. Each pair: the SCC views (shift {job.scope.shift}) CDS compared, the feature's
activation overlaid (each view scaled to its own maximum); the pair score is its EMD-based dissimilarity.</p>
{pairs}""", IMAGE_CHECK_SCRIPT)


def write_browser(job: JobConfig, root: ResultsRoot, out: str | Path, *, max_features: int = 200,
                  images: int = 4, max_tokens: int = 20_000, log=info) -> BrowsePaths:
    """Write the site for ``job``'s model into ``out`` (a local folder)."""
    from scope_ray.report.figures import overlay_map

    out = Path(out)
    (out / FEATURE_DIR).mkdir(parents=True, exist_ok=True)
    (out / IMAGE_DIR).mkdir(exist_ok=True)
    rows = feature_table(job, root)
    rate, tokens = firing_rate(job, root, max_tokens)
    for r in rows:
        r["firing_rate"] = float(rate[r["feature"]])
    chosen = chosen_features(rows, max_features)
    topk = root.stage(job.model.name, pipeline.CDS_TOPK).read_table("topk").to_pylist()
    scores = {(p["feature"], p["image_id"]): p["score"]
              for p in root.stage(job.model.name, pipeline.CDS).read_table("pairs").to_pylist()}
    keep = set(chosen)
    top = sorted((t for t in topk if t["feature"] in keep and t["rank"] < images), key=lambda t: (t["feature"], t["rank"]))
    log(f"[browse] {job.model.name}: {len(rows)} features, pages for {len(chosen)}, "
        f"{len({t['image_id'] for t in top})} images to map")
    maps = pair_maps(job, root, [(t["feature"], t["image_id"]) for t in top])
    written = 0
    shown: dict[int, list[dict]] = {f: [] for f in chosen}
    for t in top:
        key = (t["feature"], t["image_id"])
        if key not in maps:
            continue
        v1, v2, m1, m2 = maps[key]
        names = [f"{t['feature']}-{t['rank']}-v{k}.png" for k in (1, 2)]
        for name, view, m in zip(names, (v1, v2), (m1, m2)):
            (out / IMAGE_DIR / name).write_bytes(_png(overlay_map(view, m)))
            written += 1
        shown[t["feature"]].append({**t, "v1": names[0], "v2": names[1], "score": scores.get(key)})
    by_feature = {r["feature"]: r for r in rows}
    for i, f in enumerate(chosen):
        nb = (chosen[i - 1] if i else None, chosen[i + 1] if i + 1 < len(chosen) else None)
        (out / FEATURE_DIR / f"{f}.html").write_text(feature_page(job, by_feature[f], shown[f], nb), encoding="utf-8")
    part = root.stage(job.model.name, pipeline.PARTITION).read_table("partition").to_pylist()[0]
    summary = {"gamma": part["gamma"], "gamma_source": part["gamma_source"], "low": part["low_cds"],
               "high": part["high_cds"], "unscored": part["unscored"], "tokens": tokens}
    (out / INDEX).write_text(index_page(job, summary, rows, set(chosen)), encoding="utf-8")
    (out / "features.json").write_text(json.dumps(rows, default=float), encoding="utf-8")
    log(f"[browse] wrote {out / INDEX} ({len(chosen)} feature pages, {written} images)")
    return BrowsePaths(out / INDEX, len(chosen), written)


def serve(folder: Path, port: int = 8000) -> None:
    """Serve ``folder`` on localhost until interrupted."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        print(f"serving {folder} at http://127.0.0.1:{port}/{INDEX} (Ctrl-C stops)")
        httpd.serve_forever()

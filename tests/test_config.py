"""Config: every bad job fails on load, naming the key and what is allowed."""

import pytest

from scope_ray.config import ConfigError, load_config
from scope_ray.models.registry import REGISTRY


def _error(overrides, source=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(source, overrides)
    return str(exc.value)


def test_defaults_load_and_resolve_from_registry():
    job = load_config(None)
    spec = REGISTRY[job.model.name]
    assert job.model.resolved_layer == spec.layer
    assert job.model.resolved_tau == "auto"  # demo model has no published tau
    assert job.instability_shifts == tuple(range(1, min(6, spec.grid - 2) + 1))


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("model.name=vit-huge-9000", "model.name", "clip-vit-b16"),
        ("model.layer=99", "model.layer", "1..4"),
        ("model.layer=0", "model.layer", "1..4"),
        ("sae.k=5000", "sae.k", "1..3072"),
        ("scope.shift=7", "scope.shift", "1..5"),
        ("scope.shifts=[1, 6]", "scope.shifts", "1..5"),
        ("sae.bogus=1", "sae.bogus", "expansion"),
        ("nonsense=1", "nonsense", "model"),
        ("sae.k=thirty", "sae.k", "integer"),
        ("extract.tokens_per_image=50", "extract.tokens_per_image", "1..49"),
        ("ray.gpus_per_actor=-2", "ray.gpus_per_actor", "auto"),
        ("storage.root=ftp://host/x", "storage.root", "s3://"),
        ("probes.depth.lr_range=[1.0, 0.1]", "probes.depth.lr_range", "low <= high"),
    ],
)
def test_bad_values_name_key_and_allowed(override, key, allowed):
    msg = _error([override])
    assert f"{key}:" in msg
    assert allowed in msg


def test_bad_nested_source():
    msg = _error(["data.imagenet.train={format: zip, path: /x}"])
    assert "data.imagenet.train.format" in msg and "'folder', 'parquet', 'webdataset' or 'manifest'" in msg
    msg = _error(["data.imagenet.train={format: folder}"])
    assert "data.imagenet.train.path" in msg


def test_layer_checked_against_the_chosen_model():
    # Layer 40 is valid for DINOv2-G and out of range for DINOv2-B: the check follows the model.
    assert load_config(None, ["model.name=dinov2-g", "model.layer=40"]).model.resolved_layer == 40
    assert "allowed: 1..12" in _error(["model.name=dinov2-b", "model.layer=40"])


def test_yaml_file_and_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  name: deit3-b\nsae:\n  k: 16\n")
    cfg = load_config(job, ["sae.k=24", "storage.root=s3://bucket/prefix"])
    assert (cfg.model.name, cfg.sae.k, cfg.storage.root) == ("deit3-b", 24, "s3://bucket/prefix")
    assert cfg.model.resolved_tau == 500.0


def test_unreadable_sources():
    assert "does not exist" in _error([], "/nonexistent/job.yaml")
    assert "key=value" in _error(["sae.k"])


def test_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in _error([], bad)


def test_stage_hash_tracks_only_named_sections():
    a = load_config(None)
    b = load_config(None, ["sae.k=12"])
    c = load_config(None, ["extract.batch_size=8"])
    assert a.stage_hash("model", "extract") == b.stage_hash("model", "extract")
    assert a.stage_hash("model", "extract") != c.stage_hash("model", "extract")
    assert a.stage_hash("model") != load_config(None, ["seed=1"]).stage_hash("model")


def test_config_is_frozen():
    job = load_config(None)
    with pytest.raises(Exception):
        job.seed = 3


def test_partial_probe_task_section_keeps_the_task_defaults():
    job = load_config(None, ["probes.depth.epochs=2", "probes.classification.trials=2"])
    assert job.probes.depth.epochs == 2 and job.probes.depth.batch_size == 8
    assert job.probes.depth.lr_range == (0.1, 1.0)
    assert job.probes.classification.trials == 2 and job.probes.classification.batch_size == 1024
    with pytest.raises(ConfigError, match="probes.depth.lr_range"):
        load_config(None, ["probes.depth.lr_range=[1.0, 0.1]"])


def test_every_job_spec_in_jobs_validates_and_carries_the_papers_probe_protocol():
    from pathlib import Path

    # demo.yaml carries the demo's short probe schedules on purpose (tests/test_jobs.py checks it).
    specs = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml") if p.name != "demo.yaml")
    assert specs, "no job specs under jobs/"
    for path in specs:
        job = load_config(str(path))
        for task, (epochs, batch) in {"classification": (100, 1024), "segmentation": (100, 64), "depth": (100, 8)}.items():
            cfg = getattr(job.probes, task)
            assert (cfg.epochs, cfg.batch_size, cfg.trials) == (epochs, batch, 5), (path.name, task)


def test_job_and_sweep_files_that_are_missing_not_yaml_or_not_a_mapping_are_named(tmp_path):
    from scope_ray.config import ConfigError, load_config
    from scope_ray.sweep import SweepSpecError, load_sweep

    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    for path, message in ((tmp_path / "none.yaml", "does not exist"), (tmp_path / "bad.yaml", "is not valid YAML"),
                          (tmp_path / "list.yaml", "must hold a mapping of keys, not list")):
        with pytest.raises(ConfigError, match=f"job file .*{path.name}.*{message}"):
            load_config(path)
        with pytest.raises(SweepSpecError, match=f"sweep file .*{path.name}.*{message}"):
            load_sweep(path)


def test_the_auto_dead_window_is_a_quarter_of_the_run_capped_at_10m():
    from scope_ray.config import DEAD_AFTER_TOKENS_CAP

    sae = load_config(None).sae
    assert sae.dead_after_tokens == "auto"
    # One ImageNet epoch at 4 tokens/image (1,281,167 images) on one worker: well inside 10M.
    assert sae.resolved_dead_after_tokens(4 * 1_281_167) == 1_281_167
    assert sae.resolved_dead_after_tokens(10**9) == DEAD_AFTER_TOKENS_CAP == 10_000_000
    assert sae.resolved_dead_after_tokens(2) == 1
    assert load_config(None, ["sae.dead_after_tokens=500"]).sae.resolved_dead_after_tokens(10**9) == 500
    with pytest.raises(ConfigError, match="sae.dead_after_tokens"):
        load_config(None, ["sae.dead_after_tokens=0"])


def test_precision_is_part_of_what_tokens_depend_on():
    from scope_ray.stages.extract import config_hash

    base = load_config(None)
    assert base.model.precision == "fp32" and base.model.tf32 is False
    assert config_hash(load_config(None, ["model.precision=bf16"])) != config_hash(base)
    assert config_hash(load_config(None, ["model.tf32=true"])) != config_hash(base)
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(None, ["model.precision=fp16"])
    with pytest.raises(ConfigError, match="sae.batch_size"):
        load_config(None, ["sae.num_workers=3", "sae.batch_size=4096"])


@pytest.mark.parametrize("override, key", [
    ("sae.lr=.inf", "sae.lr"), ("model.tau=.nan", "model.tau"), ("scope.gamma=-5", "scope.gamma"),
    ("scope.gamma=1.5", "scope.gamma"), ("model.layer=true", "model.layer"), ("sae.k=false", "sae.k"),
    ("storage.root=s3:/bucket/x", "storage.root"), ("storage.root=s3//bucket/x", "storage.root"),
    ("storage.root=s3:///x", "storage.root"),
])
def test_values_that_make_garbage_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_booleans_stay_allowed_where_a_boolean_is_meant():
    assert load_config(None, ["model.tf32=true"]).model.tf32 is True
    assert load_config(None, ["storage.root=s3://bucket"]).storage.root == "s3://bucket"
    assert load_config(None, ["scope.gamma=0.2"]).scope.gamma == 0.2


def test_spec_files_are_read_strictly_and_errors_name_the_file(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("sae: {k: 8}\nmodel: {name: demo-vit-tiny}\nsae: {k: 16}\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml.*'sae' appears twice.*line 1"):
        load_config(str(twice))
    # 'Billion laughs': aliases of aliases. Six levels of ten (10^6 values expanded, ~10 MB if the
    # guard ever failed: large enough to refuse, small enough never to exhaust memory here) ...
    laughs = tmp_path / "laughs.yaml"
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    laughs.write_text("\n".join(lines) + "\n")
    assert laughs.stat().st_size < 1000
    with pytest.raises(ConfigError, match=r"laughs\.yaml.*expansion bomb"):
        load_config(str(laughs))
    # ... and a file with more aliases than any spec uses is refused while it is parsed.
    many = tmp_path / "many.yaml"
    many.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n")
    with pytest.raises(ConfigError, match=r"many\.yaml.*more than 100 aliases"):
        load_config(str(many))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 1_000_001 + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml.*at most 1,000,000"):
        load_config(str(big))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml.*not UTF-8"):
        load_config(str(latin))
    # A few anchors, as a hand-written spec uses them, still load.
    ok = tmp_path / "ok.yaml"
    ok.write_text("x: &common {batch_size: 8}\nextract: *common\n")
    with pytest.raises(ConfigError, match="x"):  # unknown top-level key: the usual error, not a YAML one
        load_config(str(ok))

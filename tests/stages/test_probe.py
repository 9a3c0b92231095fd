"""Probe search stage (Ray Tune over Ray Train) on a tiny synthetic probe-features cache.

The cache is written straight into a ``probe-features`` stage in the layout that stage commits:
classes separable along planted directions, segmentation masks and depth maps computed from the
patch tokens, so a linear probe can learn all three in a couple of epochs.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from scope_ray import faults
from scope_ray.config import ConfigError, load_config
from scope_ray.stages.cluster import ClusterResourceError
from scope_ray.stages.probe import (
    METRICS,
    FEATURES_STAGE,
    best_rows,
    config_hash,
    max_concurrent_trials,
    run_probes,
    sample_configs,
    search_trials,
    trial_seed,
)
from scope_ray.storage import ResultsRoot

D, G, S = 8, 2, 4          # width, grid (N = 4 patch tokens), image size (each token covers 2x2 pixels)
N = G * G
SEG_CLASSES = 3
VARIANTS = ("original", "low_removed")


def _fsl(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
    flat = values.reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), type=dtype), flat.shape[1])


def _pixels(per_token_BN: np.ndarray) -> np.ndarray:
    """[B, N] per-token values → [B, S, S], each token filling its own S/G x S/G block."""
    b = len(per_token_BN)
    grid = per_token_BN.reshape(b, G, G)
    return grid.repeat(S // G, axis=1).repeat(S // G, axis=2)


def write_cache(root: ResultsRoot, n_train: int = 32, n_val: int = 16, *, bad_label: bool = False,
                bad_mask_value: bool = False, mask_size: int = S * S, model: str = "demo-vit-tiny") -> None:
    rng = np.random.default_rng(0)
    stage = root.stage(model, FEATURES_STAGE)
    dirs = np.eye(D, dtype=np.float32)[:3] * 3.0
    for split, n in (("train", n_train), ("val", n_val)):
        for variant in VARIANTS:
            ids = [f"{split}-{i:03d}" for i in range(n)]
            # low_removed carries a weaker signal, so the variants differ, as in the paper.
            strength = 1.0 if variant == "original" else 0.3
            y = rng.integers(0, 3, n)
            emb = (dirs[y] * strength + rng.normal(size=(n, D))).astype(np.float32)
            if bad_label and split == "train" and variant == "original":
                y[5] = -1
            stage.write_part(f"classification_{split}", variant, pa.table({
                "image_id": ids, "variant": [variant] * n, "embedding": _fsl(emb, pa.float32()), "label": y}))
            tokens = rng.normal(size=(n, N, D)).astype(np.float32)
            cls_token = tokens[:, :, :3] * strength
            seg = _pixels(cls_token.argmax(-1)).astype(np.uint8)
            seg[:, 0, 0] = 255  # an ignored pixel in every image
            if bad_mask_value and split == "train" and variant == "original":
                seg[3, 1, 1] = 200
            mask = seg.reshape(n, -1)
            if mask_size != S * S:
                mask = np.concatenate([mask, np.zeros((n, mask_size - S * S), np.uint8)], axis=1)
            stage.write_part(f"segmentation_{split}", variant, pa.table({
                "image_id": ids, "variant": [variant] * n, "tokens": _fsl(tokens, pa.float32()),
                "mask": _fsl(mask, pa.uint8())}))
            depth = _pixels(1.0 + 2.0 / (1.0 + np.exp(-2.0 * tokens[:, :, 0] * strength))).astype(np.float32)
            depth[:, -1, -1] = np.nan  # an invalid pixel in every image
            stage.write_part(f"depth_{split}", variant, pa.table({
                "image_id": ids, "variant": [variant] * n, "cls": _fsl(tokens.mean(1), pa.float32()),
                "tokens": _fsl(tokens, pa.float32()), "depth": _fsl(depth, pa.float32())}))
    tables = [f"{t}_{s}" for t in ("classification", "segmentation", "depth") for s in ("train", "val")]
    stage.commit("features-test", {}, {t: (n_train if t.endswith("train") else n_val) * len(VARIANTS) for t in tables},
                 extra={"width": D, "grid": G, "image_size": S, "variants": list(VARIANTS)})


def _job(root, *overrides):
    # Two epochs instead of 100, so the test lr range is higher than the paper's.
    task = {"epochs": 2, "batch_size": 8, "lr_range": [0.1, 1.0]}
    probes = {"classification": task, "segmentation": task, "depth": task, "depth_bins": 16, "max_depth": 4.0}
    return load_config({"storage": {"root": str(root)}, "probes": probes}, list(overrides))


def _quiet(*_):
    pass


class _UnpicklableLog:
    """A log function that cannot be pickled, as ``print`` cannot once Ray Train has patched
    ``builtins.print`` in the driver (the CLI's case after train-sae): nothing Tune pickles may hold it."""

    def __call__(self, *_):
        pass

    def __reduce__(self):
        raise TypeError("the log function was pickled")


NUM_CLASSES = {"segmentation": SEG_CLASSES}


# ------------------------------------------------------------------------------------- pure
def test_sampled_configs_are_reproducible_log_uniform_and_distinct_per_task_and_seed():
    a = sample_configs(0, "depth", 50, (1e-1, 1.0), (1e-5, 1e-4))
    assert a == sample_configs(0, "depth", 50, (1e-1, 1.0), (1e-5, 1e-4))
    assert [c["trial"] for c in a] == list(range(50))
    assert all(1e-1 <= c["lr"] <= 1.0 and 1e-5 <= c["weight_decay"] <= 1e-4 for c in a)
    # Log-uniform: about half the draws fall below the geometric midpoint.
    below = sum(c["lr"] < math.sqrt(1e-1 * 1.0) for c in a)
    assert 15 <= below <= 35
    pairs = {(c["lr"], c["weight_decay"]) for c in a}
    for other in (sample_configs(0, "segmentation", 50, (1e-1, 1.0), (1e-5, 1e-4)),
                  sample_configs(1, "depth", 50, (1e-1, 1.0), (1e-5, 1e-4))):
        assert not pairs & {(c["lr"], c["weight_decay"]) for c in other}  # no draw shared
    # The first draws do not depend on how many trials are asked for.
    assert sample_configs(0, "depth", 3, (1e-1, 1.0), (1e-5, 1e-4)) == a[:3]


def test_every_variant_of_a_task_runs_the_same_trials(tmp_path):
    """Common random numbers: trial k of every variant has the same lr, weight decay and probe seed
    (what the search hands each trial), so variant differences are not search noise; other tasks
    and seeds draw differently, and the trial seeds differ between trials."""
    job, job1 = _job(tmp_path, "probes.depth.trials=4"), _job(tmp_path, "probes.depth.trials=4", "seed=1")
    all_variants = ("original", "high_removed", "low_removed", "random_removed")

    def search(j, task, variant):
        return [{k: v for k, v in c.items() if k != "variant"} for c in search_trials(j, task, variant)]

    base = search(job, "depth", "original")
    assert [c["trial"] for c in base] == [0, 1, 2, 3] and len({c["seed"] for c in base}) == 4
    assert all(c["variant"] == v for v in all_variants for c in search_trials(job, "depth", v))
    assert all(search(job, "depth", v) == base for v in all_variants)
    hp = [(c["lr"], c["weight_decay"]) for c in base]
    assert [(c["lr"], c["weight_decay"]) for c in search(job, "segmentation", "original")][:4] != hp
    assert [(c["lr"], c["weight_decay"]) for c in search(job1, "depth", "original")] != hp
    assert [c["seed"] for c in search(job1, "depth", "original")] != [c["seed"] for c in base]
    # The trials argument overrides probes.<task>.trials without changing the first draws.
    assert search(job, "depth", "high_removed")[:2] == [{k: v for k, v in c.items() if k != "variant"}
                                                        for c in search_trials(job, "depth", "low_removed", 2)]


def test_config_hash_names_how_the_trials_are_drawn(tmp_path, monkeypatch):
    """A search whose trials were drawn per (task, variant) (before common random numbers) must
    not be resumed or reused: the draw rule is in the stage's config hash."""
    import scope_ray.stages.probe as probe

    job = _job(tmp_path)
    args = (job, {"config_hash": "f", "committed_at": "t"}, ["depth"], ["original"], None, None)
    now = config_hash(*args)
    monkeypatch.setattr(probe, "DRAWS", "per (task, variant)")
    assert config_hash(*args) != now


def test_concurrency_counts_the_tune_actor_and_the_train_worker():
    assert max_concurrent_trials({"CPU": 2.0}, worker_cpus=1.0, worker_gpus=0) == 1
    assert max_concurrent_trials({"CPU": 2.0}, worker_cpus=0.5, worker_gpus=0) == 2
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 4.0}, worker_cpus=1.0, worker_gpus=1.0) == 4
    with pytest.raises(ClusterResourceError, match="Tune actor"):
        max_concurrent_trials({"CPU": 1.0}, worker_cpus=1.0, worker_gpus=0)
    with pytest.raises(ClusterResourceError, match="GPU"):
        max_concurrent_trials({"CPU": 8.0}, worker_cpus=1.0, worker_gpus=1.0)


def test_best_row_is_the_max_or_min_and_never_a_diverged_trial():
    rows = [
        {"task": "depth", "variant": "original", "trial": 0, "value": 0.9, "lr": 0.1, "weight_decay": 1e-5},
        {"task": "depth", "variant": "original", "trial": 1, "value": float("nan"), "lr": 0.9, "weight_decay": 1e-5},
        {"task": "depth", "variant": "original", "trial": 2, "value": 0.7, "lr": 0.2, "weight_decay": 1e-5},
        {"task": "classification", "variant": "original", "trial": 0, "value": 0.5, "lr": 1e-3, "weight_decay": 1e-5},
        {"task": "classification", "variant": "original", "trial": 1, "value": 0.8, "lr": 2e-3, "weight_decay": 1e-5},
    ]
    best = {(b["task"], b["variant"]): b for b in best_rows(rows)}
    assert best[("depth", "original")]["trial"] == 2 and best[("depth", "original")]["trials"] == 3
    assert best[("classification", "original")]["value"] == 0.8
    assert [b["task"] for b in best_rows(rows)] == ["classification", "depth"]  # Table 3 / 8 order


def test_checkpoint_every_is_validated_and_leaves_the_stage_hash_alone():
    with pytest.raises(ConfigError, match="probes.checkpoint_every"):
        _job("/tmp/r", "probes.checkpoint_every=0")
    args = ({"config_hash": "f"}, ["depth"], ["original"], 1, None)
    assert config_hash(_job("/tmp/r", "probes.checkpoint_every=1"), *args) == config_hash(_job("/tmp/r"), *args)
    assert config_hash(_job("/tmp/r", "probes.depth.epochs=3"), *args) != config_hash(_job("/tmp/r"), *args)


def test_variant_bytes_match_the_arrays_and_groups_fit_the_budget(tmp_path):
    from scope_ray.stages.probe_cache import class_count, load_split, open_cache, pack_units, variant_bytes

    root = ResultsRoot(str(tmp_path / "r"))
    write_cache(root)
    job = _job(tmp_path / "r")
    cache = open_cache(job, root)
    for task in METRICS:
        classes = class_count(cache, task, NUM_CLASSES)
        arrays = [load_split(cache, task, split, "original", classes) for split in ("train", "val")]
        assert variant_bytes(cache, task) == sum(a.nbytes for split in arrays for a in split.values()), task
    units = [(t, v) for t in ("classification", "depth") for v in ("original", "low_removed")]
    size = {u: 100 if u[0] == "classification" else 300 for u in units}
    assert pack_units(units, size, float("inf")) == [units]
    assert pack_units(units, size, 500) == [units[:3], units[3:]]  # 100 + 100 + 300, then 300
    assert pack_units(units, size, 250) == [units[:2], units[2:3], units[3:]]  # 300 > 250: alone


# ------------------------------------------------------------------------------- with Ray
def ray_local_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _uninterrupted(job, root, task: str, variant: str, trial: int):
    """The same trial as the search runs it (data, spec, seed), fitted in-process without a stop."""
    import torch

    from scope_ray.probes.train import ProbeSpec, fit_probe
    from scope_ray.stages.probe_cache import class_count, load_split, open_cache

    cache = open_cache(job, root)
    tcfg = getattr(job.probes, task)
    hp = sample_configs(job.seed, task, trial + 1, tcfg.lr_range, tcfg.weight_decay_range)[trial]
    classes = class_count(cache, task, NUM_CLASSES)
    spec = ProbeSpec(task=task, width=D, image_size=S, epochs=tcfg.epochs, batch_size=tcfg.batch_size,
                     lr=hp["lr"], weight_decay=hp["weight_decay"], seed=trial_seed(job.seed, trial),
                     num_classes=classes, depth_bins=job.probes.depth_bins, max_depth=job.probes.max_depth)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Train worker runs it (torch_threads)
    try:
        return fit_probe(spec, *(load_split(cache, task, split, variant, classes) for split in ("train", "val")))
    finally:
        torch.set_num_threads(before)


def _hand_rmse(job, root, head) -> float:
    """RMSE in metres of a depth head on depth/original's val rows, pixels pooled, by hand."""
    import torch

    from scope_ray.stages.probe_cache import load_split, open_cache

    val = load_split(open_cache(job, root), "depth", "val", "original", None)
    with torch.no_grad():
        pred = head.eval()(torch.tensor(val["cls"]), torch.tensor(val["tokens"]), (S, S)).double().numpy()
    truth = val["depth"].astype(np.float64)
    valid = np.isfinite(truth) & (truth > 0)
    assert 0 < valid.sum() < valid.size  # the cache's NaN pixel is skipped
    return math.sqrt(float(np.mean((pred[valid] - truth[valid]) ** 2)))


def test_search_over_two_tasks_survives_a_killed_worker_and_resumes_after_a_failed_trial(ray_local, tmp_path):
    """Two tasks x two variants through Tune x Train in one packed search. In the first attempt the
    Train worker of classification/low_removed is SIGKILLed after epoch 5 and restarted by Train from
    its epoch-3 checkpoint, finishing in that same search with the metrics of an uninterrupted
    fit; depth/low_removed fails for good part-way through, and the re-run runs only that trial.
    (One trial per pair and two tasks, not three: each trial costs seconds of Ray Train start-up
    here. The demo's test runs all 3 tasks x 4 variants through the same search; picking the best
    of several is tested without Ray above.)"""
    tasks = ("classification", "depth")
    root = ResultsRoot(str(tmp_path / "r"))
    write_cache(root)
    # Half a CPU per Train worker: two trials (each 0.25 + 0.5 CPU) fit side by side on 2 CPUs.
    # Classification runs 6 epochs with a checkpoint every 3: the kill after epoch 5 comes two
    # reports after the epoch-3 checkpoint, when Train has certainly registered it (a report waits
    # in the worker until the controller's next poll takes it), and no newer one exists yet.
    job = _job(tmp_path / "r", "probes.worker_cpus=0.5", "probes.checkpoint_every=3", "probes.classification.epochs=6")
    marker = tmp_path / "killed"
    # low_removed: its weak signal keeps the val curve moving to the end (original saturates at 1.0).
    kill = {"task": "classification", "variant": "low_removed", "trial": 0, "after_epoch": 5, "marker": str(marker)}
    with pytest.raises(RuntimeError, match=r"(?s)depth/low_removed: trial 0 failed.*InjectedFault"):
        with faults.injected("probe", kill=kill, **{"raise": [["depth", "low_removed", 0]]}):
            run_probes(job, root, tasks=tasks, trials=1, num_classes=NUM_CLASSES, log=_quiet)
    assert marker.read_text() == "killed after epoch 5\n"  # the worker process really died there
    stage = root.stage("demo-vit-tiny", "probe")
    assert not stage.is_complete()
    kept = sorted(root.fs.glob(stage.table_path("trials") + "/*.parquet"))
    assert len(kept) == 3 and not any("depth__low_removed" in p for p in kept)
    before = {p: root.fs.cat_file(p) for p in kept}

    res = run_probes(job, root, tasks=tasks, trials=1, num_classes=NUM_CLASSES, log=_UnpicklableLog())
    assert (res.ran_trials, res.reused_trials) == (1, 3) and res.max_concurrent == 2
    assert all(root.fs.cat_file(p) == data for p, data in before.items())  # finished trials not run again
    trials = stage.read_table("trials").to_pylist()
    best = stage.read_table("best").to_pylist()
    pairs = {(t, v) for t in tasks for v in VARIANTS}
    assert {(r["task"], r["variant"]) for r in trials} == pairs and len(trials) == 4
    assert {(b["task"], b["variant"]) for b in best} == pairs and len(best) == 4
    for b in best:
        values = [r["value"] for r in trials if (r["task"], r["variant"]) == (b["task"], b["variant"])]
        assert b["value"] == values[0] and b["metric"] == METRICS[b["task"]][0]
    for r in trials:
        epochs = getattr(job.probes, r["task"]).epochs
        assert len(r["curve"]) == epochs and r["curve"][-1] == r["value"] and r["epochs"] == epochs
        cfg = sample_configs(job.seed, r["task"], 1, getattr(job.probes, r["task"]).lr_range, (1e-5, 1e-4))
        assert (r["lr"], r["weight_decay"]) == (cfg[0]["lr"], cfg[0]["weight_decay"])
        assert r["seconds_train"] > 0 and r["seconds_startup"] > 0 and r["seconds_actor"] >= 0
        assert r["node_id"] == ray_local_node_id()  # which node's worker trained it (one node here)
    # The killed trial picked up at its epoch-3 checkpoint and ended exactly where an uninterrupted
    # fit of the same trial ends; no other trial was restarted.
    row = {(r["task"], r["variant"]): r for r in trials}
    killed = row[("classification", "low_removed")]
    assert killed["resumed_from_epoch"] == 3
    assert [r["resumed_from_epoch"] for r in trials if r is not killed] == [0, 0, 0]
    reference = _uninterrupted(job, root, "classification", "low_removed", 0)
    assert len(set(reference.curve)) > 2  # a curve that moves, so matching it means something
    assert (killed["value"], killed["curve"], killed["train_loss"]) == (reference.value, reference.curve,
                                                                        reference.train_loss)
    by = {(b["task"], b["variant"]): b["value"] for b in best}
    assert by[("classification", "original")] > 0.6  # planted classes: well above chance (1/3)
    # Every variant of a task ran the same configuration (common random numbers); the tasks differ.
    hp = {t: {(r["lr"], r["weight_decay"]) for r in trials if r["task"] == t} for t in tasks}
    assert all(len(v) == 1 for v in hp.values()) and hp["classification"] != hp["depth"]
    # Depth RMSE against a hand computation: the same trial fitted in-process, its head run on the
    # val tokens, RMSE over the valid (finite, > 0) pixels in float64 NumPy, not DepthErrors.
    ref = _uninterrupted(job, root, "depth", "original", 0)
    assert by[("depth", "original")] == pytest.approx(_hand_rmse(job, root, ref.head), rel=1e-6)
    again = run_probes(job, root, tasks=tasks, trials=1, num_classes=NUM_CLASSES, log=_quiet)
    assert again.skipped and again.best == best


def test_bad_label_names_the_table_and_image(ray_local, tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    write_cache(root, bad_label=True)
    with pytest.raises(ValueError, match=r"classification_train.*label outside the class range.*'train-005'"):
        run_probes(_job(tmp_path / "r"), root, tasks=["classification"], trials=1, log=_quiet)


def test_bad_mask_value_and_wrong_mask_size_are_clear_errors(ray_local, tmp_path):
    root = ResultsRoot(str(tmp_path / "a"))
    write_cache(root, bad_mask_value=True)
    with pytest.raises(ValueError, match=r"segmentation_train.*'mask' of image 'train-003': \[200\].*0\.\.149 or 255"):
        run_probes(_job(tmp_path / "a"), root, tasks=["segmentation"], trials=1, log=_quiet)
    root = ResultsRoot(str(tmp_path / "b"))
    write_cache(root, mask_size=S * S + 3)
    with pytest.raises(ValueError, match=r"segmentation_train/model=demo-vit-tiny/stage=probe-features: column 'mask' holds 19 values per image, expected 16"):
        run_probes(_job(tmp_path / "b"), root, log=_quiet)

"""SAE training (Ray Train) and evaluation stages on synthetic token tables.

Token tables are written straight into an extract stage (no ViT needed): sparse combinations
of known directions, the kind of data an SAE can fit, at the demo model's width.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scope_ray import faults
from scope_ray.config import load_config
from scope_ray.metrics import sae_metrics
from scope_ray.stages.eval_sae import run_eval_sae
from scope_ray.stages.extract import config_hash as extract_hash
from scope_ray.stages.train_sae import load_sae, run_train_sae
from scope_ray.storage import ResultsRoot
from scope_ray.tokens import activations_of, token_table

pytestmark = pytest.mark.slow

D = 96  # demo-vit-tiny's width


def _sparse_tokens(rng, n: int, n_dirs: int = 48, active: int = 3) -> np.ndarray:
    dirs = np.random.default_rng(1234).normal(size=(n_dirs, D)).astype(np.float32)
    x = np.zeros((n, D), np.float32)
    for i in range(n):
        idx = rng.choice(n_dirs, active, replace=False)
        x[i] = (rng.uniform(0.5, 3.0, active)[:, None] * dirs[idx]).sum(0)
    return x + 0.5


def write_token_stage(root: ResultsRoot, n_train: int = 2048, n_val: int = 512, *, nan_rows: int = 0,
                      width: int = D, seed: int = 0) -> None:
    """A committed extract stage holding synthetic tokens (``nan_rows`` of them NaN in train)."""
    rng = np.random.default_rng(seed)
    stage = root.stage("demo-vit-tiny", "extract")
    for table, n in (("train_tokens", n_train), ("val_tokens", n_val)):
        x = _sparse_tokens(rng, n)[:, :width] if width <= D else np.tile(_sparse_tokens(rng, n), 2)[:, :width]
        if table == "train_tokens" and nan_rows:
            x[rng.choice(n, nan_rows, replace=False)] = np.nan
        ids = [f"img{i // 4:05d}" for i in range(n)]
        for part in range(2):  # two part files, like two actors' batches
            sl = slice(part * n // 2, (part + 1) * n // 2)
            acts = x[sl][:, None, :]
            pos = (np.arange(sl.start, sl.stop) % 4)[:, None]
            stage.write_part(table, f"p{part}", token_table(ids[sl], pos, acts, np.linalg.norm(acts, axis=-1)))
    # Committed under the hash a default job expects, as a real extraction would be.
    stage.commit(extract_hash(load_config(None)), {}, {"train_tokens": n_train, "val_tokens": n_val, "rejects": 0})


def _job(root, *overrides):
    return load_config({"storage": {"root": str(root)}},
                       ["sae.expansion=4", "sae.k=4", "sae.batch_size=128", "sae.epochs=2", "sae.lr=0.003",
                        "sae.log_every=4", "sae.checkpoint_every=8", "sae.shuffle_buffer=256", *overrides])


def _quiet(*_):
    pass


def test_train_then_eval_on_s3_equals_direct_metrics_and_stores_no_credentials(ray_local, s3_bucket, capfd):
    """Train and eval through an s3:// root (moto on loopback): the streamed, merged metrics equal
    a direct pass; checkpoints are on S3; the test credentials are in no stored object and no log."""
    from tests.secrets_scan import find_credentials, root_objects, scan_root

    bucket, endpoint = s3_bucket
    root = ResultsRoot(f"{bucket}/results", endpoint_url=endpoint)
    write_token_stage(root)
    job = _job(f"{bucket}/results", f"storage.endpoint_url={endpoint}")
    res = run_train_sae(job, root, log=_quiet)
    assert res.steps == 2 * (2048 // 128)
    log = root.stage("demo-vit-tiny", "train-sae").read_table("training_log").to_pylist()
    assert [r["step"] for r in log] == list(range(4, res.steps + 1, 4))
    assert log[-1]["fvu"] < log[0]["fvu"]
    ev = run_eval_sae(job, root, log=_quiet).row
    # The stage's streamed, merged metrics equal one direct pass of the saved SAE over all val tokens.
    sae = load_sae(job, root)
    val = root.stage("demo-vit-tiny", "extract").read_table("val_tokens")
    x = torch.from_numpy(activations_of(val).copy())
    with torch.inference_mode():
        x_hat, z = sae(x)
    direct = sae_metrics(x, x_hat, z)
    assert ev["fvu_all"] == pytest.approx(direct["fvu"], rel=1e-6)
    assert ev["l0_all"] == pytest.approx(direct["l0"], rel=1e-9)
    assert ev["cs_all"] == pytest.approx(direct["cs"], rel=1e-6)
    assert ev["tokens"] == 512 and ev["dead_latents"] == int(((z != 0).sum(0) == 0).sum())
    out = val.column("norm").to_numpy() > ev["tau"]
    assert ev["outlier_tokens"] == int(out.sum())
    direct_out = sae_metrics(x[out], x_hat[out], z[out])
    assert ev["fvu_outlier"] == pytest.approx(direct_out["fvu"], rel=1e-6)
    assert ev["fvu_all"] < 0.8, ev  # 32 steps: better than the mean, not converged
    # Both stages are skipped on a re-run.
    assert run_train_sae(job, root, log=_quiet).skipped and run_eval_sae(job, root, log=_quiet).skipped
    objects = root_objects(root)
    assert any(o.endswith("sae.safetensors") for o in objects) and any("checkpoint_" in o for o in objects)
    assert scan_root(root) == []
    out, err = capfd.readouterr()
    assert find_credentials([("captured stdout/stderr", (out + err).encode())]) == []


SETTINGS = ("sae.shuffle_buffer=0",)  # batches in table order: a resumed run can be compared exactly


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One uninterrupted Ray Train run on tokens with 10 NaN rows, shared by the two tests below
    (the suite's budget: each Train run costs ~20 s of start-up). Its dictionary is kept in
    memory: the second test retrains the same root under another config."""
    path = tmp_path_factory.mktemp("reference")
    root = ResultsRoot(str(path))
    write_token_stage(root, nan_rows=10)
    job = _job(path, *SETTINGS)
    res = run_train_sae(job, root, log=_quiet)
    sae = load_sae(job, root)
    return {"path": path, "root": root, "result": res,
            "W_dec": sae.W_dec.detach().clone(), "threshold": sae.threshold.detach().clone()}


def test_interrupted_stage_resumes_and_matches_an_uninterrupted_run(reference, tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    write_token_stage(root, nan_rows=10)  # the reference's tokens (same seed)
    # The default fault kind, "raise": with max_failures=0 the error reaches this driver, and its
    # message tells it from any other failure. (tests/stages/test_multinode.py kills the process.)
    with pytest.raises(Exception, match="injected fault at step 13"):
        with faults.injected("train-sae", step=13, marker=str(tmp_path / "fault")):
            run_train_sae(_job(tmp_path / "r", "sae.max_failures=0", *SETTINGS), root, log=_quiet)
    stage = root.stage("demo-vit-tiny", "train-sae")
    assert not stage.is_complete()
    # max_failures is not part of what the SAE depends on: same run, resumed from its checkpoint.
    res = run_train_sae(_job(tmp_path / "r", *SETTINGS), root, log=_quiet)
    assert res.resumed_from == [8]
    assert res.steps == reference["result"].steps == 2 * (2048 // 128)
    assert res.nonfinite_rows == 10  # counted once, across the interruption
    # The resume replays the epoch's order and skips the 8 trained batches: same data, same dictionary.
    b = load_sae(_job(tmp_path / "r", *SETTINGS), root)
    assert torch.allclose(reference["W_dec"], b.W_dec, atol=1e-6)
    assert torch.allclose(reference["threshold"], b.threshold)


def test_stale_upstream_is_refused_nonfinite_rows_excluded_and_changed_config_retrains(reference):
    # The reference run shows the NaN rows planted in the tokens counted and left out; a later
    # run with another config retrains rather than reusing it.
    res, root, path = reference["result"], reference["root"], reference["path"]
    assert res.nonfinite_rows == 10
    assert res.manifest["nonfinite_rows"] == 10
    # AuxK runs: the 'auto' dead window is a quarter of the run (2 epochs x 16 steps x 128 tokens on
    # one worker), and latents the SAE let die were revived within it (logged per row, summed here).
    assert res.manifest["dead_after_tokens"] == 2 * 16 * 128 // 4
    assert res.manifest["revived_latents"] > 0
    assert np.isfinite(res.final["loss"])
    assert torch.isfinite(reference["W_dec"]).all() and torch.isfinite(reference["threshold"]).all()
    assert not run_train_sae(_job(path, *SETTINGS, "sae.epochs=1", "sae.k=3"), root, log=_quiet).skipped
    # Tokens from another layer: training and evaluation refuse them rather than mixing configs.
    other_layer = _job(path, *SETTINGS, "model.layer=2")
    with pytest.raises(RuntimeError, match="another config"):
        run_train_sae(other_layer, root, log=_quiet)
    with pytest.raises(RuntimeError, match="another config|missing"):
        run_eval_sae(other_layer, root, log=_quiet)


def test_token_width_mismatch_fails_clearly(ray_local, tmp_path):
    root = ResultsRoot(str(tmp_path / "r"))
    write_token_stage(root, width=64, n_train=256, n_val=64)
    with pytest.raises(ValueError, match="activation width 64.*expects 96"):
        run_train_sae(_job(tmp_path / "r"), root, log=_quiet)


def test_training_needs_a_committed_extract_stage(ray_local, tmp_path):
    with pytest.raises(RuntimeError, match="extract stage at .* is missing"):
        run_train_sae(_job(tmp_path / "r"), ResultsRoot(str(tmp_path / "r")), log=_quiet)


# Two DDP workers (one step = one batch per worker, the averaged gradients train the dictionary,
# unit-norm decoder rows) and a worker failure inside a run (restart from the last checkpoint,
# same total steps, no step logged twice) are checked in tests/stages/test_multinode.py, with the
# workers on two nodes of a simulated cluster: one Ray Train run there instead of two more here.


def test_packing_model_finds_layouts_that_leave_no_whole_cpu_for_the_token_read():
    from scope_ray.stages.train_sae import _free_cpus_after_packing

    # D's multi-node layout that hung: 2-CPU nodes, 1.5-CPU workers -> 0.5 left on each node.
    assert _free_cpus_after_packing([2.0, 2.0, 0.0], 2, 1.5) == [0.5, 0.5, 0.0]
    # One worker on a 2-CPU local instance leaves a whole CPU.
    assert max(_free_cpus_after_packing([2.0], 1, 1.0)) == 1.0
    # Workers that cannot be placed at all: None (the total-CPU check reports that one).
    assert _free_cpus_after_packing([2.0], 2, 1.5) is None


def test_a_dead_window_as_long_as_the_run_is_warned_about():
    from scope_ray.stages.train_sae import _dead_window

    said = []
    assert _dead_window(_job("/tmp/unused", "sae.dead_after_tokens=4096"), 4096, said.append) == 4096
    assert len(said) == 1 and "AuxK never runs" in said[0]
    assert _dead_window(_job("/tmp/unused"), 4096, said.append) == 1024 and len(said) == 1

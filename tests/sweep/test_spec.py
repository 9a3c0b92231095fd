"""scope_ray/sweep/spec.py: a sweep spec's errors name the key, every job is validated before
anything is submitted, overrides reach each job, and a job's hash follows its results."""

from __future__ import annotations

import pytest

from scope_ray.config import load_config
from scope_ray.sweep import SweepSpecError, load_sweep
from scope_ray.sweep.spec import job_hash
from tests.sweep.helpers import REPO, spec_files


def test_sweep_spec_errors_name_the_key_and_what_is_allowed(tmp_path):
    with pytest.raises(SweepSpecError, match=r"max_concurent: unknown key; allowed keys here: name, jobs"):
        load_sweep(spec_files(tmp_path, {"max_concurent": 2}))
    with pytest.raises(SweepSpecError, match=r"runtime_env.workdir: unknown key; allowed keys here: working_dir"):
        load_sweep(spec_files(tmp_path, {"runtime_env": {"workdir": "."}}))
    with pytest.raises(SweepSpecError, match=r"stages: unknown stage\(s\) \['train'\]; allowed: extract, train-sae"):
        load_sweep(spec_files(tmp_path, {"stages": ["extract", "train"]}))
    with pytest.raises(SweepSpecError, match=r"max_concurrent: .*greater than or equal to 1"):
        load_sweep(spec_files(tmp_path, {}), max_concurrent=0)
    with pytest.raises(SweepSpecError, match="AWS_SECRET_ACCESS_KEY looks like a credential"):
        load_sweep(spec_files(tmp_path, {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}}))
    with pytest.raises(SweepSpecError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_every_job_spec_is_validated_before_anything_is_submitted(tmp_path):
    bad = {"a.yaml": {"model": {"name": "demo-vit-tiny"}, "sae": {"k": 10**6}},
           "b.yaml": {"model": {"name": "no-such-model"}}}
    with pytest.raises(SweepSpecError) as err:
        load_sweep(spec_files(tmp_path, {}, bad))
    text = str(err.value)
    assert "2 of 2 job spec(s) cannot run; nothing was submitted" in text
    assert "a.yaml" in text and "sae.k: 1000000 is larger than the dictionary" in text
    assert "b.yaml" in text and "unknown model 'no-such-model'" in text
    # The sweep's overrides are part of what is validated.
    with pytest.raises(SweepSpecError, match="sae.k"):
        load_sweep(spec_files(tmp_path, {"overrides": {"sae.k": 0}}))
    # Two jobs writing the same model's directories under the same root.
    same = {"a.yaml": {"model": {"name": "demo-vit-tiny"}}, "b.yaml": {"model": {"name": "demo-vit-tiny"}}}
    with pytest.raises(SweepSpecError, match="two jobs would write the same stage directories"):
        load_sweep(spec_files(tmp_path, {}, same))
    # ... also when the root is spelled two ways ("/r" and "/r/", "s3://b/x" and "s3://b//x/").
    for roots in ((str(tmp_path / "r"), str(tmp_path / "r") + "/"), ("s3://b/x", "s3://b//x/")):
        spelled = {"a.yaml": {"model": {"name": "demo-vit-tiny"}, "storage": {"root": roots[0]}},
                   "b.yaml": {"model": {"name": "demo-vit-tiny"}, "storage": {"root": roots[1]}}}
        with pytest.raises(SweepSpecError, match="two jobs would write the same stage directories"):
            load_sweep(spec_files(tmp_path, {}, spelled))
    # With a working_dir the job reads its spec there, so the spec must lie inside it.
    (tmp_path / "wd").mkdir()
    with pytest.raises(SweepSpecError, match="lies outside runtime_env.working_dir"):
        load_sweep(spec_files(tmp_path, {"runtime_env": {"working_dir": "wd"}}))


def test_overrides_reach_the_job_config_and_its_command_line(tmp_path):
    jobs = {"jobs/a.yaml": {"model": {"name": "demo-vit-tiny"}}, "jobs/b.yaml": {"model": {"name": "demo-vit-reg"}}}
    path = spec_files(tmp_path, {"jobs": ["jobs/a.yaml", "jobs/b.yaml"], "stages": ["train-sae", "extract"],
                                  "overrides": {"storage.root": "s3://bucket/x", "sae.k": 5, "scope.shifts": [1, 2]},
                                  "runtime_env": {"working_dir": "."}}, jobs)
    sweep = load_sweep(path, overrides=["sae.k=6"])
    assert sweep.spec.stages == ("extract", "train-sae")  # pipeline order
    a = sweep.jobs[0]
    assert (a.config.storage.root, a.config.sae.k, a.config.scope.shifts) == ("s3://bucket/x", 6, (1, 2))
    assert a.entrypoint == ("python jobs/entrypoint.py jobs/a.yaml --stages extract,train-sae "
                            "--set storage.root=s3://bucket/x --set 'scope.shifts=[1, 2]' --set sae.k=6 "
                            "--set ray.cluster_share=0.5")
    # What the job on the cluster resolves from that command line is what the sweep validated.
    assert load_config(tmp_path / "jobs/a.yaml", list(a.overrides)) == a.config
    assert sweep.runtime_env == {"working_dir": str(tmp_path.resolve())}


def test_jobs_that_run_at_once_each_get_their_share_of_the_cluster(tmp_path):
    """Two jobs at once on one cluster: each sizes its pools to half of it (the sweep deadlock of
    issue 18 came from each sizing them to all of it). One job at a time, a share the user set,
    or a smaller one in the job's own spec are left alone."""
    def shares(sweep: dict, overrides=(), jobs=None) -> list[float]:
        return [j.config.ray.cluster_share for j in load_sweep(spec_files(tmp_path, sweep, jobs), overrides=overrides).jobs]

    assert shares({"max_concurrent": 2}) == [0.5, 0.5]
    assert shares({"max_concurrent": 4}) == [0.5, 0.5]  # two jobs never run four at once
    assert shares({"max_concurrent": 1}) == [1.0, 1.0]
    assert shares({"max_concurrent": 2}, overrides=["ray.cluster_share=0.8"]) == [0.8, 0.8]
    own = {"a.yaml": {"model": {"name": "demo-vit-tiny"}, "ray": {"cluster_share": 0.25}},
           "b.yaml": {"model": {"name": "demo-vit-reg"}}}
    assert shares({"max_concurrent": 2}, jobs=own) == [0.25, 0.5]


def test_job_hash_tracks_results_not_where_they_run():
    base = load_config(None)
    assert job_hash(base) == job_hash(load_config(None, ["ray.num_actors=4", "name=other"]))
    assert job_hash(base) == job_hash(load_config(None, [f"model.layer={base.model.resolved_layer}"]))
    assert job_hash(base) != job_hash(load_config(None, ["sae.k=7"]))
    assert job_hash(base) != job_hash(load_config(None, ["storage.root=elsewhere"]))


def test_a_shipped_sweep_with_placeholders_is_refused_before_anything_runs(tmp_path, capsys):
    from scope_ray.cli import main

    shipped = REPO / "jobs" / "sweeps" / "clip.yaml"
    # Only the results root pointed somewhere real: the job specs' data paths are still PLACEHOLDER.
    code = main(["sweep", str(shipped), "--dry-run", "--address", "http://127.0.0.1:1",
                 "--set", f"storage.root={tmp_path / 'r'}"])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 2 and "PLACEHOLDER values left" in err and "nothing submitted" in err
    # One line for the keys every job leaves open (not the same list once per job), the root not among them.
    (common,) = [ln for ln in err.splitlines() if ln.strip().startswith("every job (3): ")]
    assert "data.imagenet.train.path" in common and "storage.root" not in err
    assert err.count("data.imagenet.train.path") == 1
    # The dry run still shows the plan: each job, what it would run, its command.
    for model in ("clip-vit-b16", "clip-vit-l14", "clip-vit-l14-336"):
        assert f"{model}: python jobs/entrypoint.py jobs/{model}.yaml" in out
    assert out.count("would run") == 3
    assert not (tmp_path / "r").exists()

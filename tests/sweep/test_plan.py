"""scope_ray/sweep/plan.py: the skip rule, the sweep state on the results root, the dry run and
the saved job logs."""

from __future__ import annotations

from scope_ray.storage import ResultsRoot
from scope_ray.sweep import load_sweep, run_sweep
from scope_ray.sweep.plan import completed_state, decide, manifest_hashes, read_state, stage_dirs, write_state
from tests.sweep.helpers import spec_files


def _commit(root: ResultsRoot, model: str, stage: str, chash: str) -> None:
    root.stage(model, stage).commit(chash, inputs={}, rows={})


def test_skip_only_when_the_same_config_completed_every_requested_stage(tmp_path):
    root, model = ResultsRoot(str(tmp_path)), "demo-vit-tiny"
    dirs_of = {s: stage_dirs(s, has_text_tower=False) for s in ("extract", "train-sae", "cds", "zeroshot")}
    assert dirs_of["cds"] == ("cds-topk", "cds", "partition") and dirs_of["zeroshot"] == ()
    stages = ("extract", "train-sae")
    now = lambda: manifest_hashes(root, model, ["extract", "train-sae"])  # noqa: E731

    assert not decide(None, "H", stages, now(), dirs_of).skip
    _commit(root, model, "extract", "e1")
    _commit(root, model, "train-sae", "t1")
    state = completed_state(None, job_id="j1", job_hash="H", stages=stages, manifests=now(), when="t")
    write_state(root, model, state)
    assert read_state(root, model) == state
    assert decide(state, "H", stages, now(), dirs_of) == decide(state, "H", ("extract",), now(), dirs_of)
    assert decide(state, "H", stages, now(), dirs_of).skip
    # Stale: the job's config changed since.
    d = decide(state, "H2", stages, now(), dirs_of)
    assert not d.skip and "config changed" in d.reason
    # More stages than were completed.
    d = decide(state, "H", (*stages, "cds"), {**now(), "cds-topk": None}, dirs_of)
    assert not d.skip and "cds not yet run" in d.reason
    # A stage redone by hand with other settings, or removed (e.g. an interrupted redo).
    _commit(root, model, "train-sae", "t2")
    d = decide(state, "H", stages, now(), dirs_of)
    assert not d.skip and "train-sae was redone with another config" in d.reason
    root.fs.rm(str(tmp_path / model / "train-sae"), recursive=True)
    d = decide(state, "H", stages, now(), dirs_of)
    assert not d.skip and "train-sae was removed or interrupted" in d.reason


def test_completed_stages_add_up_under_one_config_and_start_over_under_another():
    s1 = completed_state(None, job_id="j1", job_hash="H", stages=("extract",), manifests={"extract": "e"}, when="t")
    s2 = completed_state(s1, job_id="j2", job_hash="H", stages=("train-sae",), manifests={"train-sae": "t"}, when="t")
    assert s2["complete"]["stages"] == ["extract", "train-sae"]
    assert s2["complete"]["manifests"] == {"extract": "e", "train-sae": "t"}
    s3 = completed_state(s2, job_id="j3", job_hash="H2", stages=("train-sae",), manifests={"train-sae": "u"}, when="t")
    assert s3["complete"]["stages"] == ["train-sae"] and s3["complete"]["manifests"] == {"train-sae": "u"}
    # A stage recorded without a manifest (a job that exited 0 without committing it) is never complete.
    dirs_of = {"extract": ("extract",)}
    hollow = completed_state(None, job_id="j", job_hash="H", stages=("extract",), manifests={"extract": None}, when="t")
    assert not decide(hollow, "H", ("extract",), {"extract": None}, dirs_of).skip


def test_dry_run_reports_the_plan_and_submits_nothing(tmp_path, capsys):
    path = spec_files(tmp_path, {"stages": ["extract"], "overrides": {"storage.root": str(tmp_path / "r")}})
    sweep = load_sweep(path)
    a = sweep.jobs[0]
    root = ResultsRoot(str(tmp_path / "r"))
    _commit(root, a.model, "extract", "e")
    write_state(root, a.model, completed_state(None, job_id="j", job_hash=a.job_hash, stages=("extract",),
                                               manifests={"extract": "e"}, when="t"))
    assert run_sweep(str(path), dry_run=True) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "would run" in out and "no completed sweep job on record" in out
    assert "demo-vit-reg: python jobs/entrypoint.py" in out and "nothing submitted" in out
    assert not (tmp_path / "r" / ".sweeps").exists()


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    import threading

    from scope_ray.sweep.plan import write_text

    root, errors = ResultsRoot(str(tmp_path)), []

    def writer(tag: str) -> None:
        try:
            for i in range(150):
                write_text(root, "m/logs/sweep-state.json", f"{tag}{i}")
        except Exception as exc:  # noqa: BLE001 - collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (tmp_path / "m/logs/sweep-state.json").read_text() in ("a149", "b149")
    assert [p.name for p in (tmp_path / "m/logs").iterdir()] == ["sweep-state.json"]  # no temporary file left


def test_saved_job_logs_hold_no_colour_codes_and_one_line_per_progress_bar():
    from scope_ray.sweep.plan import clean_log

    raw = ("\x1b[36m(RayTrainWorker pid=1)\x1b[0m [train-sae] step 10/20 loss 0.5\n"
           "extract train: 0img [00:00, ?img/s]\rextract train: 8img [00:01, 6img/s]\rextract train: 16img [00:02]\n"
           "\x1b[2K\x1b[1Adone\n")
    assert clean_log(raw) == ("(RayTrainWorker pid=1) [train-sae] step 10/20 loss 0.5\n"
                              "extract train: 16img [00:02]\ndone\n")

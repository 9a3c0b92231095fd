"""The command line: help with examples, config errors before Ray, a stage run in-process."""

import pytest

from scope_ray.cli import _parser, main

COMMANDS = ("demo", "run", "stage", "sweep", "report", "doctor", "check", "models", "import-sae", "export-sae", "browse")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out


def test_parser_lists_all_commands():
    help_text = _parser().format_help()
    assert all(c in help_text for c in COMMANDS)


def test_bad_config_exits_2_with_key_and_allowed(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: deit3-b}\n")
    assert main(["check", str(job), "--set", "sae.k=99999"]) == 2
    err = capsys.readouterr().err
    assert "sae.k" in err and "allowed: 1..24576" in err


def test_stage_needing_data_fails_before_work(tmp_path, capsys):
    import ray

    job = tmp_path / "job.yaml"
    job.write_text(f"storage: {{root: {tmp_path / 'r'}}}\nray: {{gpus_per_actor: 0}}\n")
    started = ray.is_initialized()
    assert main(["stage", "extract", str(job)]) == 2
    assert "data.imagenet.train is not set" in capsys.readouterr().err
    assert ray.is_initialized() == started  # failed before connecting to Ray


def test_unwritable_results_root_fails_before_work(tmp_path, capsys, monkeypatch):
    import scope_ray.stages.cluster as cluster

    def no_cluster(*_):
        raise AssertionError("connected to Ray before refusing the results root")

    monkeypatch.setattr(cluster, "connect", no_cluster)  # run imports it at call time
    blocker = tmp_path / "a-file"  # a root below a regular file cannot be created, even by root (CI is root)
    blocker.write_text("x")
    data = tmp_path / "train"
    data.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(f"storage: {{root: {blocker / 'results'}}}\nray: {{gpus_per_actor: 0}}\n"
                   f"data: {{imagenet: {{train: {{format: folder, path: {data}}}}}}}\n")
    assert main(["run", str(job), "--stages", "extract"]) == 2
    err = capsys.readouterr().err
    assert f"results root {blocker / 'results'} is not writable" in err


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "clip-vit-l14-336" in out and "siglip2-g" in out and "24x24" in out


def test_check_prints_resolved_config(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: dinov2-b}\n")
    assert main(["check", str(job)]) == 0
    assert "dinov2-b" in capsys.readouterr().out


@pytest.mark.parametrize("stage, first", [("instability", "extract"), ("cds", "train-sae"), ("probe", "cds")])
def test_scope_stages_without_their_inputs_fail_clearly(ray_local, tmp_path, capsys, stage, first):
    """`scope-ray stage instability|cds|probe` on an empty results root: one line naming what to run first."""
    data = tmp_path / "val"
    data.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(f"storage: {{root: {tmp_path / 'r'}}}\n"
                   f"data: {{imagenet: {{val: {{format: folder, path: {data}}}}}}}\n")
    assert main(["stage", stage, str(job)]) == 2
    err = capsys.readouterr().err
    assert f"scope-ray stage {first}" in err, err


def test_shipped_specs_are_valid_but_their_placeholders_stop_check_and_run(tmp_path, capsys):
    from pathlib import Path

    spec = str(Path(__file__).resolve().parents[1] / "jobs" / "dinov2-b.yaml")
    assert main(["check", spec]) == 1
    err = capsys.readouterr().err
    assert "not runnable yet" in err and "storage.root" in err and "data.imagenet.train.path" in err
    assert main(["run", spec, "--set", f"storage.root={tmp_path / 'r'}"]) == 2  # before Ray, before any work
    err = capsys.readouterr().err
    assert "PLACEHOLDER values at data.imagenet.train.path" in err and "storage.root" not in err
    assert not (tmp_path / "r").exists()


def test_a_full_disk_is_one_clear_line_and_says_what_is_kept(tmp_path, capsys, monkeypatch):
    """ENOSPC at commit (tests/test_storage.py shows nothing is left behind): no traceback, one
    line naming the file and what to do."""
    import errno

    import scope_ray.stages.cluster as cluster
    import scope_ray.stages.extract as extract

    def full(job, root, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results" / "manifest.json"))

    monkeypatch.setattr(cluster, "connect", lambda *_: None)
    monkeypatch.setattr(extract, "run_extract", full)  # run imports it at call time
    data = tmp_path / "train"
    data.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(f"storage: {{root: {tmp_path / 'results'}}}\nray: {{gpus_per_actor: 0}}\n"
                   f"data: {{imagenet: {{train: {{format: folder, path: {data}}}}}}}\n")
    assert main(["run", str(job), "--stages", "extract"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "manifest.json" in err and "committed stages are kept" in err
    assert "Traceback" not in err


def test_import_sae_writes_the_imported_file_and_a_pickle_is_one_clear_line(tmp_path, capsys):
    import json

    import safetensors.torch
    import torch

    from scope_ray.sae_import import ImportedSAE

    folder = tmp_path / "layers.6"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"encoder.weight": torch.randn(12, 4, generator=g), "encoder.bias": torch.zeros(12),
                                 "W_dec": torch.randn(12, 4, generator=g), "b_dec": torch.randn(4, generator=g)},
                                str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 2}))
    out = tmp_path / "imported.safetensors"
    assert main(["import-sae", "sparsify", str(folder), "--out", str(out)]) == 0
    assert "width 4, 12 latents, activation topk (k = 2)" in capsys.readouterr().out
    sae = ImportedSAE.load(out)
    assert sae.provenance["toolkit"] == "sparsify" and sae.k == 2
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "model.pt")
    assert main(["import-sae", "overcomplete", str(tmp_path / "model.pt"), "--architecture", "SAE",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a plain state dict" in err and "Traceback" not in err and not (tmp_path / "x.safetensors").exists()


def test_export_sae_needs_a_committed_sae_then_writes_the_file_and_a_card_saying_what_has_not_run(tmp_path, capsys):
    import json

    import safetensors.torch
    import torch

    from scope_ray.config import load_config
    from scope_ray.sae_export import read_provenance
    from scope_ray.stages.train_sae import run_train_sae
    from scope_ray.storage import ResultsRoot

    folder = tmp_path / "layers.3"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"encoder.weight": torch.randn(96, 96, generator=g), "encoder.bias": torch.zeros(96),
                                 "W_dec": torch.randn(96, 96, generator=g), "b_dec": torch.zeros(96)},
                                str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4}))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {{name: demo-vit-tiny}}\nstorage: {{root: {tmp_path / 'results'}}}\n"
                    f"sae: {{expansion: 1, k: 4, source: {{format: sparsify, path: {folder}}}}}\n")
    out = tmp_path / "shared"
    assert main(["export-sae", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no SAE committed for this config" in err and "scope-ray stage train-sae" in err and not out.exists()
    job = load_config(str(spec))
    run_train_sae(job, ResultsRoot(job.storage.root), log=lambda *_: None)
    assert main(["export-sae", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}/sae.safetensors", f"wrote {out}/README.md"]
    card = (out / "README.md").read_text()
    assert "eval-sae has not run for this config." in card and "partition has not run for this config." in card
    assert "**The backbone's weights are `none`" in card  # demo-vit-tiny is random-init
    prov = read_provenance(str(out / "sae.safetensors"))
    assert prov["origin"]["toolkit"] == "sparsify" and prov["metrics"] is None and prov["scope"] is None

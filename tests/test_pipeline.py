"""The pipeline declared once (scope_ray/pipeline.py): its readers agree with it, no stage module
imports another, and every command the code tells a user to run is one the CLI accepts."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import scope_ray
import scope_ray.stages
from scope_ray import pipeline
from scope_ray.cli import _parser as build_parser

PACKAGE = Path(scope_ray.__file__).parent
# Shared modules of the stage layer (not stages): readers, actor plumbing, transforms.
SHARED = {"common", "cluster", "decode", "scc_pairs", "probe_cache"}


def test_every_reader_of_the_pipeline_sees_the_same_stages_and_directories():
    from scope_ray.cli import STAGES as CLI_STAGES
    from scope_ray.report.content import STAGES as REPORT_DIRS
    from scope_ray.sweep.plan import stage_dirs
    from scope_ray.sweep.spec import SweepSpec

    assert CLI_STAGES == pipeline.STAGES
    assert SweepSpec.model_fields["stages"].default == pipeline.STAGES
    flat = [d for s in pipeline.STAGES for d in stage_dirs(s, has_text_tower=True)]
    assert len(flat) == len(set(flat)) and tuple(flat) == REPORT_DIRS == pipeline.RESULT_DIRS
    # Every directory a stage module names (its STAGE, cds's TOPK_STAGE, ...) is a declared one.
    named = set()
    for info in pkgutil.iter_modules(scope_ray.stages.__path__):
        module = importlib.import_module(f"scope_ray.stages.{info.name}")
        named |= {v for k, v in vars(module).items() if k.endswith("STAGE") and isinstance(v, str)}
    assert named == set(pipeline.RESULT_DIRS)
    for s in pipeline.PIPELINE:  # every step resolves, every upstream is declared before it
        assert callable(pipeline.runner(s.name)) and all(callable(step.load()) for step in s.steps)
        assert {step.name for step in s.steps} <= set(s.dirs)
        assert all(pipeline.STAGES.index(u) < pipeline.STAGES.index(s.name) for u in s.upstream)


def _stage_imports(path: Path) -> set[str]:
    """Stage modules ``path`` imports (anywhere in it, function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("scope_ray.stages."):
                found.add(node.module.rsplit(".", 1)[1])
            elif node.module == "scope_ray.stages":
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("scope_ray.stages.")}
    return found


def test_no_stage_module_imports_another():
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - SHARED - {"__init__"}
    crossing = {p.stem: sorted(_stage_imports(p) & stages - {p.stem})
                for p in (PACKAGE / "stages").glob("*.py")}
    assert not {k: v for k, v in crossing.items() if v}, crossing
    # The shared modules import no stage either (else a stage would import one through them).
    assert not [m for m in SHARED if _stage_imports(PACKAGE / "stages" / f"{m}.py") & stages]


def test_the_check_above_catches_a_stage_importing_another(tmp_path):
    planted = tmp_path / "partition.py"
    planted.write_text("def f():\n    from scope_ray.stages.cds import run_cds\n")
    assert _stage_imports(planted) == {"cds"}


HINT = re.compile(r"scope-ray (stage|run|report|doctor|check|sweep|demo|models)\b((?: [a-z][a-z-]*)?)")


def _hints() -> list[tuple[str, str, str]]:
    """(file, command, argument) of every `scope-ray <command> [name]` the package prints."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        for m in HINT.finditer(path.read_text()):
            out.append((str(path.relative_to(PACKAGE)), m.group(1), m.group(2).strip()))
    return out


def test_every_stage_the_code_tells_a_user_to_run_is_one_the_cli_accepts():
    stage_hints = [(f, arg) for f, cmd, arg in _hints() if cmd == "stage" and arg]
    assert len(stage_hints) >= 5  # the scan finds the hints (a broken pattern would pass vacuously)
    parser = build_parser()
    for f, arg in stage_hints:
        try:
            parser.parse_args(["stage", arg, "job.yaml"])
        except SystemExit:
            pytest.fail(f"{f} tells the user to run `scope-ray stage {arg}`, which the CLI rejects")
    # Hints built from a result directory name the stage that commits it.
    assert pipeline.run_hint(pipeline.PROBE_FEATURES) == "scope-ray stage probe"
    assert pipeline.run_hint(pipeline.PARTITION) == "scope-ray stage cds"
    with pytest.raises(KeyError, match="no stage commits"):
        pipeline.stage_of("probe-feature")


def test_the_stage_of_every_hint_built_from_a_directory_is_accepted():
    parser = build_parser()
    for d in pipeline.RESULT_DIRS:
        name = pipeline.run_hint(d).split()[-1]
        assert parser.parse_args(["stage", name, "job.yaml"]).name == name


def test_stage_functions_take_only_what_a_user_passes():
    """Fault injection lives in scope_ray.faults (an environment plan), not in run_* signatures."""
    import inspect

    user_params = {"job", "root", "log", "progress", "tasks", "variants", "trials", "num_classes"}
    for info in pkgutil.iter_modules(scope_ray.stages.__path__):
        module = importlib.import_module(f"scope_ray.stages.{info.name}")
        for name, fn in vars(module).items():
            if name.startswith("run_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                params = list(inspect.signature(fn).parameters)
                if params[:2] != ["job", "root"]:
                    continue  # not a stage entry point (e.g. run_trial, Tune's trainable)
                extra = set(params) - user_params
                assert not extra, f"{module.__name__}.{name} takes {sorted(extra)}"


def test_a_fault_plan_is_scoped_to_its_block():
    from scope_ray import faults

    assert faults.plan("train-sae") is None
    with faults.injected("train-sae", step=3, marker="/m"):
        with faults.injected("probe", kill={"trial": 0}):
            assert faults.plan("train-sae") == {"step": 3, "marker": "/m"}
            assert faults.plan("probe") == {"kill": {"trial": 0}}
        assert faults.plan("probe") is None
    assert faults.plan("train-sae") is None


# Functions allowed over the length limit, each with its reason in docs/ARCHITECTURE.md.
LONG_FUNCTIONS = {("emd.py", "_emd_rows")}
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_the_limit_unless_documented():
    package = Path(scope_ray.__file__).parent
    architecture = (package.parent / "docs" / "ARCHITECTURE.md").read_text()
    long = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.add((str(path.relative_to(package)), node.name))
    assert long == LONG_FUNCTIONS, f"functions over {MAX_FUNCTION_LINES} lines: {sorted(long - LONG_FUNCTIONS)}"
    assert all(name in architecture for _, name in LONG_FUNCTIONS)


def test_the_extract_hash_names_a_models_eval_transform_and_keeps_the_plain_ones(monkeypatch):
    """DeiT3's crop_pct 0.9 is part of what its tokens depend on (and so of every downstream hash);
    models with the plain transform (the only one before it was read from the library) keep the
    hash their committed stages were made with."""
    import dataclasses

    from scope_ray.config import load_config
    from scope_ray.models import registry

    job = load_config({"model": {"name": "deit3-b"}})
    cropped = (pipeline.extract_hash(job), pipeline.train_sae_hash(job))
    monkeypatch.setitem(registry.REGISTRY, "deit3-b", dataclasses.replace(job.model.spec, crop_pct=1.0))
    plain = (pipeline.extract_hash(job), pipeline.train_sae_hash(job))
    assert cropped[0] != plain[0] and cropped[1] != plain[1]
    keys = ("model.name", "model.weights", "model.layer", "model.precision", "model.tf32", "data.imagenet",
            "data.max_pixels", "data.max_aspect_ratio", "data.min_side", "extract")
    assert plain[0] == job.stage_hash(*keys, exclude=("extract.batch_size",))

"""The ``scope-ray`` command line."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap

# The stages, their order and what each commits are declared once, in scope_ray/pipeline.py.
from scope_ray.pipeline import STAGES


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sae.k=32 (repeatable; VALUE is parsed as YAML)")


def _add_demo(sub, fmt) -> None:
    """`scope-ray demo`."""
    p = sub.add_parser("demo", formatter_class=fmt, help="run the pipeline end to end on a small local example",
                       description=textwrap.dedent("""\
        Run every implemented stage on a small random-init ViT and data made on the spot
        (synthetic shape scenes + scikit-image photos), on a local Ray instance. No network, no GPU.

        example:
          scope-ray demo --workdir /tmp/scope-ray-demo
        """))
    p.add_argument("--workdir", default="scope-ray-demo", help="where the demo writes data and results (default: ./scope-ray-demo)")
    _add_set(p)


def _add_run(sub, fmt) -> None:
    """`scope-ray run`."""
    p = sub.add_parser("run", formatter_class=fmt, help="run the whole pipeline for one job spec",
                       description=textwrap.dedent("""\
        Run every stage for the model in JOB.yaml on the Ray cluster RAY_ADDRESS names (or a
        local instance). Completed stages (manifest with the same config hash) are skipped.

        example:
          scope-ray run jobs/clip-vit-b16.yaml --set storage.root=s3://my-bucket/scope-ray
        """))
    p.add_argument("job", help="job spec (YAML)")
    p.add_argument("--stages", type=_stage_list, default=STAGES, metavar="A,B,...",
                   help=f"run only these stages, in pipeline order (default: all of {','.join(STAGES)})")
    _add_set(p)


def _add_stage(sub, fmt) -> None:
    """`scope-ray stage`."""
    p = sub.add_parser("stage", formatter_class=fmt, help="run one stage of a job spec",
                       description=textwrap.dedent(f"""\
        Run one stage ({', '.join(STAGES)}) of JOB.yaml; skipped when already complete.

        example:
          scope-ray stage extract my-job.yaml --set extract.batch_size=64
        """))
    p.add_argument("name", choices=STAGES)
    p.add_argument("job")
    _add_set(p)


def _add_check(sub, fmt) -> None:
    """`scope-ray check`."""
    p = sub.add_parser("check", formatter_class=fmt, help="validate a job spec without running anything",
                       description="Load and validate JOB.yaml (with --set overrides) and print the resolved config.\n\n"
                                   "example:\n  scope-ray check my-job.yaml --set model.name=dinov2-b")
    p.add_argument("job")
    _add_set(p)


def _add_sweep(sub, fmt) -> None:
    """`scope-ray sweep`."""
    p = sub.add_parser("sweep", formatter_class=fmt, help="submit one Ray job per model of a sweep spec and track them",
                       description=textwrap.dedent("""\
        Submit one Ray job per job spec listed in SWEEP.yaml through the Ray Jobs API, at most
        --max-concurrent at a time; print a live table of model x stage status; write each job's
        log under the results root (ROOT/<model>/logs/). Models whose stages are all complete are
        skipped, so re-running a sweep after a failure only runs what is missing. A failed model
        does not stop the others; the exit code is 0 only when every model succeeded.
        The cluster is RAY_ADDRESS (or --address), e.g. http://head-node:8265; with Ray's token
        authentication on, set RAY_AUTH_MODE=token (the token comes from ~/.ray/auth_token or
        RAY_AUTH_TOKEN).

        example:
          RAY_ADDRESS=http://127.0.0.1:8265 scope-ray sweep jobs/sweeps/clip.yaml --max-concurrent 2
        """))
    p.add_argument("sweep", help="sweep spec (YAML)")
    p.add_argument("--address", default=None, help="Ray dashboard address (default: the spec's, then RAY_ADDRESS)")
    p.add_argument("--max-concurrent", type=int, default=None, help="jobs running at once (default: the spec's)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and skipped, submit nothing")
    _add_set(p)


def _add_report(sub, fmt) -> None:
    """`scope-ray report`."""
    p = sub.add_parser("report", formatter_class=fmt, help="write the Markdown and HTML report of a results root",
                       description=textwrap.dedent("""\
        Read every model under ROOT (a local path, file:// or s3:// URI) and write report.md and a
        self-contained report.html (figures embedded) with the paper's tables (Tables 3, 4, 6, 7,
        8, 9) for whatever models and stages are present, beside the published numbers where the
        model matches, and the figures (Figures 6, 7, 8, feature galleries).

        With --compare OTHER_ROOT (repeatable), models present in several roots get their SAEs
        compared by scope: CDS distributions, γ and group sizes side by side (e.g. a BatchTopK SAE
        trained here against one imported from another toolkit, each run with its own root).

        example:
          scope-ray report s3://my-bucket/scope-ray --out ./report
          scope-ray report ./results-batchtopk --compare ./results-saelens-jumprelu
        """))
    p.add_argument("root", help="results root (local path, file:// or s3:// URI)")
    p.add_argument("--compare", action="append", default=[], metavar="OTHER_ROOT",
                   help="another results root whose SAEs of the same models to compare by scope (repeatable)")
    p.add_argument("--out", default=None, help="where to write report.md / report.html (default: ROOT/report)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// roots (default: the AWS environment's)")


def _add_doctor(sub, fmt) -> None:
    """`scope-ray doctor`."""
    p = sub.add_parser("doctor", formatter_class=fmt, help="check that Ray, GPUs, storage and weights are usable",
                       description=textwrap.dedent("""\
        Check, before a long run: that Ray is reachable (RAY_ADDRESS or a local instance) and which
        resources it has, whether GPUs are visible to torch and to Ray, that the results root is
        writable, and that the model's weights can be reached. With JOB.yaml the root and weights
        are the job's; without it only Ray and GPUs are checked. Exit code 0 when every check passes.

        example:
          scope-ray doctor jobs/clip-vit-b16.yaml
        """))
    p.add_argument("job", nargs="?", default=None, help="job spec (YAML), optional")
    _add_set(p)


def _add_models(sub, fmt) -> None:
    """`scope-ray models`."""
    sub.add_parser("models", help="list the model registry",
                   description="List every backbone in the registry with its designated layer, tau and grid.\n\n"
                               "example:\n  scope-ray models")


def _add_import_sae(sub, fmt) -> None:
    """`scope-ray import-sae`."""
    from scope_ray.sae_import import READERS

    p = sub.add_parser("import-sae", formatter_class=fmt, help="read an SAE trained by another toolkit, exactly",
                       description=textwrap.dedent(f"""\
        Read an SAE saved by another toolkit ({', '.join(READERS)}) into this project's
        form (its encode / decode exactly as the toolkit computes them at inference; docs/sae.md)
        and write it as one safetensors file with its provenance. To use it in a job instead of
        training one, set sae.source (format, path, ...) in the job spec; train-sae then imports it.

        example:
          scope-ray import-sae sparsify ./checkpoints/layers.10 --out sae.safetensors
          scope-ray import-sae overcomplete sae_state.pt --architecture TopKSAE --k 32 --out sae.safetensors
        """))
    p.add_argument("format", choices=sorted(READERS))
    p.add_argument("path", help="the toolkit's file or folder (local path, file:// or s3:// URI)")
    p.add_argument("--out", required=True, help="where to write the imported SAE (.safetensors)")
    p.add_argument("--architecture", default=None, help="the toolkit's class when the file does not say")
    p.add_argument("--k", type=int, default=None, help="top-k when the file does not hold it")
    p.add_argument("--threshold", type=float, default=None, help="overcomplete BatchTopKSAE's running threshold")
    p.add_argument("--input-scale", type=float, default=None,
                   help="the scalar the toolkit's data loader multiplied activations by (saev: 1 / its scalar)")
    p.add_argument("--input-mean", default=None,
                   help="safetensors file with the per-dimension mean the loader subtracted before scaling")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths")


def _add_export_sae(sub, fmt) -> None:
    """`scope-ray export-sae`."""
    p = sub.add_parser("export-sae", formatter_class=fmt, help="write a job's SAE with a model card, for sharing",
                       description=textwrap.dedent("""\
        Write the SAE the job committed (trained or imported) to a folder: sae.safetensors (its
        provenance in the header), features.parquet (every latent's CDS and scope group, once
        partition has run) and README.md, a model card with the base model, layer,
        preprocessing, training data, metrics and CDS summary. Reads only stages committed for
        this job's config.

        example:
          scope-ray export-sae jobs/clip_vit_b16.yaml --out ./clip-b16-sae
        """))
    p.add_argument("job", help="the job spec whose SAE to export (YAML)")
    p.add_argument("--out", required=True, help="the folder to write (local path or s3:// URI)")
    _add_set(p)


def _export_sae(args) -> int:
    from scope_ray.config import load_config
    from scope_ray.sae_export import export_sae
    from scope_ray.storage import ResultsRoot

    job = load_config(args.job, args.overrides)
    paths = export_sae(job, ResultsRoot(job.storage.root, job.storage.endpoint_url), args.out)
    for path in (paths.sae, paths.features, paths.card):
        if path is not None:
            print(f"wrote {path}")
    return 0


def _add_browse(sub, fmt) -> None:
    """`scope-ray browse`."""
    p = sub.add_parser("browse", formatter_class=fmt, help="write a browsable site of a model's features by scope",
                       description=textwrap.dedent("""\
        Write a static site of the job's SAE features: an index of every feature (CDS, group,
        usable images, top activation, firing rate; sortable, searchable) and, for the features
        at both ends of the CDS range, a page with their top images as the SCC pairs CDS compared,
        the activation overlaid on both views. Needs the job's partition stage; --serve serves it
        on localhost.

        example:
          scope-ray browse jobs/clip-vit-b16.yaml --out ./browse-clip-b16 --serve
        """))
    p.add_argument("job", help="the job spec whose model to browse (YAML)")
    p.add_argument("--out", required=True, help="the folder to write (local)")
    p.add_argument("--features", type=int, default=200, help="features with a page, half at each end of CDS (200)")
    p.add_argument("--images", type=int, default=4, help="top images per feature page (4)")
    p.add_argument("--serve", action="store_true", help="then serve the folder on 127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_set(p)


def _add_migrate(sub, fmt) -> None:
    """`scope-ray migrate`."""
    p = sub.add_parser("migrate", formatter_class=fmt, help="move results written before the hive layout into it",
                       description=textwrap.dedent("""\
        Move the tables of every committed stage under ROOT that was written before the hive layout
        (ROOT/<model>/<stage>/<table>/) to ROOT/tables/<table>/model=<model>/stage=<stage>/
        (docs/storage.md). Stages already there are left alone. Each stage is moved under its lease
        and switched by rewriting its manifest, so it stays complete and readable throughout; an
        interrupted migration is finished by running it again. Results in the old layout are read
        without migrating too: this is for reading the root as datasets.

        example:
          scope-ray migrate s3://my-bucket/scope-ray
        """))
    p.add_argument("root", help="results root (local path, file:// or s3:// URI)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// roots (default: the AWS environment's)")


def _migrate(args) -> int:
    from scope_ray.storage import ResultsRoot, migrate_root

    done = migrate_root(ResultsRoot(args.root, args.endpoint_url))
    print(f"migrated {len(done.moved)} stage(s), {sum(done.moved.values())} part files" if done.moved
          else "nothing moved")
    if done.busy:
        print(f"scope-ray: {len(done.busy)} stage(s) not migrated, a run is writing them: {', '.join(done.busy)}; "
              "run `scope-ray migrate` again once they end", file=sys.stderr)
        return 1
    return 0


def _browse(args) -> int:
    from scope_ray.browse import serve, write_browser
    from scope_ray.config import load_config
    from scope_ray.stages.cluster import connect
    from scope_ray.storage import ResultsRoot

    job = load_config(args.job, args.overrides)
    connect(job.ray)
    paths = write_browser(job, ResultsRoot(job.storage.root, job.storage.endpoint_url), args.out,
                          max_features=args.features, images=args.images)
    if args.serve:
        serve(paths.index.parent, args.port)
    return 0


def _import_sae(args) -> int:
    from scope_ray.sae_import import InputNormalization, Source, import_sae

    norm = None  # either flag alone is a normalisation: scale 1 = mean only, no mean = scale only
    if args.input_scale is not None or args.input_mean is not None:
        norm = InputNormalization(1.0 if args.input_scale is None else args.input_scale, args.input_mean)
    sae = import_sae(Source(args.format, args.path, args.architecture, args.k, args.threshold, norm),
                     endpoint_url=args.endpoint_url)
    sae.save(args.out, endpoint_url=args.endpoint_url)
    print(f"imported a {args.format} {sae.provenance['architecture']} SAE: width {sae.d_in}, {sae.d_sae} latents, "
          f"activation {sae.activation}" + (f" (k = {sae.k})" if sae.activation == "topk" else "")
          + f"; source sha256 {sae.provenance['sha256'][:16]}…\nwrote {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="scope-ray", formatter_class=fmt,
        description="Information-scope analysis (SCC, CDS) of vision-transformer SAEs, as a Ray batch workload.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_run, _add_stage, _add_check, _add_sweep, _add_report, _add_doctor, _add_import_sae,
                _add_export_sae, _add_browse, _add_migrate, _add_models):
        add(sub, fmt)
    return parser


def _stage_list(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown or text!r}; allowed: {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def _run_stages(job_path: str, overrides: list[str], stages: tuple[str, ...]) -> int:
    from scope_ray.config import load_config, placeholders
    from scope_ray.pipeline import runner
    from scope_ray.stages.cluster import connect
    from scope_ray.storage import ResultsRoot

    job = load_config(job_path, overrides)  # every config error surfaces here, before Ray starts
    left = placeholders(job)
    if left:
        raise ValueError(f"{job_path} still has PLACEHOLDER values at {', '.join(left)}: point them at your data and "
                         "results root (edit the spec or --set KEY=VALUE)")
    if "extract" in stages and job.data.imagenet.train is None:
        raise ValueError("data.imagenet.train is not set: extraction needs it (see docs/data.md)")
    root = ResultsRoot(job.storage.root, job.storage.endpoint_url)
    root.check_writable()
    connect(job.ray)
    for name in stages:
        runner(name)(job, root)
    return 0


def main(argv: list[str] | None = None) -> int:
    from scope_ray.config import ConfigError
    from scope_ray.stages.cluster import ClusterResourceError

    from scope_ray.logs import setup as setup_logging

    args = _parser().parse_args(argv)
    setup_logging()  # the stages' progress lines (INFO records of the scope_ray logger) on stdout
    try:
        if args.command == "demo":
            from scope_ray.demo import run_demo

            run_demo(args.workdir, args.overrides)
            return 0
        if args.command == "run":
            return _run_stages(args.job, args.overrides, args.stages)
        if args.command == "sweep":
            from scope_ray.sweep import run_sweep

            return run_sweep(args.sweep, address=args.address, max_concurrent=args.max_concurrent,
                             overrides=args.overrides, dry_run=args.dry_run)
        if args.command == "report":
            from scope_ray.report.content import write_report

            paths = write_report(args.root, out=args.out, endpoint_url=args.endpoint_url, compare=tuple(args.compare))
            print(f"report: {paths.markdown}\nreport: {paths.html}")
            return 0
        if args.command == "doctor":
            from scope_ray.doctor import run_doctor

            return run_doctor(args.job, args.overrides)
        if args.command == "stage":
            return _run_stages(args.job, args.overrides, (args.name,))
        if args.command == "import-sae":
            return _import_sae(args)
        if args.command == "export-sae":
            return _export_sae(args)
        if args.command == "browse":
            return _browse(args)
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "check":
            from scope_ray.config import load_config, placeholders
            import yaml

            job = load_config(args.job, args.overrides)
            print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
            left = placeholders(job)
            if left:
                print(f"scope-ray: valid, but not runnable yet: PLACEHOLDER at {', '.join(left)}", file=sys.stderr)
                return 1
            return 0
        if args.command == "models":
            from scope_ray.models.registry import REGISTRY

            print(f"{'name':<18} {'library':<10} {'layer':>5}/{'depth':<5} {'width':>5} {'grid':>5} {'tau':>6}  source")
            for s in REGISTRY.values():
                tau = "auto" if s.tau is None else f"{s.tau:g}"
                print(f"{s.name:<18} {s.loader:<10} {s.layer:>5}/{s.depth:<5} {s.width:>5} {s.grid:>3}x{s.grid:<2} {tau:>6}  {s.description}")
            print("and any plain ViT by its library: timm:<name>[.<tag>] or open_clip:<arch>[.<tag>] (docs/models.md)")
            return 0
    except ConfigError as exc:
        print(f"scope-ray: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, ConnectionError, ClusterResourceError, ValueError, RuntimeError) as exc:
        # Expected failures (missing data, an earlier stage not run, a bad width, another run
        # writing the stage...) get one clear line; anything else keeps its traceback.
        print(f"scope-ray: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # A full or read-only disk: nothing committed was touched (the manifest is written last,
        # through a temporary name that is removed on failure).
        print(f"scope-ray: {exc.strerror} ({exc.filename or 'the results root'}); free space and run the same "
              "command again: committed stages are kept and skipped", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

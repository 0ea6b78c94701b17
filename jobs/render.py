"""``kandinsky-render render`` / ``python -m jobs.render``: parse flags into a JobConfig and run it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from cluster.resources import parse_labels
from jobs.options import storage as storage_options
from jobs.options.config_file import parse_args
from jobs.reporting.progress import LOG_FORMATS, configure_logging
from schemas.config import ATTENTIONS, DTYPES, RUNNERS, AccelOptions, JobConfig, ModelPaths, StageResources
from schemas.manifest import Limits, ManifestError, RenderDefaults

logger = logging.getLogger("kandinsky_render")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_OUTPUT_BUSY = 75  # EX_TEMPFAIL: another run holds the output's lease; try again later


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only (not None/False/[]) and never splits hub ids at hyphens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.default is None
            or action.default is False
            or action.default == []
            or "(default" in (action.help or "")
        ):
            return action.help or ""
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser(prog: str = "kandinsky-render render") -> argparse.ArgumentParser:
    """The ``render`` command line; every option documents its default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Render every row of Parquet manifests with Kandinsky 2.2 on Ray.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML/JSON file of options (keys are these flag names, e.g. num-decoder-actors: 4); "
        "flags given on the command line override it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (rows and images per mode and size, batches per stage, estimated GPU-seconds) "
        "and exit without loading any model or writing anything",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration YAML for --dry-run's GPU-seconds (default: cluster/calibration.yaml; "
        "make a profile with `kandinsky-render calibrate OUTPUT`)",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--manifest", help="Parquet file, folder/prefix of Parquet files, or glob; any fsspec URI")
    io.add_argument("--output", help="output prefix (fsspec URI): images/, results/, stats.json, _SUCCESS")
    io.add_argument(
        "--example",
        action="store_true",
        help="render the bundled example manifest with tiny random models (built on first use); "
        "--output defaults to ./kandinsky-example",
    )
    io.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for every filesystem (repeatable; VALUE parsed as JSON when it can be); "
        f"applied over ${storage_options.ENV_VAR} (a JSON object) and the --storage-* options below",
    )
    io.add_argument("--storage-endpoint-url", help="object store endpoint (S3-compatible or GCS emulator)")
    io.add_argument("--storage-region", help="S3 region")
    io.add_argument("--storage-anon", action="store_true", help="anonymous access (public buckets)")
    io.add_argument("--storage-profile", help="AWS profile (from ~/.aws/config) for s3://")
    io.add_argument("--overwrite", action="store_true", help="delete previous outputs and start fresh")
    io.add_argument("--retry-errors", action="store_true", help="render again images whose result is an error")
    io.add_argument(
        "--max-error-fraction",
        type=float,
        default=1.0,
        help="exit with status 3 when a larger fraction of this run's images end in error",
    )
    io.add_argument("--lease-ttl", type=float, default=120.0, help="seconds the output lease lasts between renewals")
    io.add_argument(
        "--lease-wait", type=float, default=0.0, help="seconds to wait when another run holds the output's lease"
    )

    models = parser.add_argument_group("models (hub ids or save_pretrained directories)")
    models.add_argument("--models", help="directory holding prior/, decoder/, decoder-inpaint/, controlnet-depth/")
    defaults = ModelPaths()
    models.add_argument("--prior", help=f"prior checkpoint (default: MODELS/prior or {defaults.prior})")
    models.add_argument("--decoder", help=f"text2img/img2img decoder (default: MODELS/decoder or {defaults.decoder})")
    models.add_argument("--inpaint-decoder", help=f"inpaint decoder (default: {defaults.decoder_inpaint})")
    models.add_argument("--controlnet-decoder", help=f"ControlNet decoder (default: {defaults.controlnet_depth})")
    models.add_argument(
        "--depth-model", help=f"depth estimator for ControlNet rows without a hint (default: {defaults.depth})"
    )
    models.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, float32 on CPU")

    accel = parser.add_argument_group("speed (see README.md, Performance)")
    accel.add_argument(
        "--attention", choices=ATTENTIONS, default="sdpa", help="sdpa: torch scaled_dot_product_attention kernels"
    )
    accel.add_argument("--channels-last", action="store_true", help="NHWC conv weights (faster on recent GPUs)")
    accel.add_argument("--compile", action="store_true", help="torch.compile the UNet and prior (slow first calls)")
    accel.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep weights in CPU memory, each model on the GPU only while it runs",
    )
    accel.add_argument(
        "--prompt-cache-size", type=int, default=1024, help="text encodings cached per prior actor (0: off)"
    )

    ray_group = parser.add_argument_group("execution")
    ray_group.add_argument("--runner", choices=RUNNERS, default="ray", help="ray: actor pools; local: in-process")
    ray_group.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    ray_group.add_argument("--num-prior-actors", type=int, help="prior actors (default: 1)")
    ray_group.add_argument(
        "--num-decoder-actors", type=int, help="decoder actors (default: fill the cluster's remaining GPUs; 1 on CPU)"
    )
    ray_group.add_argument("--prior-gpus", type=float, help="GPUs per prior actor (default: 1; 0.5 on a 1-GPU cluster)")
    ray_group.add_argument("--decoder-gpus", type=float, help="GPUs per decoder actor (default: as --prior-gpus)")
    ray_group.add_argument("--prior-cpus", type=float, default=1.0, help="CPUs per prior actor")
    ray_group.add_argument("--decoder-cpus", type=float, default=1.0, help="CPUs per decoder actor")
    ray_group.add_argument("--num-depth-actors", type=int, default=1, help="depth-estimation actors")
    ray_group.add_argument("--depth-gpus", type=float, default=0.0, help="GPUs per depth-estimation actor")
    for stage in ("prior", "decoder"):
        ray_group.add_argument(
            f"--{stage}-accelerator-type", help=f"Ray accelerator type the {stage} actors need (e.g. L4, A100, H100)"
        )
        ray_group.add_argument(
            f"--{stage}-node-label",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"Ray node label the {stage} actors' nodes must carry (repeatable; VALUE may be !v, in(a,b)); "
            f"the configs in cluster/ label GPU node types kandinsky-render/stage={stage}",
        )
    ray_group.add_argument("--batch-size", type=int, default=JobConfig.batch_size, help="images per decoder call")
    ray_group.add_argument(
        "--prior-batch-size",
        type=int,
        help="images per prior call; one call serves whole decoder batches (default: --batch-size)",
    )
    ray_group.add_argument("--seed", type=int, default=0, help="job seed for rows whose seed is null")
    ray_group.add_argument("--results-flush-rows", type=int, default=1000, help="results rows per results part")
    ray_group.add_argument(
        "--results-flush-seconds", type=float, default=30.0, help="publish results at least this often"
    )

    values = parser.add_argument_group("defaults for null manifest values (diffusers' defaults)")
    for field in dataclasses.fields(RenderDefaults):
        values.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            help=f"{field.name} of rows where it is null",
        )
    limits = parser.add_argument_group("limits (rows outside them become error rows)")
    for field in dataclasses.fields(Limits):
        if isinstance(field.default, tuple):
            limits.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=lambda text: tuple(p.strip().lower() for p in text.split(",") if p.strip()),
                default=field.default,
                help=f"{field.name}, comma-separated (default: {','.join(field.default)})",
            )
            continue
        limits.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default, help=field.name
        )
    watch = parser.add_argument_group("watching")
    watch.add_argument(
        "--progress",
        choices=("auto", "live", "log", "off"),
        default="auto",
        help="auto: a live line on terminals, progress log lines elsewhere; off: only the final summary",
    )
    watch.add_argument(
        "--progress-every", type=float, default=30.0, help="seconds between progress log lines (cluster logs)"
    )
    watch.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="json: one JSON object per line")
    watch.add_argument("--log-level", default="INFO", help="driver log level")
    return parser


def config_from_args(args: argparse.Namespace, *, environ: dict[str, str] | None = None) -> JobConfig:
    """Build a `JobConfig` from parsed flags (``--example`` fills manifest, models and output).

    ``environ`` (default ``os.environ``) supplies ``$KANDINSKY_RENDER_STORAGE_OPTIONS``. With
    ``--dry-run`` the example's tiny models are not built.
    """
    manifest, output, models_dir = args.manifest, args.output, args.models
    if args.example:
        from jobs.dev.example import example_manifest_path
        from jobs.dev.tiny_models import build_tiny_models, default_tiny_models_dir

        manifest = manifest or example_manifest_path()
        output = output or "kandinsky-example"
        if not (models_dir or args.prior or args.decoder):
            models_dir = default_tiny_models_dir()
            if not args.dry_run:
                build_tiny_models(models_dir)
    if not manifest or not output:
        raise ValueError("--manifest and --output are required (or use --example)")
    placement = {}
    for stage in ("prior", "decoder"):
        accelerator_type = getattr(args, f"{stage}_accelerator_type")
        labels = parse_labels(getattr(args, f"{stage}_node_label"), flag=f"--{stage}-node-label")
        if accelerator_type or labels:
            placement[stage] = {"accelerator_type": accelerator_type, "label_selector": labels}
    return JobConfig(
        manifest=manifest,
        output=output,
        models=ModelPaths.resolve(
            models_dir=models_dir,
            prior=args.prior,
            decoder=args.decoder,
            decoder_inpaint=args.inpaint_decoder,
            controlnet_depth=args.controlnet_decoder,
            depth=args.depth_model,
        ),
        dtype=args.dtype,
        accel=AccelOptions(
            attention=args.attention,
            channels_last=args.channels_last,
            compile=args.compile,
            cpu_offload=args.cpu_offload,
            prompt_cache_size=args.prompt_cache_size,
        ),
        runner=args.runner,
        address=args.address,
        prior=StageResources(num_actors=args.num_prior_actors, num_gpus=args.prior_gpus, num_cpus=args.prior_cpus),
        decoder=StageResources(
            num_actors=args.num_decoder_actors, num_gpus=args.decoder_gpus, num_cpus=args.decoder_cpus
        ),
        depth=StageResources(num_actors=args.num_depth_actors, num_gpus=args.depth_gpus),
        batch_size=args.batch_size,
        prior_batch_size=args.prior_batch_size,
        seed=args.seed,
        defaults=RenderDefaults(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RenderDefaults)}),
        limits=Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}),
        storage_options=storage_options.resolve(
            environ=os.environ if environ is None else environ,
            pairs=args.storage_option,
            uris=[manifest, output],
            endpoint_url=args.storage_endpoint_url,
            region=args.storage_region,
            anon=args.storage_anon,
            profile=args.storage_profile,
        ),
        results_flush_rows=args.results_flush_rows,
        results_flush_seconds=args.results_flush_seconds,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        max_error_fraction=args.max_error_fraction,
        lease_ttl_s=args.lease_ttl,
        lease_wait_s=args.lease_wait,
        stage_placement=placement,
    )


def main(argv: list[str] | None = None, *, prog: str = "kandinsky-render render") -> int:
    """Run a render job; exit 0 when it completed, 2 for bad input, 1 for any other failure."""
    parser = build_parser(prog)
    secrets = storage_options.secret_env_values(os.environ)
    try:
        args = parse_args(parser, argv)
    except ValueError as exc:  # a bad --config file
        print(f"error: {storage_options.redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(level=args.log_level, log_format=args.log_format)
    redactor = storage_options.install_redaction(secrets)
    from jobs.execution.job import run_job
    from jobs.output.lease import LeaseHeldError
    from jobs.reporting.progress import Progress, summary_table

    try:
        config = config_from_args(args)
        secrets += storage_options.secret_values(config.storage_options)
        redactor.secrets = secrets
        if args.dry_run:
            from jobs.planning.dry_run import dry_run

            print(dry_run(config, calibration=args.calibration))
            return EXIT_OK
        live = {"auto": None, "live": True, "log": False, "off": False}[args.progress]
        every = float("inf") if args.progress == "off" else args.progress_every
        summary = run_job(config, progress=Progress(live=live, log_every_s=every))
    except LeaseHeldError as exc:
        print(f"error: {storage_options.redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_OUTPUT_BUSY
    except ManifestError as exc:
        print(f"error: manifest refused: {storage_options.redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as exc:
        print(f"error: {storage_options.redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # anything else still must not print a credential
        logging.getLogger("kandinsky_render").error("job failed", exc_info=exc)
        print(f"error: {type(exc).__name__}: {storage_options.redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_FAILED
    output = summary.stats["output"]
    print(
        f"run {summary.run_id}: rendered {summary.stats['num_rendered']} image(s) "
        f"({summary.stats['images_per_s']} images/s), skipped {summary.plan.num_done} already final; "
        f"output now holds {output['by_status'].get('ok', 0)} ok and {output['by_status'].get('error', 0)} error "
        f"image(s) -> {config.output}"
    )
    print(summary_table(summary.stats))
    print(f"gallery: {_joined(config.output, summary.stats['report']['gallery'])}")
    fraction = summary.stats["error_fraction_this_run"]
    if fraction > config.max_error_fraction:
        print(
            f"error: {summary.stats['num_errors_this_run']} of this run's images ended in error ({fraction:.1%}), "
            f"above --max-error-fraction {config.max_error_fraction}; see {config.output}/results",
            file=sys.stderr,
        )
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def _joined(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}"


if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.render"))

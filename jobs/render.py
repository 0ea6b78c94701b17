"""``kandinsky-render render`` / ``python -m jobs.render``: flags -> `JobConfig` -> the job (`jobs.job`) or a dry run.

The entry point: it parses the command line (`jobs.options`), builds ``--example``'s tiny models,
runs the job and turns its outcome into an exit status and a summary.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from types import FrameType

from jobs.execution.timeline import command_started
from jobs.options import storage as storage_options
from jobs.options.config_file import parse_args
from jobs.options.flags import PROG, build_parser
from jobs.options.job_config import ExampleInputs, config_from_args, run_options
from jobs.reporting.progress import configure_logging
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.manifest import ManifestError
from schemas.text import one_line, printable, public_uri, uri_secrets

logger = logger_for("kandinsky_render")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_OUTPUT_BUSY = 75  # EX_TEMPFAIL: another run holds the output's lease; try again later
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports SIGTERM
STOPPED = (
    "the run stopped; every shard it published is whole and counted, nothing half-written counts as done, and a "
    "rerun renders the rest"
)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler stopping the job): unwinds like Ctrl-C, releasing the lease and Ray on the way.

    A KeyboardInterrupt: no ``except Exception`` on the way swallows it, and Ray's core worker, which runs
    signal handlers inside its own calls (``ray.wait``), passes on only that (as a KeyboardInterrupt of its
    own: `_signals` says which signal it was) and SystemExit; anything else turns into a SystemError.
    """


_signals: list[int] = []  # the signals this process received while the job ran


def _terminate(signum: int, frame: FrameType | None) -> None:
    _signals.append(signum)
    raise Terminated(signum)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run a render job; exit 0 when it completed, 2 for bad input, 1 for any other failure (see docs/reruns.md,
    Exit status): 130 after Ctrl-C and 143 after SIGTERM, each with a one-line message."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # kept through Ray's start
    _signals.clear()
    try:
        return _main(argv, prog=prog)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated) or signal.SIGTERM in _signals:
            _stopped(f"terminated (SIGTERM): {STOPPED}")
            return EXIT_TERMINATED
        _stopped(f"interrupted (Ctrl-C): {STOPPED}")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(text: str, secrets: list[str]) -> None:
    """``error: <text>`` on stderr, without a credential and safe for a terminal (control characters escaped)."""
    print(f"error: {printable(storage_options.redact(text, secrets), keep_newlines=True)}", file=sys.stderr)


def _stopped(message: str) -> None:
    """The one line a stopped run ends with (on a new line after a live progress line)."""
    print(("\n" if sys.stderr.isatty() else "") + message, file=sys.stderr)


def _main(argv: list[str] | None, *, prog: str) -> int:
    started_at = command_started()
    # Credentials in the environment and in URIs given (user:password@, a presigned URL's query) are never printed.
    tokens = sys.argv[1:] if argv is None else argv
    secrets = storage_options.secret_env_values(os.environ) + [s for t in tokens for s in uri_secrets(t)]
    try:
        args = parse_args(build_parser(prog), argv)
        run = run_options(args)
    except ValueError as exc:  # a bad --config file, a run option out of range
        _error(str(exc), secrets)
        return EXIT_BAD_INPUT
    configure_logging(level=run.log_level, log_format=run.log_format)
    redactor = storage_options.install_redaction(secrets)
    from actors.weights import CheckpointSyncError
    from jobs.job import run_job
    from jobs.planning.availability import ModelUnavailableError
    from jobs.publishing.lease import LeaseHeldError
    from jobs.reporting.progress import Progress, summary_table

    try:
        example = example_inputs() if run.example else None
        config = config_from_args(args, example=example)
        if example is not None and not run.dry_run:
            build_example_models(config, example)
        secrets += storage_options.secret_values(config.storage_options)
        secrets += [
            s for uri in (config.manifest, *dataclasses.asdict(config.models).values()) for s in uri_secrets(uri)
        ]
        redactor.secrets = secrets
        storage_options.check_options([u for u in (config.manifest, config.output) if u], config.storage_options)
        if config.plan_for and not run.dry_run:
            from jobs.planning.forecast import planned_cluster

            planned_cluster(config)  # one cluster of a known GPU type, checked before anything starts
        if run.dry_run:
            from jobs.planning.dry_run import dry_run

            report = dry_run(config, calibration=run.calibration, plan_for=config.plan_for, as_json=run.json)
            print(printable(storage_options.redact(report, secrets), keep_newlines=True))
            return EXIT_OK
        live = {"auto": None, "live": True, "log": False, "off": False}[run.progress]
        every = float("inf") if run.progress == "off" else run.progress_every
        summary = run_job(config, progress=Progress(live=live, log_every_s=every), started_at=started_at)
    except LeaseHeldError as exc:
        _error(str(exc), secrets)
        return EXIT_OUTPUT_BUSY
    except ManifestError as exc:
        _error(f"manifest refused: {exc}", secrets)
        return EXIT_BAD_INPUT
    except CheckpointSyncError as exc:  # one line naming the checkpoint, the cache and the setting that chose it
        _error(str(exc), secrets)
        return EXIT_FAILED
    except ModelUnavailableError as exc:
        if exc.report:  # a dry run: the plan, then why the run would stop
            print(printable(storage_options.redact(exc.report, secrets), keep_newlines=True))
        _error(str(exc), secrets)
        return EXIT_BAD_INPUT
    except ValueError as exc:
        _error(str(exc), secrets)
        return EXIT_BAD_INPUT
    except Exception as exc:  # anything else still must not print a credential
        logger_for("kandinsky_render").error("job failed", exc_info=exc)
        cause = getattr(exc, "cause", None)  # a Ray task error: say what the actor raised, not where
        shown = cause if isinstance(cause, Exception) else exc
        _error(f"{type(shown).__name__}: {one_line(str(shown), limit=4000)}", secrets)
        return EXIT_FAILED
    output, where = summary.stats["output"], public_uri(config.output)
    shown = [
        f"run {summary.run_id}: rendered {summary.stats['num_rendered']} image(s) "
        f"({summary.stats['images_per_s']} images/s), skipped {summary.stats['num_skipped_already_final']} "
        "already final; "
        f"output now holds {output['by_status'].get('ok', 0)} ok and {output['by_status'].get('error', 0)} error "
        f"image(s) -> {where}",
        summary_table(summary.stats),
        f"gallery: {_joined(where, summary.stats['report']['gallery'])}",
    ]
    print(printable(storage_options.redact("\n".join(shown), secrets), keep_newlines=True))
    fraction = summary.stats["error_fraction_this_run"]
    if fraction > config.max_error_fraction:
        print(
            f"error: {summary.stats['num_errors_this_run']} of this run's images ended in error ({fraction:.1%}), "
            f"above --max-error-fraction {config.max_error_fraction}; see {where}/results",
            file=sys.stderr,
        )
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def example_inputs() -> ExampleInputs:
    """``--example``: the bundled manifest, ``./kandinsky-example`` and the tiny models' folder."""
    from jobs.dev.example import example_manifest_path
    from jobs.dev.tiny_models import default_tiny_models_dir

    return ExampleInputs(manifest=example_manifest_path(), output="kandinsky-example", models=default_tiny_models_dir())


def build_example_models(config: JobConfig, example: ExampleInputs) -> None:
    """Build the tiny models (once; offline, seconds) when the config loads any of them."""
    from jobs.dev.tiny_models import build_tiny_models

    paths = dataclasses.asdict(config.models).values()
    if any(isinstance(path, str) and path.startswith(example.models.rstrip("/") + "/") for path in paths):
        build_tiny_models(example.models)


def _joined(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}"


if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.render"))
